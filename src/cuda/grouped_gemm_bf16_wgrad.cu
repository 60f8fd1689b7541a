// The CUTLASS instantiation of the weight-gradient grouped GEMM (dW_e += X_e^T · Y_e, K = segment
// length): experts_backward's dw_down and dw_up. One instantiation per file so builds run in
// parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryWgrad = WgradLauncher<WgradKernel<CooperativeConfig>>;

size_t Bf16Sm90Wgrad::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryWgrad::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90Wgrad::name() {
  static const std::string s =
      std::string("bf16 X^T(col) Y(row) -> fp32 +=, K = segment, ") + CooperativeConfig::kName;
  return s.c_str();
}

void Bf16Sm90Wgrad::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                        int sm_count, cudaStream_t stream) {
  LibraryWgrad::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
