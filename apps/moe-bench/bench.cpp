// defines: add_bench_command — `moe-bench bench`: times the GPU data-path stages (gate, route,
// plan, permute, combine and their backwards) on seeded random data, next to the
// ceilings measured in the same run (a large device-to-device copy, a large cuBLAS bf16 GEMM).
//
// Method: CUDA events around each launch, warm-up first, median of --reps runs (>= 50), inputs
// rotated over enough buffer sets that the sets together are several times the L2 cache, so a
// memory-bound stage never re-reads data the previous run left in L2.
// Byte accounting (elements of sizeof(dtype) bytes; M rows incl. padding, K' kept rows):
//   permute            reads T*H, writes M*H          (dropless uniform: T*H + T*K*H)
//   combine            reads K'*H, writes T*H         (dropless: T*K*H + T*H)
//   permute+combine    the sum                        (dropless: 2*(1+K)*T*H, the brief's count)
//   permute_backward   reads K'*H rows + T*H (dx, accumulated), writes T*H
//   combine_backward   reads T*H (dy) + K'*H (yp), writes M*H (dyp); + 4*N bytes of dweight
//   plan               int32 indices: reads 2*N, writes 3*N + 2*M + T + 1 (+ small per-expert)
//   gate               reads T*H + H*E elements, writes T*E fp32 logits
//   route              softmax_topk: reads T*E fp32 logits, writes T*E fp32 probs, 16 bytes per
//                      choice (token, expert, weight, selected) and T*4 (lse); the aux-loss
//                      partial sums read the probs once more (counted)
//   route+plan         the route's routing into the plan, back to back
// Soft MoE (--grid soft_moe; n = E*S slots; es = sizeof(dtype), fp32 logits and statistics):
// each stage counts the fewest bytes it must move (inputs read once, outputs written once) and
// the GEMM FLOPs 2*T*n*H per product; the floor is max(bytes / copy ceiling, FLOPs / GEMM
// ceiling of the dtype), and each record states where the implementation moves more:
//   soft_moe.gate              reads T*H + H*n elements, writes 2*T*n fp32 (x_hat.phi_hat and
//                              the logits); 2*T*n*H FLOPs. The norm pass reads x a second time.
//   soft_moe.dispatch_softmax  reads T*n fp32, writes T*n elements (the statistics pass reads the
//                              logits a second time)
//   soft_moe.combine_softmax   reads T*n fp32, writes T*n elements
//   soft_moe.dispatch_gemm     slots_in = D^T x: reads T*n + T*H, writes n*H; 2*T*n*H FLOPs
//   soft_moe.combine_gemm      y = C slots_out: reads T*n + n*H, writes T*H; 2*T*n*H FLOPs
//   soft_moe.forward           the five above back to back (bytes and FLOPs summed)
//   soft_moe.*_backward        combine: 2 GEMMs, dispatch: 2 GEMMs, route: 2 GEMMs + kernels
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/jsonl.hpp"
#include "moe-bench/bench_layer.hpp"
#include "moe-bench/commands.hpp"
#include "moe/check.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/combine.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/gate.hpp"
#include "moe/cuda/permute.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/route.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/cuda/soft_moe.hpp"
#include "moe/cuda/synthetic.hpp"

namespace moe_bench {

namespace {

using moe::Layout;
using moe::cuda::Skew;
using json = nlohmann::ordered_json;

struct BenchOptions {
  std::vector<std::string> grids{"headline"};
  std::vector<std::string> dtypes{"bf16"};
  std::vector<std::string> skews{"uniform", "zipf"};
  int reps = 50;
  int warmup = 5;
  double l2_multiple = 4;  // rotation sets together >= this many L2 sizes
  std::string out;         // JSONL file (appended); stdout when empty
  bool no_backward = false;
  std::string command;     // the command line, for the records
  bool layer = false;      // --layer: the whole layer (bench_layer.cpp) instead of the stages
  std::vector<std::string> layer_configs;  // --config with --layer
  std::vector<std::string> layer_shapes;   // --shape with --layer: T,H,I,E,K
  std::string layer_router = "softmax_topk";  // --router with --layer
};

struct Shape {
  std::string grid;
  int64_t T = 0, H = 0, E = 0, K = 0;
  Layout layout = Layout::dropless;
  double cf = 1.0;
  int64_t block = 128;
  Skew skew = Skew::uniform;
  std::string dtype = "bf16";

