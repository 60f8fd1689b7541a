// defines: sum_squares, sumsq_scratch_bytes, clip_scale, adamw_update (moe::cuda::lm)
// The optimizer step of the GPU trainer: the global gradient norm (a sum of squares in double,
// per-block partials then one block adding them in order), the clip factor on the device (no
// host round trip), and AdamW operation for operation as moe::model::AdamW::update. The update
// uses the _rn intrinsics so nvcc cannot contract a multiply and an add into an FMA: the CPU
// reference (x86-64, ISO C++, no FMA) rounds each operation, and so must this.
#include <cuda_bf16.h>

#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxPartials = 1024;
constexpr int64_t kElementsPerThread = 16;  // before a second block pays off

int64_t sumsq_blocks(int64_t n) {
  return std::clamp<int64_t>((n + kThreads * kElementsPerThread - 1) /
                                 (kThreads * kElementsPerThread),
                             1, kMaxPartials);
}

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// Sum of the block's thread values, in a fixed order; valid in thread 0.
__device__ __forceinline__ double block_sum_double(double v) {
  __shared__ double s_warp[kThreads / 32];
  v = warp_sum_double(v);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];
  return total;
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// partial[block] = sum of g[i]^2 over the block's grid-stride share, in double.
__global__ void __launch_bounds__(kThreads)
    sum_squares_partial_kernel(double* partial, const float* g, int64_t n) {
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    const double x = g[i];
    acc += x * x;
  }
  const double total = block_sum_double(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// *sumsq = (add ? *sumsq : 0) + sum of the partials; one block.
__global__ void __launch_bounds__(kThreads)
    sum_squares_final_kernel(double* sumsq, const double* partial, int64_t blocks, bool add) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += kThreads) acc += partial[i];
  const double total = block_sum_double(acc);
  if (threadIdx.x == 0) *sumsq = add ? *sumsq + total : total;
}

// The CPU trainer's rule (src/model/train.cpp): clip when grad_clip > 0 and norm > grad_clip.
__global__ void clip_scale_kernel(float* scale, const double* sumsq, float max_norm) {
  const double norm = sqrt(*sumsq);
  const double clip = max_norm;
  *scale = (clip > 0 && norm > clip) ? static_cast<float>(clip / norm) : 1.f;
}

__global__ void adamw_kernel(float* p, bf16* p_bf16, const float* g, float* m, float* v,
                             int64_t n, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float c1, float c2, const float* scale) {
  const float s = scale ? *scale : 1.f;
  const float one_minus_b1 = __fsub_rn(1.f, beta1), one_minus_b2 = __fsub_rn(1.f, beta2);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gi = __fmul_rn(g[i], s);  // the CPU scales the gradient in place first
    // m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g  (left to right, as written on the CPU)
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_b1, gi));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
    const float mhat = __fmul_rn(mi, c1), vhat = __fmul_rn(vi, c2);
    // p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)
    const float pi = p[i];
    const float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), eps)),
                                 __fmul_rn(weight_decay, pi));
    const float pn = __fsub_rn(pi, __fmul_rn(lr, step));
    m[i] = mi;
    v[i] = vi;
    p[i] = pn;
    if (p_bf16) p_bf16[i] = __float2bfloat16_rn(pn);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

size_t sumsq_scratch_bytes(int64_t n) {
  return detail::align_up(static_cast<size_t>(sumsq_blocks(n)) * sizeof(double));
}

void sum_squares(double* sumsq, const float* g, int64_t n, bool add, void* scratch,
                 cudaStream_t stream) {
  MOE_CHECK(scratch, "sum_squares: scratch is null (sumsq_scratch_bytes)");
  const int64_t blocks = sumsq_blocks(n);
  double* partial = static_cast<double*>(scratch);
  sum_squares_partial_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial, g,
                                                                                     n);
  MOE_CUDA_LAUNCH_CHECK();
  sum_squares_final_kernel<<<1, kThreads, 0, stream>>>(sumsq, partial, blocks, add);
  MOE_CUDA_LAUNCH_CHECK();
}

void clip_scale(float* scale, const double* sumsq, float max_norm, cudaStream_t stream) {
  clip_scale_kernel<<<1, 1, 0, stream>>>(scale, sumsq, max_norm);
  MOE_CUDA_LAUNCH_CHECK();
}

void adamw_update(float* p, bf16* p_bf16, const float* g, float* m, float* v, int64_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                  const float* scale, cudaStream_t stream) {
  if (n == 0) return;
  adamw_kernel<<<detail::grid_for(n), 256, 0, stream>>>(p, p_bf16, g, m, v, n, lr, beta1, beta2,
                                                        eps, weight_decay, c1, c2, scale);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
