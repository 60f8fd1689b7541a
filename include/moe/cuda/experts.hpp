// defines: moe::cuda::ExpertsShape, ExpertsBackend, ExpertsForwardArgs, ExpertsBackwardArgs,
//          ExpertsWorkspace, experts_forward, experts_backward
// experts: xp[M,H] -> yp[M,H], each expert's FFN over its segment [offsets[e], offsets[e+1]) of
// rows, as cpu::experts_forward / cpu::experts_backward (src/cpu/experts.cpp) with bf16 storage and
// fp32 accumulation:
//   pre = xp · w_up[e]        (m_e, A)   A = 2I for SwiGLU ([gate | up]), I for GELU
//   act = silu(gate) * up     (m_e, I)   or gelu(pre), exact erf form; fp32 math, bf16 stored
//   yp  = act · w_down[e]     (m_e, H)
// backward (dyp given): da = dyp · w_down[e]^T, dpre = da * act'(pre), dxp = dpre · w_up[e]^T
// (written), dw_down[e] += act^T · dyp and dw_up[e] += xp^T · dpre (fp32, accumulated, like the
// CPU's parameter gradients).
// Rows [M, max_rows) of every output are not written; padding rows inside segments (padded and
// block layouts) are computed like any row, as on the CPU (their xp rows are 0).
//
// Backends:
//   grouped                   CUTLASS sm90 grouped GEMMs (grouped_gemm.hpp) with problem sizes
//                             built on the device: forward and dxp never synchronise the host.
//   cublas_loop_host_offsets  baseline: copies offsets to the host (synchronises the stream), then
//                             one cublasGemmEx (bf16, fp32 compute) per non-empty expert.
// The activation is a separate elementwise kernel in both (the fused epilogue comes later).
// The weight gradients are a per-expert cuBLAS loop over a host copy of offsets in both backends:
// the one host round trip left in the grouped path (a ragged-K grouped GEMM replaces it next).
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda {

struct ExpertsShape {
  int64_t experts = 0;                         // E
  int64_t hidden = 0;                          // H
  int64_t inter = 0;                           // I
  Activation activation = Activation::swiglu;
  int64_t max_rows = 0;                        // rows of xp/pre/act/yp buffers (PlanShape::max_rows)
  int64_t up_width() const { return activation == Activation::swiglu ? 2 * inter : inter; }  // A
  void validate() const;  // throws ConfigError naming the field
};

enum class ExpertsBackend { grouped, cublas_loop_host_offsets };
std::string_view name(ExpertsBackend b);

using bf16 = __nv_bfloat16;

struct ExpertsForwardArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts; offsets[E] = M
  const bf16* w_up = nullptr;        // (E, H, A)
  const bf16* w_down = nullptr;      // (E, I, H)
  const bf16* xp = nullptr;          // (max_rows, H)
  bf16* pre = nullptr;               // (max_rows, A) saved for the backward
  bf16* act = nullptr;               // (max_rows, I) saved for the backward
  bf16* yp = nullptr;                // (max_rows, H)
};

struct ExpertsBackwardArgs {
  const int32_t* offsets = nullptr;  // (E+1) device
  const bf16* w_up = nullptr;        // (E, H, A)
  const bf16* w_down = nullptr;      // (E, I, H)
  const bf16* xp = nullptr;          // (max_rows, H) forward input
  const bf16* pre = nullptr;         // (max_rows, A) from the forward
  const bf16* act = nullptr;         // (max_rows, I) from the forward
  const bf16* dyp = nullptr;         // (max_rows, H)
  bf16* dxp = nullptr;               // (max_rows, H) written
  float* dw_up = nullptr;            // (E, H, A) accumulated
  float* dw_down = nullptr;          // (E, I, H) accumulated
};

// Everything the stage needs besides its inputs and outputs, made once: the grouped GEMMs'
// workspaces (up, down, and the backward's two W^T products), the backward's intermediates
// da (max_rows, I) and dpre (max_rows, A) in one arena, a cuBLAS handle and a pinned copy of
// offsets for the loops.
class ExpertsWorkspace {
 public:
  ExpertsWorkspace(const ExpertsShape& shape, ExpertsBackend backend, bool backward = true);
  ~ExpertsWorkspace();
  ExpertsWorkspace(const ExpertsWorkspace&) = delete;
  ExpertsWorkspace& operator=(const ExpertsWorkspace&) = delete;

  const ExpertsShape& shape() const { return shape_; }
  ExpertsBackend backend() const { return backend_; }
  size_t bytes() const { return arena_.bytes() + up_.bytes() + down_.bytes() + dact_.bytes() +
                                dxp_.bytes(); }
  std::string report() const { return arena_.report(); }

 private:
  friend void experts_forward(ExpertsWorkspace&, const ExpertsForwardArgs&, cudaStream_t);
  friend void experts_backward(ExpertsWorkspace&, const ExpertsBackwardArgs&, cudaStream_t);
  const int32_t* host_offsets(const int32_t* offsets, cudaStream_t stream);  // synchronises

  ExpertsShape shape_;
  ExpertsBackend backend_;
  bool backward_;
  cublasHandle_t cublas_ = nullptr;
  int32_t* pinned_offsets_ = nullptr;  // (E+1) host, page-locked
  GroupedGemm up_, down_, dact_, dxp_;
  bf16* da_ = nullptr;                 // (max_rows, I)
  bf16* dpre_ = nullptr;               // (max_rows, A)
  DeviceArena arena_;
};

void experts_forward(ExpertsWorkspace& ws, const ExpertsForwardArgs& args, cudaStream_t stream);
void experts_backward(ExpertsWorkspace& ws, const ExpertsBackwardArgs& args, cudaStream_t stream);

}  // namespace moe::cuda