  int64_t capacity() const {
    if (layout != Layout::padded) return 0;
    return static_cast<int64_t>(std::ceil(cf * T * K / E - 1e-9));
  }
  std::string label() const {
    return fmt::format("T={} H={} E={} K={} {}{} {} {}", T, H, E, K, moe::name(layout),
                       layout == Layout::padded ? fmt::format("(cf={})", cf) : "",
                       moe::cuda::name(skew), dtype);
  }
};

// The brief's grids (SEED.md section 4) and the headline shape of issue 3.
std::vector<Shape> grid_shapes(const std::string& grid) {
  std::vector<Shape> v;
  if (grid == "headline") {
    v.push_back({"headline", 16384, 4096, 128, 2, Layout::dropless});
  } else if (grid == "brief1") {
    // tokens B x T in {32x128, 64x256, 128x512}, E {4, 8, 16}, H {1024, 2048}, cf {1.0, 1.25};
    // top-2 into capacity-padded expert batches (the layout the capacity factor belongs to).
    for (int64_t T : {32 * 128, 64 * 256, 128 * 512})
      for (int64_t E : {4, 8, 16})
        for (int64_t H : {1024, 2048})
          for (double cf : {1.0, 1.25}) v.push_back({"brief1", T, H, E, 2, Layout::padded, cf});
  } else if (grid == "brief2") {
    // tokens {8192, 16384, 32768}, H {2048, 4096}, E {32, 64, 128}, k {1, 2, 4}; dropless.
    for (int64_t T : {8192, 16384, 32768})
      for (int64_t H : {2048, 4096})
        for (int64_t E : {32, 64, 128})
          for (int64_t K : {1, 2, 4}) v.push_back({"brief2", T, H, E, K, Layout::dropless});
  } else {
    MOE_FAIL("grid: unknown value '", grid, "' (allowed: headline, brief1, brief2, soft_moe)");
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// timing

struct Timing {
  double median = 0, p10 = 0, p90 = 0;
  int reps = 0;
};

// Events around each launch of `run(rep)`; warm-up runs first; no host sync between runs.
Timing time_launches(int warmup, int reps, cudaStream_t stream,
                     const std::function<void(int)>& run) {
  for (int i = 0; i < warmup; ++i) run(i);
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    run(warmup + i);
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> ms(reps);
  for (int i = 0; i < reps; ++i) {
    float m = 0;
    MOE_CUDA_CHECK(cudaEventElapsedTime(&m, ev[2 * i], ev[2 * i + 1]));
    ms[i] = m;
  }
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  auto at = [&](double q) { return ms[std::min<size_t>(ms.size() - 1, size_t(q * ms.size()))]; };
  return {reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]), at(0.1), at(0.9),
          reps};
}

// ------------------------------------------------------------------------------------------------
// ceilings

struct Device {
  std::string name;
  int sm_count = 0;
  int64_t l2_bytes = 0;
  double mem_gib = 0;
};

Device device_info() {
  int dev = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return {p.name, p.multiProcessorCount, p.l2CacheSize, p.totalGlobalMem / double(1 << 30)};
}

struct Ceilings {
  double copy_gbs = 0, copy_ms = 0;
  int64_t copy_bytes = 0;  // bytes of one copy (read + written = 2x)
  double gemm_tflops = 0, gemm_ms = 0;
  int64_t gemm_n = 0;
  double gemm_fp32_tflops = 0, gemm_fp32_ms = 0;  // cuBLAS fp32 (no TF32), the fp32 GEMMs' ceiling
  int64_t gemm_fp32_n = 0;
  double gemm_rate(const std::string& dtype) const {  // FLOP/s
    return 1e12 * (dtype == "fp32" ? gemm_fp32_tflops : gemm_tflops);
  }
};

// Median ms of an n x n x n cuBLAS GEMM in element type T (fp32 compute), 20 timed runs on
// random operands drawn from `seed` and `seed + 1`.
template <class T>
double time_square_gemm(int64_t n, cudaDataType_t type, uint64_t seed, int warmup,
                        cudaStream_t stream) {
  T *A = nullptr, *B = nullptr, *C = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&A, n * n * sizeof(T)));
  MOE_CUDA_CHECK(cudaMalloc(&B, n * n * sizeof(T)));
  MOE_CUDA_CHECK(cudaMalloc(&C, n * n * sizeof(T)));
  moe::cuda::fill_normal(A, n * n, seed, 1.f, stream);
  moe::cuda::fill_normal(B, n * n, seed + 1, 1.f, stream);
  cublasHandle_t h = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&h));
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float one = 1.f, zero = 0.f;
  const Timing t = time_launches(warmup, 20, stream, [&](int) {
    MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, int(n), int(n), int(n), &one, A,
                                  type, int(n), B, type, int(n), &zero, C, type, int(n),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  MOE_CUBLAS_CHECK(cublasDestroy(h));
  MOE_CUDA_CHECK(cudaFree(A));
  MOE_CUDA_CHECK(cudaFree(B));
  MOE_CUDA_CHECK(cudaFree(C));
  return t.median;
}

Ceilings measure_ceilings(const BenchOptions& o, cudaStream_t stream) {
  Ceilings c;
  // Device-to-device copy of 1 GiB: far past any L2, counted as bytes read + bytes written.
  c.copy_bytes = int64_t{1} << 30;
  {
    void *a = nullptr, *b = nullptr;
    MOE_CUDA_CHECK(cudaMalloc(&a, c.copy_bytes));
    MOE_CUDA_CHECK(cudaMalloc(&b, c.copy_bytes));
    moe::cuda::fill_normal(static_cast<float*>(a), c.copy_bytes / 4, 1, 1.f, stream);
    const Timing t = time_launches(o.warmup, std::max(o.reps, 20), stream, [&](int i) {
      MOE_CUDA_CHECK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, c.copy_bytes,
                                     cudaMemcpyDeviceToDevice, stream));
    });
    c.copy_ms = t.median;
    c.copy_gbs = 2.0 * c.copy_bytes / (t.median * 1e6);
    MOE_CUDA_CHECK(cudaFree(a));
    MOE_CUDA_CHECK(cudaFree(b));
  }
  // cuBLAS bf16 GEMM 8192^3, fp32 accumulation; cuBLAS fp32 GEMM 4096^3 (CUBLAS_COMPUTE_32F,
  // default math mode: no TF32). Random operands.
  c.gemm_n = 8192;
  c.gemm_ms = time_square_gemm<__nv_bfloat16>(c.gemm_n, CUDA_R_16BF, 2, o.warmup, stream);
  c.gemm_tflops = 2.0 * c.gemm_n * c.gemm_n * c.gemm_n / (c.gemm_ms * 1e9);
  c.gemm_fp32_n = 4096;
  c.gemm_fp32_ms = time_square_gemm<float>(c.gemm_fp32_n, CUDA_R_32F, 4, o.warmup, stream);
  c.gemm_fp32_tflops =
      2.0 * c.gemm_fp32_n * c.gemm_fp32_n * c.gemm_fp32_n / (c.gemm_fp32_ms * 1e9);
  return c;
}

