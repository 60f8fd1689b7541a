// experts_lab: the expert GEMMs at one MoE shape (default OLMoE-1B-7B: T=16384 H=2048 I=1024
// E=64 K=8, SwiGLU, dropless, uniform routing), each variant verified before it is timed.
//
//   G1 / G2  grouped up / down: CUTLASS sm90 grouped GEMM, sizes on the device (library)
//   L1 / L2  per-expert cublasGemmEx loop up / down (offsets copied to the host once, untimed)
//   D1 / D2  dense-equivalent: one cuBLAS GEMM with the same M, N, K totals (the ceiling)
//   F1 / F2  experts_forward, grouped / cublas_loop_host_offsets backend (activation included;
//            F2 includes its offsets copy and stream synchronisation)
//   B1 / B2  experts_backward, grouped / loop (both include the weight-gradient cuBLAS loop
//            and its host copy of the offsets)
//
// FLOPs: up 2*M*H*A, down 2*M*I*H (A = 2I for SwiGLU), forward 6*M*H*I for SwiGLU, backward twice
// the forward; M = T*K rows. Operands are hundreds of MB, far beyond the 50 MB L2, so repeats on
// the same buffers do not run from cache.
//
// Build (CPU machine): scripts/gpu/build_lab.sh build/gg; run: build/gg/experts_lab [options]
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "moe/cuda/check.cuh"
#include "moe/cuda/experts.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/cuda/synthetic.hpp"

using namespace moe;
using namespace moe::cuda;

namespace {

// ------------------------------------------------------------------------------------------------
// options
// ------------------------------------------------------------------------------------------------

struct Options {
  int64_t tokens = 16384, hidden = 2048, inter = 1024, experts = 64, top_k = 8;
  Skew skew = Skew::uniform;
  Activation activation = Activation::swiglu;
  int reps = 20;
  bool backward = true;

  static void print_usage() {
    std::printf(
        "experts_lab [--tokens T] [--hidden H] [--inter I] [--experts E] [--top-k K]\n"
        "            [--skew uniform|zipf|one_expert] [--activation swiglu|gelu] [--reps N]\n"
        "            [--no-backward]\n"
        "  e.g. experts_lab                       (OLMoE: 16384 2048 1024 64 8)\n"
        "       experts_lab --hidden 2048 --inter 768 --experts 128 --skew zipf   (Qwen3-30B-A3B)\n");
  }
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto next = [&]() -> const char* {
        if (i + 1 >= argc) throw ConfigError(a + " needs a value");
        return argv[++i];
      };
      if (a == "--tokens") tokens = std::atol(next());
      else if (a == "--hidden") hidden = std::atol(next());
      else if (a == "--inter") inter = std::atol(next());
      else if (a == "--experts") experts = std::atol(next());
      else if (a == "--top-k") top_k = std::atol(next());
      else if (a == "--skew") skew = parse_skew(next());
      else if (a == "--activation") activation = parse_activation(next());
      else if (a == "--reps") reps = std::atoi(next());
      else if (a == "--no-backward") backward = false;
      else if (a == "--help" || a == "-h") return false;
      else throw ConfigError("unknown option " + a);
    }
    return true;
  }
  bool valid() const {
    return tokens >= 1 && hidden % 8 == 0 && inter % 8 == 0 && experts >= 1 &&
           experts <= 4096 && top_k >= 1 && top_k <= experts && reps >= 1;
  }
};

// ------------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------------

double median_ms(int reps, cudaStream_t s, const std::function<void()>& run) {
  for (int i = 0; i < 3; ++i) run();
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventCreate(&e));
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
    run();
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  for (int i = 0; i < reps; ++i) MOE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

// Row-major D (m, n) = A (m, k) · B (k, n), bf16, fp32 compute.
void cublas_rows(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* b,
                 bf16* d) {
  const float one = 1.f, zero = 0.f;
  MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, int(n), int(m), int(k), &one, b,
                                CUDA_R_16BF, int(n), a, CUDA_R_16BF, int(k), &zero, d, CUDA_R_16BF,
                                int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <class T>
std::vector<float> download(const T* p, int64_t n) {
  std::vector<T> h(n);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) f[i] = h[i];
    else f[i] = __bfloat162float(h[i]);
  }
  return f;
}

