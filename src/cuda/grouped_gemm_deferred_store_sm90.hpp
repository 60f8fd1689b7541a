// defines: moe::cuda::grouped_gemm::{DeferredStoreRecord, DeferredStore, StoreEpilogueArguments,
//          EpilogueStoreDeferred, EpilogueStoreDeferredOp, StoreF32EpilogueArguments,
//          EpilogueStoreF32, EpilogueStoreF32Op, DeferredStoreF32Record, DeferredStoreF32Half,
//          StoreF32DeferredEpilogueArguments, EpilogueStoreF32HalfDeferred,
//          EpilogueStoreF32HalfDeferredOp}
// A plain grouped GEMM's bf16 store (D = acc) run under the next tile's mainloop instead of after
// its own (the machinery: grouped_gemm_deferred_sm90.hpp): the down-projection's yp and the
// backward's dxp (rows in expert order), the bf16 weight gradients (dW_e stacked); and the fp32
// weight gradients' store from registers, row half 0 at once and row half 1 deferred (below).
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
  const int32_t* offsets = nullptr;     // (E+1) segment starts: group l's rows begin at offsets[l];
                                        // null: group l's (M, N) block at row l * M (dW_e)
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
    return args.d != nullptr && args.tile_count != nullptr && args.ld % 8 == 0 &&
           args.ld < (int64_t{1} << 28);  // DeferredStoreRecord::ld8
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

// ------------------------------------------------------------------------------------------------
// fp32 D (the weight gradients written fresh): from registers, the whole tile at once
// ------------------------------------------------------------------------------------------------
// A thread's 128 fp32 accumulators leave no room for a stash of the same size (232 registers),
// so at most half the tile can wait for the next mainloop (the library's, below); this stores it
// all at once, from registers instead of through shared memory and TMA stores (experts_lab run
// 22: 0.92-0.98x the TMA store's time, same bits), and is the lab's comparison since run 26.
// Stores are 16 bytes: lanes q and q ^ 1 swap one group's pair, after which the even lane holds
// columns 8 j + 2q .. + 3 of group j and the odd one those of group j + 1 (64 contiguous bytes per
// row per warp instruction).

// Group pair (j0, j0 + 1) of one row half: w = (j0's two values, j1's two values) of this lane.
// Stores this lane's 16 bytes at d + 8 j0 (d: the lane's row and first column, see below).
CUTLASS_DEVICE void store_f32_group_pair(float* d, int j0, uint32_t w0, uint32_t w1, uint32_t w2,
                                         uint32_t w3, bool odd, bool ok) {
  // Even lanes keep j0's pair and send j1's; odd lanes keep j1's and send j0's.
  const uint32_t s0 = __shfl_xor_sync(0xffffffffu, odd ? w0 : w2, 1);
  const uint32_t s1 = __shfl_xor_sync(0xffffffffu, odd ? w1 : w3, 1);
  const uint4 v = odd ? make_uint4(s0, s1, w2, w3) : make_uint4(w0, w1, s0, s1);
  if (ok) *reinterpret_cast<uint4*>(d + 8 * j0) = v;
}

// Where a lane's 16 bytes of group pair (j0, j0 + 1) start, relative to column 8 j0 of the tile:
// the even lane q at 2q (columns of j0), the odd one at 8 + 2 (q - 1) (columns of j1).
CUTLASS_DEVICE int f32_lane_column(int q) { return q & 1 ? 2 * q + 6 : 2 * q; }

// Row half v1 of a tile from its accumulators (value 2 v1 + 4 j + v0 is group j's column
// 2q + v0), at d (the row, the lane's first column col0 of the tile).
template <int kGroups, class Accumulators>
CUTLASS_DEVICE void store_f32_row_half(float* d, Accumulators const& accumulators, int v1,
                                       int col0, int cols, bool row_ok, bool odd) {
  CUTLASS_PRAGMA_UNROLL
  for (int g = 0; g < kGroups / 2; ++g) {
    const int i = 2 * v1 + 8 * g;  // group 2g's first value; group 2g + 1's is i + 4
    store_f32_group_pair(d, 2 * g, __float_as_uint(accumulators(i)),
                         __float_as_uint(accumulators(i + 1)),
                         __float_as_uint(accumulators(i + 4)),
                         __float_as_uint(accumulators(i + 5)), odd, row_ok && col0 + 16 * g < cols);
  }
}

struct StoreF32EpilogueArguments {
  float* d = nullptr;                   // (groups * M, ld): group l's (M, N) block at row l * M
  int64_t ld = 0;                       // N
  const int32_t* offsets = nullptr;     // null: the blocks are stacked (RegisterEpilogue::locate)
};

