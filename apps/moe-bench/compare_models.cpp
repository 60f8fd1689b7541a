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
#ifdef MOE_HAVE_CUDA
#include "moe/cuda/lm/model.hpp"
#endif

namespace moe_bench {

namespace {

struct CompareModelsOptions {
  TrainSetup setup;
  std::string routers =
      "softmax_topk,noisy_topk,switch,expert_choice,soft_moe,sigmoid_bias,chain_of_experts,"
      "dense_active,dense_params";
  std::string out = "out/compare";
  std::string seeds;  // "0,1,2": every model once per seed (empty: --seed alone)
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
  uint64_t seed = 0;
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
  // Both devices run every router (include/moe/cuda/lm/model.hpp), so one default list serves
  // both: one model per router, then the two dense baselines.
  const std::vector<std::string> names = split_list(o.routers);
  std::vector<uint64_t> seeds;
  if (o.seeds.empty()) {
    seeds.push_back(o.setup.cfg.seed);
  } else {
    for (const std::string& text : split_list(o.seeds)) {
      size_t used = 0;
      unsigned long long v = 0;
      try {
        v = std::stoull(text, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      MOE_CHECK(used == text.size() && text[0] != '-', "seeds: '", text,
                "' is not a non-negative integer");
      MOE_CHECK(std::find(seeds.begin(), seeds.end(), uint64_t(v)) == seeds.end(), "seeds: ", v,
                " is listed twice");
      seeds.push_back(uint64_t(v));
    }
  }
  MOE_CHECK(o.seeds.empty() || app.get_option("--seed")->count() == 0,
            "--seeds replaces --seed: give one of them");
  std::vector<moe::model::TrainConfig> configs;
  std::vector<std::string> notes;
  for (const std::string& name : names) {
    moe::model::TrainConfig cfg = o.setup.cfg;
    apply_router(cfg, name);
    notes.push_back(matched_compute(cfg));
    cfg.validate();  // every model's configuration is checked before the first one trains
#ifdef MOE_HAVE_CUDA
    if (o.setup.device == "gpu") moe::cuda::lm::check_gpu_model(cfg.model);
#endif
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
  std::string seed_list;
  for (uint64_t sd : seeds) seed_list += (seed_list.empty() ? "" : ",") + std::to_string(sd);
  fmt::print("compare: {} models | L={} D={} heads={} S={} B={} E={} K={} I={} | {} steps, "
             "lr {}, seed{} {}\n",
             configs.size(), m.layers, m.d_model, m.heads, m.seq, o.setup.cfg.batch,
             m.ffn.experts, m.ffn.top_k, m.ffn.inter, o.setup.cfg.steps, o.setup.cfg.lr,
             seeds.size() > 1 ? "s" : "", seed_list);
  fmt::print("corpus: {} ({} domains, {:.1f} MB train, {:.2f} MB validation)\n\n", corpus.origin,
             corpus.domains.size(), corpus.train_bytes() / 1e6, corpus.val_bytes() / 1e6);
  std::fflush(stdout);

  const auto start = std::chrono::steady_clock::now();
  std::vector<Row> all_rows;  // every (seed, model), seed-major
  std::string device, dtype;
  // One seed at a time: its models train one after the other, then take turns in the timing
  // rounds, then are freed (a GPU holds one seed's models at once).
  for (const uint64_t seed : seeds) {
    if (seeds.size() > 1) fmt::print("seed {}\n", seed);
    std::vector<Row> rows;
    std::vector<std::unique_ptr<moe::model::Trainer>> trainers;
    for (size_t i = 0; i < configs.size(); ++i) {
      moe::model::TrainConfig cfg = configs[i];
      cfg.seed = seed;
      trainers.push_back(make_trainer(cfg, corpus, o.setup.device));
      moe::model::Trainer& trainer = *trainers.back();
      Row row;
      row.seed = seed;
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
      rec["seed"] = r.seed;
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
    device = trainers[0]->model().device();
    dtype = trainers[0]->model().dtype();
    for (Row& r : rows) all_rows.push_back(std::move(r));
  }  // seeds
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::filesystem::rename(partial, jsonl, ec);
  MOE_CHECK(!ec, jsonl, ": cannot move the results into place: ", ec.message());

  // One line per model: means over the seeds (and the spread of the final bits per byte).
  const size_t models = configs.size(), n_seeds = seeds.size();
  const bool many = n_seeds > 1;
  fmt::print("\n{:<17} {:>8} {:>15} {:>9} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>8} {:>10}\n",
             "model", "val bpb", many ? "min..max" : "", "tokens/s", "attn ms", "moe ms", "othr ms",
             "CV", "MaxVio", "drop", "I(D;E)/H", "params");
  for (size_t i = 0; i < models; ++i) {
    double bpb = 0, lo = 1e300, hi = -1e300, tps = 0, att = 0, moe_ms = 0, other = 0, cv = 0,
           maxvio = 0, drop = 0, mi = 0;
    int64_t experts = 1, params = 0;
    for (size_t k = 0; k < n_seeds; ++k) {
      const Row& r = all_rows[k * models + i];
      const moe::model::EvalRecord& e = r.sum.final_eval;
      const double w = 1.0 / double(n_seeds);
      bpb += w * e.bpb;
      lo = std::min(lo, e.bpb);
      hi = std::max(hi, e.bpb);
      tps += w * r.tokens_per_s;
      att += w * r.attention_ms;
      moe_ms += w * r.moe_ms;
      other += w * r.other_ms;
      cv += w * r.cv;
      maxvio += w * r.max_violation;
      drop += w * r.drop_rate;
      for (double v : e.mi_normalized) mi += w * v / double(e.mi_normalized.size());
      experts = e.experts;
      params = r.sum.parameters;
    }
    fmt::print("{:<17} {:>8.4f} {:>15} {:>9.0f} {:>7.1f} {:>7.1f} {:>7.1f} {:>6.3f} {:>7.3f} "
               "{:>6.3f} {:>8} {:>10}\n",
               all_rows[i].name, bpb, many ? fmt::format("{:.4f}..{:.4f}", lo, hi) : "", tps,
               att, moe_ms, other, cv, maxvio, drop,
               experts > 1 ? fmt::format("{:.3f}", mi) : std::string("-"), params);
  }
  fmt::print("\ndevice: {} ({})\n", device, dtype);
  fmt::print("val bpb: validation bits per byte after the last step (every domain weighs the "
             "same){}; tokens/s and ms: median training step (forward, backward, AdamW) of the "
             "interleaved timing rounds; CV, MaxVio, drop: training load over the last tenth of "
             "the steps, mean over layers; I(D;E)/H: how much the expert choice tells about the "
             "text's domain (validation routing, mean over layers){}.\n",
             many ? fmt::format(", mean and range over seeds {}", seed_list) : "",
             many ? "; every column a mean over the seeds" : "");
  for (size_t i = 0; i < models; ++i) {
    const Row& r = all_rows[i];
    std::string detail = r.description.size() > r.name.size() + 2
                             ? r.description.substr(r.name.size() + 2, r.description.size() - r.name.size() - 3)
                             : "";
    if (!r.note.empty()) detail += (detail.empty() ? "" : "; ") + r.note;
    if (!detail.empty()) fmt::print("{}: {}\n", r.name, detail);
  }
  fmt::print("\n{} runs in {:.0f} s; results: {}\nplots: .venv/bin/python "
             "scripts/plot_compare.py {} {}\n",
             all_rows.size(), total_s, jsonl, jsonl, o.out);
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
  sub->add_option("--seeds", o->seeds,
                  "comma-separated seeds: every model once per seed, the table shows means "
                  "(replaces --seed)")
      ->group("Training");
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
