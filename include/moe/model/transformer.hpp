// defines: moe::model — FfnKind, ModelConfig, BlockWeights, Weights, TensorRef, tensor_list,
//          StepTimes, Transformer
// The small decoder-only language model of `moe-bench train` on the CPU:
//   tokens (B,S) -> byte embedding (tied to the output) + learned positions
//   -> L pre-norm blocks:  r += proj(attention(LN1(r)));  r += FFN(LN2(r))
//   -> final LayerNorm -> logits (B,S,V) -> cross-entropy (nats per byte)
// The FFN is the MoE layer of include/moe/layer.hpp (moe::layer_forward / layer_backward, float),
// or a dense FFN: the same layer with E = 1, K = 1 (softmax_topk, no auxiliary loss), sized either
// like the MoE's active FLOPs per token (dense_active: I = K*I) or its total expert parameters
// (dense_params: I = E*I).
//
// Routing groups. Token-choice routers see all B*S tokens of a batch in one call. Soft MoE and
// expert choice mix or rank the tokens of their call, which across positions of one sequence would
// let a token see its future. They are made causal the Mixture-of-Tokens way: the layer is called
// once per position s with the B tokens at that position (one from each sequence) as its T, so a
// routing group never holds two positions of one sequence. Results name this:
// "soft_moe (groups across the batch at each position)".
//
// The objective is  mean cross-entropy + sum over layers of the layer's auxiliary loss (for grouped
// routers: the mean over the S calls of a layer).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/data.hpp"
#include "moe/layer.hpp"
#include "moe/stats.hpp"

namespace moe::model {

enum class FfnKind { moe, dense_active, dense_params };

struct ModelConfig {
  int64_t vocab = data::kVocab;  // V
  int64_t layers = 2;            // L
  int64_t d_model = 64;          // D
  int64_t heads = 4;             // NH, head size D/NH
  int64_t seq = 64;              // S, context length (rows of the position table)
  FfnKind ffn_kind = FfnKind::moe;
  // The MoE layer as the user set it up (router, E, K, I, layout, ...). `hidden` and `tokens`
  // are filled in per call from d_model and the batch.
  LayerConfig ffn;

  void validate() const;  // throws ConfigError naming the field
  // The layer configuration of one FFN call with `tokens` tokens: hidden = D, the dense baselines
  // turned into E = 1, K = 1, sequence-wise balance groups for the routers that use them.
  LayerConfig layer_config(int64_t tokens) const;
  // Soft MoE and expert choice: one layer call per position over the batch (see the file header).
  bool groups_across_batch() const;
  // Short name: the router's ("softmax_topk", "soft_moe", ...) or "dense_active" / "dense_params".
  std::string name() const;
  // Name with the routing-group adaptation spelled out where there is one.
  std::string description() const;
};

struct BlockWeights {
  std::vector<float> ln1_w, ln1_b;  // (D)
  std::vector<float> qkv_w;         // (D, 3D)  [q | k | v]
  std::vector<float> qkv_b;         // (3D)
  std::vector<float> proj_w;        // (D, D)
  std::vector<float> proj_b;        // (D)
  std::vector<float> ln2_w, ln2_b;  // (D)
  Params<float> ffn;                // the MoE (or dense) FFN; see include/moe/layer.hpp
};

struct Weights {
  std::vector<float> wte;           // (V, D) byte embedding, also the output head
  std::vector<float> wpe;           // (S, D) learned positions
  std::vector<BlockWeights> blocks; // (L)
  std::vector<float> lnf_w, lnf_b;  // (D)
};

// One named tensor of Weights, in a fixed order (checkpoints, optimiser, gradient checks).
struct TensorRef {
  std::string name;           // "wte", "block0.qkv_w", "block1.ffn.experts.w_up", ...
  std::vector<float>* value;
  bool decay;                 // AdamW weight decay applies (matrices, not biases or gains)
  bool trainable;             // false for buffers (sigmoid_bias's expert_bias)
};
std::vector<TensorRef> tensor_list(Weights& w);

// Wall time of the last forward + backward by part, in milliseconds.
struct StepTimes {
  double attention_ms = 0;  // qkv projection, attention, output projection
  double moe_ms = 0;        // FFN layer calls (and regrouping by position)
  double total_ms = 0;      // the whole forward + backward
  double other_ms() const { return total_ms - attention_ms - moe_ms; }
};

class Transformer {
 public:
  Transformer(const ModelConfig& cfg, uint64_t seed);

