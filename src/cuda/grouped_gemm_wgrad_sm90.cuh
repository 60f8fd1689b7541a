// defines: moe::cuda::grouped_gemm::{WgradKernel, WgradStoreF32, WgradStoreF32HalfDeferred,
//          WgradStoreBf16Deferred, WgradRegisterKernel, WgradLauncher}
// The weight-gradient grouped GEMM: dW_e (P, Q) fp32 += X_e^T · Y_e over each expert's segment, the
// reduction dimension K being the segment length m_e (different for every expert, known only on
// the device). Pieces: the ptr-array mainloop with A = X^T column-major and B = Y row-major
// (grouped_gemm_mainloop_sm90.hpp), the fp32 in-place accumulating TMA epilogue
// (grouped_gemm_epilogue_sm90.hpp), problems {P, Q, m_e} from wgrad_prepare_kernel
// (grouped_gemm_prepare.cuh). A partial last K tile is filled with zeros by TMA (out-of-bounds
// rows of the segment read as 0), so m_e needs no rounding; an empty segment gets no tiles (with
// accumulate = false its dW_e is zeroed by a separate small kernel).
// Each dW_e tile is reduced by one CTA over the whole segment in a fixed order (no split-K, no
// atomics): the result is bitwise reproducible.
// Include it only from its one .cu (it costs about a minute of nvcc).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "grouped_gemm_common_sm90.cuh"
#include "grouped_gemm_deferred_store_sm90.hpp"
#include "grouped_gemm_epilogue_sm90.hpp"
#include "grouped_gemm_gather_sm90.hpp"
#include "grouped_gemm_mainloop_sm90.hpp"
#include "grouped_gemm_prepare.cuh"
#include "grouped_gemm_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// ------------------------------------------------------------------------------------------------
// kernel type
// ------------------------------------------------------------------------------------------------

// Same tile as the forward: dW tiles are (128 of P) x (256 of Q); at OLMoE's shape dW_down has
// 8 x 8 and dW_up 16 x 8 tiles per expert, 4096 and 8192 in all, so the 132 SMs stay busy even
// when one expert holds most of the rows (its tiles are long, not few).
// ElementDW: float (accumulated in place or written fresh) or Bf16 (written fresh only: the store
// epilogue of the forward GEMMs, D = acc rounded once to bf16, as PyTorch's bf16 gradients).
// kWriteOnly (fp32): an epilogue with no C (EpilogueWriteF32), dW written fresh only.
// EpilogueOverride: another epilogue for ElementDW written fresh (the lab's variants); void: the
// choice above.
// kGatherA: X_e's rows are fetched by index (GroupedWgradArgs::gather) by the K-gathering loader
// (GatherMainloop<..., true>), so dw_up needs x and the plan, not a permuted copy xp.
template <class Config, class EpilogueTile = cutlass::epilogue::collective::EpilogueTileAuto,
          class ElementDW = float, bool kWriteOnly = false, class EpilogueOverride = void,
          bool kGatherA = false>
struct WgradKernel {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  static constexpr bool kF32 = cute::is_same_v<ElementDW, float>;
  static_assert(kF32 || cute::is_same_v<ElementDW, Bf16>, "fp32 or bf16 weight gradients");
  static_assert(kF32 || !kWriteOnly, "write-only is an fp32 variant");
  using Epilogue = cute::conditional_t<
      !cute::is_void_v<EpilogueOverride>, EpilogueOverride,
      cute::conditional_t<
          kWriteOnly, EpilogueWriteF32<Config>,
          cute::conditional_t<kF32, EpilogueAccumulateF32<Config, EpilogueTile>,
                              EpilogueStore<Config>>>>;
  static constexpr bool kNoC = cute::is_void_v<typename Epilogue::ElementC>;
  using CollectiveTma =
      MainloopAB<Config, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
                 static_cast<int>(sizeof(typename Epilogue::SharedStorage))>;
  using Collective = cute::conditional_t<kGatherA, GatherMainloop<CollectiveTma, true>,
                                         CollectiveTma>;
  static constexpr bool kGather = kGatherA;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using ElementDWType = ElementDW;
  using Problem = typename ProblemShape::UnderlyingProblemShape;  // (P, Q, m_e)
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static_assert(cute::is_same_v<typename GemmKernel::InternalStrideC, StrideD>,
                "C and D share one stride array (in place)");
  static_assert((kNoC || cute::is_same_v<typename GemmKernel::ElementC, ElementDW>) &&
                    cute::is_same_v<typename GemmKernel::ElementD, ElementDW>,
                "C and D are the weight gradient's type");

