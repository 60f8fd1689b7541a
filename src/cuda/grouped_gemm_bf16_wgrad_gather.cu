// The CUTLASS instantiations of the weight gradient with X's rows gathered by index (GatherMainloop
// along K: dw_up from x and the plan's row_token, with no permuted copy xp): accumulated fp32,
// fp32 written fresh (no C) and bf16 written fresh, as their TMA-fed counterparts in
// grouped_gemm_bf16_wgrad{,_fresh,_bf16}.cu. One file for the three: the layer trains with one of
// them, and a single file keeps the build's file count down at the price of its length.
// On the TMA-fed kernels' 2x1 cluster (B multicast): on 1x1, as the gathered up-projection runs, a
// gathered training layer took 1.066x / 1.026x the permuted one's time at OLMoE / Qwen3 against
// 1.013x / 1.015x on 2x1 (layer/gathered_training_f38a058 and _10c2848).
// CUTLASS's device-side assert()s would put __assertfail calls inside the mainloop (serialised
// wgmma, ptxas C7510); NDEBUG keeps a Debug build's GEMM on the fast path.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <algorithm>

#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using Auto = cutlass::epilogue::collective::EpilogueTileAuto;
using Config = CooperativeConfig;
using GatherAccumulate =
    WgradLauncher<WgradKernel<Config, Auto, float, false, void, /*kGatherA=*/true>>;
using GatherFresh =
    WgradLauncher<WgradKernel<Config, Auto, float, /*kWriteOnly=*/true, void, /*kGatherA=*/true>>;
using GatherBf16 = WgradLauncher<WgradKernel<Config, Auto, Bf16, false, void, /*kGatherA=*/true>>;

size_t Bf16Sm90WgradGather::workspace_bytes(int64_t groups, int sm_count) {
  return std::max({GatherAccumulate::workspace_bytes(groups, sm_count),
                   GatherFresh::workspace_bytes(groups, sm_count),
                   GatherBf16::workspace_bytes(groups, sm_count)});
}

const char* Bf16Sm90WgradGather::name() {
  static const std::string s =
      std::string("bf16 x[gather]^T(col) Y(row) -> fp32 or bf16, K = segment, ") +
      Config::kName;
  return s.c_str();
}

void Bf16Sm90WgradGather::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                              int sm_count, cudaStream_t stream) {
  MOE_CHECK(args.gather != nullptr && args.gather_rows >= 0 && args.p < (int64_t{1} << 29),
            "grouped weight gradient: gathered X needs gather, gather_rows >= 0 and P < 2^29");
  if (args.dw_bf16 != nullptr) GatherBf16::run(args, groups, workspace, sm_count, stream);
  else if (!args.accumulate) GatherFresh::run(args, groups, workspace, sm_count, stream);
  else GatherAccumulate::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
