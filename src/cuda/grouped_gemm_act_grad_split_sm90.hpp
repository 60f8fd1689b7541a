// defines: moe::cuda::grouped_gemm::{ActGradSplitKernel, ActGradSplit}
// The backward's da GEMM with the activation backward done by a warpgroup of its own, so that a
// tile's activation backward runs while the consumers compute the next tile's mainloop.
//
// In the library's kernel (CUTLASS's cooperative ptr-array kernel with EpilogueActivationGrad)
// the two consumer warpgroups stop after every tile's mainloop to read the tile's stored pre
// (128 KiB), form dpre and the row dots and store dpre (128 KiB): about a third of the da step at
// OLMoE, with the tensor cores idle (experts lab, Versions 6-21). Here the producer warpgroup's two
// idle warps do that work. The consumers round the tile's da to bf16 (as the library's epilogue
// does before using it), write it to a 64 KiB hand-over buffer in shared memory and go on; the
// epilogue warps take it from there, so dpre is the library's bit for bit. The buffer costs the
// mainloop a stage (3 of 48 KiB instead of 4), and the producer warpgroup keeps 88 registers a
// thread (setmaxnreg; the consumers get 208). A fourth warpgroup would not compile: 512 threads
// leave 128 registers a thread at launch, and ptxas will not place the 64x256 wgmma's 128
// accumulators in that even after setmaxnreg.
//
// Warp roles: warpgroup 0 warp 0 issues the operands' TMA loads, warp 3 runs the grouped tile
// scheduler (both as in CUTLASS's kernel), warps 1 and 2 the activation backward; warpgroups 1-2
// the wgmma mainloop. Every role walks the same tiles through the scheduler's pipeline.
// The hand-over: a full barrier (256 consumer arrivals) and an empty one (64 epilogue arrivals),
// tile t waiting on parity t & 1 (full) and (t & 1) ^ 1 (empty: the first wait passes).
//
// The buffer holds, for each tile row, 32 chunks of 16 bytes; chunk k = 4c + q carries the eight
// da values the epilogue's lane (c, q) needs for pre pairs 8q .. 8q + 7 of 32-unit block c
// (blocked gate/up order; the same pairing as EpilogueActivationGrad), in pair order. Chunk k of
// row r sits at position k ^ 4 (r % 8), so that the consumers' stores (8 rows x 4 quad lanes a
// quarter-warp) and the epilogue's loads (one row a warp) meet no bank conflicts.
//
// Blocked SwiGLU only (the layer's form). The row dots are summed per row over the warp's lanes
// (a fixed order, but not the library's): equal to the library's to rounding, not bit for bit.
// Lab-only until measured (experts_lab --ab-act-grad-split).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/pipeline/pipeline.hpp>

#include <cstdint>

#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

inline constexpr int kSplitHandoverBytes = 128 * 256 * 2;
inline constexpr int kSplitStagedRows = 8;  // pre rows in flight per epilogue warp
inline constexpr int kSplitStagingBytes = 2 * kSplitStagedRows * 1024;

template <class Base>
struct ActGradSplitKernel : Base {
  using typename Base::ClusterShape;
  using typename Base::CollectiveMainloop;
  using typename Base::Params;
  using typename Base::TiledMma;
  using typename Base::TileScheduler;
  using typename Base::TileShape;
  using TileSchedulerPipeline = typename TileScheduler::Pipeline;
  using MainloopPipeline = typename CollectiveMainloop::MainloopPipeline;
  using MainloopState = typename CollectiveMainloop::PipelineState;
  using SchedulerState = typename TileSchedulerPipeline::PipelineState;
  using Barrier = cutlass::arch::ClusterBarrier;

  static constexpr int kTileM = cute::size<0>(TileShape{});
  static constexpr int kTileN = cute::size<1>(TileShape{});
  static_assert(kTileM == 128 && kTileN == 256 && cute::size(ClusterShape{}) == 1 &&
                    cute::size(TiledMma{}) == 256,
                "written for the cooperative 128x256 tile on a 1x1 cluster");
  static constexpr uint32_t MaxThreadsPerBlock = 384;
  static constexpr uint32_t MinBlocksPerMultiprocessor = 1;
  // setmaxnreg moves registers within the CTA: what the consumers gain above the launch's 168
  // (65536 / 384, to a multiple of 8) must be what the producer warpgroup gives up, or their
  // setmaxnreg.inc waits forever.
  static constexpr uint32_t kLaunchRegs = 168, kLoadRegs = 88, kMmaRegs = 208;
  static_assert(256 * (kMmaRegs - kLaunchRegs) <= 128 * (kLaunchRegs - kLoadRegs),
                "the consumers' registers come from the producer warpgroup's");
  static constexpr int kEpilogueWarps = 2;
  static constexpr int kSchedulerStages = 8;  // CUTLASS's grouped kernel's

