// defines: SoftMoeBuffers, soft_moe_{logits,dispatch_softmax,combine_softmax,route}_forward,
//          soft_moe_{dispatch,combine}_{forward,backward}, soft_moe_route_backward
// Soft MoE on the device; include/moe/cuda/soft_moe.hpp has the contract and
// src/cpu/soft_moe.cpp the specification. Element type Elem = float or __nv_bfloat16 for the
// activations and the dispatch/combine weights; router math in fp32 on both.
//   norms:     a warp per token row of x (16-byte packs); phi's columns in chunks of 256 rows
//              (the column reductions below)
//   logits:    cuBLAS (x phi), raw operands; a kernel applies the inverse norms and the scale
//   dispatch:  softmax over tokens = over a column of the row-major (T, n) logits. Reading a
//              column from one block is strided by n; instead each block reduces a chunk of 256
//              rows for 32 adjacent columns (coalesced: a warp reads 32 consecutive floats of a
//              row) into a per-chunk (max, sum) with the online rescaling, a second kernel merges
//              the chunks of each column in chunk order, a third writes the weights. With groups
//              (SoftMoeBuffers(cfg, G)) the chunks are per group (grid z) and so are the statistics
//   combine:   softmax over the slots of a token: a warp per row
//   GEMMs:     cuBLAS, row-major operands, fp32 accumulation (CUBLAS_COMPUTE_32F)
// Backward: the dispatch softmax's column dots take the same chunked path (as do phi's column
// sums of squares forward and <phi, Q> backward, over H rows); one warp-per-token
// kernel then forms dL from both softmaxes, the token's share of d scale, and
// G = scale inv_x inv_phi dL, the one (T, n) operand of both norm GEMMs:
//   x_hat = inv_x x  =>  dx = inv_x dx_hat - inv_x^3 x <x, dx_hat>, dx_hat = scale dL phi_hat^T,
//   so with P = G phi^T = inv_x dx_hat:      dx   += P - inv_x^2 x <x, P>
//   and with Q = x^T G = inv_phi dphi_hat:   dphi += Q - inv_phi^2 phi <phi, Q>.
// Every reduction has a fixed order (no atomics): same inputs, same bits.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/soft_moe.hpp"
#include "rows.cuh"  // defines: rows::Pack, load_pack, store_pack, vector_width
#include "warp.cuh"  // defines: warp_sum, warp_max

namespace moe::cuda {

namespace {

using rows::Cache;
using rows::Pack;

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr int kColWarps = kBlock / kWarp;  // warps over rows in the chunked column kernels
constexpr float kNormEps = 1e-6f;
constexpr int64_t kMaxGridY = 65535;

template <class Elem>
constexpr cudaDataType_t data_type() {
  return std::is_same_v<Elem, float> ? CUDA_R_32F : CUDA_R_16BF;
}
template <class Elem>
__device__ __forceinline__ float to_f(Elem v) {
  if constexpr (std::is_same_v<Elem, float>)
    return v;
  else
    return __bfloat162float(v);
}
template <class Elem>
__device__ __forceinline__ Elem from_f(float v) {
  if constexpr (std::is_same_v<Elem, float>)
    return v;
  else
    return __float2bfloat16_rn(v);
}

// Row-major C(m,n) = alpha op(A)(m,k) op(B)(k,n) + beta C as the column-major product
// C^T = op(B)^T op(A)^T: swap the operands, keep the transpose flags. A and B share the element
// type In (cuBLAS multiplies operands of one type); C is In or fp32; compute is fp32.
template <class In, class Out>
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
             const In* A, int64_t lda, const In* B, int64_t ldb, float beta, Out* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  MOE_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                int(n), int(m), int(k), &alpha, B, data_type<In>(), int(ldb), A,
                                data_type<In>(), int(lda), &beta, C, data_type<Out>(), int(ldc),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The per-group products: batch g of row-major C_g(m,n) = alpha op(A_g) op(B_g) + beta C_g, the
// operands sA, sB, sC elements apart. One group is cublasGemmEx, as before groups existed.
template <class In, class Out>
void gemm_rm_groups(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                    float alpha, const In* A, int64_t lda, int64_t sA, const In* B, int64_t ldb,
                    int64_t sB, float beta, Out* C, int64_t ldc, int64_t sC, int64_t groups) {
  if (groups == 1) {
    gemm_rm<In, Out>(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (m == 0 || n == 0 || groups == 0) return;
  MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m), int(k),
      &alpha, B, data_type<In>(), int(ldb), sB, A, data_type<In>(), int(lda), sA, &beta, C,
      data_type<Out>(), int(ldc), sC, int(groups), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The launchers pass alpha and beta from the host.
void bind(cublasHandle_t h, cudaStream_t stream) {
  MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  MOE_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
}


// (m, s) <- the softmax statistics of the union: max and sum of exp(v - max).
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  if (!(s2 > 0.f)) return;  // an empty part
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * expf(m2 - m);
  }
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block));
}

