// defines: Pack, load_pack, store_pack, RowGrid, row_grid, zero_padding_rows,
//          permute_scatter_kernel, permute_bulk_kernel, gather_sum_kernel, launch_gather_sum
// Row-wise data movement for the token-major stages (permute, combine and their backwards).
// One warp owns one token: it reads the token's entries of the plan's inverse (token_offsets,
// token_rows, token_choices) and moves whole rows with 16-byte vectors, lane l taking vectors
// l, l+32, ... of the row so that each warp access is 512 contiguous bytes.
// A second set of warps zero-fills the padding rows (row_token == kPadToken), one row per warp.
// The kernels carry their variants as template flags (cache policy, rows in flight, the bulk
// copy engine); bench/lab/rows_lab.cu times them side by side and the launchers in permute.cu /
// combine.cu use the winners.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "moe/cuda/check.cuh"
#include "moe/cuda/plan.hpp"

namespace moe::cuda::rows {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads
constexpr int kThreads = kWarp * kWarpsPerBlock;

// ------------------------------------------------------------------------------------------------
// Packs: kVec elements of T moved as one access
// ------------------------------------------------------------------------------------------------

// Cache policy of the row traffic. kDefault: plain loads (read-only path) and stores.
// kStream: rows are touched once, so load and store them evict-first (ld/st .cs) and leave L2 to
// the plan's index arrays and the rows the next stage reads.
enum class Cache { kDefault, kStream };

// 16-byte packs live in a uint4 so that every load and store is one 128-bit access: a struct of
// eight __nv_bfloat16 copied element by element compiles to eight 2-byte stores (seen in the PTX
// of the first version: st.global.u16, a quarter of the bandwidth).
template <class T, int kVec>
struct Pack {
  static_assert(kVec * sizeof(T) == 16, "16-byte packs only; kVec = 1 has its own Pack");
  uint4 raw;
  __device__ __forceinline__ float get(int i) const {  // i is a compile-time index after unrolling
    const uint32_t* w = &raw.x;
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else {  // bf16 -> fp32 is a 16-bit shift
      const uint32_t v = w[i / 2];
      return __uint_as_float(i % 2 ? (v & 0xffff0000u) : (v << 16));
    }
  }
  // From kVec fp32 values, rounded to nearest even.
  __device__ __forceinline__ void set_all(const float* f) {
    uint32_t* w = &raw.x;
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) w[i] = __float_as_uint(f[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) {
        const __nv_bfloat162 p = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        w[i] = *reinterpret_cast<const uint32_t*>(&p);
      }
    }
  }
  __device__ __forceinline__ static Pack zero() { return {make_uint4(0, 0, 0, 0)}; }
};

template <class T>
struct Pack<T, 1> {  // rows whose width is not a multiple of 16 bytes
  T raw;
  __device__ __forceinline__ float get(int) const {
    if constexpr (sizeof(T) == 4) return raw;
    else return __bfloat162float(raw);
  }
  __device__ __forceinline__ void set_all(const float* f) {
    if constexpr (sizeof(T) == 4) raw = f[0];
    else raw = __float2bfloat16_rn(f[0]);
  }
  __device__ __forceinline__ static Pack zero() {
    Pack p;
    const float z = 0.f;
    p.set_all(&z);
    return p;
  }
};

template <Cache kCache, class T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  Pack<T, kVec> v;
  if constexpr (kVec == 1) {
    v.raw = *p;
  } else if constexpr (kCache == Cache::kStream) {
    v.raw = __ldcs(reinterpret_cast<const uint4*>(p));
  } else {
    v.raw = __ldg(reinterpret_cast<const uint4*>(p));
  }
  return v;
}
template <Cache kCache, class T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& v) {
  if constexpr (kVec == 1) {
    *p = v.raw;
  } else if constexpr (kCache == Cache::kStream) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.raw.x),
                 "r"(v.raw.y), "r"(v.raw.z), "r"(v.raw.w)
                 : "memory");
  } else {
    // Spelled out: a plain uint4 assignment here was split into four 4-byte stores (PTX).
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.raw.x),
                 "r"(v.raw.y), "r"(v.raw.z), "r"(v.raw.w)
                 : "memory");
  }
}

// Elements per 16-byte pack, or 1 when the rows are not 16-byte aligned (H * sizeof(T) % 16 or
// a base pointer off alignment): the kernels are instantiated for both.
template <class T>
inline int vector_width(int64_t hidden, std::initializer_list<const void*> ptrs) {
  constexpr int w = 16 / sizeof(T);
  if (hidden % w) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return 1;
  return w;
}

// ------------------------------------------------------------------------------------------------
// Grid: warps [0, T) take tokens, warps [T, T + pad_groups) zero-fill padding rows, one row each
// ------------------------------------------------------------------------------------------------

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
  if (fill_padding && s.layout != Layout::dropless) g.pad_groups = s.max_rows();
  return g;
}

