// defines: layernorm_forward, layernorm_backward, layernorm_scratch_bytes (moe::cuda::lm)
// Forward: one warp per row, two passes over the fp32 row like the CPU reference (mean, then the
// variance around it: no E[x^2] - m^2 cancellation), float4 loads when D % 4 == 0.
// Backward: a block walks rows n = blockIdx.x, +G, ... with thread t owning columns t + j*threads
// (j < 4, so D <= 4 * 1024); the two row sums are block reductions, dw/db collect in registers
// over the block's rows and leave as one partial row per block, (2, G, D) in scratch, which
// column_sum_final adds into dw and db in block order. No atomics, G depends on N and D only.
#include <cuda_bf16.h>

#include "../warp.cuh"
#include "common.cuh"
#include "moe/model/layers.hpp"

namespace moe::cuda::lm {

namespace {

constexpr int kFwdWarps = 8;     // rows per forward block
constexpr int kBwdCols = 4;      // columns per backward thread (registers)
constexpr int kBwdMaxThreads = 1024;
constexpr int64_t kBwdMaxD = int64_t{kBwdCols} * kBwdMaxThreads;
constexpr int64_t kBwdMaxGroups = 1024;  // partial rows; column_sum_final reads <= 32 per lane
// Enough resident threads to hide memory latency (about half an H100), not more partial rows.
constexpr int64_t kBwdTargetThreads = 131072;

struct BackwardShape {
  int threads;  // multiple of 32 covering ceil(D / kBwdCols) columns
  int64_t groups;
};
BackwardShape backward_shape(int64_t N, int64_t D) {
  const int64_t per_thread = (D + kBwdCols - 1) / kBwdCols;
  const int threads = static_cast<int>(std::max<int64_t>(32, (per_thread + 31) / 32 * 32));
  const int64_t groups =
      std::clamp<int64_t>(std::min(N, kBwdTargetThreads / threads), 1, kBwdMaxGroups);
  return {threads, groups};
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels

template <int kVec>
__device__ __forceinline__ void load_vec(const float* p, float (&x)[kVec]) {
  if constexpr (kVec == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    x[0] = *p;
  }
}

template <int kVec>
__global__ void __launch_bounds__(kFwdWarps * 32)
    layernorm_forward_kernel(bf16* out, float* mean, float* rstd, const float* inp,
                             const float* w, const float* b, int64_t N, int64_t D) {
  const int64_t n = int64_t{blockIdx.x} * kFwdWarps + threadIdx.x / 32;
  if (n >= N) return;
  const int lane = threadIdx.x % 32;
  const float* x = inp + n * D;  // (D)
  // Step 1: mean
  float sum = 0.f;
  for (int64_t c = lane * kVec; c < D; c += 32 * kVec) {
    float v[kVec];
    load_vec<kVec>(x + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum += v[i];
  }
  const float m = warp_sum(sum) / static_cast<float>(D);
  // Step 2: variance around the mean (the row is in L1 now)
  float sq = 0.f;
  for (int64_t c = lane * kVec; c < D; c += 32 * kVec) {
    float v[kVec];
    load_vec<kVec>(x + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sq += (v[i] - m) * (v[i] - m);
  }
  const float var = warp_sum(sq) / static_cast<float>(D);
  const float r = 1.f / sqrtf(var + static_cast<float>(moe::model::kLayerNormEps));
  // Step 3: normalise, scale, shift, round to bf16
  bf16* o = out + n * D;
  for (int64_t c = lane * kVec; c < D; c += 32 * kVec) {
    float v[kVec], wv[kVec], bv[kVec];
    load_vec<kVec>(x + c, v);
    load_vec<kVec>(w + c, wv);
    load_vec<kVec>(b + c, bv);
    if constexpr (kVec == 4) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn((v[0] - m) * r * wv[0] + bv[0],
                                                      (v[1] - m) * r * wv[1] + bv[1]);
      const __nv_bfloat162 hi = __floats2bfloat162_rn((v[2] - m) * r * wv[2] + bv[2],
                                                      (v[3] - m) * r * wv[3] + bv[3]);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(o + c) = packed;  // 8 bytes: D % 4 == 0 keeps it aligned
    } else {
      o[c] = __float2bfloat16_rn((v[0] - m) * r * wv[0] + bv[0]);
    }
  }
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

// grid (G), threads = backward_shape().threads. partial (2, G, D): dw rows, then db rows.
template <class Dout>
__global__ void __launch_bounds__(kBwdMaxThreads)
    layernorm_backward_kernel(float* dinp, float* partial, const Dout* dout, const float* inp,
                              const float* w, const float* mean, const float* rstd, int64_t N,
                              int64_t D) {
  __shared__ float s_red[2][32][2];  // [double buffer][warp][sum]: one barrier per row
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t G = gridDim.x;
  float wv[kBwdCols], dw_acc[kBwdCols], db_acc[kBwdCols];
#pragma unroll
  for (int j = 0; j < kBwdCols; ++j) {
    const int64_t c = threadIdx.x + int64_t{j} * blockDim.x;
    wv[j] = c < D ? w[c] : 0.f;
    dw_acc[j] = 0.f;
    db_acc[j] = 0.f;
  }
  int buf = 0;
  for (int64_t n = blockIdx.x; n < N; n += G) {  // the same rows for every thread of the block
    const float m = mean[n], r = rstd[n];
    // Step 1: this thread's columns of the row and its share of the two row sums
    float g[kBwdCols], norm[kBwdCols];
    float sum_dnorm = 0.f, sum_dnorm_norm = 0.f;
#pragma unroll
    for (int j = 0; j < kBwdCols; ++j) {
      const int64_t c = threadIdx.x + int64_t{j} * blockDim.x;
      g[j] = c < D ? detail::load_f(dout, n * D + c) : 0.f;
      norm[j] = c < D ? (inp[n * D + c] - m) * r : 0.f;
      const float dnorm = g[j] * wv[j];
      sum_dnorm += dnorm;
      sum_dnorm_norm += dnorm * norm[j];
    }
    // Step 2: block reduction in warp order
    sum_dnorm = warp_sum(sum_dnorm);
    sum_dnorm_norm = warp_sum(sum_dnorm_norm);
    if (lane == 0) {
      s_red[buf][warp][0] = sum_dnorm;
      s_red[buf][warp][1] = sum_dnorm_norm;
    }
    __syncthreads();
    float a = 0.f, bsum = 0.f;
    for (int i = 0; i < warps; ++i) {
      a += s_red[buf][i][0];
      bsum += s_red[buf][i][1];
    }
    buf ^= 1;  // the next row writes the other buffer; the one after is past this row's barrier
    const float mean_dnorm = a / static_cast<float>(D);
    const float mean_dnorm_norm = bsum / static_cast<float>(D);
    // Step 3: dinp += ..., weight gradients into registers
#pragma unroll
    for (int j = 0; j < kBwdCols; ++j) {
      const int64_t c = threadIdx.x + int64_t{j} * blockDim.x;
      if (c < D) {
        const float dnorm = g[j] * wv[j];
        dinp[n * D + c] += r * (dnorm - mean_dnorm - norm[j] * mean_dnorm_norm);
        dw_acc[j] += norm[j] * g[j];
        db_acc[j] += g[j];
      }
    }
  }
  // Step 4: this block's partial rows
#pragma unroll
  for (int j = 0; j < kBwdCols; ++j) {
    const int64_t c = threadIdx.x + int64_t{j} * blockDim.x;
    if (c < D) {
      partial[int64_t{blockIdx.x} * D + c] = dw_acc[j];
      partial[(G + blockIdx.x) * D + c] = db_acc[j];
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

void layernorm_forward(bf16* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t D, cudaStream_t stream) {
  if (N == 0) return;
  MOE_CHECK(D >= 1, "layernorm_forward: D must be >= 1, got ", D);
  const unsigned grid = static_cast<unsigned>((N + kFwdWarps - 1) / kFwdWarps);
  using detail::is_aligned16;
  if (D % 4 == 0 && is_aligned16(out) && is_aligned16(inp) && is_aligned16(w) &&
      is_aligned16(b)) {
    layernorm_forward_kernel<4><<<grid, kFwdWarps * 32, 0, stream>>>(out, mean, rstd, inp, w, b,
                                                                     N, D);
  } else {
    layernorm_forward_kernel<1><<<grid, kFwdWarps * 32, 0, stream>>>(out, mean, rstd, inp, w, b,
                                                                     N, D);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

size_t layernorm_scratch_bytes(int64_t N, int64_t D) {
  if (N <= 0 || D <= 0) return 0;
  return detail::align_up(static_cast<size_t>(2 * backward_shape(N, D).groups * D) *
                          sizeof(float));
}

template <class Dout>
void layernorm_backward(float* dinp, float* dw, float* db, const Dout* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N,
                        int64_t D, void* scratch, cudaStream_t stream) {
  MOE_CHECK(D >= 1 && D <= kBwdMaxD, "layernorm_backward: D must be in [1, ", kBwdMaxD,
            "] (4 columns per thread, 1024 threads), got ", D);
  if (N == 0) return;
  MOE_CHECK(scratch, "layernorm_backward: scratch is null (layernorm_scratch_bytes)");
  const BackwardShape shape = backward_shape(N, D);
  float* partial = static_cast<float*>(scratch);  // (2, G, D)
  layernorm_backward_kernel<Dout><<<static_cast<unsigned>(shape.groups), shape.threads, 0,
                                    stream>>>(dinp, partial, dout, inp, w, mean, rstd, N, D);
  MOE_CUDA_LAUNCH_CHECK();
  detail::column_sum_final(dw, partial, shape.groups, D, stream);
  detail::column_sum_final(db, partial + shape.groups * D, shape.groups, D, stream);
}

template void layernorm_backward<bf16>(float*, float*, float*, const bf16*, const float*,
                                       const float*, const float*, const float*, int64_t,
                                       int64_t, void*, cudaStream_t);
template void layernorm_backward<float>(float*, float*, float*, const float*, const float*,
                                        const float*, const float*, const float*, int64_t,
                                        int64_t, void*, cudaStream_t);

}  // namespace moe::cuda::lm
