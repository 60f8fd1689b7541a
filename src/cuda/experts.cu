// defines: experts_forward, experts_backward, ExpertsWorkspace, ExpertsShape::validate
// xp[M,H] --experts--> yp[M,H]: up-projection, activation, down-projection per expert segment, and
// the backward. The GEMMs are the CUTLASS grouped GEMM (grouped_gemm.hpp, sizes on the device) or,
// as the baseline, one cublasGemmEx per expert over a host copy of the offsets. The activation and
// its backward are elementwise kernels here, shared by both backends.
#include "moe/cuda/experts.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"

namespace moe::cuda {

std::string_view name(ExpertsBackend b) {
  return b == ExpertsBackend::grouped ? "grouped" : "cublas_loop_host_offsets";
}

void ExpertsShape::validate() const {
  MOE_CHECK(experts >= 1 && experts <= 4096, "experts must be in [1, 4096], got ", experts);
  MOE_CHECK(hidden >= 1 && hidden < (int64_t{1} << 30), "hidden must be in [1, 2^30), got ",
            hidden);
  MOE_CHECK(inter >= 1 && inter < (int64_t{1} << 29), "inter must be in [1, 2^29), got ", inter);
  MOE_CHECK(max_rows >= 0 && max_rows < (int64_t{1} << 31), "rows must be in [0, 2^31), got ",
            max_rows);
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels: the activation and its backward, elementwise over rows [0, M)
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int kThreads = 256;

template <int kVec>
struct alignas(sizeof(bf16) * kVec) Pack {
  bf16 v[kVec];
};

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }
// Exact (erf) GELU, as the CPU reference.
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678f)); }
__device__ __forceinline__ float gelu_grad(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678f)) + v * __expf(-0.5f * v * v) * 0.39894228f;
}

// act[r, j] from pre[r, :]: SwiGLU silu(pre[r, j]) * pre[r, I + j], GELU gelu(pre[r, j]).
// Thread per kVec columns, grid-stride over M * I / kVec; M = offsets[E] is read on the device.
template <bool kSwiglu, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(const int32_t* __restrict__ num_rows,
                              const bf16* __restrict__ pre,  // (M, A)
                              bf16* __restrict__ act,        // (M, I)
                              int64_t inter) {
  const int64_t up_width = kSwiglu ? 2 * inter : inter;
  const int64_t per_row = inter / kVec;
  const int64_t total = int64_t{*num_rows} * per_row;
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < total;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = v / per_row, j = (v - r * per_row) * kVec;
    const bf16* h = pre + r * up_width + j;
    const Pack<kVec> g = *reinterpret_cast<const Pack<kVec>*>(h);
    Pack<kVec> out;
    if constexpr (kSwiglu) {
      const Pack<kVec> u = *reinterpret_cast<const Pack<kVec>*>(h + inter);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float gk = __bfloat162float(g.v[k]);
        out.v[k] = __float2bfloat16(gk * sigmoid(gk) * __bfloat162float(u.v[k]));
      }
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = __float2bfloat16(gelu(__bfloat162float(g.v[k])));
    }
    *reinterpret_cast<Pack<kVec>*>(act + r * inter + j) = out;
  }
}

// dpre[r, :] from da[r, j] and pre[r, :]: SwiGLU d gate = da * up * s * (1 + g (1 - s)),
// d up = da * g * s (s = sigmoid(g)); GELU dpre = da * gelu'(pre).
template <bool kSwiglu, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(const int32_t* __restrict__ num_rows,
                               const bf16* __restrict__ da,   // (M, I)
                               const bf16* __restrict__ pre,  // (M, A)
                               bf16* __restrict__ dpre,       // (M, A)
                               int64_t inter) {
  const int64_t up_width = kSwiglu ? 2 * inter : inter;
  const int64_t per_row = inter / kVec;
  const int64_t total = int64_t{*num_rows} * per_row;
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < total;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = v / per_row, j = (v - r * per_row) * kVec;
    const Pack<kVec> d = *reinterpret_cast<const Pack<kVec>*>(da + r * inter + j);
    const bf16* h = pre + r * up_width + j;
    bf16* dh = dpre + r * up_width + j;
    const Pack<kVec> g = *reinterpret_cast<const Pack<kVec>*>(h);
    Pack<kVec> dg;
    if constexpr (kSwiglu) {
      const Pack<kVec> u = *reinterpret_cast<const Pack<kVec>*>(h + inter);
      Pack<kVec> du;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float gk = __bfloat162float(g.v[k]), uk = __bfloat162float(u.v[k]);
        const float dk = __bfloat162float(d.v[k]), s = sigmoid(gk);
        dg.v[k] = __float2bfloat16(dk * uk * s * (1.f + gk * (1.f - s)));
        du.v[k] = __float2bfloat16(dk * gk * s);
      }
      *reinterpret_cast<Pack<kVec>*>(dh + inter) = du;
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        dg.v[k] = __float2bfloat16(__bfloat162float(d.v[k]) * gelu_grad(__bfloat162float(g.v[k])));
    }
    *reinterpret_cast<Pack<kVec>*>(dh) = dg;
  }
}

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Grid for an elementwise pass over at most max_rows * I / vec items: enough blocks to fill the
// GPU a few times over, grid-stride beyond (the real M is known only on the device).
int elementwise_blocks(int64_t items, int sm_count) {
  const int64_t want = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<int64_t>(want, 1, int64_t{sm_count} * 16));
}

