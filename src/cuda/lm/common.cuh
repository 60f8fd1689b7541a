// defines: moe::cuda::lm::detail — align_up, carve, grid_for, is_aligned16, data_type, load_f,
//          store_f, gemm (row-major cublasGemmEx wrapper), column_sum, column_sum_final,
//          column_sum_scratch_bytes
// Small pieces shared by the files of src/cuda/lm/ (private to them).
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moe/cuda/check.cuh"
#include "moe/cuda/lm/layers.hpp"

namespace moe::cuda::lm::detail {

// Scratch and state slices start on 256 bytes: cuBLAS and the 16-byte vector paths want aligned
// operands, and 256 is what cudaMalloc gives the base.
constexpr size_t kAlign = 256;
inline size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Next slice of `count` elements of T from *cursor, which moves past it (aligned).
template <class T>
T* carve(char*& cursor, int64_t count) {
  T* p = reinterpret_cast<T*>(cursor);
  cursor += align_up(static_cast<size_t>(count) * sizeof(T));
  return p;
}

// Grid of a grid-stride elementwise kernel: enough blocks to fill an H100 (132 SMs x 2048
// threads / 256 = ~1000 blocks) without launching one block per 256 elements of a huge tensor.
inline unsigned grid_for(int64_t work, int threads = 256) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + threads - 1) / threads, 1, 4096));
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
constexpr cudaDataType_t data_type() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

template <class T>
__device__ __forceinline__ float load_f(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else return __bfloat162float(p[i]);
}
template <class T>
__device__ __forceinline__ void store_f(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) p[i] = v;
  else p[i] = __float2bfloat16_rn(v);
}

// Row-major C (M,Nc) = alpha * op(A) op(B) + beta * C with cuBLAS's column-major GEMM: a row-major
// (r,c) matrix is a column-major (c,r) one, so C^T = op(B)^T op(A)^T and the operands swap.
// trans_a / trans_b say whether A / B enter transposed (row-major sense); lda, ldb, ldc are the
// row-major leading dimensions (row strides). batch > 1 runs a strided-batched GEMM.
template <class TC>
void gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t M, int64_t Nc, int64_t K,
          float alpha, const bf16* A, int64_t lda, int64_t stride_a, const bf16* B, int64_t ldb,
          int64_t stride_b, float beta, TC* C, int64_t ldc, int64_t stride_c, int64_t batch,
          cudaStream_t stream) {
  if (M == 0 || Nc == 0 || batch == 0) return;
  MOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // first cuBLAS operand
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (batch == 1) {
    MOE_CUBLAS_CHECK(cublasGemmEx(handle, op_b, op_a, int(Nc), int(M), int(K), &alpha, B,
                                  CUDA_R_16BF, int(ldb), A, CUDA_R_16BF, int(lda), &beta, C,
                                  data_type<TC>(), int(ldc), CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
  } else {
    MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, op_b, op_a, int(Nc), int(M), int(K), &alpha, B, CUDA_R_16BF, int(ldb), stride_b, A,
        CUDA_R_16BF, int(lda), stride_a, &beta, C, data_type<TC>(), int(ldc), stride_c, int(batch),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic column sums: dst (C) += sum over the R rows of in (R,C), without atomics.
// Block (32 columns, 32 row lanes), grid (ceil(C/32), G): block g sums its slice of rows, lane y
// taking rows y, y+32, ...; the 32 lane sums are added in lane order. With G > 1 the G partial
// rows go to scratch (G,C) and a second launch (G = 1, G <= kColumnSumGroups rows) adds them up
// in group order. G depends on R alone, so the order — and the bits — are fixed.

constexpr int kColumnTile = 32;
constexpr int kColumnLanes = 32;
constexpr int64_t kColumnSumGroups = 256;   // the most partial rows (scratch G*C floats)
constexpr int64_t kColumnSumMinRows = 256;  // rows per group before a second group pays off

inline int64_t column_sum_groups(int64_t R) {
  return std::clamp<int64_t>((R + kColumnSumMinRows - 1) / kColumnSumMinRows, 1,
                             kColumnSumGroups);
}
inline size_t column_sum_scratch_bytes(int64_t R, int64_t C) {
  const int64_t G = column_sum_groups(R);
  return G > 1 ? align_up(static_cast<size_t>(G * C) * sizeof(float)) : 0;
}

// dst != null: dst[c] += the block's sum (grid.y must be 1); else partial[blockIdx.y*C + c] = it.
template <class T>
__global__ void __launch_bounds__(kColumnTile* kColumnLanes)
    column_sum_kernel(float* dst, float* partial, const T* in, int64_t R, int64_t C,
                      int64_t rows_per_group) {
  __shared__ float s_sum[kColumnLanes][kColumnTile + 1];  // +1: no bank conflicts on the read
  const int64_t c = int64_t{blockIdx.x} * kColumnTile + threadIdx.x;
  const int64_t r0 = int64_t{blockIdx.y} * rows_per_group;
  const int64_t r1 = std::min(R, r0 + rows_per_group);
  float acc = 0.f;
  if (c < C)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColumnLanes) acc += load_f(in, r * C + c);
  s_sum[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float sum = 0.f;
#pragma unroll
    for (int y = 0; y < kColumnLanes; ++y) sum += s_sum[y][threadIdx.x];
    if (dst) dst[c] += sum;
    else partial[int64_t{blockIdx.y} * C + c] = sum;
  }
}

// dst (C) += sum of the R rows of partial (R,C) fp32 in one group (R small: partial sums).
inline void column_sum_final(float* dst, const float* partial, int64_t R, int64_t C,
                             cudaStream_t stream) {
  if (C == 0) return;
  const dim3 grid(static_cast<unsigned>((C + kColumnTile - 1) / kColumnTile), 1);
  column_sum_kernel<float><<<grid, dim3(kColumnTile, kColumnLanes), 0, stream>>>(
      dst, nullptr, partial, R, C, R);
  MOE_CUDA_LAUNCH_CHECK();
}

// dst (C) fp32 += column sums of in (R,C); scratch: column_sum_scratch_bytes(R, C).
template <class T>
void column_sum(float* dst, const T* in, int64_t R, int64_t C, void* scratch,
                cudaStream_t stream) {
  if (R == 0 || C == 0) return;
  const int64_t G = column_sum_groups(R);
  const int64_t rows_per_group = (R + G - 1) / G;
  const dim3 grid(static_cast<unsigned>((C + kColumnTile - 1) / kColumnTile),
                  static_cast<unsigned>(G));
  float* partial = static_cast<float*>(scratch);
  MOE_CHECK(G == 1 || partial, "column_sum: scratch is null but ", G, " row groups need it");
  column_sum_kernel<T><<<grid, dim3(kColumnTile, kColumnLanes), 0, stream>>>(
      G == 1 ? dst : nullptr, partial, in, R, C, rows_per_group);
  MOE_CUDA_LAUNCH_CHECK();
  if (G > 1) column_sum_final(dst, partial, G, C, stream);
}

}  // namespace moe::cuda::lm::detail
