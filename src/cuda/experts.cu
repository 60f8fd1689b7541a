// defines: experts_forward, experts_backward, ExpertsWorkspace, ExpertsShape::validate,
//          interleave_gate_up, split_gate_up
// xp[M,H] --experts--> yp[M,H]: up-projection, activation, down-projection per expert segment, and
// the backward. The GEMMs are the CUTLASS grouped GEMMs (grouped_gemm.hpp, sizes on the device)
// or, as baselines, cuBLAS: one cublasGemmEx per expert or one cublasGemmGroupedBatchedEx per GEMM
// over a host copy of the offsets, or cublasGemmStridedBatchedEx over the padded layout. The
// activation and its backward are elementwise kernels here, shared by every backend except the
// fused up-projection, which applies the same device functions (experts_activation.cuh) in its
// epilogue.
#include "moe/cuda/experts.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "experts_activation.cuh"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"

namespace moe::cuda {

namespace {
constexpr std::array<std::string_view, 5> kBackendNames = {
    "grouped", "grouped_fused", "cublas_loop_host_offsets", "cublas_grouped_host_offsets",
    "cublas_strided_padded"};
}  // namespace

std::string_view name(ExpertsBackend b) { return kBackendNames[static_cast<size_t>(b)]; }
std::string_view name(GateUpLayout g) {
  switch (g) {
    case GateUpLayout::split: return "split";
    case GateUpLayout::interleaved: return "interleaved";
    case GateUpLayout::blocked: return "blocked";
  }
  return "?";
}

ExpertsBackend parse_experts_backend(std::string_view text, std::string_view field) {
  for (size_t i = 0; i < kBackendNames.size(); ++i)
    if (text == kBackendNames[i]) return static_cast<ExpertsBackend>(i);
  std::string all;
  for (auto n : kBackendNames) all += (all.empty() ? "" : ", ") + std::string(n);
  MOE_FAIL(field, " must be one of ", all, ", got '", text, "'");
}

bool is_host_sync_free(ExpertsBackend b) {
  return b == ExpertsBackend::grouped || b == ExpertsBackend::grouped_fused ||
         b == ExpertsBackend::cublas_strided_padded;
}

void ExpertsShape::validate() const {
  MOE_CHECK(experts >= 1 && experts <= 4096, "experts must be in [1, 4096], got ", experts);
  MOE_CHECK(hidden >= 1 && hidden < (int64_t{1} << 30), "hidden must be in [1, 2^30), got ",
            hidden);
  MOE_CHECK(inter >= 1 && inter < (int64_t{1} << 29), "inter must be in [1, 2^29), got ", inter);
  MOE_CHECK(max_rows >= 0 && max_rows < (int64_t{1} << 31), "rows must be in [0, 2^31), got ",
            max_rows);
  MOE_CHECK(gate_up != GateUpLayout::blocked || activation != Activation::swiglu ||
                inter % 32 == 0,
            "the blocked gate/up layout needs inter a multiple of 32, got ", inter);
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels: the activation and its backward, elementwise over rows [0, M); gate/up reordering
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int kThreads = 256;

template <int kVec>
struct alignas(sizeof(bf16) * kVec) Pack {
  bf16 v[kVec];
};

// How pre's columns feed act column j.
enum class ActKind { gelu, swiglu_split, swiglu_interleaved, swiglu_blocked };

// GateUpLayout::blocked: the pair (gate, up) of unit u. Within a block of 32 units, unit 8q + a
// is pair 4a + q.
__device__ __forceinline__ int64_t blocked_pair(int64_t u) {
  const int64_t b = u >> 5, q = (u >> 3) & 3, a = u & 7;
  return 32 * b + 4 * a + q;
}

// The [gate | up] column that column c of a (rows, 2I) matrix in layout L holds.
template <GateUpLayout L>
__device__ __forceinline__ int64_t split_column(int64_t c, int64_t inter) {
  if constexpr (L == GateUpLayout::split) {
    return c;
  } else if constexpr (L == GateUpLayout::interleaved) {
    return (c & 1) * inter + c / 2;
  } else {  // pair p = c / 2 = 32 b + 4 a + q holds unit 32 b + 8 q + a
    const int64_t p = c >> 1, b = p >> 5, a = (p >> 2) & 7, q = p & 3;
    return (c & 1) * inter + 32 * b + 8 * q + a;
  }
}

// kVec consecutive (gate, up) values for act columns [j, j + kVec) of one pre row `h`.
template <ActKind kKind, int kVec>
__device__ __forceinline__ void load_gate_up(const bf16* h, int64_t j, int64_t inter,
                                             float (&g)[kVec], float (&u)[kVec]) {
  if constexpr (kKind == ActKind::swiglu_split) {
    const Pack<kVec> pg = *reinterpret_cast<const Pack<kVec>*>(h + j);
    const Pack<kVec> pu = *reinterpret_cast<const Pack<kVec>*>(h + inter + j);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = __bfloat162float(pg.v[k]), u[k] = __bfloat162float(pu.v[k]);
  } else if constexpr (kKind == ActKind::swiglu_blocked) {
    // Units j .. j + kVec - 1 are pairs 4 apart (kVec = 8: one 8-unit run of a block): 4-byte
    // loads, which the quad's lanes (q = 0..3) complete to whole 16-byte words.
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const __nv_bfloat162 p = *reinterpret_cast<const __nv_bfloat162*>(h + 2 * blocked_pair(j + k));
      g[k] = __low2float(p), u[k] = __high2float(p);
    }
  } else {  // interleaved: gate j at 2j, up j at 2j + 1; two packs of kVec cover kVec pairs
    const Pack<kVec> p0 = *reinterpret_cast<const Pack<kVec>*>(h + 2 * j);
    const Pack<kVec> p1 = *reinterpret_cast<const Pack<kVec>*>(h + 2 * j + kVec);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const bf16 gk = 2 * k < kVec ? p0.v[2 * k] : p1.v[2 * k - kVec];
      const bf16 uk = 2 * k < kVec ? p0.v[2 * k + 1] : p1.v[2 * k + 1 - kVec];
      g[k] = __bfloat162float(gk), u[k] = __bfloat162float(uk);
    }
  }
}