void activation_forward(const ExpertsShape& s, int sm_count, const int32_t* offsets,
                        const bf16* pre, bf16* act, cudaStream_t stream) {
  if (s.max_rows == 0) return;
  const int32_t* num_rows = offsets + s.experts;
  const bool vec = s.inter % 8 == 0 && aligned16(pre) && aligned16(act);
  const int blocks = elementwise_blocks(s.max_rows * s.inter / (vec ? 8 : 1), sm_count);
  const bool swiglu = s.activation == Activation::swiglu;
  if (swiglu && vec)
    activation_forward_kernel<true, 8><<<blocks, kThreads, 0, stream>>>(num_rows, pre, act, s.inter);
  else if (swiglu)
    activation_forward_kernel<true, 1><<<blocks, kThreads, 0, stream>>>(num_rows, pre, act, s.inter);
  else if (vec)
    activation_forward_kernel<false, 8><<<blocks, kThreads, 0, stream>>>(num_rows, pre, act, s.inter);
  else
    activation_forward_kernel<false, 1><<<blocks, kThreads, 0, stream>>>(num_rows, pre, act, s.inter);
  MOE_CUDA_LAUNCH_CHECK();
}

void activation_backward(const ExpertsShape& s, int sm_count, const int32_t* offsets,
                         const bf16* da, const bf16* pre, bf16* dpre, cudaStream_t stream) {
  if (s.max_rows == 0) return;
  const int32_t* num_rows = offsets + s.experts;
  const bool vec = s.inter % 8 == 0 && aligned16(da) && aligned16(pre) && aligned16(dpre);
  const int blocks = elementwise_blocks(s.max_rows * s.inter / (vec ? 8 : 1), sm_count);
  const bool swiglu = s.activation == Activation::swiglu;
  if (swiglu && vec)
    activation_backward_kernel<true, 8><<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
  else if (swiglu)
    activation_backward_kernel<true, 1><<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
  else if (vec)
    activation_backward_kernel<false, 8><<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
  else
    activation_backward_kernel<false, 1><<<blocks, kThreads, 0, stream>>>(num_rows, da, pre, dpre, s.inter);
  MOE_CUDA_LAUNCH_CHECK();
}

// Row-major GEMMs through column-major cuBLAS (a row-major X is the column-major X^T), bf16
// operands, fp32 compute. D (m, n) = A (m, k) · B with B stored (k, n) [b_nk false] or (n, k).
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
                             const bf16* y, float* c) {
  const float one = 1.f;
  // column-major: C^T (q, p) += Y^T (q, rows) · X (rows, p)
  MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(q),
                                static_cast<int>(p), static_cast<int>(rows), &one, y, CUDA_R_16BF,
                                static_cast<int>(q), x, CUDA_R_16BF, static_cast<int>(p), &one, c,
                                CUDA_R_32F, static_cast<int>(q), CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
}

