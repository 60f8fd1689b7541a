// defines: moe::cuda::grouped_gemm::{ActKernel, ActGradKernel, DeferredStoreKernel, ActLauncher}
// The grouped GEMMs whose epilogue writes from registers, the activation fused into it or not:
//   ActKernel      the up-projection: pre = xp · w_up[e] (B (K, N) row-major), epilogue EpilogueAct
//                  writing pre (optional) and act;
//   ActGradKernel  the backward's da = dyp · w_down[e]^T (B (N, K) row-major), epilogue
//                  EpilogueActGrad writing dpre from da and the stored pre;
//   DeferredStoreKernel  a plain D = A · B_e (yp, dxp) stored under the next tile's mainloop.
// Mainloops from grouped_gemm_mainloop_sm90.hpp, problems from prepare_kernel
// (grouped_gemm_prepare.cuh), epilogues from grouped_gemm_epilogue_act_sm90.hpp. The epilogues use
// no shared memory, so the mainloop gets all of it for stages; the deferred ones (SwiGLU: each
// tile's epilogue under the next tile's mainloop, grouped_gemm_deferred_sm90.hpp) take 40 bytes a
// consumer thread for their records.
// Include it only from the .cu files that instantiate it (each costs about a minute of nvcc).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "grouped_gemm_common_sm90.cuh"
#include "grouped_gemm_deferred_act_grad_sm90.hpp"
#include "grouped_gemm_deferred_act_sm90.hpp"
#include "grouped_gemm_deferred_store_sm90.hpp"
#include "grouped_gemm_epilogue_act_sm90.hpp"
#include "grouped_gemm_gather_sm90.hpp"
#include "grouped_gemm_mainloop_sm90.hpp"
#include "grouped_gemm_prepare.cuh"
#include "grouped_gemm_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// ------------------------------------------------------------------------------------------------
// kernel type
// ------------------------------------------------------------------------------------------------

// What the register-epilogue kernels share: the kernel type from a mainloop and an epilogue, and
// the workspace of per-expert problems, A/B pointers and strides (the epilogues find their rows
// from the offsets themselves: the carve's D arrays stay unused).
template <class Collective_, class Epilogue_>
struct ActKernelBase {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  using Epilogue = Epilogue_;
  using Collective = Collective_;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using Problem = typename ProblemShape::UnderlyingProblemShape;  // (m, N, K)
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;

  using Carve = PtrArrayCarve<Bf16, Bf16, Problem, StrideA, StrideB, StrideD>;
  static Carve carve(void* base, int64_t groups, size_t cutlass_bytes) {
    return Carve::make(base, groups, cutlass_bytes);
  }

  static typename Gemm::Arguments gemm_arguments(const Carve& c,
                                                 typename Collective::Arguments mainloop,
                                                 typename Epilogue::Arguments epilogue,
                                                 int64_t groups, int sm_count) {
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int32_t>(groups), c.problems, nullptr},  // no host shapes: device only
        mainloop,
        epilogue,
        hardware_info(sm_count)};
  }
};

// kGatherA: A's rows fetched by index (GatherMainloop), as Kernel's. kDeferred: the activation of
// each tile but a CTA's last runs under the next tile's mainloop (DeferredMainloop; SwiGLU),
// which takes the per-thread records out of the stages' shared memory.
template <class Config, bool kGatherA, int kCarveout = 0>
using UpMainloopPlain =
    cute::conditional_t<kGatherA, GatherMainloop<Mainloop<Config, WeightLayout::kn, kCarveout>>,
                        Mainloop<Config, WeightLayout::kn, kCarveout>>;
template <class Config, bool kGatherA, bool kDeferred>
using UpMainloop = cute::conditional_t<
    kDeferred,
    DeferredMainloop<UpMainloopPlain<Config, kGatherA, deferred_record_bytes<DeferredAct>>,
                     DeferredAct>,
    UpMainloopPlain<Config, kGatherA>>;

