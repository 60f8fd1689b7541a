// defines: GroupedGemm (workspace + dispatch on the weight layout)
// The CUTLASS kernels themselves are compiled in grouped_gemm_bf16_{kn,nk}.cu; this file only
// sizes the workspace, checks the arguments and picks the instantiation.
#include "grouped_gemm_sm90.hpp"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda {

namespace {
using grouped_gemm::Bf16Sm90;

int current_sm_count() {
  int device = 0, sms = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}
}  // namespace

GroupedGemm::GroupedGemm(int64_t experts, WeightLayout layout)
    : experts_(experts), layout_(layout), sm_count_(current_sm_count()) {
  MOE_CHECK(experts >= 1 && experts <= 4096, "grouped GEMM: experts must be in [1, 4096], got ",
            experts);
  int device = 0, major = 0, minor = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  MOE_CHECK(major == 9 && minor == 0, "grouped GEMM: needs a Hopper GPU (sm_90), found sm_",
            major, minor);
  workspace_bytes_ = layout == WeightLayout::kn
                         ? Bf16Sm90<WeightLayout::kn>::workspace_bytes(experts, sm_count_)
                         : Bf16Sm90<WeightLayout::nk>::workspace_bytes(experts, sm_count_);
  arena_ = DeviceArena({{"grouped_gemm", workspace_bytes_, &workspace_}});
}

const char* GroupedGemm::name() const {
  return layout_ == WeightLayout::kn ? Bf16Sm90<WeightLayout::kn>::name()
                                     : Bf16Sm90<WeightLayout::nk>::name();
}

void GroupedGemm::run(const GroupedGemmArgs& args, cudaStream_t stream) const {
  MOE_CHECK(experts_ >= 1 && workspace_ != nullptr, "grouped GEMM: not constructed");
  MOE_CHECK(args.n >= 8 && args.n % 8 == 0 && args.n < (int64_t{1} << 30),
            "grouped GEMM: N must be a positive multiple of 8 (16-byte TMA rows), got ", args.n);
  MOE_CHECK(args.k >= 8 && args.k % 8 == 0 && args.k < (int64_t{1} << 30),
            "grouped GEMM: K must be a positive multiple of 8 (16-byte TMA rows), got ", args.k);
  MOE_CHECK(args.offsets && args.a && args.b && args.d, "grouped GEMM: null pointer argument");
  if (layout_ == WeightLayout::kn)
    Bf16Sm90<WeightLayout::kn>::run(args, experts_, workspace_, sm_count_, stream);
  else
    Bf16Sm90<WeightLayout::nk>::run(args, experts_, workspace_, sm_count_, stream);
}

}  // namespace moe::cuda
