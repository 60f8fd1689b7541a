// defines: add_compare_models_command — `moe-bench compare`: the main job. Trains the small LM once
// per router plus the two dense baselines on the same corpus, configuration and seed, one after
// the other, then times them in interleaved rounds (the speed column), and writes all their JSON
// lines to one file for scripts/plot_compare.py (validation curves, load over training, quality
// vs speed). The layer-level comparison of the routers is `moe-bench compare-layer`.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fmt/format.h>
#include <memory>
#include <sstream>

#include "io/files.hpp"
#include "io/jsonl.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/train_options.hpp"
#include "moe/check.hpp"
#include "moe/model/train.hpp"

namespace moe_bench {

namespace {

struct CompareModelsOptions {
  TrainSetup setup;
  std::string routers =
      "softmax_topk,noisy_topk,switch,expert_choice,soft_moe,sigmoid_bias,chain_of_experts,"
      "dense_active,dense_params";
  std::string out = "out/compare";
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  MOE_CHECK(!out.empty(), "routers: the list is empty");
  return out;
}

// Expert choice and soft MoE at the same active compute per token as top-K: expert choice takes
// C = K*T/E tokens per expert, soft MoE gets K*T slots for the T tokens of a group. Switch is
// top-1 by definition (half the expert compute of top-2). Returns a footnote on what was set.
std::string matched_compute(moe::model::TrainConfig& cfg) {
  moe::LayerConfig& f = cfg.model.ffn;
  if (cfg.model.ffn_kind != moe::model::FfnKind::moe) return "";
  if (f.router == moe::Router::expert_choice) {
    f.capacity_factor = double(f.top_k);
    return fmt::format("capacity factor {}: {} experts per token on average, like top-{}",
                       f.capacity_factor, f.top_k, f.top_k);
  }
  if (f.router == moe::Router::soft_moe) {
    f.slots_per_expert = std::max<int64_t>(1, f.top_k * cfg.batch / f.experts);
    return fmt::format("{} slots per expert: {} slots for the {} tokens of a group, like top-{}",
                       f.slots_per_expert, f.slots_per_expert * f.experts, cfg.batch, f.top_k);
  }
  if (f.router == moe::Router::switch_top1) return "top-1 (one expert per token)";
  return "";
}

struct Row {
  std::string name, description, note;
  moe::model::RunSummary sum;
  double cv = 0, max_violation = 0, drop_rate = 0;  // mean over the last tenth of the steps
  // Interleaved timing (see time_interleaved): medians over all timed steps.
  double step_ms = 0, attention_ms = 0, moe_ms = 0, other_ms = 0, tokens_per_s = 0;
};

double median(std::vector<double> v) {
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  return v[mid];
}

// The speed column. Training the models one after the other takes minutes, and a machine shared
// with other work slows some of them more than others. So after training, every trained model
// runs `steps_per_round` more steps in each of `rounds` rounds, the models taking turns, and its
// speed is the median of those steps: a slow spell then hits all models alike. (The extra steps
// change the weights after the final evaluation only.)
void time_interleaved(std::vector<std::unique_ptr<moe::model::Trainer>>& trainers,
                      std::vector<Row>& rows, int rounds, int steps_per_round) {
  std::vector<std::vector<double>> step(rows.size()), att(rows.size()), moe(rows.size()),
      other(rows.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t i = 0; i < trainers.size(); ++i)
      for (int k = 0; k < steps_per_round; ++k) {
        const moe::model::StepRecord s = trainers[i]->train_step();
        step[i].push_back(s.step_ms);
        att[i].push_back(s.attention_ms);
        moe[i].push_back(s.moe_ms);
        other[i].push_back(s.other_ms);
      }
  for (size_t i = 0; i < rows.size(); ++i) {
    const moe::model::TrainConfig& c = trainers[i]->config();
    rows[i].step_ms = median(step[i]);
    rows[i].attention_ms = median(att[i]);
    rows[i].moe_ms = median(moe[i]);
    rows[i].other_ms = median(other[i]);
    rows[i].tokens_per_s = double(c.batch * c.model.seq) / (rows[i].step_ms / 1000.0);
  }
}

void run(const CLI::App& app, CompareModelsOptions& o) {
  apply_device_defaults(app, o.setup);
  o.setup.cfg.validate();
  // The GPU model runs the token-choice routers (include/moe/cuda/lm/model.hpp).
  if (o.setup.device == "gpu" && app.get_option("--routers")->count() == 0)
    o.routers = "softmax_topk,noisy_topk,switch,sigmoid_bias,dense_active,dense_params";
  const std::vector<std::string> names = split_list(o.routers);
  std::vector<moe::model::TrainConfig> configs;
  std::vector<std::string> notes;
  for (const std::string& name : names) {
    moe::model::TrainConfig cfg = o.setup.cfg;
    apply_router(cfg, name);
    notes.push_back(matched_compute(cfg));
    cfg.validate();  // every model's configuration is checked before the first one trains
    configs.push_back(cfg);
  }
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  MOE_CHECK(!ec, o.out, ": cannot create the output folder: ", ec.message());
  const std::string jsonl = (std::filesystem::path(o.out) / "compare.jsonl").string();
  const std::string partial = jsonl + ".partial";
  moe::io::check_output_path(jsonl);
  std::filesystem::remove(partial, ec);

  const moe::data::Corpus corpus = load_training_corpus(o.setup.corpus);
  const moe::model::ModelConfig& m = o.setup.cfg.model;
  fmt::print("compare: {} models | L={} D={} heads={} S={} B={} E={} K={} I={} | {} steps, "
             "lr {}, seed {}\n",
             configs.size(), m.layers, m.d_model, m.heads, m.seq, o.setup.cfg.batch,
             m.ffn.experts, m.ffn.top_k, m.ffn.inter, o.setup.cfg.steps, o.setup.cfg.lr,
             o.setup.cfg.seed);
  fmt::print("corpus: {} ({} domains, {:.1f} MB train, {:.2f} MB validation)\n\n", corpus.origin,
             corpus.domains.size(), corpus.train_bytes() / 1e6, corpus.val_bytes() / 1e6);
  std::fflush(stdout);

  const auto start = std::chrono::steady_clock::now();
  std::vector<Row> rows;
  std::vector<std::unique_ptr<moe::model::Trainer>> trainers;
  for (size_t i = 0; i < configs.size(); ++i) {
    trainers.push_back(make_trainer(configs[i], corpus, o.setup.device));
    moe::model::Trainer& trainer = *trainers.back();
    Row row;
    row.name = configs[i].model.name();
    row.description = configs[i].model.description();
    row.note = notes[i];
    ProgressDisplay progress(row.name, configs[i].steps, /*step_lines=*/false);
    const int64_t tail_from = configs[i].steps - std::max<int64_t>(1, configs[i].steps / 10);
    int64_t tail = 0;
    moe::model::RunOptions ro;
    ro.command = "compare";
    ro.jsonl = partial;
    ro.on_step = [&](const moe::model::Trainer& t, const moe::model::StepRecord& s) {
      progress.step(t, s);
      if (s.step > tail_from) {
        row.cv += s.cv;
        row.max_violation += s.max_violation;
        row.drop_rate += s.drop_rate;
        ++tail;
      }
    };
    ro.on_eval = [&](const moe::model::Trainer& t, const moe::model::EvalRecord& e) {
      progress.eval(t, e);
    };
    row.sum = moe::model::run_training(trainer, ro);
    progress.finish();
    if (tail > 0) {
      row.cv /= double(tail);
      row.max_violation /= double(tail);
      row.drop_rate /= double(tail);
    }
    fmt::print("{:<17} val {:.4f} bits/byte, {:.0f} tokens/s ({:.1f} s)\n", row.name,
               row.sum.final_eval.bpb, row.sum.tokens_per_s, row.sum.train_seconds);
    std::fflush(stdout);
    rows.push_back(std::move(row));
  }
  constexpr int kRounds = 5, kStepsPerRound = 4;
  fmt::print("timing: {} rounds of {} steps per model, models taking turns\n", kRounds,
             kStepsPerRound);
  std::fflush(stdout);
  time_interleaved(trainers, rows, kRounds, kStepsPerRound);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    nlohmann::ordered_json rec = moe::io::result_record("compare");
    rec["kind"] = "timing";
    rec["run"] = r.name;
    rec["router"] = r.description;
    rec["device"] = trainers[i]->model().device();
    rec["dtype"] = trainers[i]->model().dtype();
    rec["rounds"] = kRounds;
    rec["steps_per_round"] = kStepsPerRound;
    rec["tokens_per_s"] = r.tokens_per_s;
    rec["time_ms"] = {{"median_step", r.step_ms}, {"attention", r.attention_ms}, {"moe", r.moe_ms},
                      {"other", r.other_ms}};
    moe::io::append_jsonl(partial, rec);
  }
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::filesystem::rename(partial, jsonl, ec);
  MOE_CHECK(!ec, jsonl, ": cannot move the results into place: ", ec.message());

