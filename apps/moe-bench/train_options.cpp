// defines: TrainSetup::default_train_config, add_train_options, apply_router,
//          load_training_corpus, ProgressDisplay, print_summary (see train_options.hpp)
#include "moe-bench/train_options.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fmt/format.h>

#include "moe-bench/options.hpp"
#include "moe/check.hpp"
#ifdef MOE_HAVE_CUDA
#include "moe/cuda/check.cuh"
#include "moe/cuda/lm/model.hpp"
#endif

namespace moe_bench {

moe::model::TrainConfig TrainSetup::default_train_config() {
  // The CPU default small configuration: 600 steps of 32 x 32 bytes take 15-20 s per router on
  // this project's 2-core CPU machine, so `compare` trains all nine models in about 3 minutes.
  // A 32-byte context keeps attention cheap; at this budget the models are still learning byte
  // statistics, where longer contexts do not pay yet.
  moe::model::TrainConfig c;
  c.model.layers = 2;
  c.model.d_model = 64;
  c.model.heads = 4;
  c.model.seq = 32;
  c.model.ffn.experts = 8;
  c.model.ffn.top_k = 2;
  c.model.ffn.inter = 128;
  c.batch = 32;
  c.steps = 600;
  c.lr = 3e-3;
  c.warmup = 30;
  c.eval_every = 100;
  c.val_windows = 16;
  c.seed = 0;
  return c;
}

moe::model::TrainConfig TrainSetup::default_gpu_config() {
  // The GPU scale: 6 blocks, d_model 512, 16 experts (top-2 of SwiGLU experts with
  // I = 1024, so the active FFN is 2 x 1024 wide), 512-byte context, 16 sequences (8192 tokens)
  // per step; 2000 steps (16M tokens) take about 25 s per model on an H100.
  moe::model::TrainConfig c = default_train_config();
  c.model.layers = 6;
  c.model.d_model = 512;
  c.model.heads = 8;
  c.model.seq = 512;
  c.model.ffn.experts = 16;
  c.model.ffn.top_k = 2;
  c.model.ffn.inter = 1024;
  c.batch = 16;
  c.steps = 2000;
  c.lr = 1e-3;
  c.warmup = 100;
  c.eval_every = 200;
  c.val_windows = 16;
  return c;
}

void apply_device_defaults(const CLI::App& app, TrainSetup& s) {
  if (s.device == "auto") {
#ifdef MOE_HAVE_CUDA
    s.device = moe::cuda::has_device() ? "gpu" : "cpu";
#else
    s.device = "cpu";
#endif
  }
  if (s.device != "gpu") return;
  const moe::model::TrainConfig g = TrainSetup::default_gpu_config();
  moe::model::TrainConfig& c = s.cfg;
  auto unset = [&app](const char* flag) {
    const CLI::Option* o = app.get_option_no_throw(flag);
    return o != nullptr && o->count() == 0;
  };
  if (unset("--layers")) c.model.layers = g.model.layers;
  if (unset("--d-model")) c.model.d_model = g.model.d_model;
  if (unset("--heads")) c.model.heads = g.model.heads;
  if (unset("--seq")) c.model.seq = g.model.seq;
  if (unset("--experts")) c.model.ffn.experts = g.model.ffn.experts;
  if (unset("--top-k")) c.model.ffn.top_k = g.model.ffn.top_k;
  if (unset("--inter")) c.model.ffn.inter = g.model.ffn.inter;
  if (unset("--batch")) c.batch = g.batch;
  if (unset("--steps")) c.steps = g.steps;
  if (unset("--lr")) c.lr = g.lr;
  if (unset("--warmup")) c.warmup = g.warmup;
  if (unset("--eval-every")) c.eval_every = g.eval_every;
  if (unset("--val-windows")) c.val_windows = g.val_windows;
}

std::unique_ptr<moe::model::Trainer> make_trainer(const moe::model::TrainConfig& cfg,
                                                  const moe::data::Corpus& corpus,
                                                  const std::string& device) {
  if (device == "cpu") return std::make_unique<moe::model::Trainer>(cfg, corpus);
#ifdef MOE_HAVE_CUDA
  cfg.validate();
  return std::make_unique<moe::model::Trainer>(
      cfg, corpus, moe::cuda::lm::make_gpu_model(cfg.model, cfg.seed, cfg.batch));
#else
  MOE_FAIL("--device gpu: this build has no CUDA (configure with nvcc on the PATH)");
#endif
}

void add_train_options(CLI::App& app, TrainSetup& s) {
  moe::model::TrainConfig& c = s.cfg;
  // The layer's options first, without those the model sets; "--seed" becomes the training seed.
  add_layer_options(app, c.model.ffn, /*with_router=*/false);
  for (const char* flag : {"--tokens", "--hidden", "--eval", "--sequence-length", "--seed"})
    app.remove_option(app.get_option(flag));

  const std::string model = "Model";
  app.add_option("--layers", c.model.layers, "L, transformer blocks")->capture_default_str()->group(model);
  app.add_option("--d-model", c.model.d_model, "D, model width")->capture_default_str()->group(model);
  app.add_option("--heads", c.model.heads, "NH, attention heads (divides D)")
      ->capture_default_str()
      ->group(model);
  app.add_option("--seq", c.model.seq, "S, context length in bytes")->capture_default_str()->group(model);

  const std::string train = "Training";
  app.add_option("--batch", c.batch, "B, sequences per step")->capture_default_str()->group(train);
  app.add_option("--steps", c.steps, "optimiser steps")->capture_default_str()->group(train);
  app.add_option("--lr", c.lr, "peak learning rate (AdamW)")->capture_default_str()->group(train);
  app.add_option("--warmup", c.warmup, "linear warm-up steps, then cosine decay")
      ->capture_default_str()
      ->group(train);
  app.add_option("--min-lr-fraction", c.min_lr_fraction, "the cosine ends at lr times this")
      ->capture_default_str()
      ->group(train);
  app.add_option("--weight-decay", c.weight_decay, "AdamW decoupled weight decay (matrices)")
      ->capture_default_str()
      ->group(train);
  app.add_option("--grad-clip", c.grad_clip, "global gradient-norm clip (<= 0: off)")
      ->capture_default_str()
      ->group(train);
  app.add_option("--eval-every", c.eval_every, "evaluate every n steps (0: only at start and end)")
      ->capture_default_str()
      ->group(train);
  app.add_option("--val-windows", c.val_windows, "validation windows of S bytes per domain")
      ->capture_default_str()
      ->group(train);
  app.add_option("--seed", c.seed, "seed of parameters, data order and router noise")
      ->capture_default_str()
      ->group(train);
  app.add_option("--device", s.device,
                 "cpu: the float32 reference; gpu: bf16 with this project's CUDA kernels (its "
                 "own defaults for every model and training option not given: 6 blocks, "
                 "d-model 512, 16 experts, seq 512, batch 16, 2000 steps, lr 1e-3); auto: gpu "
                 "when this build has CUDA and a GPU is visible, else cpu")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "gpu"}))
      ->group(train);
  app.add_option("--corpus", s.corpus, "corpus folder (built by scripts/build_corpus.sh)")
      ->capture_default_str()
      ->group("Files");
}

