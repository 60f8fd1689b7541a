// defines: moe::cuda::RouteBuffers, route_forward, route_backward
// route: logits[T,E] (fp32, from the gate) -> Routing, on the device, with the CPU reference's
// rules (src/cpu/route.cpp): top-k by (score desc, expert asc); softmax routers select on the
// logits, noisy_topk on the noisy logits (counter-based noise: the same draws as the CPU),
// sigmoid_bias on sigmoid + bias; expert choice takes each expert's top-C tokens by
// (prob desc, token asc).
//
// Kernels: one fused kernel per router family (a warp per token: softmax or sigmoid, noise or
// bias, top-k, weight normalisation, the per-token terms of the auxiliary losses), then the
// auxiliary losses as deterministic reductions (per-chunk partial sums over tokens, then one block
// that adds the chunks in a fixed order, in double). Expert choice: the softmax kernel, then a
// stable segmented sort of each expert's column (CUB), then the first C of each segment.
// The aux loss stays on the device (aux_loss, a double); nothing is read back.
// Backward: d_weight (N) -> dz (T,E) (and dr (T,E), the gradient of x W_noise, for noisy_topk),
// with the aux-loss and z-loss gradients added; the gate stage turns dz into dx and dW.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/routing.hpp"

namespace moe::cuda {

// Everything route forward writes and route backward reads, for one LayerConfig, in one arena.
struct RouteBuffers {
  int64_t tokens = 0, experts = 0, top_k = 0;  // top_k = K per step; 0 for expert choice
  int64_t chunk = 0, chunks = 0, groups = 0;   // token chunks of the loss sums; balance groups
  RoutingBuffers routing;      // (N) choices
  float* probs = nullptr;      // (T, E) softmax / sigmoid scores (noisy_topk: softmax of noisy)
  float* lse = nullptr;        // (T) logsumexp of the clean logits (z-loss)
  int32_t* selected = nullptr; // (T, K) experts picked by top-k, before any policy skip
  float* noisy = nullptr;      // (T, E) noisy_topk: noisy logits H
  int32_t* threshold = nullptr;// (T, E) noisy_topk: the expert whose noisy logit is the threshold
  float* term = nullptr;       // (T, E) per-token term the balance/load loss sums over tokens:
                               //        sigmoid_bias q = s / sum(s); noisy_topk Phi((c-thr)/sigma)
  double* partial = nullptr;   // (chunks, 3E + 1) per-chunk sums: counts, mass, importance, lse^2
  float* group_counts = nullptr;  // (groups, E) top-k counts per balance group
  float* d_expert = nullptr;   // (2, E) noisy_topk: d aux / d importance_e, d aux / d load_e
  double* aux_loss = nullptr;  // (1) this step's auxiliary loss (z-loss + balance or Shazeer's)
  double* expert_sums = nullptr;  // (2, E) noisy_topk: importance and load per expert
  // expert choice
  float* probs_t = nullptr;    // (E, T) probabilities, expert-major (sort keys)
  float* sorted_p = nullptr;   // (E, T)
  int32_t* token_ids = nullptr;// (E, T) 0..T-1 per expert (sort values)
  int32_t* sorted_t = nullptr; // (E, T)
  int32_t* seg = nullptr;      // (E + 1) segment offsets e * T
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  DeviceArena arena;

  RouteBuffers() = default;
  explicit RouteBuffers(const LayerConfig& cfg);  // cfg validated by the caller
};

// logits (T, E) fp32; noise_raw (T, E) = x W_noise for noisy_topk (else null); expert_bias (E)
// for sigmoid_bias (null = zeros). `step` is the chain_of_experts iteration (noise seed + step).
void route_forward(const LayerConfig& cfg, int64_t step, const float* logits,
                   const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                   cudaStream_t stream);

// d_weight (N) -> dz (T, E) overwritten; dr (T, E) overwritten for noisy_topk (else unused).
// Matches cpu::route_backward before its gate GEMMs.
void route_backward(const LayerConfig& cfg, int64_t step, const RouteBuffers& fwd,
                    const float* logits, const float* noise_raw, const float* d_weight,
                    float* dz, float* dr, cudaStream_t stream);

}  // namespace moe::cuda
