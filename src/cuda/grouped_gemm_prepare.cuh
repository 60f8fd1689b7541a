// defines: moe::cuda::grouped_gemm::{PrepareParams, prepare_kernel, WgradPrepareParams,
//          wgrad_prepare_kernel, packed_stride, TileSum}
// Segments -> grouped-GEMM problems, on the device. The plan leaves offsets[E+1] in device memory;
// this kernel writes, for every expert e, its problem {m_e, N, K}, the A/B/D pointers of its
// segment and the strides CUTLASS's ptr-array collectives read. CUTLASS's grouped tile scheduler
// then walks the problems on the device (experts with m_e = 0 get no tile), so the host never
// learns a segment size.
//
// One block of min(E, 1024) threads, each thread one or more experts (E <= 4096 from the plan's
// limits): the work is E tiny records, a single launch is cheapest.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

#include <cstdint>

#include <cute/tensor.hpp>

#include "moe/cuda/check.cuh"
#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda::grouped_gemm {

// A rank-3 CuTe stride (rows, cols, batch) of a packed 2-D matrix with leading dimension `ld`:
// exactly one of modes 0/1 is dynamic (the other is _1, the contiguous one); a dynamic batch
// stride is 0 (one matrix per expert).
template <class Stride>
__host__ __device__ Stride packed_stride(int64_t ld) {
  Stride s{};
  using M0 = cute::remove_cvref_t<decltype(cute::get<0>(s))>;
  using M1 = cute::remove_cvref_t<decltype(cute::get<1>(s))>;
  using M2 = cute::remove_cvref_t<decltype(cute::get<2>(s))>;
  static_assert(cute::is_static<M0>::value != cute::is_static<M1>::value,
                "a packed row- or column-major stride has one static unit mode");
  if constexpr (!cute::is_static<M0>::value) cute::get<0>(s) = ld;
  if constexpr (!cute::is_static<M1>::value) cute::get<1>(s) = ld;
  if constexpr (!cute::is_static<M2>::value) cute::get<2>(s) = 0;
  return s;
}

template <class Element, class Problem, class StrideA, class StrideB, class StrideD>
struct PrepareParams {
  const int32_t* offsets;      // (E+1) segment starts
  int32_t groups, n, k;        // E, N, K
  bool b_nk;                   // B_e stored (N, K) instead of (K, N)
  bool a_gathered;             // A's rows are fetched by index from `a` (GatherMainloop): every
                               // expert's A pointer is `a` itself, kept only for its descriptor
  const Element* a;            // (max_rows, K), or (T, K) when gathered
  const Element* b;            // (E, K, N) or (E, N, K)
  Element* d;                  // (max_rows, N), or nullptr (then ptr_d, stride_d are not written)
  Problem* problems;           // (E) {m_e, N, K}
  const Element** ptr_a;       // (E)
  const Element** ptr_b;       // (E)
  Element** ptr_d;             // (E)
  StrideA* stride_a;           // (E)
  StrideB* stride_b;           // (E)
  StrideD* stride_d;           // (E)
  // Or null: the number of (tile_m, tile_n) tiles over all problems, in the order CUTLASS's
  // grouped scheduler walks them (EpilogueActivationDeferred finds each CTA's last tile by it).
  int32_t* tile_count = nullptr;
  int32_t tile_m = 0, tile_n = 0;
};

// The prepare kernels' optional count of output tiles over all problems (the deferred epilogues
// find each CTA's last tile by it): each thread adds its problems' tiles in shared memory, thread 0
// writes the sum. Null `out`: nothing. Every thread of the one block constructs and finishes it.
class TileSum {
 public:
  __device__ explicit TileSum(int32_t* out) : out_(out) {
    if (out_ == nullptr) return;
    if (threadIdx.x == 0) sum() = 0;
    __syncthreads();
  }
  __device__ void add(int64_t rows, int64_t cols, int32_t tile_m, int32_t tile_n) {
    if (out_ != nullptr)
      atomicAdd(&sum(), static_cast<int32_t>((rows + tile_m - 1) / tile_m *
                                             ((cols + tile_n - 1) / tile_n)));
  }
  __device__ void finish() {
    if (out_ == nullptr) return;
    __syncthreads();
    if (threadIdx.x == 0) *out_ = sum();
  }

 private:
  static __device__ int32_t& sum() {
    __shared__ int32_t tiles;
    return tiles;
  }
  int32_t* out_;
};

template <class Element, class Problem, class StrideA, class StrideB, class StrideD>
__global__ void prepare_kernel(PrepareParams<Element, Problem, StrideA, StrideB, StrideD> p) {
  TileSum tiles(p.tile_count);
  for (int e = threadIdx.x; e < p.groups; e += blockDim.x) {
    const int32_t r0 = p.offsets[e], r1 = p.offsets[e + 1];
    MOE_DEVICE_ASSERT(r0 >= 0 && r1 >= r0);
    const Element* a = p.a_gathered ? p.a : p.a + int64_t{r0} * p.k;  // segment e of A (m_e, K)
    const Element* b = p.b + int64_t{e} * p.k * p.n;            // expert e's weight
    // TMA needs 16-byte aligned global addresses (host checks N, K % 8; this catches bad bases).
    MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(a) % 16 == 0);
    MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(b) % 16 == 0);
    p.problems[e] = Problem{r1 - r0, p.n, p.k};
    p.ptr_a[e] = a;
    p.ptr_b[e] = b;
    p.stride_a[e] = packed_stride<StrideA>(p.k);                // A (m, K) row-major
    p.stride_b[e] = packed_stride<StrideB>(p.b_nk ? p.k : p.n); // B seen as (N, K)
    if (p.d != nullptr) {  // null for the fused epilogue, which addresses its outputs itself
      Element* d = p.d + int64_t{r0} * p.n;                     // segment e of D (m_e, N)
      MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(d) % 16 == 0);
      p.ptr_d[e] = d;
      p.stride_d[e] = packed_stride<StrideD>(p.n);              // D (m, N) row-major
    }
    tiles.add(r1 - r0, p.n, p.tile_m, p.tile_n);
  }
  tiles.finish();
}

