// defines: moe::cuda::SoftMoeBuffers, soft_moe_logits_forward, soft_moe_dispatch_softmax_forward,
//          soft_moe_combine_softmax_forward, soft_moe_route_forward, soft_moe_dispatch_forward,
//          soft_moe_combine_forward, soft_moe_combine_backward, soft_moe_dispatch_backward,
//          soft_moe_route_backward
// Soft MoE (Puigcerver et al. 2023) on the device, matching src/cpu/soft_moe.cpp:
//   x_hat = x / sqrt(|x|^2 + 1e-6) (rows), phi_hat = phi / sqrt(|phi|^2 + 1e-6) (columns),
//   logits L = scale * x_hat phi_hat                          (T, n), n = E * S slots
//   dispatch D = softmax of L over tokens (per slot column)   (T, n)
//   combine  C = softmax of L over slots (per token row)      (T, n)
//   slots_in = D^T x (n, H); the experts run their S slots each (the experts stage, not here);
//   y = C slots_out (T, H).
// The dense weights replace the plan, permute and combine of the sparse routers: the logits,
// dispatch and combine are cuBLAS GEMMs; the norms and softmaxes are fixed-order kernels.
//
// Element type Elem (float or __nv_bfloat16) is the storage of x, phi, slots_in, slots_out, y and
// their gradients, and of the dispatch and combine weights. Router math stays fp32 on both paths:
// inverse norms, logits, softmax statistics, dC, dD, the softmax backward, dphi and dscale; every
// GEMM accumulates in fp32 (CUBLAS_COMPUTE_32F).
// Why D and C are stored in Elem: they are GEMM operands (slots_in = D^T x, y = C slots_out), and
// cuBLAS multiplies operands of one type, so the bf16 GEMMs need bf16 weights. bf16 keeps fp32's
// exponent range, so a weight near 1/T (D at T = 16384) keeps its 2^-9 relative precision; the
// backward reads the same stored weights (the derivative of what the forward used). An fp32
// copy would cost 4 T n bytes more and gain nothing the 1e-2 tolerance of bf16 notices.
// One decision to know: the logits GEMM multiplies the raw x and phi and the norms are applied to
// its (T, n) result (L = scale * inv_x[t] * inv_phi[j] * (x phi)[t, j]): no normalised copy of x
// is written or read (one pass over x fewer), and the bf16 operands are the inputs themselves.
// The backward folds the norms the same way (G = scale inv_x inv_phi dL, then dx from G phi^T and
// dphi from x^T G), see soft_moe.cu.
// `scale` is a device pointer (the learnable softmax scale): no host round trip anywhere.
//
// Groups: SoftMoeBuffers(cfg, G) runs G independent Soft MoE layers of B = cfg.tokens tokens each
// in one set of launches (the language model's groups across the batch, one per position). Only
// the dispatch softmax (over a group's tokens) and the products with D and C see the groups;
// the norms, logits, combine softmax and both norm GEMMs of the backward run over all T = G * B
// tokens at once (phi is shared). Layouts:
//   x, y, dx                       (G, B, H)   group-major rows, group g = rows [g B, (g+1) B)
//   logits, dispatch, combine      (G, B, n)
//   slots_in, slots_out and grads  (n, G, H)   row j * G + g: slot j of group g. Expert e owns
//                                              slots [e S, (e+1) S), so its rows from all groups
//                                              are the contiguous [e S G, (e+1) S G): the experts
//                                              stage runs E uniform segments of S * G rows.
// The per-group products are cuBLAS strided-batched GEMMs (a slot matrix of group g starts at
// row g and has leading dimension G * H). With G = 1 every layout is the single group's and the
// GEMMs are the plain cublasGemmEx calls.
// Backward: combine -> (dC, d slots_out); dispatch -> (dD, dx += D d_slots_in); route -> dL from
// both softmaxes -> d scale (+=), dx (+=), d phi (+=).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"

