// defines: moe::cuda::grouped_gemm::{EpilogueStore, EpilogueStoreStaged, EpilogueAccumulateF32,
//          EpilogueWriteF32}
// The TMA epilogues of the expert grouped GEMMs (the ptr-array collective swaps its TMA descriptors
// per expert), stored row-major through smem:
//   EpilogueStore          D = acc, fp32 -> bf16, with a C never read: the unfused gathered
//                          up-projection's pre and the gathered bf16 weight gradients (the
//                          builder's form)
//   EpilogueStoreStaged    the same with no C and a chosen number of D buffers (the lab's; the
//                          library's plain GEMMs store from registers since experts_lab run 21)
//   EpilogueAccumulateF32  D = acc + C with C = D, fp32: the weight gradients, accumulated in place
//   EpilogueWriteF32       D = acc, fp32, no C: the gathered weight gradients written fresh (the
//                          TMA-fed ones store from registers since experts_lab run 22)
// The fused activation epilogue of the up-projection is grouped_gemm_epilogue_act_sm90.hpp; a
// fused variant replaces this piece only.
#pragma once
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>

#include "grouped_gemm_mainloop_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// C is declared with D's type and pointed at D with beta = 0, so it is never read (the collective
// skips the source load when beta is 0) -- the form the grouped kernels are most exercised in.
template <class Config>
using EpilogueStore = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    typename Config::TileShape, typename Config::ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto,
    Accum, Accum,
    Bf16, cutlass::layout::RowMajor*, kAlignment,                // C (unused, beta = 0)
    Bf16, cutlass::layout::RowMajor*, kAlignment,                // D: rows of pre, or bf16 dW
    typename Config::EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<Bf16, Accum>>::CollectiveOp;

// D = acc, bf16, with no C and kStagesD smem buffers for D: the consumers stage up to kStagesD
// subtiles (128x32 each) before waiting for a TMA store to have read its buffer. The builder's
// form keeps 2 such buffers and a C ring it never reads (beta = 0); with 4 the smem is the same
// (32 KiB), with 8 a whole tile's D is staged and the mainloop keeps 3 stages instead of 4.
// Element (the lab's variants): bf16 (yp, dxp, bf16 dW) or float (fp32 dW written fresh);
// EpilogueTileType: the subtile (Auto: 128x32), e.g. 128x16 for fp32 to keep 4 buffers in 32 KiB.
template <class Config, int kStagesD, class Element = Bf16,
          class EpilogueTileType = cutlass::epilogue::collective::EpilogueTileAuto>
struct EpilogueStoreStaged {
  using Schedule = typename Config::EpilogueSchedule;
  using TileShape = typename Config::TileShape;
  using EpilogueTile = decltype(cutlass::epilogue::collective::detail::
                                    sm90_compute_tile_shape_or_override<
                                        Element, EpilogueTileType, Schedule, TileShape>());
  static constexpr int kFragment =
      cute::size(EpilogueTile{}) /
      (cutlass::epilogue::collective::detail::sm90_is_cooperative_v<Schedule> ? 256 : 128);
  using Policy = cutlass::epilogue::Sm90PtrArrayTmaWarpSpecialized<
      /*StagesC=*/4, kStagesD, kFragment, /*ReuseSmemC=*/false, /*DelayTmaStore=*/false,
      Schedule::NumEpilogueWarpGroups>;
  using Op = typename cutlass::epilogue::collective::detail::Sm90TmaBuilderImpl<
      TileShape, EpilogueTile, Accum, Accum,
      void, cutlass::layout::RowMajor*, 16 / sizeof(Element),       // no C
      Element, cutlass::layout::RowMajor*, 16 / sizeof(Element),    // D: rows of yp / dxp, or dW
      cutlass::epilogue::fusion::LinearCombination<Element, Accum, void, Accum>,
      Policy>::CollectiveOp;
};

// dW += acc in place: C and D are the same fp32 (E, P, Q) tensor, beta = 1. The collective loads
// the C subtile through its own producer warp before the consumers overwrite the same subtile, and
// no two CTAs share an output tile, so reading and writing one buffer is safe.
inline constexpr int kAlignmentF32 = 16 / sizeof(float);

template <class Config, class EpilogueTile = cutlass::epilogue::collective::EpilogueTileAuto>
using EpilogueAccumulateF32 = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    typename Config::TileShape, typename Config::ClusterShape,
    EpilogueTile,
    Accum, Accum,
    float, cutlass::layout::RowMajor*, kAlignmentF32,           // C: dW_e before
    float, cutlass::layout::RowMajor*, kAlignmentF32,           // D: dW_e after
    typename Config::EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<float, Accum, float, Accum>>::CollectiveOp;

// dW = acc, fp32, with no C at all (the weight gradients written fresh): the C staging ring
// EpilogueAccumulateF32 keeps in smem even when beta = 0 goes to the mainloop's stages.
template <class Config>
using EpilogueWriteF32 = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    typename Config::TileShape, typename Config::ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto,
    Accum, Accum,
    void, cutlass::layout::RowMajor*, kAlignmentF32,            // no C
    float, cutlass::layout::RowMajor*, kAlignmentF32,           // D: dW_e
    typename Config::EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<float, Accum, void, Accum>>::CollectiveOp;

}  // namespace moe::cuda::grouped_gemm
