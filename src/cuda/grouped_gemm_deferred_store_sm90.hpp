// defines: moe::cuda::grouped_gemm::{DeferredStoreRecord, DeferredStore, StoreEpilogueArguments,
//          EpilogueStoreDeferred, EpilogueStoreDeferredOp}
// A plain grouped GEMM's bf16 store (D = acc, rows in expert order) run under the next tile's
// mainloop instead of after its own (the machinery: grouped_gemm_deferred_sm90.hpp): the
// down-projection's yp, the backward's dxp.
//
// Why: the plain GEMMs' TMA store epilogue (EpilogueStoreStaged, 4 D buffers) runs after each
// tile's mainloop while the tensor cores wait: the consumers stage eight 128x32 subtiles through
// shared memory and wait for the TMA stores to free buffers. At OLMoE's down-projection a tile's
// mainloop is only 16 k-slices, so that wait is a large share of it (4 D buffers instead of 2
// already gave 0.95-0.98x, experts_lab run 16).
//
// The stash holds the 64 bf16 pairs the store rounds the accumulators to (fp32 -> bf16, round to
// nearest even, as the TMA epilogue's conversion). Block b of the next mainloop stores row half
// b / 4's groups 8 (b % 4) .. + 7: two quad exchanges, after which each lane holds 8 consecutive
// columns, and two 16-byte stores (64 contiguous bytes per row per warp instruction). D is the
// same bits as the TMA epilogue's.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include "grouped_gemm_deferred_sm90.hpp"
#include "grouped_gemm_epilogue_act_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// Where one consumer thread's words of the stashed tile go (16 bytes).
struct DeferredStoreRecord {
  __nv_bfloat16* d;  // row half 0, block 0: d + r * ld + n_tile + 8 q
  int32_t ld8;       // 8 * ld: row half 1 is 8 rows further
  uint32_t mask;     // bit 2 b + h: block b's half h lies inside the output
};

struct DeferredStore {
  using Record = DeferredStoreRecord;
  static constexpr int kBlocks = 8;  // 8 pairs each: row half b / 4, groups 8 (b % 4) .. + 7
  Record rec;
  int q;

  CUTLASS_DEVICE DeferredStore(const Record& r, int lane_in_quad) : rec(r), q(lane_in_quad) {}

  // Every lane calls it (quad exchanges); only the stores are predicated.
  CUTLASS_DEVICE void block(int b, const uint32_t* h) {
    CUTLASS_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      const uint4 v =
          quad_transpose(h[4 * half], h[4 * half + 1], h[4 * half + 2], h[4 * half + 3], q);
      if ((rec.mask >> (2 * b + half)) & 1u)
        *reinterpret_cast<uint4*>(rec.d + (b / 4) * rec.ld8 + 64 * (b % 4) + 32 * half) = v;
    }
  }
};

struct StoreEpilogueArguments {
  const int32_t* offsets = nullptr;     // (E+1) segment starts: group l's rows begin at offsets[l]
  __nv_bfloat16* d = nullptr;           // (max_rows, ld)
  int64_t ld = 0;                       // N
  const int32_t* tile_count = nullptr;  // tiles over all groups (prepare_kernel counts them)
};

// Records where this thread's words of the tile go, for DeferredMainloop<Base, DeferredStore>; a
// CTA's last tile is stored at once, by the same blocks from its accumulators.
class EpilogueStoreDeferred : public RegisterEpilogue<StoreEpilogueArguments> {
 public:
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.offsets != nullptr && args.d != nullptr && args.tile_count != nullptr &&
           args.ld % 8 == 0 && args.ld < (int64_t{1} << 28);  // DeferredStoreRecord::ld8
  }

  CUTLASS_HOST_DEVICE explicit EpilogueStoreDeferred(Params const& params)
      : RegisterEpilogue(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();
    static_assert(2 * kGroups == kStashPairs, "a 256-column tile");
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    DeferredStoreRecord rec;
    const int col0 = t.n_tile + 8 * t.q;  // this lane's first column: block 0, half 0
    rec.d = params_.d + (t.row0 + t.m[0]) * params_.ld + col0;
    rec.ld8 = static_cast<int32_t>(8 * params_.ld);
    rec.mask = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < DeferredStore::kBlocks; ++b)
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half)
        if (t.m[b / 4] < t.rows && col0 + 64 * (b % 4) + 32 * half < t.cols)
          rec.mask |= 1u << (2 * b + half);

    if (tiles_.last(params_.tile_count)) {  // nothing runs after it: store now
      DeferredStore work(rec, t.q);
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < DeferredStore::kBlocks; ++b) {
        uint32_t h[8];
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < 8; ++k) h[k] = stash_pair(accumulators, 8 * b + k);
        work.block(b, h);
      }
      return;
    }
    deferred_records<DeferredStoreRecord>()[thread_idx] = rec;
  }

 private:
  CtaTileCounter tiles_;
};

using EpilogueStoreDeferredOp =
    cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<EpilogueStoreDeferred>;

}  // namespace moe::cuda::grouped_gemm
