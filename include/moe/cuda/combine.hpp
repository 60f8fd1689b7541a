// defines: moe::cuda::combine_forward, moe::cuda::combine_backward
// combine: y[t] = sum over the token's kept rows, in choice order, of weight(choice) * yp[row],
// accumulated in fp32 in registers and written once (no atomics: deterministic). Dropped choices
// and kNoExpert choices add nothing; a token with no kept row gets y[t] = 0.
// backward: dyp[row] = weight * dy[token] (padding rows 0) and
//           dweight[c] = <dy[token], yp[row(c)]> (fp32, fixed-order warp reduction; 0 when the
//           choice has no row) -- the gradient that flows back into the router.
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
                      float* dweight,           // dweight (N) fp32, every choice written
                      cudaStream_t stream);

}  // namespace moe::cuda
