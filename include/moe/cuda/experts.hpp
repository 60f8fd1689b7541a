// defines: moe::cuda::GateUpLayout, ExpertsShape, ExpertsBackend, ExpertsForwardArgs,
//          ExpertsBackwardArgs, ExpertsWorkspace, experts_forward, experts_backward,
//          interleave_gate_up, split_gate_up, to_gate_up_layout, from_gate_up_layout
// experts: xp[M,H] -> yp[M,H], each expert's FFN over its segment [offsets[e], offsets[e+1]) of
// rows, as cpu::experts_forward / cpu::experts_backward (src/cpu/experts.cpp) with bf16 storage and
// fp32 accumulation:
//   pre = xp · w_up[e]        (m_e, A)   A = 2I for SwiGLU, I for GELU
//   act = silu(gate) * up     (m_e, I)   or gelu(pre), exact erf form; fp32 math, bf16 stored
//   yp  = act · w_down[e]     (m_e, H)
// backward (dyp given): da = dyp · w_down[e]^T, dpre = da * act'(pre), dxp = dpre · w_up[e]^T
// (written), dw_down[e] += act^T · dyp and dw_up[e] += xp^T · dpre (fp32, accumulated, like the
// CPU's parameter gradients: an expert with no rows leaves its slices exactly unchanged).
// Rows [M, max_rows) of every output are not written; padding rows inside segments (padded and
// block layouts) are computed like any row, as on the CPU (their xp rows are 0).
//
// SwiGLU's 2I columns of w_up (and so of pre, dpre, dw_up) are ordered by GateUpLayout:
//   split        [gate 0..I-1 | up 0..I-1], the CPU reference's layout
//   interleaved  gate j at column 2j, up j at 2j + 1 -- what the fused epilogue needs (every thread
//                of the GEMM holds whole pairs); the parameters are kept in this order (convert
//                once at load time with interleave_gate_up, and the optimiser does not care).
//   blocked      interleaved pairs, and within each block of 32 units (64 columns) pair 4a + q
//                holds unit 8q + a (a < 8, q < 4): the fused epilogue's thread q then owns units
//                8q .. 8q + 7 of every block and stores its act as one 16-byte word, with no
//                exchange between lanes. act, da, w_down and dw_down keep the natural unit order.
//                Needs I a multiple of 32 (ExpertsShape::validate).
// Every backend takes any of them, except grouped_fused, which needs interleaved or blocked for
// SwiGLU. Convert with to_gate_up_layout / from_gate_up_layout.
//
// Backends (name(b) gives the string):
//   grouped                      CUTLASS sm90 grouped GEMMs (grouped_gemm.hpp): up, activation as
//                                an elementwise kernel, down; backward da, dxp and the weight
//                                gradients (ragged-K grouped GEMM). Problem sizes are built on the
//                                device: nothing synchronises the host, a CUDA graph of forward +
//                                backward replays correctly for any offsets.
//   grouped_fused                grouped, with the activation in the up-projection's epilogue
//                                (GroupedGemmAct): pre is read back by nobody in the forward and
//                                need not be written at all without a backward (args.pre null);
//                                and its gradient in the da GEMM's epilogue (GroupedGemmActGrad):
//                                da is never stored, dpre comes straight from the accumulators.
//                                Bit-identical to grouped. Measured on an H100 the forward is
//                                5-9 % faster than grouped's at OLMoE and Qwen3 (writing pre) and
//                                8-12 % faster in a layer without backward (no pre); not at
//                                Mixtral's I = 14336 (experts_lab.md, "Version 5").
//   cublas_loop_host_offsets     baseline: copies offsets to the host (synchronises the stream),
//                                then one cublasGemmEx (bf16, fp32 compute) per non-empty expert.
//   cublas_grouped_host_offsets  baseline: the same host copy, then one cublasGemmGroupedBatchedEx
//                                per GEMM (one group per non-empty expert; sizes are host arrays
//                                in that API, hence the copy). Weight gradients: the cuBLAS loop.
//   cublas_strided_padded        baseline for the padded layout only (offsets[e] = e*C,
//                                max_rows = E*C, C = max_rows / E): every GEMM is one
//                                cublasGemmStridedBatchedEx over E batches of C rows, padding
//                                included. No host round trip; the offsets are not read except M.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda {

