// The CUTLASS instantiation of the up-projection with its A rows gathered by index
// (x[row_token[r]], GatherMainloop): the forward without a permuted copy of x. NDEBUG for the same
// reason as grouped_gemm_bf16_kn.cu (device assert()s would serialise the wgmmas).
#ifndef NDEBUG
#define NDEBUG
#endif
#include <string>

#include "grouped_gemm_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using GatherKernel = Kernel<CooperativeConfig, WeightLayout::kn, /*kGatherA=*/true>;

size_t Bf16Sm90Gather::workspace_bytes(int64_t groups, int sm_count) {
  return Launcher<GatherKernel>::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90Gather::name() {
  static const std::string s =
      std::string("bf16 B(K,N), A rows gathered by cp.async, ") + CooperativeConfig::kName;
  return s.c_str();
}

void Bf16Sm90Gather::run(const GroupedGemmArgs& args, int64_t groups, void* workspace,
                         int sm_count, cudaStream_t stream) {
  Launcher<GatherKernel>::run(args, /*b_nk=*/false, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
