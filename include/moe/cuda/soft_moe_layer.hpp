// defines: moe::cuda::SoftMoeWeights, SoftMoeGrads, SoftMoeLayer, transpose_row_blocks
// Soft MoE over G groups of B tokens on the GPU in bf16: what the CPU language model runs as one
// call of moe::layer_forward / layer_backward per position, tokens = B (the B batch rows at that
// position, src/model/transformer.cpp, "groups across the batch"; G = the sequence length), here
// in one set of launches per stage (S below is slots per expert, not the sequence length):
//   route     norms, logits L = scale x_hat phi_hat (G*B, n), dispatch D = softmax of L over the
//             B tokens of a group (per slot), combine C = softmax over the n = E*S slots (per
//             token)                                        (soft_moe.hpp, SoftMoeBuffers(cfg, G))
//   dispatch  slots_in[:, g, :] = D[g]^T x[g]           (n, G, H)   cuBLAS strided-batched
//   experts   expert e on its S*G contiguous rows [e S G, (e+1) S G) of slots_in -> slots_out
//             (the experts stage of experts.hpp: E uniform segments)
//   combine   y[g] = C[g] slots_out[:, g, :]            (G, B, H)   cuBLAS strided-batched
// and the backward of each (combine, experts, dispatch, route), all on one stream, with no host
// synchronisation and no allocation after the constructor (the experts backends it accepts
// never wait for the host either). Router math is fp32 (norms, logits, softmax statistics, dC,
// dD, dL, d phi, d scale); storage is bf16 (x, y, dx, the weights, D, C, slots and the experts'
// activations); every GEMM accumulates in fp32.
//
// The gradient is that of <dy, y> summed over the groups, which is what Transformer::ffn_backward
// forms: soft MoE has no auxiliary loss, so the 1/G scaling it applies to layers with one (and
// the G*dy it hands them) is not applied (were it on, for soft_moe it would multiply and divide
// by the same G: the identity up to float rounding).
//
// Weights, as the CPU's Params<float> of a soft_moe layer (moe/layer.hpp) on the device:
//   phi     router.w_gate     (H, n)     bf16   column j = e*S + s is slot s of expert e
//   scale   router.slot_scale (1)        fp32   the learnable softmax scale (master copy)
//   w_up    experts.w_up      (E, H, A)  bf16   A = 2I (SwiGLU) or I (GELU); SwiGLU columns in the
//                                               layer's GateUpLayout: split = the CPU's
//                                               [gate 0..I-1 | up 0..I-1], as uploaded
//   w_down  experts.w_down    (E, I, H)  bf16
// Gradients (fp32 ones accumulated, like the CPU's parameter gradients summed over the groups: the
// caller zeroes them once per step; the expert weights' may be written fresh instead):
//   dx      (G*B, H) bf16 overwritten, group-major like x
//   dphi    (H, n)   fp32 +=           dscale (1) fp32 +=
//   dw_up   (E, H, A) fp32 += or =  (same GateUpLayout as w_up)   dw_down (E, I, H) fp32 += or =
// x, y and dy are (G*B, H) bf16, group-major: rows [g B, (g+1) B) are group g. The language
// model's (batch, position) rows (b G + s) become group s, row b: row s B + b
// (transpose_row_blocks below does both directions: x and dy with (P, Q) = (B, G), y and dx with
// (P, Q) = (G, B)).
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/experts.hpp"
#include "moe/cuda/soft_moe.hpp"
#include "moe/stats.hpp"

namespace moe::cuda {

struct SoftMoeWeights {
  const bf16* phi = nullptr;     // (H, n) router.w_gate
  const float* scale = nullptr;  // (1) router.slot_scale, fp32
  const bf16* w_up = nullptr;    // (E, H, A) experts.w_up in the layer's GateUpLayout
  const bf16* w_down = nullptr;  // (E, I, H) experts.w_down
};

struct SoftMoeGrads {
  bf16* dx = nullptr;        // (G*B, H) overwritten
  float* dphi = nullptr;     // (H, n) accumulated
  float* dscale = nullptr;   // (1) accumulated
  float* dw_up = nullptr;    // (E, H, A) accumulated
  float* dw_down = nullptr;  // (E, I, H) accumulated
  // false: dw_up and dw_down are written instead of added to (never read), for a step whose only
  // contribution this is (the experts stage's ExpertsBackwardArgs::accumulate); the router's
  // gradients are always accumulated.
  bool accumulate_experts = true;
};

class SoftMoeLayer {
 public:
  // cfg: router soft_moe, cfg.tokens = B tokens per group (>= 1), no shared experts; groups = G
  // in [1, 65535]. Backends: those that never wait for the device (cublas_strided_padded, the
  // default: E strided-batched GEMMs of S*G rows each, no alignment needs; grouped and
  // grouped_fused: H and I multiples of 8, grouped_fused with gate_up = interleaved for SwiGLU).
  // Validated here (ConfigError naming the field).
  // cublas: a handle to share with the experts stage and the model (not owned), or null for one
  // of the layer's own (a handle holds 64 MiB of device memory on an H100).
  SoftMoeLayer(const LayerConfig& cfg, int64_t groups,
               ExpertsBackend backend = ExpertsBackend::cublas_strided_padded,
               GateUpLayout gate_up = GateUpLayout::split, bool backward = true,
               cublasHandle_t cublas = nullptr);
  ~SoftMoeLayer();
  SoftMoeLayer(const SoftMoeLayer&) = delete;
  SoftMoeLayer& operator=(const SoftMoeLayer&) = delete;

