// The CUTLASS instantiation of the weight-gradient grouped GEMM writing bf16 dW (written fresh,
// dW_e = X_e^T · Y_e rounded once): what PyTorch's autograd gives bf16 parameters. Each tile is
// stored from registers under the next tile's mainloop, on a 1x1 cluster (experts_lab run 22:
// 0.84-0.93x the time of the TMA store after each tile on 2x1, same bits). NDEBUG for the same
// reason as grouped_gemm_bf16_wgrad.cu (device assert()s would serialise the wgmmas).
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_wgrad_sm90.cuh"

namespace moe::cuda::grouped_gemm {

using LibraryWgradBf16 =
    WgradLauncher<WgradRegisterKernel<CooperativeNoClusterConfig, WgradStoreBf16Deferred>>;

size_t Bf16Sm90WgradBf16::workspace_bytes(int64_t groups, int sm_count) {
  return LibraryWgradBf16::workspace_bytes(groups, sm_count);
}

const char* Bf16Sm90WgradBf16::name() {
  static const std::string s =
      std::string("bf16 X^T(col) Y(row) -> bf16 =, K = segment, ") +
      CooperativeNoClusterConfig::kName + ", stored under the next tile's mainloop";
  return s.c_str();
}

void Bf16Sm90WgradBf16::run(const GroupedWgradArgs& args, int64_t groups, void* workspace,
                            int sm_count, cudaStream_t stream) {
  MOE_CHECK(args.q < (int64_t{1} << 28),
            "grouped weight gradient: bf16 dW needs Q below 2^28, got ", args.q);
  LibraryWgradBf16::run(args, groups, workspace, sm_count, stream);
}

}  // namespace moe::cuda::grouped_gemm
