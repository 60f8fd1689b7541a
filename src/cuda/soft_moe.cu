// defines: SoftMoeBuffers, soft_moe_{route,dispatch,combine}_{forward,backward}
// Soft MoE on the device; include/moe/cuda/soft_moe.hpp has the contract and
// src/cpu/soft_moe.cpp the specification. fp32 throughout (the dispatch and combine weights are
// dense softmaxes; a bf16 path would round them).
//   norms:     a warp per token row of x; a thread per slot column of phi (coalesced over slots)
//   softmaxes: a block per slot column (over tokens, tree reductions); a warp per token row
//   GEMMs:     cuBLAS, row-major operands, fp32 accumulation; the learnable scale is read from
//              device memory (CUBLAS_POINTER_MODE_DEVICE), so nothing returns to the host
// Every reduction has a fixed order: same inputs, same bits.
#include <algorithm>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/soft_moe.hpp"

namespace moe::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr float kNormEps = 1e-6f;

// Row-major C(m,n) = alpha op(A)(m,k) op(B)(k,n) + beta C as the column-major product
// C^T = op(B)^T op(A)^T: swap the operands, keep the transpose flags.
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
             const float* alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
             const float* beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  MOE_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                int(n), int(m), int(k), alpha, B, CUDA_R_32F, int(ldb), A,
                                CUDA_R_32F, int(lda), beta, C, CUDA_R_32F, int(ldc),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}
// Block-wide reduction in a fixed tree order; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v) {
  __shared__ float buf[kBlock];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s)
      buf[threadIdx.x] = kMax ? fmaxf(buf[threadIdx.x], buf[threadIdx.x + s])
                              : buf[threadIdx.x] + buf[threadIdx.x + s];
    __syncthreads();
  }
  const float r = buf[0];
  __syncthreads();
  return r;
}

// ---- forward

// x_hat = x * inv, inv = 1 / sqrt(|x|^2 + eps); a warp per token.
__global__ void x_norm_kernel(const float* x, int64_t T, int64_t H, float* inv_norm,
                              float* x_norm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const float* row = x + t * H;
  float sq = 0.f;
  for (int64_t h = lane; h < H; h += kWarp) sq += row[h] * row[h];
  const float inv = 1.f / sqrtf(warp_sum(sq) + kNormEps);
  if (lane == 0) inv_norm[t] = inv;
  for (int64_t h = lane; h < H; h += kWarp) x_norm[t * H + h] = row[h] * inv;
}

// phi_hat = phi * inv_j per column j; a thread per column, h in order (coalesced over j).
__global__ void phi_norm_kernel(const float* phi, int64_t H, int64_t n, float* inv_norm,
                                float* phi_norm) {
  const int64_t j = blockIdx.x * int64_t{kBlock} + threadIdx.x;
  if (j >= n) return;
  float sq = 0.f;
  for (int64_t h = 0; h < H; ++h) sq += phi[h * n + j] * phi[h * n + j];
  const float inv = 1.f / sqrtf(sq + kNormEps);
  inv_norm[j] = inv;
  for (int64_t h = 0; h < H; ++h) phi_norm[h * n + j] = phi[h * n + j] * inv;
}

__global__ void scale_kernel(const float* scale, const float* in, int64_t count, float* out) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = s * in[i];
}

// Dispatch: softmax over tokens of slot column j; a block per column.
__global__ void __launch_bounds__(kBlock) dispatch_softmax_kernel(const float* L, int64_t T,
                                                                  int64_t n, float* D) {
  const int64_t j = blockIdx.x;
  float m = -INFINITY;
  for (int64_t t = threadIdx.x; t < T; t += kBlock) m = fmaxf(m, L[t * n + j]);
  m = block_reduce<true>(m);
  float s = 0.f;
  for (int64_t t = threadIdx.x; t < T; t += kBlock) s += expf(L[t * n + j] - m);
  s = block_reduce<false>(s);
  for (int64_t t = threadIdx.x; t < T; t += kBlock) D[t * n + j] = expf(L[t * n + j] - m) / s;
}

// Combine: softmax over the slots of token t; a warp per token.
__global__ void combine_softmax_kernel(const float* L, int64_t T, int64_t n, float* C) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const float* row = L + t * n;
  float m = -INFINITY;
  for (int64_t j = lane; j < n; j += kWarp) m = fmaxf(m, row[j]);
  m = warp_max(m);
  float s = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) s += expf(row[j] - m);
  s = warp_sum(s);
  for (int64_t j = lane; j < n; j += kWarp) C[t * n + j] = expf(row[j] - m) / s;
}

// ---- backward

