// defines: moe::cuda::chain_step_config, ChainLayer
// chain_of_experts on the GPU as C token-choice Layer calls, the CPU layer's recurrence step for
// step (src/cpu/layer.cpp):
//   u_0 = x,  u_{c+1} = u_c + MoE_c(u_c),  y = sum_c MoE_c(u_c)  (= u_C - x)
// MoE_c is a moe::cuda::Layer whose router is iteration c's (w_gate slice c of (C, H, E)) over the
// shared expert pool (w_up, w_down), with K/C choices per token. The CPU routes every iteration
// like softmax_topk without renormalisation (weights are the softmax probabilities of the picked
// experts), with chain_of_experts' own aux and z coefficients and the sequence-wise balance groups
// of the config; chain_step_config spells that out, so the Layer needs no chain-specific code.
//
// Precision: u_c and the sum y are kept in fp32 (the CPU adds in float); each iteration reads u_c
// rounded to bf16, which is also what its backward reads (kept, (C-1, T, H) bf16).
// Backward walks the iterations in reverse: with a = dL/du_{c+1} (fp32, zero for the last),
// iteration c gets the upstream dy + a (bf16) and returns d_in = dL/du_c through MoE_c; then
// a += d_in, and dx = a after iteration 0. The Layers accumulate dw_up and dw_down (so the shared
// pool's gradient is the sum over iterations) and each its own slice of dw_gate.
// No host synchronisation in forward or backward; aux_loss() is the sum of the iterations' losses
// on the device, in iteration order.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/layer.hpp"
#include "moe/stats.hpp"

namespace moe::cuda {

// The token-choice configuration one chain_of_experts iteration runs with: softmax_topk over E,
// K/iterations choices, renormalize off, every second choice kept, the chain's resolved aux and z
// coefficients, everything else (layout, capacity factor, sequence length, ...) as in `chain`.
// The padded capacity is then ceil(cf * T * (K/iterations) / E), as the CPU's.
LayerConfig chain_step_config(const LayerConfig& chain);

// The chain's LoadStats from its iterations' (each with its number of choices N): the CPU layer's
// accumulation (src/cpu/layer.cpp add_step_stats), fill_balance applied.
LoadStats chain_stats(const std::vector<LoadStats>& steps, const std::vector<int64_t>& choices);

class ChainLayer {
 public:
  // cfg.router must be chain_of_experts (ConfigError otherwise, or for what Layer refuses).
  // cublas: shared by every iteration's Layer (see Layer); null: one handle of the chain's own.
  explicit ChainLayer(const LayerConfig& cfg, ExpertsBackend backend = ExpertsBackend::grouped,
                      GateUpLayout gate_up = GateUpLayout::split, bool backward = true,
                      cublasHandle_t cublas = nullptr);
  ~ChainLayer();
  ChainLayer(const ChainLayer&) = delete;
  ChainLayer& operator=(const ChainLayer&) = delete;

  // w.w_gate (C, H, E); w_up, w_down as Layer's. y (T, H) overwritten.
  void forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream);
  // After forward() with the same x and w. g.dx (T, H) overwritten; g.dw_gate (C, H, E), dw_up,
  // dw_down accumulated (zero them first), or with g.accumulate_experts = false dw_up and dw_down
  // written by the last iteration's backward (the first to run) and added to by the others.
  void backward(const bf16* x, const LayerWeights& w, const bf16* dy, const LayerGrads& g,
                cudaStream_t stream);

  // Iteration c runs with seed + c (the CPU's noise seed of step c); softmax routing draws nothing,
  // so this only keeps the convention.
  void set_seed(uint64_t seed);
  // The CPU's LayerForward::stats of a chain: counts summed over iterations, drop rate over all
  // iterations' choices, entropies and tokens without an expert averaged over iterations
  // (fill_balance applied). Synchronises the last forward's stream.
  LoadStats stats() const;
  const double* aux_loss() const { return aux_loss_; }  // device, after forward
  int64_t iterations() const { return int64_t(steps_.size()); }
  const Layer& step(int64_t c) const { return *steps_[size_t(c)]; }
  // u_c (T, H) bf16, the input iteration c in [1, C) ran on in the last forward (tests: the CPU
  // layer on the same bits isolates each iteration from the roundings of the ones before).
  const bf16* input(int64_t c) const { return inputs_ + size_t(c - 1) * cfg_.tokens * cfg_.hidden; }
  const LayerConfig& config() const { return cfg_; }
  size_t bytes() const;

 private:
  LayerWeights step_weights(const LayerWeights& w, int64_t c) const;

  LayerConfig cfg_;
  bool backward_;
  cublasHandle_t own_cublas_ = nullptr;  // when none was given: shared by the steps, destroyed last
  std::vector<std::unique_ptr<Layer>> steps_;
  bf16* inputs_ = nullptr;    // (C-1, T, H) u_1 .. u_{C-1}
  bf16* out_ = nullptr;       // (T, H) MoE_c(u_c); in the backward d_in of the iteration
  float* u_ = nullptr;        // (T, H) u_{c+1} in fp32; in the backward a = dL/du
  float* y_ = nullptr;        // (T, H) running sum of the iterations' outputs
  bf16* upstream_ = nullptr;  // (T, H) dy + a, the next (lower) iteration's upstream
  double* aux_loss_ = nullptr;  // (1)
  DeviceArena arena_;
};

}  // namespace moe::cuda
