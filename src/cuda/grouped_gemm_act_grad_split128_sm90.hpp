// defines: moe::cuda::grouped_gemm::{ActGradSplit128Kernel, ActGradSplit128} (lab)
// The backward's da GEMM on 128x128 tiles with the activation backward on a warpgroup of its own,
// under the next tile's mainloop (experts lab, Version 24). Run 35's 128x256 form could give the
// work only two warps: 512 threads launch at 128 registers a thread, too few for a 64x256 wgmma;
// a 64x128 one needs 64 accumulators, so here four warpgroups fit: warpgroup 0 loads (warp 0)
// and schedules (warp 3), warpgroups 1-2 run the mainloop, warpgroup 3 forms dpre and the row
// dots from a 32 KiB hand-over buffer and a cp.async ring of pre (8 row pairs ahead a warp).
// dpre is the library's bit for bit; the row dots come in parts of 128 columns (the library's
// are of 256), each summed over half a warp's lanes.
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

inline constexpr int kSplit128HandoverBytes = 128 * 128 * 2;
// kStaged: row pairs of pre in flight per epilogue warp (4 warps x kStaged KiB of ring)
template <int kStaged>
inline constexpr int kSplit128StagingBytes = 4 * kStaged * 1024;

struct Cooperative128x128Config {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr const char* kName = "sm90 ptr-array cooperative 128x128x64 cluster 1x1x1";
};

template <class Base, int kStaged>
struct ActGradSplit128Kernel : Base {
  static constexpr int kSplit128Staged = kStaged;
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
  static_assert(kTileM == 128 && kTileN == 128 && cute::size(ClusterShape{}) == 1 &&
                    cute::size(TiledMma{}) == 256,
                "written for the cooperative 128x128 tile on a 1x1 cluster");
  static constexpr uint32_t MaxThreadsPerBlock = 512;
  static constexpr uint32_t MinBlocksPerMultiprocessor = 1;
  // setmaxnreg moves registers within the CTA: the epilogue warpgroup's gain over the launch's
  // 128 must come from the producer warpgroup (the consumers keep 128: 64 accumulators).
  static constexpr uint32_t kLaunchRegs = 128, kLoadRegs = 40, kEpilogueRegs = 168;
  static_assert(kEpilogueRegs - kLaunchRegs <= kLaunchRegs - kLoadRegs,
                "the epilogue's registers come from the producer warpgroup's");
  static constexpr int kEpilogueWarps = 4;
  static constexpr int kSchedulerStages = 8;  // CUTLASS's grouped kernel's

