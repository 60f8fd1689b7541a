// defines: moe::cuda::gate_forward, gate_backward, jitter_input, jitter_backward
// gate: logits[T,E] = x_router[T,H] W[H,E] through cuBLAS, fp32 accumulation and fp32 logits
// (router math is fp32 on every path). x and W share the element type T (float or bf16: a bf16
// model keeps a bf16 copy of W for this GEMM). Row-major everywhere, as in the CPU reference.
// backward: dW[H,E] += x_router^T dz (fp32), dx[T,H] += dz W^T. On the bf16 path dz is first
// rounded to bf16 (cuBLAS multiplies operands of one type), accumulation stays fp32. A null dw or
// dx skips that GEMM (the Layer's jitter path reuses the router input's storage for dx between
// the two).
// Switch's jitter: x_router = x * U[1-eps, 1+eps] with the CPU's counter-based draws (bit for
// bit), and its backward dx += (dz W^T) * jitter.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moe::cuda {

template <class T>
void gate_forward(cublasHandle_t handle, const T* x,  // x (T, H)
                  const T* w,                         // w (H, E)
                  int64_t tokens, int64_t hidden, int64_t experts,
                  float* logits,                      // logits (T, E) fp32, overwritten
                  cudaStream_t stream);

// dz_scratch: (T, E) of T, used on the bf16 path (may be null for float). dw or dx null: that
// product is skipped (x may then be null too when dw is).
template <class T>
void gate_backward(cublasHandle_t handle, const T* x, const T* w, const float* dz,
                   int64_t tokens, int64_t hidden, int64_t experts,
                   float* dw,       // dw (H, E) fp32, accumulated
                   T* dx,           // dx (T, H), accumulated
                   T* dz_scratch,   // (T, E) bf16 copy of dz on the bf16 path
                   cudaStream_t stream);

// out = x * jitter (switch_top1 in training): jitter_i = 1 - eps + 2 eps u_i, u_i the CPU's
// counter_uniform(seed, jitter, i). Elementwise over T*H, in fp32. Out may be wider than T
// (bf16 -> float: the bf16 Layer keeps its jittered router input in fp32, since rounding x * jitter
// back to bf16 would move it by as much as the jitter itself).
template <class T, class Out = T>
void jitter_input(const T* x, int64_t n, uint64_t seed, double eps, Out* out, cudaStream_t stream);
// dx += g * jitter, elementwise (g = dz W^T, computed by gate_backward into a zeroed buffer); g may
// be fp32 while dx is bf16 (one rounding, on the sum).
template <class G, class T = G>
void jitter_backward(const G* g, int64_t n, uint64_t seed, double eps, T* dx, cudaStream_t stream);

}  // namespace moe::cuda
