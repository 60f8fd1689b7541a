// The CUTLASS instantiation of the fp32 weight gradient written fresh (accumulate = false): the
// epilogue has no C, so the smem of the C staging ring the accumulating kernel keeps (even with
// beta = 0) goes to the mainloop. experts_lab run 14: 0.92-0.95x the accumulating kernel's time
// for dw_down at Qwen3 / OLMoE, 0.98-1.00x for dw_up, bit for bit the same dW. One instantiation
// per file so builds run in parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryWgradFresh = WgradLauncher<WgradKernel<
    CooperativeConfig, cutlass::epilogue::collective::EpilogueTileAuto, float, /*kWriteOnly=*/true>>;

size_t Bf16Sm90WgradFresh::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryWgradFresh::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90WgradFresh::name() {
  static const std::string s =
      std::string("bf16 X^T(col) Y(row) -> fp32 =, K = segment, ") + CooperativeConfig::kName;
  return s.c_str();
}

void Bf16Sm90WgradFresh::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                             int sm_count, cudaStream_t stream) {
  LibraryWgradFresh::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