  using Carve = PtrArrayCarve<Bf16, ElementDW, Problem, StrideA, StrideB, StrideD>;
  static Carve carve(void* base, int64_t groups, size_t cutlass_bytes) {
    return Carve::make(base, groups, cutlass_bytes);
  }

  static typename Gemm::Arguments arguments(const Carve& c, int64_t groups, int sm_count,
                                            bool accumulate = true,
                                            const GroupedWgradArgs* a = nullptr) {
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int32_t>(groups), c.problems, nullptr},  // no host shapes: device only
        {},
        {},
        hardware_info(sm_count)};
    if constexpr (kGatherA) {
      typename Collective::Arguments m{{c.ptr_a, c.stride_a, c.ptr_b, c.stride_b}, {}};
      if (a != nullptr)
        m.g = {a->offsets, a->gather, reinterpret_cast<const Bf16*>(a->x), a->p,
               static_cast<int32_t>(a->gather_rows)};
      args.mainloop = m;
    } else {
      args.mainloop = {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b};
    }
    if constexpr (kNoC)
      args.epilogue = {{}, nullptr, c.stride_d, c.ptr_d, c.stride_d};
    else
      args.epilogue = {{}, const_cast<const ElementDW**>(c.ptr_d), c.stride_d, c.ptr_d, c.stride_d};
    // dW = acc + dW, or dW = acc: with beta = 0 the collective never loads C, so dW is only
    // written (stale or poisoned values in it cannot leak into the result).
    set_uniform_alpha_beta(args.epilogue.thread, 1.f, accumulate ? 1.f : 0.f);
    return args;
  }

  static size_t cutlass_bytes(int64_t groups, int sm_count) {
    const Carve none = carve(nullptr, groups, 0);
    return Gemm::get_workspace_size(arguments(none, groups, sm_count));
  }
};

// Fresh dW stored from registers (grouped_gemm_deferred_store_sm90.hpp) instead of through
// shared memory and TMA, on a 1x1 cluster (the deferred epilogue counts the grouped scheduler's
// tiles for one). Store, what the epilogue does:
//   WgradStoreF32              fp32, the whole tile at once (EpilogueStoreF32; the lab's since
//                              run 26);
//   WgradStoreF32HalfDeferred  fp32, row half 0 at once, row half 1 under the next tile's
//                              mainloop (DeferredStoreF32Half): the library's;
//   WgradStoreBf16Deferred     bf16, the tile under the next tile's mainloop (DeferredStore).
// experts_lab run 22 against the TMA store on 2x1 (the library's before): fp32 at once 0.92-0.98x,
// bf16 0.84-0.93x the time at OLMoE and Qwen3, same bits; run 26: fp32 half deferred 0.92-0.97x
// fp32 at once (OLMoE, Qwen3, the small shape), same bits.
struct WgradStoreF32 {
  using Element = float;
  using Epilogue = EpilogueStoreF32Op;
  static constexpr int kRecordBytes = 0;
  template <class Base>
  using Mainloop = Base;
};
struct WgradStoreBf16Deferred {
  using Element = Bf16;
  using Epilogue = EpilogueStoreDeferredOp;
  static constexpr int kRecordBytes = deferred_record_bytes<DeferredStore>;
  template <class Base>
  using Mainloop = DeferredMainloop<Base, DeferredStore>;
};

struct WgradStoreF32HalfDeferred {
  using Element = float;
  using Epilogue = EpilogueStoreF32HalfDeferredOp;
  static constexpr int kRecordBytes = deferred_record_bytes<DeferredStoreF32Half>;
  template <class Base>
  using Mainloop = DeferredMainloop<Base, DeferredStoreF32Half>;
};

template <class Config, class Store>
struct WgradRegisterKernel {
  static_assert(cute::size(typename Config::ClusterShape{}) == 1,
                "the deferred epilogues count the grouped scheduler's tiles for a 1x1 cluster");
  static constexpr bool kDeferred = Store::kRecordBytes > 0;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  using Epilogue = typename Store::Epilogue;
  using CollectiveTma = MainloopAB<Config, cutlass::layout::ColumnMajor,
                                   cutlass::layout::RowMajor, Store::kRecordBytes>;
  using Collective = typename Store::template Mainloop<CollectiveTma>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Collective, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using ElementDWType = typename Store::Element;
  static constexpr bool kGather = false;
  static constexpr bool kF32 = cute::is_same_v<ElementDWType, float>;
  static constexpr bool kNoC = true;
  static constexpr bool kCountTiles = kDeferred;
  using Problem = typename ProblemShape::UnderlyingProblemShape;  // (P, Q, m_e)
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;

