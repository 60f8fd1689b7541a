// defines: moe::cuda::WeightLayout, GroupedGemmArgs, GroupedGemm
// One grouped GEMM over the plan's segments, sizes on the device: for each expert e with rows
// [offsets[e], offsets[e+1]) (m_e of them, possibly 0),
//
//     D[rows of e] (m_e, N) = A[rows of e] (m_e, K) · B_e (K, N)        bf16 in, fp32 accumulate
//
// A and D are row-major (max_rows, K) / (max_rows, N) buffers in expert order (xp, pre, act, yp of
// the experts stage); B_e is expert e's slice of a weight tensor (E, K, N) (WeightLayout::kn, the
// forward: w_up (E,H,A), w_down (E,I,H)) or (E, N, K) (WeightLayout::nk, the backward's
// dy · W^T). Rows [M, max_rows) of D are not written.
//
// The one decision to know: nothing about the segments reaches the host. A prepare kernel
// (<<<1, E>>>, grouped_gemm_prepare.cuh) turns the device offsets into per-expert {m, N, K},
// pointers and strides in this object's workspace, and a persistent CUTLASS sm90 kernel
// (TMA + wgmma, warp-specialised cooperative, grouped tile scheduler) walks them. Empty experts
// get no tiles. So a call is asynchronous and CUDA-graph safe.
//
// Constraints (checked): N and K multiples of 8 (TMA needs 16-byte aligned rows and segment
// starts); 1 <= E <= 4096. Hopper (sm_90a) only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/cuda/arena.hpp"

namespace moe::cuda {

// How an expert's weight B_e is stored: kn = (K, N) row-major; nk = (N, K) row-major (B^T).
enum class WeightLayout { kn, nk };

struct GroupedGemmArgs {
  const int32_t* offsets = nullptr;  // (E+1) device segment starts; offsets[E] = M
  int64_t n = 0, k = 0;              // N, K (the same for every expert)
  const __nv_bfloat16* a = nullptr;  // (max_rows, K) rows in expert order
  const __nv_bfloat16* b = nullptr;  // (E, K, N) kn, or (E, N, K) nk
  __nv_bfloat16* d = nullptr;        // (max_rows, N) rows < M written
};

// Owns the device workspace of one grouped GEMM (problem sizes, pointer and stride arrays,
// CUTLASS's scheduler/TMA-descriptor workspace) for E experts and one weight layout; one object
// per GEMM of the step (calls on one stream may also share one).
class GroupedGemm {
 public:
  GroupedGemm() = default;
  GroupedGemm(int64_t experts, WeightLayout layout);
  // D = A · B per segment, asynchronous on `stream`.
  void run(const GroupedGemmArgs& args, cudaStream_t stream) const;

  int64_t experts() const { return experts_; }
  WeightLayout layout() const { return layout_; }
  size_t bytes() const { return arena_.bytes(); }
  // Which CUTLASS kernel runs ("sm90 cooperative 128x256x64 cluster 2x1x1, B kn").
  const char* name() const;

 private:
  int64_t experts_ = 0;
  WeightLayout layout_ = WeightLayout::kn;
  int sm_count_ = 0;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  DeviceArena arena_;
};

}  // namespace moe::cuda
