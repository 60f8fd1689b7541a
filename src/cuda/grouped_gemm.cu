// defines: GroupedGemmBase, GroupedGemm, GroupedWgrad, GroupedGemmAct, GroupedGemmActGrad
//          (workspaces, argument checks, dispatch)
// The CUTLASS kernels themselves are compiled in grouped_gemm_bf16_*.cu; this file
// only sizes the workspaces, checks the arguments and picks the instantiation.
#include <algorithm>

#include "grouped_gemm_sm90.hpp"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda {

namespace {
using grouped_gemm::Bf16Sm90;
using grouped_gemm::Bf16Sm90Act;
using grouped_gemm::Bf16Sm90ActGather;
using grouped_gemm::Bf16Sm90ActDeferred;
using grouped_gemm::Bf16Sm90ActGatherDeferred;
using grouped_gemm::Bf16Sm90ActGrad;
using grouped_gemm::Bf16Sm90Gather;
using grouped_gemm::Bf16Sm90Wgrad;
using grouped_gemm::Bf16Sm90WgradBf16;
using grouped_gemm::Bf16Sm90WgradFresh;
using grouped_gemm::Bf16Sm90WgradGather;

// A width the TMA descriptors can take: a positive multiple of 8 bf16 (16-byte rows), < 2^30.
void check_width(const char* what, const char* name, int64_t v) {
  MOE_CHECK(v >= 8 && v % 8 == 0 && v < (int64_t{1} << 30), what, ": ", name,
            " must be a positive multiple of 8 (16-byte TMA rows), got ", v);
}
}  // namespace

// ------------------------------------------------------------------------------------------------
// shared workspace
// ------------------------------------------------------------------------------------------------

GroupedGemmBase::GroupedGemmBase(int64_t experts) : experts_(experts) {
  MOE_CHECK(experts >= 1 && experts <= 4096, "grouped GEMM: experts must be in [1, 4096], got ",
            experts);
  int device = 0, major = 0, minor = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  MOE_CHECK(major == 9 && minor == 0, "grouped GEMM: needs a Hopper GPU (sm_90), found sm_",
            major, minor);
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
}

void GroupedGemmBase::allocate(size_t workspace_bytes) {
  arena_ = DeviceArena({{"grouped_gemm", workspace_bytes, &workspace_}});
}

void GroupedGemmBase::check_ready() const {
  MOE_CHECK(experts_ >= 1 && workspace_ != nullptr, "grouped GEMM: not constructed");
}

// ------------------------------------------------------------------------------------------------
// D = A · B_e
// ------------------------------------------------------------------------------------------------

GroupedGemm::GroupedGemm(int64_t experts, WeightLayout layout)
    : GroupedGemmBase(experts), layout_(layout) {
  // kn also serves gathered calls: one workspace big enough for either kernel.
  allocate(layout == WeightLayout::kn
               ? std::max(Bf16Sm90<WeightLayout::kn>::workspace_bytes(experts, sm_count_),
                          Bf16Sm90Gather::workspace_bytes(experts, sm_count_))
               : Bf16Sm90<WeightLayout::nk>::workspace_bytes(experts, sm_count_));
}

const char* GroupedGemm::name() const {
  return layout_ == WeightLayout::kn ? Bf16Sm90<WeightLayout::kn>::name()
                                     : Bf16Sm90<WeightLayout::nk>::name();
}

void GroupedGemm::run(const GroupedGemmArgs& args, cudaStream_t stream) const {
  check_ready();
  check_width("grouped GEMM", "N", args.n);
  check_width("grouped GEMM", "K", args.k);
  MOE_CHECK(args.offsets && args.a && args.b && args.d, "grouped GEMM: null pointer argument");
  if (args.gather != nullptr) {
    MOE_CHECK(layout_ == WeightLayout::kn,
              "grouped GEMM: gathered A rows need WeightLayout::kn (the up-projection)");
    MOE_CHECK(args.gather_rows >= 1 && args.gather_rows < (int64_t{1} << 31),
              "grouped GEMM: gather_rows must be in [1, 2^31), got ", args.gather_rows);
    Bf16Sm90Gather::run(args, experts_, workspace_, sm_count_, stream);
    return;
  }
  if (layout_ == WeightLayout::kn)
    Bf16Sm90<WeightLayout::kn>::run(args, experts_, workspace_, sm_count_, stream);
  else
    Bf16Sm90<WeightLayout::nk>::run(args, experts_, workspace_, sm_count_, stream);
}

// ------------------------------------------------------------------------------------------------
// dW_e += X_e^T · Y_e
// ------------------------------------------------------------------------------------------------

GroupedWgrad::GroupedWgrad(int64_t experts) : GroupedGemmBase(experts) {
  allocate(std::max({Bf16Sm90Wgrad::workspace_bytes(experts, sm_count_),
                     Bf16Sm90WgradFresh::workspace_bytes(experts, sm_count_),
                     Bf16Sm90WgradBf16::workspace_bytes(experts, sm_count_),
                     Bf16Sm90WgradGather::workspace_bytes(experts, sm_count_)}));
}

const char* GroupedWgrad::name() const { return Bf16Sm90Wgrad::name(); }