// ------------------------------------------------------------------------------------------------
// one shape

struct Row {  // one line of the closing table
  std::string stage, shape;
  double ms, gbs, fraction;
  double tflops = 0, gemm_fraction = 0, floor_fraction = 0;  // soft MoE rows
};

struct Context {
  const BenchOptions& o;
  const Device& dev;
  const Ceilings& ceil;
  cudaStream_t stream;
  cublasHandle_t cublas;
  std::vector<Row>& table;
};

void emit(const Context& cx, const json& record) {
  if (cx.o.out.empty())
    fmt::print("{}\n", record.dump());
  else
    moe::io::append_jsonl(cx.o.out, record);
}

template <class Elem>
void bench_shape(const Context& cx, const Shape& s) {
  const BenchOptions& o = cx.o;
  cudaStream_t stream = cx.stream;
  const int64_t T = s.T, H = s.H, E = s.E, K = s.K, N = T * K;
  const size_t es = sizeof(Elem);

  moe::cuda::PlanShape ps;
  ps.tokens = T;
  ps.experts = E;
  ps.top_k = K;
  ps.choices = N;
  ps.layout = s.layout;
  ps.capacity = s.capacity();
  ps.block_size = s.block;
  const int64_t R = ps.max_rows();

  // Rotation sets: each holds its own routing, plan and activations.
  const int64_t set_bytes = es * H * (3 * T + 2 * R) + 32 * N;
  const int sets = static_cast<int>(std::clamp<int64_t>(
      static_cast<int64_t>(std::ceil(o.l2_multiple * cx.dev.l2_bytes / double(set_bytes))), 2,
      64));
  // The router the route stages run: softmax top-k with GShard's balance loss and the z-loss
  // (the default coefficients), training mode.
  moe::LayerConfig cfg;
  cfg.router = moe::Router::softmax_topk;
  cfg.tokens = T;
  cfg.hidden = H;
  cfg.experts = E;
  cfg.top_k = K;
  cfg.layout = s.layout;
  cfg.capacity_factor = s.cf;
  cfg.block_size = s.block;
  cfg.training = true;
  cfg.validate();
  struct Set {
    moe::cuda::RoutingBuffers routing;
    moe::cuda::PlanBuffers plan;
    moe::cuda::RouteBuffers route;
    moe::cuda::PlanBuffers route_plan;
    float* logits;
    Elem* w;
    Elem *x, *xp, *y, *yp, *dy, *dxp, *dx, *dyp;
    float* dweight;
    moe::cuda::DeviceArena arena;
  };
  std::vector<std::unique_ptr<Set>> set(sets);
  for (int i = 0; i < sets; ++i) {
    auto& st = set[i];
    st = std::make_unique<Set>();
    moe::cuda::SyntheticRouting spec;
    spec.tokens = T;
    spec.experts = E;
    spec.top_k = K;
    spec.skew = s.skew;
    spec.seed = 1000 + i;
    moe::cuda::upload_routing(moe::cuda::synthetic_token_choice(spec), st->routing, stream);
    st->plan = moe::cuda::PlanBuffers(ps);
    auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
    const size_t th = es * T * H, rh = es * R * H;
    st->arena = moe::cuda::DeviceArena({{"x", th, p(st->x)},
                                        {"xp", rh, p(st->xp)},
                                        {"y", th, p(st->y)},
                                        {"yp", rh, p(st->yp)},
                                        {"dy", th, p(st->dy)},
                                        {"dx", th, p(st->dx)},
                                        {"dyp", rh, p(st->dyp)},
                                        {"dweight", size_t(4 * N), p(st->dweight)},
                                        {"logits", size_t(4 * T * E), p(st->logits)},
                                        {"w", es * H * E, p(st->w)}});
    st->route = moe::cuda::RouteBuffers(cfg);
    st->route_plan = moe::cuda::PlanBuffers(ps);
    moe::cuda::fill_normal(st->logits, T * E, 10 * i + 5, 1.f, stream);
    moe::cuda::fill_normal(st->w, H * E, 10 * i + 6, 0.02f, stream);
    st->dxp = st->dyp;  // permute backward reads the rows combine backward wrote
    moe::cuda::fill_normal(st->x, T * H, 10 * i + 1, 1.f, stream);
    moe::cuda::fill_normal(st->yp, R * H, 10 * i + 2, 1.f, stream);
    moe::cuda::fill_normal(st->dy, T * H, 10 * i + 3, 1.f, stream);
    moe::cuda::fill_normal(st->dx, T * H, 10 * i + 4, 1.f, stream);
    moe::cuda::plan_forward(st->routing.view(), st->plan.view(), stream);
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));

  // What the plan decided (read after the fact, outside any timed region).
  const moe::DispatchPlan host_plan = moe::cuda::download_plan(set[0]->plan.view(), stream);
  int64_t kept = 0;
  for (int64_t k : host_plan.kept) kept += k;
  const int64_t M = host_plan.rows;
  double max_load = 0;
  for (int64_t c : host_plan.counts) max_load = std::max<double>(max_load, double(c));

  json shape = {{"T", T}, {"H", H}, {"E", E}, {"K", K}, {"layout", moe::name(s.layout)},
                {"capacity_factor", s.cf}, {"capacity", s.capacity()}, {"block_size", s.block}};
  auto record = [&](const std::string& stage, const Timing& t, double bytes,
                    const std::string& accounting) {
    const double gbs = bytes / (t.median * 1e6);
    json j = moe::io::result_record(o.command);
    j["stage"] = stage;
    if (stage == "gate" || stage.rfind("route", 0) == 0) j["router"] = "softmax_topk";
    j["grid"] = s.grid;
    j["device"] = cx.dev.name;
    j["sm_count"] = cx.dev.sm_count;
    j["l2_bytes"] = cx.dev.l2_bytes;
    j["dtype"] = s.dtype;
    j["shape"] = shape;
    j["routing"] = moe::cuda::name(s.skew);
    j["rows"] = M;
    j["kept_rows"] = kept;
    j["max_expert_load"] = max_load / (double(N) / E);  // max load / mean load
    j["ms"] = t.median;
    j["ms_p10"] = t.p10;
    j["ms_p90"] = t.p90;
    j["reps"] = t.reps;
    j["warmup"] = o.warmup;
    j["rotation_sets"] = sets;
    j["bytes"] = bytes;
    j["bytes_accounting"] = accounting;
    j["gbs"] = gbs;
    j["copy_gbs"] = cx.ceil.copy_gbs;
    j["fraction_of_copy"] = gbs / cx.ceil.copy_gbs;
    j["gemm_tflops"] = cx.ceil.gemm_tflops;
    emit(cx, j);
    cx.table.push_back({stage, s.label(), t.median, gbs, gbs / cx.ceil.copy_gbs});
  };
  auto S = [&](int rep) -> Set& { return *set[rep % sets]; };
  const double eH = double(es) * H;

  Timing t;
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::gate_forward<Elem>(cx.cublas, S(r).x, S(r).w, T, H, E, S(r).logits, stream);
  });
  record("gate", t, eH * T + double(es) * H * E + 4.0 * T * E,
         "reads T*H + H*E elements, writes T*E fp32");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::route_forward(cfg, 0, S(r).logits, nullptr, nullptr, S(r).route, stream);
  });
  const double route_bytes = 4.0 * (3 * T * E + 4 * N + T);
  record("route", t, route_bytes,
         "softmax_topk: reads T*E fp32 logits, writes T*E probs + 16N + 4T; aux sums read T*E");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::plan_forward(S(r).routing.view(), S(r).plan.view(), stream);
  });
  record("plan", t, 4.0 * (2 * N + 3 * N + 2 * M + T + 1),
         "int32: reads 2N (expert, token), writes 3N + 2M + T + 1");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::route_forward(cfg, 0, S(r).logits, nullptr, nullptr, S(r).route, stream);
    moe::cuda::plan_forward(S(r).route.routing.view(), S(r).route_plan.view(), stream);
  });
  record("route+plan", t, route_bytes + 4.0 * (2 * N + 3 * N + 2 * M + T + 1),
         "route then plan, the sum of their accountings");

  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::permute_forward<Elem>(S(r).plan.view(), S(r).x, H, S(r).xp, stream);
  });
  record("permute", t, eH * (T + M), "reads T*H, writes M*H");

  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::combine_forward<Elem>(S(r).plan.view(), S(r).routing.view(), S(r).yp, H, S(r).y,
                                  stream);
  });
  record("combine", t, eH * (kept + T), "reads kept*H, writes T*H");

  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::permute_forward<Elem>(S(r).plan.view(), S(r).x, H, S(r).xp, stream);
    moe::cuda::combine_forward<Elem>(S(r).plan.view(), S(r).routing.view(), S(r).xp, H, S(r).y,
                                  stream);
  });
  record("permute+combine", t, eH * (T + M + kept + T),
         "permute reads T*H, writes M*H; combine reads kept*H, writes T*H");

  if (!o.no_backward) {
    t = time_launches(o.warmup, o.reps, stream, [&](int r) {
      moe::cuda::combine_backward<Elem>(S(r).plan.view(), S(r).routing.view(), S(r).yp, S(r).dy, H,
                                     S(r).dyp, S(r).dweight, stream);
    });
    record("combine_backward", t, eH * (T + kept + M) + 4.0 * N,
           "reads T*H (dy) + kept*H (yp), writes M*H (dyp) + 4N bytes (dweight)");
    t = time_launches(o.warmup, o.reps, stream, [&](int r) {
      moe::cuda::permute_backward<Elem>(S(r).plan.view(), S(r).dxp, H, S(r).dx, stream);
    });
    record("permute_backward", t, eH * (kept + 2 * T), "reads kept*H + T*H (dx), writes T*H");
  }
}