enum class GateUpLayout { split, interleaved, blocked };
std::string_view name(GateUpLayout g);

struct ExpertsShape {
  int64_t experts = 0;                         // E
  int64_t hidden = 0;                          // H
  int64_t inter = 0;                           // I
  Activation activation = Activation::swiglu;
  int64_t max_rows = 0;                        // rows of xp/pre/act/yp buffers (PlanShape::max_rows)
  GateUpLayout gate_up = GateUpLayout::split;  // SwiGLU: column order of w_up / pre / dw_up
  int64_t up_width() const { return activation == Activation::swiglu ? 2 * inter : inter; }  // A
  void validate() const;  // throws ConfigError naming the field
};

enum class ExpertsBackend {
  grouped,
  grouped_fused,
  cublas_loop_host_offsets,
  cublas_grouped_host_offsets,
  cublas_strided_padded,
};
inline constexpr ExpertsBackend kAllExpertsBackends[] = {
    ExpertsBackend::grouped, ExpertsBackend::grouped_fused,
    ExpertsBackend::cublas_loop_host_offsets, ExpertsBackend::cublas_grouped_host_offsets,
    ExpertsBackend::cublas_strided_padded};
std::string_view name(ExpertsBackend b);
ExpertsBackend parse_experts_backend(std::string_view text, std::string_view field = "backend");
// True for the backends whose calls never wait for the device (CUDA-graph capturable).
bool is_host_sync_free(ExpertsBackend b);

using bf16 = __nv_bfloat16;

struct ExpertsForwardArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts; offsets[E] = M
  const bf16* w_up = nullptr;        // (E, H, A)
  const bf16* w_down = nullptr;      // (E, I, H)
  const bf16* xp = nullptr;          // (max_rows, H), or null when gathering (below)
  bf16* pre = nullptr;               // (max_rows, A) saved for the backward (grouped_fused: may
                                     //                be null, then nothing is saved)
  bf16* act = nullptr;               // (max_rows, I) saved for the backward
  bf16* yp = nullptr;                // (max_rows, H)
  // The grouped backends may instead gather: the up-projection reads row r of its A as
  // x[row_token[r]] inside the GEMM's loader, so no xp is written or read (a row_token outside
  // [0, tokens), the plan's kPadToken, is a zero row, as permute writes for padding).
  const bf16* x = nullptr;           // (tokens, H)
  const int32_t* row_token = nullptr;// (max_rows) device, the plan's row -> token map
  int64_t tokens = 0;                // T
};