// act[r, j] from pre[r, :]. Thread per kVec act columns, grid-stride over M * I / kVec; M =
// offsets[E] is read on the device.
template <ActKind kKind, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(const int32_t* __restrict__ num_rows,
                              const bf16* __restrict__ pre,  // (M, A)
                              bf16* __restrict__ act,        // (M, I)
                              int64_t inter) {
  constexpr bool kGelu = kKind == ActKind::gelu;
  const int64_t up_width = kGelu ? inter : 2 * inter;
  const int64_t per_row = inter / kVec;
  const int64_t total = int64_t{*num_rows} * per_row;
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < total;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = v / per_row, j = (v - r * per_row) * kVec;
    const bf16* h = pre + r * up_width;
    Pack<kVec> out;
    if constexpr (kGelu) {
      const Pack<kVec> g = *reinterpret_cast<const Pack<kVec>*>(h + j);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = __float2bfloat16(act::gelu(__bfloat162float(g.v[k])));
    } else {
      float g[kVec], u[kVec];
      load_gate_up<kKind, kVec>(h, j, inter, g, u);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = __float2bfloat16(act::silu_mul(g[k], u[k]));
    }
    *reinterpret_cast<Pack<kVec>*>(act + r * inter + j) = out;
  }
}

// dpre[r, :] from da[r, j] and pre[r, :] for one item (kVec act columns of one row).
template <ActKind kKind, int kVec>
struct ActGradItem {
  Pack<kVec> d;        // da[r, j .. j + kVec)
  float g[kVec], u[kVec];  // gate and up (GELU: the pre-activation in g)
  bf16* dh;            // dpre row r
  int64_t j;

  __device__ __forceinline__ void load(const bf16* da, const bf16* pre, bf16* dpre, int64_t r,
                                       int64_t col, int64_t inter) {
    constexpr bool kGelu = kKind == ActKind::gelu;
    const int64_t up_width = kGelu ? inter : 2 * inter;
    j = col;
    d = *reinterpret_cast<const Pack<kVec>*>(da + r * inter + j);
    const bf16* h = pre + r * up_width;
    dh = dpre + r * up_width;
    if constexpr (kGelu) {
      const Pack<kVec> p = *reinterpret_cast<const Pack<kVec>*>(h + j);
#pragma unroll
      for (int k = 0; k < kVec; ++k) g[k] = __bfloat162float(p.v[k]);
    } else {
      load_gate_up<kKind, kVec>(h, j, inter, g, u);
    }
  }

  __device__ __forceinline__ void store(int64_t inter) const {
    if constexpr (kKind == ActKind::gelu) {
      Pack<kVec> dg;
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        dg.v[k] = __float2bfloat16(__bfloat162float(d.v[k]) * act::gelu_grad(g[k]));
      *reinterpret_cast<Pack<kVec>*>(dh + j) = dg;
    } else {
      float dg[kVec], du[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        act::silu_mul_grad(__bfloat162float(d.v[k]), g[k], u[k], dg[k], du[k]);
      if constexpr (kKind == ActKind::swiglu_split) {
        Pack<kVec> pg, pu;
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          pg.v[k] = __float2bfloat16(dg[k]), pu.v[k] = __float2bfloat16(du[k]);
        *reinterpret_cast<Pack<kVec>*>(dh + j) = pg;
        *reinterpret_cast<Pack<kVec>*>(dh + inter + j) = pu;
      } else if constexpr (kKind == ActKind::swiglu_blocked) {
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          *reinterpret_cast<__nv_bfloat162*>(dh + 2 * blocked_pair(j + k)) =
              __floats2bfloat162_rn(dg[k], du[k]);
      } else {
        Pack<kVec> p0, p1;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          bf16& gk = 2 * k < kVec ? p0.v[2 * k] : p1.v[2 * k - kVec];
          bf16& uk = 2 * k < kVec ? p0.v[2 * k + 1] : p1.v[2 * k + 1 - kVec];
          gk = __float2bfloat16(dg[k]), uk = __float2bfloat16(du[k]);
        }
        *reinterpret_cast<Pack<kVec>*>(dh + 2 * j) = p0;
        *reinterpret_cast<Pack<kVec>*>(dh + 2 * j + kVec) = p1;
      }
    }
  }
};

// dpre from da and pre, grid-stride over M * I / kVec items, two items per thread per pass: both
// are loaded before either is stored, since in place (dpre == pre) the compiler may not move the
// next item's loads above this item's stores, and one item's three loads per thread leave HBM
// idle (measured 1.7 TB/s at Qwen3). Index: 32-bit when M * I / kVec fits (the usual case: a
// 64-bit division per item costs as much as the item's arithmetic).
template <ActKind kKind, int kVec, class Index>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(const int32_t* __restrict__ num_rows,
                               const bf16* __restrict__ da,   // (M, I)
                               const bf16* pre,               // (M, A)
                               bf16* dpre,                    // (M, A), may be pre (in place:
                                                              // each element read, then written,
                                                              // by the same thread)
                               int64_t inter) {
  const Index per_row = static_cast<Index>(inter / kVec);
  const Index total = static_cast<Index>(*num_rows) * per_row;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index v = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; v < total;
       v += 2 * stride) {
    ActGradItem<kKind, kVec> a, b;
    const Index r = v / per_row;
    a.load(da, pre, dpre, r, int64_t{v - r * per_row} * kVec, inter);
    const Index w = v + stride;
    const bool second = w < total;
    if (second) {
      const Index rw = w / per_row;
      b.load(da, pre, dpre, rw, int64_t{w - rw * per_row} * kVec, inter);
    }
    a.store(inter);
    if (second) b.store(inter);
  }
}