// ------------------------------------------------------------------------------------------------
// soft MoE

struct SoftShape {
  int64_t T = 0, H = 0, E = 0, S = 1;
  std::string dtype = "bf16";
  int64_t slots() const { return E * S; }
  std::string label() const { return fmt::format("T={} H={} E*S={}*{} {}", T, H, E, S, dtype); }
};

// T in {4096, 16384}, H in {2048, 4096}, E*S in {64, 128}. S = 1: the gate, the softmaxes and
// the two GEMMs depend on n = E*S only (the experts stage is not timed here).
std::vector<SoftShape> soft_moe_shapes() {
  std::vector<SoftShape> v;
  for (int64_t T : {4096, 16384})
    for (int64_t H : {2048, 4096})
      for (int64_t n : {64, 128}) v.push_back({T, H, n, 1});
  return v;
}

template <class Elem>
void bench_soft_moe(const Context& cx, const SoftShape& s) {
  const BenchOptions& o = cx.o;
  cudaStream_t stream = cx.stream;
  const int64_t T = s.T, H = s.H, n = s.slots();
  const double es = sizeof(Elem), f = sizeof(float);
  moe::LayerConfig cfg;
  cfg.router = moe::Router::soft_moe;
  cfg.tokens = T;
  cfg.hidden = H;
  cfg.inter = 8;
  cfg.experts = s.E;
  cfg.top_k = 1;
  cfg.slots_per_expert = s.S;
  cfg.validate();

  // Two tiers of rotation sets, each covering l2_multiple L2 sizes: the activations (T*H each)
  // and the routing buffers, whose (T, n) logits and weights are all the softmaxes touch (a few
  // MB here: two sets of them would sit in L2).
  struct Acts {
    Elem *x, *phi, *y, *dy, *dx, *slots_in, *slots_out, *d_slots_in, *d_slots_out;
    float *scale, *dphi, *dscale;
    moe::cuda::DeviceArena arena;
  };
  const double act_bytes = es * (4.0 * T * H + 5.0 * n * H);
  const double route_bytes = T * n * (2 * f + 2 * es);  // unscaled, logits, dispatch, combine
  auto sets_for = [&](double bytes) {
    return static_cast<int>(std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(o.l2_multiple * cx.dev.l2_bytes / bytes)), 2, 64));
  };
  const int na = sets_for(act_bytes), nr = sets_for(route_bytes);
  std::vector<std::unique_ptr<Acts>> acts(na);
  for (int i = 0; i < na; ++i) {
    acts[i] = std::make_unique<Acts>();
    Acts& a = *acts[i];
    auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
    const size_t th = es * T * H, nh = es * n * H;
    a.arena = moe::cuda::DeviceArena({{"x", th, p(a.x)},
                                      {"phi", nh, p(a.phi)},
                                      {"y", th, p(a.y)},
                                      {"dy", th, p(a.dy)},
                                      {"dx", th, p(a.dx)},
                                      {"slots_in", nh, p(a.slots_in)},
                                      {"slots_out", nh, p(a.slots_out)},
                                      {"d_slots_in", nh, p(a.d_slots_in)},
                                      {"d_slots_out", nh, p(a.d_slots_out)},
                                      {"scale", sizeof(float), p(a.scale)},
                                      {"dphi", size_t(f * H * n), p(a.dphi)},
                                      {"dscale", sizeof(float), p(a.dscale)}});
    moe::cuda::fill_normal(a.x, T * H, 20 * i + 1, 1.f, stream);
    moe::cuda::fill_normal(a.phi, H * n, 20 * i + 2, 1.f / std::sqrt(float(H)), stream);
    moe::cuda::fill_normal(a.dy, T * H, 20 * i + 3, 1.f, stream);
    moe::cuda::fill_normal(a.dx, T * H, 20 * i + 4, 1.f, stream);
    moe::cuda::fill_normal(a.slots_out, n * H, 20 * i + 5, 1.f, stream);
    moe::cuda::fill_normal(a.d_slots_in, n * H, 20 * i + 6, 1.f, stream);
    moe::cuda::fill_normal(a.dphi, H * n, 20 * i + 7, 1.f, stream);
    const float scale = 1.f, zero = 0.f;  // the paper's initial scale
    MOE_CUDA_CHECK(cudaMemcpyAsync(a.scale, &scale, 4, cudaMemcpyHostToDevice, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(a.dscale, &zero, 4, cudaMemcpyHostToDevice, stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host values above outlive no scope
  }
  std::vector<std::unique_ptr<moe::cuda::SoftMoeBuffers<Elem>>> route(nr);
  cublasHandle_t h = cx.cublas;
  for (int i = 0; i < nr; ++i) {  // one full step per set: every buffer holds real values
    route[i] = std::make_unique<moe::cuda::SoftMoeBuffers<Elem>>(cfg);
    Acts& a = *acts[i % na];
    auto& b = *route[i];
    moe::cuda::soft_moe_route_forward<Elem>(h, a.x, a.phi, a.scale, b, stream);
    moe::cuda::soft_moe_dispatch_forward<Elem>(h, b, a.x, a.slots_in, stream);
    moe::cuda::soft_moe_combine_forward<Elem>(h, b, a.slots_out, a.y, stream);
    moe::cuda::soft_moe_combine_backward<Elem>(h, b, a.slots_out, a.dy, a.d_slots_out, stream);
    moe::cuda::soft_moe_dispatch_backward<Elem>(h, b, a.x, a.d_slots_in, a.dx, stream);
    moe::cuda::soft_moe_route_backward<Elem>(h, b, a.x, a.phi, a.scale, a.dx, a.dphi, a.dscale,
                                             stream);
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));

  const double rate = cx.ceil.gemm_rate(s.dtype);  // FLOP/s
  auto record = [&](const std::string& stage, const Timing& t, double bytes, double flops,
                    const std::string& bytes_accounting, const std::string& flops_accounting) {
    const double gbs = bytes / (t.median * 1e6);
    const double tflops = flops / (t.median * 1e9);
    const double mem_ms = bytes / (cx.ceil.copy_gbs * 1e6), math_ms = 1e3 * flops / rate;
    const double floor_ms = std::max(mem_ms, math_ms);
    json j = moe::io::result_record(o.command);
    j["stage"] = stage;
    j["router"] = "soft_moe";
    j["grid"] = "soft_moe";
    j["device"] = cx.dev.name;
    j["sm_count"] = cx.dev.sm_count;
    j["l2_bytes"] = cx.dev.l2_bytes;
    j["dtype"] = s.dtype;
    j["shape"] = {{"T", T}, {"H", H}, {"E", s.E}, {"S", s.S}, {"slots", n}};
    j["ms"] = t.median;
    j["ms_p10"] = t.p10;
    j["ms_p90"] = t.p90;
    j["reps"] = t.reps;
    j["warmup"] = o.warmup;
    j["rotation_sets"] = {{"activations", na}, {"routing", nr}};
    j["bytes"] = bytes;
    j["bytes_accounting"] = bytes_accounting;
    j["gbs"] = gbs;
    j["copy_gbs"] = cx.ceil.copy_gbs;
    j["fraction_of_copy"] = gbs / cx.ceil.copy_gbs;
    j["flops"] = flops;
    j["flops_accounting"] = flops_accounting;
    j["tflops"] = tflops;
    j["gemm_tflops"] = rate / 1e12;
    j["gemm_ceiling"] = s.dtype == "fp32" ? "cuBLAS fp32 4096^3" : "cuBLAS bf16 8192^3";
    if (flops > 0) j["fraction_of_gemm"] = tflops * 1e12 / rate;
    j["floor_ms"] = floor_ms;
    j["bound"] = math_ms > mem_ms ? "compute" : "memory";
    j["fraction_of_floor"] = floor_ms / t.median;
    emit(cx, j);
    Row row{stage, s.label(), t.median, gbs, gbs / cx.ceil.copy_gbs};
    row.tflops = tflops;
    row.gemm_fraction = flops > 0 ? tflops * 1e12 / rate : 0;
    row.floor_fraction = floor_ms / t.median;
    cx.table.push_back(row);
  };
  auto A = [&](int r) -> Acts& { return *acts[r % na]; };
  auto B = [&](int r) -> moe::cuda::SoftMoeBuffers<Elem>& { return *route[r % nr]; };
  const double th = es * T * H, tn = T * n, nh = es * n * H, gemm = 2.0 * T * n * H;
  const std::string one_gemm = "2*T*n*H";

  Timing t;
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_logits_forward<Elem>(h, A(r).x, A(r).phi, A(r).scale, B(r), stream);
  });
  const double gate_bytes = th + nh + 2 * f * tn;
  record("soft_moe.gate", t, gate_bytes, gemm,
         "reads T*H + H*n elements, writes 2*T*n fp32 (x_hat.phi_hat, logits); the norm pass "
         "reads x once more (not counted)",
         one_gemm + " (the norms' 2*T*H + 2*H*n not counted)");
  t = time_launches(o.warmup, o.reps, stream,
                    [&](int r) { moe::cuda::soft_moe_dispatch_softmax_forward<Elem>(B(r), stream); });
  const double softmax_bytes = f * tn + es * tn;
  record("soft_moe.dispatch_softmax", t, softmax_bytes, 0,
         "reads T*n fp32 logits, writes T*n elements; the statistics pass reads the logits once "
         "more (not counted)",
         "none counted (exp and sums: ~10 per element)");
  t = time_launches(o.warmup, o.reps, stream,
                    [&](int r) { moe::cuda::soft_moe_combine_softmax_forward<Elem>(B(r), stream); });
  record("soft_moe.combine_softmax", t, softmax_bytes, 0,
         "reads T*n fp32 logits, writes T*n elements", "none counted (exp and sums)");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_dispatch_forward<Elem>(h, B(r), A(r).x, A(r).slots_in, stream);
  });
  const double gemm_bytes = es * tn + th + nh;
  record("soft_moe.dispatch_gemm", t, gemm_bytes, gemm,
         "slots_in = D^T x: reads T*n + T*H elements, writes n*H", one_gemm);
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_combine_forward<Elem>(h, B(r), A(r).slots_out, A(r).y, stream);
  });
  record("soft_moe.combine_gemm", t, gemm_bytes, gemm,
         "y = C slots_out: reads T*n + n*H elements, writes T*H", one_gemm);
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_route_forward<Elem>(h, A(r).x, A(r).phi, A(r).scale, B(r), stream);
    moe::cuda::soft_moe_dispatch_forward<Elem>(h, B(r), A(r).x, A(r).slots_in, stream);
    moe::cuda::soft_moe_combine_forward<Elem>(h, B(r), A(r).slots_out, A(r).y, stream);
  });
  record("soft_moe.forward", t, gate_bytes + 2 * softmax_bytes + 2 * gemm_bytes, 3 * gemm,
         "gate + both softmaxes + both GEMMs, the sum of their accountings", "3*2*T*n*H");
  if (o.no_backward) return;

  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_combine_backward<Elem>(h, B(r), A(r).slots_out, A(r).dy,
                                               A(r).d_slots_out, stream);
  });
  record("soft_moe.combine_backward", t, th + nh + es * tn + f * tn + nh, 2 * gemm,
         "reads dy T*H, slots_out n*H, C T*n elements; writes dC T*n fp32, d_slots_out n*H; the "
         "second GEMM reads dy again (not counted)",
         "2 x 2*T*n*H");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_dispatch_backward<Elem>(h, B(r), A(r).x, A(r).d_slots_in, A(r).dx,
                                                stream);
  });
  record("soft_moe.dispatch_backward", t, th + nh + es * tn + f * tn + 2 * th, 2 * gemm,
         "reads x T*H, d_slots_in n*H, D T*n elements; writes dD T*n fp32; dx T*H read and "
         "written (+=)",
         "2 x 2*T*n*H");
  t = time_launches(o.warmup, o.reps, stream, [&](int r) {
    moe::cuda::soft_moe_route_backward<Elem>(h, B(r), A(r).x, A(r).phi, A(r).scale, A(r).dx,
                                             A(r).dphi, A(r).dscale, stream);
  });
  record("soft_moe.route_backward", t,
         2 * es * tn + 3 * f * tn + th + nh + 2 * th + 2 * f * H * n, 2 * gemm,
         "reads D, C (T*n elements), dD, dC, x_hat.phi_hat (T*n fp32), x T*H, phi H*n; dx T*H "
         "and dphi H*n fp32 read and written (+=); the (T, n) G, P = G phi^T (T*H) and "
         "Q = x^T G (H*n) in between are not counted",
         "2 x 2*T*n*H (P and Q)");
}

