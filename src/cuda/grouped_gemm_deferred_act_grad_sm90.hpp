// defines: moe::cuda::grouped_gemm::{DeferredActGradRecord, DeferredActGrad,
//          EpilogueActivationGradDeferred, EpilogueActGradDeferred}
// The da GEMM's SwiGLU backward run under the next tile's mainloop instead of after its own, as
// the up-projection's forward is (the machinery: grouped_gemm_deferred_sm90.hpp). Measured
// slower than the immediate epilogue, so the library does not use it; the lab compares them
// (experts_lab --ab-act-grad, ActGradKernel<Config, true, kBlocks>).
//
// The stash holds da rounded to bf16, as EpilogueActivationGrad rounds it (column pair 2q, 2q + 1
// of each 8-unit group). The epilogue records where this thread's pre and dpre lie; block b of
// the next mainloop (64 / kBlocks groups of a row half) loads those groups' stored pre, writes
// dpre back to the same places and adds da * act to the row's dot, in the immediate epilogue's
// order with its arithmetic (swiglu_grad_pair): dpre and the row dots are the same bits (checked
// before every lab round).
//
// What was measured (H100, experts_lab run 20, B/A against the immediate epilogue at OLMoE and
// Qwen3): 8 blocks of 8 groups 1.14-1.29x, 16 of 4 1.57-1.71x; loading each block's pre a slice
// ahead, in the block, or after an L2 prefetch of the tile's pre rows all cost about the same or
// more. Each block costs about 2 us whatever its size, against the forward's deferred blocks
// (stores only) that hide under the mainloop: the consumers' global loads are what does not
// overlap. The SASS keeps one wgmma batch in flight through the blocks (no serialising wait);
// Nsight Compute shows the consumers waiting longer on global loads (long-scoreboard stalls 3.13
// -> 4.17 cycles per issued instruction) and the L2 hit rate falling 74 -> 65 %: pre's traffic
// spread over the mainloop competes with the operands' reuse in L2. Global-space accesses
// instead of generic ones gave 1.14-1.17x. Run 23 then ruled out the two obvious causes: each
// block's loads issued one to three slices early, and pre / dpre as evict-first L2 traffic, were
// slower still (1.15-1.36x, more so the wider the blocks spread).
//
// SwiGLU only (either pair order).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include "grouped_gemm_deferred_sm90.hpp"
#include "grouped_gemm_epilogue_act_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// Where one consumer thread's pre and dpre of the stashed tile lie (40 bytes).
struct DeferredActGradRecord {
  const __nv_bfloat16* pre;  // row half 0, block 0: pre + r * ld + 2 (n_tile + 2q), interleaved
                             //                      pre + r * ld + 2 (n_tile + 8q), blocked
  __nv_bfloat16* dpre;       // the same place in dpre
  float* row_dot;            // row half 0's part: row_dot + p * ld_row_dot + r; null: none
  int32_t ld8;               // 8 * ld: row half 1 is 8 rows further
  int32_t units_left;        // N - n_tile - 2q (interleaved) or - 8q (blocked)
  uint16_t rows_ok;          // bit v1: row half v1 lies inside the segment
  uint16_t interleaved;      // pairs interleaved (1) or blocked (0)
  int32_t unused;
};

// The deferred work: one block of dpre (kPairs = 64 / kBlocks groups of a row half) per k-slice.
template <int kBlocks_>
struct DeferredActGrad {
  using Record = DeferredActGradRecord;
  static constexpr int kBlocks = kBlocks_;
  static constexpr int kPairs = kStashPairs / kBlocks;  // 8-unit groups per block
  static constexpr int kPerRow = kBlocks / 2;           // blocks per row half
  static_assert(kPairs == 4 || kPairs == 8, "one or two blocked 32-unit runs per block");
  // Read field by field where used: 10 registers fewer beside the accumulators, the stash and
  // pre (ptxas spilled with the record held in registers). The pointers come from shared memory,
  // so the accesses name the global space themselves (else they compile to generic LD / ST).
  const volatile Record& rec;
  int q;
  uint32_t pre[2 * kPairs];  // block b's stored (gate, up) pairs
  float dot = 0.f;           // the row half's da * act so far

  CUTLASS_DEVICE DeferredActGrad(const Record& r, int lane_in_quad) : rec(r), q(lane_in_quad) {}

