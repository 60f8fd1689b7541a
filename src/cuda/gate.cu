// defines: gate_forward, gate_backward, jitter_input, jitter_backward
// Row-major (T,H) x (H,E) as column-major cuBLAS: logits^T (E,T) = W^T (E,H) x^T (H,T), i.e.
// W is a column-major (E,H) matrix with ld E and x a column-major (H,T) matrix with ld H.
#include <cuda_bf16.h>

#include <type_traits>

#include "moe/cuda/check.cuh"
#include "moe/cuda/gate.hpp"
#include "moe/rng.hpp"

namespace moe::cuda {

namespace {

template <class T>
constexpr cudaDataType_t data_type() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

template <class T>
__device__ __forceinline__ float load_f(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else return __bfloat162float(p[i]);
}
template <class T>
__device__ __forceinline__ T to_t(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __float2bfloat16_rn(v);
}

// The CPU's jitter factor: computed in double, rounded to the element type's Real (float).
__device__ __forceinline__ float jitter_factor(uint64_t seed, double eps, int64_t i) {
  const double u = counter_uniform(seed, RngStream::jitter, static_cast<uint64_t>(i));
  return static_cast<float>(1 - eps + 2 * eps * u);
}

template <class T, class Out>
__global__ void jitter_input_kernel(const T* x, int64_t n, uint64_t seed, double eps, Out* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = to_t<Out>(__fmul_rn(load_f(x, i), jitter_factor(seed, eps, i)));
}

template <class G, class T>
__global__ void jitter_backward_kernel(const G* g, int64_t n, uint64_t seed, double eps, T* dx) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    dx[i] = to_t<T>(load_f(dx, i) + load_f(g, i) * jitter_factor(seed, eps, i));
}

__global__ void round_to_bf16_kernel(const float* in, int64_t n, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, (n + 255) / 256), 4096));
}

}  // namespace

template <class T>
void gate_forward(cublasHandle_t handle, const T* x, const T* w, int64_t tokens, int64_t hidden,
                  int64_t experts, float* logits, cudaStream_t stream) {
  if (tokens == 0) return;
  MOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const float one = 1.f, zero = 0.f;
  MOE_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(experts), int(tokens),
                                int(hidden), &one, w, data_type<T>(), int(experts), x,
                                data_type<T>(), int(hidden), &zero, logits, CUDA_R_32F,
                                int(experts), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <class T>
void gate_backward(cublasHandle_t handle, const T* x, const T* w, const float* dz, int64_t tokens,
                   int64_t hidden, int64_t experts, float* dw, T* dx, T* dz_scratch,
                   cudaStream_t stream) {
  if (tokens == 0 || (!dw && !dx)) return;
  MOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const T* g = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    g = dz;
  } else {
    MOE_CHECK(dz_scratch, "gate_backward: the bf16 path needs dz_scratch (T*E)");
    round_to_bf16_kernel<<<grid_for(tokens * experts), 256, 0, stream>>>(dz, tokens * experts,
                                                                         dz_scratch);
    MOE_CUDA_LAUNCH_CHECK();
    g = dz_scratch;
  }
  const float one = 1.f;
  // dW^T (E,H) += dz^T (E,T) x (T,H): dz column-major (E,T) ld E; x column-major (H,T) ld H, op T.
  if (dw)
    MOE_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, int(experts), int(hidden),
                                  int(tokens), &one, g, data_type<T>(), int(experts), x,
                                  data_type<T>(), int(hidden), &one, dw, CUDA_R_32F, int(experts),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  // dx^T (H,T) += W (H,E) dz^T (E,T): W column-major (E,H) ld E, op T; dz column-major (E,T).
  if (dx)
    MOE_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(hidden), int(tokens),
                                  int(experts), &one, w, data_type<T>(), int(experts), g,
                                  data_type<T>(), int(experts), &one, dx, data_type<T>(),
                                  int(hidden), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <class T, class Out>
void jitter_input(const T* x, int64_t n, uint64_t seed, double eps, Out* out,
                  cudaStream_t stream) {
  if (n == 0) return;
  jitter_input_kernel<T, Out><<<grid_for(n), 256, 0, stream>>>(x, n, seed, eps, out);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class G, class T>
void jitter_backward(const G* g, int64_t n, uint64_t seed, double eps, T* dx,
                     cudaStream_t stream) {
  if (n == 0) return;
  jitter_backward_kernel<G, T><<<grid_for(n), 256, 0, stream>>>(g, n, seed, eps, dx);
  MOE_CUDA_LAUNCH_CHECK();
}

#define MOE_INSTANTIATE(T)                                                                      \
  template void gate_forward<T>(cublasHandle_t, const T*, const T*, int64_t, int64_t, int64_t, \
                                float*, cudaStream_t);                                          \
  template void gate_backward<T>(cublasHandle_t, const T*, const T*, const float*, int64_t,    \
                                 int64_t, int64_t, float*, T*, T*, cudaStream_t);              \
  template void jitter_input<T, T>(const T*, int64_t, uint64_t, double, T*, cudaStream_t);     \
  template void jitter_backward<T, T>(const T*, int64_t, uint64_t, double, T*, cudaStream_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(__nv_bfloat16)
#undef MOE_INSTANTIATE
// the bf16 Layer's switch jitter: fp32 router input, fp32 dz W^T
template void jitter_input<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t, uint64_t, double,
                                                 float*, cudaStream_t);
template void jitter_backward<float, __nv_bfloat16>(const float*, int64_t, uint64_t, double,
                                                    __nv_bfloat16*, cudaStream_t);

}  // namespace moe::cuda
