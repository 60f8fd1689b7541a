// defines: moe::cuda::permute_forward, moe::cuda::permute_backward
// permute: x[T,H] -> xp[M,H], row r = x[row_token[r]], padding rows = 0. Rows in [M, max_rows) are
// not written (M lives on the device; buffers are sized by PlanShape::max_rows()).
// The one decision to know: permute walks tokens, not rows. A warp reads x[t] once and writes it
// to each of the token's rows (the plan's token-major inverse), so the device reads T*H and writes
// T*K*H elements -- the byte count the benchmarks state -- instead of re-reading x once per row.
// backward: dx[t] += sum of dxp over the token's kept rows, in choice order (fp32 sum in registers
// starting from dx[t], one rounding, no atomics), like cpu::permute_backward.
// Element types: float and __nv_bfloat16 (fp32 accumulation). Rows move as 16-byte vectors when
// H * sizeof(T) is a multiple of 16 and the pointers are 16-byte aligned, element-wise otherwise.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/cuda/plan.hpp"

namespace moe::cuda {

template <class T>
void permute_forward(const PlanView& plan, const T* x,  // x (T, H)
                     int64_t hidden, T* xp,             // xp (max_rows, H)
                     cudaStream_t stream);

// accumulate false: dx[t] = the sum (overwritten, no read of dx: a token without rows gets 0).
template <class T>
void permute_backward(const PlanView& plan, const T* dxp,  // dxp (max_rows, H)
                      int64_t hidden, T* dx,               // dx (T, H), accumulated
                      cudaStream_t stream, bool accumulate = true);

}  // namespace moe::cuda
