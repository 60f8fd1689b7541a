// defines: moe::cuda::grouped_gemm::{DeferredActRecord, DeferredActMainloop,
//          EpilogueActivationDeferred, EpilogueActDeferred}
// The up-projection's SwiGLU epilogue run under the next tile's mainloop instead of after its own.
//
// Why: in the cooperative kernel both consumer warpgroups run the epilogue after each tile's
// mainloop while the tensor cores wait. The activation epilogue is instruction-bound (about 3 us
// per 128x256 tile at OLMoE's shape against a 17-18 us mainloop, experts_lab run 5: the fused
// up-projection takes 1.12x the plain GEMM), and no other tile or schedule hides it: pingpong and
// 64-row tiles lose more in the mainloop than they save (runs 3, 4).
//
// How: at the end of a tile's mainloop each consumer thread rounds its 128 accumulators to the 64
// bf16 (gate, up) pairs the epilogue would round them to (64 registers: the "stash"). The epilogue
// then only writes where this thread's act words go (a DeferredActRecord in shared memory, its
// own slot: no other thread reads it). The next tile's mainloop, after issuing each of its first 8
// k-slices' wgmmas and before waiting for them, computes one of the 8 blocks of 4 act words
// (8 pairs -> 16 bytes) and stores it, and with pre asked for (the training forward) also the
// block's pre (the 8 pairs as they are, two 16-byte words after the same quad exchange). The
// arithmetic and the stores are the immediate epilogue's (same functions, same rounding): pre and
// act are the same bits. The accumulators stay with the tensor cores; the stash costs 64 of the
// consumer's 232 registers.
//
// A CTA's last tile has no next mainloop: its epilogue runs at once from the accumulators, as
// EpilogueActivation's. The epilogue knows which tile is last by counting: CUTLASS's grouped
// scheduler hands CTA c (linear index blockIdx.x * gridDim.y + blockIdx.y along M, 1x1 cluster,
// no swizzle) tiles c, c + G, c + 2G, ... of the `tile_count` tiles over all groups (G = grid
// size); prepare_kernel counts them on the device. A count that were wrong would leave tiles
// unwritten or write stale ones: the tests poison act and compare every value.
//
// SwiGLU only (either pair order): GELU keeps the immediate epilogue
// (grouped_gemm_epilogue_act_sm90.hpp).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>

#include "experts_activation.cuh"
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

inline constexpr int kDeferredThreads = 256;  // the two consumer warpgroups
inline constexpr int kDeferredRecordBytes =
    kDeferredThreads * static_cast<int>(sizeof(DeferredActRecord));
inline constexpr int kDeferredBlocks = 8;     // 2 row halves x 4 blocks of 8 column groups

// One array per CTA: every caller in the kernel sees the same one.
CUTLASS_DEVICE DeferredActRecord* deferred_act_records() {
  __shared__ DeferredActRecord records[kDeferredThreads];
  return records;
}

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

