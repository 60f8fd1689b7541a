// defines: moe::cuda::grouped_gemm::Bf16Sm90 (declaration; no CUTLASS in this header)
// The entry points of the CUTLASS sm90 grouped GEMM, one specialisation per weight layout. Each is
// defined by grouped_gemm_sm90.cuh and instantiated in its own .cu (grouped_gemm_bf16_kn.cu,
// grouped_gemm_bf16_nk.cu) so that the two ~1-minute CUTLASS compiles run in parallel and files
// that only call them (grouped_gemm.cu, experts.cu) stay quick to build.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "moe/cuda/grouped_gemm.hpp"

namespace moe::cuda::grouped_gemm {

template <WeightLayout L>
struct Bf16Sm90 {
  // Bytes of one workspace for `groups` experts on a device with `sm_count` SMs: the per-expert
  // arrays the prepare kernel writes, then CUTLASS's own workspace.
  static size_t workspace_bytes(int64_t groups, int sm_count);
  // prepare kernel + grouped GEMM on `stream`; `workspace` holds workspace_bytes(groups, sm_count).
  static void run(const GroupedGemmArgs& args, int64_t groups, void* workspace, int sm_count,
                  cudaStream_t stream);
  static const char* name();
};

}  // namespace moe::cuda::grouped_gemm
