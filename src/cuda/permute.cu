// defines: permute_forward, permute_backward
// x[T,H] --permute--> xp[M,H]: token-major scatter (read each token once, write it to its rows).
// The backward is the transpose: an unweighted gather-sum of a token's rows, the same kernel
// combine uses with weights. The kernels live in rows.cuh, next to their lab variants.
#include <cuda_bf16.h>

#include "moe/cuda/check.cuh"
#include "moe/cuda/permute.hpp"
#include "rows.cuh"

namespace moe::cuda {

using namespace rows;

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

template <class T>
void permute_forward(const PlanView& plan, const T* x, int64_t hidden, T* xp,
                     cudaStream_t stream) {
  const RowGrid grid = row_grid(plan.shape, true);
  if (grid.warps() == 0 || hidden == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  // 8 packs per lane: 4 KiB of loads in flight per warp before its first store.
  if (vector_width<T>(hidden, {x, xp}) == kWide)
    permute_scatter_kernel<T, kWide, 8, Cache::kDefault>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, x, xp, hidden, grid);
  else
    permute_scatter_kernel<T, 1, 8, Cache::kDefault>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, x, xp, hidden, grid);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class T>
void permute_backward(const PlanView& plan, const T* dxp, int64_t hidden, T* dx,
                      cudaStream_t stream, bool accumulate) {
  if (accumulate) launch_gather_sum<T, false, true>(plan, nullptr, dxp, hidden, dx, stream);
  else launch_gather_sum<T, false, false>(plan, nullptr, dxp, hidden, dx, stream);
}

template void permute_forward<float>(const PlanView&, const float*, int64_t, float*, cudaStream_t);
template void permute_forward<__nv_bfloat16>(const PlanView&, const __nv_bfloat16*, int64_t,
                                             __nv_bfloat16*, cudaStream_t);
template void permute_backward<float>(const PlanView&, const float*, int64_t, float*,
                                      cudaStream_t, bool);
template void permute_backward<__nv_bfloat16>(const PlanView&, const __nv_bfloat16*, int64_t,
                                              __nv_bfloat16*, cudaStream_t, bool);

}  // namespace moe::cuda
