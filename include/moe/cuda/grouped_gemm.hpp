// defines: moe::cuda::WeightLayout, GroupedGemmArgs, GroupedGemm,
//          GroupedWgradArgs, GroupedWgrad, GroupedGemmActArgs, GroupedGemmAct,
//          GroupedGemmActGradArgs, GroupedGemmActGrad
// Grouped GEMMs over the plan's segments, sizes on the device. Expert e owns the rows
// [offsets[e], offsets[e+1]) (m_e of them, possibly 0) of every (max_rows, width) row-major buffer
// in expert order (xp, pre, act, yp, dyp, ... of the experts stage). Four kinds:
//
//   GroupedGemm     D[rows of e] (m_e, N) = A[rows of e] (m_e, K) · B_e (K, N)
//                   bf16 in and out, fp32 accumulate. B_e is expert e's slice of a weight tensor
//                   (E, K, N) (WeightLayout::kn, the forward: w_up (E,H,A), w_down (E,I,H)) or
//                   (E, N, K) (WeightLayout::nk, the backward's dy · W^T).
//   GroupedWgrad    dW_e (P, Q) += X[rows of e]^T (P, m_e) · Y[rows of e] (m_e, Q)
//                   the weight gradients: the reduction runs over the segment (K = m_e differs
//                   per expert), bf16 in, fp32 accumulate and fp32 dW, read and written (beta = 1);
//                   or written fresh (accumulate false: a kernel whose epilogue has no C, so its
//                   mainloop gets a fourth stage), or written fresh in bf16.
//   GroupedGemmAct  the up-projection with the activation in its epilogue: GroupedGemm's
//                   pre = xp · w_up[e], then act = silu(gate) * up (SwiGLU) or gelu(pre) (GELU)
//                   from the bf16-rounded pre, written from the accumulators without `pre`
//                   ever being read back. pre itself is written too unless its pointer is null.
//   GroupedGemmActGrad  the backward's da = dyp · w_down[e]^T (B_e (N, K), N = I) with the
//                   activation backward in its epilogue: dpre = da * act'(pre) from the stored
//                   pre, da rounded to bf16 first (as GroupedGemm stores it) and never written, so
//                   dpre is bit for bit the unfused pair's (GroupedGemm, then the elementwise
//                   backward).
// With SwiGLU the up-projection runs each tile's epilogue under the next tile's mainloop
// (grouped_gemm_deferred_sm90.hpp): the same bits, the tensor cores no longer idle through it.
//
// The one decision to know: nothing about the segments reaches the host. A prepare kernel
// (<<<1, E>>>, grouped_gemm_prepare.cuh) turns the device offsets into per-expert problems,
// pointers and strides in the object's workspace, and a persistent CUTLASS sm90 kernel (TMA +
// wgmma, warp-specialised cooperative, grouped tile scheduler) walks them. Experts with m_e = 0
// get no tiles: their D rows do not exist, and their dW_e slice is left exactly as it was when
// accumulating (the semantics of the CPU reference's parameter gradients), zeroed when written
// fresh. So every call is
// asynchronous, deterministic (each output element is reduced by one CTA in a fixed K order) and
// CUDA-graph safe: a captured call replays with whatever offsets the device holds then.
//
// Rows [M, max_rows) of D / pre / act are not written. Constraints (checked): every width (N, K,
// P, Q) a multiple of 8 (TMA needs 16-byte aligned rows and segment starts); 1 <= E <= 4096;
// Hopper (sm_90a) only.
//
// SwiGLU in GroupedGemmAct needs w_up with its gate and up columns interleaved in pairs,
// column 2j = gate j and column 2j + 1 = up j (GateUpLayout::interleaved in experts.hpp): a thread
// of the wgmma accumulator layout holds columns (2q, 2q+1) of a row, so each thread owns whole
// (gate, up) pairs and the epilogue needs no data exchange. pre is then interleaved too.
// With the pairs further in GateUpLayout::blocked order (GroupedGemmActArgs::blocked), the four
// lanes of a quad need not exchange act either: each holds 8 consecutive units of it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"

