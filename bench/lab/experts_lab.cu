// experts_lab: the expert GEMMs at one MoE shape (default OLMoE-1B-7B: T=16384 H=2048 I=1024
// E=64 K=8, SwiGLU, dropless, uniform routing), each backend verified before anything is timed.
//
//   D0       device-to-device copy of 1 GiB (bandwidth ceiling: bytes read + written)
//   G1 / G2  grouped up / down: CUTLASS sm90 grouped GEMM, sizes on the device (library)
//   G3       grouped up with SwiGLU/GELU in the epilogue, writing pre and act (grouped_fused)
//   G3n      the same without pre (forward only: nothing saved)
//   G3b      G3n with w_up's pairs in GateUpLayout::blocked order (act stored with no exchange)
//   W1 / W2  grouped weight gradients dw_down += act^T dyp / dw_up += xp^T dpre (K = segment);
//            W1o / W2o the same overwriting dW (beta = 0: dW written, never read)
//   P2       the up and down GEMMs back to back (F1 - P2: the activation pass in place); P3 / P4
//            the up / down GEMM twice (does a second launch cost more than the first?)
//   L1..L4   per-expert cublasGemmEx loop: up, down, dw_down, dw_up (offsets on the host, untimed)
//   C1 / C2  cublasGemmGroupedBatchedEx up / down (host sizes and device pointers built untimed)
//   D1..D4   dense-equivalent: one cuBLAS GEMM with the same M, N, K totals (the ceiling)
//   S1 / S2  cublasGemmStridedBatchedEx up / down (padded layout only)
//   X*       lab-only CUTLASS configs, each verified against the library's kernel first:
//            X1/X2 wgrad with a 128x16 epilogue tile (less smem: 4 mainloop stages instead of 3),
//            X3/X4 wgrad pingpong 128x128, X9/X10 wgrad pingpong 64x256 (each also overwriting),
//            X5 fused up-projection pingpong 64x256,
//            X6-X8 the plain up and down GEMMs with 256x128 / 128x128 cooperative and 128x128
//            pingpong tiles, X11-X13 with a 64x256 pingpong tile and the library's 128x256
//            cooperative tile on a 2x1 / 1x2 cluster (the library's plain GEMMs and fused
//            up-projection run on 1x1 since run 8, on 2x1 before: runs 6-8 compared the other way);
//            X14/X15 the backward's (N, K) GEMMs da / dxp (library: N1 / N2) and X18 the fused
//            up-projection on 2x1, X16/X17 the weight gradients on 1x1 (the library's: 2x1)
//   --ab     only the library's GEMMs against their other-cluster (and 128x192) variants in
//            alternating rounds: the comparison to trust (run 7: plain rows move 10 % with their
//            position); with the backward (default) also the da GEMM with the activation
//            backward in its epilogue, and the experts backward on grouped vs grouped_fused
//   F*       experts_forward per backend (the activation included; host-offset backends include
//            their offsets copy and stream synchronisation)
//   B*       experts_backward per backend (grouped: no host round trip at all now); B1o with the
//            weight gradients overwritten instead of accumulated
//
// FLOPs: up 2*M*H*A, down 2*M*I*H (A = 2I for SwiGLU), forward 6*M*H*I for SwiGLU, backward twice
// the forward (dx: same as forward, weight gradients: same again); M = rows computed (T*K when
// dropless, E*C when padded, padding included). Operands are hundreds of MB, far beyond the 50 MB
// L2, so repeats on the same buffers do not run from cache.
//
// Build (CPU machine), after building libmoe_cuda in build/gg:
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Iinclude \
//     -Isrc -I.deps/python/cutlass_library/source/include bench/lab/experts_lab.cu \
//     -o build/gg/experts_lab build/gg/libmoe_cuda.a build/gg/libmoe.a -lcublas -lcublasLt
// run: build/gg/experts_lab [options]
// (the lab-only configs are CUTLASS instantiations in this file: about three minutes of nvcc).

// CUTLASS's device assert()s would serialise wgmma in the lab-only kernels (C7510); see
// src/cuda/grouped_gemm_bf16_kn.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cuda/grouped_gemm_act_sm90.cuh"
#include "cuda/grouped_gemm_sm90.cuh"
#include "cuda/grouped_gemm_wgrad_sm90.cuh"
#include "moe/cuda/check.cuh"
#include "moe/cuda/clock_sampler.hpp"
#include "moe/cuda/experts.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/cuda/synthetic.hpp"

using namespace moe;
using namespace moe::cuda;

namespace {

namespace gg = moe::cuda::grouped_gemm;
using WgradEpi16 =
    gg::WgradLauncher<gg::WgradKernel<gg::CooperativeConfig, cute::Shape<cute::_128, cute::_16>>>;
using WgradPingpong = gg::WgradLauncher<gg::WgradKernel<gg::PingpongConfig<128, 128>>>;
// Fresh fp32 dW through the accumulating kernel (the library's before run 14, when it moved fresh
// dW to an epilogue with no C).
using WgradAccumulating = gg::WgradLauncher<gg::WgradKernel<gg::CooperativeConfig>>;
using WgradPingpong64x256 = gg::WgradLauncher<gg::WgradKernel<gg::PingpongConfig<64, 256>>>;
using ActPingpong = gg::ActLauncher<gg::ActKernel<gg::PingpongConfig<64, 256>>>;
// The da GEMM's activation backward under the next tile's mainloop, in 8 blocks of 8 groups or
// 16 of 4 (the library's runs after each tile's mainloop).
using ActGradDeferred8 = gg::ActLauncher<
    gg::ActGradKernel<gg::CooperativeNoClusterConfig, /*kDeferred=*/true, /*kBlocks=*/8>>;
using ActGradDeferred16 = gg::ActLauncher<
    gg::ActGradKernel<gg::CooperativeNoClusterConfig, /*kDeferred=*/true, /*kBlocks=*/16>>;
// The da GEMM on pingpong 64x256 (2x1): one consumer warpgroup's activation backward under the
// other's mainloop.
using ActGradPingpong = gg::ActLauncher<gg::ActGradKernel<gg::PingpongConfig<64, 256>>>;

// A second stream and the events that fork work onto it from a stream and join it back.
struct SideStream {
  cudaStream_t s2 = nullptr;
  cudaEvent_t fork_ev = nullptr, join_ev = nullptr;
  SideStream() {
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork_ev, cudaEventDisableTiming));
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&join_ev, cudaEventDisableTiming));
  }
  ~SideStream() {
    cudaEventDestroy(fork_ev);
    cudaEventDestroy(join_ev);
    cudaStreamDestroy(s2);
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void fork(cudaStream_t origin) {  // s2 waits for what `origin` has queued
    MOE_CUDA_CHECK(cudaEventRecord(fork_ev, origin));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(s2, fork_ev));
  }
  void join(cudaStream_t origin) {  // `origin` waits for what s2 has queued
    MOE_CUDA_CHECK(cudaEventRecord(join_ev, s2));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(origin, join_ev));
  }
};

// --ab-split-act: the SwiGLU backward (blocked gate/up pairs) from a stored da, one 1024-thread
// block per SM it runs on. Its shared-memory claim (kSplitActClaim, never touched) keeps a second
// block and any GEMM CTA (about 200 KB each) off that SM, so a grid of S blocks holds exactly S
// SMs beside a persistent GEMM grid on the others, whichever starts first. Each thread loads two
// items (8 units of a row: 16 bytes of da, 8 pairs of pre 4 apart) before storing either. The
// arithmetic is the fused epilogue's (act::silu_mul_grad on da as bf16), so dpre is the same bits;
// the row dots that epilogue also forms are left out.
constexpr int kSplitActThreads = 1024;
constexpr int kSplitActClaim = 120 * 1024;

__device__ __forceinline__ int64_t split_blocked_pair(int64_t u) {  // experts.cu's blocked_pair
  return 32 * (u >> 5) + 4 * (u & 7) + ((u >> 3) & 3);
}

__global__ void __launch_bounds__(kSplitActThreads)
    split_act_grad_kernel(const int32_t* __restrict__ num_rows, const bf16* __restrict__ da,
                          const bf16* pre, bf16* dpre, int64_t inter) {
  extern __shared__ char claim[];
  (void)claim;
  const int64_t per_row = inter / 8, total = int64_t{*num_rows} * per_row;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < total; v += 2 * stride) {
    uint4 d[2];
    float g[2][8], u[2][8];
    int64_t row[2], col[2];
    for (int i = 0; i < 2; ++i) {
      const int64_t w = v + i * stride;
      if (w >= total) break;
      row[i] = w / per_row, col[i] = (w - row[i] * per_row) * 8;
      d[i] = *reinterpret_cast<const uint4*>(da + row[i] * inter + col[i]);
      const bf16* h = pre + row[i] * 2 * inter;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const __nv_bfloat162 p =
            *reinterpret_cast<const __nv_bfloat162*>(h + 2 * split_blocked_pair(col[i] + k));
        g[i][k] = __low2float(p), u[i][k] = __high2float(p);
      }
    }
    for (int i = 0; i < 2; ++i) {
      if (v + i * stride >= total) break;
      const bf16* dv = reinterpret_cast<const bf16*>(&d[i]);
      bf16* dh = dpre + row[i] * 2 * inter;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float dg, du;
        act::silu_mul_grad(__bfloat162float(dv[k]), g[i][k], u[i][k], dg, du);
        *reinterpret_cast<__nv_bfloat162*>(dh + 2 * split_blocked_pair(col[i] + k)) =
            __floats2bfloat162_rn(dg, du);
      }
    }
  }
}

