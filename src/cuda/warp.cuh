// defines: moe::cuda::warp_sum, moe::cuda::warp_max — butterfly reductions over a full warp
// Every lane ends with the same value, and the xor order is fixed, so the result is the same bits
// on every run.
#pragma once

namespace moe::cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

}  // namespace moe::cuda
