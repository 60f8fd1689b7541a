// defines: Vec, load_vec, store_vec, zero_vec, RowGrid, launch helpers shared by permute/combine
// Row-wise data movement for the token-major stages (permute, combine and their backwards).
// One warp owns one token: it reads the token's entries of the plan's inverse (token_offsets,
// token_rows, token_choices) and moves whole rows with 16-byte vectors, lane l taking vectors
// l, l+32, ... of the row so that each warp access is 512 contiguous bytes.
// A second set of warps zero-fills the padding rows (row_token == kPadToken), 32 rows per warp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "moe/cuda/check.cuh"
#include "moe/cuda/plan.hpp"

namespace moe::cuda::rows {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads: enough warps per block to fill an SM at 8 blocks
constexpr int kThreads = kWarp * kWarpsPerBlock;

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <class T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) {
  return __float2bfloat16_rn(v);
}

template <class T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}
template <class T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> z;
#pragma unroll
  for (int i = 0; i < N; ++i) z.v[i] = from_float<T>(0.f);
  return z;
}

// Elements per 16-byte vector, or 1 when the rows are not 16-byte aligned (H * sizeof(T) % 16 or
// a base pointer off alignment): the kernels are instantiated for both.
template <class T>
inline int vector_width(int64_t hidden, std::initializer_list<const void*> ptrs) {
  constexpr int w = 16 / sizeof(T);
  if (hidden % w) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return 1;
  return w;
}

// Grid: warps [0, T) take tokens, warps [T, T + pad_groups) zero-fill padding rows in groups of 32.
struct RowGrid {
  int64_t token_warps = 0, pad_groups = 0;
  __host__ __device__ int64_t warps() const { return token_warps + pad_groups; }
  unsigned blocks() const {
    const int64_t b = (warps() + kWarpsPerBlock - 1) / kWarpsPerBlock;
    return static_cast<unsigned>(b > 0 ? b : 1);
  }
};
inline RowGrid row_grid(const PlanShape& s, bool fill_padding) {
  RowGrid g;
  g.token_warps = s.tokens;
  // Dropless has no padding rows below M (rows in [M, max_rows) are never read or written).
  if (fill_padding && s.layout != Layout::dropless) g.pad_groups = (s.max_rows() + kWarp - 1) / kWarp;
  return g;
}

// Zero the padding rows among rows [32*group, 32*group + 32) of out (rows < M only).
template <class T, int kVec>
__device__ __forceinline__ void zero_padding_rows(const PlanView& plan, int64_t group, T* out,
                                                  int64_t hidden) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = group * kWarp + lane;
  const int32_t M = *plan.num_rows;
  const bool pad = r < M && plan.row_token[r] == static_cast<int32_t>(plan.shape.tokens);
  unsigned mask = __ballot_sync(0xffffffffu, pad);
  const Vec<T, kVec> z = zero_vec<T, kVec>();
  while (mask) {
    const int src = __ffs(mask) - 1;
    mask &= mask - 1;
    T* row = out + (group * kWarp + src) * hidden;
    for (int64_t i = lane * kVec; i < hidden; i += kWarp * kVec) store_vec<T, kVec>(row + i, z);
  }
}

}  // namespace moe::cuda::rows

namespace moe::cuda::rows {

// out[t] = sum over the token's kept rows j (choice order) of w_j * in[row_j], fp32 in registers.
// kWeighted: w_j = weight[token_choices[j]] (combine forward, out overwritten);
// else w_j = 1 and the sum is added to out (permute backward: dx += ..., like the CPU stage, so the
// router's and the shared experts' input gradients can land in the same buffer).
// Rows are taken 32 at a time into lane registers and broadcast by shuffle, so a token with K <= 32
// reads its row list once per chunk of the hidden dimension (those reads hit L1).
template <class T, int kVec, int kUnroll, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(PlanView plan, const float* __restrict__ weight, const T* __restrict__ in,
                      T* __restrict__ out, int64_t hidden) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (t >= plan.shape.tokens) return;
  const int32_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
  T* dst = out + t * hidden;
  constexpr int64_t kStep = int64_t{kWarp} * kVec * kUnroll;  // elements per warp per chunk
  for (int64_t base = 0; base < hidden; base += kStep) {
    float acc[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t{u} * kWarp + lane) * kVec;
      Vec<T, kVec> prev = zero_vec<T, kVec>();
      if (!kWeighted && base + i < hidden) prev = load_vec<T, kVec>(dst + base + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[u][k] = to_float(prev.v[k]);
    }
    for (int32_t jb = j0; jb < j1; jb += kWarp) {
      const int nj = min(kWarp, j1 - jb);
      int32_t my_row = kDropped;
      float my_w = 1.f;
      if (lane < nj) {
        my_row = plan.token_rows[jb + lane];
        if (kWeighted && my_row >= 0) my_w = weight[plan.token_choices[jb + lane]];
      }
      for (int j = 0; j < nj; ++j) {
        const int32_t r = __shfl_sync(0xffffffffu, my_row, j);
        const float w = __shfl_sync(0xffffffffu, my_w, j);
        if (r < 0) continue;  // dropped or kNoExpert: adds nothing
        const T* src = in + int64_t{r} * hidden + base;
        Vec<T, kVec> v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = (int64_t{u} * kWarp + lane) * kVec;
          if (base + i < hidden) v[u] = load_vec<T, kVec>(src + i);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            acc[u][i] = kWeighted ? fmaf(w, to_float(v[u].v[i]), acc[u][i])
                                  : acc[u][i] + to_float(v[u].v[i]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t{u} * kWarp + lane) * kVec;
      if (base + i >= hidden) continue;
      Vec<T, kVec> o;
#pragma unroll
      for (int k = 0; k < kVec; ++k) o.v[k] = from_float<T>(acc[u][k]);
      store_vec<T, kVec>(dst + base + i, o);
    }
  }
}

template <class T, bool kWeighted>
void launch_gather_sum(const PlanView& plan, const float* weight, const T* in, int64_t hidden,
                       T* out, cudaStream_t stream) {
  if (plan.shape.tokens == 0 || hidden == 0) return;
  const RowGrid grid = row_grid(plan.shape, false);
  constexpr int kWide = 16 / sizeof(T);
  if (vector_width<T>(hidden, {in, out}) == kWide)
    gather_sum_kernel<T, kWide, 4, kWeighted>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, weight, in, out, hidden);
  else
    gather_sum_kernel<T, 1, 4, kWeighted>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, weight, in, out, hidden);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::rows
