// defines: moe::cuda::grouped_gemm::{Kernel, Launcher, Bf16Sm90<L> member definitions}
// Assembles the expert grouped GEMM from its pieces -- mainloop (grouped_gemm_mainloop_sm90.hpp),
// epilogue (grouped_gemm_epilogue_sm90.hpp), problems prepared on the device
// (grouped_gemm_prepare.cuh) and CUTLASS's persistent grouped tile scheduler -- and defines the
// launcher. The library's plain GEMMs (Bf16Sm90<L>) store D under the next tile's mainloop
// instead (DeferredStoreKernel, grouped_gemm_act_sm90.cuh); Kernel with its TMA store epilogue
// serves the gathered GEMM and the lab. Include it only from the one .cu per instantiation (it
// costs about a minute of nvcc).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "grouped_gemm_act_sm90.cuh"
#include "grouped_gemm_common_sm90.cuh"
#include "grouped_gemm_epilogue_sm90.hpp"
#include "grouped_gemm_gather_sm90.hpp"
#include "grouped_gemm_mainloop_sm90.hpp"
#include "grouped_gemm_prepare.cuh"
#include "grouped_gemm_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// ------------------------------------------------------------------------------------------------
// kernel type
// ------------------------------------------------------------------------------------------------

// kGatherA: A's rows are fetched by index (GatherMainloop) instead of read as a contiguous
// segment. Epilogue_: EpilogueStore (C declared, never read) or an EpilogueStoreStaged (no C).
template <class Config, WeightLayout L, bool kGatherA = false,
          class Epilogue_ = EpilogueStore<Config>>
struct Kernel {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  using Epilogue = Epilogue_;
  static constexpr bool kNoC = cute::is_void_v<typename Epilogue::ElementC>;
  static constexpr int kEpilogueSmem = static_cast<int>(sizeof(typename Epilogue::SharedStorage));
  using Collective = cute::conditional_t<kGatherA,
                                         GatherMainloop<Mainloop<Config, L, kEpilogueSmem>>,
                                         Mainloop<Config, L, kEpilogueSmem>>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static constexpr bool kGather = kGatherA;
  using Problem = typename ProblemShape::UnderlyingProblemShape;  // (m, N, K)
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static_assert(cute::is_same_v<typename GemmKernel::InternalStrideC, StrideD>,
                "C and D share one stride array");
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8,
                "one dynamic 64-bit stride per operand");

  using Carve = PtrArrayCarve<Bf16, Bf16, Problem, StrideA, StrideB, StrideD>;
  static Carve carve(void* base, int64_t groups, size_t cutlass_bytes) {
    return Carve::make(base, groups, cutlass_bytes);
  }

  static typename Collective::Arguments mainloop_arguments(const Carve& c,
                                                           const GroupedGemmArgs* run) {
    if constexpr (kGatherA) {
      typename Collective::Arguments m{{c.ptr_a, c.stride_a, c.ptr_b, c.stride_b}, {}};
      if (run != nullptr)
        m.g = {run->offsets, run->gather, reinterpret_cast<const Bf16*>(run->a), run->k,
               static_cast<int32_t>(run->gather_rows)};
      return m;
    } else {
      return {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b};
    }
  }

  // `run` null: only for sizing the workspace.
  static typename Gemm::Arguments arguments(const Carve& c, int64_t groups, int sm_count,
                                            const GroupedGemmArgs* run = nullptr) {
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int32_t>(groups), c.problems, nullptr},  // no host shapes: device only
        mainloop_arguments(c, run),
        {},
        hardware_info(sm_count)};
    if constexpr (kNoC)
      args.epilogue = {{}, nullptr, c.stride_d, c.ptr_d, c.stride_d};
    else
      args.epilogue = {{}, const_cast<const Bf16**>(c.ptr_d), c.stride_d, c.ptr_d, c.stride_d};
    set_uniform_alpha_beta(args.epilogue.thread, 1.f, 0.f);
    return args;
  }

  static size_t cutlass_bytes(int64_t groups, int sm_count) {
    const Carve none = carve(nullptr, groups, 0);
    return Gemm::get_workspace_size(arguments(none, groups, sm_count));
  }
};