// The weight gradients: problem e is dW_e (P, Q) += X_e^T (P, m_e) · Y_e (m_e, Q), so M = P, N = Q
// and K = m_e, the segment length. An empty segment becomes the problem {0, Q, 0}: no M tiles, so
// CUTLASS's scheduler gives it no work and dW_e stays exactly as it was (a K = 0 problem with tiles
// would instead run an epilogue on never-initialised accumulators).
template <class Element, class Problem, class StrideA, class StrideB, class StrideD,
          class ElementDW = float>
struct WgradPrepareParams {
  const int32_t* offsets;      // (E+1) segment starts
  int32_t groups, p, q;        // E, P, Q
  bool x_gathered;             // X's rows are fetched by index from `x` (GatherMainloop along K):
                               // every expert's A pointer is `x` itself, kept for its descriptor
  const Element* x;            // (max_rows, P): A_e = X_e^T, column-major (M-major), ld P; or
                               // (T, P) when gathered
  const Element* y;            // (max_rows, Q): B_e = Y_e (K, N) row-major (N-major), ld Q
  ElementDW* dw;               // (E, P, Q) row-major, fp32 (or bf16, written fresh)
  Problem* problems;           // (E) {P, Q, m_e} or {0, Q, 0}
  const Element** ptr_a;       // (E)
  const Element** ptr_b;       // (E)
  ElementDW** ptr_d;           // (E) also C (beta = 1, in place)
  StrideA* stride_a;           // (E)
  StrideB* stride_b;           // (E)
  StrideD* stride_d;           // (E) also C's
  // Or null: the number of (tile_m, tile_n) tiles over all problems (as PrepareParams's).
  int32_t* tile_count = nullptr;
  int32_t tile_m = 0, tile_n = 0;
};

template <class Element, class Problem, class StrideA, class StrideB, class StrideD,
          class ElementDW>
__global__ void wgrad_prepare_kernel(
    WgradPrepareParams<Element, Problem, StrideA, StrideB, StrideD, ElementDW> p) {
  TileSum tiles(p.tile_count);
  for (int e = threadIdx.x; e < p.groups; e += blockDim.x) {
    const int32_t r0 = p.offsets[e], r1 = p.offsets[e + 1];
    MOE_DEVICE_ASSERT(r0 >= 0 && r1 >= r0);
    const Element* x = p.x_gathered ? p.x : p.x + int64_t{r0} * p.p;  // segment e of X (m_e, P)
    const Element* y = p.y + int64_t{r0} * p.q;                 // segment e of Y (m_e, Q)
    ElementDW* dw = p.dw + int64_t{e} * p.p * p.q;              // dW_e (P, Q)
    MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(x) % 16 == 0);
    MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(y) % 16 == 0);
    MOE_DEVICE_ASSERT(reinterpret_cast<uintptr_t>(dw) % 16 == 0);
    p.problems[e] = r1 > r0 ? Problem{p.p, p.q, r1 - r0} : Problem{0, p.q, 0};
    p.ptr_a[e] = x;
    p.ptr_b[e] = y;
    p.ptr_d[e] = dw;
    p.stride_a[e] = packed_stride<StrideA>(p.p);                // A (P, m) column-major
    p.stride_b[e] = packed_stride<StrideB>(p.q);                // B (m, Q) row-major, seen (N, K)
    p.stride_d[e] = packed_stride<StrideD>(p.q);                // D (P, Q) row-major
    if (r1 > r0) tiles.add(p.p, p.q, p.tile_m, p.tile_n);  // an empty expert has no tiles
  }
  tiles.finish();
}

// Overwriting weight gradients (beta = 0): experts with an empty segment get no tiles from the
// grouped GEMM, so their dW_e is set to zero here. Grid (blocks per expert, E); the blocks of a
// non-empty expert return at once, so the kernel costs a few microseconds unless experts are empty.
inline constexpr int kZeroThreads = 256;

inline int64_t zero_blocks_per_group(int64_t elems) {
  const int64_t vec = (elems + 3) / 4;  // fp32 stores; bf16 ones cover twice as many elements
  return std::max<int64_t>(1, std::min<int64_t>(64, (vec + kZeroThreads - 1) / kZeroThreads));
}

template <class T>
__global__ void __launch_bounds__(kZeroThreads)
    zero_empty_groups_kernel(const int32_t* offsets, T* dw, int64_t elems) {
  const int e = blockIdx.y;
  if (offsets[e + 1] != offsets[e]) return;
  constexpr int64_t kPer16 = 16 / sizeof(T);  // elements per 16-byte store
  T* d = dw + int64_t{e} * elems;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (elems % kPer16 == 0) {  // then every dW_e starts 16-byte aligned
    for (int64_t i = first; i < elems / kPer16; i += stride)
      reinterpret_cast<uint4*>(d)[i] = make_uint4(0u, 0u, 0u, 0u);
  } else {
    for (int64_t i = first; i < elems; i += stride) d[i] = T(0);
  }
}

}  // namespace moe::cuda::grouped_gemm