  // Block b is row half b / kPerRow's groups g0 = kPairs (b % kPerRow) .. + kPairs - 1.
  // Interleaved: group j's two units are the 8 bytes at element 16 j of the row half. Blocked:
  // 4-group block j / 4's 8 pairs are the 32 bytes at element 16 j. Words outside the output read
  // as zeros, as the immediate epilogue's (they then add 0 to the dot).
  CUTLASS_DEVICE void load(int b) {
    const int v1 = b / kPerRow, g0 = kPairs * (b % kPerRow);
    const bool row_ok = (rec.rows_ok >> v1) & 1u;
    const __nv_bfloat16* src = rec.pre + v1 * rec.ld8 + 16 * g0;
    if (rec.interleaved) {
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kPairs; ++k) {
        uint2 w = make_uint2(0, 0);
        if (row_ok && 8 * (g0 + k) < rec.units_left)
          w = __ldcg(reinterpret_cast<const uint2*>(src + 16 * k));
        pre[2 * k] = w.x, pre[2 * k + 1] = w.y;
      }
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int hh = 0; hh < kPairs / 4; ++hh) {
        uint4 w0 = make_uint4(0, 0, 0, 0), w1 = w0;
        if (row_ok && 8 * (g0 + 4 * hh) < rec.units_left) {
          const uint4* p = reinterpret_cast<const uint4*>(src + 64 * hh);
          w0 = __ldcg(p), w1 = __ldcg(p + 1);
        }
        pre[8 * hh + 0] = w0.x, pre[8 * hh + 1] = w0.y, pre[8 * hh + 2] = w0.z;
        pre[8 * hh + 3] = w0.w, pre[8 * hh + 4] = w1.x, pre[8 * hh + 5] = w1.y;
        pre[8 * hh + 6] = w1.z, pre[8 * hh + 7] = w1.w;
      }
    }
  }

  // h[k]: da of group g0 + k, columns 2q (low half) and 2q + 1 (high half).
  CUTLASS_DEVICE void block(int b, const uint32_t* h) {
    load(b);
    const int v1 = b / kPerRow, g0 = kPairs * (b % kPerRow);
    const bool row_ok = (rec.rows_ok >> v1) & 1u;
    auto da = [&](int k, int v0) {
      uint32_t u = h[k];
      const __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&u);
      return v0 ? __high2float(x) : __low2float(x);
    };
    __nv_bfloat16* dst = rec.dpre + v1 * rec.ld8 + 16 * g0;
    if (rec.interleaved) {
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kPairs; ++k) {
        const uint32_t lo = swiglu_grad_pair(da(k, 0), pre[2 * k], dot);
        const uint32_t hi = swiglu_grad_pair(da(k, 1), pre[2 * k + 1], dot);
        if (row_ok && 8 * (g0 + k) < rec.units_left)
          __stcg(reinterpret_cast<uint2*>(dst + 16 * k), make_uint2(lo, hi));
      }
    } else {
      // Lane q's pair 8q + s of 4-group block g0 / 4 + hh is group 4 hh + s % 4's column
      // 2q + s / 4.
      CUTLASS_PRAGMA_UNROLL
      for (int hh = 0; hh < kPairs / 4; ++hh) {
        uint32_t o[8];
        CUTLASS_PRAGMA_UNROLL
        for (int s = 0; s < 8; ++s)
          o[s] = swiglu_grad_pair(da(4 * hh + s % 4, s / 4), pre[8 * hh + s], dot);
        if (row_ok && 8 * (g0 + 4 * hh) < rec.units_left) {
          uint4* p = reinterpret_cast<uint4*>(dst + 64 * hh);
          __stcg(p, make_uint4(o[0], o[1], o[2], o[3]));
          __stcg(p + 1, make_uint4(o[4], o[5], o[6], o[7]));
        }
      }
    }
    if (b % kPerRow == kPerRow - 1) {  // the row half is done: the quad's sum, as the immediate
      if (rec.row_dot != nullptr) {    // uniform
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (row_ok && q == 0) __stcg(rec.row_dot + 8 * v1, dot);
      }
      dot = 0.f;
    }
  }
};

// EpilogueActivationGrad for SwiGLU that leaves every tile but the CTA's last to the next
// mainloop (DeferredMainloop<Base, DeferredActGrad<kBlocks>>): it records where pre and dpre lie.
template <int kBlocks>
class EpilogueActivationGradDeferred : public EpilogueActivationGrad {
 public:
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) {
    return EpilogueActivationGrad::can_implement(shape, args) && args.swiglu != 0 &&
           args.tile_count != nullptr &&
           args.ld_pre < (int64_t{1} << 27);  // DeferredActGradRecord::ld8 (as deferrable())
  }

  CUTLASS_HOST_DEVICE explicit EpilogueActivationGradDeferred(Params const& params)
      : EpilogueActivationGrad(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();
    static_assert(2 * kGroups == kStashPairs, "a 256-column tile");
    using Work = DeferredActGrad<kBlocks>;
    constexpr int kTileN = cute::size<1>(BlockShapeMNK{});
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    const bool interleaved = params_.blocked == 0;
    const int first = t.n_tile + (interleaved ? 2 : 8) * t.q;  // the thread's first unit
    const int64_t r = t.row0 + t.m[0];
    const int64_t at = r * params_.ld_pre + 2 * int64_t{first};
    DeferredActGradRecord rec;
    rec.pre = params_.pre + at;
    rec.dpre = params_.dpre + at;
    rec.row_dot = params_.row_dot
                      ? params_.row_dot + (t.n_tile / kTileN) * params_.ld_row_dot + r
                      : nullptr;
    rec.ld8 = static_cast<int32_t>(8 * params_.ld_pre);
    rec.units_left = t.cols - first;
    rec.rows_ok = static_cast<uint16_t>((t.m[0] < t.rows ? 1 : 0) | (t.m[1] < t.rows ? 2 : 0));
    rec.interleaved = interleaved ? 1 : 0;
    rec.unused = 0;
    DeferredActGradRecord& slot = deferred_records<DeferredActGradRecord>()[thread_idx];
    slot = rec;
    if (tiles_.last(params_.tile_count)) {
      // Nothing runs after it: the same blocks now, from the accumulators. Not the immediate
      // epilogue, whose row half of pre (64 registers) does not fit beside the mainloop's stash.
      Work work(slot, t.q);
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < kBlocks; ++b) {
        uint32_t h[Work::kPairs];
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < Work::kPairs; ++k)
          h[k] = stash_pair(accumulators, Work::kPairs * b + k);
        work.block(b, h);
      }
    }
  }

 private:
  CtaTileCounter tiles_;
};

template <int kBlocks>
using EpilogueActGradDeferred =
    cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
        EpilogueActivationGradDeferred<kBlocks>>;

}  // namespace moe::cuda::grouped_gemm
