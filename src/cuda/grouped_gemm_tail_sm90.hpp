// defines: moe::cuda::grouped_gemm::{kTailRingBytes, TailMainloop}
// A segment's last M tile multiplied only where it has rows. Segments end anywhere, so the last of
// an expert's 128-row tiles holds 1-128 of its rows (64 on average) and the rest, past the segment,
// arrive as TMA's zero fill. CUTLASS's cooperative consumers multiply all 128 rows regardless:
// about 3 % of the tensor work at OLMoE (E = 64, 2048 rows an expert), 6 % at Qwen3 (E = 128,
// 1024), and most of it at decode (4 rows an expert). Each consumer warpgroup owns 64 of the
// tile's rows; here a warpgroup whose rows all lie past the segment's end issues no wgmma for the
// tile. Its accumulators keep the previous tile's values (clearing them anywhere in the loop makes
// ptxas serialise every wgmma, C7515), which is safe because those rows are never stored: every
// epilogue stops at the segment's end. The other warpgroup's arithmetic is unchanged: the same
// bits, about half the tensor work for a tail of 64 rows or less.
//
// Who knows the tile: only the producer warp is told the tile's coordinates and the group's
// problem shape. So it writes the tile's rows left (M - 128 m) into a ring in shared memory, one
// slot per tile that has a k-slice (a weight gradient's tile of an empty expert has none), in
// the order tiles are loaded, before it acquires the tile's first stage; the consumers read the
// slot after waiting for that stage (the mbarrier's arrive releases the write, the wait acquires
// it), in the same order. The ring has Stages + 1 slots: the producer reaches slotted tile t only
// after it has acquired the stage of slotted tile t - 1's last k-slice, which the consumers
// released Stages slices earlier, after reading the slots of every tile up to t - Stages - 1.
//
// TailMainloop<Base> wraps any of the ptr-array collectives here (CUTLASS's TMA one, or
// GatherMainloop): the producer side is Base's with the slot written first; the consumer side is
// consume(), CUTLASS's pipeline protocol (one k-slice's wgmmas in flight while the next is issued,
// each stage released once the wgmmas reading it are done, the last one left to Base::mma_tail)
// with the skip, and a hook after each of the first kBlocks slices for a deferred epilogue
// (DeferredMainloop).
#pragma once
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/dispatch_policy.hpp>

namespace moe::cuda::grouped_gemm {

// The ring's shared memory, taken from the stages' carveout (MainloopAB): Stages + 1 slots of 4
// bytes at the end of the mainloop's tensor storage, which rounds its size up to 128 bytes.
inline constexpr int kTailRingBytes = 128;

template <class Base>
struct TailMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::Params;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  using typename Base::TiledMma;
  static_assert(Base::K_PIPE_MMAS == 1, "mma_tail releases exactly one stage");

  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kWarpGroups = cute::size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  static constexpr int kRowsPerWarpGroup = kBlockM / kWarpGroups;
  static constexpr int kRing = Base::DispatchPolicy::Stages + 1;
  static_assert(kRing * 4 <= kTailRingBytes, "the ring outgrew its carveout");

  // The ring lives in the kernel's shared storage, not in a static __shared__ array: static shared
  // memory comes before the dynamic block and would move the stages off the 1024-byte alignment
  // that TMA's 128-byte swizzle needs.
  struct TensorStorage : Base::TensorStorage {
    int32_t tail_rows[kRing];
  };
  // Pingpong's consumers own whole tiles, one warpgroup each, and take turns: nothing to skip
  // (and a thread's count of its own tiles is not the producer's).
  static constexpr bool kSkips = kWarpGroups > 1;
  static constexpr bool kGatheredA = requires { typename Base::GatherArgs; };

  int32_t m_ = 0;      // producer: the current group's M
  uint32_t tile_ = 0;  // this thread's tiles so far (producer: loaded; consumer: multiplied)

  // Producer side: the group's M on each group change (the kernel calls this before the first
  // tile of a group is loaded), then the tile's slot before Base loads it.
  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& inputs,
                                                     Params const& params,
                                                     ProblemShape_MNKL problem,
                                                     int32_t next_batch) {
    m_ = static_cast<int32_t>(cute::get<0>(problem));
    return Base::tensors_perform_update(inputs, params, problem, next_batch);
  }

  template <class LoadInputs, class TensorMaps, class BlockCoord, class KTileIterator>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState state,
                           LoadInputs const& inputs, TensorMaps const& maps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& storage) {
    if constexpr (kSkips) {
      if (k_tile_count > 0) {
        if (cute::elect_one_sync())
          storage.tail_rows[tile_ % kRing] =
              m_ - static_cast<int32_t>(cute::get<0>(blk_coord)) * kBlockM;
        ++tile_;
        __syncwarp();  // the slot before Base's elected lane arrives on the stage's full barrier
      }
    }
    Base::load(params, pipeline, state, inputs, maps, blk_coord, k_tile_iter, k_tile_count,
               thread_idx, block_rank_in_cluster, storage);
  }

  // Consumer side. between(b), b < kBlocks, runs after the wgmmas of slice b + 1 are issued and
  // before those of slice b are waited for (or alone, once the tile has no slice left). A skipped
  // tile takes a path of its own, with the same waits and releases and no wgmma: a wgmma issue
  // under a runtime condition inside the loop makes ptxas serialise the wgmmas (C7515).
  template <int kBlocks, class FrgTensorC, class Between>
  CUTLASS_DEVICE void consume(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                              FrgTensorC& accum, int k_tile_count, int thread_idx,
                              TensorStorage& shared_tensors, Between&& between) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    const auto wg_threads =
        make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int wg = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(wg_threads(wg));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,M,K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,N,K,PIPE)

    auto wait = [&] {
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
    };
    // One waited-for k-slice's wgmmas (the first of the tile overwrites the accumulators).
    auto issue = [&](bool first) {
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
    auto release = [&] {
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    };
    auto retire = [&] {  // the slice before the last issued is done: free its stage
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      release();
    };

    int k_left = k_tile_count;
    bool multiply = true;
    if (k_left > 0) {
      wait();
      if constexpr (kSkips) {
        // Broadcast from lane 0, so that the compiler sees a warp-uniform branch (as wg above).
        const int32_t rows = __shfl_sync(0xffffffff, shared_tensors.tail_rows[tile_ % kRing], 0);
        multiply = rows > wg * kRowsPerWarpGroup;
        ++tile_;
      }
    }
    if (multiply) {
      if (k_left > 0) issue(true), --k_left;
      // Unrolled, so that a deferred epilogue's registers are indexed by constants.
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < kBlocks; ++b) {
        if (k_left > 0) {
          wait();
          issue(false);
          between(b);
          retire();
          --k_left;
        } else {
          between(b);
        }
      }
      CUTLASS_PRAGMA_NO_UNROLL
      for (; k_left > 0; --k_left) {
        wait();
        issue(false);
        retire();
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
    } else {  // k_left > 0 and slice 0 waited for
      ++smem_pipe_read, --k_left;
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < kBlocks; ++b) {
        if (k_left > 0) {
          wait();
          ++smem_pipe_read;
          between(b);
          release();
          --k_left;
        } else {
          between(b);
        }
      }
      CUTLASS_PRAGMA_NO_UNROLL
      for (; k_left > 0; --k_left) {
        wait();
        ++smem_pipe_read;
        release();
      }
    }
  }

  // The immediate epilogues' consumer: no deferred work.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          TensorStorage& shared_tensors, Params const&) {
    consume<0>(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors,
               [](int) {});
  }
};

}  // namespace moe::cuda::grouped_gemm
