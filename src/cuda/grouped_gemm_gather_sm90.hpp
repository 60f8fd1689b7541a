// defines: moe::cuda::grouped_gemm::GatherMainloop
// The up-projection's mainloop with the permute folded into its loader: row i of expert e's A tile
// is row gather[offsets[e] + i] of x (T, K), fetched by index, so no permuted copy xp is ever
// written. TMA cannot gather rows on sm90 (a descriptor addresses a box, not a list of rows), so
// the producer warp copies A with cp.async, 16 bytes per lane, into the same 128B-swizzled smem
// layout the TMA would have written; B (the expert's weights) still comes by TMA, multicast over
// the cluster as before. The consumers (wgmma) and the epilogue are CUTLASS's, unchanged, so the
// result is bit-identical to permute + the plain grouped GEMM.
//
// Completion of a stage: the full barrier counts 33 arrivals -- the leader's arrive-and-expect of
// B's bytes (the TMA completes those) plus one cp.async.mbarrier.arrive.noinc per lane, each
// firing when that lane's copies of the stage have landed. A row outside the segment, or whose
// index is outside [0, T) (kPadToken = T marks padding), is filled with zeros (src-size 0).
//
// Derived from CUTLASS's ptr-array TMA collective: everything but load() (and the arguments it
// needs) is inherited, so the kernel, the pipeline and the consumer side are the library's.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>

#include <cstdint>

namespace moe::cuda::grouped_gemm {

template <class Base>
struct GatherMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  using typename Base::DispatchPolicy;

  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kBlockK = cute::size<2>(TileShape{});
  static constexpr int kChunk = 16 / sizeof(ElementA);   // elements per 16-byte copy
  static constexpr int kChunksPerRow = kBlockK / kChunk;  // 8 for bK = 64 bf16
  static constexpr int kRowsPerPass = 32 / kChunksPerRow; // rows one warp instruction covers
  static_assert(sizeof(ElementA) == 2 && kBlockK % kChunk == 0 && 32 % kChunksPerRow == 0 &&
                    kBlockM % kRowsPerPass == 0,
                "the gathered loader is written for 16-bit A and bK a multiple of 8");

  // The pipeline's full barrier: the leader's arrive (with B's transaction bytes) + 32 lanes.
  static constexpr int NumProducerThreadEvents = 1 + 32;
  static constexpr uint32_t TmaTransactionBytesB = cutlass::bits_to_bytes(
      cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) *
      static_cast<uint32_t>(cute::sizeof_bits<ElementB>::value));

  struct GatherArgs {
    const int32_t* offsets = nullptr;  // (E+1) segment starts
    const int32_t* gather = nullptr;   // (max_rows) source row of each A row
    const ElementA* rows = nullptr;    // (T, K) the rows gathered from
    int64_t ld = 0;                    // K
    int32_t row_count = 0;             // T: indices outside [0, T) are zero rows
  };

  struct Arguments : Base::Arguments {
    GatherArgs g;
  };

  struct Params : Base::Params {
    GatherArgs g;
  };

  // The A tile's source rows, written by the producer warp at the start of each tile.
  struct TensorStorage : Base::TensorStorage {
    alignas(16) int32_t a_rows[kBlockM];
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(problem_shapes, args, workspace);
    p.tma_transaction_bytes = TmaTransactionBytesB;  // A's bytes arrive by cp.async
    p.g = args.g;
    return p;
  }

  // The base's (gA, gB) plus the current expert, which load() needs to find its rows.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    auto ab = Base::load_init(problem_shape_MNKL, params);
    return cute::make_tuple(cute::get<0>(ab), cute::get<1>(ab), int32_t{0});
  }

  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& inputs, Params const&,
                                                     ProblemShape_MNKL, int32_t next_batch) {
    InputTensors next = inputs;
    cute::get<2>(next) = next_batch;
    return next;
  }

  // Called by the whole producer warp, once per work tile.
  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, int32_t> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int /*thread_idx*/, uint32_t block_rank_in_cluster,
                           TensorStorage& storage) {
    using namespace cute;
    const int lane = cutlass::canonical_lane_idx();
    Tensor sA = make_tensor(make_smem_ptr(storage.smem_A.data()), SmemLayoutA{});  // (M,K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(storage.smem_B.data()), SmemLayoutB{});  // (N,K,PIPE)

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;

    // This tile's source rows (-1: a zero row).
    const int32_t expert = get<2>(load_inputs);
    const int32_t r0 = params.g.offsets[expert];
    const int32_t m_e = params.g.offsets[expert + 1] - r0;
    const int32_t m0 = static_cast<int32_t>(m_coord) * kBlockM;
    for (int i = lane; i < kBlockM; i += 32) {
      int32_t src = -1;
      if (m0 + i < m_e) {
        src = params.g.gather[r0 + m0 + i];
        if (src < 0 || src >= params.g.row_count) src = -1;
      }
      storage.a_rows[i] = src;
    }
    __syncwarp();

    // B: the base collective's TMA, from the elected lane.
    constexpr uint32_t cluster_x = get<0>(typename DispatchPolicy::ClusterShape());
    const uint2 cluster_id = {block_rank_in_cluster % cluster_x,
                              block_rank_in_cluster / cluster_x};
    Tensor gB = get<1>(load_inputs)(_, _, n_coord, _, l_coord);  // (BLK_N,BLK_K,k)
    auto block_tma_b = params.tma_load_b.get_slice(cluster_id.x);
    Tensor tBgB = block_tma_b.partition_S(gB);
    Tensor tBsB = block_tma_b.partition_D(sB);
    uint16_t mcast_mask_b = 0;
    {
      auto block_layout = cute::Layout<typename DispatchPolicy::ClusterShape>{};  // (m,n) -> block
      for (int m = 0; m < size<0>(block_layout); ++m)
        mcast_mask_b |= uint16_t(1) << block_layout(m, cluster_id.y, Int<0>{});
    }

    // A: lane l copies 16-byte chunk (l % 8) of rows l / 8, l / 8 + 4, ...: each warp
    // instruction reads four whole 128-byte row slices.
    const int chunk = lane % kChunksPerRow;
    const int row_in_pass = lane / kChunksPerRow;
    const int64_t k_total = params.g.ld;
    const ElementA* rows = params.g.rows;

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);  // all lanes wait; the leader expects B's bytes
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k_tile = *k_tile_iter;

      if (cute::elect_one_sync())
        copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, mcast_mask_b),
             tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));

      const int64_t k = int64_t{k_tile} * kBlockK + chunk * kChunk;
      const bool k_ok = k < k_total;  // K is a multiple of 8: a chunk is all in or all out
      CUTLASS_PRAGMA_UNROLL
      for (int pass = 0; pass < kBlockM / kRowsPerPass; ++pass) {
        const int r = pass * kRowsPerPass + row_in_pass;
        const int32_t src = storage.a_rows[r];
        const bool ok = k_ok && src >= 0;
        const ElementA* g = rows + (ok ? int64_t{src} * k_total + k : 0);
        const uint32_t s = cute::cast_smem_ptr_to_uint(&sA(r, chunk * kChunk, stage));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g),
                     "r"(ok ? 16 : 0));
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(reinterpret_cast<uint64_t const*>(barrier));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
    __syncwarp();  // every lane has read a_rows before the next tile rewrites it
  }
};

}  // namespace moe::cuda::grouped_gemm
