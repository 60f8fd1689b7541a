// defines: moe::cuda::act::{sigmoid, silu_mul, gelu, gelu_grad, silu_mul_grad}
// The experts' activations as device functions, shared by the elementwise kernels (experts.cu) and
// the fused up-projection epilogue (grouped_gemm_epilogue_act_sm90.hpp), so that both compute the
// same function with the same instructions: the fused path rounds its fp32 accumulators to bf16
// first (the `pre` it stores) and applies these to the rounded values, exactly as the unfused pair
// does after reading `pre` back.
// fp32 math; GELU is the exact erf form, as the CPU reference (src/cpu/experts.cpp).
#pragma once
#include <cuda_runtime.h>

namespace moe::cuda::act {

// The approximate reciprocal (rcp.approx, 1 ulp; 0 once 1 + e^-v passes 2^126) instead of an IEEE
// division: the division is a subroutine of about ten instructions, which in the fused epilogue's
// 64 pairs per thread cost more than the rest of the activation. Far below bf16's rounding.
__device__ __forceinline__ float sigmoid(float v) { return __fdividef(1.f, 1.f + __expf(-v)); }

// SwiGLU: silu(gate) * up.
__device__ __forceinline__ float silu_mul(float gate, float up) {
  return gate * sigmoid(gate) * up;
}

// d/d gate and d/d up of silu(gate) * up, times the incoming gradient d.
__device__ __forceinline__ void silu_mul_grad(float d, float gate, float up, float& d_gate,
                                              float& d_up) {
  const float s = sigmoid(gate);
  d_gate = d * up * s * (1.f + gate * (1.f - s));
  d_up = d * gate * s;
}

__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678f)); }

__device__ __forceinline__ float gelu_grad(float v) {
  return 0.5f * (1.f + erff(v * 0.70710678f)) + v * __expf(-0.5f * v * v) * 0.39894228f;
}

}  // namespace moe::cuda::act
