// defines: ffn_activation_forward, ffn_activation_backward (moe::cuda::lm)
// The activation between the two GEMMs of the dense FFN baselines, with the CPU experts' math
// (src/cpu/experts.cpp): SwiGLU on [gate | up] halves of each pre-activation row, or the exact erf
// GELU. fp32 math on bf16 storage. Memory-bound: at the dense_params shape one pass moves about
// 0.8 (forward) and 1.3 GB (backward) per layer. The row kernels give each thread 8 consecutive
// columns (16-byte loads and stores, no index division); the element kernels, with the same
// arithmetic, take widths that are not multiples of 8 or unaligned buffers.
#include <cuda_bf16.h>

#include <algorithm>
#include <initializer_list>

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

// ---- the row kernels: one block per row (grid-stride over rows), 8 columns per thread.
constexpr int kVec = 8;
struct alignas(16) Pack8 {
  bf16 v[kVec];
};

__device__ __forceinline__ void load8(const bf16* p, float* out) {
  const Pack8 q = *reinterpret_cast<const Pack8*>(p);
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = __bfloat162float(q.v[k]);
}
__device__ __forceinline__ void store8(bf16* p, const float* in) {
  Pack8 q;
#pragma unroll
  for (int k = 0; k < kVec; ++k) q.v[k] = __float2bfloat16_rn(in[k]);
  *reinterpret_cast<Pack8*>(p) = q;
}

// The same expressions as the element kernels above, so both give the same bits.
template <bool kSwiglu>
__global__ void activation_forward_rows(bf16* act, const bf16* pre, int64_t N, int64_t I) {
  const int64_t A = kSwiglu ? 2 * I : I;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const bf16* row = pre + n * A;
    for (int64_t j = int64_t{threadIdx.x} * kVec; j < I; j += int64_t{blockDim.x} * kVec) {
      float g[kVec], out[kVec];
      load8(row + j, g);
      if constexpr (kSwiglu) {
        float u[kVec];
        load8(row + I + j, u);
#pragma unroll
        for (int k = 0; k < kVec; ++k) out[k] = g[k] * sigmoidf(g[k]) * u[k];
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          out[k] = 0.5f * g[k] * (1.0f + erff(g[k] * 0.70710678118654752f));
      }
      store8(act + n * I + j, out);
    }
  }
}

template <bool kSwiglu>
__global__ void activation_backward_rows(bf16* dpre, const bf16* dact, const bf16* pre, int64_t N,
                                         int64_t I) {
  const int64_t A = kSwiglu ? 2 * I : I;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const bf16* row = pre + n * A;
    for (int64_t j = int64_t{threadIdx.x} * kVec; j < I; j += int64_t{blockDim.x} * kVec) {
      float v[kVec], d[kVec];
      load8(row + j, v);
      load8(dact + n * I + j, d);
      if constexpr (kSwiglu) {
        float u[kVec], dg[kVec], du[kVec];
        load8(row + I + j, u);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float sg = sigmoidf(v[k]);
          dg[k] = d[k] * u[k] * sg * (1.0f + v[k] * (1.0f - sg));
          du[k] = d[k] * v[k] * sg;
        }
        store8(dpre + n * A + j, dg);
        store8(dpre + n * A + I + j, du);
      } else {
        float out[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float grad = 0.5f * (1.0f + erff(v[k] * 0.70710678118654752f)) +
                             v[k] * 0.39894228040143268f * expf(-0.5f * v[k] * v[k]);
          out[k] = d[k] * grad;
        }
        store8(dpre + n * A + j, out);
      }
    }
  }
}

// Row kernels need 8 | I and 16-byte aligned bases (then every row and 8-column group is).
bool rows_ok(int64_t I, std::initializer_list<const void*> ptrs) {
  if (I % kVec != 0) return false;
  for (const void* p : ptrs)
    if (!detail::is_aligned16(p)) return false;
  return true;
}
// Threads per block: the row's 8-column groups rounded up to whole warps, at most 256.
int row_threads(int64_t I) {
  return static_cast<int>(std::clamp<int64_t>((I / kVec + 31) / 32 * 32, 32, 256));
}
unsigned row_blocks(int64_t N) { return static_cast<unsigned>(std::min<int64_t>(N, 1 << 20)); }

}  // namespace

void ffn_activation_forward(bf16* act, const bf16* pre, int64_t N, int64_t I, bool swiglu,
                            cudaStream_t stream) {
  if (N * I == 0) return;
  if (rows_ok(I, {act, pre})) {
    if (swiglu)
      activation_forward_rows<true><<<row_blocks(N), row_threads(I), 0, stream>>>(act, pre, N, I);
    else
      activation_forward_rows<false><<<row_blocks(N), row_threads(I), 0, stream>>>(act, pre, N, I);
  } else if (swiglu) {
    swiglu_forward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(act, pre, N, I);
  } else {
    gelu_forward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(act, pre, N * I);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void ffn_activation_backward(bf16* dpre, const bf16* dact, const bf16* pre, int64_t N, int64_t I,
                             bool swiglu, cudaStream_t stream) {
  if (N * I == 0) return;
  if (rows_ok(I, {dpre, dact, pre})) {
    if (swiglu)
      activation_backward_rows<true>
          <<<row_blocks(N), row_threads(I), 0, stream>>>(dpre, dact, pre, N, I);
    else
      activation_backward_rows<false>
          <<<row_blocks(N), row_threads(I), 0, stream>>>(dpre, dact, pre, N, I);
  } else if (swiglu) {
    swiglu_backward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(dpre, dact, pre, N, I);
  } else {
    gelu_backward_kernel<<<detail::grid_for(N * I), 256, 0, stream>>>(dpre, dact, pre, N * I);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
