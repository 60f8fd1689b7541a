// defines: permute_forward, permute_backward
// x[T,H] --permute--> xp[M,H]: token-major scatter (read each token once, write it to its rows).
// The backward is the transpose: an unweighted gather-sum of a token's rows (rows.cuh), the same
// kernel combine uses with weights.
#include <cuda_bf16.h>

#include "moe/cuda/check.cuh"
#include "moe/cuda/permute.hpp"
#include "rows.cuh"

namespace moe::cuda {

using namespace rows;

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

// Warps [0, T): warp t loads a chunk of x[t] (kUnroll 16-byte vectors per lane, all in flight
// before the first store) and stores it to each of the token's kept rows.
// Warps [T, T + pad_groups): zero the padding rows, 32 row indices per warp.
template <class T, int kVec, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    permute_forward_kernel(PlanView plan, const T* __restrict__ x, T* __restrict__ xp,
                           int64_t hidden, RowGrid grid) {
  const int lane = threadIdx.x % kWarp;
  const int64_t w = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (w >= grid.warps()) return;
  if (w >= grid.token_warps) {
    zero_padding_rows<T, kVec>(plan, w - grid.token_warps, xp, hidden);
    return;
  }
  const int64_t t = w;
  const int32_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
  const T* src = x + t * hidden;
  constexpr int64_t kStep = int64_t{kWarp} * kVec * kUnroll;
  for (int32_t jb = j0; jb < j1; jb += kWarp) {  // one pass for K <= 32
    const int nj = min(kWarp, j1 - jb);
    const int32_t my_row = lane < nj ? plan.token_rows[jb + lane] : kDropped;
    if (__ballot_sync(0xffffffffu, my_row >= 0) == 0) continue;  // every choice dropped
    for (int64_t base = 0; base < hidden; base += kStep) {
      Vec<T, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
        if (i < hidden) v[u] = load_vec<T, kVec>(src + i);
      }
      for (int j = 0; j < nj; ++j) {
        const int32_t r = __shfl_sync(0xffffffffu, my_row, j);
        if (r < 0) continue;
        T* dst = xp + int64_t{r} * hidden;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
          if (i < hidden) store_vec<T, kVec>(dst + i, v[u]);
        }
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

template <class T>
void permute_forward(const PlanView& plan, const T* x, int64_t hidden, T* xp,
                     cudaStream_t stream) {
  const RowGrid grid = row_grid(plan.shape, true);
  if (grid.warps() == 0 || hidden == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  // 8 vectors per lane: 4 KiB of loads in flight per warp before its first store.
  if (vector_width<T>(hidden, {x, xp}) == kWide)
    permute_forward_kernel<T, kWide, 8>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, x, xp, hidden, grid);
  else
    permute_forward_kernel<T, 1, 8>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, x, xp, hidden, grid);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class T>
void permute_backward(const PlanView& plan, const T* dxp, int64_t hidden, T* dx,
                      cudaStream_t stream) {
  launch_gather_sum<T, false>(plan, nullptr, dxp, hidden, dx, stream);
}

template void permute_forward<float>(const PlanView&, const float*, int64_t, float*, cudaStream_t);
template void permute_forward<__nv_bfloat16>(const PlanView&, const __nv_bfloat16*, int64_t,
                                             __nv_bfloat16*, cudaStream_t);
template void permute_backward<float>(const PlanView&, const float*, int64_t, float*,
                                      cudaStream_t);
template void permute_backward<__nv_bfloat16>(const PlanView&, const __nv_bfloat16*, int64_t,
                                              __nv_bfloat16*, cudaStream_t);

}  // namespace moe::cuda