template <class Config, bool kGatherA = false, bool kDeferred = false>
struct ActKernel : ActKernelBase<UpMainloop<Config, kGatherA, kDeferred>,
                                 cute::conditional_t<kDeferred, EpilogueActDeferred, EpilogueAct>> {
  static_assert(!kDeferred || cute::size(typename Config::ClusterShape{}) == 1,
                "the deferred epilogue counts the grouped scheduler's tiles for a 1x1 cluster");
  using Base = ActKernelBase<UpMainloop<Config, kGatherA, kDeferred>,
                             cute::conditional_t<kDeferred, EpilogueActDeferred, EpilogueAct>>;
  using typename Base::Carve;
  using typename Base::Collective;
  using typename Base::Epilogue;
  using typename Base::Gemm;
  using Args = GroupedGemmActArgs;
  static constexpr bool kGather = kGatherA;
  static constexpr bool kBNk = false;
  static constexpr bool kCountTiles = kDeferred;

  static typename Gemm::Arguments arguments(const Carve& c, const Args& a, bool swiglu,
                                            int64_t groups, int sm_count) {
    typename Epilogue::Arguments epilogue;
    epilogue.offsets = a.offsets;
    epilogue.pre = a.pre;
    epilogue.act = a.act;
    epilogue.ld_pre = a.n;
    epilogue.ld_act = swiglu ? a.n / 2 : a.n;
    epilogue.swiglu = swiglu ? 1 : 0;
    epilogue.blocked = a.blocked ? 1 : 0;
    if constexpr (kDeferred) epilogue.tile_count = c.tile_count;
    return Base::gemm_arguments(c, mainloop_arguments(c, a), epilogue, groups, sm_count);
  }

  static typename Collective::Arguments mainloop_arguments(const Carve& c, const Args& a) {
    if constexpr (kGatherA) {
      typename Collective::Arguments m{{c.ptr_a, c.stride_a, c.ptr_b, c.stride_b}, {}};
      m.g = {a.offsets, a.gather, reinterpret_cast<const Bf16*>(a.a), a.k,
             static_cast<int32_t>(a.gather_rows)};
      return m;
    } else {
      return {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b};
    }
  }

  static size_t cutlass_bytes(int64_t groups, int sm_count) {
    const Carve none = Base::carve(nullptr, groups, 0);
    Args a;
    a.n = 64;
    a.blocked = true;
    return Gemm::get_workspace_size(arguments(none, a, true, groups, sm_count));
  }
};

// da = dyp · w_down[e]^T with the activation backward in the epilogue: dpre, never da.
// kDeferred: each tile's but a CTA's last under the next tile's mainloop (SwiGLU), in kBlocks
// blocks, one per k-slice.
template <class Config, bool kDeferred, int kBlocks>
using DownGradMainloop = cute::conditional_t<
    kDeferred,
    DeferredMainloop<
        Mainloop<Config, WeightLayout::nk, deferred_record_bytes<DeferredActGrad<kBlocks>>>,
        DeferredActGrad<kBlocks>>,
    Mainloop<Config, WeightLayout::nk, 0>>;
template <bool kDeferred, int kBlocks>
using ActGradEpilogue =
    cute::conditional_t<kDeferred, EpilogueActGradDeferred<kBlocks>, EpilogueActGrad>;