  // x (G*B, H) group-major; y (G*B, H) overwritten. x must stay unchanged until the backward.
  void forward(const bf16* x, const SoftMoeWeights& w, bf16* y, cudaStream_t stream);
  // After forward() with the same x and w; dy (G*B, H). Leaves the forward's activations intact
  // (a second backward of the same forward gives the same gradients).
  void backward(const bf16* x, const SoftMoeWeights& w, const bf16* dy, const SoftMoeGrads& g,
                cudaStream_t stream);

  // Load statistics of the last forward, as Transformer::layer_stats reports a soft_moe layer
  // run in G groups (fill_balance applied):
  //   tokens_per_expert[e] = sum over all G*B tokens of the combine mass of expert e's slots
  //   router_entropy       = mean over all tokens of -sum_e q log q, q[t, e] that mass
  //   mean_entropy         = mean over the groups of the entropy of the group's mean q
  //   drop_rate = tokens_without_expert = 0
  // Computed from the fp32 logits (the combine softmax again in fp32, not the bf16 weights).
  // Enqueues two small kernels on the last forward's stream, synchronises it and reads back E + 2
  // doubles. Valid until the next forward.
  LoadStats stats() const;
  // q (G*B, E) fp32 on the device: the combine mass of each expert per token, group-major rows
  // (row g B + b: batch row b at position g). What Transformer::add_routing_counts adds to the
  // domain of each token's row. Enqueues one kernel on `stream` (no synchronisation); valid
  // until the next forward or stats()/expert_mass() call.
  const float* expert_mass(cudaStream_t stream) const;

  const LayerConfig& config() const { return cfg_; }
  int64_t groups() const { return groups_; }
  // The last forward's route on the device (logits, dispatch, combine; see soft_moe.hpp).
  const SoftMoeBuffers<bf16>& route() const { return route_; }
  // Slot rows of the experts stage, (n, G, H) / (n, G, A) / (n, G, I): row j * G + g.
  const bf16* slots_in() const { return slots_in_; }
  const bf16* slots_out() const { return slots_out_; }
  // Device bytes held: route buffers, activation arena, experts workspace.
  size_t bytes() const;
  std::string report() const;

 private:
  LayerConfig cfg_;
  int64_t groups_ = 1;
  bool backward_ = true;
  bool has_forward_ = false;
  cudaStream_t stream_ = nullptr;  // the last forward's stream (stats)
  cublasHandle_t cublas_ = nullptr;
  bool own_cublas_ = false;
  SoftMoeBuffers<bf16> route_;
  std::unique_ptr<ExpertsWorkspace> experts_;
  // activation arena; R = n * G slot rows
  int32_t* offsets_ = nullptr;   // (E+1) e * S * G: the experts' uniform segments
  bf16* slots_in_ = nullptr;     // (R, H)
  bf16* pre_ = nullptr;          // (R, A)
  bf16* act_ = nullptr;          // (R, I)
  bf16* slots_out_ = nullptr;    // (R, H)
  bf16* d_slots_out_ = nullptr;  // (R, H) backward
  bf16* d_slots_in_ = nullptr;   // (R, H) backward
  float* mass_ = nullptr;        // (G*B, E) combine mass per expert (stats)
  float* entropy_ = nullptr;     // (G*B) -sum_e q log q per token (stats)
  double* group_mass_ = nullptr; // (G, E) q summed over each group's tokens (stats)
  double* stats_out_ = nullptr;  // (E + 2) tokens per expert, router entropy, mean entropy
  DeviceArena arena_;
};

// out (Q, P, H) = in (P, Q, H) with the (P, Q) row blocks swapped: out row q P + p = in row
// p Q + q. For the language model (batch B, sequence length G): its (B, G, H) rows to the
// layer's (G, B, H) groups with (P, Q) = (B, G), and the layer's y / dx back with (P, Q) = (G, B).
// in != out.
void transpose_row_blocks(const bf16* in, bf16* out, int64_t P, int64_t Q, int64_t H,
                          cudaStream_t stream);

}  // namespace moe::cuda
