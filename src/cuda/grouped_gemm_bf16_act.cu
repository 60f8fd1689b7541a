// The CUTLASS instantiation of the up-projection with the activation (SwiGLU or GELU) in its
// epilogue: experts_forward's grouped_fused backend. One instantiation per file so builds run in
// parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_act_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryAct = ActLauncher<ActKernel<CooperativeNoClusterConfig>>;

size_t Bf16Sm90Act::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryAct::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90Act::name() {
  static const std::string s =
      std::string("bf16 B(K,N) + activation epilogue (registers -> global), ") +
      CooperativeNoClusterConfig::kName;
  return s.c_str();
}

void Bf16Sm90Act::run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                      void* workspace, int sm_count, cudaStream_t stream) {
  LibraryAct::run(args, activation, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