  using Carve = PtrArrayCarve<Bf16, ElementDWType, Problem, StrideA, StrideB, StrideD>;
  static Carve carve(void* base, int64_t groups, size_t cutlass_bytes) {
    return Carve::make(base, groups, cutlass_bytes);
  }

  static typename Gemm::Arguments arguments(const Carve& c, int64_t groups, int sm_count,
                                            bool /*accumulate: false only*/ = false,
                                            const GroupedWgradArgs* a = nullptr) {
    typename Epilogue::Arguments epilogue;
    if (a != nullptr) {
      if constexpr (kF32) epilogue.d = a->dw;
      else epilogue.d = a->dw_bf16;
    }
    epilogue.ld = a ? a->q : 8;
    epilogue.offsets = nullptr;  // dW_e is the e-th (P, Q) block
    if constexpr (kDeferred) epilogue.tile_count = c.tile_count;
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int32_t>(groups), c.problems, nullptr},  // no host shapes: device only
        {c.ptr_a, c.stride_a, c.ptr_b, c.stride_b},
        epilogue,
        hardware_info(sm_count)};
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
// instantiates WgradKernel<CooperativeConfig> (accumulating) in grouped_gemm_bf16_wgrad.cu,
// WgradRegisterKernel's fp32 and bf16 forms (written fresh) in
// grouped_gemm_bf16_wgrad_{fresh,bf16}.cu, and WgradKernel's three with gathered X in
// grouped_gemm_bf16_wgrad_gather.cu.
template <class K>
struct WgradLauncher {
  static size_t workspace_bytes(int64_t groups, int sm_count) {
    return K::carve(nullptr, groups, K::cutlass_bytes(groups, sm_count)).bytes;
  }

  static void run(const GroupedWgradArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream) {
    const typename K::Carve c = K::carve(workspace, groups, K::cutlass_bytes(groups, sm_count));
    if constexpr (K::kNoC)
      MOE_CHECK(!args.accumulate, "grouped weight gradient: this kernel only writes dW");

    // Step 1: problems {P, Q, m_e}, pointers and strides of every expert, from the device offsets.
    using DW = typename K::ElementDWType;
    DW* dw;
    if constexpr (K::kF32) dw = args.dw;
    else dw = reinterpret_cast<DW*>(args.dw_bf16);
    WgradPrepareParams<Bf16, typename K::Problem, typename K::StrideA, typename K::StrideB,
                       typename K::StrideD, DW>
        p{args.offsets,
          static_cast<int32_t>(groups),
          static_cast<int32_t>(args.p),
          static_cast<int32_t>(args.q),
          K::kGather,
          reinterpret_cast<const Bf16*>(args.x),
          reinterpret_cast<const Bf16*>(args.y),
          dw,
          c.problems, c.ptr_a, c.ptr_b, c.ptr_d, c.stride_a, c.stride_b, c.stride_d};
    if constexpr (requires { K::kCountTiles; }) {
      if constexpr (K::kCountTiles) {
        using Tile = typename K::Collective::TileShape;
        p.tile_count = c.tile_count;
        p.tile_m = cute::size<0>(Tile{});
        p.tile_n = cute::size<1>(Tile{});
      }
    }
    wgrad_prepare_kernel<<<1, prepare_threads(groups), 0, stream>>>(p);
    MOE_CUDA_LAUNCH_CHECK();

    // Step 2 (overwrite only): an empty expert gets no tiles, so its dW_e is zeroed here.
    if (!args.accumulate) {
      const dim3 grid(static_cast<unsigned>(zero_blocks_per_group(args.p * args.q)),
                      static_cast<unsigned>(groups));
      zero_empty_groups_kernel<<<grid, kZeroThreads, 0, stream>>>(args.offsets, dw,
                                                                   args.p * args.q);
      MOE_CUDA_LAUNCH_CHECK();
    }

    // Step 3: the persistent grouped GEMM.
    typename K::Gemm gemm;
    const auto arguments = K::arguments(c, groups, sm_count, args.accumulate, &args);
    MOE_CUTLASS_CHECK(gemm.can_implement(arguments));
    MOE_CUTLASS_CHECK(gemm.initialize(arguments, c.cutlass, stream));
    MOE_CUTLASS_CHECK(gemm.run(stream));
    MOE_CUDA_LAUNCH_CHECK();
  }
};

}  // namespace moe::cuda::grouped_gemm
