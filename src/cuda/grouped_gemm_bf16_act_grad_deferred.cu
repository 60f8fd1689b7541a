// The CUTLASS instantiation of the da GEMM whose SwiGLU backward runs under the next tile's
// mainloop (the grouped_fused backward). NDEBUG for the same reason as grouped_gemm_bf16_act.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <string>

#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using DeferredActGradKernel =
    ActLauncher<ActGradKernel<CooperativeNoClusterConfig, /*kDeferred=*/true>>;

size_t Bf16Sm90ActGradDeferred::workspace_bytes(int64_t groups, int sm_count) {
  return DeferredActGradKernel::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90ActGradDeferred::name() {
  static const std::string s =
      std::string("bf16 B(N,K) + SwiGLU backward under the next tile's mainloop, ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90ActGradDeferred::run(const GroupedGemmActGradArgs& args, Activation activation,
                                  int64_t groups, void* workspace, int sm_count,
                                  cudaStream_t stream) {
  DeferredActGradKernel::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