// ------------------------------------------------------------------------------------------------
// forward kernels
// ------------------------------------------------------------------------------------------------

// inv[t] = 1 / sqrt(|x[t]|^2 + eps); a warp per token, lane l summing packs l, l+32, ... in order.
template <class Elem, int kVec>
__global__ void __launch_bounds__(kBlock)
    x_inv_norm_kernel(const Elem* __restrict__ x, int64_t T, int64_t H, float* __restrict__ inv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const Elem* row = x + t * H;
  float sq = 0.f;
  for (int64_t h = int64_t{lane} * kVec; h < H; h += kWarp * kVec) {
    const Pack<Elem, kVec> v = rows::load_pack<Cache::kDefault, Elem, kVec>(row + h);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sq = fmaf(v.get(i), v.get(i), sq);
  }
  sq = warp_sum(sq);
  if (lane == 0) inv[t] = 1.f / sqrtf(sq + kNormEps);
}

// raw (x phi, in `unscaled`) -> unscaled = raw * inv_x[t] * inv_phi[j], logits = scale * unscaled.
__global__ void logits_kernel(const float* __restrict__ inv_x, const float* __restrict__ inv_phi,
                              const float* __restrict__ scale, int64_t T, int64_t n,
                              float* __restrict__ unscaled, float* __restrict__ logits) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < T * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / n, j = i - t * n;
    const float u = unscaled[i] * inv_x[t] * inv_phi[j];
    unscaled[i] = u;
    logits[i] = s * u;
  }
}

// Dispatch, step 1: per group, chunk of kSoftMoeRowChunk rows and column j,
// (max, sum exp(L - max)) over the group's B rows. blockIdx.x: 32 columns, blockIdx.y: the chunk,
// blockIdx.z: the group; warp w takes rows w, w + 8, ... of the chunk.
// partial: (G, chunks, n, 2), chunks = gridDim.y.
__global__ void __launch_bounds__(kBlock)
    column_max_sum_partial_kernel(const float* __restrict__ L, int64_t B, int64_t n,
                                  float* __restrict__ partial) {
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
  const int64_t j = blockIdx.x * int64_t{kWarp} + lane;
  const int64_t chunk = int64_t{blockIdx.z} * gridDim.y + blockIdx.y;  // (group, chunk)
  L += int64_t{blockIdx.z} * B * n;
  const int64_t r0 = int64_t{blockIdx.y} * kSoftMoeRowChunk,
                r1 = std::min(B, r0 + kSoftMoeRowChunk);
  float m = -INFINITY, s = 0.f;
  if (j < n) {
#pragma unroll 8
    for (int64_t t = r0 + w; t < r1; t += kColWarps) {
      const float v = L[t * n + j];
      if (v > m) {
        s = s * expf(m - v) + 1.f;
        m = v;
      } else {
        s += expf(v - m);
      }
    }
  }
  __shared__ float pm[kColWarps][kWarp], ps[kColWarps][kWarp];
  pm[w][lane] = m;
  ps[w][lane] = s;
  __syncthreads();
  if (w == 0 && j < n) {
    float M = pm[0][lane], S = ps[0][lane];
    for (int k = 1; k < kColWarps; ++k) merge_max_sum(M, S, pm[k][lane], ps[k][lane]);
    partial[2 * (chunk * n + j)] = M;
    partial[2 * (chunk * n + j) + 1] = S;
  }
}