  const ModelConfig& config() const { return cfg_; }
  Weights& weights() { return w_; }
  const Weights& weights() const { return w_; }
  Weights& grads() { return g_; }

  // Runs the batch (B rows of length seq) and returns the mean cross-entropy in nats per byte.
  // `training` switches router noise, jitter and random choices on; `noise_seed` seeds them (the
  // trainer derives it from the run's seed and the step).
  double forward(const data::Batch& batch, bool training, uint64_t noise_seed);
  // Gradients of the last forward's objective into grads() (zeroed first).
  void backward();
  // sigmoid_bias: the selection-bias update from the last (training) forward's loads.
  void update_router_buffers();

  double aux_loss() const { return aux_loss_; }              // sum over layers, last forward
  const std::vector<float>& token_losses() const { return losses_; }  // (B*S) nats
  // Load statistics of each layer in the last forward (grouped routers: over all S calls).
  std::vector<LoadStats> layer_stats() const;
  // Adds the last forward's routing decisions per (domain of the row, expert) to counts[l]
  // (num_domains * E, row-major): one per routed (token, choice), or the combine mass per expert
  // for soft MoE.
  void add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                          std::vector<std::vector<double>>& counts) const;
  const StepTimes& times() const { return times_; }
  int64_t parameter_count();  // trainable parameters (buffers not counted)

 private:
  struct BlockActivations {
    std::vector<float> ln1, ln1_mean, ln1_rstd;  // (N, D), (N), (N)
    std::vector<float> qkv;                      // (N, 3D)
    std::vector<float> att;                      // (B, NH, S, S)
    std::vector<float> atty;                     // (N, D) attention output, before proj
    std::vector<float> ln2, ln2_mean, ln2_rstd;  // (N, D), (N), (N)
    std::vector<float> ffn_in;                   // (S, B, D) ln2 by position (grouped routers)
    std::vector<LayerForward<float>> ffn;        // (1) or (S) layer calls
    std::vector<LayerConfig> ffn_cfg;            // the config of each call
    std::vector<float> ffn_out;                  // (N, D)
  };

  ModelConfig cfg_;
  Weights w_, g_;
  // activations of the last forward
  int64_t B_ = 0, S_ = 0;
  std::vector<int32_t> inputs_, targets_;  // (B, S)
  std::vector<float> residual_;            // (L+1, N, D) stream entering each block, and after
  std::vector<float> residual_mid_;        // (L, N, D) stream between attention and FFN
  std::vector<BlockActivations> acts_;
  std::vector<float> lnf_, lnf_mean_, lnf_rstd_;  // (N, D), (N), (N)
  std::vector<float> logits_, probs_;     // (N, V), (N, V)
  std::vector<float> losses_;              // (N)
  // backward scratch, kept between steps so the step loop does not allocate
  std::vector<float> dlogits_, dlosses_, dlnf_, dres_, dmid_, dln_, datty_, dqkv_, datt_;
  std::vector<float> dy_group_, dx_group_;
  Params<float> dffn_group_;
  double aux_loss_ = 0;
  bool trained_forward_ = false;
  StepTimes times_;

  void ffn_forward(int64_t l, bool training, uint64_t noise_seed);
  void ffn_backward(int64_t l, const float* dout, float* dinp);  // dinp (N,D) +=
};

}  // namespace moe::model
