// defines: TrainSetup, add_train_options, apply_router, load_training_corpus, ProgressDisplay,
//          print_summary — what `train` and the model comparison share
#pragma once
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "moe/data.hpp"
#include "moe/model/train.hpp"

namespace moe_bench {

// The training configuration and the corpus folder, with the CPU default small model.
struct TrainSetup {
  moe::model::TrainConfig cfg = default_train_config();
  std::string corpus = "data/corpus";
  // "cpu" (the reference), "gpu" (moe::cuda::lm, CUDA builds), or "auto" (gpu when there is one)
  std::string device = "auto";
  static moe::model::TrainConfig default_train_config();
  // The GPU default: 6 blocks of width 512, 16 experts, 512-byte context (see the .cpp).
  static moe::model::TrainConfig default_gpu_config();
};

// Resolves --device auto; then, on the GPU, every model and training option left unset on the
// command line takes the GPU default's value. Call at the start of the command's callback.
void apply_device_defaults(const CLI::App& app, TrainSetup& setup);

// A trainer on setup.device; ConfigError when the device cannot run the configuration (or this
// build has no CUDA).
std::unique_ptr<moe::model::Trainer> make_trainer(const moe::model::TrainConfig& cfg,
                                                  const moe::data::Corpus& corpus,
                                                  const std::string& device);

// Model, schedule and corpus options, plus the MoE layer options that make sense inside a model
// (everything of add_layer_options except --tokens, --hidden, --eval and --sequence-length, which
// the model sets: T = B*S or B, H = d_model, training/eval by phase, sequences of length S).
void add_train_options(CLI::App& app, TrainSetup& setup);

// --router: one of moe's routers, or dense_active / dense_params (E = 1, K = 1 FFN sized after
// the configured MoE). switch runs with K = 1.
void apply_router(moe::model::TrainConfig& cfg, const std::string& router);

// The corpus from `dir`, checked against its md5 sums (ConfigError with the rebuild command).
moe::data::Corpus load_training_corpus(const std::string& dir);

// Progress on stderr: a redrawn bar with loss and tokens/s when stderr is a terminal, plain lines
// every tenth of the run otherwise (unless `step_lines` is false). Evaluations always get a line.
class ProgressDisplay {
 public:
  ProgressDisplay(std::string label, int64_t steps, bool step_lines = true);
  void step(const moe::model::Trainer& t, const moe::model::StepRecord& s);
  void eval(const moe::model::Trainer& t, const moe::model::EvalRecord& e);
  void finish();

 private:
  std::string label_;
  int64_t steps_;
  bool tty_;
  bool step_lines_;
  bool bar_drawn_ = false;
  double last_val_ = -1;
  double tokens_per_s_ = 0;  // smoothed
  std::chrono::steady_clock::time_point start_;
  void clear_bar();
};

void print_summary(const moe::model::ModelConfig& m, const moe::model::RunSummary& sum);

}  // namespace moe_bench