  struct SharedStorage {
    struct TensorStorage : cute::aligned_struct<128, cute::_1> {
      typename CollectiveMainloop::TensorStorage mainloop;
    } tensors;
    alignas(128) uint4 handover[kSplitHandoverBytes / 16];
    // Each epilogue warp's ring of kStagedRows pre rows (1 KiB each), filled by cp.async.
    alignas(128) uint4 staged[kSplitStagingBytes / 16];
    struct PipelineStorage : cute::aligned_struct<16, cute::_1> {
      alignas(16) typename TileScheduler::PipelineStorage scheduler;
      alignas(16) typename CollectiveMainloop::PipelineStorage mainloop;
      alignas(8) uint64_t full;
      alignas(8) uint64_t empty;
    } pipelines;
    alignas(16) typename Base::TileSchedulerResponse scheduler_response[kSchedulerStages];
    struct TensorMapStorage : cute::aligned_struct<128, cute::_1> {
      alignas(128) typename CollectiveMainloop::TensorMapStorage mainloop;
    } tensormaps;
  };
  static constexpr int SharedStorageSize = sizeof(SharedStorage);
  static_assert(SharedStorageSize <= 232448, "shared memory: 3 stages + the hand-over buffer");

  static dim3 get_block_shape() { return dim3(MaxThreadsPerBlock, 1, 1); }

  CUTLASS_DEVICE void operator()(Params const& params, char* smem_buf) {
    using namespace cute;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_buf);
    const int warp_group = cutlass::canonical_warp_group_idx();
    const int warp_in_group = cutlass::canonical_warp_idx_sync() % 4;
    const int lane = cutlass::canonical_lane_idx();

    TileScheduler scheduler{params.scheduler, ss.scheduler_response};
    CollectiveMainloop collective_mainloop;

    typename TileSchedulerPipeline::Params sp;
    sp.role = warp_group == 0 && warp_in_group == 3
                  ? TileSchedulerPipeline::ThreadCategory::Producer
                  : TileSchedulerPipeline::ThreadCategory::Consumer;
    sp.consumer_arv_count = 256 + 32 + 32 * kEpilogueWarps;  // consumers, loads, epilogue
    sp.producer_arv_count = 1;
    TileSchedulerPipeline scheduler_pipeline(ss.pipelines.scheduler, sp);

    typename MainloopPipeline::Params mp;
    if (warp_group == 0 && warp_in_group == 0)
      mp.role = MainloopPipeline::ThreadCategory::Producer;
    if (warp_group == 1 || warp_group == 2) mp.role = MainloopPipeline::ThreadCategory::Consumer;
    mp.is_leader = threadIdx.x == 0;
    mp.num_consumers = 256;
    mp.num_producers = CollectiveMainloop::NumProducerThreadEvents;
    mp.transaction_bytes = params.mainloop.tma_transaction_bytes;
    MainloopPipeline mainloop_pipeline(ss.pipelines.mainloop, mp, ClusterShape{});

    if (threadIdx.x == 0) {
      Barrier::init(&ss.pipelines.full, 256);
      Barrier::init(&ss.pipelines.empty, 32 * kEpilogueWarps);
    }
    cutlass::arch::fence_barrier_init();
    __syncthreads();

