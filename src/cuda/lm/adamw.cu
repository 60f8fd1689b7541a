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

struct AdamWScalars {
  float lr, beta1, beta2, eps, c1, c2, one_minus_b1, one_minus_b2;
};

// One element of moe::model::AdamW::update; g already times the clip scale.
__device__ __forceinline__ void adamw_element(const AdamWScalars& a, float weight_decay, float gi,
                                              float& p, float& m, float& v) {
  // m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g  (left to right, as written on the CPU)
  m = __fadd_rn(__fmul_rn(a.beta1, m), __fmul_rn(a.one_minus_b1, gi));
  v = __fadd_rn(__fmul_rn(a.beta2, v), __fmul_rn(__fmul_rn(a.one_minus_b2, gi), gi));
  const float mhat = __fmul_rn(m, a.c1), vhat = __fmul_rn(v, a.c2);
  // p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)
  const float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), a.eps)),
                               __fmul_rn(weight_decay, p));
  p = __fsub_rn(p, __fmul_rn(a.lr, step));
}

__global__ void adamw_kernel(float* p, bf16* p_bf16, const float* g, float* m, float* v,
                             int64_t n, AdamWScalars a, float weight_decay, const float* scale) {
  const float s = scale ? *scale : 1.f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gi = __fmul_rn(g[i], s);  // the CPU scales the gradient in place first
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element(a, weight_decay, gi, pi, mi, vi);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if (p_bf16) p_bf16[i] = __float2bfloat16_rn(pi);
  }
}

// Every trainable tensor of the flat buffers in one launch: block b updates chunk b. Chunks that
// start on a multiple of 4 elements go 4 at a time (16-byte loads of p, g, m, v), the rest one
// at a time; the arithmetic is adamw_element's either way.
__global__ void __launch_bounds__(kThreads)
    adamw_chunks_kernel(float* p, bf16* p_bf16, const float* g, float* m, float* v,
                        const AdamWChunk* chunks, AdamWScalars a, const float* scale) {
  const AdamWChunk c = chunks[blockIdx.x];
  const float s = scale ? *scale : 1.f;
  const int64_t n = c.size;
  int64_t done = 0;
  if (c.offset % 4 == 0) {
    float4* p4 = reinterpret_cast<float4*>(p + c.offset);
    const float4* g4 = reinterpret_cast<const float4*>(g + c.offset);
    float4* m4 = reinterpret_cast<float4*>(m + c.offset);
    float4* v4 = reinterpret_cast<float4*>(v + c.offset);
    for (int64_t i = threadIdx.x; i < n / 4; i += kThreads) {
      float4 pp = p4[i], mm = m4[i], vv = v4[i];
      const float4 gg = g4[i];
      adamw_element(a, c.weight_decay, __fmul_rn(gg.x, s), pp.x, mm.x, vv.x);
      adamw_element(a, c.weight_decay, __fmul_rn(gg.y, s), pp.y, mm.y, vv.y);
      adamw_element(a, c.weight_decay, __fmul_rn(gg.z, s), pp.z, mm.z, vv.z);
      adamw_element(a, c.weight_decay, __fmul_rn(gg.w, s), pp.w, mm.w, vv.w);
      p4[i] = pp;
      m4[i] = mm;
      v4[i] = vv;
      if (p_bf16) {
        const __nv_bfloat162 lo = __floats2bfloat162_rn(pp.x, pp.y);
        const __nv_bfloat162 hi = __floats2bfloat162_rn(pp.z, pp.w);
        bf16* q = p_bf16 + c.offset + 4 * i;
        reinterpret_cast<__nv_bfloat162*>(q)[0] = lo;  // 4-byte aligned: offset % 4 == 0
        reinterpret_cast<__nv_bfloat162*>(q)[1] = hi;
      }
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    const int64_t k = c.offset + i;
    float pi = p[k], mi = m[k], vi = v[k];
    adamw_element(a, c.weight_decay, __fmul_rn(g[k], s), pi, mi, vi);
    m[k] = mi;
    v[k] = vi;
    p[k] = pi;
    if (p_bf16) p_bf16[k] = __float2bfloat16_rn(pi);
  }
}

AdamWScalars scalars(float lr, float beta1, float beta2, float eps, float c1, float c2) {
  return {lr, beta1, beta2, eps, c1, c2, 1.f - beta1, 1.f - beta2};
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
  adamw_kernel<<<detail::grid_for(n), 256, 0, stream>>>(
      p, p_bf16, g, m, v, n, scalars(lr, beta1, beta2, eps, c1, c2), weight_decay, scale);
  MOE_CUDA_LAUNCH_CHECK();
}

void add_adamw_chunks(std::vector<AdamWChunk>& chunks, int64_t offset, int64_t size,
                      float weight_decay) {
  MOE_CHECK(offset >= 0 && size >= 0, "adamw chunks: negative offset or size");
  for (int64_t at = 0; at < size; at += kAdamWChunk)
    chunks.push_back({offset + at, std::min(kAdamWChunk, size - at), weight_decay});
}

void adamw_update_chunks(float* p, bf16* p_bf16, const float* g, float* m, float* v,
                         const AdamWChunk* chunks, int64_t num_chunks, float lr, float beta1,
                         float beta2, float eps, float c1, float c2, const float* scale,
                         cudaStream_t stream) {
  if (num_chunks == 0) return;
  MOE_CHECK(num_chunks < (int64_t{1} << 31), "adamw chunks: too many chunks");
  adamw_chunks_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
      p, p_bf16, g, m, v, chunks, scalars(lr, beta1, beta2, eps, c1, c2), scale);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