namespace moe::cuda {

// How an expert's weight B_e is stored: kn = (K, N) row-major; nk = (N, K) row-major (B^T).
enum class WeightLayout { kn, nk };

struct GroupedGemmArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts; offsets[E] = M
  int64_t n = 0, k = 0;              // N, K (the same for every expert)
  const __nv_bfloat16* a = nullptr;  // (max_rows, K) rows in expert order, or (gather_rows, K)
  const __nv_bfloat16* b = nullptr;  // (E, K, N) kn, or (E, N, K) nk
  __nv_bfloat16* d = nullptr;        // (max_rows, N) rows < M written
  // Gathered A (WeightLayout::kn only): row r of the expert-ordered A is a[gather[r]], fetched by
  // the GEMM's loader, so the permuted copy is never written. An index outside [0, gather_rows)
  // (the plan's kPadToken for padding rows) reads as a zero row.
  const int32_t* gather = nullptr;   // (max_rows) device, e.g. the plan's row_token
  int64_t gather_rows = 0;           // rows of a (T)
};

struct GroupedWgradArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts
  int64_t p = 0, q = 0;              // P, Q: dW_e is (P, Q)
  const __nv_bfloat16* x = nullptr;  // (max_rows, P)   act for dw_down, xp for dw_up; with
                                     //   gather, (gather_rows, P): x itself for dw_up
  const __nv_bfloat16* y = nullptr;  // (max_rows, Q)   dyp for dw_down, dpre for dw_up
  float* dw = nullptr;               // (E, P, Q) fp32
  // true: dW_e += X_e^T Y_e (beta = 1, dW read and written). false: dW_e = X_e^T Y_e (dW is only
  // written, half the traffic, by a kernel whose epilogue has no C at all; an empty expert's dW_e
  // is set to zero), for the usual case of one contribution per step into gradients that would
  // otherwise be zeroed first.
  bool accumulate = true;
  // Instead of dw: bf16 dW_e = X_e^T Y_e, the fp32 sum rounded once (what PyTorch's autograd
  // writes for bf16 parameters); written fresh only (accumulate false), half of fp32's bytes.
  __nv_bfloat16* dw_bf16 = nullptr;  // (E, P, Q)
  // Or null: row r of X is x[gather[r]] (the plan's row_token), fetched by the kernel's own
  // loader, so no permuted copy of x is needed; indices outside [0, gather_rows) read as zero
  // rows (padding). The same bits as X = the permuted copy.
  const int32_t* gather = nullptr;   // (max_rows)
  int64_t gather_rows = 0;           // T
};

struct GroupedGemmActGradArgs {
  const int32_t* offsets = nullptr;    // (E+1) device segment starts
  int64_t n = 0, k = 0;                // N = I (units), K = H
  const __nv_bfloat16* a = nullptr;    // (max_rows, K) dyp
  const __nv_bfloat16* b = nullptr;    // (E, N, K) w_down
  const __nv_bfloat16* pre = nullptr;  // (max_rows, 2N) SwiGLU (pairs as in w_up), (max_rows, N) GELU
  __nv_bfloat16* dpre = nullptr;       // like pre; may be pre itself (read, then overwritten)
  bool blocked = false;                // SwiGLU: pairs in GateUpLayout::blocked order (N % 32 == 0)
  // Or null: the router-weight gradient's row dots, row_dot[p * ld_row_dot + r] = sum over the
  // columns u of tile p (kActGradTileN wide) of da[r, u] * act[r, u], da rounded to bf16 (as dpre
  // uses it) and act the activation of the stored pre in fp32 (each term within bf16's unit
  // roundoff, 2^-8, of the exact one); row_dot_parts(N) parts, ld_row_dot >= max_rows; rows past
  // the last segment are not written. Leaves dpre's bits as they are.
  float* row_dot = nullptr;
  int64_t ld_row_dot = 0;
};