  struct SharedStorage {
    struct TensorStorage : cute::aligned_struct<128, cute::_1> {
      typename CollectiveMainloop::TensorStorage mainloop;
    } tensors;
    alignas(128) uint4 handover[kSplit128HandoverBytes / 16];
    // Each epilogue warp's ring of kStagedRows pre rows (1 KiB each), filled by cp.async.
    alignas(128) uint4 staged[kSplit128StagingBytes<kStaged> / 16];
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
  static_assert(SharedStorageSize <= 232448, "shared memory: the stages, the buffer, the ring");

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
      }
    } else if (warp_group == 3) {
      cutlass::arch::warpgroup_reg_alloc<kEpilogueRegs>();
      // pre does not depend on the consumers: each tile's first rows are requested before its
      // da is waited for.
      const int warp = warp_in_group;
      uint32_t tile = 0;
      do {
        const auto shape = params.problem_shape.get_problem_shape(work.L_idx);  // (m, N, K)
        const EpilogueRows at =
            epilogue_rows(params.epilogue, work, get<0>(shape), get<1>(shape), warp, lane);
        for (int i = 0; i < kSplit128Staged; ++i) stage_rows(ss, params.epilogue, at, i, warp, lane);
        Barrier::wait(&ss.pipelines.full, tile & 1);
        activation_backward(params.epilogue, ss, work, at, warp, lane);
        Barrier::arrive(&ss.pipelines.empty);
        ++tile;
        next_tile();
      } while (work.is_valid());
    } else {
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
  // A row is 16 chunks; chunk k of row r sits at k ^ 4 (r % 2).
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
      uint4* row = ss.handover + r * 16;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 4; ++c) {
        // pair s = a + 4 b of the chunk is unit 32 c + 8 a + 2q + b: value 2 v1 + 16 c + 4 a + b
        const int v = 2 * v1 + 16 * c;
        const uint4 chunk = make_uint4(bf16_pair(acc(v + 0), acc(v + 4)),
                                       bf16_pair(acc(v + 8), acc(v + 12)),
                                       bf16_pair(acc(v + 1), acc(v + 5)),
                                       bf16_pair(acc(v + 9), acc(v + 13)));
        row[(4 * c + q) ^ (4 * (r & 1))] = chunk;
      }
    }
  }

  // The epilogue warps: warp w takes tile rows 32 w .. 32 w + 31, two at a time: lane
  // (h, c, q) = (lane / 16, lane / 4 % 4, lane % 4) row 2i + h, pre pairs 8q .. 8q + 7 of block c
  // (32 bytes, loaded and read by the lane itself, so cp.async.wait_group alone orders them).
  static constexpr int kWarpRows = kTileM / kEpilogueWarps;
  static constexpr int kPairs = kWarpRows / 2;
  struct EpilogueRows {
    int64_t row0, ld;  // the warp's first row in pre's rows, pre's row length
    int64_t col;       // the lane's first element of a row
    int valid;         // rows of the warp's 32 inside the segment
    bool col_ok;
  };
  template <class Work>
  CUTLASS_DEVICE static EpilogueRows epilogue_rows(ActGradEpilogueArguments const& ep,
                                                   Work const& work, int rows, int cols,
                                                   int warp, int lane) {
    const int pair = work.N_idx * kTileN + 32 * (lane / 4 % 4) + 8 * (lane % 4);
    const int first = work.M_idx * kTileM + kWarpRows * warp;
    EpilogueRows at;
    at.row0 = int64_t{ep.offsets[work.L_idx]} + first;
    at.ld = ep.ld_pre;
    at.col = 2 * int64_t{pair};
    at.valid = rows - first < 0 ? 0 : (rows - first < kWarpRows ? rows - first : kWarpRows);
    at.col_ok = pair < cols;
    return at;
  }
  CUTLASS_DEVICE static uint4* staged(SharedStorage& ss, int i, int warp, int lane) {
    return ss.staged + (warp * kSplit128Staged + i % kSplit128Staged) * 64 + 2 * lane;
  }
  // Row pair i of the warp's 16 into the ring (zeros past the segment or N), one commit group
  // each; pairs past 16 commit an empty group so that the wait counts stay uniform.
  CUTLASS_DEVICE static void stage_rows(SharedStorage& ss, ActGradEpilogueArguments const& ep,
                                        EpilogueRows const& at, int i, int warp, int lane) {
    if (i < kPairs) {
      const uint32_t dst = cute::cast_smem_ptr_to_uint(staged(ss, i, warp, lane));
      const int r = 2 * i + lane / 16;
      const bool ok = r < at.valid && at.col_ok;
      const char* src =
          reinterpret_cast<const char*>(ok ? ep.pre + (at.row0 + r) * at.ld + at.col : ep.pre);
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
    const int k = lane % 16, h = lane / 16;
    for (int i = 0; i < kPairs; ++i) {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kSplit128Staged - 1));
      const int rw = 2 * i + h;              // the warp's row
      const int r = kWarpRows * warp + rw;   // the tile's row
      const uint4 d = ss.handover[r * 16 + (k ^ (4 * (r & 1)))];
      const uint4* hp = staged(ss, i, warp, lane);
      const uint4 h0 = hp[0], h1 = hp[1];
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
      // The slot is free once its values are used (o depends on them): pair i + 8 into it.
      stage_rows(ss, ep, at, i + kSplit128Staged, warp, lane);
      const bool ok = rw < at.valid;
      if (ok && at.col_ok) {
        uint4* dst = reinterpret_cast<uint4*>(ep.dpre + (at.row0 + rw) * at.ld + at.col);
        dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
        dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
      }
      if (ep.row_dot != nullptr) {
        CUTLASS_PRAGMA_UNROLL
        for (int x = 8; x >= 1; x /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, x);
        if (ok && k == 0) ep.row_dot[work.N_idx * ep.ld_row_dot + at.row0 + rw] = dot;
      }
    }
    asm volatile("cp.async.wait_all;\n" ::);
  }
};

// The kernel assembled like ActGradKernel<Config> (grouped_gemm_act_sm90.cuh), its mainloop's
// stages leaving room for the hand-over buffer, on ActLauncher.
template <class Config = Cooperative128x128Config, int kStaged = 8>
struct ActGradSplit128
    : ActKernelBase<Mainloop<Config, WeightLayout::nk,
                             kSplit128HandoverBytes + kSplit128StagingBytes<kStaged> + 2048>,
                    EpilogueActGrad> {
  using Base = ActKernelBase<Mainloop<Config, WeightLayout::nk,
                             kSplit128HandoverBytes + kSplit128StagingBytes<kStaged> + 2048>,
                             EpilogueActGrad>;
  using typename Base::Carve;
  using typename Base::Collective;
  using typename Base::Epilogue;
  using GemmKernel = ActGradSplit128Kernel<typename Base::GemmKernel, kStaged>;
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
