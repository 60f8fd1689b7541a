// defines: moe::cuda::grouped_gemm::PrefetchMainloop
// A lab option for the da GEMM of the fused activation backward (EpilogueActGrad): the producer
// warp also brings the tile's stored pre into L2 shortly before the epilogue needs it, so that the
// epilogue's pre loads, which run after the mainloop, would wait on L2 rather than on HBM. The
// library does not use it: with one bulk prefetch per row the da GEMM got 3-4 % slower (lab run
// 11): sm90's bulk prefetch takes uniform operands, so 128 row addresses go out one lane at a
// time and hold up the producer's TMA issue. This version prefetches 128-byte lines instead, 32
// per lane and tile, to tell whether the prefetch itself can pay.
//
// When: the prefetch is issued once the producer has queued all but the last kLateKTiles k-tiles
// of the tile, i.e. a pipeline's depth plus kLateKTiles k-tiles (several microseconds at the MoE
// shapes) before the epilogue. Earlier, the tile's A stream (hundreds of MB per millisecond through
// a 50 MB L2) would evict the lines before use; later, they would not have arrived.
// How: prefetch.global.L2 of every 128-byte line of the tile's pre (a row's are contiguous: 1 KB
// for SwiGLU's 256 units), lane l taking lines l, l + 32, ... of the tile in row order; rows past
// the segment are skipped. A prefetch is a hint: it changes no result.
//
// Derived from CUTLASS's ptr-array TMA collective: load() runs the base's load twice, split at the
// prefetch point, and everything else is inherited.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include <cstdint>

namespace moe::cuda::grouped_gemm {

template <class Base, int kLateKTiles = 4>
struct PrefetchMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  static constexpr int kBlockM = cute::size<0>(TileShape{});

  struct PrefetchArgs {
    const int32_t* offsets = nullptr;  // (E+1) segment starts
    const char* rows = nullptr;        // (max_rows, row_bytes) the tensor the epilogue reads
    int64_t row_bytes = 0;             // a multiple of 16
    int64_t tile_bytes = 0;            // bytes of a row per N tile, a multiple of 16
  };

  struct Arguments : Base::Arguments {
    PrefetchArgs p;
  };

  struct Params : Base::Params {
    PrefetchArgs p;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    Params params;
    static_cast<typename Base::Params&>(params) =
        Base::to_underlying_arguments(problem_shapes, args, workspace);
    params.p = args.p;
    return params;
  }

  // The mainloop producer warp (all 32 lanes), once per work tile.
  template <class LoadInputs, class TensorMaps, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                           TensorMaps const& input_tensormaps, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& storage) {
    const int early = k_tile_count > kLateKTiles ? k_tile_count - kLateKTiles : 0;
    Base::load(params, pipeline, smem_pipe_write, load_inputs, input_tensormaps, blk_coord,
               k_tile_iter, early, thread_idx, block_rank_in_cluster, storage);
    prefetch(params.p, blk_coord);
    for (int i = 0; i < early; ++i) ++k_tile_iter;
    smem_pipe_write.advance(early);
    Base::load(params, pipeline, smem_pipe_write, load_inputs, input_tensormaps, blk_coord,
               k_tile_iter, k_tile_count - early, thread_idx, block_rank_in_cluster, storage);
  }

 private:
  template <class BlockCoord>
  CUTLASS_DEVICE static void prefetch(PrefetchArgs const& p, BlockCoord const& blk_coord) {
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    const int32_t r0 = p.offsets[l_coord];
    const int32_t m_e = p.offsets[l_coord + 1] - r0;
    const int64_t col = int64_t{n_coord} * p.tile_bytes;
    const int64_t left = p.row_bytes - col;
    const uint32_t bytes = static_cast<uint32_t>(left < p.tile_bytes ? left : p.tile_bytes);
    const int lane = cutlass::canonical_lane_idx();
    const int lines = static_cast<int>((bytes + 127) / 128);  // per row
    const int32_t m0 = static_cast<int32_t>(m_coord) * kBlockM;
    const int rows = m_e - m0 < kBlockM ? m_e - m0 : kBlockM;
    for (int i = lane; i < rows * lines; i += 32) {
      const int row = i / lines, line = i - row * lines;
      const char* src = p.rows + (int64_t{r0} + m0 + row) * p.row_bytes + col + 128 * line;
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(src) : "memory");
    }
  }
};

}  // namespace moe::cuda::grouped_gemm
