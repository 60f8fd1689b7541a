// defines: MOE_CUTLASS_CHECK, moe::cuda::grouped_gemm::{Kernel, Bf16Sm90<L> member definitions}
// Assembles the expert grouped GEMM from its pieces -- mainloop (grouped_gemm_mainloop_sm90.hpp),
// epilogue (grouped_gemm_epilogue_sm90.hpp), problems prepared on the device
// (grouped_gemm_prepare.cuh) and CUTLASS's persistent grouped tile scheduler -- and defines the
// launcher. Include it only from the one .cu per instantiation (it costs about a minute of nvcc).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include "grouped_gemm_epilogue_sm90.hpp"
#include "grouped_gemm_mainloop_sm90.hpp"
#include "grouped_gemm_prepare.cuh"
#include "grouped_gemm_sm90.hpp"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"

#ifndef MOE_CUTLASS_CHECK
#define MOE_CUTLASS_CHECK(expr)                                                            \
  do {                                                                                     \
    const cutlass::Status moe_cutlass_st_ = (expr);                                        \
    if (moe_cutlass_st_ != cutlass::Status::kSuccess)                                      \
      throw ::moe::Error(::moe::detail::concat(__FILE__, ":", __LINE__, ": ", #expr,       \
                                               " failed: ",                                \
                                               cutlassGetStatusString(moe_cutlass_st_)));  \
  } while (0)
#endif

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the grouped GEMM needs CUDA 12.3+ (device-modifiable TMA descriptors)"
#endif

namespace moe::cuda::grouped_gemm {

// ------------------------------------------------------------------------------------------------
// kernel type
// ------------------------------------------------------------------------------------------------

template <class Config, WeightLayout L>
struct Kernel {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  using Epilogue = EpilogueStore<Config>;
  using Collective =
      Mainloop<Config, L, static_cast<int>(sizeof(typename Epilogue::SharedStorage))>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using Problem = typename ProblemShape::UnderlyingProblemShape;  // (m, N, K)
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static_assert(cute::is_same_v<typename GemmKernel::InternalStrideC, StrideD>,
                "C and D share one stride array");
  static_assert(sizeof(StrideA) == 8 && sizeof(StrideB) == 8 && sizeof(StrideD) == 8,
                "one dynamic 64-bit stride per operand");

  // One workspace, carved in this order; every array starts on a 256-byte boundary (TMA
  // descriptors built from the pointer arrays want 16 bytes; 256 keeps them on their own lines).
  struct Carve {
    Problem* problems;       // (E)
    const Bf16** ptr_a;      // (E)
    const Bf16** ptr_b;      // (E)
    Bf16** ptr_d;            // (E)
    StrideA* stride_a;       // (E)
    StrideB* stride_b;       // (E)
    StrideD* stride_d;       // (E)
    void* cutlass;           // Gemm::get_workspace_size
    size_t bytes;            // total
  };
  static size_t up(size_t b) { return (b + 255) / 256 * 256; }
  static Carve carve(void* base, int64_t groups, size_t cutlass_bytes) {
    char* p = static_cast<char*>(base);
    size_t at = 0;
    auto take = [&](size_t bytes) {
      void* q = p ? p + at : nullptr;
      at += up(bytes);
      return q;
    };
    const size_t g = static_cast<size_t>(groups);
    Carve c{};
    c.problems = static_cast<Problem*>(take(g * sizeof(Problem)));
    c.ptr_a = static_cast<const Bf16**>(take(g * sizeof(void*)));
    c.ptr_b = static_cast<const Bf16**>(take(g * sizeof(void*)));
    c.ptr_d = static_cast<Bf16**>(take(g * sizeof(void*)));
    c.stride_a = static_cast<StrideA*>(take(g * sizeof(StrideA)));
    c.stride_b = static_cast<StrideB*>(take(g * sizeof(StrideB)));
    c.stride_d = static_cast<StrideD*>(take(g * sizeof(StrideD)));
    c.cutlass = take(cutlass_bytes);
    c.bytes = at;
    return c;
  }

  static typename Gemm::Arguments arguments(const Carve& c, int64_t groups, int sm_count) {
    cutlass::KernelHardwareInfo hw;
    MOE_CUDA_CHECK(cudaGetDevice(&hw.device_id));
    hw.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int32_t>(groups), c.problems, nullptr},  // no host shapes: device only
        {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b},
        {{}, const_cast<const Bf16**>(c.ptr_d), c.stride_d, c.ptr_d, c.stride_d},
        hw};
    auto& f = args.epilogue.thread;
    f.alpha = 1.f;
    f.beta = 0.f;
    f.alpha_ptr = nullptr;
    f.beta_ptr = nullptr;
    f.alpha_ptr_array = nullptr;
    f.beta_ptr_array = nullptr;
    f.dAlpha = {cute::_0{}, cute::_0{}, 0};  // one alpha, one beta for every expert
    f.dBeta = {cute::_0{}, cute::_0{}, 0};
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

template <WeightLayout L>
using DefaultKernel = Kernel<CooperativeConfig, L>;

template <WeightLayout L>
size_t Bf16Sm90<L>::workspace_bytes(int64_t groups, int sm_count) {
  using K = DefaultKernel<L>;
  return K::carve(nullptr, groups, K::cutlass_bytes(groups, sm_count)).bytes;
}

template <WeightLayout L>
const char* Bf16Sm90<L>::name() {
  static const std::string s =
      std::string(L == WeightLayout::kn ? "bf16 B(K,N), " : "bf16 B(N,K), ") +
      CooperativeConfig::kName;
  return s.c_str();
}

template <WeightLayout L>
void Bf16Sm90<L>::run(const GroupedGemmArgs& args, int64_t groups, void* workspace, int sm_count,
                      cudaStream_t stream) {
  using K = DefaultKernel<L>;
  const typename K::Carve c = K::carve(workspace, groups, K::cutlass_bytes(groups, sm_count));

  // Step 1: problems, pointers and strides of every expert, from the device offsets.
  PrepareParams<Bf16, typename K::Problem, typename K::StrideA, typename K::StrideB,
                typename K::StrideD>
      p{args.offsets,
        static_cast<int32_t>(groups),
        static_cast<int32_t>(args.n),
        static_cast<int32_t>(args.k),
        L == WeightLayout::nk,
        reinterpret_cast<const Bf16*>(args.a),
        reinterpret_cast<const Bf16*>(args.b),
        reinterpret_cast<Bf16*>(args.d),
        c.problems, c.ptr_a, c.ptr_b, c.ptr_d, c.stride_a, c.stride_b, c.stride_d};
  const int threads = static_cast<int>(std::min<int64_t>(1024, (groups + 31) / 32 * 32));
  prepare_kernel<<<1, threads, 0, stream>>>(p);
  MOE_CUDA_LAUNCH_CHECK();

  // Step 2: the persistent grouped GEMM (grid = SMs; each CTA walks tiles over all experts).
  typename K::Gemm gemm;
  const auto arguments = K::arguments(c, groups, sm_count);
  MOE_CUTLASS_CHECK(gemm.can_implement(arguments));
  MOE_CUTLASS_CHECK(gemm.initialize(arguments, c.cutlass, stream));
  MOE_CUTLASS_CHECK(gemm.run(stream));
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::grouped_gemm