// Lab-only tiles for the plain up/down GEMMs (short K: the down projection's K = I is 768-1024).
template <int kM, int kN, int kClusterM = 2, int kClusterN = 1>
struct CooperativeTile {
  using TileShape = cute::Shape<cute::Int<kM>, cute::Int<kN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::Int<kClusterM>, cute::Int<kClusterN>, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
using GemmCoop256x128 =
    gg::Launcher<gg::Kernel<CooperativeTile<256, 128>, moe::cuda::WeightLayout::kn>>;
using GemmCoop128x128 =
    gg::Launcher<gg::Kernel<CooperativeTile<128, 128>, moe::cuda::WeightLayout::kn>>;
using GemmPingpong128x128 =
    gg::Launcher<gg::Kernel<gg::PingpongConfig<128, 128>, moe::cuda::WeightLayout::kn>>;
using GemmPingpong64x256 =
    gg::Launcher<gg::Kernel<gg::PingpongConfig<64, 256>, moe::cuda::WeightLayout::kn>>;
using GemmCoop128x256Cluster2x1 =
    gg::Launcher<gg::Kernel<CooperativeTile<128, 256, 2, 1>, moe::cuda::WeightLayout::kn>>;
using GemmCoop128x256Cluster1x2 =
    gg::Launcher<gg::Kernel<CooperativeTile<128, 256, 1, 2>, moe::cuda::WeightLayout::kn>>;
// The library's kernels on the other cluster: the (N, K) GEMMs and the fused up-projection on
// 2x1 (the library runs them on 1x1 since run 8), the weight gradients on 1x1 (the library's
// are 2x1).
using NkCluster2x1 =
    gg::Launcher<gg::Kernel<CooperativeTile<128, 256, 2, 1>, moe::cuda::WeightLayout::nk>>;
using WgradCluster1x1 = gg::WgradLauncher<gg::WgradKernel<CooperativeTile<128, 256, 1, 1>>>;
using ActCluster2x1 = gg::ActLauncher<gg::ActKernel<CooperativeTile<128, 256, 2, 1>>>;
// The gathered fused up-projection without a cluster (the library's runs on 2x1).
using ActGatherCluster1x1 =
    gg::ActLauncher<gg::ActKernel<gg::CooperativeNoClusterConfig, /*kGatherA=*/true>>;
// The plain GEMMs with a TMA store epilogue that has no C and 4 (the library's before run 21, the
// same smem as the builder's) or 8 (a whole tile, 3 mainloop stages) D buffers.
template <WeightLayout L, int kStagesD>
using GemmStaged = gg::Launcher<gg::Kernel<
    gg::CooperativeNoClusterConfig, L, false,
    typename gg::EpilogueStoreStaged<gg::CooperativeNoClusterConfig, kStagesD>::Op>>;
// Fresh weight gradients with an epilogue that has no C and 4 D buffers: fp32 in 128x16 subtiles
// (32 KiB, the library's smem) or 128x32 (64 KiB, 3 mainloop stages); bf16 in 128x32 (32 KiB).
template <class Element, class SubTile>
using WgradStaged = gg::WgradLauncher<gg::WgradKernel<
    gg::CooperativeConfig, cutlass::epilogue::collective::EpilogueTileAuto, Element, false,
    typename gg::EpilogueStoreStaged<gg::CooperativeConfig, 4, Element, SubTile>::Op>>;
// Fresh dW through the TMA store after each tile on a 2x1 cluster (the library's before run 22:
// fp32 with no C, bf16 the builder's store with a C never read).
using WgradFreshTma = gg::WgradLauncher<gg::WgradKernel<
    gg::CooperativeConfig, cutlass::epilogue::collective::EpilogueTileAuto, float, true>>;
using WgradBf16Tma = gg::WgradLauncher<
    gg::WgradKernel<gg::CooperativeConfig, cutlass::epilogue::collective::EpilogueTileAuto, gg::Bf16>>;
// Fresh fp32 dW, the whole tile stored from registers at once (the library's before run 26,
// which keeps row half 1 for the next tile's mainloop).
using WgradF32AtOnce = gg::WgradLauncher<
    gg::WgradRegisterKernel<gg::CooperativeNoClusterConfig, gg::WgradStoreF32>>;
using Sub128x16 = cute::Shape<cute::_128, cute::_16>;
using Sub128x32 = cute::Shape<cute::_128, cute::_32>;
// cuBLAS's dense kernels for these shapes use 192-wide tiles (run 6).
using GemmCoop128x192 =
    gg::Launcher<gg::Kernel<CooperativeTile<128, 192, 2, 1>, moe::cuda::WeightLayout::kn>>;

// ------------------------------------------------------------------------------------------------
// options
// ------------------------------------------------------------------------------------------------

struct Options {
  int64_t tokens = 16384, hidden = 2048, inter = 1024, experts = 64, top_k = 8;
  Skew skew = Skew::uniform;
  Activation activation = Activation::swiglu;
  Layout layout = Layout::dropless;
  double capacity_factor = 1.25;
  int reps = 20;
  bool backward = true;
  bool ab = false;          // only the A/B rounds (below)
  bool ab_act_grad = false;  // only the activation-backward A/B rounds
  bool ab_wgrad = false;     // only the weight-gradient A/B rounds (pingpong, bf16 dW)
  bool ab_epilogue = false;  // only the plain GEMMs' epilogue A/B rounds (no C, D buffers)
  bool ab_wgrad_epilogue = false;  // only the weight gradients' epilogue A/B rounds
  bool ab_gather = false;    // only the gathered fused up-projection on 2x1 against 1x1
  bool ab_deferred = false;  // only the fused up-projection, immediate against deferred act
  bool ab_deferred_store = false;  // only the plain GEMMs, TMA store against deferred store
  bool ab_wgrad_store = false;  // only fresh dW, TMA store against register stores
  bool ab_act_grad_pingpong = false;  // only the da GEMM: cooperative against pingpong
  bool ab_concurrent = false;  // only the backward's independent GEMM pairs, one after the
                               // other against side by side on two streams
  bool energy = false;  // --ab rounds also give each side's energy per run (energy_loop)
  bool ab_split_act = false;   // only da with dw_down: the library's pair against the plain da
                               // GEMM, then dw_down beside the activation backward on its own SMs

  static void print_usage() {
    std::printf(
        "experts_lab [--tokens T] [--hidden H] [--inter I] [--experts E] [--top-k K]\n"
        "            [--skew uniform|zipf|one_expert] [--activation swiglu|gelu]\n"
        "            [--layout dropless|padded] [--capacity-factor F] [--reps N] [--no-backward]\n"
        "            [--ab]   only the library kernels against lab variants in alternating rounds\n"
        "            [--energy] with any --ab*: each pair also run for a second each, A B B A\n"
        "                       (moe::cuda::energy_loop): energy per run, mean power, SM clock\n"
        "                       and time per run sustained, where the card may reach its cap\n"
        "            [--ab-act-grad]  only the activation backward's rounds of --ab, with the\n"
        "                             da epilogue after each tile (the library's) against\n"
        "                             under the next tile's mainloop\n"
        "            [--ab-wgrad]     only the weight gradients' rounds (pingpong 64x256, 128x16\n"
        "                             epilogue tile, bf16 dW)\n"
        "            [--ab-epilogue]  only the plain GEMMs (down, dxp) against epilogues with no\n"
        "                             C and 4 or 8 D buffers\n"
        "            [--ab-gather]    only the gathered fused up-projection (act only, blocked\n"
        "                             w_up): the library's 2x1 cluster against 1x1\n"
        "            [--ab-wgrad-epilogue]  only fresh dW (fp32, bf16) against epilogues with\n"
        "                             no C and 4 D buffers\n"
        "            [--ab-deferred]  only the fused up-projection (blocked w_up, with and without\n"
        "                             pre, permuted and gathered): the activation after each\n"
        "                             tile's mainloop against under the next one's\n"
        "            [--ab-deferred-store]  only the plain GEMMs (down, dxp): the TMA store after\n"
        "                             each tile's mainloop against the library's under the\n"
        "                             next one's\n"
        "            [--ab-wgrad-store]  only fresh dW (fp32, bf16): the TMA store after each\n"
        "                             tile against the library's register stores; fp32 also\n"
        "                             the whole tile at once against the library's row half 1\n"
        "                             under the next mainloop\n"
        "            [--ab-act-grad-pingpong]  only the da GEMM with the activation backward\n"
        "                             and row dots: the library's against pingpong 64x256\n"
        "            [--ab-split-act]  only da with dw_down: the library's pair against the\n"
        "                             plain da GEMM, then dw_down beside the activation\n"
        "                             backward on S = 8..32 SMs of its own\n"
        "            [--ab-concurrent]  only the backward's independent GEMM pairs (dw_down and\n"
        "                             da, dxp and dw_up): one after the other on every SM\n"
        "                             against side by side on two streams, SMs split\n"
        "  e.g. experts_lab                       (OLMoE: 16384 2048 1024 64 8)\n"
        "       experts_lab --inter 768 --experts 128 --skew zipf   (Qwen3-30B-A3B)\n"
        "       experts_lab --layout padded       (adds cublasGemmStridedBatchedEx)\n");
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
      else if (a == "--layout") layout = parse_layout(next());
      else if (a == "--capacity-factor") capacity_factor = std::atof(next());
      else if (a == "--reps") reps = std::atoi(next());
      else if (a == "--no-backward") backward = false;
      else if (a == "--ab") ab = true;
      else if (a == "--energy") energy = true;
      else if (a == "--ab-act-grad") ab = ab_act_grad = true;
      else if (a == "--ab-wgrad") ab = ab_wgrad = true;
      else if (a == "--ab-epilogue") ab = ab_epilogue = true;
      else if (a == "--ab-wgrad-epilogue") ab = ab_wgrad_epilogue = true;
      else if (a == "--ab-gather") ab = ab_gather = true;
      else if (a == "--ab-deferred") ab = ab_deferred = true;
      else if (a == "--ab-deferred-store") ab = ab_deferred_store = true;
      else if (a == "--ab-wgrad-store") ab = ab_wgrad_store = true;
      else if (a == "--ab-concurrent") ab = ab_concurrent = true;
      else if (a == "--ab-split-act") ab = ab_split_act = true;
      else if (a == "--ab-act-grad-pingpong") ab = ab_act_grad_pingpong = true;
      else if (a == "--help" || a == "-h") return false;
      else throw ConfigError("unknown option " + a);
    }
    return true;
  }
  bool valid() const {
    return tokens >= 1 && hidden % 8 == 0 && inter % 8 == 0 && experts >= 1 &&
           experts <= 4096 && top_k >= 1 && top_k <= experts && reps >= 1 &&
           layout != Layout::block && capacity_factor > 0;
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

// Row-major C (p, q) fp32 += X (rows, p)^T · Y (rows, q).
void cublas_tn_accumulate(cublasHandle_t h, int64_t rows, int64_t p, int64_t q, const bf16* x,
                          const bf16* y, float* c) {
  const float one = 1.f;
  MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, int(q), int(p), int(rows), &one, y,
                                CUDA_R_16BF, int(q), x, CUDA_R_16BF, int(p), &one, c, CUDA_R_32F,
                                int(q), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// One cublasGemmGroupedBatchedEx for row-major D_e (m_e, n) = A_e (m_e, k) · B_e (k, n) over the
// non-empty experts; host arrays and the device pointer array are built once, untimed.
struct CublasGrouped {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<float> alpha, beta;
  void** ptrs = nullptr;  // device (3, G)
  int groups = 0;
  CublasGrouped(const std::vector<int32_t>& off, int64_t n_, int64_t k_, const bf16* a,
                const bf16* b, bf16* d) {
    const int64_t E = static_cast<int64_t>(off.size()) - 1;
    std::vector<void*> host;
    std::vector<void*> pa, pb, pd;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], rows = off[e + 1] - off[e];
      if (rows == 0) continue;
      ta.push_back(CUBLAS_OP_N), tb.push_back(CUBLAS_OP_N);
      m.push_back(int(n_)), n.push_back(int(rows)), k.push_back(int(k_));
      lda.push_back(int(n_)), ldb.push_back(int(k_)), ldc.push_back(int(n_));
      size.push_back(1), alpha.push_back(1.f), beta.push_back(0.f);
      pa.push_back(const_cast<bf16*>(b + e * k_ * n_));
      pb.push_back(const_cast<bf16*>(a + r0 * k_));
      pd.push_back(d + r0 * n_);
    }
    groups = static_cast<int>(pa.size());
    host = pa;
    host.insert(host.end(), pb.begin(), pb.end());
    host.insert(host.end(), pd.begin(), pd.end());
    MOE_CUDA_CHECK(cudaMalloc(&ptrs, sizeof(void*) * std::max<size_t>(1, host.size())));
    MOE_CUDA_CHECK(cudaMemcpy(ptrs, host.data(), sizeof(void*) * host.size(),
                              cudaMemcpyHostToDevice));
  }
  ~CublasGrouped() { cudaFree(ptrs); }
  void run(cublasHandle_t h) const {
    MOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        h, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
        const_cast<const void* const*>(ptrs), CUDA_R_16BF, lda.data(),
        const_cast<const void* const*>(ptrs + groups), CUDA_R_16BF, ldb.data(), beta.data(),
        ptrs + 2 * groups, CUDA_R_16BF, ldc.data(), groups, size.data(), CUBLAS_COMPUTE_32F));
  }
};

