// rows_lab: the permute and combine kernel variants of src/cuda/rows.cuh, verified against the
// library's launchers and timed side by side at one shape (default: the issue-3 headline shape,
// T=16384 H=4096 E=128 K=2, uniform routing, dropless).
//
//   P1 scatter, 8 packs/lane, default cache     (library permute)
//   P2 scatter, 8 packs/lane, evict-first (.cs)
//   P3 scatter, 4 packs/lane, default cache
//   P4 bulk copy engine, 4-stage ring
//   P5 bulk copy engine, 2-stage ring
//   C1 gather-sum, 4 packs/lane, one row at a time
//   C2 gather-sum, 4 packs/lane, two rows in flight   (library combine)
//   C3 gather-sum, 4 packs/lane, two rows in flight, evict-first (.cs)
//   C4 gather-sum, 8 packs/lane, one row at a time
//
// Build (CPU machine): scripts/gpu/build_lab.sh; run: build/run/rows_lab [T H E K] [bf16|fp32]
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/rows.cuh"
#include "moe/cuda/check.cuh"
#include "moe/cuda/combine.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/permute.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/cuda/synthetic.hpp"

using namespace moe;
using namespace moe::cuda;
using namespace moe::cuda::rows;

namespace {

double median_ms(int reps, cudaStream_t s, const std::function<void(int)>& run) {
  for (int i = 0; i < 5; ++i) run(i);
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
    run(i + 5);
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) MOE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

template <class T>
std::vector<char> bytes_of(const T* p, size_t n) {
  std::vector<char> h(n * sizeof(T));
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), p, h.size(), cudaMemcpyDeviceToHost));
  return h;
}