void apply_router(moe::model::TrainConfig& cfg, const std::string& router) {
  using moe::model::FfnKind;
  if (router == "dense_active" || router == "dense_params") {
    cfg.model.ffn_kind = router == "dense_active" ? FfnKind::dense_active : FfnKind::dense_params;
    return;
  }
  cfg.model.ffn_kind = FfnKind::moe;
  try {
    cfg.model.ffn.router = moe::parse_router(router, "router");
  } catch (const moe::ConfigError&) {
    std::string allowed;
    for (moe::Router r : moe::kAllRouters) allowed += std::string(moe::name(r)) + ", ";
    MOE_FAIL("router: unknown value '", router, "' (allowed: ", allowed,
             "dense_active, dense_params)");
  }
  if (cfg.model.ffn.router == moe::Router::switch_top1) cfg.model.ffn.top_k = 1;
}

moe::data::Corpus load_training_corpus(const std::string& dir) {
  return moe::data::load_corpus(dir);
}

// ---------------------------------------------------------------------------------------------
// progress

ProgressDisplay::ProgressDisplay(std::string label, int64_t steps, bool step_lines)
    : label_(std::move(label)),
      steps_(steps),
      tty_(::isatty(STDERR_FILENO) == 1),
      step_lines_(step_lines),
      start_(std::chrono::steady_clock::now()) {}