// ||a - b|| / ||b|| over the first n elements; NaN anywhere gives infinity.
double rel_error(const std::vector<float>& a, const std::vector<float>& b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// ------------------------------------------------------------------------------------------------
// main
// ------------------------------------------------------------------------------------------------

int run(const Options& o) {
  cudaStream_t s = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  // Routing and plan on the device (dropless).
  PlanShape ps;
  ps.tokens = o.tokens;
  ps.experts = o.experts;
  ps.top_k = o.top_k;
  ps.choices = o.tokens * o.top_k;
  ps.layout = Layout::dropless;
  SyntheticRouting spec;
  spec.tokens = o.tokens;
  spec.experts = o.experts;
  spec.top_k = o.top_k;
  spec.skew = o.skew;
  spec.seed = 42;
  RoutingBuffers routing;
  upload_routing(synthetic_token_choice(spec), routing, s);
  PlanBuffers plan(ps);
  plan_forward(routing.view(), plan.view(), s);
  const int32_t* offsets = plan.view().offsets;

  ExpertsShape es;
  es.experts = o.experts;
  es.hidden = o.hidden;
  es.inter = o.inter;
  es.activation = o.activation;
  es.max_rows = ps.max_rows();
  const int64_t E = es.experts, H = es.hidden, I = es.inter, A = es.up_width(), R = es.max_rows;

  std::vector<int32_t> off(E + 1);
  MOE_CUDA_CHECK(cudaMemcpyAsync(off.data(), offsets, sizeof(int32_t) * (E + 1),
                                 cudaMemcpyDeviceToHost, s));
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  const int64_t M = off[E];
  int64_t largest = 0, empty = 0;
  for (int64_t e = 0; e < E; ++e) {
    largest = std::max<int64_t>(largest, off[e + 1] - off[e]);
    empty += off[e + 1] == off[e];
  }

  // Buffers (one allocation each; sizes printed).
  bf16 *w_up, *w_down, *xp, *pre, *act, *yp, *pre2, *act2, *yp2, *dyp, *dxp, *dxp2;
  float *dw_up, *dw_down, *dw_up2, *dw_down2;
  auto alloc = [](auto** p, int64_t n) { MOE_CUDA_CHECK(cudaMalloc(p, n * sizeof(**p))); };
  alloc(&w_up, E * H * A);
  alloc(&w_down, E * I * H);
  alloc(&xp, R * H);
  alloc(&pre, R * A);
  alloc(&act, R * I);
  alloc(&yp, R * H);
  alloc(&pre2, R * A);
  alloc(&act2, R * I);
  alloc(&yp2, R * H);
  if (o.backward) {
    alloc(&dyp, R * H);
    alloc(&dxp, R * H);
    alloc(&dxp2, R * H);
    alloc(&dw_up, E * H * A);
    alloc(&dw_down, E * I * H);
    alloc(&dw_up2, E * H * A);
    alloc(&dw_down2, E * I * H);
  }
  fill_normal(w_up, E * H * A, 1, 1.f / std::sqrt(float(H)), s);
  fill_normal(w_down, E * I * H, 2, 1.f / std::sqrt(float(I)), s);
  fill_normal(xp, R * H, 3, 1.f, s);
  if (o.backward) fill_normal(dyp, R * H, 4, 1.f, s);

  std::printf("%s (%d SMs) | T=%ld H=%ld I=%ld E=%ld K=%ld %s %s | M=%ld rows, largest segment %ld, "
              "%ld empty\n",
              prop.name, prop.multiProcessorCount, (long)o.tokens, (long)H, (long)I, (long)E,
              (long)o.top_k, std::string(name(o.skew)).c_str(),
              std::string(name(o.activation)).c_str(), (long)M, (long)largest, (long)empty);

  ExpertsWorkspace grouped(es, ExpertsBackend::grouped, o.backward);
  ExpertsWorkspace loop(es, ExpertsBackend::cublas_loop_host_offsets, o.backward);
  GroupedGemm g_up(E, WeightLayout::kn), g_down(E, WeightLayout::kn);
  std::printf("grouped GEMM: %s | workspace %.2f MiB\n", g_up.name(), grouped.bytes() / 1048576.0);
  cublasHandle_t h;
  MOE_CUBLAS_CHECK(cublasCreate(&h));
  MOE_CUBLAS_CHECK(cublasSetStream(h, s));

  // ---- verify: the two backends agree (each is checked against the CPU in moe_cuda_tests)
  const ExpertsForwardArgs fa{offsets, w_up, w_down, xp, pre, act, yp};
  const ExpertsForwardArgs fb{offsets, w_up, w_down, xp, pre2, act2, yp2};
  MOE_CUDA_CHECK(cudaMemsetAsync(yp, 0xff, R * H * sizeof(bf16), s));
  MOE_CUDA_CHECK(cudaMemsetAsync(yp2, 0xff, R * H * sizeof(bf16), s));
  experts_forward(grouped, fa, s);
  experts_forward(loop, fb, s);
  double worst = 0;
  auto compare = [&](const char* what, double err) {
    std::printf("verify %-8s grouped vs cuBLAS loop: relative error %.2e\n", what, err);
    worst = std::max(worst, err);
  };
  compare("pre", rel_error(download(pre, M * A), download(pre2, M * A), M * A));
  compare("yp", rel_error(download(yp, M * H), download(yp2, M * H), M * H));
  const ExpertsBackwardArgs ba{offsets, w_up, w_down, xp, pre, act, dyp, dxp, dw_up, dw_down};
  const ExpertsBackwardArgs bb{offsets, w_up, w_down, xp, pre2, act2, dyp, dxp2, dw_up2, dw_down2};
  if (o.backward) {
    for (float* p : {dw_up, dw_up2}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, E * H * A * 4, s));
    for (float* p : {dw_down, dw_down2}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, E * I * H * 4, s));
    experts_backward(grouped, ba, s);
    experts_backward(loop, bb, s);
    compare("dxp", rel_error(download(dxp, M * H), download(dxp2, M * H), M * H));
    compare("dw_up", rel_error(download(dw_up, E * H * A), download(dw_up2, E * H * A), E * H * A));
    compare("dw_down",
            rel_error(download(dw_down, E * I * H), download(dw_down2, E * I * H), E * I * H));
  }
  const bool ok = worst < 1e-2;
  std::printf("Disposition: %s\n", ok ? "Passed" : "Failed");
  if (!ok) return 1;

  // ---- time
  const double f_up = 2.0 * M * H * A, f_down = 2.0 * M * I * H, f_fwd = f_up + f_down;
  auto tf = [](double flop, double ms) { return flop / (ms * 1e9); };
  std::printf("\n%-44s %9s %9s\n", "variant", "ms", "TFLOP/s");
  auto row = [&](const char* name, double ms, double flop) {
    std::printf("%-44s %9.3f %9.1f\n", name, ms, tf(flop, ms));
  };
  row("G1 grouped up   (M x 2I x H)", median_ms(o.reps, s, [&] {
        g_up.run({offsets, A, H, xp, w_up, pre}, s);
      }), f_up);
  row("G2 grouped down (M x H x I)", median_ms(o.reps, s, [&] {
        g_down.run({offsets, H, I, act, w_down, yp}, s);
      }), f_down);
  row("L1 cuBLAS loop up", median_ms(o.reps, s, [&] {
        for (int64_t e = 0; e < E; ++e)
          if (off[e + 1] > off[e])
            cublas_rows(h, off[e + 1] - off[e], A, H, xp + off[e] * H, w_up + e * H * A,
                        pre2 + off[e] * A);
      }), f_up);
  row("L2 cuBLAS loop down", median_ms(o.reps, s, [&] {
        for (int64_t e = 0; e < E; ++e)
          if (off[e + 1] > off[e])
            cublas_rows(h, off[e + 1] - off[e], H, I, act + off[e] * I, w_down + e * I * H,
                        yp2 + off[e] * H);
      }), f_down);
  row("D1 dense-equivalent up (one cuBLAS GEMM)", median_ms(o.reps, s, [&] {
        cublas_rows(h, M, A, H, xp, w_up, pre2);
      }), f_up);
  row("D2 dense-equivalent down", median_ms(o.reps, s, [&] {
        cublas_rows(h, M, H, I, act, w_down, yp2);
      }), f_down);
  row("F1 experts_forward grouped", median_ms(o.reps, s, [&] { experts_forward(grouped, fa, s); }),
      f_fwd);
  row("F2 experts_forward cublas_loop_host_offsets",
      median_ms(o.reps, s, [&] { experts_forward(loop, fb, s); }), f_fwd);
  if (o.backward) {
    row("B1 experts_backward grouped (+ wgrad loop)",
        median_ms(o.reps, s, [&] { experts_backward(grouped, ba, s); }), 2 * f_fwd);
    row("B2 experts_backward cublas loop", median_ms(o.reps, s, [&] { experts_backward(loop, bb, s); }),
        2 * f_fwd);
  }
  MOE_CUBLAS_CHECK(cublasDestroy(h));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    if (!o.parse(argc, argv)) {
      Options::print_usage();
      return 0;
    }
    if (!o.valid()) {
      Options::print_usage();
      return 2;
    }
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "experts_lab: %s\n", e.what());
    return 1;
  }
}