template <class T>
std::vector<T> download(const T* p, int64_t n) {
  std::vector<T> h(n);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

inline double as_double(float v) { return v; }
inline double as_double(bf16 v) { return __bfloat162float(v); }

// ||a - b|| / ||b|| over the first n elements; NaN anywhere gives infinity.
template <class T>
double rel_error(const std::vector<T>& a, const std::vector<T>& b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = as_double(a[i]), y = as_double(b[i]), d = x - y;
    num += d * d;
    den += y * y;
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The da-GEMM rounds' scratch: a second dpre and two sets of row dots (A's, B's).
struct ActGradScratch {
  bf16* dpre = nullptr;
  float *dots_a = nullptr, *dots_b = nullptr;
  int64_t dots = 0;  // parts * M
  ActGradScratch(int64_t rows, int64_t width, int64_t parts) : dots(parts * rows) {
    MOE_CUDA_CHECK(cudaMalloc(&dpre, rows * width * sizeof(bf16)));
    MOE_CUDA_CHECK(cudaMalloc(&dots_a, dots * sizeof(float)));
    MOE_CUDA_CHECK(cudaMalloc(&dots_b, dots * sizeof(float)));
  }
  ~ActGradScratch() {
    cudaFree(dots_b);
    cudaFree(dots_a);
    cudaFree(dpre);
  }
  ActGradScratch(const ActGradScratch&) = delete;
  ActGradScratch& operator=(const ActGradScratch&) = delete;
  bool same_dots() const {
    return rel_error(download(dots_a, dots), download(dots_b, dots), dots) == 0;
  }
};

// ------------------------------------------------------------------------------------------------
// main
// ------------------------------------------------------------------------------------------------

int run(const Options& o) {
  cudaStream_t s = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  // Routing and plan on the device.
  const bool padded = o.layout == Layout::padded;
  PlanShape ps;
  ps.tokens = o.tokens;
  ps.experts = o.experts;
  ps.top_k = o.top_k;
  ps.choices = o.tokens * o.top_k;
  ps.layout = o.layout;
  if (padded)
    ps.capacity = static_cast<int64_t>(std::ceil(o.capacity_factor * o.tokens * o.top_k /
                                                 static_cast<double>(o.experts)));
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
  const bool swiglu = o.activation == Activation::swiglu;
  ExpertsShape es_fused = es;  // the fused backend runs on w_up with gate/up interleaved
  es_fused.gate_up = swiglu ? GateUpLayout::interleaved : GateUpLayout::split;
  const bool blocked = swiglu && I % 32 == 0;  // GateUpLayout::blocked applies
  ExpertsShape es_blocked = es;
  es_blocked.gate_up = GateUpLayout::blocked;

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

  // Buffers (one allocation each).
  bf16 *w_up, *w_up_il, *w_up_bl, *w_down, *xp, *pre, *act, *yp, *pre2, *act2, *yp2, *pre3, *act3, *yp3;
  bf16 *dyp = nullptr, *dxp = nullptr, *dxp2 = nullptr, *dxp3 = nullptr;
  float *dw_up = nullptr, *dw_down = nullptr, *dw_up2 = nullptr, *dw_down2 = nullptr;
  auto alloc = [](auto** p, int64_t n) { MOE_CUDA_CHECK(cudaMalloc(p, n * sizeof(**p))); };
  alloc(&w_up, E * H * A);
  alloc(&w_up_il, E * H * A);
  alloc(&w_up_bl, E * H * A);
  alloc(&w_down, E * I * H);
  alloc(&xp, R * H);
  for (bf16** p : {&pre, &pre2, &pre3}) alloc(p, R * A);
  for (bf16** p : {&act, &act2, &act3}) alloc(p, R * I);
  for (bf16** p : {&yp, &yp2, &yp3}) alloc(p, R * H);
  if (o.backward) {
    for (bf16** p : {&dyp, &dxp, &dxp2, &dxp3}) alloc(p, R * H);
    for (float** p : {&dw_up, &dw_up2}) alloc(p, E * H * A);
    for (float** p : {&dw_down, &dw_down2}) alloc(p, E * I * H);
  }
  fill_normal(w_up, E * H * A, 1, 1.f / std::sqrt(float(H)), s);
  fill_normal(w_down, E * I * H, 2, 1.f / std::sqrt(float(I)), s);
  fill_normal(xp, R * H, 3, 1.f, s);
  if (o.backward) fill_normal(dyp, R * H, 4, 1.f, s);
  if (swiglu) interleave_gate_up(w_up, w_up_il, E * H, I, s);
  if (blocked) to_gate_up_layout(w_up, w_up_bl, GateUpLayout::blocked, E * H, I, s);
  else MOE_CUDA_CHECK(cudaMemcpyAsync(w_up_il, w_up, E * H * A * sizeof(bf16),
                                      cudaMemcpyDeviceToDevice, s));

  std::printf("%s (%d SMs) | T=%ld H=%ld I=%ld E=%ld K=%ld %s %s %s", prop.name,
              prop.multiProcessorCount, (long)o.tokens, (long)H, (long)I, (long)E, (long)o.top_k,
              std::string(name(o.skew)).c_str(), std::string(name(o.activation)).c_str(),
              std::string(name(o.layout)).c_str());
  if (padded) std::printf(" C=%ld", (long)ps.capacity);
  std::printf(" | M=%ld rows, largest segment %ld, %ld empty\n", (long)M, (long)largest,
              (long)empty);

  ExpertsWorkspace grouped(es, ExpertsBackend::grouped, o.backward);
  ExpertsWorkspace fused(es_fused, ExpertsBackend::grouped_fused, o.backward);
  std::unique_ptr<ExpertsWorkspace> fused_bl;
  if (blocked)
    fused_bl = std::make_unique<ExpertsWorkspace>(es_blocked, ExpertsBackend::grouped_fused, false);
  ExpertsWorkspace loop(es, ExpertsBackend::cublas_loop_host_offsets, o.backward);
  ExpertsWorkspace cgrouped(es, ExpertsBackend::cublas_grouped_host_offsets, o.backward);
  GroupedGemm g_up(E, WeightLayout::kn), g_down(E, WeightLayout::kn);
  GroupedGemmAct g_act(E, o.activation);
  GroupedWgrad g_wgrad(E);
  std::printf("grouped GEMM: %s\nfused:        %s\nwgrad:        %s\n", g_up.name(), g_act.name(),
              g_wgrad.name());
  cublasHandle_t h;
  MOE_CUBLAS_CHECK(cublasCreate(&h));
  MOE_CUBLAS_CHECK(cublasSetStream(h, s));

  // ---- verify (each backend is checked against the CPU in moe_cuda_tests; here they must agree
  // at full size)
  double worst = 0;
  auto compare = [&](const char* what, double err) {
    std::printf("verify %-34s relative error %.2e\n", what, err);
    worst = std::max(worst, err);
  };
  const ExpertsForwardArgs fa{offsets, w_up, w_down, xp, pre, act, yp};
  const ExpertsForwardArgs fb{offsets, w_up, w_down, xp, pre2, act2, yp2};
  const ExpertsForwardArgs fc{offsets, w_up_il, w_down, xp, pre3, act3, yp3};
  ExpertsForwardArgs fc_no_pre = fc;
  fc_no_pre.pre = nullptr;
  ExpertsForwardArgs fc_blocked = fc_no_pre;
  fc_blocked.w_up = w_up_bl;
  for (bf16* p : {yp, yp2, yp3}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0xff, R * H * sizeof(bf16), s));
  experts_forward(grouped, fa, s);
  experts_forward(loop, fb, s);
  experts_forward(fused, fc, s);
  compare("pre  grouped vs cuBLAS loop", rel_error(download(pre, M * A), download(pre2, M * A), M * A));
  compare("yp   grouped vs cuBLAS loop", rel_error(download(yp, M * H), download(yp2, M * H), M * H));
  compare("act  fused vs grouped", rel_error(download(act3, M * I), download(act, M * I), M * I));
  compare("yp   fused vs grouped", rel_error(download(yp3, M * H), download(yp, M * H), M * H));
  if (blocked) {
    experts_forward(*fused_bl, fc_blocked, s);
    compare("act  fused blocked vs grouped",
            rel_error(download(act3, M * I), download(act, M * I), M * I));
    compare("yp   fused blocked vs grouped",
            rel_error(download(yp3, M * H), download(yp, M * H), M * H));
  }
  // A baseline the library refuses (a cuBLAS type combination, say) is reported and left out of
  // the timing; it does not stop the others.
  bool cgrouped_ok = true;
  try {
    MOE_CUDA_CHECK(cudaMemsetAsync(yp2, 0xff, R * H * sizeof(bf16), s));
    experts_forward(cgrouped, fb, s);
    compare("yp   cuBLAS grouped-batched vs grouped",
            rel_error(download(yp2, M * H), download(yp, M * H), M * H));
  } catch (const std::exception& e) {
    cgrouped_ok = false;
    std::printf("cublas_grouped_host_offsets unavailable: %s\n", e.what());
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ExpertsWorkspace* strided = nullptr;
  if (padded) {
    strided = new ExpertsWorkspace(es, ExpertsBackend::cublas_strided_padded, o.backward);
    MOE_CUDA_CHECK(cudaMemsetAsync(yp2, 0xff, R * H * sizeof(bf16), s));
    experts_forward(*strided, fb, s);
    compare("yp   cuBLAS strided-batched vs grouped",
            rel_error(download(yp2, M * H), download(yp, M * H), M * H));
  }
  const ExpertsBackwardArgs ba{offsets, w_up, w_down, xp, pre, act, dyp, dxp, dw_up, dw_down};
  const ExpertsBackwardArgs bb{offsets, w_up, w_down, xp, pre2, act2, dyp, dxp2, dw_up2, dw_down2};
  if (o.backward) {
    experts_forward(loop, fb, s);  // pre2/act2 from the loop again
    for (float* p : {dw_up, dw_up2}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, E * H * A * 4, s));
    for (float* p : {dw_down, dw_down2}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, E * I * H * 4, s));
    experts_backward(grouped, ba, s);
    experts_backward(loop, bb, s);
    compare("dxp  grouped vs cuBLAS loop", rel_error(download(dxp, M * H), download(dxp2, M * H), M * H));
    compare("dw_up grouped (ragged K) vs cuBLAS loop",
            rel_error(download(dw_up, E * H * A), download(dw_up2, E * H * A), E * H * A));
    compare("dw_down grouped (ragged K) vs cuBLAS loop",
            rel_error(download(dw_down, E * I * H), download(dw_down2, E * I * H), E * I * H));
  }
  const bool ok = worst < 1e-2;
  std::printf("Disposition: %s\n", ok ? "Passed" : "Failed");
  if (!ok) return 1;

  // ---- time
  const double f_up = 2.0 * M * H * A, f_down = 2.0 * M * I * H, f_fwd = f_up + f_down;
  auto tf = [](double flop, double ms) { return flop / (ms * 1e9); };
  std::printf("\n%-48s %9s %9s\n", "variant", "ms", "TFLOP/s");
  auto row = [&](const char* name, double ms, double flop) {
    std::printf("%-48s %9.3f %9.1f\n", name, ms, tf(flop, ms));
  };
  if (o.ab) {
    // Library kernel (A) against a lab variant (B) in 6 alternating rounds, B first in every
    // other round, so that neither always runs in the same position: run 7 showed rows of one
    // lab run moving by 10 % with their place in the sequence alone. Each variant is checked
    // bit for bit against the library's output first.
    const int sms = prop.multiProcessorCount;
    int device = 0;
    MOE_CUDA_CHECK(cudaGetDevice(&device));
    moe::cuda::ClockSampler clocks(device);
    auto ab = [&](const char* label, double flop, const std::function<void()>& a,
                  const std::function<void()>& b) {
      std::vector<double> ta, tb, ratio;
      for (int r = 0; r < 6; ++r) {
        double x, y;
        if (r % 2) y = median_ms(o.reps, s, b), x = median_ms(o.reps, s, a);
        else x = median_ms(o.reps, s, a), y = median_ms(o.reps, s, b);
        ta.push_back(x), tb.push_back(y), ratio.push_back(y / x);
      }
      auto med = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
      };
      std::sort(ratio.begin(), ratio.end());
      std::printf("AB %-44s A %8.3f ms (%5.0f TF/s)  B %8.3f ms  B/A median %.3f [%.3f, %.3f]\n",
                  label, med(ta), tf(flop, med(ta)), med(tb), med(ratio), ratio.front(),
                  ratio.back());
      if (!o.energy) return;
      // The lab's rounds are short, with host gaps: the card stays under its power cap there. A
      // layer's training step runs at the cap, where time follows energy: a second of each side,
      // A B B A, gives what each run costs in joules and how long it takes sustained.
      if (!clocks.available()) {
        std::printf("AB energy %-37s no NVML: not measured\n", label);
        return;
      }
      moe::cuda::ClockSamples ea, eb;
      for (int i = 0; i < 4; ++i) {
        const bool is_a = i == 0 || i == 3;
        moe::cuda::energy_loop(clocks, is_a ? ea : eb, s, is_a ? a : b);
      }
      std::printf("AB energy %-37s A %7.4f J (%3.0f W, %4.0f MHz, %3.0f %% capped, %8.3f ms)  "
                  "B %7.4f J (%3.0f W, %4.0f MHz, %3.0f %% capped, %8.3f ms)  B/A %.3f J, %.3f ms\n",
                  label, ea.energy_per_run_j(), ea.mean_power_w(), ea.median_mhz(),
                  100 * ea.power_capped_share(), ea.ms_per_run(), eb.energy_per_run_j(),
                  eb.mean_power_w(), eb.median_mhz(), 100 * eb.power_capped_share(),
                  eb.ms_per_run(), eb.energy_per_run_j() / ea.energy_per_run_j(),
                  eb.ms_per_run() / ea.ms_per_run());
    };
    auto same = [&](const char* label, const bf16* x, const bf16* y, int64_t n) {
      const double e = rel_error(download(x, n), download(y, n), n);
      std::printf("AB verify %-37s relative error %.2e\n", label, e);
      return e == 0;
    };
    auto workspace = [&](size_t bytes) {
      void* p = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
      return p;
    };
    // The fused training forward on blocked w_up (pre3, act3 in the blocked order), where the
    // backward's rounds start.
    auto blocked_forward = [&] {
      auto w = std::make_unique<ExpertsWorkspace>(es_blocked, ExpertsBackend::grouped_fused, true);
      ExpertsForwardArgs f = fc;
      f.w_up = w_up_bl;
      experts_forward(*w, f, s);
      return w;
    };
    void* ws = workspace(std::max({GemmCoop128x256Cluster2x1::workspace_bytes(E, sms),
                                   GemmCoop128x192::workspace_bytes(E, sms),
                                   ActCluster2x1::workspace_bytes(E, sms),
                                   NkCluster2x1::workspace_bytes(E, sms)}));
    if (o.ab_deferred && blocked) {
      // The fused up-projection on blocked w_up, act only (inference) and with pre (training),
      // with xp and with rows gathered from the first T rows of xp by the plan's row_token: the
      // immediate epilogue (A) against the activation under the next tile's mainloop (B, the
      // library's choice).
      void* dws = workspace(std::max({gg::Bf16Sm90Act::workspace_bytes(E, sms),
                                      gg::Bf16Sm90ActGather::workspace_bytes(E, sms),
                                      gg::Bf16Sm90ActDeferred::workspace_bytes(E, sms),
                                      gg::Bf16Sm90ActGatherDeferred::workspace_bytes(E, sms)}));
      for (bool gathered : {false, true})
        for (bool with_pre : {false, true}) {
          GroupedGemmActArgs a{offsets, A, H, xp, w_up_bl, with_pre ? pre2 : nullptr, act2};
          a.blocked = true;
          if (gathered) a.gather = plan.view().row_token, a.gather_rows = o.tokens;
          GroupedGemmActArgs b = a;
          b.act = act3;
          if (with_pre) b.pre = pre3;
          auto run_a = [&] {
            if (gathered) gg::Bf16Sm90ActGather::run(a, o.activation, E, dws, sms, s);
            else gg::Bf16Sm90Act::run(a, o.activation, E, dws, sms, s);
          };
          auto run_b = [&] {
            if (gathered) gg::Bf16Sm90ActGatherDeferred::run(b, o.activation, E, dws, sms, s);
            else gg::Bf16Sm90ActDeferred::run(b, o.activation, E, dws, sms, s);
          };
          MOE_CUDA_CHECK(cudaMemsetAsync(act3, 0xff, M * I * sizeof(bf16), s));
          MOE_CUDA_CHECK(cudaMemsetAsync(pre3, 0xff, M * A * sizeof(bf16), s));
          run_a();
          run_b();
          const std::string what = std::string(gathered ? "gathered fused up" : "fused up") +
                                   (with_pre ? " (pre, act)" : " (act)");
          bool ok = same((what + ", deferred act").c_str(), act2, act3, M * I);
          if (with_pre) ok = same((what + ", deferred pre").c_str(), pre2, pre3, M * A) && ok;
          if (ok) ab((what + ": immediate (A) vs deferred (B)").c_str(), f_up, run_a, run_b);
        }
      MOE_CUDA_CHECK(cudaFree(dws));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_gather && blocked) {
      // The gathered fused up-projection as the inference layer runs it (blocked w_up, act only):
      // rows gathered from the first T rows of xp (standing in for x) by the plan's row_token.
      void* gws = workspace(ActGatherCluster1x1::workspace_bytes(E, sms));
      GroupedGemmActArgs ga{offsets, A, H, xp, w_up_bl, nullptr, act2};
      ga.blocked = true;
      ga.gather = plan.view().row_token;
      ga.gather_rows = o.tokens;
      GroupedGemmActArgs gb = ga;
      gb.act = act3;
      g_act.run(ga, s);
      ActGatherCluster1x1::run(gb, o.activation, E, gws, sms, s);
      if (same("gathered fused up 1x1", act2, act3, M * I))
        ab("gathered fused up (act): library 2x1 (A) vs 1x1 (B)", f_up, [&] { g_act.run(ga, s); },
           [&] { ActGatherCluster1x1::run(gb, o.activation, E, gws, sms, s); });
      MOE_CUDA_CHECK(cudaFree(gws));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_wgrad_epilogue && o.backward) {
      // Fresh dW, fp32 and bf16: the library's epilogues (fp32: no C, 2 D buffers of 128x32;
      // bf16: a C never read, 2 D buffers) against no C with 4 D buffers, checked equal first.
      void* wws = workspace(std::max({WgradStaged<float, Sub128x16>::workspace_bytes(E, sms),
                                      WgradStaged<float, Sub128x32>::workspace_bytes(E, sms),
                                      WgradStaged<gg::Bf16, Sub128x32>::workspace_bytes(E, sms)}));
      bf16 *dw16 = nullptr, *dw16b = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&dw16, E * H * A * sizeof(bf16)));
      MOE_CUDA_CHECK(cudaMalloc(&dw16b, E * H * A * sizeof(bf16)));
      for (int pass = 0; pass < 2; ++pass) {  // dw_down = act^T dyp, then dw_up = xp^T pre
        const int64_t p = pass ? H : I, q = pass ? A : H, n = E * p * q;
        float *lib = pass ? dw_up : dw_down, *var = pass ? dw_up2 : dw_down2;
        const bf16 *x = pass ? xp : act, *y = pass ? pre : dyp;
        const std::string what = pass ? "dw_up" : "dw_down";
        auto f32 = [&](const char* name, auto launcher) {
          using L = decltype(launcher);
          g_wgrad.run({offsets, p, q, x, y, lib, false}, s);
          L::run({offsets, p, q, x, y, var, false}, E, wws, sms, s);
          const double e = rel_error(download(var, n), download(lib, n), n);
          std::printf("AB verify %-37s relative error %.2e\n", (what + " " + name).c_str(), e);
          if (e == 0)
            ab((what + " (fresh): library (A) vs " + name + " (B)").c_str(), pass ? f_up : f_down,
               [&] { g_wgrad.run({offsets, p, q, x, y, lib, false}, s); },
               [&] { L::run({offsets, p, q, x, y, var, false}, E, wws, sms, s); });
        };
        f32("no C, 4 x 128x16", WgradStaged<float, Sub128x16>{});
        f32("no C, 4 x 128x32", WgradStaged<float, Sub128x32>{});
        GroupedWgradArgs a16{offsets, p, q, x, y, nullptr, false}, b16 = a16;
        a16.dw_bf16 = dw16;
        b16.dw_bf16 = dw16b;
        g_wgrad.run(a16, s);
        WgradStaged<gg::Bf16, Sub128x32>::run(b16, E, wws, sms, s);
        if (same((what + " bf16 no C, 4 D").c_str(), dw16, dw16b, n))
          ab((what + " (fresh bf16): library (A) vs no C, 4 x 128x32 (B)").c_str(),
             pass ? f_up : f_down, [&] { g_wgrad.run(a16, s); },
             [&] { WgradStaged<gg::Bf16, Sub128x32>::run(b16, E, wws, sms, s); });
      }
      MOE_CUDA_CHECK(cudaFree(dw16));
      MOE_CUDA_CHECK(cudaFree(dw16b));
      MOE_CUDA_CHECK(cudaFree(wws));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_act_grad_pingpong && o.backward && blocked) {
      // The da GEMM with the activation backward and the row dots (the layer's form): the
      // library's cooperative 128x256 (A) against pingpong 64x256 (B), where one warpgroup's
      // epilogue runs while the other's mainloop does. dpre and the dots checked bit-equal first.
      const auto fused_bw = blocked_forward();
      GroupedGemmActGrad g_grad(E, o.activation);
      void* gws = workspace(ActGradPingpong::workspace_bytes(E, sms));
      ActGradScratch x(M, A, row_dot_parts(I));
      GroupedGemmActGradArgs a{offsets, I, H, dyp, w_down, pre3, pre2, true};
      a.row_dot = x.dots_a, a.ld_row_dot = M;
      GroupedGemmActGradArgs b = a;
      b.dpre = x.dpre, b.row_dot = x.dots_b;
      auto run_a = [&] { g_grad.run(a, s); };
      auto run_b = [&] { ActGradPingpong::run(b, o.activation, E, gws, sms, s); };
      run_a();
      MOE_CUDA_CHECK(cudaMemsetAsync(x.dpre, 0xff, M * A * sizeof(bf16), s));
      MOE_CUDA_CHECK(cudaMemsetAsync(x.dots_b, 0xff, x.dots * sizeof(float), s));
      run_b();
      const bool dots_ok = x.same_dots();
      const bool ok = same("da pingpong dpre", pre2, x.dpre, M * A) && dots_ok;
      std::printf("AB verify %-37s %s\n", "da pingpong row dots", dots_ok ? "equal" : "DIFFERENT");
      if (ok) ab("da + act backward: library (A) vs pingpong 64x256 (B)", f_down, run_a, run_b);
      MOE_CUDA_CHECK(cudaFree(gws));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_split_act && o.backward && blocked && o.activation == Activation::swiglu) {
      // The library's pair (A): the da GEMM with the activation backward and row dots in its
      // epilogue on `s`, dw_down (fresh fp32) beside it on s2 as whole grids. Against (B, S): the
      // plain da GEMM (da stored, deferred store) on every SM, then dw_down on sms - S SMs and the
      // activation backward on the other S (split_act_grad_kernel). B leaves out the row dots.
      const auto fused_bw = blocked_forward();
      SideStream side;
      MOE_CUDA_CHECK(cudaFuncSetAttribute(split_act_grad_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kSplitActClaim));
      void* ws_a = workspace(std::max({gg::Bf16Sm90ActGrad::workspace_bytes(E, sms),
                                       gg::Bf16Sm90<WeightLayout::nk>::workspace_bytes(E, sms)}));
      void* ws_b = workspace(gg::Bf16Sm90WgradFresh::workspace_bytes(E, sms));
      ActGradScratch x(M, A, row_dot_parts(I));
      bf16* da = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&da, M * I * sizeof(bf16)));
      bf16* const dpre_a = pre2;  // scratch: pre3 stays the forward's
      auto dw_down_into = [&](float* out, int n, cudaStream_t st) {
        GroupedWgradArgs w{offsets, I, H, act3, dyp, out, false};
        gg::Bf16Sm90WgradFresh::run(w, E, ws_b, n, st);
      };
      auto run_a = [&] {
        GroupedGemmActGradArgs a{offsets, I, H, dyp, w_down, pre3, dpre_a, true};
        a.row_dot = x.dots_a, a.ld_row_dot = M;
        side.fork(s);
        gg::Bf16Sm90ActGrad::run(a, o.activation, E, ws_a, sms, s);
        dw_down_into(dw_down, sms, side.s2);
        side.join(s);
      };
      auto run_b = [&](int S) {
        gg::Bf16Sm90<WeightLayout::nk>::run({offsets, I, H, dyp, w_down, da}, E, ws_a, sms, s);
        side.fork(s);
        dw_down_into(dw_down2, sms - S, side.s2);
        split_act_grad_kernel<<<S, kSplitActThreads, kSplitActClaim, s>>>(offsets + E, da, pre3,
                                                                          x.dpre, I);
        MOE_CUDA_LAUNCH_CHECK();
        side.join(s);
      };
      for (int S : {8, 16, 24, 32}) {
        for (bf16* p : {dpre_a, x.dpre}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0xff, M * A * 2, s));
        MOE_CUDA_CHECK(cudaMemsetAsync(dw_down2, 0xff, E * I * H * 4, s));
        run_a();
        run_b(S);
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        const bool ok = same("split act: dpre", dpre_a, x.dpre, M * A) &&
                        rel_error(download(dw_down, E * I * H), download(dw_down2, E * I * H),
                                  E * I * H) == 0;
        std::printf("AB verify %-37s %s\n", "split act: dw_down", ok ? "equal" : "DIFFERENT");
        if (!ok) continue;
        const std::string label = "da + dw_down, fp32 dW: library pair (A) vs plain da, then "
                                  "dw_down | act backward on " + std::to_string(S) + " SMs (B)";
        ab(label.c_str(), 2 * f_down, run_a, [&] { run_b(S); });
      }
      // The parts of B alone, for the arithmetic: the plain da GEMM, and the activation backward
      // on S SMs with nothing beside it.
      ab("plain da GEMM (A) vs act backward on 16 SMs alone (B)", f_down,
         [&] { gg::Bf16Sm90<WeightLayout::nk>::run({offsets, I, H, dyp, w_down, da}, E, ws_a,
                                                   sms, s); },
         [&] {
           split_act_grad_kernel<<<16, kSplitActThreads, kSplitActClaim, s>>>(offsets + E, da,
                                                                             pre3, x.dpre, I);
         });
      ab("act backward on 32 SMs alone (A) vs on every SM (B)", f_down,
         [&] {
           split_act_grad_kernel<<<32, kSplitActThreads, kSplitActClaim, s>>>(offsets + E, da,
                                                                             pre3, x.dpre, I);
         },
         [&] {
           split_act_grad_kernel<<<sms, kSplitActThreads, kSplitActClaim, s>>>(offsets + E, da,
                                                                              pre3, x.dpre, I);
         });
      for (void* p : {(void*)da, ws_a, ws_b, ws}) MOE_CUDA_CHECK(cudaFree(p));
      return 0;
    }
    if (o.ab_concurrent && o.backward && blocked) {
      // The backward's two pairs of independent GEMMs, dw_down with da (both read dyp) and dxp
      // with dw_up (both read dpre), one after the other on every SM (A, the library's order)
      // against side by side on two streams with the SMs split (B): each persistent grid takes
      // its share, so one kernel's epilogue bursts fall in the other's mainloops. Fresh dW, fp32
      // and bf16; outputs checked bit-equal first (a tile is one CTA's whatever the grid).
      const auto fused_bw = blocked_forward();
      SideStream side;
      cudaStream_t s2 = side.s2;
      // first on `s` with n1 SMs, second on s2 with sms - n1; n1 = sms: both on s, in order;
      // n1 = 0: both grids whole, on the two streams (the second's CTAs take the SMs the first's
      // leave in its last wave).
      auto pair = [&](int n1, const std::function<void(int, cudaStream_t)>& first,
                      const std::function<void(int, cudaStream_t)>& second) {
        if (n1 >= sms) {
          first(sms, s);
          second(sms, s);
          return;
        }
        side.fork(s);
        first(n1 > 0 ? n1 : sms, s);
        second(n1 > 0 ? sms - n1 : sms, s2);
        side.join(s);
      };
      void* ws_a = workspace(std::max({gg::Bf16Sm90ActGrad::workspace_bytes(E, sms),
                                       gg::Bf16Sm90<WeightLayout::nk>::workspace_bytes(E, sms)}));
      void* ws_b = workspace(std::max(gg::Bf16Sm90WgradFresh::workspace_bytes(E, sms),
                                      gg::Bf16Sm90WgradBf16::workspace_bytes(E, sms)));
      ActGradScratch x(M, A, row_dot_parts(I));
      bf16 *dw16 = nullptr, *dw16b = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&dw16, E * H * A * sizeof(bf16)));
      MOE_CUDA_CHECK(cudaMalloc(&dw16b, E * H * A * sizeof(bf16)));
      bf16* const dpre = pre2;  // scratch: pre3 stays the forward's
      for (bool bf16_dw : {false, true}) {
        const char* dw_kind = bf16_dw ? "bf16 dW" : "fp32 dW";
        // pair 1: da (with the row dots) on `s`, dw_down on s2
        auto da_into = [&](bf16* out, float* dots) {
          return [=](int n, cudaStream_t st) {
            GroupedGemmActGradArgs a{offsets, I, H, dyp, w_down, pre3, out, true};
            a.row_dot = dots, a.ld_row_dot = M;
            gg::Bf16Sm90ActGrad::run(a, o.activation, E, ws_a, n, st);
          };
        };
        auto wgrad_into = [&](const bf16* x, const bf16* y, int64_t p, int64_t q, float* f32,
                              bf16* b16) {
          return [=](int n, cudaStream_t st) {
            GroupedWgradArgs w{offsets, p, q, x, y, bf16_dw ? nullptr : f32, false};
            if (bf16_dw) {
              w.dw_bf16 = b16;
              gg::Bf16Sm90WgradBf16::run(w, E, ws_b, n, st);
            } else {
              gg::Bf16Sm90WgradFresh::run(w, E, ws_b, n, st);
            }
          };
        };
        const auto da_a = da_into(dpre, x.dots_a);
        const auto da_b = da_into(x.dpre, x.dots_b);
        const auto dwd_a = wgrad_into(act3, dyp, I, H, dw_down, dw16);
        const auto dwd_b = wgrad_into(act3, dyp, I, H, dw_down2, dw16b);
        for (bf16* p : {dpre, x.dpre}) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0xff, M * A * 2, s));
        MOE_CUDA_CHECK(cudaMemsetAsync(dw_down2, 0xff, E * I * H * 4, s));
        MOE_CUDA_CHECK(cudaMemsetAsync(dw16b, 0xff, E * I * H * 2, s));
        pair(sms, da_a, dwd_a);
        pair(sms / 2, da_b, dwd_b);
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        bool ok = same("concurrent dpre", dpre, x.dpre, M * A) && x.same_dots();
        ok = ok && (bf16_dw ? same("concurrent dw_down bf16", dw16, dw16b, E * I * H)
                            : rel_error(download(dw_down, E * I * H),
                                        download(dw_down2, E * I * H), E * I * H) == 0);
        std::printf("AB verify %-37s %s\n", "concurrent pair 1", ok ? "equal" : "DIFFERENT");
        if (ok) {
          // Whole grids on two streams, either kernel launched first (run 30); run 29 also split
          // the SMs (1.01-1.24x) and timed the da GEMM first only.
          for (const bool dw_first : {false, true}) {
            const std::string label = std::string("da | dw_down, ") + dw_kind +
                                      ": in order (A) vs whole grids, " +
                                      (dw_first ? "dw_down" : "da") + " launched first (B)";
            ab(label.c_str(), 2 * f_down, [&] { pair(sms, da_a, dwd_a); },
               [&] { dw_first ? pair(0, dwd_b, da_b) : pair(0, da_b, dwd_b); });
          }
        }
        // pair 2: dxp on `s`, dw_up on s2 (both from the dpre just written)
        auto dxp_into = [&](bf16* out) {
          return [=](int n, cudaStream_t st) {
            gg::Bf16Sm90<WeightLayout::nk>::run({offsets, H, A, dpre, w_up_bl, out}, E, ws_a, n,
                                                st);
          };
        };
        const auto dxp_a = dxp_into(dxp2);
        const auto dxp_b = dxp_into(dxp3);
        const auto dwu_a = wgrad_into(xp, dpre, H, A, dw_up, dw16);
        const auto dwu_b = wgrad_into(xp, dpre, H, A, dw_up2, dw16b);
        MOE_CUDA_CHECK(cudaMemsetAsync(dxp3, 0xff, M * H * 2, s));
        MOE_CUDA_CHECK(cudaMemsetAsync(dw_up2, 0xff, E * H * A * 4, s));
        MOE_CUDA_CHECK(cudaMemsetAsync(dw16b, 0xff, E * H * A * 2, s));
        pair(sms, dxp_a, dwu_a);
        pair(sms / 2, dxp_b, dwu_b);
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        ok = same("concurrent dxp", dxp2, dxp3, M * H);
        ok = ok && (bf16_dw ? same("concurrent dw_up bf16", dw16, dw16b, E * H * A)
                            : rel_error(download(dw_up, E * H * A), download(dw_up2, E * H * A),
                                        E * H * A) == 0);
        std::printf("AB verify %-37s %s\n", "concurrent pair 2", ok ? "equal" : "DIFFERENT");
        if (ok) {
          for (const bool dw_first : {false, true}) {
            const std::string label = std::string("dxp | dw_up, ") + dw_kind +
                                      ": in order (A) vs whole grids, " +
                                      (dw_first ? "dw_up" : "dxp") + " launched first (B)";
            ab(label.c_str(), 2 * f_up, [&] { pair(sms, dxp_a, dwu_a); },
               [&] { dw_first ? pair(0, dwu_b, dxp_b) : pair(0, dxp_b, dwu_b); });
          }
        }
      }
      for (void* p : {(void*)dw16, (void*)dw16b, ws_a, ws_b, ws})
        MOE_CUDA_CHECK(cudaFree(p));
      return 0;
    }
    if (o.ab_wgrad_store && o.backward) {
      // Fresh dW, fp32 and bf16: the TMA store after each tile (A) against the library's register
      // stores (B: fp32 at once, bf16 under the next tile's mainloop), each checked bit-equal
      // first (the library's dW poisoned before its run).
      void* wws = workspace(std::max({WgradFreshTma::workspace_bytes(E, sms),
                                      WgradBf16Tma::workspace_bytes(E, sms),
                                      WgradF32AtOnce::workspace_bytes(E, sms)}));
      bf16 *dw16 = nullptr, *dw16b = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&dw16, E * H * A * sizeof(bf16)));
      MOE_CUDA_CHECK(cudaMalloc(&dw16b, E * H * A * sizeof(bf16)));
      for (int pass = 0; pass < 2; ++pass) {  // dw_down = act^T dyp, then dw_up = xp^T pre
        const int64_t p = pass ? H : I, q = pass ? A : H, n = E * p * q;
        float *tma = pass ? dw_up : dw_down, *lib = pass ? dw_up2 : dw_down2;
        const bf16 *x = pass ? xp : act, *y = pass ? pre : dyp;
        const std::string what = pass ? "dw_up" : "dw_down";
        const GroupedWgradArgs a32{offsets, p, q, x, y, tma, false};
        const GroupedWgradArgs b32{offsets, p, q, x, y, lib, false};
        WgradFreshTma::run(a32, E, wws, sms, s);
        MOE_CUDA_CHECK(cudaMemsetAsync(lib, 0xff, n * sizeof(float), s));
        g_wgrad.run(b32, s);
        const std::vector<float> want = download(tma, n), got = download(lib, n);
        const bool same_bits = std::memcmp(want.data(), got.data(), n * sizeof(float)) == 0;
        std::printf("AB verify %-37s %s\n", (what + " fp32 registers").c_str(),
                    same_bits ? "same bits" : "DIFFERENT");
        if (same_bits)
          ab((what + " (fresh fp32): TMA store 2x1 (A) vs library, registers 1x1 (B)").c_str(),
             pass ? f_up : f_down, [&] { WgradFreshTma::run(a32, E, wws, sms, s); },
             [&] { g_wgrad.run(b32, s); });
        // The whole tile at once from registers, against the library's row half 1 under the next
        // tile's mainloop (its dW in got).
        const GroupedWgradArgs h32{offsets, p, q, x, y, tma, false};
        MOE_CUDA_CHECK(cudaMemsetAsync(tma, 0xff, n * sizeof(float), s));
        WgradF32AtOnce::run(h32, E, wws, sms, s);
        const std::vector<float> once = download(tma, n);
        const bool once_same = std::memcmp(once.data(), got.data(), n * sizeof(float)) == 0;
        std::printf("AB verify %-37s %s\n", (what + " fp32 at once").c_str(),
                    once_same ? "same bits" : "DIFFERENT");
        if (once_same)
          ab((what + " (fresh fp32): at once (A) vs library, row half 1 deferred (B)").c_str(),
             pass ? f_up : f_down, [&] { WgradF32AtOnce::run(h32, E, wws, sms, s); },
             [&] { g_wgrad.run(b32, s); });
        GroupedWgradArgs a16{offsets, p, q, x, y, nullptr, false}, b16 = a16;
        a16.dw_bf16 = dw16;
        b16.dw_bf16 = dw16b;
        WgradBf16Tma::run(a16, E, wws, sms, s);
        MOE_CUDA_CHECK(cudaMemsetAsync(dw16b, 0xff, n * sizeof(bf16), s));
        g_wgrad.run(b16, s);
        if (same((what + " bf16 deferred store").c_str(), dw16, dw16b, n))
          ab((what + " (fresh bf16): TMA store 2x1 (A) vs library, deferred 1x1 (B)").c_str(),
             pass ? f_up : f_down, [&] { WgradBf16Tma::run(a16, E, wws, sms, s); },
             [&] { g_wgrad.run(b16, s); });
      }
      MOE_CUDA_CHECK(cudaFree(dw16));
      MOE_CUDA_CHECK(cudaFree(dw16b));
      MOE_CUDA_CHECK(cudaFree(wws));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_deferred_store) {
      // The down-projection (B (K, N)) and dxp (B (N, K)): the TMA store after each tile (no C,
      // 4 D buffers: the library's before run 21) against the library's store under the next
      // tile's mainloop, outputs checked equal first (the library's D poisoned before its run).
      GroupedGemm g_nk(E, WeightLayout::nk);
      void* ews = workspace(std::max(GemmStaged<WeightLayout::kn, 4>::workspace_bytes(E, sms),
                                     GemmStaged<WeightLayout::nk, 4>::workspace_bytes(E, sms)));
      const GroupedGemmArgs down_a{offsets, H, I, act, w_down, yp};
      const GroupedGemmArgs down_b{offsets, H, I, act, w_down, yp2};
      auto staged_down = [&] {
        GemmStaged<WeightLayout::kn, 4>::run(down_a, false, E, ews, sms, s);
      };
      staged_down();
      MOE_CUDA_CHECK(cudaMemsetAsync(yp2, 0xff, M * H * sizeof(bf16), s));
      g_down.run(down_b, s);
      if (same("down, deferred store", yp, yp2, M * H))
        ab("down: TMA store (A) vs library, deferred store (B)", f_down, staged_down,
           [&] { g_down.run(down_b, s); });
      if (o.backward) {
        const GroupedGemmArgs dxp_a{offsets, H, A, pre, w_up, dxp2};
        const GroupedGemmArgs dxp_b{offsets, H, A, pre, w_up, dxp3};
        auto staged_dxp = [&] {
          GemmStaged<WeightLayout::nk, 4>::run(dxp_a, true, E, ews, sms, s);
        };
        staged_dxp();
        MOE_CUDA_CHECK(cudaMemsetAsync(dxp3, 0xff, M * H * sizeof(bf16), s));
        g_nk.run(dxp_b, s);
        if (same("dxp, deferred store", dxp2, dxp3, M * H))
          ab("dxp: TMA store (A) vs library, deferred store (B)", f_up, staged_dxp,
             [&] { g_nk.run(dxp_b, s); });
      }
      MOE_CUDA_CHECK(cudaFree(ews));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (o.ab_epilogue) {
      // The down-projection (B (K, N)) and dxp (B (N, K)): the library's epilogue against no C
      // and 4 / 8 D buffers, outputs checked equal first.
      GroupedGemm g_nk(E, WeightLayout::nk);
      void* ews = workspace(std::max({GemmStaged<WeightLayout::kn, 8>::workspace_bytes(E, sms),
                                      GemmStaged<WeightLayout::nk, 8>::workspace_bytes(E, sms)}));
      auto variant = [&](const char* label, double flop, const std::function<void()>& lib,
                         const std::function<void()>& var, const bf16* x, const bf16* y,
                         int64_t n) {
        lib();
        var();
        if (same(label, x, y, n)) ab(label, flop, lib, var);
      };
      variant("down: library (A) vs no C, 4 D buffers (B)", f_down,
              [&] { g_down.run({offsets, H, I, act, w_down, yp}, s); },
              [&] { GemmStaged<WeightLayout::kn, 4>::run({offsets, H, I, act, w_down, yp2}, false, E, ews, sms, s); },
              yp, yp2, M * H);
      variant("down: library (A) vs no C, 8 D buffers (B)", f_down,
              [&] { g_down.run({offsets, H, I, act, w_down, yp}, s); },
              [&] { GemmStaged<WeightLayout::kn, 8>::run({offsets, H, I, act, w_down, yp2}, false, E, ews, sms, s); },
              yp, yp2, M * H);
      if (o.backward) {
        variant("dxp: library (A) vs no C, 4 D buffers (B)", f_up,
                [&] { g_nk.run({offsets, H, A, pre, w_up, dxp2}, s); },
                [&] { GemmStaged<WeightLayout::nk, 4>::run({offsets, H, A, pre, w_up, dxp3}, true, E, ews, sms, s); },
                dxp2, dxp3, M * H);
        variant("dxp: library (A) vs no C, 8 D buffers (B)", f_up,
                [&] { g_nk.run({offsets, H, A, pre, w_up, dxp2}, s); },
                [&] { GemmStaged<WeightLayout::nk, 8>::run({offsets, H, A, pre, w_up, dxp3}, true, E, ews, sms, s); },
                dxp2, dxp3, M * H);
      }
      MOE_CUDA_CHECK(cudaFree(ews));
      MOE_CUDA_CHECK(cudaFree(ws));
      return 0;
    }
    if (!o.ab_act_grad && !o.ab_wgrad) {
      // down-projection: the library's (1x1 since run 8) against 2x1 and against a 128x192 tile
      g_down.run({offsets, H, I, act, w_down, yp}, s);
      GemmCoop128x256Cluster2x1::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s);
      if (same("down 2x1", yp, yp2, M * H))
        ab("down: library 1x1 (A) vs 2x1 (B)", f_down, [&] { g_down.run({offsets, H, I, act, w_down, yp}, s); },
           [&] { GemmCoop128x256Cluster2x1::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s); });
      GemmCoop128x192::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s);
      if (same("down 128x192", yp, yp2, M * H))
        ab("down: 128x256 (A) vs 128x192 (B)", f_down,
           [&] { g_down.run({offsets, H, I, act, w_down, yp}, s); },
           [&] { GemmCoop128x192::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s); });
      // plain up-projection
      g_up.run({offsets, A, H, xp, w_up, pre}, s);
      GemmCoop128x256Cluster2x1::run({offsets, A, H, xp, w_up, pre2}, false, E, ws, sms, s);
      if (same("up 2x1", pre, pre2, M * A))
        ab("up: library 1x1 (A) vs 2x1 (B)", f_up, [&] { g_up.run({offsets, A, H, xp, w_up, pre}, s); },
           [&] { GemmCoop128x256Cluster2x1::run({offsets, A, H, xp, w_up, pre2}, false, E, ws, sms, s); });
      // fused up-projection, act only (the inference layer's)
      g_act.run({offsets, A, H, xp, w_up_il, nullptr, act2}, s);
      ActCluster2x1::run({offsets, A, H, xp, w_up_il, nullptr, act3}, o.activation, E, ws, sms, s);
      if (same("fused up 2x1", act2, act3, M * I))
        ab("fused up (act only): library 1x1 (A) vs 2x1 (B)", f_up,
           [&] { g_act.run({offsets, A, H, xp, w_up_il, nullptr, act2}, s); },
           [&] { ActCluster2x1::run({offsets, A, H, xp, w_up_il, nullptr, act3}, o.activation, E, ws, sms, s); });
      if (o.backward) {  // the weight gradients, written fresh (beta = 0, as a training step)
        void* wws = workspace(WgradCluster1x1::workspace_bytes(E, sms));
        for (int pass = 0; pass < 2; ++pass) {  // dw_down = act^T dyp, then dw_up = xp^T pre
          const int64_t p = pass ? H : I, q = pass ? A : H, n = E * p * q;
          float *lib = pass ? dw_up : dw_down, *var = pass ? dw_up2 : dw_down2;
          const bf16 *x = pass ? xp : act, *y = pass ? pre : dyp;
          g_wgrad.run({offsets, p, q, x, y, lib, false}, s);
          WgradCluster1x1::run({offsets, p, q, x, y, var, false}, E, wws, sms, s);
          const double e = rel_error(download(var, n), download(lib, n), n);
          std::printf("AB verify %-37s relative error %.2e\n", pass ? "dw_up 1x1" : "dw_down 1x1", e);
          if (e == 0)
            ab(pass ? "dw_up (fresh): library 2x1 (A) vs 1x1 (B)"
                    : "dw_down (fresh): library 2x1 (A) vs 1x1 (B)",
               pass ? f_up : f_down, [&] { g_wgrad.run({offsets, p, q, x, y, lib, false}, s); },
               [&] { WgradCluster1x1::run({offsets, p, q, x, y, var, false}, E, wws, sms, s); });
        }
        MOE_CUDA_CHECK(cudaFree(wws));
      }
      if (o.backward) {  // the backward's (N, K) GEMMs
        GroupedGemm g_nk(E, WeightLayout::nk);
        g_nk.run({offsets, I, H, dyp, w_down, act2}, s);
        NkCluster2x1::run({offsets, I, H, dyp, w_down, act3}, true, E, ws, sms, s);
        if (same("da 2x1", act2, act3, M * I))
          ab("da: library 1x1 (A) vs 2x1 (B)", f_down, [&] { g_nk.run({offsets, I, H, dyp, w_down, act2}, s); },
             [&] { NkCluster2x1::run({offsets, I, H, dyp, w_down, act3}, true, E, ws, sms, s); });
        g_nk.run({offsets, H, A, pre, w_up, dxp2}, s);
        NkCluster2x1::run({offsets, H, A, pre, w_up, dxp3}, true, E, ws, sms, s);
        if (same("dxp 2x1", dxp2, dxp3, M * H))
          ab("dxp: library 1x1 (A) vs 2x1 (B)", f_up, [&] { g_nk.run({offsets, H, A, pre, w_up, dxp2}, s); },
             [&] { NkCluster2x1::run({offsets, H, A, pre, w_up, dxp3}, true, E, ws, sms, s); });
      }
    }
    if (o.backward && o.ab_wgrad) {
      // The weight gradients written fresh, as a training step writes them: the library's
      // cooperative 128x256 with no C in its epilogue (A, since run 14) against a pingpong 64x256
      // (B: each warpgroup's epilogue under the other's mainloop), a 128x16 epilogue tile and the
      // accumulating kernel with beta = 0 (the library's before run 14); and fp32 dW (A) against
      // bf16 dW (B), both the library's.
      void* wws = workspace(std::max({WgradPingpong64x256::workspace_bytes(E, sms),
                                      WgradEpi16::workspace_bytes(E, sms),
                                      WgradAccumulating::workspace_bytes(E, sms)}));
      bf16* dw16 = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&dw16, E * H * A * sizeof(bf16)));
      for (int pass = 0; pass < 2; ++pass) {  // dw_down = act^T dyp, then dw_up = xp^T pre
        const int64_t p = pass ? H : I, q = pass ? A : H, n = E * p * q;
        float *lib = pass ? dw_up : dw_down, *var = pass ? dw_up2 : dw_down2;
        const bf16 *x = pass ? xp : act, *y = pass ? pre : dyp;
        const char* what = pass ? "dw_up" : "dw_down";
        // Variant L (a launcher type) against the library's fresh dW: checked equal, then timed.
        auto variant = [&](const char* name, const char* label, auto launcher) {
          using L = decltype(launcher);
          g_wgrad.run({offsets, p, q, x, y, lib, false}, s);
          L::run({offsets, p, q, x, y, var, false}, E, wws, sms, s);
          const double e = rel_error(download(var, n), download(lib, n), n);
          std::printf("AB verify %-37s relative error %.2e\n",
                      (std::string(what) + " " + name).c_str(), e);
          if (e == 0)
            ab((std::string(what) + " (fresh): " + label).c_str(), pass ? f_up : f_down,
               [&] { g_wgrad.run({offsets, p, q, x, y, lib, false}, s); },
               [&] { L::run({offsets, p, q, x, y, var, false}, E, wws, sms, s); });
        };
        variant("pingpong 64x256", "library (A) vs pingpong 64x256 (B)", WgradPingpong64x256{});
        variant("128x16 epilogue tile", "library (A) vs 128x16 epilogue tile (B)", WgradEpi16{});
        variant("accumulating kernel", "library, no C (A) vs accumulating, beta 0 (B)",
                WgradAccumulating{});
        GroupedWgradArgs a16{offsets, p, q, x, y, nullptr, false};
        a16.dw_bf16 = dw16;
        ab((std::string(what) + " (fresh): fp32 dW (A) vs bf16 dW (B)").c_str(),
           pass ? f_up : f_down, [&] { g_wgrad.run({offsets, p, q, x, y, lib, false}, s); },
           [&] { g_wgrad.run(a16, s); });
      }
      MOE_CUDA_CHECK(cudaFree(dw16));
      MOE_CUDA_CHECK(cudaFree(wws));
    }
    if (o.backward && blocked && o.ab_act_grad) {
      // The activation backward in the da GEMM's epilogue (grouped_fused) against the plain da
      // GEMM and the elementwise pass (grouped), on the layer's blocked w_up: the da GEMM alone
      // first (what the epilogue costs), then the whole experts backward with fresh dW.
      ExpertsWorkspace unfused_bw(es_blocked, ExpertsBackend::grouped, true);
      ExpertsWorkspace fused_bw(es_blocked, ExpertsBackend::grouped_fused, true);
      ExpertsForwardArgs f = fc;
      f.w_up = w_up_bl;
      experts_forward(fused_bw, f, s);  // pre3, act3 in the blocked order
      GroupedGemm g_nk(E, WeightLayout::nk);
      GroupedGemmActGrad g_grad(E, o.activation);
      bf16* dpre = pre2;  // scratch: pre3 stays the forward's
      ab("da (A) vs da + activation backward (B)", f_down,
         [&] { g_nk.run({offsets, I, H, dyp, w_down, act2}, s); },
         [&] { g_grad.run({offsets, I, H, dyp, w_down, pre3, dpre, true}, s); });
      {
        // The library's da GEMM (the activation backward after each tile's mainloop) against the
        // same under the next tile's mainloop in 8 blocks and in 16, without and with the
        // router-weight row dots, checked equal first.
        void* gws = workspace(std::max(ActGradDeferred8::workspace_bytes(E, sms),
                                       ActGradDeferred16::workspace_bytes(E, sms)));
        const int64_t parts = row_dot_parts(I);
        bf16* dpre_b = nullptr;
        float *dots_a = nullptr, *dots_b = nullptr;
        MOE_CUDA_CHECK(cudaMalloc(&dpre_b, M * A * sizeof(bf16)));
        MOE_CUDA_CHECK(cudaMalloc(&dots_a, parts * M * sizeof(float)));
        MOE_CUDA_CHECK(cudaMalloc(&dots_b, parts * M * sizeof(float)));
        for (int form = 0; form < 4; ++form) {
          const bool with_dot = form & 1, eight = form & 2;
          GroupedGemmActGradArgs a{offsets, I, H, dyp, w_down, pre3, dpre, true};
          if (with_dot) a.row_dot = dots_a, a.ld_row_dot = M;
          GroupedGemmActGradArgs b = a;
          b.dpre = dpre_b;
          if (with_dot) b.row_dot = dots_b;
          auto run_a = [&] { g_grad.run(a, s); };
          auto run_b = [&] {
            if (eight) ActGradDeferred8::run(b, o.activation, E, gws, sms, s);
            else ActGradDeferred16::run(b, o.activation, E, gws, sms, s);
          };
          MOE_CUDA_CHECK(cudaMemsetAsync(dpre_b, 0xff, M * A * sizeof(bf16), s));
          MOE_CUDA_CHECK(cudaMemsetAsync(dots_b, 0xff, parts * M * sizeof(float), s));
          run_a();
          run_b();
          const std::string what = with_dot ? "da + act backward (dpre, row dots)"
                                            : "da + act backward (dpre)";
          bool ok = same((what + ", deferred dpre").c_str(), dpre, dpre_b, M * A);
          if (with_dot) {
            const double e = rel_error(download(dots_a, parts * M), download(dots_b, parts * M),
                                       parts * M);
            std::printf("AB verify %-37s relative error %.2e\n", "deferred row dots", e);
            ok = ok && e == 0;
          }
          const std::string vs = eight ? ": library (A) vs deferred, 8 blocks (B)"
                                       : ": library (A) vs deferred, 16 blocks (B)";
          if (ok) ab((what + vs).c_str(), f_down, run_a, run_b);
        }
        MOE_CUDA_CHECK(cudaFree(dots_b));
        MOE_CUDA_CHECK(cudaFree(dots_a));
        MOE_CUDA_CHECK(cudaFree(dpre_b));
        MOE_CUDA_CHECK(cudaFree(gws));
      }
      ExpertsBackwardArgs bu{offsets, w_up_bl, w_down, xp, pre3, act3, dyp, dxp2, dw_up, dw_down};
      ExpertsBackwardArgs bf{offsets, w_up_bl, w_down, xp, pre3, act3, dyp, dxp3, dw_up2, dw_down2};
      bu.accumulate = bf.accumulate = false;
      experts_backward(unfused_bw, bu, s);
      experts_backward(fused_bw, bf, s);
      const bool equal = same("backward dxp fused", dxp2, dxp3, M * H) &&
                         rel_error(download(dw_up, E * H * A), download(dw_up2, E * H * A),
                                   E * H * A) == 0;
      std::printf("AB verify %-37s %s\n", "backward dw_up fused", equal ? "equal" : "DIFFERENT");
      if (equal)
        ab("experts backward: grouped (A) vs grouped_fused (B)", 2 * f_fwd,
           [&] { experts_backward(unfused_bw, bu, s); }, [&] { experts_backward(fused_bw, bf, s); });
    }
    MOE_CUDA_CHECK(cudaFree(ws));
    return 0;
  }
  {
    const int64_t bytes = int64_t{1} << 30;
    void *src, *dst;
    MOE_CUDA_CHECK(cudaMalloc(&src, bytes));
    MOE_CUDA_CHECK(cudaMalloc(&dst, bytes));
    MOE_CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, s));
    const double ms = median_ms(o.reps, s, [&] {
      MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
    });
    std::printf("%-48s %9.3f %9s  %.0f GB/s (read + write)\n", "D0 copy 1 GiB", ms, "-",
                2.0 * bytes / (ms * 1e6));
    MOE_CUDA_CHECK(cudaFree(src));
    MOE_CUDA_CHECK(cudaFree(dst));
  }
  row("G1 grouped up   (M x A x H)", median_ms(o.reps, s, [&] {
        g_up.run({offsets, A, H, xp, w_up, pre}, s);
      }), f_up);
  row("G3 grouped up + activation epilogue (pre, act)", median_ms(o.reps, s, [&] {
        g_act.run({offsets, A, H, xp, w_up_il, pre3, act3}, s);
      }), f_up);
  row("G3n grouped up + activation epilogue (act only)", median_ms(o.reps, s, [&] {
        g_act.run({offsets, A, H, xp, w_up_il, nullptr, act3}, s);
      }), f_up);
  if (blocked)
    row("G3b grouped up + activation epilogue, blocked w_up (act only)", median_ms(o.reps, s, [&] {
          GroupedGemmActArgs b{offsets, A, H, xp, w_up_bl, nullptr, act3};
          b.blocked = true;
          g_act.run(b, s);
        }), f_up);
  row("G2 grouped down (M x H x I)", median_ms(o.reps, s, [&] {
        g_down.run({offsets, H, I, act, w_down, yp}, s);
      }), f_down);
  if (o.backward) {
    row("W1 grouped dw_down += act^T dyp (K = segment)", median_ms(o.reps, s, [&] {
          g_wgrad.run({offsets, I, H, act, dyp, dw_down}, s);
        }), f_down);
    row("W2 grouped dw_up += xp^T dpre (K = segment)", median_ms(o.reps, s, [&] {
          g_wgrad.run({offsets, H, A, xp, pre, dw_up}, s);  // pre stands in for dpre
        }), f_up);
    row("W1o grouped dw_down = act^T dyp (overwrite)", median_ms(o.reps, s, [&] {
          g_wgrad.run({offsets, I, H, act, dyp, dw_down, false}, s);
        }), f_down);
    row("W2o grouped dw_up = xp^T dpre (overwrite)", median_ms(o.reps, s, [&] {
          g_wgrad.run({offsets, H, A, xp, pre, dw_up, false}, s);
        }), f_up);
  }
  // The forward's two GEMMs back to back: F1 - P2 is what the activation pass costs in place.
  row("P3 up twice", median_ms(o.reps, s, [&] {
        g_up.run({offsets, A, H, xp, w_up, pre}, s);
        g_up.run({offsets, A, H, xp, w_up, pre}, s);
      }), 2 * f_up);
  row("P4 down twice", median_ms(o.reps, s, [&] {
        g_down.run({offsets, H, I, act, w_down, yp}, s);
        g_down.run({offsets, H, I, act, w_down, yp}, s);
      }), 2 * f_down);
  row("P2 up + down (no activation)", median_ms(o.reps, s, [&] {
        g_up.run({offsets, A, H, xp, w_up, pre}, s);
        g_down.run({offsets, H, I, act, w_down, yp}, s);
      }), f_fwd);
  {
    // Lab-only configs: verified against the library kernel on the same inputs, timed if equal.
    const int sms = prop.multiProcessorCount;
    auto workspace = [&](size_t bytes) {
      void* p = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
      return p;
    };
    void* ws_act = workspace(ActPingpong::workspace_bytes(E, sms));
    ActPingpong::run({offsets, A, H, xp, w_up_il, pre3, act3}, o.activation, E, ws_act, sms, s);
    g_act.run({offsets, A, H, xp, w_up_il, pre2, act2}, s);
    const double e_act = rel_error(download(act3, M * I), download(act2, M * I), M * I);
    std::printf("%-48s relative error vs library %.2e\n", "X5 verify", e_act);
    if (e_act < 1e-2)
      row("X5 fused up, pingpong 64x256 (pre, act)", median_ms(o.reps, s, [&] {
            ActPingpong::run({offsets, A, H, xp, w_up_il, pre3, act3}, o.activation, E, ws_act,
                             sms, s);
          }), f_up);
    MOE_CUDA_CHECK(cudaFree(ws_act));
    {  // the fused up-projection on the 2x1 cluster, against G3 (pre, act) and G3n (act only)
      void* ws = workspace(ActCluster2x1::workspace_bytes(E, sms));
      ActCluster2x1::run({offsets, A, H, xp, w_up_il, pre3, act3}, o.activation, E, ws, sms, s);
      g_act.run({offsets, A, H, xp, w_up_il, pre2, act2}, s);
      const double err = rel_error(download(act3, M * I), download(act2, M * I), M * I);
      std::printf("%-48s relative error vs library %.2e\n", "X18 verify", err);
      if (err < 1e-2) {
        row("X18 fused up, cluster 2x1 (pre, act)", median_ms(o.reps, s, [&] {
              ActCluster2x1::run({offsets, A, H, xp, w_up_il, pre3, act3}, o.activation, E, ws,
                                 sms, s);
            }), f_up);
        row("X18n fused up, cluster 2x1 (act only)", median_ms(o.reps, s, [&] {
              ActCluster2x1::run({offsets, A, H, xp, w_up_il, nullptr, act3}, o.activation, E,
                                 ws, sms, s);
            }), f_up);
      }
      MOE_CUDA_CHECK(cudaFree(ws));
    }
    // Other tiles for the plain up and down GEMMs, each checked bitwise against the library's.
    auto gemm_variant = [&](const char* label, auto launcher) {
      using L = decltype(launcher);
      void* ws = workspace(L::workspace_bytes(E, sms));
      g_down.run({offsets, H, I, act, w_down, yp}, s);
      L::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s);
      g_up.run({offsets, A, H, xp, w_up, pre}, s);
      L::run({offsets, A, H, xp, w_up, pre2}, false, E, ws, sms, s);
      const double err = std::max(rel_error(download(yp2, M * H), download(yp, M * H), M * H),
                                  rel_error(download(pre2, M * A), download(pre, M * A), M * A));
      std::printf("%-48s relative error vs library %.2e\n", label, err);
      if (err < 1e-2) {
        row((std::string(label) + " down").c_str(), median_ms(o.reps, s, [&] {
              L::run({offsets, H, I, act, w_down, yp2}, false, E, ws, sms, s);
            }), f_down);
        row((std::string(label) + " up").c_str(), median_ms(o.reps, s, [&] {
              L::run({offsets, A, H, xp, w_up, pre2}, false, E, ws, sms, s);
            }), f_up);
      }
      MOE_CUDA_CHECK(cudaFree(ws));
    };
    gemm_variant("X6 cooperative 256x128", GemmCoop256x128{});
    gemm_variant("X7 cooperative 128x128", GemmCoop128x128{});
    gemm_variant("X8 pingpong 128x128", GemmPingpong128x128{});
    gemm_variant("X11 pingpong 64x256", GemmPingpong64x256{});
    gemm_variant("X12 cooperative 128x256 cluster 2x1", GemmCoop128x256Cluster2x1{});
    gemm_variant("X13 cooperative 128x256 cluster 1x2", GemmCoop128x256Cluster1x2{});
    if (o.backward) {
      auto wgrad_variant = [&](const char* label_down, const char* label_up, auto launcher) {
        using L = decltype(launcher);
        void* ws = workspace(L::workspace_bytes(E, sms));
        double err = 0;
        for (int pass = 0; pass < 2; ++pass) {  // dw_down, then dw_up
          const int64_t p = pass ? H : I, q = pass ? A : H, n = E * p * q;
          float *lib = pass ? dw_up : dw_down, *var = pass ? dw_up2 : dw_down2;
          const bf16 *x = pass ? xp : act, *y = pass ? pre : dyp;
          MOE_CUDA_CHECK(cudaMemsetAsync(lib, 0, n * 4, s));
          MOE_CUDA_CHECK(cudaMemsetAsync(var, 0, n * 4, s));
          g_wgrad.run({offsets, p, q, x, y, lib}, s);
          L::run({offsets, p, q, x, y, var}, E, ws, sms, s);
          err = std::max(err, rel_error(download(var, n), download(lib, n), n));
        }
        std::printf("%-48s relative error vs library %.2e\n", label_down, err);
        if (err < 1e-2) {
          row(label_down, median_ms(o.reps, s, [&] {
                L::run({offsets, I, H, act, dyp, dw_down2}, E, ws, sms, s);
              }), f_down);
          row(label_up, median_ms(o.reps, s, [&] {
                L::run({offsets, H, A, xp, pre, dw_up2}, E, ws, sms, s);
              }), f_up);
          // and overwriting (beta = 0), against W1o / W2o
          row((std::string(label_down) + " (overwrite)").c_str(), median_ms(o.reps, s, [&] {
                L::run({offsets, I, H, act, dyp, dw_down2, false}, E, ws, sms, s);
              }), f_down);
          row((std::string(label_up) + " (overwrite)").c_str(), median_ms(o.reps, s, [&] {
                L::run({offsets, H, A, xp, pre, dw_up2, false}, E, ws, sms, s);
              }), f_up);
        }
        MOE_CUDA_CHECK(cudaFree(ws));
      };
      wgrad_variant("X1 wgrad dw_down, 128x16 epilogue tile", "X2 wgrad dw_up, 128x16 epilogue tile",
                    WgradEpi16{});
      wgrad_variant("X3 wgrad dw_down, pingpong 128x128", "X4 wgrad dw_up, pingpong 128x128",
                    WgradPingpong{});
      wgrad_variant("X9 wgrad dw_down, pingpong 64x256", "X10 wgrad dw_up, pingpong 64x256",
                    WgradPingpong64x256{});
      wgrad_variant("X16 wgrad dw_down, cluster 1x1", "X17 wgrad dw_up, cluster 1x1",
                    WgradCluster1x1{});
      // da = dyp w_down^T and dxp = dpre w_up^T (pre stands in for dpre): the library's (N, K)
      // GEMM (N1 / N2, 1x1 since run 8) against the same tile on a 2x1 cluster (X14 / X15).
      {
        GroupedGemm g_nk(E, WeightLayout::nk);
        void* ws = workspace(NkCluster2x1::workspace_bytes(E, sms));
        g_nk.run({offsets, I, H, dyp, w_down, act2}, s);
        NkCluster2x1::run({offsets, I, H, dyp, w_down, act3}, true, E, ws, sms, s);
        g_nk.run({offsets, H, A, pre, w_up, dxp2}, s);
        NkCluster2x1::run({offsets, H, A, pre, w_up, dxp3}, true, E, ws, sms, s);
        const double err =
            std::max(rel_error(download(act3, M * I), download(act2, M * I), M * I),
                     rel_error(download(dxp3, M * H), download(dxp2, M * H), M * H));
        std::printf("%-48s relative error vs library %.2e\n", "X14/X15 (N, K) cluster 2x1", err);
        row("N1 grouped da = dyp w_down^T (library)", median_ms(o.reps, s, [&] {
              g_nk.run({offsets, I, H, dyp, w_down, act2}, s);
            }), f_down);
        row("N2 grouped dxp = dpre w_up^T (library)", median_ms(o.reps, s, [&] {
              g_nk.run({offsets, H, A, pre, w_up, dxp2}, s);
            }), f_up);
        if (err < 1e-2) {
          row("X14 da, cluster 2x1", median_ms(o.reps, s, [&] {
                NkCluster2x1::run({offsets, I, H, dyp, w_down, act3}, true, E, ws, sms, s);
              }), f_down);
          row("X15 dxp, cluster 2x1", median_ms(o.reps, s, [&] {
                NkCluster2x1::run({offsets, H, A, pre, w_up, dxp3}, true, E, ws, sms, s);
              }), f_up);
        }
        MOE_CUDA_CHECK(cudaFree(ws));
      }
    }
  }
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
  if (o.backward) {
    row("L3 cuBLAS loop dw_down", median_ms(o.reps, s, [&] {
          for (int64_t e = 0; e < E; ++e)
            if (off[e + 1] > off[e])
              cublas_tn_accumulate(h, off[e + 1] - off[e], I, H, act + off[e] * I,
                                   dyp + off[e] * H, dw_down2 + e * I * H);
        }), f_down);
    row("L4 cuBLAS loop dw_up", median_ms(o.reps, s, [&] {
          for (int64_t e = 0; e < E; ++e)
            if (off[e + 1] > off[e])
              cublas_tn_accumulate(h, off[e + 1] - off[e], H, A, xp + off[e] * H,
                                   pre + off[e] * A, dw_up2 + e * H * A);
        }), f_up);
  }
  if (cgrouped_ok) {
    const CublasGrouped c_up(off, A, H, xp, w_up, pre2), c_down(off, H, I, act, w_down, yp2);
    row("C1 cublasGemmGroupedBatchedEx up", median_ms(o.reps, s, [&] { c_up.run(h); }), f_up);
    row("C2 cublasGemmGroupedBatchedEx down", median_ms(o.reps, s, [&] { c_down.run(h); }),
        f_down);
  }
  if (padded) {
    const int64_t C = ps.capacity;
    const float one = 1.f, zero = 0.f;
    row("S1 cublasGemmStridedBatchedEx up", median_ms(o.reps, s, [&] {
          MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              h, CUBLAS_OP_N, CUBLAS_OP_N, int(A), int(C), int(H), &one, w_up, CUDA_R_16BF,
              int(A), H * A, xp, CUDA_R_16BF, int(H), C * H, &zero, pre2, CUDA_R_16BF, int(A),
              C * A, int(E), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }), f_up);
    row("S2 cublasGemmStridedBatchedEx down", median_ms(o.reps, s, [&] {
          MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              h, CUBLAS_OP_N, CUBLAS_OP_N, int(H), int(C), int(I), &one, w_down, CUDA_R_16BF,
              int(H), I * H, act, CUDA_R_16BF, int(I), C * I, &zero, yp2, CUDA_R_16BF, int(H),
              C * H, int(E), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }), f_down);
  }
  row("D1 dense-equivalent up (one cuBLAS GEMM)", median_ms(o.reps, s, [&] {
        cublas_rows(h, M, A, H, xp, w_up, pre2);
      }), f_up);
  row("D2 dense-equivalent down", median_ms(o.reps, s, [&] {
        cublas_rows(h, M, H, I, act, w_down, yp2);
      }), f_down);
  if (o.backward) {
    row("D3 dense-equivalent dw_down (I x H x M)", median_ms(o.reps, s, [&] {
          cublas_tn_accumulate(h, M, I, H, act, dyp, dw_down2);
        }), f_down);
    row("D4 dense-equivalent dw_up (H x A x M)", median_ms(o.reps, s, [&] {
          cublas_tn_accumulate(h, M, H, A, xp, pre, dw_up2);
        }), f_up);
  }
  row("F1 experts_forward grouped", median_ms(o.reps, s, [&] { experts_forward(grouped, fa, s); }),
      f_fwd);
  row("F3 experts_forward grouped_fused", median_ms(o.reps, s, [&] { experts_forward(fused, fc, s); }),
      f_fwd);
  row("F3n experts_forward grouped_fused, no pre",
      median_ms(o.reps, s, [&] { experts_forward(fused, fc_no_pre, s); }), f_fwd);
  if (blocked)
    row("F3b experts_forward grouped_fused, blocked w_up, no pre",
        median_ms(o.reps, s, [&] { experts_forward(*fused_bl, fc_blocked, s); }), f_fwd);
  row("F2 experts_forward cublas_loop_host_offsets",
      median_ms(o.reps, s, [&] { experts_forward(loop, fb, s); }), f_fwd);
  if (cgrouped_ok)
    row("F4 experts_forward cublas_grouped_host_offsets",
        median_ms(o.reps, s, [&] { experts_forward(cgrouped, fb, s); }), f_fwd);
  if (strided)
    row("F5 experts_forward cublas_strided_padded",
        median_ms(o.reps, s, [&] { experts_forward(*strided, fb, s); }), f_fwd);
  if (o.backward) {
    row("B1 experts_backward grouped (no host sync)",
        median_ms(o.reps, s, [&] { experts_backward(grouped, ba, s); }), 2 * f_fwd);
    ExpertsBackwardArgs ba_overwrite = ba;
    ba_overwrite.accumulate = false;
    row("B1o experts_backward grouped, weight gradients overwritten",
        median_ms(o.reps, s, [&] { experts_backward(grouped, ba_overwrite, s); }), 2 * f_fwd);
    row("B2 experts_backward cublas_loop_host_offsets",
        median_ms(o.reps, s, [&] { experts_backward(loop, bb, s); }), 2 * f_fwd);
    if (cgrouped_ok)
      row("B4 experts_backward cublas_grouped_host_offsets",
          median_ms(o.reps, s, [&] { experts_backward(cgrouped, bb, s); }), 2 * f_fwd);
    if (strided)
      row("B5 experts_backward cublas_strided_padded",
          median_ms(o.reps, s, [&] { experts_backward(*strided, bb, s); }), 2 * f_fwd);
  }
  delete strided;
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