// The consumer side of CUTLASS's ptr-array mainloop (the producer side is Base's: TMA, or the
// gathered loader) with the previous tile's activation interleaved. The same pipeline protocol
// as Base::mma: one k-slice's wgmmas in flight while the next is issued, each stage released
// once the wgmmas reading it are done, the last stage left to Base::mma_tail.
template <class Base>
struct DeferredActMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::Params;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TiledMma;
  static_assert(Base::K_PIPE_MMAS == 1, "mma_tail releases exactly one stage");
  static constexpr bool kGatheredA = requires { typename Base::GatherArgs; };

  uint32_t stash_[8 * kDeferredBlocks];  // the last tile's pairs, block b = 4 v1 + c
  bool pending_ = false;                 // a stash waits for its act to be stored

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          TensorStorage& shared_tensors, Params const&) {
    using namespace cute;
    static_assert(decltype(size(accum))::value == 4 * 32,
                  "128 accumulators per thread (128x256 tile)");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    static_assert(kWarpGroups * cutlass::NumThreadsPerWarpGroup == kDeferredThreads,
                  "two consumer warpgroups");
    const auto wg_threads =
        make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int wg = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(wg_threads(wg));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,M,K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,N,K,PIPE)

    const bool pending = pending_;
    DeferredActRecord rec{};
    if (pending) rec = deferred_act_records()[thread_idx];

    // Issue one k-slice's wgmmas (the first of the tile overwrites the accumulators).
    auto issue = [&](bool first) {
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      // A gathered A arrives by cp.async (generic proxy); wgmma reads through the async proxy.
      if constexpr (kGatheredA) cutlass::arch::fence_view_async_shared();
      const int stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      if (first) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    };
    PipelineState smem_pipe_release = smem_pipe_read;
    auto retire = [&] {  // the slice before the last issued is done: free its stage
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    };
    const int q = thread_idx & 3;
    auto store_block = [&](int b) {
      const uint32_t* h = stash_ + 8 * b;
      if (rec.pre != nullptr) {  // uniform: every lane takes part in the exchanges
        CUTLASS_PRAGMA_UNROLL
        for (int half = 0; half < 2; ++half) {
          const uint4 v = quad_transpose(h[4 * half], h[4 * half + 1], h[4 * half + 2],
                                         h[4 * half + 3], q);
          if ((rec.pre_mask >> (2 * b + half)) & 1u)
            *reinterpret_cast<uint4*>(rec.pre + (b / 4) * rec.pre_ld8 + 64 * (b % 4) +
                                      32 * half) = v;
        }
      }
      const uint4 v = deferred_act_block(h, rec.interleaved != 0, q);
      if ((rec.act_mask >> b) & 1u)
        *reinterpret_cast<uint4*>(rec.act + (b / 4) * rec.act_ld8 + 32 * (b % 4)) = v;
    };

    int k_left = k_tile_count;
    if (k_left > 0) issue(true), --k_left;
    // The first kDeferredBlocks slices each carry one block of the previous tile's act, done
    // while this slice's and the previous slice's wgmmas run. Unrolled, so that the stash is
    // indexed by constants and stays in registers.
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < kDeferredBlocks; ++b) {
      if (k_left > 0) {
        issue(false);
        if (pending) store_block(b);
        retire();
        --k_left;
      } else if (pending) {
        store_block(b);
      }
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_left > 0; --k_left) {
      issue(false);
      retire();
    }

    // This tile's pairs, as EpilogueActivation rounds them: value 2 v1 + 4 j (+1) is row half
    // v1's column pair of group j = 8 c + k.
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < kDeferredBlocks; ++b) {
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int i = 2 * (b / 4) + 4 * (8 * (b % 4) + k);
        __nv_bfloat162 h = __floats2bfloat162_rn(accum(i), accum(i + 1));
        stash_[8 * b + k] = *reinterpret_cast<uint32_t*>(&h);
      }
    }
    pending_ = true;  // unless this was the CTA's last tile; then no mma follows
  }
};

// EpilogueActivation for SwiGLU that leaves every tile but the CTA's last to the next mainloop
// (DeferredActMainloop): it records where the pre and act words go.
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
    static_assert(2 * kGroups / 8 == kDeferredBlocks, "a 256-column tile");
    if (tiles_left_ < 0) {  // first tile: how many this CTA gets
      const int64_t total = *params_.tile_count;
      const int64_t cta = int64_t{blockIdx.x} * gridDim.y + blockIdx.y;
      const int64_t grid = int64_t{gridDim.x} * gridDim.y * gridDim.z;
      tiles_left_ = total > cta ? static_cast<int>((total - cta + grid - 1) / grid) : 0;
    }
    if (--tiles_left_ <= 0) {  // the last: nothing runs after it
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
    for (int b = 0; b < kDeferredBlocks; ++b) {
      const bool row_ok = t.m[b / 4] < t.rows;
      if (row_ok && 2 * (col0 + 32 * (b % 4)) < t.cols) rec.act_mask |= 1u << b;
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half)
        if (row_ok && pre_col0 + 64 * (b % 4) + 32 * half < t.cols)
          rec.pre_mask |= 1u << (2 * b + half);
    }
    deferred_act_records()[thread_idx] = rec;
  }

 private:
  int tiles_left_ = -1;
};

using EpilogueActDeferred = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    EpilogueActivationDeferred>;

}  // namespace moe::cuda::grouped_gemm