  fmt::print("\n{:<17} {:>8} {:>9} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>8} {:>7}\n", "model",
             "val bpb", "tokens/s", "attn ms", "moe ms", "othr ms", "CV", "MaxVio", "drop",
             "I(D;E)/H", "params");
  for (const Row& r : rows) {
    const moe::model::EvalRecord& e = r.sum.final_eval;
    double mi = 0;
    for (double v : e.mi_normalized) mi += v / double(e.mi_normalized.size());
    fmt::print("{:<17} {:>8.4f} {:>9.0f} {:>7.1f} {:>7.1f} {:>7.1f} {:>6.3f} {:>7.3f} {:>6.3f} {:>8} "
               "{:>7}\n",
               r.name, e.bpb, r.tokens_per_s, r.attention_ms, r.moe_ms, r.other_ms, r.cv,
               r.max_violation, r.drop_rate,
               e.experts > 1 ? fmt::format("{:.3f}", mi) : std::string("-"), r.sum.parameters);
  }
  fmt::print("\ndevice: {} ({})\n", trainers[0]->model().device(), trainers[0]->model().dtype());
  fmt::print("val bpb: validation bits per byte after the last step (every domain weighs the "
             "same); tokens/s and ms: median training step (forward, backward, AdamW) of the interleaved timing rounds; CV, MaxVio, drop: training load over the last tenth of the steps, mean over "
             "layers; I(D;E)/H: how much the expert choice tells about the text's domain "
             "(validation routing, mean over layers).\n");
  for (const Row& r : rows) {
    std::string detail = r.description.size() > r.name.size() + 2
                             ? r.description.substr(r.name.size() + 2, r.description.size() - r.name.size() - 3)
                             : "";
    if (!r.note.empty()) detail += (detail.empty() ? "" : "; ") + r.note;
    if (!detail.empty()) fmt::print("{}: {}\n", r.name, detail);
  }
  fmt::print("\n{} models in {:.0f} s; results: {}\nplots: .venv/bin/python "
             "scripts/plot_compare.py {} {}\n",
             rows.size(), total_s, jsonl, jsonl, o.out);
}

}  // namespace

void add_compare_models_command(CLI::App& app) {
  auto o = std::make_shared<CompareModelsOptions>();
  CLI::App* sub = app.add_subcommand(
      "compare",
      "train the small LM once per router and for two dense baselines, on the CPU or the GPU, "
      "one table (the main job)");
  sub->add_option("--routers", o->routers,
                  "comma-separated routers to train (dense_active and dense_params are the "
                  "dense baselines)")
      ->capture_default_str()
      ->group("Router");
  add_train_options(*sub, o->setup);
  sub->add_option("--out", o->out, "folder for compare.jsonl (created when missing)")
      ->capture_default_str()
      ->group("Files");
  sub->footer(
      "Every model uses the same options; switch runs top-1, expert_choice gets capacity factor "
      "K and soft_moe K*B/E slots per expert, so each matches top-K's active compute.\n"
      "Plots: .venv/bin/python scripts/plot_compare.py out/compare/compare.jsonl out/compare");
  sub->callback([o, sub] { run(*sub, *o); });
}

}  // namespace moe_bench