struct ExpertsBackwardArgs {
  const int32_t* offsets = nullptr;  // (E+1) device
  const bf16* w_up = nullptr;        // (E, H, A)
  const bf16* w_down = nullptr;      // (E, I, H)
  const bf16* xp = nullptr;          // (max_rows, H) forward input, or null when gathering (below)
  const bf16* pre = nullptr;         // (max_rows, A) from the forward
  const bf16* act = nullptr;         // (max_rows, I) from the forward
  const bf16* dyp = nullptr;         // (max_rows, H)
  bf16* dxp = nullptr;               // (max_rows, H) written
  float* dw_up = nullptr;            // (E, H, A) accumulated, or overwritten (accumulate false)
  float* dw_down = nullptr;          // (E, I, H) likewise
  // Scratch, null: the workspace's own (then it must have been made with own_scratch). The
  // grouped backends run dw_down, da, dpre, dxp, dw_up in that order, so with them a caller may
  // alias dead storage: da onto act (dw_down has read it), dpre onto pre (the activation backward
  // reads each element of pre before writing the same element of dpre), dxp onto dyp (da was its
  // last reader). The other backends take da / dpre too, without aliasing. grouped_fused never
  // stores da (its activation backward runs in the da GEMM's epilogue): da may be null there.
  // grouped_fused runs dw_down beside the da GEMM (experts_backward): dpre must not alias act or
  // dyp there.
  bf16* da = nullptr;                // (max_rows, I)
  bf16* dpre = nullptr;              // (max_rows, A)
  // false: the weight gradients are written, not added to (beta = 0: dW is never read, and an
  // empty expert's dW is zeroed), for a caller that would otherwise zero them first.
  bool accumulate = true;
  // Grouped backends: the weight gradients in bf16 instead of dw_up / dw_down (which are then
  // null), written fresh (accumulate false), each the fp32 sum rounded once -- what PyTorch's
  // autograd writes for bf16 parameters, with half the bytes of fp32.
  bf16* dw_up_bf16 = nullptr;        // (E, H, A)
  bf16* dw_down_bf16 = nullptr;      // (E, I, H)
  // The grouped backends may gather instead of reading xp: dw_up's loader fetches row r of X as
  // x[row_token[r]] (GroupedWgradArgs::gather), as the forward's up-projection does.
  const bf16* x = nullptr;           // (tokens, H)
  const int32_t* row_token = nullptr;// (max_rows) device, the plan's row -> token map
  int64_t tokens = 0;                // T
  // grouped_fused only, or null: the da GEMM's row dots of da with act (GroupedGemmActGradArgs::
  // row_dot), (row_dot_parts(I), max_rows) fp32. With dyp = w * dy their sum over the parts is
  // w * <dy, yp> for each row: the router-weight gradient without reading yp.
  float* row_dot = nullptr;
};

struct ExpertsCublasArrays;  // experts.cu: host-side argument arrays of the grouped-batched calls

// Everything the stage needs besides its inputs and outputs, made once: the grouped GEMMs'
// workspaces, the backward's intermediates da (max_rows, I) and dpre (max_rows, A) in one arena
// (unless own_scratch is false: then every backward call passes them in ExpertsBackwardArgs),
// a cuBLAS handle (the cuBLAS baselines only; `cublas` shares one, not owned, instead of making
// one: a handle holds 64 MiB of device memory on an H100), pinned host copies of offsets and of
// the grouped-batched pointer arrays, and (grouped_fused with backward) a second stream with the
// two events that fork dw_down onto it and join it back.
class ExpertsWorkspace {
 public:
  ExpertsWorkspace(const ExpertsShape& shape, ExpertsBackend backend, bool backward = true,
                   bool own_scratch = true, cublasHandle_t cublas = nullptr);
  ~ExpertsWorkspace();
  ExpertsWorkspace(const ExpertsWorkspace&) = delete;
  ExpertsWorkspace& operator=(const ExpertsWorkspace&) = delete;

  const ExpertsShape& shape() const { return shape_; }
  ExpertsBackend backend() const { return backend_; }
  size_t bytes() const {
    return arena_.bytes() + up_.bytes() + up_act_.bytes() + down_.bytes() + dact_.bytes() +
           dact_act_.bytes() + dxp_.bytes() + wgrad_down_.bytes() + wgrad_up_.bytes();
  }
  std::string report() const { return arena_.report(); }

  // Per-GEMM slots of the grouped-batched pointer arrays (cublas_grouped_host_offsets).
  enum Slot { kUp, kDown, kDact, kDxp, kSlots };

 private:
  friend void experts_forward(ExpertsWorkspace&, const ExpertsForwardArgs&, cudaStream_t,
                              cudaEvent_t*);
  friend void experts_backward(ExpertsWorkspace&, const ExpertsBackwardArgs&, cudaStream_t,
                               cudaEvent_t*);
  friend struct ExpertsCublas;
  const int32_t* host_offsets(const int32_t* offsets, cudaStream_t stream);  // synchronises