    auto work = scheduler.initial_work_tile_info(ClusterShape{});
    if (!work.is_valid()) return;  // more CTAs than tiles
    auto problem_shape = append<4>(params.problem_shape.get_problem_shape(work.L_idx), 1);
    auto load_inputs = collective_mainloop.load_init(problem_shape, params.mainloop);
    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);
    const auto blk_shape = TileShape{};
    SchedulerState sched_state;  // the consumers' side of the scheduler's pipeline
    auto next_tile = [&] {
      auto [next, advance] = scheduler.fetch_next_work(work, scheduler_pipeline, sched_state);
      work = next;
      if (advance) ++sched_state;
    };

    if (warp_group == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kLoadRegs>();
      if (warp_in_group == 3) {
        SchedulerState produced = cutlass::make_producer_start_state<TileSchedulerPipeline>();
        do {
          auto [next, advance] = scheduler.advance_to_next_work(scheduler_pipeline, produced);
          work = next;
          if (advance) ++produced;
        } while (work.is_valid());
        scheduler_pipeline.producer_tail(produced);
      } else if (warp_in_group == 0) {
        load_operands(params, collective_mainloop, mainloop_pipeline, ss, load_inputs, gA_mkl,
                      gB_nkl, problem_shape, work, next_tile, lane);
      } else {
        // pre does not depend on the consumers: each tile's first rows are requested before its
        // da is waited for, and the ring runs on across the tile's rows.
        const int warp = warp_in_group - 1;
        uint32_t tile = 0;
        do {
          const auto shape = params.problem_shape.get_problem_shape(work.L_idx);  // (m, N, K)
          const EpilogueRows at = epilogue_rows(params.epilogue, work, get<0>(shape),
                                                get<1>(shape), warp, lane);
          for (int i = 0; i < kSplitStagedRows; ++i) stage_row(ss, params.epilogue, at, i, warp, lane);
          Barrier::wait(&ss.pipelines.full, tile & 1);
          activation_backward(params.epilogue, ss, work, at, warp, lane);
          Barrier::arrive(&ss.pipelines.empty);
          ++tile;
          next_tile();
        } while (work.is_valid());
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<kMmaRegs>();
      const int mma_thread = threadIdx.x % 256;
      TiledMma tiled_mma;
      MainloopState consumed;
      uint32_t tile = 0;
      do {
        problem_shape = append<4>(params.problem_shape.get_problem_shape(work.L_idx), 1);
        const auto k_tiles = TileScheduler::get_work_k_tile_count(work, problem_shape, blk_shape);
        auto accumulators = partition_fragment_C(tiled_mma, take<0, 2>(blk_shape));
        collective_mainloop.mma(mainloop_pipeline, consumed, accumulators, k_tiles, mma_thread,
                                ss.tensors.mainloop, params.mainloop);
        collective_mainloop.mma_tail(mainloop_pipeline, consumed, k_tiles);
        consumed.advance(k_tiles);
        Barrier::wait(&ss.pipelines.empty, (tile & 1) ^ 1);
        hand_over(ss, accumulators, tiled_mma, mma_thread);
        Barrier::arrive(&ss.pipelines.full);
        ++tile;
        next_tile();
      } while (work.is_valid());
    }
#endif
  }

 private:
  // The operands' producer: CUTLASS's collective, its tensor maps updated per group.
  template <class LoadInputs, class TA, class TB, class Shape, class Work, class Next>
  CUTLASS_DEVICE static void load_operands(Params const& params, CollectiveMainloop& mainloop,
                                           MainloopPipeline& pipeline, SharedStorage& ss,
                                           LoadInputs& load_inputs, TA const& gA_mkl,
                                           TB const& gB_nkl, Shape problem_shape, Work& work,
                                           Next&& next_tile, int lane) {
    using namespace cute;
    const int32_t sm_idx = blockIdx.x + blockIdx.y * gridDim.x;
    const int32_t sm_count = params.hw_info.sm_count;
    int32_t batch = work.L_idx;
    auto maps = mainloop.tensormaps_init(params.mainloop, ss.tensormaps.mainloop, sm_count, sm_idx);
    mainloop.tensormaps_perform_update(ss.tensormaps.mainloop, params.mainloop, maps,
                                       problem_shape, batch);
    __syncwarp();
    mainloop.tensormaps_cp_fence_release(ss.tensormaps.mainloop, maps);
    MainloopState produced = cutlass::make_producer_start_state<MainloopPipeline>();
    bool batch_changed = true;
    do {
      const auto m = idx2crd(work.M_idx, shape<2>(gA_mkl));
      const auto n = idx2crd(work.N_idx, shape<2>(gB_nkl));
      const auto k_tiles = TileScheduler::get_work_k_tile_count(work, problem_shape, TileShape{});
      const auto k_start = TileScheduler::get_work_k_tile_start(work);
      auto k_iter = make_coord_iterator(idx2crd(k_start, shape<3>(gA_mkl)), shape<3>(gA_mkl));
      if (batch_changed) {
        load_inputs =
            mainloop.tensors_perform_update(load_inputs, params.mainloop, problem_shape, batch);
        mainloop.tensormaps_fence_acquire(maps);
      }
      mainloop.load(params.mainloop, pipeline, produced, load_inputs, maps,
                    make_coord(m, n, _, 0), k_iter, k_tiles, lane, 0u, ss.tensors.mainloop);
      produced.advance(k_tiles);
      next_tile();
      batch_changed = work.L_idx != batch;
      if (work.is_valid() && batch_changed) {
        batch = work.L_idx;
        problem_shape = append<4>(params.problem_shape.get_problem_shape(batch), 1);
        mainloop.tensormaps_perform_update(ss.tensormaps.mainloop, params.mainloop, maps,
                                           problem_shape, batch);
        __syncwarp();
        mainloop.tensormaps_cp_fence_release(ss.tensormaps.mainloop, maps);
      }
    } while (work.is_valid());
    mainloop.load_tail(pipeline, produced);
  }

  CUTLASS_DEVICE static uint32_t bf16_pair(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }

  // A consumer thread's da (value 2 v1 + 4 j + v0 is row half v1's unit 8 j + 2q + v0, as
  // RegisterEpilogue documents) into the buffer: per row half and block c, the chunk of lane q.
  template <class Accumulators>
  CUTLASS_DEVICE static void hand_over(SharedStorage& ss, Accumulators const& acc,
                                       TiledMma const& tiled_mma, int mma_thread) {
    using namespace cute;
    Tensor cD = make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileN>{}));
    Tensor tCcD = tiled_mma.get_thread_slice(mma_thread).partition_C(cD);
    const int q = mma_thread & 3;
    CUTLASS_PRAGMA_UNROLL
    for (int v1 = 0; v1 < 2; ++v1) {
      const int r = get<0>(tCcD(2 * v1));
      uint4* row = ss.handover + r * 32;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 8; ++c) {
        // pair s = a + 4 b of the chunk is unit 32 c + 8 a + 2q + b: value 2 v1 + 16 c + 4 a + b
        const int v = 2 * v1 + 16 * c;
        const uint4 chunk = make_uint4(bf16_pair(acc(v + 0), acc(v + 4)),
                                       bf16_pair(acc(v + 8), acc(v + 12)),
                                       bf16_pair(acc(v + 1), acc(v + 5)),
                                       bf16_pair(acc(v + 9), acc(v + 13)));
        row[(4 * c + q) ^ (4 * (r & 7))] = chunk;
      }
    }
  }

  // The epilogue warps: warp w takes tile rows 64 w .. 64 w + 63, lane (c, q) = (lane / 4,
  // lane % 4) pre pairs 8q .. 8q + 7 of block c (32 bytes a row, loaded and read by the lane
  // itself, so cp.async.wait_group alone orders them).
  static constexpr int kWarpRows = kTileM / kEpilogueWarps;
  struct EpilogueRows {
    int64_t row0, ld;  // the warp's first row in pre's rows, pre's row length
    int64_t col;       // the lane's first element of a row: 2 (its first pair)
    int valid;         // rows of the warp's 64 inside the segment
    bool col_ok;
  };
  template <class Work>
  CUTLASS_DEVICE static EpilogueRows epilogue_rows(ActGradEpilogueArguments const& ep,
                                                   Work const& work, int rows, int cols,
                                                   int warp, int lane) {
    const int pair = work.N_idx * kTileN + 32 * (lane / 4) + 8 * (lane % 4);
    const int first = work.M_idx * kTileM + kWarpRows * warp;
    EpilogueRows at;
    at.row0 = int64_t{ep.offsets[work.L_idx]} + first;
    at.ld = ep.ld_pre;
    at.col = 2 * int64_t{pair};
    at.valid = rows - first < 0 ? 0 : (rows - first < kWarpRows ? rows - first : kWarpRows);
    at.col_ok = pair < cols;
    return at;
  }
  CUTLASS_DEVICE static uint32_t staged_slot(SharedStorage& ss, int i, int warp, int lane) {
    const uint4* slot = ss.staged + (warp * kSplitStagedRows + i % kSplitStagedRows) * 64 + 2 * lane;
    return cute::cast_smem_ptr_to_uint(slot);
  }
  // Row i of the warp's 64 into the ring (zeros past the segment or N), one commit group a row;
  // rows past 64 commit an empty group so that the wait counts stay uniform.
  CUTLASS_DEVICE static void stage_row(SharedStorage& ss, ActGradEpilogueArguments const& ep,
                                       EpilogueRows const& at, int i, int warp, int lane) {
    if (i < kWarpRows) {
      const uint32_t dst = staged_slot(ss, i, warp, lane);
      const bool ok = i < at.valid && at.col_ok;
      const char* src =
          reinterpret_cast<const char*>(ok ? ep.pre + (at.row0 + i) * at.ld + at.col : ep.pre);
      const uint32_t bytes = ok ? 16u : 0u;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                   "r"(bytes));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + 16),
                   "l"(src + 16), "r"(bytes));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }

  template <class Work>
  CUTLASS_DEVICE static void activation_backward(ActGradEpilogueArguments const& ep,
                                                 SharedStorage& ss, Work const& work,
                                                 EpilogueRows const& at, int warp, int lane) {
    const int c = lane / 4, q = lane % 4;
    const int part = work.N_idx;
    for (int i = 0; i < kWarpRows; ++i) {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kSplitStagedRows - 1));
      const int r = kWarpRows * warp + i;  // the tile's row
      const uint4 d = ss.handover[r * 32 + ((4 * c + q) ^ (4 * (r & 7)))];
      const uint4* h = ss.staged + (warp * kSplitStagedRows + i % kSplitStagedRows) * 64 + 2 * lane;
      const uint4 h0 = h[0], h1 = h[1];
      const uint32_t da[4] = {d.x, d.y, d.z, d.w};
      const uint32_t w[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
      float dot = 0.f;
      uint32_t o[8];
      CUTLASS_PRAGMA_UNROLL
      for (int s = 0; s < 8; ++s) {
        const __nv_bfloat162 two = *reinterpret_cast<const __nv_bfloat162*>(&da[s / 2]);
        const float v = s % 2 ? __high2float(two) : __low2float(two);
        o[s] = swiglu_grad_pair(v, w[s], dot);
      }
      // The slot is free once its values are used (o depends on them): row i + 8 into it.
      stage_row(ss, ep, at, i + kSplitStagedRows, warp, lane);
      const bool ok = i < at.valid;
      if (ok && at.col_ok) {
        uint4* dst = reinterpret_cast<uint4*>(ep.dpre + (at.row0 + i) * at.ld + at.col);
        dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
        dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
      }
      if (ep.row_dot != nullptr) {
        CUTLASS_PRAGMA_UNROLL
        for (int x = 16; x >= 1; x /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, x);
        if (ok && lane == 0) ep.row_dot[part * ep.ld_row_dot + at.row0 + i] = dot;
      }
    }
    asm volatile("cp.async.wait_all;\n" ::);  // the ring's tail groups are empty or past 64
  }
};