// A (rows, 2I) row-major matrix between [gate | up] and layout L, thread per element of the
// L-ordered side (a load-time conversion, not on the step path): kToLayout gathers from split,
// else scatters back to it.
template <class T, GateUpLayout L, bool kToLayout>
__global__ void __launch_bounds__(kThreads)
    reorder_gate_up_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t rows,
                           int64_t inter) {
  const int64_t width = 2 * inter, total = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / width, c = i - r * width;
    const int64_t s = r * width + split_column<L>(c, inter);
    if constexpr (kToLayout) dst[i] = src[s];
    else dst[s] = src[i];
  }
}

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Grid for an elementwise pass over at most `items` items: enough blocks to fill the GPU a few
// times over, grid-stride beyond (the real M is known only on the device).
int elementwise_blocks(int64_t items, int sm_count) {
  const int64_t want = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<int64_t>(want, 1, int64_t{sm_count} * 16));
}

ActKind act_kind(const ExpertsShape& s) {
  if (s.activation == Activation::gelu) return ActKind::gelu;
  switch (s.gate_up) {
    case GateUpLayout::split: return ActKind::swiglu_split;
    case GateUpLayout::interleaved: return ActKind::swiglu_interleaved;
    case GateUpLayout::blocked: return ActKind::swiglu_blocked;
  }
  return ActKind::swiglu_split;
}

// The runtime (kind, vectorised) pair becomes template arguments here, in one place.
template <class F>
void dispatch_act(ActKind kind, bool vec, F&& f) {
  auto with_vec = [&](auto kind_c) {
    if (vec) f(kind_c, std::integral_constant<int, 8>{});
    else f(kind_c, std::integral_constant<int, 1>{});
  };
  switch (kind) {
    case ActKind::gelu: with_vec(std::integral_constant<ActKind, ActKind::gelu>{}); break;
    case ActKind::swiglu_split:
      with_vec(std::integral_constant<ActKind, ActKind::swiglu_split>{});
      break;
    case ActKind::swiglu_interleaved:
      with_vec(std::integral_constant<ActKind, ActKind::swiglu_interleaved>{});
      break;
    case ActKind::swiglu_blocked:
      with_vec(std::integral_constant<ActKind, ActKind::swiglu_blocked>{});
      break;
  }
}

void activation_forward(const ExpertsShape& s, int sm_count, const int32_t* offsets,
                        const bf16* pre, bf16* act, cudaStream_t stream) {
  if (s.max_rows == 0) return;
  const int32_t* num_rows = offsets + s.experts;
  const bool vec = s.inter % 8 == 0 && aligned16(pre) && aligned16(act);
  const int blocks = elementwise_blocks(s.max_rows * s.inter / (vec ? 8 : 1), sm_count);
  dispatch_act(act_kind(s), vec, [&](auto kind, auto v) {
    activation_forward_kernel<decltype(kind)::value, decltype(v)::value>
        <<<blocks, kThreads, 0, stream>>>(num_rows, pre, act, s.inter);
  });
  MOE_CUDA_LAUNCH_CHECK();
}

void activation_backward(const ExpertsShape& s, int sm_count, const int32_t* offsets,
                         const bf16* da, const bf16* pre, bf16* dpre, cudaStream_t stream) {
  if (s.max_rows == 0) return;
  const int32_t* num_rows = offsets + s.experts;
  const bool vec = s.inter % 8 == 0 && aligned16(da) && aligned16(pre) && aligned16(dpre);
  const int blocks = elementwise_blocks(s.max_rows * s.inter / (vec ? 8 : 1), sm_count);
  // max_rows bounds M on the host: 32-bit indices when every item index (and the grid-stride
  // overshoot of two strides) fits.
  const int64_t items = s.max_rows * (s.inter / (vec ? 8 : 1));
  const bool narrow = items + 2 * int64_t{blocks} * kThreads < (int64_t{1} << 31);
  dispatch_act(act_kind(s), vec, [&](auto kind, auto v) {
    if (narrow)
      activation_backward_kernel<decltype(kind)::value, decltype(v)::value, int32_t>
          <<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
    else
      activation_backward_kernel<decltype(kind)::value, decltype(v)::value, int64_t>
          <<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
  });
  MOE_CUDA_LAUNCH_CHECK();
}

// to_layout: dst (layout) from src (split); else dst (split) from src (layout).
template <class T>
void reorder_gate_up(const T* src, T* dst, GateUpLayout layout, bool to_layout, int64_t rows,
                     int64_t inter, cudaStream_t stream) {
  MOE_CHECK(src != dst, "gate/up reordering cannot run in place");
  MOE_CHECK(rows >= 0 && inter >= 0, "gate/up reordering: negative shape (rows=", rows,
            ", inter=", inter, ")");
  MOE_CHECK(layout != GateUpLayout::blocked || inter % 32 == 0,
            "the blocked gate/up layout needs inter a multiple of 32, got ", inter);
  if (rows == 0 || inter == 0) return;
  int device = 0, sms = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = elementwise_blocks(rows * 2 * inter, sms);
  auto launch = [&](auto l) {
    constexpr GateUpLayout L = decltype(l)::value;
    if (to_layout)
      reorder_gate_up_kernel<T, L, true><<<blocks, kThreads, 0, stream>>>(src, dst, rows, inter);
    else
      reorder_gate_up_kernel<T, L, false><<<blocks, kThreads, 0, stream>>>(src, dst, rows, inter);
  };
  switch (layout) {
    case GateUpLayout::split:
      MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(T) * rows * 2 * inter,
                                     cudaMemcpyDeviceToDevice, stream));
      return;
    case GateUpLayout::interleaved:
      launch(std::integral_constant<GateUpLayout, GateUpLayout::interleaved>{});
      break;
    case GateUpLayout::blocked:
      launch(std::integral_constant<GateUpLayout, GateUpLayout::blocked>{});
      break;
  }
  MOE_CUDA_LAUNCH_CHECK();
}

