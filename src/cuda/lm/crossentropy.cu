// defines: output_forward, output_backward, crossentropy_forward (moe::cuda::lm)
// The loss stage: the output head tied to the byte embedding (two cuBLAS GEMMs against the bf16
// copy of wte) and softmax cross-entropy, one warp per token row. The cross-entropy kernel also
// writes dlogits when asked (the backward of the mean loss needs nothing but the row's softmax,
// which is in registers-and-L1 at that point), so the probabilities are never stored.
#include <cuda_bf16.h>

#include <cmath>

#include "../warp.cuh"
#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr int kRowWarps = 8;  // token rows per block (one warp each)

// ---------------------------------------------------------------------------------------------
// CUDA kernels

__global__ void __launch_bounds__(kRowWarps * 32)
    crossentropy_forward_kernel(float* losses, bf16* dlogits, const float* logits,
                                const int32_t* targets, int64_t N, int64_t V, float dloss) {
  const int64_t n = int64_t{blockIdx.x} * kRowWarps + threadIdx.x / 32;
  if (n >= N) return;
  const int lane = threadIdx.x % 32;
  const float* z = logits + n * V;  // (V)
  const int64_t target = targets[n];
  MOE_DEVICE_ASSERT(target >= 0 && target < V);
  // Step 1: max and sum of exp(z - max)
  float mx = -INFINITY;
  for (int64_t v = lane; v < V; v += 32) mx = fmaxf(mx, z[v]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int64_t v = lane; v < V; v += 32) sum += expf(z[v] - mx);
  sum = warp_sum(sum);
  // Step 2: -log p[target] from the logits (exact even when p[target] underflows)
  if (lane == 0) losses[n] = logf(sum) + mx - z[target];
  // Step 3: dlogits = (p - onehot) * dloss
  if (dlogits) {
    const float inv = 1.f / sum;
    bf16* dz = dlogits + n * V;
    for (int64_t v = lane; v < V; v += 32) {
      const float p = expf(z[v] - mx) * inv;
      dz[v] = __float2bfloat16_rn((p - (v == target ? 1.f : 0.f)) * dloss);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

void output_forward(cublasHandle_t handle, float* logits, const bf16* inp, const bf16* wte,
                    int64_t N, int64_t D, int64_t V, cudaStream_t stream) {
  // logits (N,V) = inp (N,D) * wte^T, wte (V,D)
  detail::gemm(handle, false, true, N, V, D, 1.f, inp, D, 0, wte, D, 0, 0.f, logits, V, 0, 1,
               stream);
}

void output_backward(cublasHandle_t handle, float* dinp, float* dwte, const bf16* dlogits,
                     const bf16* inp, const bf16* wte, int64_t N, int64_t D, int64_t V,
                     cudaStream_t stream) {
  // dinp (N,D) = dlogits (N,V) * wte (V,D), overwritten
  if (dinp)
    detail::gemm(handle, false, false, N, D, V, 1.f, dlogits, V, 0, wte, D, 0, 0.f, dinp, D, 0, 1,
                 stream);
  // dwte (V,D) += dlogits^T (V,N) * inp (N,D)
  if (dwte && N > 0)
    detail::gemm(handle, true, false, V, D, N, 1.f, dlogits, V, 0, inp, D, 0, 1.f, dwte, D, 0, 1,
                 stream);
}

void crossentropy_forward(float* losses, bf16* dlogits, const float* logits,
                          const int32_t* targets, int64_t N, int64_t V, float dloss,
                          cudaStream_t stream) {
  if (N == 0) return;
  MOE_CHECK(V >= 1, "crossentropy_forward: V must be >= 1, got ", V);
  const unsigned grid = static_cast<unsigned>((N + kRowWarps - 1) / kRowWarps);
  crossentropy_forward_kernel<<<grid, kRowWarps * 32, 0, stream>>>(losses, dlogits, logits,
                                                                   targets, N, V, dloss);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
