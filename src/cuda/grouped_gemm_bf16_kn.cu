// The CUTLASS instantiation for B_e stored (K, N) row-major: the forward up- and down-projections
// (xp · w_up[e], act · w_down[e]). One instantiation per file so builds run in parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_sm90.cuh"

namespace moe::cuda::grouped_gemm {
template struct Bf16Sm90<WeightLayout::kn>;
}  // namespace moe::cuda::grouped_gemm