// Zero padding row `r` of out if it is one (rows < M only). One warp per row: with Zipf routing
// into a padded layout the padding gathers at the ends of the cold experts' segments, and a first
// version that gave each warp 32 consecutive row indices left a few warps writing 32 rows each
// (permute+combine up to 1.5x slower than uniform at T=4096, E=16, cf=1).
template <class T, int kVec>
__device__ __forceinline__ void zero_padding_rows(const PlanView& plan, int64_t r, T* out,
                                                  int64_t hidden) {
  const int lane = threadIdx.x % kWarp;
  if (r >= *plan.num_rows || plan.row_token[r] != static_cast<int32_t>(plan.shape.tokens)) return;
  const Pack<T, kVec> z = Pack<T, kVec>::zero();
  T* row = out + r * hidden;
  for (int64_t i = lane * kVec; i < hidden; i += kWarp * kVec)
    store_pack<Cache::kDefault, T, kVec>(row + i, z);
}

// ------------------------------------------------------------------------------------------------
// permute: token-major scatter, one warp per token
// ------------------------------------------------------------------------------------------------

// Warp t loads a chunk of x[t] (kUnroll packs per lane, all in flight before the first store)
// and stores it to each of the token's kept rows. The row list is read into lane registers (32
// at a time) and broadcast by shuffle. x loads are issued before anything depends on the row list.
// kWeighted: each row gets weight[choice] * x[t] (fp32 product, rounded once), the combine
// backward's dyp when no dot with yp is wanted (combine_backward without yp).
template <class T, int kVec, int kUnroll, Cache kCache, bool kWeighted = false>
__global__ void __launch_bounds__(kThreads)
    permute_scatter_kernel(PlanView plan, const T* __restrict__ x, T* __restrict__ xp,
                           int64_t hidden, RowGrid grid,
                           const float* __restrict__ weight = nullptr) {
  const int lane = threadIdx.x % kWarp;
  const int64_t w = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (w >= grid.warps()) return;
  if (w >= grid.token_warps) {
    zero_padding_rows<T, kVec>(plan, w - grid.token_warps, xp, hidden);
    return;
  }
  const int64_t t = w;
  const int32_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
  const T* src = x + t * hidden;
  constexpr int64_t kStep = int64_t{kWarp} * kVec * kUnroll;
  for (int32_t jb = j0; jb < j1; jb += kWarp) {  // one pass for K <= 32
    const int nj = min(kWarp, j1 - jb);
    const int32_t my_row = lane < nj ? plan.token_rows[jb + lane] : kDropped;
    float my_weight = 0.f;
    if constexpr (kWeighted)
      if (my_row >= 0) my_weight = weight[plan.token_choices[jb + lane]];
    for (int64_t base = 0; base < hidden; base += kStep) {
      Pack<T, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
        if (i < hidden) v[u] = load_pack<kCache, T, kVec>(src + i);
      }
      for (int j = 0; j < nj; ++j) {
        const int32_t r = __shfl_sync(0xffffffffu, my_row, j);
        if (r < 0) continue;  // dropped or kNoExpert
        T* dst = xp + int64_t{r} * hidden;
        [[maybe_unused]] float wj = 0.f;
        if constexpr (kWeighted) wj = __shfl_sync(0xffffffffu, my_weight, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
          if (i >= hidden) continue;
          if constexpr (kWeighted) {
            float o[kVec];
#pragma unroll
            for (int k = 0; k < kVec; ++k) o[k] = wj * v[u].get(k);
            Pack<T, kVec> op;
            op.set_all(o);
            store_pack<kCache, T, kVec>(dst + i, op);
          } else {
            store_pack<kCache, T, kVec>(dst + i, v[u]);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// permute through the bulk copy engine (cp.async.bulk, sm_90): one warp per CTA, a ring of
// kStages row buffers in shared memory. Lane 0 loads x[t] into a buffer (completion on an
// mbarrier), then stores that buffer to each of the token's rows with bulk stores; a buffer is
// refilled once the bulk stores reading it have finished (wait_group.read). The copy engine moves
// the bytes, so the SM issues a handful of instructions per row instead of one per 16 bytes.
// Persistent grid: CTA b takes tokens b, b + gridDim.x, ... Rows must be 16-byte multiples.
// Padding rows are zero-filled by permute_scatter_kernel's padding warps (a separate launch).
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int kStages>
__global__ void __launch_bounds__(kWarp)
    permute_bulk_kernel(PlanView plan, const char* __restrict__ x, char* __restrict__ xp,
                        uint32_t row_bytes) {
  extern __shared__ __align__(128) char ring[];  // (kStages, row_bytes)
  __shared__ __align__(8) uint64_t full[kStages];  // buffer s holds its token's row
  const int lane = threadIdx.x;
  const int64_t T = plan.shape.tokens;
  const int64_t first = blockIdx.x, stride = gridDim.x;
  const int64_t count = first < T ? (T - first + stride - 1) / stride : 0;  // tokens of this CTA
  if (lane == 0) {
    for (int s = 0; s < kStages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  auto load = [&](int64_t i) {  // lane 0: token number i of this CTA into buffer i % kStages
    const int s = static_cast<int>(i % kStages);
    const char* src = x + (first + i * stride) * int64_t{row_bytes};
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                     smem_addr(&full[s])),
                 "r"(row_bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_addr(ring + s * row_bytes)),
        "l"(src), "r"(row_bytes), "r"(smem_addr(&full[s]))
        : "memory");
  };
  if (lane == 0)
    for (int64_t i = 0; i < count && i < kStages; ++i) load(i);
  for (int64_t i = 0; i < count; ++i) {
    const int s = static_cast<int>(i % kStages);
    const int64_t t = first + i * stride;
    const int32_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
    if (lane == 0) {
      const uint32_t phase = static_cast<uint32_t>((i / kStages) & 1);
      uint32_t done = 0;
      while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
            "selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(smem_addr(&full[s])), "r"(phase)
            : "memory");
      for (int32_t j = j0; j < j1; ++j) {
        const int32_t r = plan.token_rows[j];
        if (r < 0) continue;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                         xp + int64_t{r} * row_bytes),
                     "r"(smem_addr(ring + s * row_bytes)), "r"(row_bytes)
                     : "memory");
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      // Refill the buffer of token i-1 once its stores have read it (all groups but the newest).
      if (i >= 1 && i - 1 + kStages < count) {
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        load(i - 1 + kStages);
      }
    }
    __syncwarp();
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// ------------------------------------------------------------------------------------------------
// gather-sum: combine forward (weighted) and permute backward (unweighted, accumulating)
// ------------------------------------------------------------------------------------------------

// out[t] = sum over the token's kept rows j (choice order) of w_j * in[row_j], fp32 in registers.
// kWeighted: w_j = weight[token_choices[j]] (combine forward); else w_j = 1 (permute backward).
// kAccumulate: the sum starts from out[t] (permute backward's default: dx += ..., like the CPU
// stage, so the router's and the shared experts' input gradients can land in the same buffer);
// else out is overwritten (combine forward; a layer's backward, whose dx starts here).
// kPair: two rows' loads in flight before either is summed (the sum stays in choice order).
template <class T, int kVec, int kUnroll, bool kWeighted, bool kPair, Cache kCache,
          bool kAccumulate = !kWeighted>
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
      const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
      Pack<T, kVec> prev = Pack<T, kVec>::zero();
      if (kAccumulate && i < hidden) prev = load_pack<Cache::kDefault, T, kVec>(dst + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[u][k] = prev.get(k);
    }
    for (int32_t jb = j0; jb < j1; jb += kWarp) {
      const int nj = min(kWarp, j1 - jb);
      int32_t my_row = kDropped;
      float my_w = 1.f;
      if (lane < nj) {
        my_row = plan.token_rows[jb + lane];
        if (kWeighted && my_row >= 0) my_w = weight[plan.token_choices[jb + lane]];
      }
      constexpr int kRows = kPair ? 2 : 1;
      for (int j = 0; j < nj; j += kRows) {
        int32_t r[kRows];
        float wr[kRows];
        Pack<T, kVec> v[kRows][kUnroll];
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          r[q] = __shfl_sync(0xffffffffu, my_row, min(j + q, kWarp - 1));
          wr[q] = __shfl_sync(0xffffffffu, my_w, min(j + q, kWarp - 1));
          if (j + q >= nj) r[q] = kDropped;
        }
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          if (r[q] < 0) continue;  // dropped or kNoExpert: adds nothing
          const T* src = in + int64_t{r[q]} * hidden;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
            if (i < hidden) v[q][u] = load_pack<kCache, T, kVec>(src + i);
          }
        }
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          if (r[q] < 0) continue;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int k = 0; k < kVec; ++k)
              acc[u][k] = kWeighted ? fmaf(wr[q], v[q][u].get(k), acc[u][k])
                                    : acc[u][k] + v[q][u].get(k);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
      if (i >= hidden) continue;
      Pack<T, kVec> o;
      o.set_all(acc[u]);
      store_pack<kCache, T, kVec>(dst + i, o);
    }
  }
}

// The launch the library uses (the lab's winner: see bench/lab/rows_lab.cu).
template <class T, bool kWeighted, bool kAccumulate = !kWeighted>
void launch_gather_sum(const PlanView& plan, const float* weight, const T* in, int64_t hidden,
                       T* out, cudaStream_t stream) {
  if (plan.shape.tokens == 0 || hidden == 0) return;
  const RowGrid grid = row_grid(plan.shape, false);
  constexpr int kWide = 16 / sizeof(T);
  if (vector_width<T>(hidden, {in, out}) == kWide)
    gather_sum_kernel<T, kWide, 4, kWeighted, true, Cache::kDefault, kAccumulate>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, weight, in, out, hidden);
  else
    gather_sum_kernel<T, 1, 4, kWeighted, false, Cache::kDefault, kAccumulate>
        <<<grid.blocks(), kThreads, 0, stream>>>(plan, weight, in, out, hidden);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::rows
