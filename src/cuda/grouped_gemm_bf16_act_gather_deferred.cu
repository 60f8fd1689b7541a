// The CUTLASS instantiation of the fused up-projection with gathered A rows whose activation runs
// under the next tile's mainloop (the grouped_fused forward without xp). NDEBUG for the same reason as
// grouped_gemm_bf16_act.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <string>

#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using GatherDeferredAct =
    ActLauncher<ActKernel<CooperativeNoClusterConfig, /*kGatherA=*/true, /*kDeferred=*/true>>;

size_t Bf16Sm90ActGatherDeferred::workspace_bytes(int64_t groups, int sm_count) {
  return GatherDeferredAct::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90ActGatherDeferred::name() {
  static const std::string s =
      std::string("bf16 B(K,N), A rows gathered by cp.async, + SwiGLU under the next tile's "
                  "mainloop, ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90ActGatherDeferred::run(const GroupedGemmActArgs& args, Activation activation,
                                    int64_t groups, void* workspace, int sm_count,
                                    cudaStream_t stream) {
  GatherDeferredAct::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