// Dispatch, step 2: merge the chunks of column j of group g in chunk order; a thread per
// (g, j) of the (G, n) statistics.
__global__ void column_max_sum_finalize_kernel(const float* __restrict__ partial, int64_t chunks,
                                               int64_t groups, int64_t n,
                                               float* __restrict__ col_max,
                                               float* __restrict__ col_sum) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= groups * n) return;
  const int64_t g = i / n, j = i - g * n;
  partial += 2 * g * chunks * n;
  float m = -INFINITY, s = 0.f;
  for (int64_t c = 0; c < chunks; ++c)
    merge_max_sum(m, s, partial[2 * (c * n + j)], partial[2 * (c * n + j) + 1]);
  col_max[i] = m;
  col_sum[i] = s;
}

// Dispatch, step 3: D[t, j] = exp(L[t, j] - max_gj) / sum_gj with g = t / B, rounded to Elem.
template <class Elem>
__global__ void dispatch_weights_kernel(const float* __restrict__ L,
                                        const float* __restrict__ col_max,
                                        const float* __restrict__ col_sum, int64_t T, int64_t B,
                                        int64_t n, Elem* __restrict__ D) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < T * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / n, j = i - t * n, c = (t / B) * n + j;
    D[i] = from_f<Elem>(expf(L[i] - col_max[c]) / col_sum[c]);
  }
}

// Combine: softmax over the slots of token t; a warp per token (the row's later passes hit L1).
template <class Elem>
__global__ void __launch_bounds__(kBlock)
    combine_softmax_kernel(const float* __restrict__ L, int64_t T, int64_t n,
                           Elem* __restrict__ C) {
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
  for (int64_t j = lane; j < n; j += kWarp) C[t * n + j] = from_f<Elem>(expf(row[j] - m) / s);
}

// ------------------------------------------------------------------------------------------------
// backward kernels
// ------------------------------------------------------------------------------------------------

// Per group (blockIdx.z), chunk of kSoftMoeRowChunk rows (blockIdx.y) and column j of two
// row-major (G, rows, n) matrices: partial[(g, chunk), j] = <a[g, chunk rows, j], b[g, chunk rows,
// j]>. The layout of column_max_sum_partial_kernel (32 columns per block, 8 warps over the chunk's
// rows). Used for the dispatch softmax's backward (D, dD: rows = B per group) and for phi's
// columns (phi, phi and phi, Q: rows = H, one group; one thread per column of a (4096, 128) phi
// was 4096 dependent loads on 4 blocks).
template <class A, class B>
__global__ void __launch_bounds__(kBlock)
    column_dot_partial_kernel(const A* __restrict__ a, const B* __restrict__ b, int64_t rows,
                              int64_t n, float* __restrict__ partial) {
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
  const int64_t j = blockIdx.x * int64_t{kWarp} + lane;
  const int64_t chunk = int64_t{blockIdx.z} * gridDim.y + blockIdx.y;  // (group, chunk)
  a += int64_t{blockIdx.z} * rows * n;
  b += int64_t{blockIdx.z} * rows * n;
  const int64_t r0 = int64_t{blockIdx.y} * kSoftMoeRowChunk,
                r1 = std::min(rows, r0 + kSoftMoeRowChunk);
  float dot = 0.f;
  if (j < n) {
#pragma unroll 8
    for (int64_t r = r0 + w; r < r1; r += kColWarps)
      dot = fmaf(to_f(a[r * n + j]), to_f(b[r * n + j]), dot);
  }
  __shared__ float pd[kColWarps][kWarp];
  pd[w][lane] = dot;
  __syncthreads();
  if (w == 0 && j < n) {
    float s = pd[0][lane];
    for (int k = 1; k < kColWarps; ++k) s += pd[k][lane];
    partial[chunk * n + j] = s;
  }
}

// out[g, j] = the chunks' partials of column j of group g added in chunk order; a thread per
// (g, j). kInvNorm: 1 / sqrt(sum + eps).
template <bool kInvNorm>
__global__ void column_sum_finalize_kernel(const float* __restrict__ partial, int64_t chunks,
                                           int64_t groups, int64_t n, float* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= groups * n) return;
  const int64_t g = i / n, j = i - g * n;
  partial += g * chunks * n;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * n + j];
  out[i] = kInvNorm ? 1.f / sqrtf(s + kNormEps) : s;
}