  ExpertsShape shape_;
  ExpertsBackend backend_;
  bool backward_;
  int sm_count_ = 0;
  cublasHandle_t cublas_ = nullptr;
  bool own_cublas_ = false;
  int32_t* pinned_offsets_ = nullptr;  // (E+1) host, page-locked
  void** pinned_ptrs_ = nullptr;       // (kSlots, 3, E) host, page-locked: A, B, C per group
  void** device_ptrs_ = nullptr;       // (kSlots, 3, E) device copy
  std::unique_ptr<ExpertsCublasArrays> cublas_arrays_;  // host m/n/k/ld arrays per slot
  GroupedGemm up_, down_, dact_, dxp_;
  GroupedGemmAct up_act_;
  GroupedGemmActGrad dact_act_;
  GroupedWgrad wgrad_down_, wgrad_up_;
  bf16* da_ = nullptr;                 // (max_rows, I); none for grouped_fused
  bf16* dpre_ = nullptr;               // (max_rows, A)
  DeviceArena arena_;
  cudaStream_t side_ = nullptr;        // grouped_fused backward: dw_down beside the da GEMM
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
};

// The grouped backends' forward steps, in order (benchmarks time them: experts_forward's events).
// up: the up-projection with the activation (fused in its epilogue on grouped_fused, a pass after
// it on grouped); down: the down-projection.
enum class ExpertsForwardStep { up, down, count };
const char* name(ExpertsForwardStep s);

// events: null, or int(ExpertsForwardStep::count) + 1 events recorded on `stream` at the step
// boundaries (grouped backends only).
void experts_forward(ExpertsWorkspace& ws, const ExpertsForwardArgs& args, cudaStream_t stream,
                     cudaEvent_t* events = nullptr);
// The grouped backends' backward steps, in order (benchmarks time them: experts_backward's events).
// On grouped_fused the activation backward runs inside the da step; its own step is empty.
enum class ExpertsBackwardStep { dw_down, da, activation, dxp, dw_up, count };
const char* name(ExpertsBackwardStep s);

// events: null, or int(ExpertsBackwardStep::count) + 1 events recorded on `stream` at the step
// boundaries (grouped backends only: the others' steps run in another order). Without events,
// grouped_fused runs dw_down on the workspace's second stream beside the da GEMM and joins it
// before dxp (same results, bit for bit); with events every step runs on `stream` in order, so
// that each can be timed alone. Either way the call is stream-ordered on `stream` and may be
// captured into a CUDA graph.
void experts_backward(ExpertsWorkspace& ws, const ExpertsBackwardArgs& args, cudaStream_t stream,
                      cudaEvent_t* events = nullptr);

// Reorder the 2I columns of a (rows, 2I) row-major matrix between GateUpLayouts: w_up seen as
// (E*H, 2I) at load time, and back for checkpoints or comparisons (dw_up in fp32). In place is
// not allowed (dst != src). interleave_gate_up / split_gate_up are the interleaved cases.
void to_gate_up_layout(const bf16* split, bf16* dst, GateUpLayout to, int64_t rows, int64_t inter,
                       cudaStream_t stream);
void from_gate_up_layout(const bf16* src, GateUpLayout from, bf16* split, int64_t rows,
                         int64_t inter, cudaStream_t stream);
void from_gate_up_layout(const float* src, GateUpLayout from, float* split, int64_t rows,
                         int64_t inter, cudaStream_t stream);
void interleave_gate_up(const bf16* split, bf16* interleaved, int64_t rows, int64_t inter,
                        cudaStream_t stream);
void split_gate_up(const bf16* interleaved, bf16* split, int64_t rows, int64_t inter,
                   cudaStream_t stream);
void split_gate_up(const float* interleaved, float* split, int64_t rows, int64_t inter,
                   cudaStream_t stream);

}  // namespace moe::cuda
