// defines: moe::cuda::grouped_gemm::{DeferredActRecord, DeferredAct, EpilogueActivationDeferred,
//          EpilogueActDeferred}
// The up-projection's SwiGLU epilogue run under the next tile's mainloop instead of after its own
// (the machinery, and why: grouped_gemm_deferred_sm90.hpp).
//
// The stash holds the 64 bf16 (gate, up) pairs EpilogueActivation would round the accumulators
// to. The epilogue records where this thread's act (and pre) words go; block b of the next
// mainloop computes 4 act words (8 pairs -> 16 bytes) and stores them, and with pre asked for (the
// training forward) also the block's pre (the 8 pairs as they are, two 16-byte words after the
// same quad exchange). The arithmetic and the stores are the immediate epilogue's (same functions,
// same rounding): pre and act are the same bits. The stash costs 64 of the consumer's 232
// registers.
//
// SwiGLU only (either pair order): GELU keeps the immediate epilogue
// (grouped_gemm_epilogue_act_sm90.hpp).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include "experts_activation.cuh"
#include "grouped_gemm_deferred_sm90.hpp"
#include "grouped_gemm_epilogue_act_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// Where one consumer thread's words of the stashed tile go.
struct DeferredActRecord {
  __nv_bfloat16* act;  // row half 0, block 0: act + r * ld_act + n_tile / 2 + 8 q
  __nv_bfloat16* pre;  // row half 0, block 0: pre + r * ld_pre + n_tile + 8 q; null: no pre
  int32_t act_ld8;     // 8 * ld_act: row half 1 is 8 rows further
  int32_t pre_ld8;     // 8 * ld_pre
  uint32_t act_mask;   // bit 4 v1 + c: row half v1's act block c lies inside the output
  uint32_t pre_mask;   // bit 2 (4 v1 + c) + h: the same for pre's half h of that block
  int32_t interleaved; // pairs interleaved (1) or blocked (0): how act's words are ordered
  int32_t unused;
};

// Block b of a stash: 8 (gate, up) pairs -> the 16 bytes of act this lane stores, the immediate
// epilogue's arithmetic and word order on the same values (EpilogueActivation: blocked pairs are
// in place; interleaved ones go through the quad exchange, so every lane must call it).
CUTLASS_DEVICE uint4 deferred_act_block(const uint32_t* h, bool interleaved, int q) {
  uint32_t a[4];
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < 4; ++k) {
    uint32_t u0 = h[2 * k], u1 = h[2 * k + 1];
    const __nv_bfloat162 x0 = *reinterpret_cast<__nv_bfloat162*>(&u0);
    const __nv_bfloat162 x1 = *reinterpret_cast<__nv_bfloat162*>(&u1);
    __nv_bfloat162 y = __floats2bfloat162_rn(act::silu_mul(__low2float(x0), __high2float(x0)),
                                             act::silu_mul(__low2float(x1), __high2float(x1)));
    a[k] = *reinterpret_cast<uint32_t*>(&y);
  }
  if (!interleaved) return make_uint4(a[0], a[1], a[2], a[3]);
  const uint4 t = quad_transpose(a[0], a[1], a[2], a[3], q);
  return make_uint4(__byte_perm(t.x, t.y, 0x5410), __byte_perm(t.z, t.w, 0x5410),
                    __byte_perm(t.x, t.y, 0x7632), __byte_perm(t.z, t.w, 0x7632));
}

// The deferred work: one block of act (and pre) stores per k-slice.
struct DeferredAct {
  using Record = DeferredActRecord;
  static constexpr int kBlocks = 8;  // 8 pairs each: row half b / 4, groups 8 (b % 4) .. + 7
  Record rec;
  int q;

  CUTLASS_DEVICE DeferredAct(const Record& r, int lane_in_quad) : rec(r), q(lane_in_quad) {}

  CUTLASS_DEVICE void block(int b, const uint32_t* h) {
    if (rec.pre != nullptr) {  // uniform: every lane takes part in the exchanges
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const uint4 v = quad_transpose(h[4 * half], h[4 * half + 1], h[4 * half + 2],
                                       h[4 * half + 3], q);
        if ((rec.pre_mask >> (2 * b + half)) & 1u)
          *reinterpret_cast<uint4*>(rec.pre + (b / 4) * rec.pre_ld8 + 64 * (b % 4) + 32 * half) =
              v;
      }
    }
    const uint4 v = deferred_act_block(h, rec.interleaved != 0, q);
    if ((rec.act_mask >> b) & 1u)
      *reinterpret_cast<uint4*>(rec.act + (b / 4) * rec.act_ld8 + 32 * (b % 4)) = v;
  }
};

// EpilogueActivation for SwiGLU that leaves every tile but the CTA's last to the next mainloop
// (DeferredMainloop<Base, DeferredAct>): it records where the pre and act words go.
class EpilogueActivationDeferred : public EpilogueActivation {
 public:
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) {
    return EpilogueActivation::can_implement(shape, args) && args.swiglu != 0 &&
           args.tile_count != nullptr &&
           args.ld_pre < (int64_t{1} << 27);  // DeferredActRecord::pre_ld8 (ld_act is half)
  }

  CUTLASS_HOST_DEVICE explicit EpilogueActivationDeferred(Params const& params)
      : EpilogueActivation(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK residue, int thread_idx,
                                 char* smem) {
    using namespace cute;
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();
    static_assert(2 * kGroups == kStashPairs, "a 256-column tile");
    if (tiles_.last(params_.tile_count)) {  // nothing runs after it
      EpilogueActivation::operator()(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl,
                                     accumulators, tiled_mma, residue, thread_idx, smem);
      return;
    }
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    DeferredActRecord rec;
    const int64_t r = t.row0 + t.m[0];
    const int col0 = t.n_tile / 2 + 8 * t.q;  // act column of block 0
    const int pre_col0 = t.n_tile + 8 * t.q;  // pre column of block 0, half 0
    rec.act = params_.act + r * params_.ld_act + col0;
    rec.pre = params_.pre ? params_.pre + r * params_.ld_pre + pre_col0 : nullptr;
    rec.act_ld8 = static_cast<int32_t>(8 * params_.ld_act);
    rec.pre_ld8 = static_cast<int32_t>(8 * params_.ld_pre);
    rec.act_mask = rec.pre_mask = 0;
    rec.interleaved = params_.blocked ? 0 : 1;
    rec.unused = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < DeferredAct::kBlocks; ++b) {
      const bool row_ok = t.m[b / 4] < t.rows;
      if (row_ok && 2 * (col0 + 32 * (b % 4)) < t.cols) rec.act_mask |= 1u << b;
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half)
        if (row_ok && pre_col0 + 64 * (b % 4) + 32 * half < t.cols)
          rec.pre_mask |= 1u << (2 * b + half);
    }
    deferred_records<DeferredActRecord>()[thread_idx] = rec;
  }

 private:
  CtaTileCounter tiles_;
};

using EpilogueActDeferred = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    EpilogueActivationDeferred>;

}  // namespace moe::cuda::grouped_gemm