void GroupedWgrad::run(const GroupedWgradArgs& args, cudaStream_t stream) const {
  check_ready();
  check_width("grouped weight gradient", "P", args.p);
  check_width("grouped weight gradient", "Q", args.q);
  MOE_CHECK(args.offsets && args.x && args.y && ((args.dw != nullptr) != (args.dw_bf16 != nullptr)),
            "grouped weight gradient: null pointer argument (exactly one of dw, dw_bf16)");
  if (args.dw_bf16 != nullptr)
    MOE_CHECK(!args.accumulate,
              "grouped weight gradient: bf16 dW is written fresh only (accumulate = false)");
  if (args.gather != nullptr) {
    Bf16Sm90WgradGather::run(args, experts_, workspace_, sm_count_, stream);
    return;
  }
  if (args.dw_bf16 != nullptr) {
    Bf16Sm90WgradBf16::run(args, experts_, workspace_, sm_count_, stream);
    return;
  }
  // Written fresh: the kernel whose epilogue has no C (its smem goes to the mainloop).
  if (!args.accumulate) {
    Bf16Sm90WgradFresh::run(args, experts_, workspace_, sm_count_, stream);
    return;
  }
  Bf16Sm90Wgrad::run(args, experts_, workspace_, sm_count_, stream);
}

// ------------------------------------------------------------------------------------------------
// pre = A · B_e, act = activation(pre)
// ------------------------------------------------------------------------------------------------

GroupedGemmAct::GroupedGemmAct(int64_t experts, Activation activation)
    : GroupedGemmBase(experts), activation_(activation) {
  allocate(std::max({Bf16Sm90Act::workspace_bytes(experts, sm_count_),
                     Bf16Sm90ActGather::workspace_bytes(experts, sm_count_),
                     Bf16Sm90ActDeferred::workspace_bytes(experts, sm_count_),
                     Bf16Sm90ActGatherDeferred::workspace_bytes(experts, sm_count_)}));
}

const char* GroupedGemmAct::name() const {
  return activation_ == Activation::swiglu ? Bf16Sm90ActDeferred::name() : Bf16Sm90Act::name();
}

void GroupedGemmAct::run(const GroupedGemmActArgs& args, cudaStream_t stream) const {
  check_ready();
  check_width("grouped GEMM + activation", "N", args.n);
  check_width("grouped GEMM + activation", "K", args.k);
  MOE_CHECK(args.offsets && args.a && args.b && args.act,
            "grouped GEMM + activation: null pointer argument (only pre may be null)");
  MOE_CHECK(!args.blocked || (activation_ == Activation::swiglu && args.n % 64 == 0),
            "grouped GEMM + activation: the blocked gate/up layout needs SwiGLU and N a multiple "
            "of 64 (I of 32), got N=", args.n);
  if (args.gather != nullptr) {
    MOE_CHECK(args.gather_rows >= 1 && args.gather_rows < (int64_t{1} << 31),
              "grouped GEMM + activation: gather_rows must be in [1, 2^31), got ",
              args.gather_rows);
    if (grouped_gemm::deferrable(activation_, args.n))
      Bf16Sm90ActGatherDeferred::run(args, activation_, experts_, workspace_, sm_count_, stream);
    else
      Bf16Sm90ActGather::run(args, activation_, experts_, workspace_, sm_count_, stream);
    return;
  }
  // SwiGLU: the activation of each tile (and pre's stores) runs under the next tile's mainloop
  // (grouped_gemm_deferred_act_sm90.hpp).
  if (grouped_gemm::deferrable(activation_, args.n))
    Bf16Sm90ActDeferred::run(args, activation_, experts_, workspace_, sm_count_, stream);
  else
    Bf16Sm90Act::run(args, activation_, experts_, workspace_, sm_count_, stream);
}

// ------------------------------------------------------------------------------------------------
// da = A · B_e^T, dpre = da * act'(pre)
// ------------------------------------------------------------------------------------------------

GroupedGemmActGrad::GroupedGemmActGrad(int64_t experts, Activation activation)
    : GroupedGemmBase(experts), activation_(activation) {
  allocate(Bf16Sm90ActGrad::workspace_bytes(experts, sm_count_));
}

const char* GroupedGemmActGrad::name() const { return Bf16Sm90ActGrad::name(); }

void GroupedGemmActGrad::run(const GroupedGemmActGradArgs& args, cudaStream_t stream) const {
  check_ready();
  check_width("grouped GEMM + activation backward", "N", args.n);
  check_width("grouped GEMM + activation backward", "K", args.k);
  MOE_CHECK(args.offsets && args.a && args.b && args.pre && args.dpre,
            "grouped GEMM + activation backward: null pointer argument");
  MOE_CHECK(!args.blocked || (activation_ == Activation::swiglu && args.n % 32 == 0),
            "grouped GEMM + activation backward: the blocked gate/up layout needs SwiGLU and N (I) "
            "a multiple of 32, got N=", args.n);
  MOE_CHECK(!args.row_dot || args.ld_row_dot > 0,
            "grouped GEMM + activation backward: row_dot needs ld_row_dot >= max_rows, got ",
            args.ld_row_dot);
  // The epilogue runs after each tile's mainloop: deferred under the next one it took
  // 1.14-1.71x the time (grouped_gemm_deferred_act_grad_sm90.hpp, experts_lab run 20).
  Bf16Sm90ActGrad::run(args, activation_, experts_, workspace_, sm_count_, stream);
}

}  // namespace moe::cuda
