// defines: moe::cuda::grouped_gemm::GatherMainloop
// Grouped-GEMM mainloops with the permute folded into their A loader, so no permuted copy xp is
// ever written. TMA cannot gather rows on sm90 (a descriptor addresses a box, not a list of
// rows), so the producer warps copy A with cp.async, 16 bytes per lane, into the same
// 128B-swizzled smem layout the TMA would have written; B still comes by TMA, multicast over the
// cluster as before. The consumers (wgmma) and the epilogue are CUTLASS's, unchanged, so the
// result is bit-identical to permute + the plain grouped GEMM. Two forms:
//   along M (kAlongK = false), the up-projection: row i of expert e's A tile (K-major) is row
//     gather[offsets[e] + i] of x (T, K);
//   along K (kAlongK = true), the weight gradient dW_e = X_e^T Y_e: A = X_e^T is M-major and its
//     k-th column is row gather[offsets[e] + k] of x (T, P), so each K slice of 64 brings 64 rows
//     of x, 128 columns of each (the tile's M).
//
// Two producer warps copy A, half the rows each: the mainloop warp (which also issues B's TMA) and
// the kernel's auxiliary load warp, otherwise idle. One warp alone was the bottleneck: a tile
// slice of 128 rows x 64 columns is 1024 16-byte copies per stage.
// Completion of a stage: the full barrier counts 65 arrivals -- the leader's arrive-and-expect of
// B's bytes (the TMA completes those) plus one cp.async.mbarrier.arrive.noinc per lane of the two
// warps, each firing when that lane's copies of the stage have landed. A row outside the segment, or whose
// index is outside [0, T) (kPadToken = T marks padding), is filled with zeros (src-size 0).
//
// Derived from CUTLASS's ptr-array TMA collective: everything but load() (and the arguments it
// needs) is inherited, so the kernel, the pipeline and the consumer side are the library's.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/dispatch_policy.hpp>

#include <cstdint>

namespace moe::cuda::grouped_gemm {

template <class Policy>
struct GatherPolicy : Policy {};

}  // namespace moe::cuda::grouped_gemm

template <class Policy>
struct cutlass::gemm::kernel::detail::HasAuxiliaryLoad<
    moe::cuda::grouped_gemm::GatherPolicy<Policy>> : cute::true_type {};

namespace moe::cuda::grouped_gemm {

template <class Base, bool kAlongK = false>
struct GatherMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;
  // The base's policy under another name, so that the kernel also runs its auxiliary producer
  // warp (load_auxiliary): the schedule, and so the kernel, stay the same.
  using DispatchPolicy = GatherPolicy<typename Base::DispatchPolicy>;
  using typename Base::TensorStorage;

  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kBlockK = cute::size<2>(TileShape{});
  static constexpr int kRowsPerLane = kBlockM / 32;  // two producer warps, 16 rows per pass
  static_assert(sizeof(ElementA) == 2 && kBlockK == 64 && kBlockM % 32 == 0,
                "the gathered loader is written for 16-bit A in 64-wide K slices");
  static_assert(kAlongK || cute::is_same_v<typename Base::SmemLayoutAtomA,
                                           cute::GMMA::Layout_K_SW128_Atom<ElementA>>,
                "the row gather writes the 128B-swizzled K-major layout");
  static_assert(!kAlongK ||
                    (kBlockM == 128 && cute::is_same_v<typename Base::SmemLayoutAtomA,
                                                       cute::GMMA::Layout_MN_SW128_Atom<ElementA>>),
                "the K gather writes 128-wide M slices of the 128B-swizzled M-major layout");