void run(BenchOptions o) {
  MOE_CHECK(moe::cuda::has_device(), "bench: no CUDA device");
  MOE_CHECK(o.reps >= 50, "reps must be >= 50, got ", o.reps);
  MOE_CHECK(o.warmup >= 1, "warmup must be >= 1, got ", o.warmup);
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Device dev = device_info();
  fmt::print(stderr, "bench: {} ({} SMs, L2 {:.0f} MiB, {:.0f} GiB)\n", dev.name, dev.sm_count,
             dev.l2_bytes / double(1 << 20), dev.mem_gib);
  const Ceilings ceil = measure_ceilings(o, stream);
  {
    json j = moe::io::result_record(o.command);
    j["stage"] = "ceiling";
    j["device"] = dev.name;
    j["sm_count"] = dev.sm_count;
    j["l2_bytes"] = dev.l2_bytes;
    j["copy_bytes"] = ceil.copy_bytes;
    j["copy_ms"] = ceil.copy_ms;
    j["copy_gbs"] = ceil.copy_gbs;
    j["copy_accounting"] = "cudaMemcpyAsync device-to-device of copy_bytes; bytes read + written";
    j["gemm_n"] = ceil.gemm_n;
    j["gemm_ms"] = ceil.gemm_ms;
    j["gemm_tflops"] = ceil.gemm_tflops;
    j["gemm_accounting"] = "cublasGemmEx bf16 x bf16 -> bf16, fp32 compute, 2*n^3 FLOP";
    j["gemm_fp32_n"] = ceil.gemm_fp32_n;
    j["gemm_fp32_ms"] = ceil.gemm_fp32_ms;
    j["gemm_fp32_tflops"] = ceil.gemm_fp32_tflops;
    j["gemm_fp32_accounting"] = "cublasGemmEx fp32, CUBLAS_COMPUTE_32F (no TF32), 2*n^3 FLOP";
    if (o.out.empty()) fmt::print("{}\n", j.dump());
    else moe::io::append_jsonl(o.out, j);
  }
  fmt::print(stderr, "bench: copy {:.0f} GB/s, bf16 GEMM {:.0f} TFLOP/s, fp32 GEMM {:.1f} TFLOP/s\n",
             ceil.copy_gbs, ceil.gemm_tflops, ceil.gemm_fp32_tflops);

  std::vector<Row> table;
  cublasHandle_t cublas = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&cublas));
  const Context cx{o, dev, ceil, stream, cublas, table};
  for (const std::string& g : o.grids) {
    if (g == "soft_moe") {  // dense: no routing skew
      for (SoftShape s : soft_moe_shapes())
        for (const std::string& dtype : o.dtypes) {
          s.dtype = dtype;
          fmt::print(stderr, "bench: soft_moe {}\n", s.label());
          if (dtype == "bf16") bench_soft_moe<__nv_bfloat16>(cx, s);
          else if (dtype == "fp32") bench_soft_moe<float>(cx, s);
          else MOE_FAIL("dtype: unknown value '", dtype, "' (allowed: bf16, fp32)");
        }
      continue;
    }
    for (Shape s : grid_shapes(g))
      for (const std::string& skew : o.skews)
        for (const std::string& dtype : o.dtypes) {
          s.skew = moe::cuda::parse_skew(skew, "skew");
          s.dtype = dtype;
          fmt::print(stderr, "bench: {} {}\n", s.grid, s.label());
          if (dtype == "bf16") bench_shape<__nv_bfloat16>(cx, s);
          else if (dtype == "fp32") bench_shape<float>(cx, s);
          else MOE_FAIL("dtype: unknown value '", dtype, "' (allowed: bf16, fp32)");
        }
  }
  MOE_CUBLAS_CHECK(cublasDestroy(cublas));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));

  fmt::print("\n{} | copy {:.0f} GB/s | bf16 GEMM {:.0f} TFLOP/s | fp32 GEMM {:.1f} TFLOP/s\n",
             dev.name, ceil.copy_gbs, ceil.gemm_tflops, ceil.gemm_fp32_tflops);
  auto soft = [](const Row& r) { return r.stage.rfind("soft_moe", 0) == 0; };
  if (std::any_of(table.begin(), table.end(), [&](const Row& r) { return !soft(r); })) {
    fmt::print("{:<18} {:<52} {:>9} {:>8} {:>7}\n", "stage", "shape", "ms", "GB/s", "%copy");
    for (const Row& r : table)
      if (!soft(r))
        fmt::print("{:<18} {:<52} {:>9.4f} {:>8.0f} {:>6.1f}%\n", r.stage, r.shape, r.ms, r.gbs,
                   100 * r.fraction);
  }
  if (std::any_of(table.begin(), table.end(), soft)) {
    // %gemm: of the dtype's GEMM ceiling (GEMM stages); %floor: max(bytes/copy, FLOPs/GEMM)/time
    fmt::print("{:<27} {:<30} {:>8} {:>6} {:>6} {:>7} {:>6} {:>7}\n", "stage", "shape", "ms",
               "GB/s", "%copy", "TFLOP/s", "%gemm", "%floor");
    for (const Row& r : table)
      if (soft(r))
        fmt::print("{:<27} {:<30} {:>8.4f} {:>6.0f} {:>5.1f}% {:>7.1f} {:>5.1f}% {:>6.1f}%\n",
                   r.stage, r.shape, r.ms, r.gbs, 100 * r.fraction, r.tflops,
                   100 * r.gemm_fraction, 100 * r.floor_fraction);
  }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "bench", "benchmark the GPU data-path stages against the copy and GEMM ceilings");
  sub->add_option("--grid", o->grids, "headline, brief1, brief2, soft_moe (several allowed)")
      ->capture_default_str();
  sub->add_option("--dtype", o->dtypes, "bf16, fp32 (several allowed)")->capture_default_str();
  sub->add_option("--routing", o->skews, "uniform, zipf, one_expert (several allowed)")
      ->capture_default_str();
  sub->add_option("--reps", o->reps, "timed runs per stage (median reported), >= 50")
      ->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed runs first")->capture_default_str();
  sub->add_option("--l2-multiple", o->l2_multiple,
                  "rotate over input sets totalling at least this many L2 sizes")
      ->capture_default_str();
  sub->add_flag("--no-backward", o->no_backward, "skip the backward stages");
  sub->add_option("--out", o->out, "append JSON lines here (default: stdout)");
  sub->add_flag("--layer", o->layer,
                "the whole layer forward and forward+backward at the model configurations "
                "(reps >= 20) next to a dense-equivalent cuBLAS GEMM pair and cuBLAS training "
                "steps with the same FLOPs (one dense FFN; the layer evenly routed, batched)");
  sub->add_option("--config", o->layer_configs,
                  "with --layer: olmoe, qwen3, qwen3_32k, mixtral, brief_small, decode, lm_gpu (one "
                  "FFN of the GPU language model) (default: all, unless --shape is given)")
      ->check(CLI::IsMember(layer_config_names()));
  sub->add_option("--shape", o->layer_shapes,
                  "with --layer: a shape of your own, T,H,I,E,K (tokens, hidden, intermediate, "
                  "experts, top-k; H a multiple of 8, I of 32), run after the --config ones; "
                  "several allowed");
  sub->add_option("--router", o->layer_router,
                  "with --layer: the router (the token-choice ones; switch runs with K = 1; "
                  "the PyTorch peer is softmax_topk's)")
      ->check(CLI::IsMember(layer_router_names()))
      ->capture_default_str();
  sub->footer(
      "Examples:\n"
      "  moe-bench bench                                   # headline shape, bf16\n"
      "  moe-bench bench --grid headline brief1 brief2 --out results.jsonl\n"
      "  moe-bench bench --grid soft_moe --dtype bf16 fp32    # soft MoE stages, 8 shapes\n"
      "  moe-bench bench --layer --reps 20 --out layer.jsonl  # whole layer, 7 model configs\n"
      "  moe-bench bench --layer --shape 16384,2048,1408,64,6  # whole layer at a shape of yours");
  sub->callback([o, sub] {
    std::string cmd = "moe-bench bench";
    for (const std::string& g : o->grids) cmd += (&g == &o->grids[0] ? " --grid " : " ") + g;
    for (const std::string& d : o->dtypes) cmd += (&d == &o->dtypes[0] ? " --dtype " : " ") + d;
    for (const std::string& r : o->skews) cmd += (&r == &o->skews[0] ? " --routing " : " ") + r;
    cmd += fmt::format(" --reps {} --warmup {}", o->reps, o->warmup);
    if (o->no_backward) cmd += " --no-backward";
    (void)sub;
    MOE_CHECK(o->layer || (o->layer_configs.empty() && o->layer_shapes.empty() &&
                           o->layer_router == "softmax_topk"),
              "bench: --config, --shape and --router go with --layer");
    if (o->layer) {  // a separate path: the stages' options do not apply
      LayerBenchOptions lo;
      lo.reps = o->reps;
      lo.warmup = o->warmup;
      lo.configs = o->layer_configs;
      for (const std::string& s : o->layer_shapes) lo.shapes.push_back(parse_layer_shape(s));
      lo.router = moe::parse_router(o->layer_router);
      lo.out = o->out;
      lo.command = fmt::format("moe-bench bench --layer --reps {} --warmup {}", o->reps, o->warmup);
      for (const std::string& c : o->layer_configs)
        lo.command += (&c == &o->layer_configs[0] ? " --config " : " ") + c;
      for (const std::string& s : o->layer_shapes)
        lo.command += (&s == &o->layer_shapes[0] ? " --shape " : " ") + s;
      if (lo.router != moe::Router::softmax_topk) lo.command += " --router " + o->layer_router;
      run_layer_bench(lo);
      return;
    }
    o->command = cmd;
    run(*o);
  });
}

}  // namespace moe_bench
