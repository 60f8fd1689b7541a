// The CUTLASS instantiation of the fp32 weight gradient written fresh (accumulate = false): no C,
// so the smem of the C staging ring the accumulating kernel keeps (even with beta = 0) goes to
// the mainloop (experts_lab run 14: 0.92-1.00x the accumulating kernel's time), and dW stored
// from registers instead of through shared memory and TMA, on a 1x1 cluster (run 22: 0.92-0.98x
// the TMA store's time on 2x1 at OLMoE and Qwen3), row half 1 of each tile under the next tile's
// mainloop (run 26: 0.92-0.97x storing the whole tile at once), bit for bit the same dW. One
// instantiation per file so builds run in parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryWgradFresh =
    WgradLauncher<WgradRegisterKernel<CooperativeNoClusterConfig, WgradStoreF32HalfDeferred>>;

size_t Bf16Sm90WgradFresh::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryWgradFresh::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90WgradFresh::name() {
  static const std::string s =
      std::string("bf16 X^T(col) Y(row) -> fp32 =, K = segment, ") +
      CooperativeNoClusterConfig::kName +
      ", stored from registers, row half 1 under the next tile's mainloop";
  return s.c_str();
}

void Bf16Sm90WgradFresh::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                             int sm_count, cudaStream_t stream) {
  LibraryWgradFresh::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