  // The pipeline's full barrier: the leader's arrive (with B's transaction bytes) + one per lane
  // of the two producer warps.
  static constexpr int NumProducerThreadEvents = 1 + 64;
  static constexpr uint32_t TmaTransactionBytesB = cutlass::bits_to_bytes(
      cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) *
      static_cast<uint32_t>(cute::sizeof_bits<ElementB>::value));

  struct GatherArgs {
    const int32_t* offsets = nullptr;  // (E+1) segment starts
    const int32_t* gather = nullptr;   // (max_rows) source row of each A row (along K: column)
    const ElementA* rows = nullptr;    // (T, ld) the rows gathered from
    int64_t ld = 0;                    // K (along K: P, the tile's M extent)
    int32_t row_count = 0;             // T: indices outside [0, T) are zero rows
  };

  struct Arguments : Base::Arguments {
    GatherArgs g;
  };

  struct Params : Base::Params {
    GatherArgs g;
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

  // The mainloop producer warp, once per work tile: B's TMA and rows 0, 2, 4, ... of A's.
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
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor sB = make_tensor(make_smem_ptr(storage.smem_B.data()), SmemLayoutB{});  // (N,K,PIPE)
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
    auto issue_b = [&](auto* barrier, int k_tile, int stage) {
      if (cute::elect_one_sync())
        copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, mcast_mask_b),
             tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
    };
    if constexpr (kAlongK)
      produce_along_k</*kWarp=*/0>(params, pipeline, smem_pipe_write, get<2>(load_inputs),
                                   m_coord, k_tile_iter, k_tile_count, storage, issue_b);
    else
      produce</*kWarp=*/0>(params, pipeline, smem_pipe_write, get<2>(load_inputs), m_coord,
                           k_tile_iter, k_tile_count, storage, issue_b);
    // After this tile the kernel may update the TMA descriptors in shared memory (lane 0 writes)
    // that every lane of this warp read in the last descriptor fence; nothing in the loop above
    // is warp-synchronous (each lane copies its own rows), so reconverge first. Without it
    // racecheck reported those reads and writes as unordered (warp-level WAR warnings).
    __syncwarp();
  }

  // The auxiliary producer warp (the kernel runs it because HasAuxiliaryLoad is set for this
  // policy): rows 1, 3, 5, ... of A's tile, on the same pipeline stages.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline,
                                     PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                                     int k_tile_count, int /*thread_idx*/,
                                     uint32_t /*block_rank_in_cluster*/, TensorStorage& storage) {
    auto no_b = [](auto*, int, int) {};
    if constexpr (kAlongK)
      produce_along_k</*kWarp=*/1>(params, pipeline, smem_pipe_write, cute::get<2>(load_inputs),
                                   cute::get<0>(blk_coord), k_tile_iter, k_tile_count, storage,
                                   no_b);
    else
      produce</*kWarp=*/1>(params, pipeline, smem_pipe_write, cute::get<2>(load_inputs),
                           cute::get<0>(blk_coord), k_tile_iter, k_tile_count, storage, no_b);
  }

 private:
  // One producer warp's share of A: lane l copies 16-byte chunks (l % 2) + 2c, c < 4, of rows
  // l / 2 + 16 (2 j + kWarp), j < kRowsPerLane: a lane pair reads whole 32-byte sectors, a warp
  // instruction 16 rows. A lane keeps its rows' indices in registers for the tile (producer warps
  // run with 40 registers).
  template <int kWarp, class MCoord, class KTileIterator, class IssueB>
  CUTLASS_DEVICE void produce(Params const& params, MainloopPipeline& pipeline,
                              PipelineState smem_pipe_write, int32_t expert, MCoord m_coord,
                              KTileIterator k_tile_iter, int k_tile_count,
                              TensorStorage& storage, IssueB&& issue_b) {
    using namespace cute;
    const int lane = cutlass::canonical_lane_idx();
    Tensor sA = make_tensor(make_smem_ptr(storage.smem_A.data()), SmemLayoutA{});  // (M,K,PIPE)

    // This lane's source rows for the tile; -1: a zero row.
    const int32_t r0 = params.g.offsets[expert];
    const int32_t m_e = params.g.offsets[expert + 1] - r0;
    const int row0 = lane / 2 + 16 * kWarp;
    const int32_t m0 = static_cast<int32_t>(m_coord) * kBlockM + row0;
    int32_t src[kRowsPerLane];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kRowsPerLane; ++j) {
      const int32_t m = m0 + 32 * j;
      const int32_t t = m < m_e ? params.g.gather[r0 + m] : -1;
      src[j] = t >= 0 && t < params.g.row_count ? t : -1;
    }

    // Shared-memory byte offsets from the layout itself: row0's 16-byte chunk q sits at
    // chunk_off[c] of the stage (the 128B swizzle permutes a row's chunks), and rows 32 apart are
    // four 1024-byte swizzle atoms apart with the same permutation, so row0 + 32 j adds 4096 j.
    const uint32_t stage0 = cute::cast_smem_ptr_to_uint(&sA(0, 0, 0));
    const uint32_t stage_bytes = cute::cast_smem_ptr_to_uint(&sA(0, 0, 1)) - stage0;
    uint32_t chunk_off[4];
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 4; ++c)
      chunk_off[c] = cute::cast_smem_ptr_to_uint(&sA(row0, 8 * (lane % 2 + 2 * c), 0)) - stage0;

    // Byte arithmetic in 32 bits where it fits: K < 2^30 (checked on the host).
    const int32_t k_total = static_cast<int32_t>(params.g.ld);
    const int64_t row_bytes = int64_t{k_total} * static_cast<int64_t>(sizeof(ElementA));
    const char* rows = reinterpret_cast<const char*>(params.g.rows);
    const int32_t lane_col = 8 * (lane % 2);  // this lane's first column in the K slice

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);  // all lanes wait; the leader expects B's bytes
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k_tile = *k_tile_iter;
      issue_b(barrier, k_tile, stage);

      const int32_t col = k_tile * kBlockK + lane_col;
      const uint32_t s_stage = stage0 + stage * stage_bytes;
      // Chunk c covers columns col + 16 c .. + 7; K is a multiple of 8, so a chunk is wholly in
      // or out. Only a last, partial K slice has chunks out.
      const bool full_slice = (k_tile + 1) * kBlockK <= k_total;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kRowsPerLane; ++j) {
        const bool row_ok = src[j] >= 0;
        const char* g = rows + (row_ok ? src[j] * row_bytes : 0) + col * int32_t{sizeof(ElementA)};
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 4; ++c) {
          const bool ok = row_ok && (full_slice || col + 16 * c < k_total);
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                           s_stage + chunk_off[c] + 4096u * j),
                       "l"(g + 32 * c), "r"(ok ? 16 : 0));
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(reinterpret_cast<uint64_t const*>(barrier));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // Along K: one producer warp's share of a 128 (M) x 64 (K) slice of A = X_e^T. Column k of the
  // slice is 128 contiguous values (256 bytes) of row gather[offsets[e] + k] of x; lane l copies
  // 16-byte chunks (l % 2) + 2c, c < 8, of columns l / 2 + 16 kWarp and that + 32: a lane pair
  // reads whole 32-byte sectors, a warp instruction 16 source rows. The column indices change with
  // every K slice, so each lane loads its two one slice ahead.
  template <int kWarp, class MCoord, class KTileIterator, class IssueB>
  CUTLASS_DEVICE void produce_along_k(Params const& params, MainloopPipeline& pipeline,
                                      PipelineState smem_pipe_write, int32_t expert,
                                      MCoord m_coord, KTileIterator k_tile_iter, int k_tile_count,
                                      TensorStorage& storage, IssueB&& issue_b) {
    using namespace cute;
    const int lane = cutlass::canonical_lane_idx();
    Tensor sA = make_tensor(make_smem_ptr(storage.smem_A.data()), SmemLayoutA{});  // (M,K,PIPE)
    const int32_t r0 = params.g.offsets[expert];
    const int32_t m_e = params.g.offsets[expert + 1] - r0;
    const int k0 = lane / 2 + 16 * kWarp;  // this lane's first column of a slice; the other, + 32

    // Shared-memory byte offsets from the layout itself: chunk c of column k0 (M values
    // 8 (lane % 2 + 2c) .. + 7, contiguous in the M-major swizzle atom), and the step to column
    // k0 + 32 (whole swizzle atoms further, the same permutation, so the same for every chunk).
    const uint32_t stage0 = cute::cast_smem_ptr_to_uint(&sA(0, 0, 0));
    const uint32_t stage_bytes = cute::cast_smem_ptr_to_uint(&sA(0, 0, 1)) - stage0;
    uint32_t chunk_off[8];
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 8; ++c)
      chunk_off[c] = cute::cast_smem_ptr_to_uint(&sA(8 * (lane % 2 + 2 * c), k0, 0)) - stage0;
    const uint32_t half_off = cute::cast_smem_ptr_to_uint(&sA(0, k0 + 32, 0)) -
                              cute::cast_smem_ptr_to_uint(&sA(0, k0, 0));

    // Byte arithmetic in 32 bits where it fits: P < 2^30 (checked on the host).
    const int32_t p_total = static_cast<int32_t>(params.g.ld);
    const int64_t row_bytes = int64_t{p_total} * static_cast<int64_t>(sizeof(ElementA));
    const char* rows = reinterpret_cast<const char*>(params.g.rows);
    const int32_t col0 = static_cast<int32_t>(m_coord) * kBlockM + 8 * (lane % 2);

    // The source rows of slice k_tile: loaded one slice ahead, so that an index load's latency
    // runs under the previous slice's wait and copies instead of in front of its own copies.
    auto sources = [&](int k_tile, int32_t (&src)[2]) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int32_t k = k_tile * kBlockK + k0 + 32 * h;
        src[h] = k < m_e ? params.g.gather[r0 + k] : -1;
      }
    };
    int32_t next[2];
    sources(*k_tile_iter, next);

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      const int k_tile = *k_tile_iter;
      int32_t src[2];
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h)
        src[h] = next[h] >= 0 && next[h] < params.g.row_count ? next[h] : -1;
      if (k_tile_count > 1) sources(k_tile + 1, next);
      pipeline.producer_acquire(smem_pipe_write);  // all lanes wait; the leader expects B's bytes
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      issue_b(barrier, k_tile, stage);

      const uint32_t s_stage = stage0 + stage * stage_bytes;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const bool row_ok = src[h] >= 0;
        const char* g = rows + (row_ok ? src[h] * row_bytes : 0) + col0 * int32_t{sizeof(ElementA)};
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 8; ++c) {
          // P is a multiple of 8: a chunk is wholly in or out; only a last, partial M tile has
          // chunks out.
          const bool ok = row_ok && col0 + 16 * c < p_total;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                           s_stage + chunk_off[c] + half_off * h),
                       "l"(g + 32 * c), "r"(ok ? 16 : 0));
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(reinterpret_cast<uint64_t const*>(barrier));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace moe::cuda::grouped_gemm