// ------------------------------------------------------------------------------------------------
// launcher
// ------------------------------------------------------------------------------------------------

// A template so that the lab can instantiate other configs (bench/lab/experts_lab.cu); the library
// instantiates DefaultKernel<L> (below) for both layouts (grouped_gemm_bf16_{kn,nk}.cu).
template <class K>
struct Launcher {
  static size_t workspace_bytes(int64_t groups, int sm_count) {
    return K::carve(nullptr, groups, K::cutlass_bytes(groups, sm_count)).bytes;
  }

  static void run(const GroupedGemmArgs& args, bool b_nk, int64_t groups, void* workspace,
                  int sm_count, cudaStream_t stream) {
    const typename K::Carve c = K::carve(workspace, groups, K::cutlass_bytes(groups, sm_count));

    // Step 1: problems, pointers and strides of every expert, from the device offsets.
    PrepareParams<Bf16, typename K::Problem, typename K::StrideA, typename K::StrideB,
                  typename K::StrideD>
        p{args.offsets,
          static_cast<int32_t>(groups),
          static_cast<int32_t>(args.n),
          static_cast<int32_t>(args.k),
          b_nk,
          K::kGather,
          reinterpret_cast<const Bf16*>(args.a),
          reinterpret_cast<const Bf16*>(args.b),
          reinterpret_cast<Bf16*>(args.d),
          c.problems, c.ptr_a, c.ptr_b, c.ptr_d, c.stride_a, c.stride_b, c.stride_d};
    prepare_kernel<<<1, prepare_threads(groups), 0, stream>>>(p);
    MOE_CUDA_LAUNCH_CHECK();

    // Step 2: the persistent grouped GEMM (grid = SMs; each CTA walks tiles over all experts).
    typename K::Gemm gemm;
    const auto arguments = K::arguments(c, groups, sm_count, &args);
    MOE_CUTLASS_CHECK(gemm.can_implement(arguments));
    MOE_CUTLASS_CHECK(gemm.initialize(arguments, c.cutlass, stream));
    MOE_CUTLASS_CHECK(gemm.run(stream));
    MOE_CUDA_LAUNCH_CHECK();
  }
};

// The library's plain GEMMs: D stored from registers under the next tile's mainloop. In
// alternating rounds on an H100 (experts_lab --ab-deferred-store, run 21) against the TMA store
// after each tile (no C, 4 D buffers: EpilogueStoreStaged, the library's before) the
// down-projection takes 0.84x / 0.83x the time at OLMoE / Qwen3 and dxp 0.91x / 0.90x, same bits.
template <WeightLayout L>
using DefaultKernel = DeferredStoreKernel<CooperativeNoClusterConfig, L>;

template <WeightLayout L>
size_t Bf16Sm90<L>::workspace_bytes(int64_t groups, int sm_count) {
  return ActLauncher<DefaultKernel<L>>::workspace_bytes(groups, sm_count);
}

template <WeightLayout L>
const char* Bf16Sm90<L>::name() {
  static const std::string s =
      std::string(L == WeightLayout::kn ? "bf16 B(K,N), " : "bf16 B(N,K), ") +
      CooperativeNoClusterConfig::kName + ", store under the next tile's mainloop";
  return s.c_str();
}

template <WeightLayout L>
void Bf16Sm90<L>::run(const GroupedGemmArgs& args, int64_t groups, void* workspace, int sm_count,
                      cudaStream_t stream) {
  MOE_CHECK(args.n < (int64_t{1} << 28), "grouped GEMM: N must be below 2^28, got ", args.n);
  ActLauncher<DefaultKernel<L>>::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
