// defines: moe::cuda::combine_forward, moe::cuda::combine_backward,
//          moe::cuda::combine_dweight_from_row_dots
// combine: y[t] = sum over the token's kept rows, in choice order, of weight(choice) * yp[row],
// accumulated in fp32 in registers and written once (no atomics: deterministic). Dropped choices
// and kNoExpert choices add nothing; a token with no kept row gets y[t] = 0.
// backward: dyp[row] = weight * dy[token] (padding rows 0) and
//           dweight[c] = <dy[token], yp[row(c)]> (fp32, fixed-order warp reduction; 0 when the
//           choice has no row) -- the gradient that flows back into the router.
//           Without yp (and dweight null): dyp only, a weighted permute of dy (same bits), for a
//           caller that forms dweight from the da GEMM's row dots instead (below).
// dweight from row dots: dweight[c] = (sum over p of row_dot[p * ld + row(c)]) / weight(c), where
//   row_dot holds <da, act> of each row in parts (GroupedGemmActGradArgs::row_dot) and da came
//   from dyp = weight * dy: the same <dy, yp> up to rounding, with yp never read. 0 for a choice
//   with no row, and for weight 0 -- there every router's logit gradient multiplies dweight by
//   zero (route_backward), so only the value reported as dweight differs from <dy, yp>.
// Element types: float and __nv_bfloat16; weights are fp32 (routing.choice_weight).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"

namespace moe::cuda {

template <class T>
void combine_forward(const PlanView& plan, const RoutingView& routing,
                     const T* yp,               // yp (max_rows, H)
                     int64_t hidden, T* y,      // y (T, H), overwritten
                     cudaStream_t stream);

template <class T>
void combine_backward(const PlanView& plan, const RoutingView& routing,
                      const T* yp,              // yp (max_rows, H) forward expert outputs
                      const T* dy,              // dy (T, H)
                      int64_t hidden, T* dyp,   // dyp (max_rows, H), rows < M written; may
                                                //   be yp (in place)
                      float* dweight,           // dweight (N) fp32, every choice written; null
                                                //   with yp null
                      cudaStream_t stream);

void combine_dweight_from_row_dots(const PlanView& plan, const RoutingView& routing,
                                   const float* row_dot,  // (parts, ld) fp32
                                   int64_t parts, int64_t ld,  // ld >= max_rows
                                   float* dweight,        // dweight (N) fp32, every choice written
                                   cudaStream_t stream);

}  // namespace moe::cuda
