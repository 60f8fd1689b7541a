// defines: moe::cuda::grouped_gemm::EpilogueStore
// The epilogue of the expert grouped GEMM: D = alpha * acc (+ beta * C), fp32 -> bf16, stored row-
// major through smem with TMA (the ptr-array collective swaps its TMA descriptor per expert).
// This is the unfused store; a fused variant (SwiGLU / GELU on the up-projection, a row scatter on
// the down-projection) replaces this piece only.
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
    Bf16, cutlass::layout::RowMajor*, kAlignment,                // D: rows of pre / yp / dxp
    typename Config::EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<Bf16, Accum>>::CollectiveOp;

}  // namespace moe::cuda::grouped_gemm