// D = acc in fp32 from registers, the whole tile at once (no shared memory, no TMA).
class EpilogueStoreF32 : public RegisterEpilogue<StoreF32EpilogueArguments> {
 public:
  using ElementC = float;
  using ElementD = float;

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.d != nullptr && args.ld % 8 == 0;
  }

  CUTLASS_HOST_DEVICE explicit EpilogueStoreF32(Params const& params)
      : RegisterEpilogue(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    const bool odd = t.q & 1;
    const int col0 = t.n_tile + f32_lane_column(t.q);
    CUTLASS_PRAGMA_UNROLL
    for (int v1 = 0; v1 < 2; ++v1)
      store_f32_row_half<kGroups>(params_.d + (t.row0 + t.m[v1]) * params_.ld + col0,
                                  accumulators, v1, col0, t.cols, t.m[v1] < t.rows, odd);
  }
};

using EpilogueStoreF32Op =
    cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<EpilogueStoreF32>;

// ------------------------------------------------------------------------------------------------
// fp32 D, row half 0 at once and row half 1 under the next tile's mainloop (the fresh fp32 dW)
// ------------------------------------------------------------------------------------------------
// Row half 1's 64 values (64 registers, as the bf16 stash) kept for the next mainloop. The stash
// words are taken from the accumulators by a volatile asm mov with a float operand. Version 13's
// plain copy (__float_as_uint) let the optimiser turn the mainloop's loop-carried accumulators
// of row half 1 into integers: each wgmma's outputs were then bitcast right after its issue, where
// ptxas must wait for them (C7517) and serialises the wgmmas (C7511). The PTX of this form has
// neither.

// Where one consumer thread's row half 1 goes (16 bytes).
struct DeferredStoreF32Record {
  float* d;       // row half 1's row, the lane's first column (f32_lane_column)
  uint32_t mask;  // bit g: group pair (2g, 2g + 1) lies inside the output
  uint32_t odd;   // lane q is odd
};

struct DeferredStoreF32Half {
  using Record = DeferredStoreF32Record;
  static constexpr int kBlocks = 8;  // 8 words each: row half 1's groups 4b .. 4b + 3
  Record rec;

  CUTLASS_DEVICE DeferredStoreF32Half(const Record& r, int) : rec(r) {}

  // Word p: row half 1's group p / 2, column 2q + p % 2 (value 2 + 4 (p / 2) + p % 2).
  // A float operand into a volatile asm (see above): no integer view of the accumulators in the
  // IR, and the copy stays where the source puts it, after the tile's last wgmma wait.
  template <class Accumulators>
  CUTLASS_DEVICE static uint32_t stash(Accumulators const& accum, int p) {
    uint32_t w;
    asm volatile("mov.b32 %0, %1;" : "=r"(w) : "f"(accum(2 + 4 * (p / 2) + p % 2)));
    return w;
  }

  CUTLASS_DEVICE void block(int b, const uint32_t* h) {
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < 2; ++k) {  // group pair 2b + k: groups 4b + 2k, + 1
      const int g = 2 * b + k;
      store_f32_group_pair(rec.d, 2 * g, h[4 * k], h[4 * k + 1], h[4 * k + 2], h[4 * k + 3],
                           rec.odd != 0, (rec.mask >> g) & 1u);
    }
  }
};

struct StoreF32DeferredEpilogueArguments : StoreF32EpilogueArguments {
  const int32_t* tile_count = nullptr;  // tiles over all groups (prepare_kernel counts them)
};

// EpilogueStoreF32's row half 0, and row half 1 recorded for DeferredMainloop<Base,
// DeferredStoreF32Half> (a CTA's last tile: stored at once).
class EpilogueStoreF32HalfDeferred : public RegisterEpilogue<StoreF32DeferredEpilogueArguments> {
 public:
  using ElementC = float;
  using ElementD = float;

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.d != nullptr && args.ld % 8 == 0 && args.tile_count != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit EpilogueStoreF32HalfDeferred(Params const& params)
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
    const bool odd = t.q & 1;
    const int col0 = t.n_tile + f32_lane_column(t.q);
    auto row = [&](int v1) { return params_.d + (t.row0 + t.m[v1]) * params_.ld + col0; };
    store_f32_row_half<kGroups>(row(0), accumulators, 0, col0, t.cols, t.m[0] < t.rows, odd);
    DeferredStoreF32Record rec;
    rec.d = row(1);
    rec.odd = odd ? 1u : 0u;
    rec.mask = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int g = 0; g < kGroups / 2; ++g)
      if (t.m[1] < t.rows && col0 + 16 * g < t.cols) rec.mask |= 1u << g;
    if (tiles_.last(params_.tile_count)) {  // nothing runs after it: store now
      DeferredStoreF32Half work(rec, t.q);
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < DeferredStoreF32Half::kBlocks; ++b) {
        uint32_t h[8];
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < 8; ++k) h[k] = DeferredStoreF32Half::stash(accumulators, 8 * b + k);
        work.block(b, h);
      }
      return;
    }
    deferred_records<DeferredStoreF32Record>()[thread_idx] = rec;
  }

 private:
  CtaTileCounter tiles_;
};

using EpilogueStoreF32HalfDeferredOp =
    cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
        EpilogueStoreF32HalfDeferred>;

}  // namespace moe::cuda::grouped_gemm