template <class T>
int run(int64_t T_, int64_t H, int64_t E, int64_t K, const char* dtype) {
  cudaStream_t s = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const int64_t N = T_ * K;
  PlanShape ps;
  ps.tokens = T_;
  ps.experts = E;
  ps.top_k = K;
  ps.choices = N;
  ps.layout = Layout::dropless;
  const int64_t R = ps.max_rows();
  const int64_t set_bytes = sizeof(T) * H * (2 * T_ + 2 * R);
  const int sets = std::max<int64_t>(2, (4 * int64_t{prop.l2CacheSize} + set_bytes - 1) / set_bytes);
  struct Set {
    RoutingBuffers routing;
    PlanBuffers plan;
    T *x, *xp, *y, *yp;
  };
  std::vector<Set> set(sets);
  for (int i = 0; i < sets; ++i) {
    SyntheticRouting spec;
    spec.tokens = T_;
    spec.experts = E;
    spec.top_k = K;
    spec.seed = 500 + i;
    upload_routing(synthetic_token_choice(spec), set[i].routing, s);
    set[i].plan = PlanBuffers(ps);
    MOE_CUDA_CHECK(cudaMalloc(&set[i].x, sizeof(T) * T_ * H));
    MOE_CUDA_CHECK(cudaMalloc(&set[i].y, sizeof(T) * T_ * H));
    MOE_CUDA_CHECK(cudaMalloc(&set[i].xp, sizeof(T) * R * H));
    MOE_CUDA_CHECK(cudaMalloc(&set[i].yp, sizeof(T) * R * H));
    fill_normal(set[i].x, T_ * H, 7 * i + 1, 1.f, s);
    fill_normal(set[i].yp, R * H, 7 * i + 2, 1.f, s);
    plan_forward(set[i].routing.view(), set[i].plan.view(), s);
  }
  // copy ceiling, as in moe-bench bench
  const size_t cb = size_t{1} << 30;
  void *ca, *cb2;
  MOE_CUDA_CHECK(cudaMalloc(&ca, cb));
  MOE_CUDA_CHECK(cudaMalloc(&cb2, cb));
  const double copy_ms = median_ms(20, s, [&](int i) {
    MOE_CUDA_CHECK(cudaMemcpyAsync(i % 2 ? ca : cb2, i % 2 ? cb2 : ca, cb, cudaMemcpyDeviceToDevice, s));
  });
  MOE_CUDA_CHECK(cudaFree(ca));
  MOE_CUDA_CHECK(cudaFree(cb2));
  const double copy_gbs = 2.0 * cb / (copy_ms * 1e6);
  std::printf("%s | copy %.0f GB/s | T=%ld H=%ld E=%ld K=%ld %s | %d sets\n", prop.name, copy_gbs,
              (long)T_, (long)H, (long)E, (long)K, dtype, sets);

  constexpr int W = 16 / sizeof(T);
  const RowGrid grid = row_grid(ps, true), ggrid = row_grid(ps, false);
  const uint32_t row_bytes = static_cast<uint32_t>(H * sizeof(T));
  auto bulk = [&](auto kernel_fn, int stages, Set& st) {
    const int smem = stages * row_bytes;
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel_fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    MOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_fn, kWarp, smem));
    const int blocks = std::max(1, per_sm) * prop.multiProcessorCount;
    kernel_fn<<<blocks, kWarp, smem, s>>>(st.plan.view(), reinterpret_cast<const char*>(st.x),
                                          reinterpret_cast<char*>(st.xp), row_bytes);
    MOE_CUDA_LAUNCH_CHECK();
  };
  struct Variant {
    const char* name;
    std::function<void(Set&)> launch;
  };
  std::vector<Variant> perm = {
      {"P1 scatter u8 default",
       [&](Set& st) {
         permute_scatter_kernel<T, W, 8, Cache::kDefault>
             <<<grid.blocks(), kThreads, 0, s>>>(st.plan.view(), st.x, st.xp, H, grid);
       }},
      {"P2 scatter u8 stream",
       [&](Set& st) {
         permute_scatter_kernel<T, W, 8, Cache::kStream>
             <<<grid.blocks(), kThreads, 0, s>>>(st.plan.view(), st.x, st.xp, H, grid);
       }},
      {"P3 scatter u4 default",
       [&](Set& st) {
         permute_scatter_kernel<T, W, 4, Cache::kDefault>
             <<<grid.blocks(), kThreads, 0, s>>>(st.plan.view(), st.x, st.xp, H, grid);
       }},
      {"P4 bulk 4 stages", [&](Set& st) { bulk(permute_bulk_kernel<4>, 4, st); }},
      {"P5 bulk 2 stages", [&](Set& st) { bulk(permute_bulk_kernel<2>, 2, st); }},
  };
  std::vector<Variant> comb = {
      {"C1 gather u4 single",
       [&](Set& st) {
         gather_sum_kernel<T, W, 4, true, false, Cache::kDefault><<<ggrid.blocks(), kThreads, 0, s>>>(
             st.plan.view(), st.routing.view().choice_weight, st.yp, st.y, H);
       }},
      {"C2 gather u4 pair",
       [&](Set& st) {
         gather_sum_kernel<T, W, 4, true, true, Cache::kDefault><<<ggrid.blocks(), kThreads, 0, s>>>(
             st.plan.view(), st.routing.view().choice_weight, st.yp, st.y, H);
       }},
      {"C3 gather u4 pair stream",
       [&](Set& st) {
         gather_sum_kernel<T, W, 4, true, true, Cache::kStream><<<ggrid.blocks(), kThreads, 0, s>>>(
             st.plan.view(), st.routing.view().choice_weight, st.yp, st.y, H);
       }},
      {"C4 gather u8 single",
       [&](Set& st) {
         gather_sum_kernel<T, W, 8, true, false, Cache::kDefault><<<ggrid.blocks(), kThreads, 0, s>>>(
             st.plan.view(), st.routing.view().choice_weight, st.yp, st.y, H);
       }},
  };
  // Reference outputs: the library launchers on set 0.
  permute_forward<T>(set[0].plan.view(), set[0].x, H, set[0].xp, s);
  combine_forward<T>(set[0].plan.view(), set[0].routing.view(), set[0].yp, H, set[0].y, s);
  const auto xp_ref = bytes_of(set[0].xp, R * H), y_ref = bytes_of(set[0].y, T_ * H);
  const double pb = double(sizeof(T)) * H * (T_ + N), cbytes = double(sizeof(T)) * H * (N + T_);
  int failed = 0;
  std::printf("%-28s %9s %8s %7s %s\n", "variant", "ms", "GB/s", "%copy", "check");
  auto report = [&](const char* name, double ms, double bytes, bool ok) {
    std::printf("%-28s %9.4f %8.0f %6.1f%% %s\n", name, ms, bytes / (ms * 1e6),
                100 * bytes / (ms * 1e6) / copy_gbs, ok ? "same bytes" : "DIFFERENT");
    failed += !ok;
  };
  for (auto& v : perm) {
    MOE_CUDA_CHECK(cudaMemset(set[0].xp, 0xff, sizeof(T) * R * H));
    v.launch(set[0]);
    MOE_CUDA_LAUNCH_CHECK();
    const bool ok = bytes_of(set[0].xp, R * H) == xp_ref;
    report(v.name, median_ms(50, s, [&](int i) { v.launch(set[i % sets]); }), pb, ok);
  }
  for (auto& v : comb) {
    MOE_CUDA_CHECK(cudaMemset(set[0].y, 0xff, sizeof(T) * T_ * H));
    v.launch(set[0]);
    MOE_CUDA_LAUNCH_CHECK();
    const bool ok = bytes_of(set[0].y, T_ * H) == y_ref;
    report(v.name, median_ms(50, s, [&](int i) { v.launch(set[i % sets]); }), cbytes, ok);
  }
  // pairs (permute then combine on the permuted rows)
  for (auto& p : perm)
    for (auto& c : comb) {
      const double ms = median_ms(50, s, [&](int i) {
        Set& st = set[i % sets];
        p.launch(st);
        std::swap(st.yp, st.xp);
        c.launch(st);
        std::swap(st.yp, st.xp);
      });
      std::string name = std::string(p.name).substr(0, 2) + "+" + std::string(c.name).substr(0, 2);
      std::printf("%-28s %9.4f %8.0f %6.1f%%\n", name.c_str(), ms, (pb + cbytes) / (ms * 1e6),
                  100 * (pb + cbytes) / (ms * 1e6) / copy_gbs);
    }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int64_t T = argc > 4 ? std::atol(argv[1]) : 16384, H = argc > 4 ? std::atol(argv[2]) : 4096,
                  E = argc > 4 ? std::atol(argv[3]) : 128, K = argc > 4 ? std::atol(argv[4]) : 2;
    const char* dtype = argc > 5 ? argv[5] : (argc == 2 ? argv[1] : "bf16");
    if (std::strcmp(dtype, "fp32") == 0) return run<float>(T, H, E, K, "fp32");
    return run<__nv_bfloat16>(T, H, E, K, "bf16");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rows_lab: %s\n", e.what());
    return 1;
  }
}
