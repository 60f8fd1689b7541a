// The CUTLASS instantiation of the backward's da GEMM with the activation backward (SwiGLU or GELU)
// in its epilogue: experts_backward's grouped_fused backend. One instantiation per file so builds
// run in parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryActGrad = ActLauncher<ActGradKernel<CooperativeNoClusterConfig>>;

size_t Bf16Sm90ActGrad::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryActGrad::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90ActGrad::name() {
  static const std::string s =
      std::string("bf16 B(N,K) + activation backward epilogue (registers -> global), ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90ActGrad::run(const GroupedGemmActGradArgs& args, Activation activation,
                          int64_t groups, void* workspace, int sm_count, cudaStream_t stream) {
  LibraryActGrad::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
