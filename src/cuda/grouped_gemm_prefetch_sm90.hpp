// defines: moe::cuda::grouped_gemm::PrefetchMainloop
// A grouped-GEMM mainloop whose otherwise idle auxiliary producer warp brings the rows its epilogue
// will read into L2 while the tile's mainloop runs: the da GEMM's epilogue reads the stored pre of
// its tile (128 rows x 2 x 256 bf16 = 128 KiB) right after the mainloop, and every CTA asks for it
// at once. The operands' own producer and the consumers are CUTLASS's, untouched, and a prefetch
// changes no value: the GEMM's bits are the base's.
//
// Pacing. The warp gets each tile from the grouped scheduler like the other warps, up to the
// scheduler's 8 stages ahead of the consumers, so it waits for the tile's k-slice
// max(0, k_tiles - kLead) to land in shared memory (the full barrier the consumers wait on) before
// it prefetches: kLead slices before the tile's epilogue, early enough to hide DRAM's latency and
// late enough that 132 CTAs' tiles fit in L2 beside the operands. The wait is bounded in time
// (kMaxWaitNs): the warp only observes the barrier and is never on the pipeline's critical path,
// and a bound means a wait that missed its phase (it cannot here: the warp runs ahead of the
// producer) ends in a late prefetch, never a hang.
//
// Derived from CUTLASS's ptr-array TMA collective like GatherMainloop (grouped_gemm_gather_sm90.hpp):
// a renamed dispatch policy switches on the kernel's auxiliary load warp, and load_auxiliary() is
// the only new device code.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/dispatch_policy.hpp>

#include <cstdint>

namespace moe::cuda::grouped_gemm {

template <class Policy>
struct PrefetchPolicy : Policy {};

}  // namespace moe::cuda::grouped_gemm

template <class Policy>
struct cutlass::gemm::kernel::detail::HasAuxiliaryLoad<
    moe::cuda::grouped_gemm::PrefetchPolicy<Policy>> : cute::true_type {};

namespace moe::cuda::grouped_gemm {

// The rows an epilogue reads: row r of expert e's tile at (m, n) is rows[(offsets[e] + 128 m + r)
// * ld + cols_per_unit * 256 n ...], cols_per_unit * 256 elements (SwiGLU's pre: 2).
struct PrefetchRows {
  const int32_t* offsets = nullptr;  // (E+1) segment starts
  const void* rows = nullptr;        // (max_rows, ld) 16-bit elements
  int64_t ld = 0;
  int32_t cols_per_unit = 1;
};

// How the warp prefetches: 128-byte lines spread over its lanes, or one cp.async.bulk.prefetch.L2
// a row; the lab's controls: nothing at all (the warp only walks the tiles), or the wait alone.
// kSleep: the wait backs off by __nanosleep between polls.
enum class PrefetchHow { lines, rows, nothing, wait_only };

template <class Base, int kLead, PrefetchHow kHow = PrefetchHow::lines, bool kSleep = false>
struct PrefetchMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using DispatchPolicy = PrefetchPolicy<typename Base::DispatchPolicy>;
  static_assert(kLead > 0, "the prefetch goes out kLead k-slices before the tile's end");

  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kBlockN = cute::size<1>(TileShape{});
  static constexpr uint64_t kMaxWaitNs = 200'000;

  struct Arguments : Base::Arguments {
    PrefetchRows p;
  };

  struct Params : Base::Params {
    PrefetchRows p;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(problem_shapes, args, workspace);
    p.p = args.p;
    return p;
  }

  // Each warp's copy of the collective learns its current expert here (the kernel calls this
  // whenever a warp's next tile belongs to another group).
  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& inputs,
                                                     Params const& params,
                                                     ProblemShape_MNKL problem_shape,
                                                     int32_t next_batch) {
    expert_ = next_batch;
    return Base::tensors_perform_update(inputs, params, problem_shape, next_batch);
  }

  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline,
                                     PipelineState smem_pipe_write, LoadInputs const&,
                                     BlockCoord const& blk_coord, KTileIterator, int k_tile_count,
                                     int /*thread_idx*/, uint32_t /*block_rank_in_cluster*/,
                                     TensorStorage&) {
    if constexpr (kHow == PrefetchHow::nothing) return;
    // The consumers' view of slice max(0, k_tile_count - kLead): the producer's state of it with
    // the phase flipped (the producer waits on the empty barrier of the phase before).
    PipelineState slice = smem_pipe_write;
    slice.advance(static_cast<uint32_t>(k_tile_count > kLead ? k_tile_count - kLead : 0));
    const auto* full = pipeline.producer_get_barrier(slice);
    const uint32_t phase = slice.phase() ^ 1u;
    const uint64_t t0 = global_ns();
    while (!cutlass::arch::ClusterBarrier::try_wait(full, phase) &&
           global_ns() - t0 < kMaxWaitNs) {
      if constexpr (kSleep) __nanosleep(500);
    }
    if constexpr (kHow == PrefetchHow::wait_only) return;

    const auto m_coord = static_cast<int32_t>(cute::get<0>(blk_coord));
    const auto n_coord = static_cast<int32_t>(cute::get<1>(blk_coord));
    const int32_t r0 = params.p.offsets[expert_];
    const int32_t m_e = params.p.offsets[expert_ + 1] - r0;
    const int rows_left = m_e - m_coord * kBlockM;
    const int rows = rows_left < kBlockM ? rows_left : kBlockM;
    const int64_t col0 = int64_t{n_coord} * kBlockN * params.p.cols_per_unit;
    const int64_t tile_width = int64_t{kBlockN} * params.p.cols_per_unit;
    const int64_t width = params.p.ld - col0 < tile_width ? params.p.ld - col0 : tile_width;
    if (rows <= 0 || width <= 0) return;
    const char* base = static_cast<const char*>(params.p.rows) +
                       ((int64_t{r0} + int64_t{m_coord} * kBlockM) * params.p.ld + col0) * 2;
    const int64_t row_bytes = params.p.ld * 2;
    const int lane = cutlass::canonical_lane_idx();
    if constexpr (kHow == PrefetchHow::rows) {
      const uint32_t bytes = static_cast<uint32_t>(width * 2) & ~15u;
      for (int r = lane; r < rows; r += 32)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + r * row_bytes),
                     "r"(bytes)
                     : "memory");
    } else {
      const int lines = static_cast<int>((width * 2 + 127) / 128);
      for (int i = lane; i < rows * lines; i += 32) {
        const int r = i / lines, l = i - r * lines;
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(base + r * row_bytes + 128 * l));
      }
    }
  }

 private:
  CUTLASS_DEVICE static uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }

  int32_t expert_ = 0;
};

}  // namespace moe::cuda::grouped_gemm
