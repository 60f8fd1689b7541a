// defines: moe::model — TrainConfig, learning_rate, AdamW, StepRecord, EvalRecord, Trainer,
//          mutual_information, config_json, RunOptions, RunSummary, run_training
// Training of the small LM on the CPU: AdamW (decoupled weight decay on matrices), linear warm-up
// then cosine decay to min_lr_fraction * lr, global-norm gradient clipping, fixed seeds.
// Everything random is a counter-based function of (seed, step), so the state of a run is its
// weights, the AdamW moments, the step and the router buffers; a checkpoint holds exactly these and
// a resumed run continues bit for bit like an uninterrupted one.
//
// Checkpoint file (written atomically: temporary file + rename):
//   "MOECKPT1" | u64 header bytes | header JSON (configuration, step, data position, tensor
//   names and sizes) | float32 tensors (weights and buffers in tensor_list order, then the AdamW
//   moments m, v of each trainable tensor) | md5 of everything before, 32 hex digits.
// A file that is truncated, altered, not a checkpoint, or written for another configuration is
// refused with a one-line ConfigError.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/data.hpp"
#include "moe/model/transformer.hpp"

namespace moe::model {

struct TrainConfig {
  ModelConfig model;
  int64_t batch = 16;             // B sequences per step
  int64_t steps = 200;            // total optimiser steps
  double lr = 3e-3;               // peak learning rate
  double min_lr_fraction = 0.1;   // cosine decays to lr * this
  int64_t warmup = 20;            // linear warm-up steps
  double weight_decay = 0.1;      // AdamW, on matrices only
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double grad_clip = 1.0;         // global L2 norm; <= 0: off
  int64_t eval_every = 50;        // evaluate every n steps (and at the start and the end); 0: end only
  int64_t val_windows = 16;       // validation windows per domain
  uint64_t seed = 0;              // parameters, data order, router noise

  void validate() const;  // throws ConfigError naming the field
};

// Learning rate of step `step` (0-based): lr*(step+1)/warmup during warm-up, then cosine.
double learning_rate(const TrainConfig& cfg, int64_t step);

// Decoupled AdamW with bias correction over the trainable tensors of tensor_list().
struct AdamW {
  std::vector<std::vector<float>> m, v;  // per trainable tensor, tensor_list order
  int64_t t = 0;                         // updates done
  void init(const std::vector<TensorRef>& params);
  void update(const std::vector<TensorRef>& params, const std::vector<TensorRef>& grads,
              double lr, const TrainConfig& cfg);
};

// The model a Trainer drives: the CPU Transformer of transformer.hpp (make_cpu_model) or the GPU
// one (moe::cuda::lm, CUDA builds). The Trainer owns the schedule, the data and the records; the
// model owns its weights, gradients and AdamW state wherever they live.
class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual std::string device() const = 0;  // where it runs: the CPU's or the GPU's name
  virtual std::string dtype() const = 0;   // "float32", or the GPU's mixed precision
  // Mean cross-entropy of the batch in nats per byte (see Transformer::forward).
  virtual double forward(const data::Batch& batch, bool training, uint64_t noise_seed) = 0;
  virtual void backward() = 0;
  // Global-norm clipping to cfg.grad_clip, one AdamW update at `lr` of every trainable tensor, then
  // the router buffers' update (sigmoid_bias) from the last forward. Returns the gradient's L2 norm
  // before clipping.
  virtual double optimizer_step(double lr, const TrainConfig& cfg) = 0;
  virtual double aux_loss() = 0;                       // sum over layers, last forward
  virtual const std::vector<float>& token_losses() = 0;  // (B*S) nats, last forward
  virtual std::vector<LoadStats> layer_stats() = 0;      // per layer, last forward
  // See Transformer::add_routing_counts.
  virtual void add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                                  std::vector<std::vector<double>>& counts) = 0;
  virtual StepTimes times() = 0;  // of the last forward + backward
  virtual int64_t parameter_count() = 0;
  // The training state on the host, for checkpoints: weights and buffers (tensor_list order) and
  // the AdamW moments. A GPU model copies its state down on each call; whoever writes into them
  // calls state_written() afterwards (a GPU model copies them up).
  virtual Weights& weights() = 0;
  virtual AdamW& optimizer() = 0;
  virtual void state_written() {}
};