template <class Config, bool kDeferred = false, int kBlocks = 8>
struct ActGradKernel : ActKernelBase<DownGradMainloop<Config, kDeferred, kBlocks>,
                                     ActGradEpilogue<kDeferred, kBlocks>> {
  static_assert(cute::size<1>(typename Config::TileShape{}) == kActGradTileN,
                "GroupedGemmActGradArgs::row_dot has a part per kActGradTileN columns");
  static_assert(!kDeferred || cute::size(typename Config::ClusterShape{}) == 1,
                "the deferred epilogue counts the grouped scheduler's tiles for a 1x1 cluster");
  using Base = ActKernelBase<DownGradMainloop<Config, kDeferred, kBlocks>,
                             ActGradEpilogue<kDeferred, kBlocks>>;
  using typename Base::Carve;
  using typename Base::Epilogue;
  using typename Base::Gemm;
  using Args = GroupedGemmActGradArgs;
  static constexpr bool kGather = false;
  static constexpr bool kBNk = true;
  static constexpr bool kCountTiles = kDeferred;

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
    if constexpr (kDeferred) epilogue.tile_count = c.tile_count;
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

// A plain GEMM (D = acc in bf16, rows in expert order: yp, dxp) whose store runs under the next
// tile's mainloop (grouped_gemm_deferred_store_sm90.hpp), on ActLauncher (the activation argument
// is ignored): the register-epilogue assembly above without an activation.
template <class Config, WeightLayout L>
struct DeferredStoreKernel
    : ActKernelBase<
          DeferredMainloop<Mainloop<Config, L, deferred_record_bytes<DeferredStore>>,
                           DeferredStore>,
          EpilogueStoreDeferredOp> {
  static_assert(cute::size(typename Config::ClusterShape{}) == 1,
                "the deferred epilogue counts the grouped scheduler's tiles for a 1x1 cluster");
  using Base = ActKernelBase<
      DeferredMainloop<Mainloop<Config, L, deferred_record_bytes<DeferredStore>>, DeferredStore>,
      EpilogueStoreDeferredOp>;
  using typename Base::Carve;
  using typename Base::Epilogue;
  using typename Base::Gemm;
  using Args = GroupedGemmArgs;
  static constexpr bool kGather = false;
  static constexpr bool kBNk = L == WeightLayout::nk;
  static constexpr bool kCountTiles = true;

  static typename Gemm::Arguments arguments(const Carve& c, const Args& a, bool /*swiglu*/,
                                            int64_t groups, int sm_count) {
    typename Epilogue::Arguments epilogue;
    epilogue.offsets = a.offsets;
    epilogue.d = a.d;
    epilogue.ld = a.n;
    epilogue.tile_count = c.tile_count;
    return Base::gemm_arguments(c, {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b}, epilogue, groups,
                                sm_count);
  }

  static size_t cutlass_bytes(int64_t groups, int sm_count) {
    const Carve none = Base::carve(nullptr, groups, 0);
    Args a;
    a.n = 8;
    return Gemm::get_workspace_size(arguments(none, a, false, groups, sm_count));
  }
};

// ------------------------------------------------------------------------------------------------
// launcher
// ------------------------------------------------------------------------------------------------

// A template so that the lab can instantiate other configs (bench/lab/experts_lab.cu); the library
// instantiates DeferredStoreKernel<CooperativeNoClusterConfig, L> in grouped_gemm_bf16_{kn,nk}.cu
// (Bf16Sm90<L>, through grouped_gemm_sm90.cuh), ActKernel<CooperativeNoClusterConfig> in
// grouped_gemm_bf16_act.cu, the gathered
// ActKernel<CooperativeNoClusterConfig, true> in grouped_gemm_bf16_act_gather.cu and
// ActGradKernel<CooperativeNoClusterConfig> in grouped_gemm_bf16_act_grad.cu; the deferred
// ActGradKernel<Config, true, kBlocks> is the lab's only (measured slower, experts_lab run 20).
template <class K>
struct ActLauncher {
  static size_t workspace_bytes(int64_t groups, int sm_count) {
    return K::carve(nullptr, groups, K::cutlass_bytes(groups, sm_count)).bytes;
  }

  // A kernel without an activation (DeferredStoreKernel).
  static void run(const typename K::Args& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream) {
    run(args, Activation::swiglu, groups, workspace, sm_count, stream);
  }

  static void run(const typename K::Args& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream) {
    const typename K::Carve c = K::carve(workspace, groups, K::cutlass_bytes(groups, sm_count));

    // Step 1: problems, A/B pointers and strides of every expert, from the device offsets (the
    // epilogue finds its rows from the offsets itself: no D arrays).
    PrepareParams<Bf16, typename K::Problem, typename K::StrideA, typename K::StrideB,
                  typename K::StrideD>
        p{args.offsets,
          static_cast<int32_t>(groups),
          static_cast<int32_t>(args.n),
          static_cast<int32_t>(args.k),
          K::kBNk,
          K::kGather,
          reinterpret_cast<const Bf16*>(args.a),
          reinterpret_cast<const Bf16*>(args.b),
          nullptr,
          c.problems, c.ptr_a, c.ptr_b, nullptr, c.stride_a, c.stride_b, nullptr};
    if constexpr (K::kCountTiles) {
      using Tile = typename K::Collective::TileShape;
      p.tile_count = c.tile_count;
      p.tile_m = cute::size<0>(Tile{});
      p.tile_n = cute::size<1>(Tile{});
    }
    prepare_kernel<<<1, prepare_threads(groups), 0, stream>>>(p);
    MOE_CUDA_LAUNCH_CHECK();

    // Step 2: the persistent grouped GEMM with the activation (or its gradient) in the epilogue.
    typename K::Gemm gemm;
    const auto arguments =
        K::arguments(c, args, activation == Activation::swiglu, groups, sm_count);
    MOE_CUTLASS_CHECK(gemm.can_implement(arguments));
    MOE_CUTLASS_CHECK(gemm.initialize(arguments, c.cutlass, stream));
    MOE_CUTLASS_CHECK(gemm.run(stream));
    MOE_CUDA_LAUNCH_CHECK();
  }
};

}  // namespace moe::cuda::grouped_gemm