// A warp per token t (of group g = t / B):
//   dL[t, j]  = D (dD - <D[g, :, j], dD[g, :, j]>) + C (dC - <C[t, :], dC[t, :]>)  (both softmaxes)
//   G[t, j]   = scale * inv_x[t] * inv_phi[j] * dL[t, j]                      (rounded to Elem)
//   scale_partial[t] = sum_j dL[t, j] * unscaled[t, j]                        (d scale, per token)
template <class Elem>
__global__ void __launch_bounds__(kBlock)
    logits_backward_kernel(const Elem* __restrict__ D, const float* __restrict__ dD,
                           const Elem* __restrict__ C, const float* __restrict__ dC,
                           const float* __restrict__ unscaled, const float* __restrict__ col_dot,
                           const float* __restrict__ inv_x, const float* __restrict__ inv_phi,
                           const float* __restrict__ scale, int64_t T, int64_t B, int64_t n,
                           Elem* __restrict__ G, float* __restrict__ scale_partial) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const int64_t base = t * n;
  col_dot += (t / B) * n;
  float row_dot = 0.f;
  for (int64_t j = lane; j < n; j += kWarp)
    row_dot = fmaf(to_f(C[base + j]), dC[base + j], row_dot);
  row_dot = warp_sum(row_dot);
  const float sx = *scale * inv_x[t];
  float acc = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) {
    const int64_t i = base + j;
    const float dl = to_f(D[i]) * (dD[i] - col_dot[j]) + to_f(C[i]) * (dC[i] - row_dot);
    acc = fmaf(dl, unscaled[i], acc);
    G[i] = from_f<Elem>(sx * inv_phi[j] * dl);
  }
  acc = warp_sum(acc);
  if (lane == 0) scale_partial[t] = acc;
}

// dscale += sum_t scale_partial[t]; one block, fixed order (strided in double, then a tree).
__global__ void __launch_bounds__(kBlock)
    scale_grad_finalize_kernel(const float* __restrict__ scale_partial, int64_t T,
                               float* __restrict__ dscale) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < T; i += kBlock) acc += scale_partial[i];
  __shared__ double buf[kBlock];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *dscale += static_cast<float>(buf[0]);
}

