// defines: moe::cuda::grouped_gemm::{kDeferredThreads, kStashPairs, deferred_records,
//          deferred_record_bytes, stash_pair, CtaTileCounter, DeferredMainloop}
// A register epilogue run under the next tile's mainloop instead of after its own: the machinery
// the deferred epilogues share: the plain GEMMs' bf16 store (grouped_gemm_deferred_store_sm90.hpp)
// and the SwiGLU forward (grouped_gemm_deferred_act_sm90.hpp), the library's; the SwiGLU backward
// (grouped_gemm_deferred_act_grad_sm90.hpp), measured slower: the lab's only.
//
// Why: in the cooperative kernel both consumer warpgroups run the epilogue after each tile's
// mainloop while the tensor cores wait. The activation epilogues are instruction-bound (the
// forward's about 3 us per 128x256 tile at OLMoE's shape against a 17-18 us mainloop, experts_lab
// run 5), the plain stores wait for shared-memory buffers and TMA stores (run 21), and no other
// tile or schedule hides them: pingpong and 64-row tiles lose more in the mainloop than they save
// (runs 3, 4).
//
// How: at the end of a tile's mainloop each consumer thread rounds its 128 accumulators to the 64
// bf16 pairs the epilogue would round them to (64 registers: the "stash"). The epilogue then only
// writes what the deferred work needs to know about the tile (a Work::Record in shared memory, the
// thread's own slot: no other thread reads it). The next tile's mainloop, after issuing each of
// its first Work::kBlocks k-slices' wgmmas and before waiting for them, does one block of the
// deferred work (64 / kBlocks pairs each, in order: row half 0's column groups, then row half
// 1's). The accumulators stay with the tensor cores.
//
// Work, the deferred epilogue's arithmetic:
//   Work::Record                             what the epilogue records per thread
//   Work::kBlocks                            blocks a tile's deferred work is cut into
//   Work(Record const&, int q)               the thread's record in shared memory (read only
//                                            while a stash is pending), q = its lane in its quad
//   void block(int b, const uint32_t* pairs) block b from its 64 / kBlocks stashed bf16 pairs
//   static uint32_t stash(accum, int p)      optional: stash word p, where it is not bf16 pair p
//                                            (DeferredStoreF32Half: row half 1's fp32 values)
// Every lane of a warp calls it with the same b (quad exchanges, row-dot shuffles).
//
// A CTA's last tile has no next mainloop: its epilogue runs at once from the accumulators. The
// epilogue knows which tile is last by counting (CtaTileCounter).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>

namespace moe::cuda::grouped_gemm {

inline constexpr int kDeferredThreads = 256;  // the two consumer warpgroups
inline constexpr int kStashPairs = 64;        // bf16 pairs a consumer thread keeps of a tile

// One array per CTA and record type: every caller in the kernel sees the same one.
template <class Record>
CUTLASS_DEVICE Record* deferred_records() {
  __shared__ Record records[kDeferredThreads];
  return records;
}

// The shared memory the records take from the mainloop's stages.
template <class Work>
inline constexpr int deferred_record_bytes =
    kDeferredThreads * static_cast<int>(sizeof(typename Work::Record));

// Pair p of a tile's stash (row half p / 32, column group p % 32) from the accumulators, rounded
// to bf16 as the immediate epilogues round them (value 2 v1 + 4 j (+1), RegisterEpilogue).
template <class Accumulators>
CUTLASS_DEVICE uint32_t stash_pair(Accumulators const& accum, int p) {
  const int i = 2 * (p / 32) + 4 * (p % 32);
  __nv_bfloat162 h = __floats2bfloat162_rn(accum(i), accum(i + 1));
  return *reinterpret_cast<uint32_t*>(&h);
}

// Which of a CTA's tiles is its last. CUTLASS's grouped scheduler hands CTA c (linear index
// blockIdx.x * gridDim.y + blockIdx.y along M, 1x1 cluster, no swizzle) tiles c, c + G, c + 2G,
// ... of the `tile_count` tiles over all groups (G = grid size); prepare_kernel counts them on the
// device. A count that were wrong would leave tiles unwritten or write stale ones: the tests
// poison the outputs and compare every value.
struct CtaTileCounter {
  int left = -1;

  // Called once per tile, in the scheduler's order: is this tile the CTA's last?
  CUTLASS_DEVICE bool last(const int32_t* tile_count) {
    if (left < 0) {
      const int64_t total = *tile_count;
      const int64_t cta = int64_t{blockIdx.x} * gridDim.y + blockIdx.y;
      const int64_t grid = int64_t{gridDim.x} * gridDim.y * gridDim.z;
      left = total > cta ? static_cast<int>((total - cta + grid - 1) / grid) : 0;
    }
    return --left <= 0;
  }
};

// The consumer side of CUTLASS's ptr-array mainloop (the producer side is Base's: TMA, or the
// gathered loader) with the previous tile's deferred epilogue interleaved. The same pipeline
// protocol as Base::mma: one k-slice's wgmmas in flight while the next is issued, each stage
// released once the wgmmas reading it are done, the last stage left to Base::mma_tail.
template <class Base, class Work>
struct DeferredMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::Params;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TiledMma;
  using Record = typename Work::Record;
  static_assert(Base::K_PIPE_MMAS == 1, "mma_tail releases exactly one stage");
  static constexpr bool kGatheredA = requires { typename Base::GatherArgs; };

  static constexpr int kBlocks = Work::kBlocks;
  static constexpr int kPairs = kStashPairs / kBlocks;  // per block
  static_assert(kPairs * kBlocks == kStashPairs && kPairs % 4 == 0, "whole quads of pairs");

  // The last tile's pairs: row half v1's column group j (8 columns, this thread's 2) is pair
  // 32 v1 + j, so block b is pairs kPairs * b .. + kPairs - 1.
  uint32_t stash_[kStashPairs];
  bool pending_ = false;  // a stash waits for its deferred epilogue

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
    Work work(deferred_records<Record>()[thread_idx], thread_idx & 3);

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
    auto deferred = [&](int b) { work.block(b, stash_ + kPairs * b); };

    int k_left = k_tile_count;
    if (k_left > 0) issue(true), --k_left;
    // The first kBlocks slices each carry one block of the previous tile's epilogue, done
    // while this slice's and the previous slice's wgmmas run. Unrolled, so that the stash is
    // indexed by constants and stays in registers.
    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < kBlocks; ++b) {
      if (k_left > 0) {
        issue(false);
        if (pending) deferred(b);
        retire();
        --k_left;
      } else if (pending) {
        deferred(b);
      }
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_left > 0; --k_left) {
      issue(false);
      retire();
    }

    // This tile's pairs, as the immediate epilogues round them: value 2 v1 + 4 j (+1) is row
    // half v1's column pair of group j.
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < kStashPairs; ++p) {
      if constexpr (requires { Work::stash(accum, 0); })
        stash_[p] = Work::stash(accum, p);
      else
        stash_[p] = stash_pair(accum, p);
    }
    pending_ = true;  // unless this was the CTA's last tile; then no mma follows
  }
};

}  // namespace moe::cuda::grouped_gemm
