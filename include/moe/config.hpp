// defines: Router, Layout, Activation, SecondPolicy, LayerConfig (+ validate, parse/name helpers)
// One struct holds every knob of the MoE layer. It is validated once, at construction of anything
// that uses it; every message names the field and the allowed range.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

enum class Router {
  softmax_topk,      // GShard / Mixtral / OLMoE / Qwen: softmax over E, top-k
  noisy_topk,        // Shazeer 2017: noisy logits, softmax over the kept k
  switch_top1,       // Switch Transformer: top-1, capacity, jitter, z-loss
  expert_choice,     // Zhou 2022: each expert takes its top-C tokens
  soft_moe,          // Puigcerver 2023: dense dispatch/combine over slots
  sigmoid_bias,      // DeepSeek-V3: sigmoid scores, selection bias, no aux loss
  chain_of_experts,  // Wang 2025: C sequential token-choice iterations, one router each
};
enum class Layout { padded, dropless, block };
enum class Activation { gelu, swiglu };
// GShard's policy for the second choice (softmax_topk with k = 2 only).
enum class SecondPolicy { all, random, threshold, none };

inline constexpr Router kAllRouters[] = {Router::softmax_topk, Router::noisy_topk,
                                         Router::switch_top1,  Router::expert_choice,
                                         Router::soft_moe,     Router::sigmoid_bias,
                                         Router::chain_of_experts};
inline constexpr Layout kAllLayouts[] = {Layout::padded, Layout::dropless, Layout::block};

std::string_view name(Router r);
std::string_view name(Layout l);
std::string_view name(Activation a);
std::string_view name(SecondPolicy p);
// Throw ConfigError naming `field` and the allowed values when `text` is unknown.
Router parse_router(std::string_view text, std::string_view field = "router");
Layout parse_layout(std::string_view text, std::string_view field = "layout");
Activation parse_activation(std::string_view text, std::string_view field = "activation");
SecondPolicy parse_second_policy(std::string_view text, std::string_view field = "second-policy");

// True for routers whose rows go through the plan/permute/combine path.
bool is_sparse(Router r);
// True for routers that pick k experts per token (everything sparse except expert choice).
bool is_token_choice(Router r);

struct LayerConfig {
  // ---- shapes
  int64_t tokens = 4096;        // T
  int64_t hidden = 512;         // H
  int64_t inter = 1024;         // I, hidden units of one expert
  int64_t experts = 16;         // E
  int64_t top_k = 2;            // K (chain_of_experts: total over all iterations)
  int64_t shared_experts = 0;   // always-active experts, same shape as a routed one
  Activation activation = Activation::swiglu;

  // ---- router
  Router router = Router::softmax_topk;
  bool training = true;         // noise, jitter, random second choice and bias updates only when true
  uint64_t seed = 0;            // counter-based RNG for noise / jitter / random policy

  // ---- layout
  Layout layout = Layout::dropless;
  double capacity_factor = 1.25;  // padded: C = ceil(cf*T*K/E); expert_choice: C = ceil(cf*T/E)
  int64_t block_size = 128;       // block layout: segments rounded up to a multiple of this

  // ---- router-specific options (defaults are the papers'; see README "Routers")
  bool renormalize = true;                      // softmax_topk: weights / sum of the kept k
  SecondPolicy second_policy = SecondPolicy::all;
  double second_threshold = 0.2;                // GShard: keep e2 w.p. min(1, g2/thr), or if g2 > thr
  double aux_coef = -1;         // load-balance coefficient; < 0 means the router's default
  double z_coef = -1;           // router z-loss coefficient; < 0 means the router's default
  double importance_coef = 0.1; // noisy_topk: w_importance * CV^2(Importance)
  double load_coef = 0.1;       // noisy_topk: w_load * CV^2(Load)
  double noise_epsilon = 1e-2;  // noisy_topk: sigma = softplus(x W_noise) + epsilon
  double jitter = 1e-2;         // switch_top1: router input *= U[1-eps, 1+eps]
  int64_t slots_per_expert = 1; // soft_moe: S slots per expert
  double route_scale = 1.0;     // sigmoid_bias: weights * scale (DeepSeek-V3 uses 2.5)
  double bias_update_rate = 1e-3;  // sigmoid_bias: b_e += u * sign(mean load - load_e)
  int64_t iterations = 2;       // chain_of_experts: C iterations of K/C experts each
  int64_t sequence_length = 0;  // sequence-wise aux loss groups (0: all T tokens are one group)

  void validate() const;        // throws ConfigError naming the field
  // Capacity per expert for the padded layout and for expert choice (rows per expert).
  int64_t capacity() const;
  // Experts each token picks in one routing step (K, or K/iterations for chain_of_experts).
  int64_t choices_per_step() const;
  // Defaults resolved: the coefficient the router really uses.
  double resolved_aux_coef() const;
  double resolved_z_coef() const;
  // Columns of one expert's first weight: I for GELU, 2I for SwiGLU ([gate | up]).
  int64_t up_width() const { return activation == Activation::swiglu ? 2 * inter : inter; }
  // Human-readable one-line summary, also stored in exported metadata.
  std::string summary() const;
};

}  // namespace moe