// dx[t] += P[t] - inv_x[t]^2 * x[t] * <x[t], P[t]>; a warp per token, fp32 then one rounding.
template <class Elem, int kVec>
__global__ void __launch_bounds__(kBlock)
    x_norm_backward_kernel(const Elem* __restrict__ x, const Elem* __restrict__ P,
                           const float* __restrict__ inv_x, int64_t T, int64_t H, Elem* dx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const Elem* xr = x + t * H;
  const Elem* pr = P + t * H;
  Elem* dr = dx + t * H;
  float dot = 0.f;
  for (int64_t h = int64_t{lane} * kVec; h < H; h += kWarp * kVec) {
    const Pack<Elem, kVec> a = rows::load_pack<Cache::kDefault, Elem, kVec>(xr + h);
    const Pack<Elem, kVec> p = rows::load_pack<Cache::kDefault, Elem, kVec>(pr + h);
#pragma unroll
    for (int i = 0; i < kVec; ++i) dot = fmaf(a.get(i), p.get(i), dot);
  }
  dot = warp_sum(dot);
  const float c = inv_x[t] * inv_x[t] * dot;
  for (int64_t h = int64_t{lane} * kVec; h < H; h += kWarp * kVec) {
    const Pack<Elem, kVec> a = rows::load_pack<Cache::kDefault, Elem, kVec>(xr + h);
    const Pack<Elem, kVec> p = rows::load_pack<Cache::kDefault, Elem, kVec>(pr + h);
    Pack<Elem, kVec> d;
    if constexpr (kVec == 1)
      d.raw = dr[h];
    else
      d.raw = *reinterpret_cast<const uint4*>(dr + h);  // dx is read and written: no __ldg
    float out[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = d.get(i) + (p.get(i) - c * a.get(i));
    d.set_all(out);
    rows::store_pack<Cache::kDefault, Elem, kVec>(dr + h, d);
  }
}

// dphi[h, j] += Q[h, j] - inv_phi[j]^2 * dot[j] * phi[h, j], dot[j] = <phi[:, j], Q[:, j]>.
template <class Elem>
__global__ void phi_norm_backward_kernel(const Elem* __restrict__ phi, const float* __restrict__ Q,
                                         const float* __restrict__ inv_phi,
                                         const float* __restrict__ dot, int64_t H, int64_t n,
                                         float* __restrict__ dphi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < H * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = i % n;
    dphi[i] += Q[i] - inv_phi[j] * inv_phi[j] * dot[j] * to_f(phi[i]);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// buffers
// ------------------------------------------------------------------------------------------------

template <class Elem>
SoftMoeBuffers<Elem>::SoftMoeBuffers(const LayerConfig& cfg, int64_t num_groups) {
  MOE_CHECK(cfg.router == Router::soft_moe, "SoftMoeBuffers: router is ", name(cfg.router));
  MOE_CHECK(num_groups >= 1 && num_groups <= kMaxGridY, "SoftMoeBuffers: groups must be in [1, ",
            kMaxGridY, "] (a grid dimension), got ", num_groups);
  groups = num_groups;
  group_tokens = cfg.tokens;
  tokens = groups * group_tokens;
  hidden = cfg.hidden;
  slots = cfg.experts * cfg.slots_per_expert;
  row_chunks = std::max<int64_t>(1, (group_tokens + kSoftMoeRowChunk - 1) / kSoftMoeRowChunk);
  hidden_chunks = std::max<int64_t>(1, (hidden + kSoftMoeRowChunk - 1) / kSoftMoeRowChunk);
  MOE_CHECK(row_chunks <= kMaxGridY, "SoftMoeBuffers: tokens ", group_tokens, " above ",
            kMaxGridY * kSoftMoeRowChunk, " (row chunks are a grid dimension)");
  MOE_CHECK(hidden_chunks <= kMaxGridY, "SoftMoeBuffers: hidden ", hidden, " above ",
            kMaxGridY * kSoftMoeRowChunk, " (row chunks of phi are a grid dimension)");
  MOE_CHECK(tokens < (int64_t{1} << 31) && slots < (int64_t{1} << 31) &&
                groups * hidden < (int64_t{1} << 31),
            "SoftMoeBuffers: groups * tokens, slots and groups * hidden must each be below 2^31 "
            "(cuBLAS int sizes and leading dimensions)");
  const size_t T = tokens, H = hidden, n = slots, G = groups, es = sizeof(Elem), f = sizeof(float);
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  arena = DeviceArena({{"x_inv_norm", T * f, p(x_inv_norm)},
                       {"phi_inv_norm", n * f, p(phi_inv_norm)},
                       {"phi_partial", size_t(hidden_chunks) * n * f, p(phi_partial)},
                       {"phi_dot", n * f, p(phi_dot)},
                       {"unscaled", T * n * f, p(unscaled)},
                       {"logits", T * n * f, p(logits)},
                       {"col_partial", G * size_t(row_chunks) * n * 2 * f, p(col_partial)},
                       {"col_max", G * n * f, p(col_max)},
                       {"col_sum", G * n * f, p(col_sum)},
                       {"dispatch", T * n * es, p(dispatch)},
                       {"combine", T * n * es, p(combine)},
                       {"d_combine", T * n * f, p(d_combine)},
                       {"d_dispatch", T * n * f, p(d_dispatch)},
                       {"col_dot", G * n * f, p(col_dot)},
                       {"scale_partial", T * f, p(scale_partial)},
                       {"g", T * n * es, p(g)},
                       {"dx_raw", T * H * es, p(dx_raw)},
                       {"dphi_raw", H * n * f, p(dphi_raw)}});
}

// ------------------------------------------------------------------------------------------------
// forward launchers
// ------------------------------------------------------------------------------------------------

template <class Elem>
void soft_moe_logits_forward(cublasHandle_t h, const Elem* x, const Elem* phi, const float* scale,
                             SoftMoeBuffers<Elem>& b, cudaStream_t stream) {
  const int64_t T = b.tokens, H = b.hidden, n = b.slots;
  if (T == 0) return;
  bind(h, stream);
  const unsigned token_blocks = blocks_for(T, kBlock / kWarp);
  if (rows::vector_width<Elem>(H, {x}) > 1)
    x_inv_norm_kernel<Elem, 16 / sizeof(Elem)>
        <<<token_blocks, kBlock, 0, stream>>>(x, T, H, b.x_inv_norm);
  else
    x_inv_norm_kernel<Elem, 1><<<token_blocks, kBlock, 0, stream>>>(x, T, H, b.x_inv_norm);
  MOE_CUDA_LAUNCH_CHECK();
  const dim3 phi_grid(blocks_for(n, kWarp), static_cast<unsigned>(b.hidden_chunks));
  column_dot_partial_kernel<Elem, Elem>
      <<<phi_grid, kBlock, 0, stream>>>(phi, phi, H, n, b.phi_partial);
  MOE_CUDA_LAUNCH_CHECK();
  column_sum_finalize_kernel<true><<<blocks_for(n, kBlock), kBlock, 0, stream>>>(
      b.phi_partial, b.hidden_chunks, 1, n, b.phi_inv_norm);
  MOE_CUDA_LAUNCH_CHECK();
  gemm_rm<Elem, float>(h, false, false, T, n, H, 1.f, x, H, phi, n, 0.f, b.unscaled, n);
  logits_kernel<<<blocks_for(T * n, kBlock), kBlock, 0, stream>>>(
      b.x_inv_norm, b.phi_inv_norm, scale, T, n, b.unscaled, b.logits);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class Elem>
void soft_moe_dispatch_softmax_forward(SoftMoeBuffers<Elem>& b, cudaStream_t stream) {
  const int64_t T = b.tokens, B = b.group_tokens, G = b.groups, n = b.slots;
  if (T == 0) return;
  const dim3 grid(blocks_for(n, kWarp), static_cast<unsigned>(b.row_chunks),
                  static_cast<unsigned>(G));
  column_max_sum_partial_kernel<<<grid, kBlock, 0, stream>>>(b.logits, B, n, b.col_partial);
  MOE_CUDA_LAUNCH_CHECK();
  column_max_sum_finalize_kernel<<<blocks_for(G * n, kBlock), kBlock, 0, stream>>>(
      b.col_partial, b.row_chunks, G, n, b.col_max, b.col_sum);
  MOE_CUDA_LAUNCH_CHECK();
  dispatch_weights_kernel<Elem><<<blocks_for(T * n, kBlock), kBlock, 0, stream>>>(
      b.logits, b.col_max, b.col_sum, T, B, n, b.dispatch);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class Elem>
void soft_moe_combine_softmax_forward(SoftMoeBuffers<Elem>& b, cudaStream_t stream) {
  const int64_t T = b.tokens, n = b.slots;
  if (T == 0) return;
  combine_softmax_kernel<Elem>
      <<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(b.logits, T, n, b.combine);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class Elem>
void soft_moe_route_forward(cublasHandle_t h, const Elem* x, const Elem* phi, const float* scale,
                            SoftMoeBuffers<Elem>& b, cudaStream_t stream) {
  soft_moe_logits_forward(h, x, phi, scale, b, stream);
  soft_moe_dispatch_softmax_forward(b, stream);
  soft_moe_combine_softmax_forward(b, stream);
}

template <class Elem>
void soft_moe_dispatch_forward(cublasHandle_t h, const SoftMoeBuffers<Elem>& b, const Elem* x,
                               Elem* slots_in, cudaStream_t stream) {
  const int64_t B = b.group_tokens, G = b.groups, H = b.hidden, n = b.slots;
  if (b.tokens == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(slots_in, 0, n * G * H * sizeof(Elem), stream));
    return;
  }
  bind(h, stream);
  // group g: slots_in[:, g, :] (n, H; rows G * H apart) = D[g]^T (n, B) x[g] (B, H)
  gemm_rm_groups<Elem, Elem>(h, true, false, n, H, B, 1.f, b.dispatch, n, B * n, x, H, B * H, 0.f,
                             slots_in, G * H, H, G);
}

template <class Elem>
void soft_moe_combine_forward(cublasHandle_t h, const SoftMoeBuffers<Elem>& b,
                              const Elem* slots_out, Elem* y, cudaStream_t stream) {
  const int64_t B = b.group_tokens, G = b.groups, H = b.hidden, n = b.slots;
  if (b.tokens == 0) return;
  bind(h, stream);
  // group g: y[g] (B, H) = C[g] (B, n) slots_out[:, g, :] (n, H; rows G * H apart)
  gemm_rm_groups<Elem, Elem>(h, false, false, B, H, n, 1.f, b.combine, n, B * n, slots_out, G * H,
                             H, 0.f, y, H, B * H, G);
}

// ------------------------------------------------------------------------------------------------
// backward launchers
// ------------------------------------------------------------------------------------------------

template <class Elem>
void soft_moe_combine_backward(cublasHandle_t h, SoftMoeBuffers<Elem>& b, const Elem* slots_out,
                               const Elem* dy, Elem* d_slots_out, cudaStream_t stream) {
  const int64_t T = b.tokens, B = b.group_tokens, G = b.groups, H = b.hidden, n = b.slots;
  if (T == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(d_slots_out, 0, n * G * H * sizeof(Elem), stream));
    return;
  }
  bind(h, stream);
  // dC[g] (B, n) = dy[g] slots_out[:, g, :]^T;  d_slots_out[:, g, :] (n, H) = C[g]^T dy[g]
  gemm_rm_groups<Elem, float>(h, false, true, B, n, H, 1.f, dy, H, B * H, slots_out, G * H, H, 0.f,
                              b.d_combine, n, B * n, G);
  gemm_rm_groups<Elem, Elem>(h, true, false, n, H, B, 1.f, b.combine, n, B * n, dy, H, B * H, 0.f,
                             d_slots_out, G * H, H, G);
}

template <class Elem>
void soft_moe_dispatch_backward(cublasHandle_t h, SoftMoeBuffers<Elem>& b, const Elem* x,
                                const Elem* d_slots_in, Elem* dx, cudaStream_t stream) {
  const int64_t T = b.tokens, B = b.group_tokens, G = b.groups, H = b.hidden, n = b.slots;
  if (T == 0) return;
  bind(h, stream);
  // dD[g] (B, n) = x[g] d_slots_in[:, g, :]^T;  dx[g] (B, H) += D[g] d_slots_in[:, g, :]
  gemm_rm_groups<Elem, float>(h, false, true, B, n, H, 1.f, x, H, B * H, d_slots_in, G * H, H, 0.f,
                              b.d_dispatch, n, B * n, G);
  gemm_rm_groups<Elem, Elem>(h, false, false, B, H, n, 1.f, b.dispatch, n, B * n, d_slots_in, G * H,
                             H, 1.f, dx, H, B * H, G);
}

template <class Elem>
void soft_moe_route_backward(cublasHandle_t h, SoftMoeBuffers<Elem>& b, const Elem* x,
                             const Elem* phi, const float* scale, Elem* dx, float* dphi,
                             float* dscale, cudaStream_t stream) {
  const int64_t T = b.tokens, B = b.group_tokens, G = b.groups, H = b.hidden, n = b.slots;
  if (T == 0) return;
  bind(h, stream);
  // the dispatch softmax's column dots <D[g, :, j], dD[g, :, j]> per group, in row chunks
  const dim3 grid(blocks_for(n, kWarp), static_cast<unsigned>(b.row_chunks),
                  static_cast<unsigned>(G));
  column_dot_partial_kernel<Elem, float>
      <<<grid, kBlock, 0, stream>>>(b.dispatch, b.d_dispatch, B, n, b.col_partial);
  MOE_CUDA_LAUNCH_CHECK();
  column_sum_finalize_kernel<false><<<blocks_for(G * n, kBlock), kBlock, 0, stream>>>(
      b.col_partial, b.row_chunks, G, n, b.col_dot);
  MOE_CUDA_LAUNCH_CHECK();
  // dL of both softmaxes (they share the logits) -> G and the per-token d scale
  logits_backward_kernel<Elem><<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(
      b.dispatch, b.d_dispatch, b.combine, b.d_combine, b.unscaled, b.col_dot, b.x_inv_norm,
      b.phi_inv_norm, scale, T, B, n, b.g, b.scale_partial);
  MOE_CUDA_LAUNCH_CHECK();
  scale_grad_finalize_kernel<<<1, kBlock, 0, stream>>>(b.scale_partial, T, dscale);
  MOE_CUDA_LAUNCH_CHECK();
  // P = G phi^T (T, H) and Q = x^T G (H, n), then the norms' backward
  gemm_rm<Elem, Elem>(h, false, true, T, H, n, 1.f, b.g, n, phi, n, 0.f, b.dx_raw, H);
  gemm_rm<Elem, float>(h, true, false, H, n, T, 1.f, x, H, b.g, n, 0.f, b.dphi_raw, n);
  const unsigned token_blocks = blocks_for(T, kBlock / kWarp);
  if (rows::vector_width<Elem>(H, {x, dx, b.dx_raw}) > 1)
    x_norm_backward_kernel<Elem, 16 / sizeof(Elem)>
        <<<token_blocks, kBlock, 0, stream>>>(x, b.dx_raw, b.x_inv_norm, T, H, dx);
  else
    x_norm_backward_kernel<Elem, 1>
        <<<token_blocks, kBlock, 0, stream>>>(x, b.dx_raw, b.x_inv_norm, T, H, dx);
  MOE_CUDA_LAUNCH_CHECK();
  const dim3 phi_grid(blocks_for(n, kWarp), static_cast<unsigned>(b.hidden_chunks));
  column_dot_partial_kernel<Elem, float>
      <<<phi_grid, kBlock, 0, stream>>>(phi, b.dphi_raw, H, n, b.phi_partial);
  MOE_CUDA_LAUNCH_CHECK();
  column_sum_finalize_kernel<false><<<blocks_for(n, kBlock), kBlock, 0, stream>>>(
      b.phi_partial, b.hidden_chunks, 1, n, b.phi_dot);
  MOE_CUDA_LAUNCH_CHECK();
  phi_norm_backward_kernel<Elem><<<blocks_for(H * n, kBlock), kBlock, 0, stream>>>(
      phi, b.dphi_raw, b.phi_inv_norm, b.phi_dot, H, n, dphi);
  MOE_CUDA_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// instantiations: fp32 and bf16
// ------------------------------------------------------------------------------------------------

#define MOE_INSTANTIATE(Elem)                                                                     \
  template struct SoftMoeBuffers<Elem>;                                                           \
  template void soft_moe_logits_forward<Elem>(cublasHandle_t, const Elem*, const Elem*,           \
                                              const float*, SoftMoeBuffers<Elem>&, cudaStream_t); \
  template void soft_moe_dispatch_softmax_forward<Elem>(SoftMoeBuffers<Elem>&, cudaStream_t);     \
  template void soft_moe_combine_softmax_forward<Elem>(SoftMoeBuffers<Elem>&, cudaStream_t);      \
  template void soft_moe_route_forward<Elem>(cublasHandle_t, const Elem*, const Elem*,            \
                                             const float*, SoftMoeBuffers<Elem>&, cudaStream_t);  \
  template void soft_moe_dispatch_forward<Elem>(cublasHandle_t, const SoftMoeBuffers<Elem>&,      \
                                                const Elem*, Elem*, cudaStream_t);                \
  template void soft_moe_combine_forward<Elem>(cublasHandle_t, const SoftMoeBuffers<Elem>&,       \
                                               const Elem*, Elem*, cudaStream_t);                 \
  template void soft_moe_combine_backward<Elem>(cublasHandle_t, SoftMoeBuffers<Elem>&,            \
                                                const Elem*, const Elem*, Elem*, cudaStream_t);   \
  template void soft_moe_dispatch_backward<Elem>(cublasHandle_t, SoftMoeBuffers<Elem>&,           \
                                                 const Elem*, const Elem*, Elem*, cudaStream_t);  \
  template void soft_moe_route_backward<Elem>(cublasHandle_t, SoftMoeBuffers<Elem>&, const Elem*, \
                                              const Elem*, const float*, Elem*, float*, float*,   \
                                              cudaStream_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(__nv_bfloat16)
#undef MOE_INSTANTIATE

}  // namespace moe::cuda