// The kernel assembled like ActGradKernel<Config> (grouped_gemm_act_sm90.cuh), its mainloop's
// stages leaving room for the hand-over buffer, on ActLauncher.
template <class Config>
struct ActGradSplit
    : ActKernelBase<Mainloop<Config, WeightLayout::nk,
                             kSplitHandoverBytes + kSplitStagingBytes + 2048>,
                    EpilogueActGrad> {
  using Base = ActKernelBase<Mainloop<Config, WeightLayout::nk,
                             kSplitHandoverBytes + kSplitStagingBytes + 2048>,
                             EpilogueActGrad>;
  using typename Base::Carve;
  using typename Base::Collective;
  using typename Base::Epilogue;
  using GemmKernel = ActGradSplitKernel<typename Base::GemmKernel>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using Args = GroupedGemmActGradArgs;
  static constexpr bool kGather = false;
  static constexpr bool kBNk = true;
  static constexpr bool kCountTiles = false;

  static typename Gemm::Arguments arguments(const Carve& c, const Args& a, bool swiglu,
                                            int64_t groups, int sm_count) {
    typename Epilogue::Arguments epilogue;
    epilogue.offsets = a.offsets;
    epilogue.pre = a.pre;
    epilogue.dpre = a.dpre;
    epilogue.ld_pre = swiglu ? 2 * a.n : a.n;
    epilogue.swiglu = swiglu ? 1 : 0;
    epilogue.blocked = a.blocked ? 1 : 0;
    epilogue.row_dot = a.row_dot;
    epilogue.ld_row_dot = a.ld_row_dot;
    return Base::gemm_arguments(c, {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b}, epilogue, groups,
                                sm_count);
  }

  static size_t cutlass_bytes(int64_t groups, int sm_count) {
    const Carve none = Base::carve(nullptr, groups, 0);
    Args a;
    a.n = 8;
    return Gemm::get_workspace_size(arguments(none, a, true, groups, sm_count));
  }
};

}  // namespace moe::cuda::grouped_gemm