// dL[:, j] = D[:, j] * (dD[:, j] - <D[:, j], dD[:, j]>); a block per column.
__global__ void __launch_bounds__(kBlock) dispatch_softmax_backward_kernel(
    const float* D, const float* dD, int64_t T, int64_t n, float* dL) {
  const int64_t j = blockIdx.x;
  float dot = 0.f;
  for (int64_t t = threadIdx.x; t < T; t += kBlock) dot += D[t * n + j] * dD[t * n + j];
  dot = block_reduce<false>(dot);
  for (int64_t t = threadIdx.x; t < T; t += kBlock)
    dL[t * n + j] = D[t * n + j] * (dD[t * n + j] - dot);
}

// dL[t, :] += C[t, :] * (dC[t, :] - <C[t, :], dC[t, :]>); a warp per token.
__global__ void combine_softmax_backward_kernel(const float* C, const float* dC, int64_t T,
                                                int64_t n, float* dL) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  float dot = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) dot += C[t * n + j] * dC[t * n + j];
  dot = warp_sum(dot);
  for (int64_t j = lane; j < n; j += kWarp) dL[t * n + j] += C[t * n + j] * (dC[t * n + j] - dot);
}

// dscale += sum dL * (x_hat phi_hat); one block, a fixed order (grid-stride, then a tree).
__global__ void __launch_bounds__(kBlock) scale_grad_kernel(const float* dL, const float* unscaled,
                                                            int64_t count, float* dscale) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kBlock) acc += double(dL[i]) * unscaled[i];
  __shared__ double buf[kBlock];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *dscale += static_cast<float>(buf[0]);
}

// dx += inv * dx_hat - inv^3 * x * <x, dx_hat>; a warp per token.
__global__ void x_norm_backward_kernel(const float* x, const float* dx_hat, const float* inv_norm,
                                      int64_t T, int64_t H, float* dx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const float* row = x + t * H;
  const float* g = dx_hat + t * H;
  float dot = 0.f;
  for (int64_t h = lane; h < H; h += kWarp) dot += row[h] * g[h];
  dot = warp_sum(dot);
  const float inv = inv_norm[t];
  for (int64_t h = lane; h < H; h += kWarp)
    dx[t * H + h] += inv * g[h] - inv * inv * inv * row[h] * dot;
}

// dphi += inv_j * dphi_hat - inv_j^3 * phi * <phi[:, j], dphi_hat[:, j]>; a thread per column.
__global__ void phi_norm_backward_kernel(const float* phi, const float* dphi_hat,
                                         const float* inv_norm, int64_t H, int64_t n,
                                         float* dphi) {
  const int64_t j = blockIdx.x * int64_t{kBlock} + threadIdx.x;
  if (j >= n) return;
  float dot = 0.f;
  for (int64_t h = 0; h < H; ++h) dot += phi[h * n + j] * dphi_hat[h * n + j];
  const float inv = inv_norm[j];
  for (int64_t h = 0; h < H; ++h)
    dphi[h * n + j] += inv * dphi_hat[h * n + j] - inv * inv * inv * phi[h * n + j] * dot;
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block));
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// buffers and launchers
// ------------------------------------------------------------------------------------------------

SoftMoeBuffers::SoftMoeBuffers(const LayerConfig& cfg) {
  MOE_CHECK(cfg.router == Router::soft_moe, "SoftMoeBuffers: router is ", name(cfg.router));
  tokens = cfg.tokens;
  hidden = cfg.hidden;
  slots = cfg.experts * cfg.slots_per_expert;
  const size_t T = tokens, H = hidden, n = slots;
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  arena = DeviceArena({{"x_inv_norm", T * 4, p(x_inv_norm)},
                       {"x_norm", T * H * 4, p(x_norm)},
                       {"phi_inv_norm", n * 4, p(phi_inv_norm)},
                       {"phi_norm", H * n * 4, p(phi_norm)},
                       {"unscaled", T * n * 4, p(unscaled)},
                       {"logits", T * n * 4, p(logits)},
                       {"dispatch", T * n * 4, p(dispatch)},
                       {"combine", T * n * 4, p(combine)},
                       {"d_combine", T * n * 4, p(d_combine)},
                       {"d_dispatch", T * n * 4, p(d_dispatch)},
                       {"d_logits", T * n * 4, p(d_logits)},
                       {"dx_hat", T * H * 4, p(dx_hat)},
                       {"dphi_hat", H * n * 4, p(dphi_hat)},
                       {"zero", 4, p(zero)}});
  MOE_CUDA_CHECK(cudaMemset(zero, 0, sizeof(float)));
}

