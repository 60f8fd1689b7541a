// The CUTLASS instantiation for B_e stored (N, K) row-major, i.e. a forward weight used
// transposed: the backward's da = dy · w_down[e]^T and d_in = dh · w_up[e]^T. One instantiation per
// file so builds run in parallel.
// CUTLASS's device-side assert()s put __assertfail calls inside the mainloop, and a call there
// makes ptxas serialise every wgmma (warning C7510: "wgmma pipeline crossing function boundary").
// Release builds define NDEBUG anyway; this keeps a Debug build's GEMM on the fast path too.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "grouped_gemm_sm90.cuh"

namespace moe::cuda::grouped_gemm {
template struct Bf16Sm90<WeightLayout::nk>;
}  // namespace moe::cuda::grouped_gemm
