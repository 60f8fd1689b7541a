// The CUTLASS instantiation of the weight-gradient grouped GEMM writing bf16 dW (written fresh,
// dW_e = X_e^T · Y_e rounded once): what PyTorch's autograd gives bf16 parameters. NDEBUG for the
// same reason as grouped_gemm_bf16_wgrad.cu (device assert()s would serialise the wgmmas).
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryWgradBf16 = WgradLauncher<
    WgradKernel<CooperativeConfig, cutlass::epilogue::collective::EpilogueTileAuto, Bf16>>;

size_t Bf16Sm90WgradBf16::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryWgradBf16::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90WgradBf16::name() {
  static const std::string s =
      std::string("bf16 X^T(col) Y(row) -> bf16 =, K = segment, ") + CooperativeConfig::kName;
  return s.c_str();
}

void Bf16Sm90WgradBf16::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                            int sm_count, cudaStream_t stream) {
  LibraryWgradBf16::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