// The column tile of GroupedGemmActGrad, and so its number of row-dot parts for N units.
inline constexpr int64_t kActGradTileN = 256;
constexpr int64_t row_dot_parts(int64_t n) { return (n + kActGradTileN - 1) / kActGradTileN; }

struct GroupedGemmActArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts
  int64_t n = 0, k = 0;              // N = A (2I for SwiGLU, I for GELU), K = H
  const __nv_bfloat16* a = nullptr;  // (max_rows, K) xp
  const __nv_bfloat16* b = nullptr;  // (E, K, N) w_up; SwiGLU: gate/up columns interleaved
  __nv_bfloat16* pre = nullptr;      // (max_rows, N) or nullptr (nothing saved: inference)
  __nv_bfloat16* act = nullptr;      // (max_rows, N/2) SwiGLU, (max_rows, N) GELU
  // SwiGLU only: w_up's pairs in GateUpLayout::blocked order (N a multiple of 64), so each thread
  // stores its 8 consecutive units of act as they lie; false: GateUpLayout::interleaved.
  bool blocked = false;
  // Gathered A, as GroupedGemmArgs::gather: row r of A is a[gather[r]] (a is then (gather_rows,
  // K)), fetched by the loader, so no permuted copy is read.
  const int32_t* gather = nullptr;
  int64_t gather_rows = 0;
};

// What the four kinds share: E, the SM count and one device workspace (problem sizes, pointer and
// stride arrays, CUTLASS's scheduler/TMA-descriptor workspace). One object per GEMM of the step
// (calls on one stream may also share one: each call's prepare kernel runs after the previous
// GEMM on that stream has finished with the arrays).
class GroupedGemmBase {
 public:
  int64_t experts() const { return experts_; }
  size_t bytes() const { return arena_.bytes(); }

 protected:
  GroupedGemmBase() = default;
  explicit GroupedGemmBase(int64_t experts);  // checks E and the device (Hopper)
  void allocate(size_t workspace_bytes);
  void check_ready() const;

  int64_t experts_ = 0;
  int sm_count_ = 0;
  void* workspace_ = nullptr;
  DeviceArena arena_;
};

class GroupedGemm : public GroupedGemmBase {
 public:
  GroupedGemm() = default;
  GroupedGemm(int64_t experts, WeightLayout layout);
  // D = A · B per segment, asynchronous on `stream`.
  void run(const GroupedGemmArgs& args, cudaStream_t stream) const;
  WeightLayout layout() const { return layout_; }
  // Which CUTLASS kernel runs ("bf16 B(K,N), sm90 ptr-array cooperative 128x256x64 ...").
  const char* name() const;

 private:
  WeightLayout layout_ = WeightLayout::kn;
};

class GroupedWgrad : public GroupedGemmBase {
 public:
  GroupedWgrad() = default;
  explicit GroupedWgrad(int64_t experts);
  // dW_e += X_e^T · Y_e per segment, asynchronous on `stream`.
  void run(const GroupedWgradArgs& args, cudaStream_t stream) const;
  const char* name() const;
};

class GroupedGemmAct : public GroupedGemmBase {
 public:
  GroupedGemmAct() = default;
  GroupedGemmAct(int64_t experts, Activation activation);
  // pre (optional) and act per segment, asynchronous on `stream`.
  void run(const GroupedGemmActArgs& args, cudaStream_t stream) const;
  Activation activation() const { return activation_; }
  const char* name() const;

 private:
  Activation activation_ = Activation::swiglu;
};

class GroupedGemmActGrad : public GroupedGemmBase {
 public:
  GroupedGemmActGrad() = default;
  GroupedGemmActGrad(int64_t experts, Activation activation);
  // dpre per segment, asynchronous on `stream`.
  void run(const GroupedGemmActGradArgs& args, cudaStream_t stream) const;
  Activation activation() const { return activation_; }
  const char* name() const;

 private:
  Activation activation_ = Activation::swiglu;
};

}  // namespace moe::cuda
