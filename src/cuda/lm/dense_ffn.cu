// defines: ffn_activation_forward, ffn_activation_backward (moe::cuda::lm)
// The activation between the two GEMMs of the dense FFN baselines, with the CPU experts' math
// (src/cpu/experts.cpp): SwiGLU on [gate | up] halves of each pre-activation row, or the exact erf
// GELU. fp32 math on bf16 storage; one thread per output element (memory-bound, a few MB).
#include <cuda_bf16.h>

#include "common.cuh"
#include "moe/cuda/lm/layers.hpp"

namespace moe::cuda::lm {

namespace {

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

__global__ void swiglu_forward_kernel(bf16* act, const bf16* pre, int64_t N, int64_t I) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < N * I; k += stride) {
    const int64_t n = k / I, j = k % I;
    const float g = __bfloat162float(pre[n * 2 * I + j]), u = __bfloat162float(pre[n * 2 * I + I + j]);
    act[k] = __float2bfloat16_rn(g * sigmoidf(g) * u);
  }
}

__global__ void swiglu_backward_kernel(bf16* dpre, const bf16* dact, const bf16* pre, int64_t N,
                                       int64_t I) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < N * I; k += stride) {
    const int64_t n = k / I, j = k % I;
    const float d = __bfloat162float(dact[k]);
    const float v = __bfloat162float(pre[n * 2 * I + j]), u = __bfloat162float(pre[n * 2 * I + I + j]);
    const float sg = sigmoidf(v);
    dpre[n * 2 * I + j] = __float2bfloat16_rn(d * u * sg * (1.0f + v * (1.0f - sg)));
    dpre[n * 2 * I + I + j] = __float2bfloat16_rn(d * v * sg);
  }
}

__global__ void gelu_forward_kernel(bf16* act, const bf16* pre, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += stride) {
    const float v = __bfloat162float(pre[k]);
    act[k] = __float2bfloat16_rn(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
}

__global__ void gelu_backward_kernel(bf16* dpre, const bf16* dact, const bf16* pre, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += stride) {
    const float v = __bfloat162float(pre[k]);
    const float grad = 0.5f * (1.0f + erff(v * 0.70710678118654752f)) +
                       v * 0.39894228040143268f * expf(-0.5f * v * v);
    dpre[k] = __float2bfloat16_rn(__bfloat162float(dact[k]) * grad);
  }
}

}  // namespace

void ffn_activation_forward(bf16* act, const bf16* pre, int64_t N, int64_t I, bool swiglu,
                            cudaStream_t stream) {
  if (N * I == 0) return;
  if (swiglu) swiglu_forward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(act, pre, N, I);
  else gelu_forward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(act, pre, N * I);
  MOE_CUDA_LAUNCH_CHECK();
}

void ffn_activation_backward(bf16* dpre, const bf16* dact, const bf16* pre, int64_t N, int64_t I,
                             bool swiglu, cudaStream_t stream) {
  if (N * I == 0) return;
  if (swiglu) {
    swiglu_backward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(dpre, dact, pre, N, I);
  } else {
    gelu_backward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(dpre, dact, pre, N * I);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