// ---- cuBLAS (baselines). Row-major GEMMs through column-major cuBLAS: a row-major X is the
// column-major X^T. bf16 operands, fp32 compute.

// D (m, n) = A (m, k) · B with B stored (k, n) [b_nk false] or (n, k).
void gemm_rows(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* b,
               bool b_nk, bf16* d) {
  const float one = 1.f, zero = 0.f;
  // column-major: D^T (n, m) = op(B)^T (n, k) · A^T (k, m)
  MOE_CUBLAS_CHECK(cublasGemmEx(h, b_nk ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                                &one, b, CUDA_R_16BF, static_cast<int>(b_nk ? k : n), a,
                                CUDA_R_16BF, static_cast<int>(k), &zero, d, CUDA_R_16BF,
                                static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// C (p, q) fp32 += X (rows, p)^T · Y (rows, q): a weight gradient over one segment.
void gemm_rows_tn_accumulate(cublasHandle_t h, int64_t rows, int64_t p, int64_t q, const bf16* x,
                             const bf16* y, float* c, bool accumulate) {
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  // column-major: C^T (q, p) (+)= Y^T (q, rows) · X (rows, p)
  MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(q),
                                static_cast<int>(p), static_cast<int>(rows), &one, y, CUDA_R_16BF,
                                static_cast<int>(q), x, CUDA_R_16BF, static_cast<int>(p), &beta, c,
                                CUDA_R_32F, static_cast<int>(q), CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
}

// The padded layout: E batches of C rows. D_e (C, n) = A_e (C, k) · op(B_e).
void gemm_rows_strided(cublasHandle_t h, int64_t batches, int64_t c, int64_t n, int64_t k,
                       const bf16* a, const bf16* b, bool b_nk, bf16* d) {
  const float one = 1.f, zero = 0.f;
  MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, b_nk ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(c),
      static_cast<int>(k), &one, b, CUDA_R_16BF, static_cast<int>(b_nk ? k : n), n * k, a,
      CUDA_R_16BF, static_cast<int>(k), c * k, &zero, d, CUDA_R_16BF, static_cast<int>(n), c * n,
      static_cast<int>(batches), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// dW_e (p, q) fp32 (+)= X_e (C, p)^T · Y_e (C, q) for E batches of C rows.
void gemm_rows_tn_accumulate_strided(cublasHandle_t h, int64_t batches, int64_t c, int64_t p,
                                     int64_t q, const bf16* x, const bf16* y, float* dw,
                                     bool accumulate) {
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(q), static_cast<int>(p), static_cast<int>(c),
      &one, y, CUDA_R_16BF, static_cast<int>(q), c * q, x, CUDA_R_16BF, static_cast<int>(p),
      c * p, &beta, dw, CUDA_R_32F, static_cast<int>(q), p * q, static_cast<int>(batches),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

int device_sm_count() {
  int device = 0, sms = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

void interleave_gate_up(const bf16* split, bf16* interleaved, int64_t rows, int64_t inter,
                        cudaStream_t stream) {
  reorder_gate_up(split, interleaved, GateUpLayout::interleaved, true, rows, inter, stream);
}
void split_gate_up(const bf16* interleaved, bf16* split, int64_t rows, int64_t inter,
                   cudaStream_t stream) {
  reorder_gate_up(interleaved, split, GateUpLayout::interleaved, false, rows, inter, stream);
}
void split_gate_up(const float* interleaved, float* split, int64_t rows, int64_t inter,
                   cudaStream_t stream) {
  reorder_gate_up(interleaved, split, GateUpLayout::interleaved, false, rows, inter, stream);
}
void to_gate_up_layout(const bf16* split, bf16* dst, GateUpLayout to, int64_t rows, int64_t inter,
                       cudaStream_t stream) {
  reorder_gate_up(split, dst, to, true, rows, inter, stream);
}
void from_gate_up_layout(const bf16* src, GateUpLayout from, bf16* split, int64_t rows,
                         int64_t inter, cudaStream_t stream) {
  reorder_gate_up(src, split, from, false, rows, inter, stream);
}
void from_gate_up_layout(const float* src, GateUpLayout from, float* split, int64_t rows,
                         int64_t inter, cudaStream_t stream) {
  reorder_gate_up(src, split, from, false, rows, inter, stream);
}

// ------------------------------------------------------------------------------------------------
// cuBLAS grouped-batched baseline: one cublasGemmGroupedBatchedEx per GEMM, one group per
// non-empty expert. m/n/k/ld/alpha/beta are host arrays in that API (so the offsets must be on the
// host); the A/B/C pointer arrays are device arrays, staged through pinned memory per slot.
// ------------------------------------------------------------------------------------------------

// Host-side arrays of cublasGemmGroupedBatchedEx, one set per slot, sized E once.
struct ExpertsCublasArrays {
  struct HostArrays {
    std::vector<cublasOperation_t> ta, tb;
    std::vector<int> m, n, k, lda, ldb, ldc, size;
    std::vector<float> alpha, beta;
  };
  std::array<HostArrays, ExpertsWorkspace::kSlots> slot;
  explicit ExpertsCublasArrays(size_t e) {
    for (HostArrays& h : slot) {
      for (auto* v : {&h.ta, &h.tb}) v->assign(e, CUBLAS_OP_N);
      for (auto* v : {&h.m, &h.n, &h.k, &h.lda, &h.ldb, &h.ldc}) v->assign(e, 0);
      h.size.assign(e, 1);
      h.alpha.assign(e, 1.f);
      h.beta.assign(e, 0.f);
    }
  }
};

struct ExpertsCublas {
  using HostArrays = ExpertsCublasArrays::HostArrays;

  // Fill slot `slot`'s pointer arrays and `h` for row-major D_e (m_e, n) = A_e (m_e, k) · op(B_e);
  // returns the number of groups (non-empty experts).
  static int fill(ExpertsWorkspace& ws, ExpertsWorkspace::Slot slot, const int32_t* off, int64_t n, int64_t k, const bf16* a, const bf16* b,
                  bool b_nk, bf16* d) {
    const int64_t E = ws.shape_.experts;
    HostArrays& h = ws.cublas_arrays_->slot[slot];
    void** p = ws.pinned_ptrs_ + slot * 3 * E;
    int g = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], m = off[e + 1] - off[e];
      if (m == 0) continue;
      // column-major: D^T (n, m) = op(B)^T (n, k) · A^T (k, m)
      h.ta[g] = b_nk ? CUBLAS_OP_T : CUBLAS_OP_N;
      h.tb[g] = CUBLAS_OP_N;
      h.m[g] = static_cast<int>(n);
      h.n[g] = static_cast<int>(m);
      h.k[g] = static_cast<int>(k);
      h.lda[g] = static_cast<int>(b_nk ? k : n);
      h.ldb[g] = static_cast<int>(k);
      h.ldc[g] = static_cast<int>(n);
      p[g] = const_cast<bf16*>(b + e * k * n);  // cuBLAS A: the weight
      p[E + g] = const_cast<bf16*>(a + r0 * k);  // cuBLAS B: the segment's rows
      p[2 * E + g] = d + r0 * n;
      ++g;
    }
    return g;
  }

  static void run(ExpertsWorkspace& ws, ExpertsWorkspace::Slot slot, int groups) {
    if (groups == 0) return;
    const int64_t E = ws.shape_.experts;
    const HostArrays& h = ws.cublas_arrays_->slot[slot];
    void** p = ws.device_ptrs_ + slot * 3 * E;
    MOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        ws.cublas_, h.ta.data(), h.tb.data(), h.m.data(), h.n.data(), h.k.data(), h.alpha.data(),
        const_cast<const void* const*>(p), CUDA_R_16BF, h.lda.data(),
        const_cast<const void* const*>(p + E), CUDA_R_16BF, h.ldb.data(), h.beta.data(), p + 2 * E,
        CUDA_R_16BF, h.ldc.data(), groups, h.size.data(), CUBLAS_COMPUTE_32F));
  }

  // Copy slots [first, last) of the pinned pointer arrays to the device, in stream order.
  static void upload(ExpertsWorkspace& ws, int first, int last, cudaStream_t stream) {
    const int64_t E = ws.shape_.experts;
    MOE_CUDA_CHECK(cudaMemcpyAsync(ws.device_ptrs_ + first * 3 * E,
                                   ws.pinned_ptrs_ + first * 3 * E,
                                   sizeof(void*) * 3 * E * (last - first),
                                   cudaMemcpyHostToDevice, stream));
  }
};

// ------------------------------------------------------------------------------------------------
// workspace
// ------------------------------------------------------------------------------------------------

ExpertsWorkspace::ExpertsWorkspace(const ExpertsShape& shape, ExpertsBackend backend,
                                   bool backward, bool own_scratch, cublasHandle_t cublas)
    : shape_(shape), backend_(backend), backward_(backward), sm_count_(device_sm_count()) {
  shape.validate();
  const int64_t E = shape.experts, R = shape.max_rows, I = shape.inter, A = shape.up_width();
  const bool grouped = backend == ExpertsBackend::grouped || backend == ExpertsBackend::grouped_fused;
  if (grouped) {
    MOE_CHECK(shape.hidden % 8 == 0 && shape.inter % 8 == 0,
              "the grouped experts backends need hidden and inter multiples of 8 (16-byte TMA "
              "rows), got hidden=", shape.hidden, " inter=", shape.inter);
    if (backend == ExpertsBackend::grouped_fused) {
      MOE_CHECK(shape.activation != Activation::swiglu || shape.gate_up != GateUpLayout::split,
                "the grouped_fused backend needs SwiGLU's w_up with gate/up columns in pairs "
                "(gate_up = interleaved or blocked; see to_gate_up_layout)");
      up_act_ = GroupedGemmAct(E, shape.activation);
    } else {
      up_ = GroupedGemm(E, WeightLayout::kn);
    }
    down_ = GroupedGemm(E, WeightLayout::kn);
    if (backward && backend == ExpertsBackend::grouped_fused) {
      MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
      MOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
      MOE_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    }
    if (backward) {
      if (backend == ExpertsBackend::grouped_fused) dact_act_ = GroupedGemmActGrad(E, shape.activation);
      else dact_ = GroupedGemm(E, WeightLayout::nk);
      dxp_ = GroupedGemm(E, WeightLayout::nk);
      wgrad_down_ = GroupedWgrad(E);
      wgrad_up_ = GroupedWgrad(E);
    }
  }
  if (backend == ExpertsBackend::cublas_strided_padded)
    MOE_CHECK(R % E == 0, "the cublas_strided_padded backend needs the padded layout: max_rows (",
              R, ") a multiple of experts (", E, "), C = max_rows / E rows per expert");
  // grouped_fused never stores da: its activation backward runs in the da GEMM's epilogue.
  const bool stores_da = backend != ExpertsBackend::grouped_fused;
  if (backward && own_scratch)
    arena_ = DeviceArena({{"experts.da", stores_da ? size_t(R * I) * sizeof(bf16) : 0,
                           reinterpret_cast<void**>(&da_)},
                          {"experts.dpre", size_t(R * A) * sizeof(bf16),
                           reinterpret_cast<void**>(&dpre_)}});
  MOE_CUDA_CHECK(cudaMallocHost(&pinned_offsets_, sizeof(int32_t) * (E + 1)));
  if (backend == ExpertsBackend::cublas_grouped_host_offsets) {
    MOE_CUDA_CHECK(cudaMallocHost(&pinned_ptrs_, sizeof(void*) * kSlots * 3 * E));
    MOE_CUDA_CHECK(cudaMalloc(&device_ptrs_, sizeof(void*) * kSlots * 3 * E));
    cublas_arrays_ = std::make_unique<ExpertsCublasArrays>(static_cast<size_t>(E));
  }
  // Only the cuBLAS baselines use a handle; the grouped backends would pay for one (its device
  // allocations) and never call it.
  const bool uses_cublas =
      backend != ExpertsBackend::grouped && backend != ExpertsBackend::grouped_fused;
  if (uses_cublas && cublas) cublas_ = cublas;
  own_cublas_ = uses_cublas && !cublas;
  if (own_cublas_ && cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) {
    cudaFreeHost(pinned_offsets_);
    if (pinned_ptrs_) cudaFreeHost(pinned_ptrs_);
    if (device_ptrs_) cudaFree(device_ptrs_);
    throw Error("cublasCreate failed");
  }
}

ExpertsWorkspace::~ExpertsWorkspace() {
  if (join_) cudaEventDestroy(join_);
  if (fork_) cudaEventDestroy(fork_);
  if (side_) cudaStreamDestroy(side_);
  if (own_cublas_ && cublas_) cublasDestroy(cublas_);
  if (pinned_offsets_) cudaFreeHost(pinned_offsets_);
  if (pinned_ptrs_) cudaFreeHost(pinned_ptrs_);
  if (device_ptrs_) cudaFree(device_ptrs_);
}

const int32_t* ExpertsWorkspace::host_offsets(const int32_t* offsets, cudaStream_t stream) {
  const int64_t E = shape_.experts;
  MOE_CUDA_CHECK(cudaMemcpyAsync(pinned_offsets_, offsets, sizeof(int32_t) * (E + 1),
                                 cudaMemcpyDeviceToHost, stream));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int64_t e = 0; e < E; ++e)
    if (pinned_offsets_[e] < 0 || pinned_offsets_[e + 1] < pinned_offsets_[e])
      throw Error(::moe::detail::concat("experts: offsets not ascending at expert ", e));
  if (pinned_offsets_[E] > shape_.max_rows)
    throw Error(::moe::detail::concat("experts: M = ", pinned_offsets_[E], " > max_rows ",
                               shape_.max_rows));
  return pinned_offsets_;
}

// ------------------------------------------------------------------------------------------------
// stage
// ------------------------------------------------------------------------------------------------

void experts_forward(ExpertsWorkspace& ws, const ExpertsForwardArgs& a, cudaStream_t stream,
                     cudaEvent_t* events) {
  const ExpertsShape& s = ws.shape_;
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width();
  const int sms = ws.sm_count_;
  const bool gathered = a.row_token != nullptr;
  MOE_CHECK(a.offsets && a.w_up && a.w_down && (gathered ? a.x != nullptr : a.xp != nullptr) &&
                a.act && a.yp && (a.pre || ws.backend_ == ExpertsBackend::grouped_fused),
            "experts_forward: null pointer argument (only grouped_fused may leave pre null)");
  MOE_CHECK(!gathered || ws.backend_ == ExpertsBackend::grouped ||
                ws.backend_ == ExpertsBackend::grouped_fused,
            "experts_forward: gathered rows (row_token) need a grouped backend, not ",
            name(ws.backend_));
  MOE_CHECK(!gathered || a.tokens >= 1, "experts_forward: gathering needs tokens >= 1, got ",
            a.tokens);
  MOE_CHECK(events == nullptr || ws.backend_ == ExpertsBackend::grouped ||
                ws.backend_ == ExpertsBackend::grouped_fused,
            "experts_forward: step events need a grouped backend, not ", name(ws.backend_));
  auto mark = [&](ExpertsForwardStep step) {
    if (events) MOE_CUDA_CHECK(cudaEventRecord(events[int(step)], stream));
  };
  if (s.max_rows == 0) {
    for (int i = 0; i <= int(ExpertsForwardStep::count); ++i) mark(ExpertsForwardStep(i));
    return;
  }
  switch (ws.backend_) {
    case ExpertsBackend::grouped:
      mark(ExpertsForwardStep::up);
      if (gathered) {                                                     // pre = x[row_token] · w_up
        GroupedGemmArgs up{a.offsets, A, H, a.x, a.w_up, a.pre};
        up.gather = a.row_token;
        up.gather_rows = a.tokens;
        ws.up_.run(up, stream);
      } else {
        ws.up_.run({a.offsets, A, H, a.xp, a.w_up, a.pre}, stream);           // pre = xp · w_up
      }
      activation_forward(s, sms, a.offsets, a.pre, a.act, stream);
      mark(ExpertsForwardStep::down);
      ws.down_.run({a.offsets, H, I, a.act, a.w_down, a.yp}, stream);         // yp = act · w_down
      mark(ExpertsForwardStep::count);
      return;
    case ExpertsBackend::grouped_fused: {
      GroupedGemmActArgs up{a.offsets, A, H, gathered ? a.x : a.xp, a.w_up, a.pre, a.act,
                            s.activation == Activation::swiglu &&
                                s.gate_up == GateUpLayout::blocked};
      if (gathered) up.gather = a.row_token, up.gather_rows = a.tokens;
      mark(ExpertsForwardStep::up);
      ws.up_act_.run(up, stream);                                              // pre, act
      mark(ExpertsForwardStep::down);
      ws.down_.run({a.offsets, H, I, a.act, a.w_down, a.yp}, stream);
      mark(ExpertsForwardStep::count);
      return;
    }
    case ExpertsBackend::cublas_strided_padded: {
      const int64_t C = s.max_rows / E;
      MOE_CUBLAS_CHECK(cublasSetStream(ws.cublas_, stream));
      gemm_rows_strided(ws.cublas_, E, C, A, H, a.xp, a.w_up, false, a.pre);
      activation_forward(s, sms, a.offsets, a.pre, a.act, stream);
      gemm_rows_strided(ws.cublas_, E, C, H, I, a.act, a.w_down, false, a.yp);
      return;
    }
    case ExpertsBackend::cublas_grouped_host_offsets: {
      const int32_t* off = ws.host_offsets(a.offsets, stream);
      MOE_CUBLAS_CHECK(cublasSetStream(ws.cublas_, stream));
      const int g_up = ExpertsCublas::fill(ws, ExpertsWorkspace::kUp, off, A, H, a.xp, a.w_up,
                                           false, a.pre);
      const int g_down = ExpertsCublas::fill(ws, ExpertsWorkspace::kDown, off, H, I, a.act,
                                             a.w_down, false, a.yp);
      ExpertsCublas::upload(ws, ExpertsWorkspace::kUp, ExpertsWorkspace::kDown + 1, stream);
      ExpertsCublas::run(ws, ExpertsWorkspace::kUp, g_up);
      activation_forward(s, sms, a.offsets, a.pre, a.act, stream);
      ExpertsCublas::run(ws, ExpertsWorkspace::kDown, g_down);
      return;
    }
    case ExpertsBackend::cublas_loop_host_offsets: {
      const int32_t* off = ws.host_offsets(a.offsets, stream);
      MOE_CUBLAS_CHECK(cublasSetStream(ws.cublas_, stream));
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], m = off[e + 1] - off[e];
        if (m > 0)
          gemm_rows(ws.cublas_, m, A, H, a.xp + r0 * H, a.w_up + e * H * A, false, a.pre + r0 * A);
      }
      activation_forward(s, sms, a.offsets, a.pre, a.act, stream);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], m = off[e + 1] - off[e];
        if (m > 0)
          gemm_rows(ws.cublas_, m, H, I, a.act + r0 * I, a.w_down + e * I * H, false, a.yp + r0 * H);
      }
      return;
    }
  }
}