int device_sm_count() {
  int device = 0, sms = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// workspace
// ------------------------------------------------------------------------------------------------

ExpertsWorkspace::ExpertsWorkspace(const ExpertsShape& shape, ExpertsBackend backend,
                                   bool backward)
    : shape_(shape), backend_(backend), backward_(backward) {
  shape.validate();
  const int64_t E = shape.experts, R = shape.max_rows, I = shape.inter, A = shape.up_width();
  if (backend == ExpertsBackend::grouped) {
    MOE_CHECK(shape.hidden % 8 == 0 && shape.inter % 8 == 0,
              "the grouped experts backend needs hidden and inter multiples of 8 (16-byte TMA "
              "rows), got hidden=", shape.hidden, " inter=", shape.inter);
    up_ = GroupedGemm(E, WeightLayout::kn);
    down_ = GroupedGemm(E, WeightLayout::kn);
    if (backward) {
      dact_ = GroupedGemm(E, WeightLayout::nk);
      dxp_ = GroupedGemm(E, WeightLayout::nk);
    }
  }
  if (backward)
    arena_ = DeviceArena({{"experts.da", size_t(R * I) * sizeof(bf16), reinterpret_cast<void**>(&da_)},
                          {"experts.dpre", size_t(R * A) * sizeof(bf16),
                           reinterpret_cast<void**>(&dpre_)}});
  MOE_CUDA_CHECK(cudaMallocHost(&pinned_offsets_, sizeof(int32_t) * (E + 1)));
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) {
    cudaFreeHost(pinned_offsets_);
    throw Error("cublasCreate failed");
  }
}

ExpertsWorkspace::~ExpertsWorkspace() {
  if (cublas_) cublasDestroy(cublas_);
  if (pinned_offsets_) cudaFreeHost(pinned_offsets_);
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

void experts_forward(ExpertsWorkspace& ws, const ExpertsForwardArgs& a, cudaStream_t stream) {
  const ExpertsShape& s = ws.shape_;
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width();
  const int sms = device_sm_count();
  if (s.max_rows == 0) return;
  if (ws.backend_ == ExpertsBackend::grouped) {
    ws.up_.run({a.offsets, A, H, a.xp, a.w_up, a.pre}, stream);           // pre = xp · w_up
    activation_forward(s, sms, a.offsets, a.pre, a.act, stream);
    ws.down_.run({a.offsets, H, I, a.act, a.w_down, a.yp}, stream);       // yp = act · w_down
    return;
  }
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
}

void experts_backward(ExpertsWorkspace& ws, const ExpertsBackwardArgs& a, cudaStream_t stream) {
  const ExpertsShape& s = ws.shape_;
  MOE_CHECK(ws.backward_, "experts_backward: the workspace was made without backward buffers");
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width();
  const int sms = device_sm_count();
  if (s.max_rows == 0) return;
  const bool grouped = ws.backend_ == ExpertsBackend::grouped;
  const int32_t* off = grouped ? nullptr : ws.host_offsets(a.offsets, stream);
  MOE_CUBLAS_CHECK(cublasSetStream(ws.cublas_, stream));

  // da = dyp · w_down^T
  if (grouped) {
    ws.dact_.run({a.offsets, I, H, a.dyp, a.w_down, ws.da_}, stream);
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], m = off[e + 1] - off[e];
      if (m > 0)
        gemm_rows(ws.cublas_, m, I, H, a.dyp + r0 * H, a.w_down + e * I * H, true, ws.da_ + r0 * I);
    }
  }
  // dpre = da * act'(pre)
  activation_backward(s, sms, a.offsets, ws.da_, a.pre, ws.dpre_, stream);
  // dxp = dpre · w_up^T
  if (grouped) {
    ws.dxp_.run({a.offsets, H, A, ws.dpre_, a.w_up, a.dxp}, stream);
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], m = off[e + 1] - off[e];
      if (m > 0)
        gemm_rows(ws.cublas_, m, H, A, ws.dpre_ + r0 * A, a.w_up + e * H * A, true, a.dxp + r0 * H);
    }
  }
  // Weight gradients: per-expert cuBLAS over a host copy of the offsets (both backends for now).
  if (grouped) off = ws.host_offsets(a.offsets, stream);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], m = off[e + 1] - off[e];
    if (m == 0) continue;
    gemm_rows_tn_accumulate(ws.cublas_, m, I, H, a.act + r0 * I, a.dyp + r0 * H,
                            a.dw_down + e * I * H);  // dw_down[e] += act^T · dyp
    gemm_rows_tn_accumulate(ws.cublas_, m, H, A, a.xp + r0 * H, ws.dpre_ + r0 * A,
                            a.dw_up + e * H * A);    // dw_up[e] += xp^T · dpre
  }
}

}  // namespace moe::cuda
