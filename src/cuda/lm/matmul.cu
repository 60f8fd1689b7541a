// defines: matmul_forward, matmul_backward, matmul_scratch_bytes (moe::cuda::lm)
// The linear layer through cuBLAS (bf16 operands, fp32 accumulation). The bias enters as the
// GEMM's C operand (beta = 1) after a broadcast pass writes or adds it into out, which is how the
// CPU reference does it too; cublasGemmEx has no fp32-bias epilogue for a bf16 output. dbias is
// a deterministic column sum (common.cuh), never an atomic.
#include <cuda_bf16.h>

#include <type_traits>

#include "common.cuh"

namespace moe::cuda::lm {

namespace {

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// out (N,OC) = bias (or += bias when accumulate), bias broadcast over the rows.
template <class Out>
__global__ void broadcast_bias_kernel(Out* out, const float* bias, int64_t N, int64_t OC,
                                      bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < N * OC;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float b = bias[i % OC];
    detail::store_f(out, i, accumulate ? detail::load_f(out, i) + b : b);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

template <class Out>
void matmul_forward(cublasHandle_t handle, Out* out, const bf16* inp, const bf16* weight,
                    const float* bias, int64_t N, int64_t C, int64_t OC, bool accumulate,
                    cudaStream_t stream) {
  MOE_CHECK((!accumulate || std::is_same_v<Out, float>),
            "matmul_forward: accumulate needs a float output");
  if (N == 0 || OC == 0) return;
  if (bias) {
    broadcast_bias_kernel<Out><<<detail::grid_for(N * OC), 256, 0, stream>>>(out, bias, N, OC,
                                                                            accumulate);
    MOE_CUDA_LAUNCH_CHECK();
  }
  // out (N,OC) = inp (N,C) * weight (C,OC) + beta * out
  const float beta = (bias || accumulate) ? 1.f : 0.f;
  detail::gemm(handle, false, false, N, OC, C, 1.f, inp, C, 0, weight, OC, 0, beta, out, OC, 0,
               1, stream);
}

size_t matmul_scratch_bytes(int64_t N, int64_t OC) {
  return detail::column_sum_scratch_bytes(N, OC);
}

template <class Dinp>
void matmul_backward(cublasHandle_t handle, Dinp* dinp, float* dweight, float* dbias,
                     const bf16* dout, const bf16* inp, const bf16* weight, int64_t N, int64_t C,
                     int64_t OC, void* scratch, cudaStream_t stream, bool accumulate_dweight) {
  if (N == 0) {
    // An empty product is zero: a written dweight must still be written.
    if (dweight && !accumulate_dweight)
      MOE_CUDA_CHECK(cudaMemsetAsync(dweight, 0, size_t(C * OC) * sizeof(float), stream));
    return;
  }
  // dinp (N,C) = dout (N,OC) * weight^T, weight (C,OC)
  if (dinp)
    detail::gemm(handle, false, true, N, C, OC, 1.f, dout, OC, 0, weight, OC, 0, 0.f, dinp, C, 0,
                 1, stream);
  // dweight (C,OC) (+)= inp^T (C,N) * dout (N,OC)
  if (dweight)
    detail::gemm(handle, true, false, C, OC, N, 1.f, inp, C, 0, dout, OC, 0,
                 accumulate_dweight ? 1.f : 0.f, dweight, OC, 0, 1, stream);
  if (dbias) detail::column_sum(dbias, dout, N, OC, scratch, stream);
}

template void matmul_forward<bf16>(cublasHandle_t, bf16*, const bf16*, const bf16*, const float*,
                                   int64_t, int64_t, int64_t, bool, cudaStream_t);
template void matmul_forward<float>(cublasHandle_t, float*, const bf16*, const bf16*,
                                    const float*, int64_t, int64_t, int64_t, bool, cudaStream_t);
template void matmul_backward<bf16>(cublasHandle_t, bf16*, float*, float*, const bf16*,
                                    const bf16*, const bf16*, int64_t, int64_t, int64_t, void*,
                                    cudaStream_t, bool);
template void matmul_backward<float>(cublasHandle_t, float*, float*, float*, const bf16*,
                                     const bf16*, const bf16*, int64_t, int64_t, int64_t, void*,
                                     cudaStream_t, bool);

}  // namespace moe::cuda::lm
