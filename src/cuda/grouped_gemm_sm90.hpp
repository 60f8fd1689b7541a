// defines: moe::cuda::grouped_gemm::{Bf16Sm90, Bf16Sm90Wgrad, Bf16Sm90Act} (declarations; no
//          CUTLASS in this header)
// The entry points of the CUTLASS sm90 grouped GEMMs. Each is defined by its .cuh and instantiated
// in its own .cu, so that the ~1-minute CUTLASS compiles run in parallel and files that only call
// them (grouped_gemm.cu, experts.cu) stay quick to build:
//   Bf16Sm90<kn>   grouped_gemm_sm90.cuh       -> grouped_gemm_bf16_kn.cu
//   Bf16Sm90<nk>   grouped_gemm_sm90.cuh       -> grouped_gemm_bf16_nk.cu
//   Bf16Sm90Gather grouped_gemm_sm90.cuh       -> grouped_gemm_bf16_kn_gather.cu
//   Bf16Sm90Wgrad  grouped_gemm_wgrad_sm90.cuh -> grouped_gemm_bf16_wgrad.cu
//   Bf16Sm90WgradBf16 (bf16 dW)                -> grouped_gemm_bf16_wgrad_bf16.cu
//   Bf16Sm90WgradFresh (fp32 dW written fresh) -> grouped_gemm_bf16_wgrad_fresh.cu
//   Bf16Sm90WgradGather (X's rows gathered)    -> grouped_gemm_bf16_wgrad_gather.cu
//   Bf16Sm90Act    grouped_gemm_act_sm90.cuh   -> grouped_gemm_bf16_act.cu
//   Bf16Sm90ActGather (A rows gathered)        -> grouped_gemm_bf16_act_gather.cu
//   Bf16Sm90ActDeferred (activation under the next tile's mainloop)
//                                              -> grouped_gemm_bf16_act_deferred.cu
//   Bf16Sm90ActGatherDeferred (both)           -> grouped_gemm_bf16_act_gather_deferred.cu
//   Bf16Sm90ActGrad (da GEMM + act backward)   -> grouped_gemm_bf16_act_grad.cu
// Each has workspace_bytes(groups, sm_count) (the per-expert arrays the prepare kernel writes, then
// CUTLASS's own workspace), run(args, groups, workspace, sm_count, stream) (prepare kernel +
// grouped GEMM on `stream`) and name().
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda::grouped_gemm {

template <WeightLayout L>
struct Bf16Sm90 {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

// Bf16Sm90<kn> with A's rows gathered by index (GatherMainloop): grouped_gemm_bf16_kn_gather.cu.
struct Bf16Sm90Gather {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

struct Bf16Sm90Wgrad {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedWgradArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

// fp32 dW written fresh only, stored from registers: grouped_gemm_bf16_wgrad_fresh.cu.
struct Bf16Sm90WgradFresh {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedWgradArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

// The same with bf16 dW, written fresh only: grouped_gemm_bf16_wgrad_bf16.cu.
struct Bf16Sm90WgradBf16 {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedWgradArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

// The three weight-gradient kernels above with X's rows gathered by index (GroupedWgradArgs::
// gather), chosen by the arguments as GroupedWgrad::run chooses: grouped_gemm_bf16_wgrad_gather.cu.
struct Bf16Sm90WgradGather {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedWgradArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

// One kernel for both activations: the choice is a uniform branch per tile in the epilogue, which
// costs nothing measurable and saves a second ~1-minute instantiation in every build.
struct Bf16Sm90Act {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream);
  static const char* name();
};

// Bf16Sm90Act with A's rows gathered by index (GatherMainloop): grouped_gemm_bf16_act_gather.cu.
struct Bf16Sm90ActGather {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream);
  static const char* name();
};

// Bf16Sm90Act and Bf16Sm90ActGather with each tile's activation run under the next tile's mainloop
// (grouped_gemm_deferred_act_sm90.hpp): SwiGLU with pre's rows under 2^27 elements apart (the
// records keep 8 rows' stride in 32 bits), deferrable(activation, ld_pre).
bool deferrable(Activation activation, int64_t ld_pre);

struct Bf16Sm90ActDeferred {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream);
  static const char* name();
};

struct Bf16Sm90ActGatherDeferred {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmActArgs& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream);
  static const char* name();
};

// da = dyp · w_down[e]^T with the activation backward in the epilogue (dpre out):
// grouped_gemm_bf16_act_grad.cu.
struct Bf16Sm90ActGrad {
  static size_t workspace_bytes(int64_t groups, int sm_count);
  static void run(const GroupedGemmActGradArgs& args, Activation activation, int64_t groups,
                  void* workspace, int sm_count, cudaStream_t stream);
  static const char* name();
};


}  // namespace moe::cuda::grouped_gemm
