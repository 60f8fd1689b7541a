// defines: moe::cuda::RouteBuffers, route_forward, route_backward
// route: logits[T,E] (fp32, from the gate) -> Routing, on the device, with the CPU reference's
// rules (src/cpu/route.cpp): top-k by (score desc, expert asc); softmax routers select on the
// logits, noisy_topk on the noisy logits (counter-based noise: the same draws as the CPU),
// sigmoid_bias on sigmoid + bias; expert choice takes each expert's top-C tokens by
// (prob desc, token asc).
//
// Kernels: one fused kernel per router family (a warp per token, or for softmax top-k with K <= 8
// and E <= 256 a group of E/8 lanes per token: softmax or sigmoid, noise or bias, top-k, weight
// normalisation, the per-token terms of the auxiliary losses), then the
// auxiliary losses as deterministic reductions (per-chunk partial sums over tokens, then one block
// that adds the chunks in a fixed order, in double). Expert choice: the softmax kernel, then a
// stable segmented sort of each expert's column (CUB), then the first C of each segment.
//
// Expert choice in G groups (the LM's groups across the batch at each position): T = B*G tokens,
// token t = b*G + g in group g, and each group ranks only its own B tokens, as G separate calls of
// B tokens would (cpu::route_forward per group, tokens in b order). Capacity C per group is the
// config's for B tokens (ec_group_capacity). The sort runs over E*G segments of B tokens, segment
// (e, g) = expert e's column over group g, and choice c = (e*G + g)*C + j is the j-th best token of
// group g for expert e, by (prob desc, token asc): expert-major, so that the plan makes one segment
// per expert holding every group's picks, group by group, each group's in the CPU call's order.
// The aux loss stays on the device (aux_loss, a double); nothing is read back.
// Backward: d_weight (N) -> dz (T,E) (and dr (T,E), the gradient of x W_noise, for noisy_topk),
// with the aux-loss and z-loss gradients added; the gate stage turns dz into dx and dW.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/routing.hpp"

#if defined(__CUDACC__)
#define MOE_ROUTE_HD __host__ __device__
#else
#define MOE_ROUTE_HD
#endif

namespace moe::cuda {

// Expert choice in G groups of B = T/G tokens: the index arithmetic of the grouped sort, shared by
// the kernels and the host emulation in the tests.
struct EcGroups {
  int64_t T = 0, G = 1, C = 0;  // tokens, groups, capacity per group
  MOE_ROUTE_HD int64_t group_tokens() const { return T / G; }
  // Where token t's probability for expert e sits in the sort's input: segment e*G + g (g = t % G),
  // entry b = t / G, so that a segment lists its group's tokens in token order (the stable sort
  // then breaks ties toward the lower token, the CPU's rule).
  MOE_ROUTE_HD int64_t sort_index(int64_t t, int64_t e) const {
    return (e * G + t % G) * group_tokens() + t / G;
  }
  // Choice i = (e*G + g)*C + j takes entry j of sorted segment e*G + g.
  MOE_ROUTE_HD int64_t pick_source(int64_t i) const {
    const int64_t segment = i / C, j = i - segment * C;
    return segment * group_tokens() + j;
  }
  MOE_ROUTE_HD int64_t pick_expert(int64_t i) const { return i / C / G; }
};

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
  float* d_balance = nullptr;  // (groups, E) d balance loss / d q_te, the same for every token t
                               //     of a group (computed once, in the forward's loss sums)
  float* d_expert = nullptr;   // (2, E) noisy_topk: d aux / d importance_e, d aux / d load_e
  double* aux_loss = nullptr;  // (1) this step's auxiliary loss (z-loss + balance or Shazeer's)
  double* expert_sums = nullptr;  // (2, E) noisy_topk: importance and load per expert
  uint32_t* done = nullptr;    // (1) blocks of the forward's loss sums finished (0 between calls;
                               //     one route_forward at a time per RouteBuffers); in `counters`
  // expert choice
  int64_t ec_groups = 1;       // G: token t ranks within group t % G
  int64_t ec_capacity = 0;     // C per group (ec_group_capacity); N = E*G*C
  float* probs_t = nullptr;    // (E, G, B) probabilities, expert-major then group (sort keys)
  float* sorted_p = nullptr;   // (E, G, B)
  int32_t* token_ids = nullptr;// (E, G, B) the token t = b*G + g of each entry (sort values)
  int32_t* sorted_t = nullptr; // (E, G, B)
  int32_t* seg = nullptr;      // (E*G + 1) segment offsets i * B
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  DeviceArena arena;
  // The kernels' own synchronisation state, apart from `arena` so that poisoning every output
  // (tests) leaves it alone.
  DeviceArena counters;

  RouteBuffers() = default;
  // cfg validated by the caller; position_groups (G) > 1 only for expert_choice, dividing
  // cfg.tokens.
  explicit RouteBuffers(const LayerConfig& cfg, int64_t position_groups = 1);
};

// Expert choice: the capacity of one group of cfg.tokens / groups tokens, min(B, ceil(cf*B/E)).
int64_t ec_group_capacity(const LayerConfig& cfg, int64_t groups);

// logits (T, E) fp32; noise_raw (T, E) = x W_noise for noisy_topk (else null); expert_bias (E)
// for sigmoid_bias (null = zeros). `step` is the chain_of_experts iteration (noise seed + step).
void route_forward(const LayerConfig& cfg, int64_t step, const float* logits,
                   const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                   cudaStream_t stream);
// route_forward's two halves, for a caller that runs the second beside other work: the choices
// (routing, probs, lse and the other per-token outputs), then the auxiliary losses (the per-chunk
// sums, aux_loss and the sums the backward and stats read), which read the first's outputs and
// write nothing the choices' readers read.
// `kernel`: the softmax routers' top-k runs a group of lanes per token where K <= 8 and E <= 256,
// a warp per token otherwise; warp_per_token forces the second (the tests compare the two).
enum class TopKKernel { automatic, warp_per_token };
void route_choices(const LayerConfig& cfg, int64_t step, const float* logits,
                   const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                   cudaStream_t stream, TopKKernel kernel = TopKKernel::automatic);
void route_aux_losses(const LayerConfig& cfg, int64_t step, const float* logits,
                      const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                      cudaStream_t stream);

// d_weight (N) -> dz (T, E) overwritten; dr (T, E) overwritten for noisy_topk (else unused).
// Matches cpu::route_backward before its gate GEMMs.
void route_backward(const LayerConfig& cfg, int64_t step, const RouteBuffers& fwd,
                    const float* logits, const float* noise_raw, const float* d_weight,
                    float* dz, float* dr, cudaStream_t stream);

}  // namespace moe::cuda
