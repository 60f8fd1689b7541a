// The CUTLASS instantiation of the up-projection with the activation in its epilogue and its A rows
// gathered by index (x[row_token[r]], GatherMainloop): the fused forward without a permuted copy of
// x. NDEBUG for the same reason as grouped_gemm_bf16_act.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <string>

#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

// No cluster: in alternating rounds on an H100 (experts_lab --ab-gather, run18) the 2x1 cluster
// with B multicast took 1.07x / 1.04x the time at Qwen3 / OLMoE, same bits.
using GatherAct = ActLauncher<ActKernel<CooperativeNoClusterConfig, /*kGatherA=*/true>>;

size_t Bf16Sm90ActGather::workspace_bytes(int64_t groups, int sm_count) {
  return GatherAct::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90ActGather::name() {
  static const std::string s =
      std::string("bf16 B(K,N), A rows gathered by cp.async, + activation epilogue, ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90ActGather::run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                            void* workspace, int sm_count, cudaStream_t stream) {
  GatherAct::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
