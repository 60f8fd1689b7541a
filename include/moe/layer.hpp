// defines: Params, StageTimes, LayerForward, init_params, layer_forward, layer_backward,
//          update_expert_bias, parameter_list
// The MoE FFN layer on the CPU: the executable specification every GPU stage is tested against.
//   x[T,H] --gate--> logits[T,E] --route--> Routing --plan--> DispatchPlan
//          --permute--> xp[M,H] --experts--> yp[M,H] --combine--> y[T,H]   (+ shared experts)
// The layer returns y = MoE(x) only; the caller adds the residual. The scalar aux loss is part of
// the objective: backward computes the gradient of  <dy, y> + aux_loss.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/plan.hpp"
#include "moe/stats.hpp"

namespace moe {

template <class Real>
struct Params {
  std::vector<Real> w_gate;      // (G, H, E) router weights, G = iterations for chain_of_experts
                                 // else 1; soft_moe: (H, E*S) slot parameters Phi
  std::vector<Real> w_noise;     // (H, E) noisy_topk noise projection; empty otherwise
  std::vector<Real> slot_scale;  // (1) soft_moe learnable softmax scale; empty otherwise
  std::vector<Real> w_up;        // (E, H, A) expert first layer, A = I (GELU) or 2I ([gate|up])
  std::vector<Real> w_down;      // (E, I, H) expert second layer
  std::vector<Real> shared_up;   // (S, H, A) shared experts (always active)
  std::vector<Real> shared_down; // (S, I, H)
  // Selection bias of sigmoid_bias (E): a buffer, not a parameter (no gradient, sign-rule update).
  std::vector<Real> expert_bias;
};

// (name, tensor) in a fixed order, for export, optimisers and gradient checks.
template <class Real>
std::vector<std::pair<std::string, std::vector<Real>*>> parameter_list(Params<Real>& p);

// Stage wall times in milliseconds (CPU, one call).
struct StageTimes {
  std::map<std::string, double> ms;
  void add(const std::string& stage, double v) { ms[stage] += v; }
};

// One token-choice or expert-choice routing step with everything backward needs.
template <class Real>
struct RouteStep {
  std::vector<Real> router_input;  // (T, H) input the gate saw (jittered for switch_top1)
  std::vector<Real> jitter;        // (T, H) multiplicative jitter factors, empty when none
  std::vector<Real> logits;        // (T, E) clean logits
  std::vector<Real> noise_raw;     // (T, E) x W_noise (noisy_topk)
  std::vector<Real> noisy;         // (T, E) noisy logits H (noisy_topk)
  std::vector<Real> probs;         // (T, E) softmax or sigmoid scores
  std::vector<int32_t> selected;   // (T, K) experts picked by top-k, before any policy skip
  std::vector<int32_t> threshold_expert;  // (T, E) noisy_topk load loss: expert whose noisy
                                          // logit is the threshold of (t, e); -1 when none
  Routing<Real> routing;
  DispatchPlan plan;
  // experts stage
  std::vector<Real> xp;            // (M, H) permuted input
  std::vector<Real> pre;           // (M, A) expert pre-activation
  std::vector<Real> act;           // (M, I) expert activation
  std::vector<Real> yp;            // (M, H) expert output rows
  std::vector<Real> input;         // (T, H) input of this step (chain_of_experts iterations)
  double aux_loss = 0;             // this step's auxiliary losses (already weighted)
};

template <class Real>
struct SoftStep {
  std::vector<Real> x_norm;        // (T, H) L2-normalised tokens
  std::vector<Real> x_inv_norm;    // (T) 1/sqrt(|x|^2 + 1e-6)
  std::vector<Real> phi_norm;      // (H, n) normalised slot parameters, n = E*S
  std::vector<Real> phi_inv_norm;  // (n)
  std::vector<Real> logits;        // (T, n) scale * x_norm phi_norm
  std::vector<Real> dispatch;      // (T, n) softmax over tokens (columns)
  std::vector<Real> combine;       // (T, n) softmax over slots (rows)
  std::vector<Real> slots_in;      // (n, H) = dispatch^T x
  std::vector<Real> pre, act;      // (n, A), (n, I)
  std::vector<Real> slots_out;     // (n, H)
};

template <class Real>
struct LayerForward {
  std::vector<Real> y;               // (T, H)
  double aux_loss = 0;               // total auxiliary loss (z-loss + balance losses)
  LoadStats stats;
  StageTimes times;
  std::vector<RouteStep<Real>> steps;  // one per routing step (chain_of_experts: iterations)
  SoftStep<Real> soft;                 // soft_moe only
  std::vector<Real> shared_pre, shared_act;  // (S, T, A), (S, T, I)
};

// Paper initialisation (zeros for W_noise, scale 1 for soft MoE, ...), seeded.
template <class Real>
Params<Real> init_params(const LayerConfig& cfg, uint64_t seed);
// Every tensor random (W_noise too): what gradient checks and parity tests want.
template <class Real>
Params<Real> random_params(const LayerConfig& cfg, uint64_t seed);

template <class Real>
void layer_forward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,  // x (T, H)
                   LayerForward<Real>& out);

// Gradient of <dy, y> + aux_loss. dx (T, H) is overwritten; grads is resized and overwritten.
template <class Real>
void layer_backward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                    const LayerForward<Real>& fwd, const Real* dy, Real* dx, Params<Real>& grads,
                    StageTimes* times = nullptr);

// sigmoid_bias in training mode: b_e += u * sign(mean load - load_e), from the forward's counts.
// Call after the step, so a batch never routes with a bias computed from its own tokens.
template <class Real>
void update_expert_bias(const LayerConfig& cfg, const LayerForward<Real>& fwd, Params<Real>& p);

}  // namespace moe
