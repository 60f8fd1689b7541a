// defines: moe::cuda::PlanShape, PlanView, PlanBuffers, plan_forward, download_plan
// The DispatchPlan of include/moe/plan.hpp built on the device, with no host synchronisation and
// no global sort. Everything the plan decides stays on the device: counts, offsets, the number of
// rows M, drops. Host code knows only the static upper bound on rows (max_rows), which sizes the
// buffers and the grids of the next stages; kernels read M from plan.num_rows.
//
// The one decision to know: rows are placed by a chunked counting sort over choices in priority
// order (see plan.hpp). Each chunk of priority order counts its experts; a column scan over chunks
// gives every chunk its base per expert; a warp then ranks its chunk's choices with __match_any_sync,
// which is stable, so row positions equal the CPU's sequential fill bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/plan.hpp"

#if defined(__CUDACC__)
#define MOE_PLAN_HD __host__ __device__
#else
#define MOE_PLAN_HD
#endif

namespace moe::cuda {

// Static description of a plan: enough to size every buffer and grid without looking at routing.
struct PlanShape {
  int64_t tokens = 0, experts = 0;  // T, E
  int64_t top_k = 0;                // K for token choice; 0 for expert choice
  int64_t choices = 0;              // N (T*K for token choice)
  Layout layout = Layout::dropless;
  int64_t capacity = 0;             // padded layout: C rows per expert
  int64_t block_size = 1;           // block layout: segments rounded up to a multiple of this

  // Upper bound on M: dropless N, padded E*C, block N + E*(block_size-1) (each segment wastes
  // at most block_size-1 rows).
  MOE_PLAN_HD int64_t max_rows() const {
    if (layout == Layout::padded) return experts * capacity;
    if (layout == Layout::block) return choices + experts * (block_size - 1);
    return choices;
  }
  // Priority order is cut into chunks of chunk_size choices (a multiple of 32), one warp each;
  // chunk_size grows with N so that a column scan over chunks stays short (a warp per column, at
  // most kMaxChunks / 32 chunks per lane) while small N still gets several chunks in parallel.
  MOE_PLAN_HD int64_t chunk_size() const {
    const int64_t want = ((choices + kMaxChunks - 1) / kMaxChunks + 31) / 32 * 32;
    return want > kMinChunk ? want : kMinChunk;
  }
  MOE_PLAN_HD int64_t chunks() const {
    const int64_t g = (choices + chunk_size() - 1) / chunk_size();
    return g > 1 ? g : 1;
  }
  void validate() const;  // throws ConfigError naming the field
  static constexpr int64_t kMaxChunks = 1024;
  static constexpr int64_t kMinChunk = 128;
};

// Device pointers of one plan; passed to kernels by value. All indices are int32 (the config
// limits shapes so that rows, tokens and choices fit).
struct PlanView {
  PlanShape shape;
  int32_t* counts = nullptr;         // (E) choices routed to each expert, before drops
  int32_t* kept = nullptr;           // (E) choices that got a row
  int32_t* offsets = nullptr;        // (E+1) segment starts; offsets[E] = M
  int32_t* num_rows = nullptr;       // (1) M, padding included (= offsets[E])
  int32_t* drops = nullptr;          // (2) dropped_by_capacity, skipped_by_policy
  int32_t* row_token = nullptr;      // (max_rows) source token, kPadToken(T) for padding and for
                                     //            rows in [M, max_rows)
  int32_t* row_choice = nullptr;     // (max_rows) choice of each row, -1 for padding
  int32_t* token_offsets = nullptr;  // (T+1) token-major inverse: a token's choices ...
  int32_t* token_rows = nullptr;     // (N) ... their rows (or kDropped) in choice order
  int32_t* token_choices = nullptr;  // (N) ... and the choice indices
  int32_t* choice_row = nullptr;     // (N) row of each choice, or kDropped
  // scratch
  int32_t* chunk_base = nullptr;     // (E+1, G) per-chunk expert counts, then per-chunk bases;
                                     //          column E counts kNoExpert choices
  uint32_t* token_mask = nullptr;    // (T, ceil(E/32)) expert choice: bit e of token t = e took t
  uint32_t* scan_done = nullptr;     // (1) plan_scan blocks finished (0 between calls; one
                                     //     plan_forward at a time per PlanBuffers); not in the
                                     //     arena, so poison() leaves it
};

// Owns one arena with every PlanView array; sized once for a PlanShape.
class PlanBuffers {
 public:
  PlanBuffers() = default;
  explicit PlanBuffers(const PlanShape& shape);
  const PlanView& view() const { return view_; }
  const PlanShape& shape() const { return view_.shape; }
  size_t bytes() const { return arena_.bytes(); }
  // Fill every byte of the arena with `byte` (tests: an entry the plan failed to write shows up;
  // 0x7b makes int32 0x7b7b7b7b, which is no valid row, token or sentinel).
  void poison(cudaStream_t stream, int byte = 0x7b) const;

 private:
  PlanView view_;
  DeviceArena arena_;
  DeviceArena counters_;  // scan_done
};

// Build the plan of `routing` into `plan` (shapes must agree). Asynchronous on `stream`.
void plan_forward(const RoutingView& routing, const PlanView& plan, cudaStream_t stream);

// Copy the plan to the host in the CPU's DispatchPlan form (synchronises; tests and check only).
DispatchPlan download_plan(const PlanView& plan, cudaStream_t stream);

}  // namespace moe::cuda
