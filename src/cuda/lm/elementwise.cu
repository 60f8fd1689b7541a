// defines: residual_add, to_bf16, copy_fp32 (moe::cuda::lm)
// Elementwise passes of the trainer. Eight elements per thread step when every pointer is 16-byte
// aligned (one 16-byte bf16 access, two float4), the n % 8 tail and unaligned views elementwise.
#include <cuda_bf16.h>

#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr int kVec = 8;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

struct Bf16x8 {
  uint4 raw;
  __device__ __forceinline__ float get(int i) const {  // bf16 -> fp32 is a 16-bit shift
    const uint32_t w = (&raw.x)[i / 2];
    return __uint_as_float(i % 2 ? (w & 0xffff0000u) : (w << 16));
  }
};

__device__ __forceinline__ void load8(const float* p, float (&x)[kVec]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&x)[kVec]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}

template <bool kVectors>
__global__ void residual_add_kernel(float* out, const float* a, const bf16* b, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVectors) {
    for (int64_t i = first; i < n / kVec; i += stride) {
      float x[kVec];
      load8(a + i * kVec, x);
      const Bf16x8 y{*reinterpret_cast<const uint4*>(b + i * kVec)};
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] += y.get(j);
      store8(out + i * kVec, x);
    }
    done = n / kVec * kVec;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = a[i] + __bfloat162float(b[i]);
}

template <bool kVectors>
__global__ void to_bf16_kernel(bf16* out, const float* in, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVectors) {
    for (int64_t i = first; i < n / kVec; i += stride) {
      float x[kVec];
      load8(in + i * kVec, x);
      uint4 packed;
      uint32_t* w = &packed.x;
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
        w[j] = *reinterpret_cast<const uint32_t*>(&pair);
      }
      *reinterpret_cast<uint4*>(out + i * kVec) = packed;
    }
    done = n / kVec * kVec;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

void residual_add(float* out, const float* a, const bf16* b, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  using detail::is_aligned16;
  if (is_aligned16(out) && is_aligned16(a) && is_aligned16(b)) {
    residual_add_kernel<true><<<detail::grid_for(n / kVec + 1), 256, 0, stream>>>(out, a, b, n);
  } else {
    residual_add_kernel<false><<<detail::grid_for(n), 256, 0, stream>>>(out, a, b, n);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  using detail::is_aligned16;
  if (is_aligned16(out) && is_aligned16(in)) {
    to_bf16_kernel<true><<<detail::grid_for(n / kVec + 1), 256, 0, stream>>>(out, in, n);
  } else {
    to_bf16_kernel<false><<<detail::grid_for(n), 256, 0, stream>>>(out, in, n);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void copy_fp32(float* out, const float* in, int64_t n, cudaStream_t stream) {
  if (n == 0 || out == in) return;
  MOE_CUDA_CHECK(cudaMemcpyAsync(out, in, static_cast<size_t>(n) * sizeof(float),
                                 cudaMemcpyDeviceToDevice, stream));
}

}  // namespace moe::cuda::lm
