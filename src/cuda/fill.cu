// defines: fill_normal (seeded random device buffers for benchmarks)
#include <cuda_bf16.h>

#include "moe/cuda/check.cuh"
#include "moe/cuda/fill.hpp"
#include "moe/rng.hpp"

namespace moe::cuda {

namespace {
template <class T>
__global__ void fill_normal_kernel(T* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = scale * static_cast<float>(counter_normal(seed, RngStream::init, i));
    if constexpr (sizeof(T) == 2) data[i] = __float2bfloat16_rn(v);
    else data[i] = v;
  }
}
}  // namespace

template <class T>
void fill_normal(T* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 132 * 32);  // grid-stride, ~full GPU
  fill_normal_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(data, n, seed, scale);
  MOE_CUDA_LAUNCH_CHECK();
}

template void fill_normal<float>(float*, int64_t, uint64_t, float, cudaStream_t);
template void fill_normal<__nv_bfloat16>(__nv_bfloat16*, int64_t, uint64_t, float, cudaStream_t);

}  // namespace moe::cuda
