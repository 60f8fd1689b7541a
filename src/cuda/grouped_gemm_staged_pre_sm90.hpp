// defines: moe::cuda::grouped_gemm::{StagedPreArgs, StagedPreMainloop}
// The da GEMM's mainloop with the previous tile's pre brought into shared memory by its producer,
// for the activation backward deferred under the next tile's mainloop (StagedActGrad,
// grouped_gemm_deferred_act_grad_sm90.hpp).
//
// Why: the deferred epilogue's consumers loading pre from global memory inside the mainloop were
// slower than the immediate epilogue whatever the distance ahead (experts_lab runs 20 and 23), and
// Nsight Compute showed both the consumers waiting on those loads and the operand TMA waiting on
// DRAM (run 24). Here the loads are TMA too, issued by the producer with the operands, and the
// consumers only read shared memory.
//
// How: the tile's pre is 8 boxes of 128 rows x 64 columns (a 32-unit run of (gate, up) pairs, 16
// KiB). Box b of the previous tile rides in the stage of the current tile's k-slice b (b < 8): the
// stage's full barrier expects its 16 KiB too, the consumers' wait for the slice covers it, and
// the stage is released after block b. Each stage has a 16 KiB box slot; with 48 KiB of operands
// a stage, 3 stages fit where the plain mainloop has 4.
//
// Derived from CUTLASS's ptr-array TMA collective: the operand loads are its load()'s, with the
// box added; the consumer side is DeferredMainloop's.
#pragma once
#include <cuda.h>

#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/cuda_host_adapter.hpp>
#include <cutlass/cutlass.h>

namespace moe::cuda::grouped_gemm {

struct StagedPreArgs {
  const int32_t* offsets = nullptr;  // (E+1) segment starts
  const void* pre = nullptr;         // (rows, ld) bf16, pairs blocked
  int64_t ld = 0;                    // 2N
  int64_t rows = 0;                  // pre's rows (max_rows): the box reads none past them
};

template <class Base>
struct StagedPreMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TileShape;

  static constexpr int kStages = Base::DispatchPolicy::Stages;
  static constexpr int kBoxes = 8;         // per tile: one per 32-unit run
  static constexpr int kBoxRows = cute::size<0>(TileShape{});
  static constexpr int kBoxColumns = 64;   // a run's (gate, up) pairs: 128 bytes a row
  static constexpr int kBoxBytes = kBoxRows * kBoxColumns * 2;
  static_assert(kBoxRows == 128 && cute::size<1>(TileShape{}) == 32 * kBoxes,
                "a 128x256 tile: 8 runs of 32 units");

  struct TensorStorage : Base::TensorStorage {
    alignas(1024) cute::array_aligned<uint8_t, kStages * kBoxBytes, 1024> smem_pre;
  };
  static constexpr int kSlotBytes = kStages * kBoxBytes;  // the shared memory the boxes take

  struct Arguments : Base::Arguments {
    StagedPreArgs s;
  };

  struct Params : Base::Params {
    cute::TmaDescriptor pre_map;  // pre as (ld, rows), boxes 64 x 128, 128B swizzle
    const int32_t* offsets = nullptr;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(problem_shapes, args, workspace);
    p.offsets = args.s.offsets;
    p.pre_map = {};
    if (args.s.pre != nullptr) {  // null: a workspace-size query
      const cuuint64_t dims[2] = {static_cast<cuuint64_t>(args.s.ld),
                                  static_cast<cuuint64_t>(args.s.rows)};
      const cuuint64_t strides[1] = {static_cast<cuuint64_t>(args.s.ld) * 2};
      const cuuint32_t box[2] = {kBoxColumns, kBoxRows};
      const cuuint32_t steps[2] = {1, 1};
      const CUresult r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
          &p.pre_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(args.s.pre), dims,
          strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      if (r != CUDA_SUCCESS) p.offsets = nullptr;  // can_implement's checks make this unreachable
    }
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
    return Base::can_implement(problem_shapes, args) && args.s.offsets != nullptr &&
           args.s.pre != nullptr && args.s.ld % kBoxColumns == 0 && args.s.rows > 0 &&
           args.s.rows < (int64_t{1} << 31) && args.s.ld < (int64_t{1} << 31) &&
           reinterpret_cast<uintptr_t>(args.s.pre) % 16 == 0;
  }

  // Box b's slot in stage `stage`, as a shared-memory address.
  CUTLASS_DEVICE static uint32_t pre_slot(TensorStorage& storage, int stage) {
    return cute::cast_smem_ptr_to_uint(storage.smem_pre.data()) + stage * kBoxBytes;
  }

  // The base's (gA, gB) plus the current expert, which load() needs to find the tile's rows.
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

  // The mainloop producer warp, once per work tile: the base's A and B, and the previous tile's
  // pre boxes with the first 8 slices.
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
    static_assert(size(typename Base::DispatchPolicy::ClusterShape{}) == 1,
                  "no multicast: the boxes are the CTA's own");
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    const int32_t expert = get<2>(load_inputs);
    if (cute::elect_one_sync()) {
      Tensor sA = make_tensor(make_smem_ptr(storage.smem_A.data()), SmemLayoutA{});  // (M,K,PIPE)
      Tensor sB = make_tensor(make_smem_ptr(storage.smem_B.data()), SmemLayoutB{});  // (N,K,PIPE)
      auto block_tma_a = params.tma_load_a.get_slice(0);
      auto block_tma_b = params.tma_load_b.get_slice(0);
      Tensor tAgA = block_tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));
      Tensor tAsA = block_tma_a.partition_D(sA);
      Tensor tBgB = block_tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
      Tensor tBsB = block_tma_b.partition_D(sB);
      // The consumers undo the swizzle from the box row alone: the slots start 1024-aligned.
      if (pre_slot(storage, 0) % 1024 != 0) __trap();

      CUTLASS_PRAGMA_NO_UNROLL
      for (int slice = 0; slice < k_tile_count; ++slice) {
        pipeline.producer_acquire(smem_pipe_write);  // expects the operands' bytes
        using BarrierType = typename MainloopPipeline::ProducerBarrierType;
        BarrierType* barrier = pipeline.producer_get_barrier(smem_pipe_write);
        const int stage = smem_pipe_write.index();
        if (prev_row_ >= 0 && slice < kBoxes) {
          // Before any copy of the stage lands, so the barrier cannot complete without the box.
          pipeline.producer_expect_transaction(smem_pipe_write, kBoxBytes);
          SM90_TMA_LOAD_2D::copy(&params.pre_map, reinterpret_cast<uint64_t*>(barrier),
                                 static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST),
                                 storage.smem_pre.data() + stage * kBoxBytes,
                                 prev_column_ + slice * kBoxColumns, prev_row_);
        }
        copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, 0),
             tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, 0),
             tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, stage));
        ++k_tile_iter;
        ++smem_pipe_write;
      }
    }
    // This tile's box origin, for the next tile's slices.
    prev_row_ = params.offsets[expert] + static_cast<int32_t>(m_coord) * kBoxRows;
    prev_column_ = static_cast<int32_t>(n_coord) * kBoxes * kBoxColumns;
  }

 private:
  int32_t prev_row_ = -1;  // the previous tile's first pre row; -1: none yet
  int32_t prev_column_ = 0;
};

}  // namespace moe::cuda::grouped_gemm
