// The CUTLASS instantiation of the fused up-projection whose activation runs under the next tile's
// mainloop (SwiGLU: the grouped_fused forward). NDEBUG for the same reason as
// grouped_gemm_bf16_act.cu.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <string>

#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using DeferredActLauncher =
    ActLauncher<ActKernel<CooperativeNoClusterConfig, /*kGatherA=*/false, /*kDeferred=*/true>>;

bool deferrable(Activation activation, int64_t ld_pre) {
  return activation == Activation::swiglu && ld_pre < (int64_t{1} << 27);
}

size_t Bf16Sm90ActDeferred::workspace_bytes(int64_t groups, int sm_count) {
  return DeferredActLauncher::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90ActDeferred::name() {
  static const std::string s =
      std::string("bf16 B(K,N) + SwiGLU under the next tile's mainloop, ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90ActDeferred::run(const GroupedGemmActArgs& args, Activation activation,
                              int64_t groups, void* workspace, int sm_count, cudaStream_t stream) {
  DeferredActLauncher::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