// The CPU Transformer with the AdamW of this file, as a LanguageModel.
std::unique_ptr<LanguageModel> make_cpu_model(const ModelConfig& cfg, uint64_t seed);

// One training step's measurements (load statistics averaged over layers).
struct StepRecord {
  int64_t step = 0;          // steps done after this one
  double loss = 0;           // mean cross-entropy, nats per byte
  double aux_loss = 0;       // auxiliary losses, summed over layers
  double lr = 0, grad_norm = 0;
  double step_ms = 0;        // whole step: batch, forward, backward, clipping, optimiser
  double tokens_per_s = 0;
  double attention_ms = 0, moe_ms = 0, other_ms = 0;
  double cv = 0, max_violation = 0, drop_rate = 0, router_entropy = 0, mean_entropy = 0;
};

struct EvalRecord {
  int64_t step = 0;
  double bpb = 0;                          // over all scored bytes: every domain has the same
                                           // number of windows, so each domain weighs equally
  std::vector<std::string> domains;
  std::vector<double> domain_bpb;          // per domain
  std::vector<double> domain_bytes;        // validation bytes scored per domain
  int64_t experts = 0;                     // E of the FFN (1 for the dense baselines)
  std::vector<std::vector<double>> counts; // per layer: (domains, E) routed choices (soft: mass)
  std::vector<double> mi_bits;             // per layer: I(D;E) in bits
  std::vector<double> mi_normalized;       // per layer: I(D;E) / H(E) (0 when H(E) = 0)
  std::vector<double> max_violation;       // per layer: MaxVio over the validation set
  double eval_ms = 0;
};

// I(D;E) in bits from counts (domains x experts, row-major); h_experts receives H(E) in bits.
double mutual_information(const std::vector<double>& counts, int64_t domains, int64_t experts,
                          double* h_experts);

class Trainer {
 public:
  // Validates cfg, initialises the model from cfg.seed and cuts the validation batches. The corpus
  // is referenced, not copied: it must outlive the trainer. Without a model: the CPU Transformer.
  Trainer(const TrainConfig& cfg, const data::Corpus& corpus);
  Trainer(const TrainConfig& cfg, const data::Corpus& corpus, std::unique_ptr<LanguageModel> model);

  const TrainConfig& config() const { return cfg_; }
  LanguageModel& model() { return *model_; }
  const LanguageModel& model() const { return *model_; }
  AdamW& optimizer() { return model_->optimizer(); }
  int64_t step() const { return step_; }  // steps done
  bool done() const { return step_ >= cfg_.steps; }

  StepRecord train_step();
  EvalRecord evaluate();

  void save_checkpoint(const std::string& path);
  void load_checkpoint(const std::string& path);

 private:
  TrainConfig cfg_;
  const data::Corpus& corpus_;
  std::unique_ptr<LanguageModel> model_;
  int64_t step_ = 0;
  std::vector<data::Batch> val_;
};

// Configuration as JSON: what results record and what a checkpoint must match.
nlohmann::ordered_json config_json(const TrainConfig& cfg);

// The training loop with its outputs: an evaluation at the start (unless resuming), after every
// eval_every steps and at the end; a checkpoint after each evaluation; JSON lines per step,
// evaluation and at the end. Callbacks let the caller draw progress.
struct RunOptions {
  std::string command;     // recorded in every JSON line
  std::string checkpoint;  // write here after each evaluation (empty: never)
  std::string resume;      // start from this checkpoint (empty: from scratch)
  std::string jsonl;       // append JSON lines here (empty: none)
  std::function<void(const Trainer&, const StepRecord&)> on_step;
  std::function<void(const Trainer&, const EvalRecord&)> on_eval;
};

struct RunSummary {
  EvalRecord final_eval;
  int64_t steps = 0;             // steps run in this invocation
  double train_seconds = 0;      // wall time of those steps
  // Speed from the median step (robust to a busy machine's stray slow steps): B*S / median step
  // time, and the median of each part of the step.
  double step_ms = 0, tokens_per_s = 0;
  double attention_ms = 0, moe_ms = 0, other_ms = 0;
  double mean_tokens_per_s = 0;  // steps * B * S / train_seconds
  double final_loss = 0;
  int64_t parameters = 0;
};

RunSummary run_training(Trainer& trainer, const RunOptions& options);

}  // namespace moe::model