namespace moe::cuda {

// Rows per chunk of the column reductions (over tokens of the (T, n) logits and weights, over H
// of phi): a block reduces 256 rows of up to 32 slot columns into one partial per column, and a
// second kernel combines the chunks in order.
inline constexpr int64_t kSoftMoeRowChunk = 256;

template <class Elem>
struct SoftMoeBuffers {
  int64_t tokens = 0, hidden = 0, slots = 0;  // T = G * B, H, n = E * S
  int64_t groups = 1;         // G
  int64_t group_tokens = 0;   // B = cfg.tokens
  int64_t row_chunks = 0;     // ceil(B / kSoftMoeRowChunk), per group
  int64_t hidden_chunks = 0;  // ceil(H / kSoftMoeRowChunk)
  float* x_inv_norm = nullptr;     // (T)
  float* phi_inv_norm = nullptr;   // (n)
  float* phi_partial = nullptr;    // (hidden_chunks, n) per chunk: sum phi^2, or <phi, Q>
  float* unscaled = nullptr;       // (T, n) x_hat phi_hat (d scale = sum dL * unscaled)
  float* logits = nullptr;         // (T, n) scale * unscaled
  float* col_partial = nullptr;    // (G, row_chunks, n, 2) per chunk: (max, sum exp); backward:
                                   // (G, row_chunks, n) <D, dD>
  float* col_max = nullptr;        // (G, n) dispatch softmax: max over the group's tokens
  float* col_sum = nullptr;        // (G, n) dispatch softmax: sum of exp(L - max)
  Elem* dispatch = nullptr;        // (T, n)
  Elem* combine = nullptr;         // (T, n)
  // backward
  float* d_combine = nullptr;      // (T, n) dC
  float* d_dispatch = nullptr;     // (T, n) dD
  float* col_dot = nullptr;        // (G, n) <D[g, :, j], dD[g, :, j]>
  float* scale_partial = nullptr;  // (T) sum_j dL[t, j] * unscaled[t, j]
  Elem* g = nullptr;               // (T, n) scale * inv_x[t] * inv_phi[j] * dL[t, j]
  Elem* dx_raw = nullptr;          // (T, H) G phi^T = inv_x * dx_hat
  float* dphi_raw = nullptr;       // (H, n) x^T G = inv_phi * dphi_hat
  float* phi_dot = nullptr;        // (n) <phi[:, j], dphi_raw[:, j]>
  DeviceArena arena;

  SoftMoeBuffers() = default;
  // cfg.tokens = B tokens per group; groups in [1, 65535].
  explicit SoftMoeBuffers(const LayerConfig& cfg, int64_t groups = 1);
};

// ---- forward

// x (T, H), phi = W_gate (H, n), scale (1): inverse norms, unscaled and logits (the gate stage).
template <class Elem>
void soft_moe_logits_forward(cublasHandle_t handle, const Elem* x, const Elem* phi,
                             const float* scale, SoftMoeBuffers<Elem>& b, cudaStream_t stream);
// b.dispatch from b.logits: column statistics in row chunks, then the weights.
template <class Elem>
void soft_moe_dispatch_softmax_forward(SoftMoeBuffers<Elem>& b, cudaStream_t stream);
// b.combine from b.logits: a warp per token.
template <class Elem>
void soft_moe_combine_softmax_forward(SoftMoeBuffers<Elem>& b, cudaStream_t stream);
// The three above: norms, logits, dispatch and combine.
template <class Elem>
void soft_moe_route_forward(cublasHandle_t handle, const Elem* x, const Elem* phi,
                            const float* scale, SoftMoeBuffers<Elem>& b, cudaStream_t stream);
// slots_in (n, G, H) = D[g]^T x[g] per group, overwritten.
template <class Elem>
void soft_moe_dispatch_forward(cublasHandle_t handle, const SoftMoeBuffers<Elem>& b, const Elem* x,
                               Elem* slots_in, cudaStream_t stream);
// y (G, B, H) = C[g] slots_out[:, g, :] per group, overwritten.
template <class Elem>
void soft_moe_combine_forward(cublasHandle_t handle, const SoftMoeBuffers<Elem>& b,
                              const Elem* slots_out, Elem* y, cudaStream_t stream);

// ---- backward

// dC = dy slots_out^T (into b.d_combine, fp32); d_slots_out (n, G, H) = C^T dy, overwritten
// (per group).
template <class Elem>
void soft_moe_combine_backward(cublasHandle_t handle, SoftMoeBuffers<Elem>& b,
                               const Elem* slots_out, const Elem* dy, Elem* d_slots_out,
                               cudaStream_t stream);
// dD = x d_slots_in^T (into b.d_dispatch, fp32); dx (G, B, H) += D d_slots_in (per group).
template <class Elem>
void soft_moe_dispatch_backward(cublasHandle_t handle, SoftMoeBuffers<Elem>& b, const Elem* x,
                                const Elem* d_slots_in, Elem* dx, cudaStream_t stream);
// From b.d_combine and b.d_dispatch: dscale (1) +=, dx (T, H) +=, dphi (H, n) += (fp32).
template <class Elem>
void soft_moe_route_backward(cublasHandle_t handle, SoftMoeBuffers<Elem>& b, const Elem* x,
                             const Elem* phi, const float* scale, Elem* dx, float* dphi,
                             float* dscale, cudaStream_t stream);

}  // namespace moe::cuda