void ProgressDisplay::clear_bar() {
  if (tty_ && bar_drawn_) {
    fmt::print(stderr, "\r\033[K");
    bar_drawn_ = false;
  }
}

void ProgressDisplay::step(const moe::model::Trainer& t, const moe::model::StepRecord& s) {
  tokens_per_s_ = tokens_per_s_ == 0 ? s.tokens_per_s : 0.9 * tokens_per_s_ + 0.1 * s.tokens_per_s;
  const int64_t done = t.step();
  const double bpb = s.loss / std::log(2.0);
  if (tty_) {
    constexpr int kWidth = 24;
    const int filled = steps_ > 0 ? int(kWidth * done / steps_) : kWidth;
    const double left_s = tokens_per_s_ > 0 ? double((steps_ - done) * t.config().batch *
                                                     t.config().model.seq) / tokens_per_s_
                                            : 0;
    fmt::print(stderr, "\r\033[K{} [{}{}] {}/{} loss {:.3f} ({:.3f} bpb){} {:.1f}k tok/s ETA {:.0f}s",
               label_, std::string(filled, '#'), std::string(kWidth - filled, '.'), done, steps_,
               s.loss, bpb, last_val_ >= 0 ? fmt::format(" val {:.3f}", last_val_) : "",
               tokens_per_s_ / 1000, left_s);
    std::fflush(stderr);
    bar_drawn_ = true;
    return;
  }
  const int64_t every = std::max<int64_t>(1, steps_ / 10);
  if (step_lines_ && (done % every == 0 || done == steps_))
    fmt::print(stderr, "{} step {}/{} loss {:.3f} ({:.3f} bpb) {:.1f}k tok/s\n", label_, done,
               steps_, s.loss, bpb, s.tokens_per_s / 1000);
}

void ProgressDisplay::eval(const moe::model::Trainer&, const moe::model::EvalRecord& e) {
  clear_bar();
  last_val_ = e.bpb;
  std::string domains;
  for (size_t d = 0; d < e.domains.size(); ++d)
    domains += fmt::format(" {} {:.3f}", e.domains[d], e.domain_bpb[d]);
  fmt::print(stderr, "{} eval step {}: val {:.3f} bits/byte |{}\n", label_, e.step, e.bpb, domains);
  std::fflush(stderr);
}

void ProgressDisplay::finish() { clear_bar(); }

void print_summary(const moe::model::ModelConfig& m, const moe::model::RunSummary& sum) {
  const moe::model::EvalRecord& e = sum.final_eval;
  fmt::print("{}: val {:.4f} bits/byte at step {}\n", m.description(), e.bpb, e.step);
  for (size_t d = 0; d < e.domains.size(); ++d)
    fmt::print("  {:<9} {:.4f} bits/byte\n", e.domains[d], e.domain_bpb[d]);
  if (sum.steps > 0)
    fmt::print("speed: {:.0f} tokens/s (median step {:.1f} ms: attention {:.1f}, moe {:.1f}, "
               "other {:.1f}); {} steps in {:.1f} s\n",
               sum.tokens_per_s, sum.step_ms, sum.attention_ms, sum.moe_ms, sum.other_ms,
               sum.steps, sum.train_seconds);
  std::string mi;
  double mean = 0;
  for (size_t l = 0; l < e.mi_normalized.size(); ++l) {
    mi += fmt::format(" layer{} {:.3f}", l, e.mi_normalized[l]);
    mean += e.mi_normalized[l] / double(e.mi_normalized.size());
  }
  if (e.experts > 1)
    fmt::print("specialisation I(domain; expert)/H(expert) on validation:{} (mean {:.3f})\n", mi,
               mean);
}

}  // namespace moe_bench