void soft_moe_route_forward(cublasHandle_t h, const float* x, const float* phi,
                            const float* scale, SoftMoeBuffers& b, cudaStream_t stream) {
  const int64_t T = b.tokens, H = b.hidden, n = b.slots;
  if (T == 0) return;
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  x_norm_kernel<<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(x, T, H, b.x_inv_norm,
                                                                       b.x_norm);
  MOE_CUDA_LAUNCH_CHECK();
  phi_norm_kernel<<<blocks_for(n, kBlock), kBlock, 0, stream>>>(phi, H, n, b.phi_inv_norm,
                                                                b.phi_norm);
  MOE_CUDA_LAUNCH_CHECK();
  const float one = 1.f, zero = 0.f;
  gemm_rm(h, false, false, T, n, H, &one, b.x_norm, H, b.phi_norm, n, &zero, b.unscaled, n);
  scale_kernel<<<blocks_for(T * n, kBlock), kBlock, 0, stream>>>(scale, b.unscaled, T * n,
                                                                 b.logits);
  MOE_CUDA_LAUNCH_CHECK();
  dispatch_softmax_kernel<<<unsigned(n), kBlock, 0, stream>>>(b.logits, T, n, b.dispatch);
  MOE_CUDA_LAUNCH_CHECK();
  combine_softmax_kernel<<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(b.logits, T, n,
                                                                               b.combine);
  MOE_CUDA_LAUNCH_CHECK();
}

void soft_moe_dispatch_forward(cublasHandle_t h, const SoftMoeBuffers& b, const float* x,
                               float* slots_in, cudaStream_t stream) {
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float one = 1.f, zero = 0.f;
  if (b.tokens == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(slots_in, 0, b.slots * b.hidden * 4, stream));
    return;
  }
  gemm_rm(h, true, false, b.slots, b.hidden, b.tokens, &one, b.dispatch, b.slots, x, b.hidden,
          &zero, slots_in, b.hidden);
}

void soft_moe_combine_forward(cublasHandle_t h, const SoftMoeBuffers& b, const float* slots_out,
                              float* y, cudaStream_t stream) {
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float one = 1.f, zero = 0.f;
  gemm_rm(h, false, false, b.tokens, b.hidden, b.slots, &one, b.combine, b.slots, slots_out,
          b.hidden, &zero, y, b.hidden);
}

void soft_moe_combine_backward(cublasHandle_t h, SoftMoeBuffers& b, const float* slots_out,
                               const float* dy, float* d_slots_out, cudaStream_t stream) {
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const int64_t T = b.tokens, H = b.hidden, n = b.slots;
  const float one = 1.f, zero = 0.f;
  if (T == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(d_slots_out, 0, n * H * 4, stream));
    return;
  }
  gemm_rm(h, false, true, T, n, H, &one, dy, H, slots_out, H, &zero, b.d_combine, n);
  gemm_rm(h, true, false, n, H, T, &one, b.combine, n, dy, H, &zero, d_slots_out, H);
}

void soft_moe_dispatch_backward(cublasHandle_t h, SoftMoeBuffers& b, const float* x,
                                const float* d_slots_in, float* dx, cudaStream_t stream) {
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const int64_t T = b.tokens, H = b.hidden, n = b.slots;
  if (T == 0) return;
  const float one = 1.f, zero = 0.f;
  gemm_rm(h, false, true, T, n, H, &one, x, H, d_slots_in, H, &zero, b.d_dispatch, n);
  gemm_rm(h, false, false, T, H, n, &one, b.dispatch, n, d_slots_in, H, &one, dx, H);
}

void soft_moe_route_backward(cublasHandle_t h, SoftMoeBuffers& b, const float* x,
                             const float* phi, const float* scale, float* dx, float* dphi,
                             float* dscale, cudaStream_t stream) {
  const int64_t T = b.tokens, H = b.hidden, n = b.slots;
  if (T == 0) return;
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  // the two softmaxes share the logits: dL = dispatch part + combine part
  dispatch_softmax_backward_kernel<<<unsigned(n), kBlock, 0, stream>>>(b.dispatch, b.d_dispatch,
                                                                       T, n, b.d_logits);
  MOE_CUDA_LAUNCH_CHECK();
  combine_softmax_backward_kernel<<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(
      b.combine, b.d_combine, T, n, b.d_logits);
  MOE_CUDA_LAUNCH_CHECK();
  scale_grad_kernel<<<1, kBlock, 0, stream>>>(b.d_logits, b.unscaled, T * n, dscale);
  MOE_CUDA_LAUNCH_CHECK();
  // L = scale * x_hat phi_hat: dx_hat = scale dL phi_hat^T, dphi_hat = scale x_hat^T dL, with
  // alpha read from device memory (so beta is too: b.zero, a 0 kept in the arena).
  MOE_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_DEVICE));
  gemm_rm(h, false, true, T, H, n, scale, b.d_logits, n, b.phi_norm, n, b.zero, b.dx_hat, H);
  gemm_rm(h, true, false, H, n, T, scale, b.x_norm, H, b.d_logits, n, b.zero, b.dphi_hat, n);
  MOE_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  x_norm_backward_kernel<<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(
      x, b.dx_hat, b.x_inv_norm, T, H, dx);
  MOE_CUDA_LAUNCH_CHECK();
  phi_norm_backward_kernel<<<blocks_for(n, kBlock), kBlock, 0, stream>>>(phi, b.dphi_hat,
                                                                         b.phi_inv_norm, H, n, dphi);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda
