// defines: moe::cuda::grouped_gemm::{Bf16, CooperativeConfig, LayoutB, MainloopAB, Mainloop}
// The mainloop of the expert grouped GEMMs: CUTLASS's sm90 ptr-array collective (TMA loads of A and
// B into a multi-stage smem ring, wgmma on two consumer warpgroups, one producer warp). For the
// activation GEMMs A is row-major (K-major); B is row-major (K, N) for the forward (N-major: wgmma
// transposes 16-bit operands from smem for free) or (N, K) for the backward's W^T (K-major). For
// the weight gradients both operands are rows of the segment read transposed: A = X^T is
// column-major (M-major), B = Y is row-major (N-major), and K (the segment length) is the strided
// dimension of both, so any K (not only multiples of 8) keeps TMA's 16-byte rules.
//
// The config is a small struct so that a second schedule (pingpong for small segments) differs in
// a few lines; each config + layout pair is one CUTLASS instantiation (about a minute of nvcc).
#pragma once
// The collective builders pull in every architecture's collectives; a few sm100 ones capture
// `this` implicitly in lambdas, which C++20 deprecates (nvcc warning 2908). Not our code, not our
// architecture: keep the build log for warnings that are.
#pragma nv_diag_suppress 2908
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/layout/matrix.h>
#include <cutlass/numeric_types.h>

#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda::grouped_gemm {

using Bf16 = cutlass::bfloat16_t;
using Accum = float;
inline constexpr int kAlignment = 16 / sizeof(Bf16);  // elements per 16 bytes (TMA, vectors)

// Cooperative: both consumer warpgroups share one 128x256 tile (64 rows each), the producer warp
// streams 64-deep K slices. Cluster 2x1: the two CTAs of a cluster take neighbouring M tiles of one
// expert and multicast the shared B (weight) tile, halving its L2 reads. Chosen for segments of
// hundreds of rows and more (OLMoE at T=16384 averages 2048 rows per expert); small segments
// (< 128 rows) waste most of a 128-row tile and want a pingpong 64-row config later.
struct CooperativeConfig {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;          // bM bN bK
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr const char* kName = "sm90 ptr-array cooperative 128x256x64 cluster 2x1x1";
};

// The same tile without a cluster: each CTA loads its own B. The plain GEMMs of both weight
// layouts and the fused up-projection run this one. Measured on an H100 in alternating rounds
// against the 2x1 cluster (experts_lab --ab, run8, and run9 the other way round), 1x1 takes
// 0.93-0.98x the time at the Qwen3 shape (up, down, fused up, da, dxp) and 0.97-0.99x at OLMoE's.
// The weight gradients keep CooperativeConfig (no consistent difference, run9), and so does the
// unfused gathered GEMM; the fused gathered one runs on 1x1 too (0.93x / 0.96x at Qwen3 / OLMoE,
// run18).
struct CooperativeNoClusterConfig {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;          // bM bN bK
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr const char* kName = "sm90 ptr-array cooperative 128x256x64 cluster 1x1x1";
};

// Pingpong: each consumer warpgroup owns a whole tile and the two alternate, so one's epilogue
// runs under the other's mainloop. Not used by the library yet; the lab compares it (a store-heavy
// epilogue -- the fused activation, the fp32 weight gradients -- is where it should pay).
template <int kM, int kN>
struct PingpongConfig {
  using TileShape = cute::Shape<cute::Int<kM>, cute::Int<kN>, cute::_64>;     // bM bN bK
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr const char* kName = "sm90 ptr-array pingpong cluster 2x1x1";
};

// B_e (K, N) row-major is CUTLASS's RowMajor B; (N, K) row-major (W^T) is its ColumnMajor B.
template <WeightLayout L>
using LayoutB = cute::conditional_t<L == WeightLayout::kn, cutlass::layout::RowMajor,
                                    cutlass::layout::ColumnMajor>;

// Stages fill the shared memory the epilogue leaves (StageCountAutoCarveout).
template <class Config, class LayoutA, class LayoutB_, int kEpilogueSmemBytes>
using MainloopAB = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    Bf16, LayoutA*, kAlignment,                                  // A: rows of xp / act / dy, or X^T
    Bf16, LayoutB_*, kAlignment,                                 // B: expert weights, or Y
    Accum,
    typename Config::TileShape, typename Config::ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmemBytes>,
    typename Config::KernelSchedule>::CollectiveOp;

// The activation GEMMs: A = rows (K-major), B = expert weights in layout L.
template <class Config, WeightLayout L, int kEpilogueSmemBytes>
using Mainloop = MainloopAB<Config, cutlass::layout::RowMajor, LayoutB<L>, kEpilogueSmemBytes>;

}  // namespace moe::cuda::grouped_gemm
