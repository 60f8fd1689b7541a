// defines: add_train_command — `moe-bench train`: trains the small byte-level transformer LM with
// one router's MoE FFN (or a dense baseline) on the Debian corpus, on the CPU, logging JSON lines
// and drawing progress on stderr (a bar on a terminal, periodic plain lines otherwise).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fmt/format.h>
#include <memory>

#include "io/files.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/options.hpp"
#include "moe-bench/train_options.hpp"
#include "moe/check.hpp"
#include "moe/data.hpp"
#include "moe/model/train.hpp"

namespace moe_bench {

namespace {

struct TrainCommand {
  TrainSetup setup;
  std::string router = "softmax_topk";
  std::string checkpoint, resume, jsonl;
};

void run(const CLI::App& app, TrainCommand& o) {
  apply_device_defaults(app, o.setup);
  apply_router(o.setup.cfg, o.router);
  o.setup.cfg.validate();
  // Bad paths fail before the corpus is read.
  if (!o.jsonl.empty()) moe::io::check_output_path(o.jsonl);
  if (!o.checkpoint.empty()) moe::io::check_output_path(o.checkpoint);
  if (!o.resume.empty()) moe::io::read_file(o.resume);
  const moe::data::Corpus corpus = load_training_corpus(o.setup.corpus);
  const std::unique_ptr<moe::model::Trainer> made = make_trainer(o.setup.cfg, corpus, o.setup.device);
  moe::model::Trainer& trainer = *made;
  const moe::model::ModelConfig& m = o.setup.cfg.model;
  fmt::print("train: {} | L={} D={} heads={} S={} B={} E={} K={} I={} | {} parameters\n",
             m.description(), m.layers, m.d_model, m.heads, m.seq, o.setup.cfg.batch,
             m.layer_config(1).experts, m.layer_config(1).top_k, m.layer_config(1).inter,
             trainer.model().parameter_count());
  fmt::print("corpus: {} ({} domains, {:.1f} MB train, {:.2f} MB validation)\n", corpus.origin,
             corpus.domains.size(), corpus.train_bytes() / 1e6, corpus.val_bytes() / 1e6);
  fmt::print("device: {} ({})\n", trainer.model().device(), trainer.model().dtype());
  std::fflush(stdout);

  ProgressDisplay progress(m.name(), o.setup.cfg.steps);
  moe::model::RunOptions ro;
  ro.command = "train";
  ro.checkpoint = o.checkpoint;
  ro.resume = o.resume;
  ro.jsonl = o.jsonl;
  ro.on_step = [&](const moe::model::Trainer& t, const moe::model::StepRecord& s) {
    progress.step(t, s);
  };
  ro.on_eval = [&](const moe::model::Trainer& t, const moe::model::EvalRecord& e) {
    progress.eval(t, e);
  };
  const moe::model::RunSummary sum = moe::model::run_training(trainer, ro);
  progress.finish();
  print_summary(m, sum);
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainCommand>();
  CLI::App* sub = app.add_subcommand(
      "train", "train the byte-level transformer LM with one router (or a dense baseline), on the CPU or the GPU");
  sub->add_option("--router", o->router,
                  "router of every FFN, or a dense baseline: dense_active (I = K*I, the MoE's "
                  "active FLOPs) or dense_params (I = E*I, its total parameters)")
      ->capture_default_str()
      ->group("Router");
  add_train_options(*sub, o->setup);
  const std::string files = "Files";
  sub->add_option("--checkpoint", o->checkpoint,
                  "write a checkpoint here after every evaluation (atomically)")
      ->group(files);
  sub->add_option("--resume", o->resume, "continue from this checkpoint (same configuration)")
      ->group(files);
  sub->add_option("--jsonl", o->jsonl, "append one JSON line per step, evaluation and run")
      ->group(files);
  sub->footer(
      "Soft MoE and expert choice route each position's B tokens (one per sequence) as a group, "
      "so no token sees its own future.\nExample: moe-bench train --router soft_moe --steps 200 "
      "--jsonl train.jsonl");
  sub->callback([o, sub] { run(*sub, *o); });
}

}  // namespace moe_bench
