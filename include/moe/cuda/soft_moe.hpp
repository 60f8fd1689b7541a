// defines: moe::cuda::SoftMoeBuffers, soft_moe_route_forward, soft_moe_dispatch_forward,
//          soft_moe_combine_forward, soft_moe_combine_backward, soft_moe_dispatch_backward,
//          soft_moe_route_backward
// Soft MoE (Puigcerver et al. 2023) on the device, fp32, matching src/cpu/soft_moe.cpp:
//   x_hat = x / sqrt(|x|^2 + 1e-6) (rows), phi_hat = phi / sqrt(|phi|^2 + 1e-6) (columns),
//   logits L = scale * x_hat phi_hat                          (T, n), n = E * S slots
//   dispatch D = softmax of L over tokens (per slot column)   (T, n)
//   combine  C = softmax of L over slots (per token row)      (T, n)
//   slots_in = D^T x (n, H); the experts run their S slots each (the experts stage, not here);
//   y = C slots_out (T, H).
// The dense weights replace the plan, permute and combine of the sparse routers: dispatch and
// combine are cuBLAS GEMMs (fp32 accumulation); the softmaxes and norms are fixed-order kernels.
// `scale` is a device pointer (the learnable softmax scale): no host round trip.
// Backward: combine -> (dC, d slots_out); dispatch -> (dD, dx += D d_slots_in); route -> dL from
// both softmaxes -> d scale (+=), dx (+=), d phi (+=).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"

namespace moe::cuda {

struct SoftMoeBuffers {
  int64_t tokens = 0, hidden = 0, slots = 0;  // T, H, n = E * S
  float* x_inv_norm = nullptr;    // (T)
  float* x_norm = nullptr;        // (T, H)
  float* phi_inv_norm = nullptr;  // (n)
  float* phi_norm = nullptr;      // (H, n)
  float* unscaled = nullptr;      // (T, n) x_hat phi_hat (d scale = sum dL * unscaled)
  float* logits = nullptr;        // (T, n) scale * unscaled
  float* dispatch = nullptr;      // (T, n)
  float* combine = nullptr;       // (T, n)
  // backward
  float* d_combine = nullptr;     // (T, n)
  float* d_dispatch = nullptr;    // (T, n)
  float* d_logits = nullptr;      // (T, n)
  float* dx_hat = nullptr;        // (T, H)
  float* dphi_hat = nullptr;      // (H, n)
  float* zero = nullptr;          // (1) 0.f: beta of the GEMMs whose alpha is the device scale
  DeviceArena arena;

  SoftMoeBuffers() = default;
  explicit SoftMoeBuffers(const LayerConfig& cfg);
};

// x (T, H), phi = W_gate (H, n), scale (1): fills norms, logits, dispatch and combine.
void soft_moe_route_forward(cublasHandle_t handle, const float* x, const float* phi,
                            const float* scale, SoftMoeBuffers& b, cudaStream_t stream);
// slots_in (n, H) = D^T x, overwritten.
void soft_moe_dispatch_forward(cublasHandle_t handle, const SoftMoeBuffers& b, const float* x,
                               float* slots_in, cudaStream_t stream);
// y (T, H) = C slots_out, overwritten.
void soft_moe_combine_forward(cublasHandle_t handle, const SoftMoeBuffers& b,
                              const float* slots_out, float* y, cudaStream_t stream);
// dC = dy slots_out^T (into b.d_combine); d_slots_out (n, H) = C^T dy, overwritten.
void soft_moe_combine_backward(cublasHandle_t handle, SoftMoeBuffers& b, const float* slots_out,
                               const float* dy, float* d_slots_out, cudaStream_t stream);
// dD = x d_slots_in^T (into b.d_dispatch); dx (T, H) += D d_slots_in.
void soft_moe_dispatch_backward(cublasHandle_t handle, SoftMoeBuffers& b, const float* x,
                                const float* d_slots_in, float* dx, cudaStream_t stream);
// From b.d_combine and b.d_dispatch: dscale (1) +=, dx (T, H) +=, dphi (H, n) +=.
void soft_moe_route_backward(cublasHandle_t handle, SoftMoeBuffers& b, const float* x,
                             const float* phi, const float* scale, float* dx, float* dphi,
                             float* dscale, cudaStream_t stream);

}  // namespace moe::cuda
