// defines: moe::cuda::StatsBuffers, load_stats, update_expert_bias
// The LoadStats of one routing step (token choice, or expert choice in G position groups),
// reduced on the device from the route's scores and the plan (the same quantities as the CPU
// layer's, src/cpu/layer.cpp add_step_stats; for G groups those of the CPU model's G calls, each
// of one group, combined as moe::model::Transformer::layer_stats does):
//   tokens_per_expert  plan.counts (choices per expert before drops)
//   drop_rate          (capacity drops + policy skips) / N, from plan.drops
//   router_entropy     mean over tokens of -sum_e q log q, q = probs row / its sum
//   mean_entropy       entropy of mean_t q (G groups: of each group's mean, averaged over groups;
//                      token t = b*G + g is in group g)
//   tokens_without_expert  fraction of tokens none of whose choices got a row (expert choice: a
//                      token no expert picked)
// Kernels: a block per chunk of tokens writes one row of partial sums in double (column sums of q
// in token order, the chunk's entropy and token-without-row count); one block adds the rows in
// chunk order. Only E + 2 integers and 3 doubles come back to the host. With G > 1 groups the
// partial kernel also keeps each token's row sum, and a block per group makes its mean entropy.
// update_expert_bias is sigmoid_bias's sign rule on plan.counts, on the device (no host sync).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/cuda/arena.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/stats.hpp"

namespace moe::cuda {

struct StatsBuffers {
  int64_t tokens = 0, experts = 0, chunks = 0, groups = 1;
  double* partial = nullptr;  // (chunks, E + 2) per chunk: sum_t q_te (E), sum_t h_t,
                              //                  tokens without a kept row
  double* row_sum = nullptr;  // (T) groups > 1: sum_e p_te of each token
  double* group_h = nullptr;  // (G) groups > 1: entropy of each group's mean q
  double* result = nullptr;   // (3) router_entropy, mean_entropy, tokens_without_expert
  DeviceArena arena;

  StatsBuffers() = default;
  // groups must divide tokens (token t = b*G + g in group g).
  StatsBuffers(int64_t tokens, int64_t experts, int64_t groups = 1);
  static constexpr int64_t kChunk = 128;  // tokens per partial row
};

// probs (T, E) fp32 scores of the step (softmax, sigmoid, or noisy_topk's softmax of the noisy
// logits); plan built from that step's routing. Enqueues the reductions on `stream`, then
// synchronises it and returns the statistics, fill_balance applied.
LoadStats load_stats(const float* probs, const PlanView& plan, StatsBuffers& buf,
                     cudaStream_t stream);

// bias[e] += rate * sign(T*K/E - counts[e]) for every expert (the CPU's update_expert_bias, in
// fp32 like its float instantiation). Asynchronous on `stream`.
void update_expert_bias(const PlanView& plan, int64_t top_k, double rate, float* bias,
                        cudaStream_t stream);

}  // namespace moe::cuda