const char* name(ExpertsForwardStep s) {
  switch (s) {
    case ExpertsForwardStep::up: return "up";
    case ExpertsForwardStep::down: return "down";
    default: return "?";
  }
}

const char* name(ExpertsBackwardStep s) {
  switch (s) {
    case ExpertsBackwardStep::dw_down: return "dw_down";
    case ExpertsBackwardStep::da: return "da";
    case ExpertsBackwardStep::activation: return "activation";
    case ExpertsBackwardStep::dxp: return "dxp";
    case ExpertsBackwardStep::dw_up: return "dw_up";
    default: return "?";
  }
}

void experts_backward(ExpertsWorkspace& ws, const ExpertsBackwardArgs& a, cudaStream_t stream,
                      cudaEvent_t* events) {
  const ExpertsShape& s = ws.shape_;
  MOE_CHECK(ws.backward_, "experts_backward: the workspace was made without backward buffers");
  const bool bf16_dw = a.dw_up_bf16 != nullptr || a.dw_down_bf16 != nullptr;
  const bool gathered = a.row_token != nullptr;
  MOE_CHECK(a.offsets && a.w_up && a.w_down && (gathered ? a.x != nullptr : a.xp != nullptr) &&
                a.pre && a.act && a.dyp && a.dxp &&
                (bf16_dw ? a.dw_up_bf16 && a.dw_down_bf16 && !a.dw_up && !a.dw_down
                         : a.dw_up && a.dw_down),
            "experts_backward: null pointer argument (the weight gradients: dw_up and dw_down, "
            "or dw_up_bf16 and dw_down_bf16)");
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width();
  const int sms = ws.sm_count_;
  const bool fused = ws.backend_ == ExpertsBackend::grouped_fused;
  bf16* const da = a.da ? a.da : ws.da_;
  bf16* const dpre = a.dpre ? a.dpre : ws.dpre_;
  MOE_CHECK((da || fused) && dpre, "experts_backward: the workspace was made without scratch "
                                   "(own_scratch false) and the arguments give no da / dpre");
  const bool grouped =
      ws.backend_ == ExpertsBackend::grouped || ws.backend_ == ExpertsBackend::grouped_fused;
  MOE_CHECK(!bf16_dw || (grouped && !a.accumulate),
            "experts_backward: bf16 weight gradients need a grouped backend and accumulate = false");
  MOE_CHECK(events == nullptr || grouped, "experts_backward: step events need a grouped backend");
  MOE_CHECK(a.row_dot == nullptr || fused,
            "experts_backward: row_dot comes from the fused da GEMM (grouped_fused) only");
  MOE_CHECK(!gathered || (grouped && a.tokens >= 1),
            "experts_backward: gathered rows (row_token) need a grouped backend and tokens >= 1");
  auto mark = [&](ExpertsBackwardStep step) {
    if (events) MOE_CUDA_CHECK(cudaEventRecord(events[int(step)], stream));
  };
  if (s.max_rows == 0) {
    for (int i = 0; i <= int(ExpertsBackwardStep::count); ++i) mark(ExpertsBackwardStep(i));
    return;
  }

  if (grouped) {
    // Everything on the device: sizes from the offsets, no host round trip. This order lets da,
    // dpre and dxp alias act, pre and dyp (ExpertsBackwardArgs).
    const GroupedWgradArgs down{a.offsets, I, H, a.act, a.dyp, a.dw_down, a.accumulate,
                                a.dw_down_bf16};
    const GroupedGemmActGradArgs dact{a.offsets, I, H, a.dyp, a.w_down, a.pre, dpre,
                                      s.activation == Activation::swiglu &&
                                          s.gate_up == GateUpLayout::blocked,
                                      a.row_dot, s.max_rows};
    if (fused && !events) {
      // The da GEMM on `stream`, dw_down on the side stream launched right after it: both are
      // persistent grids of one CTA per SM, so dw_down's CTAs take the SMs that the da GEMM's
      // last, partly filled wave leaves idle instead of waiting for all of it (experts lab run
      // 29: the pair in 0.97-0.99x the time at OLMoE, Qwen3 and the small shape; splitting the
      // SMs between them took 1.01-1.24x). Each output is one CTA's work whatever the grid: the
      // same bits. Joined before dxp, which may overwrite dyp.
      MOE_CUDA_CHECK(cudaEventRecord(ws.fork_, stream));
      MOE_CUDA_CHECK(cudaStreamWaitEvent(ws.side_, ws.fork_));
      ws.dact_act_.run(dact, stream);                                           // dpre, row dots
      ws.wgrad_down_.run(down, ws.side_);                                       // dw_down
      MOE_CUDA_CHECK(cudaEventRecord(ws.join_, ws.side_));
      MOE_CUDA_CHECK(cudaStreamWaitEvent(stream, ws.join_));
    } else {
      mark(ExpertsBackwardStep::dw_down);
      ws.wgrad_down_.run(down, stream);                                 // dw_down (+)= act^T dyp
      mark(ExpertsBackwardStep::da);
      if (fused) {                                  // dpre from da = dyp · w_down^T in registers
        ws.dact_act_.run(dact, stream);
        mark(ExpertsBackwardStep::activation);
      } else {
        ws.dact_.run({a.offsets, I, H, a.dyp, a.w_down, da}, stream);  // da = dyp · w_down^T
        mark(ExpertsBackwardStep::activation);
        activation_backward(s, sms, a.offsets, da, a.pre, dpre, stream);        // dpre
      }
    }
    mark(ExpertsBackwardStep::dxp);
    ws.dxp_.run({a.offsets, H, A, dpre, a.w_up, a.dxp}, stream);          // dxp = dpre · w_up^T
    mark(ExpertsBackwardStep::dw_up);
    GroupedWgradArgs up{a.offsets, H, A, gathered ? a.x : a.xp, dpre, a.dw_up, a.accumulate,
                        a.dw_up_bf16};
    if (gathered) up.gather = a.row_token, up.gather_rows = a.tokens;
    ws.wgrad_up_.run(up, stream);                                         // dw_up (+)= xp^T dpre
    mark(ExpertsBackwardStep::count);
    return;
  }

  MOE_CUBLAS_CHECK(cublasSetStream(ws.cublas_, stream));
  if (ws.backend_ == ExpertsBackend::cublas_strided_padded) {
    const int64_t C = s.max_rows / E;
    gemm_rows_strided(ws.cublas_, E, C, I, H, a.dyp, a.w_down, true, da);
    activation_backward(s, sms, a.offsets, da, a.pre, dpre, stream);
    gemm_rows_strided(ws.cublas_, E, C, H, A, dpre, a.w_up, true, a.dxp);
    gemm_rows_tn_accumulate_strided(ws.cublas_, E, C, I, H, a.act, a.dyp, a.dw_down, a.accumulate);
    gemm_rows_tn_accumulate_strided(ws.cublas_, E, C, H, A, a.xp, dpre, a.dw_up, a.accumulate);
    return;
  }

  const int32_t* off = ws.host_offsets(a.offsets, stream);
  if (ws.backend_ == ExpertsBackend::cublas_grouped_host_offsets) {
    const int g_dact = ExpertsCublas::fill(ws, ExpertsWorkspace::kDact, off, I, H, a.dyp,
                                           a.w_down, true, da);
    const int g_dxp = ExpertsCublas::fill(ws, ExpertsWorkspace::kDxp, off, H, A, dpre, a.w_up,
                                          true, a.dxp);
    ExpertsCublas::upload(ws, ExpertsWorkspace::kDact, ExpertsWorkspace::kDxp + 1, stream);
    ExpertsCublas::run(ws, ExpertsWorkspace::kDact, g_dact);
    activation_backward(s, sms, a.offsets, da, a.pre, dpre, stream);
    ExpertsCublas::run(ws, ExpertsWorkspace::kDxp, g_dxp);
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], m = off[e + 1] - off[e];
      if (m > 0)
        gemm_rows(ws.cublas_, m, I, H, a.dyp + r0 * H, a.w_down + e * I * H, true, da + r0 * I);
    }
    activation_backward(s, sms, a.offsets, da, a.pre, dpre, stream);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], m = off[e + 1] - off[e];
      if (m > 0)
        gemm_rows(ws.cublas_, m, H, A, dpre + r0 * A, a.w_up + e * H * A, true, a.dxp + r0 * H);
    }
  }
  // Weight gradients of the host-offset baselines: one cuBLAS GEMM per non-empty expert; an
  // empty expert's gradient is zeroed when overwriting.
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], m = off[e + 1] - off[e];
    if (m == 0) {
      if (!a.accumulate) {
        MOE_CUDA_CHECK(cudaMemsetAsync(a.dw_down + e * I * H, 0, I * H * sizeof(float), stream));
        MOE_CUDA_CHECK(cudaMemsetAsync(a.dw_up + e * H * A, 0, H * A * sizeof(float), stream));
      }
      continue;
    }
    gemm_rows_tn_accumulate(ws.cublas_, m, I, H, a.act + r0 * I, a.dyp + r0 * H,
                            a.dw_down + e * I * H, a.accumulate);  // dw_down[e] (+)= act^T · dyp
    gemm_rows_tn_accumulate(ws.cublas_, m, H, A, a.xp + r0 * H, dpre + r0 * A,
                            a.dw_up + e * H * A, a.accumulate);    // dw_up[e] (+)= xp^T · dpre
  }
}

}  // namespace moe::cuda
