// defines: add_layer_command — `moe-bench layer`: one forward and one backward of the MoE layer
// on seeded random input, with per-stage times, load statistics and the auxiliary loss.
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <memory>

#include "io/config_io.hpp"
#include "io/jsonl.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/options.hpp"

namespace moe_bench {

namespace {

struct LayerOptions {
  moe::LayerConfig cfg;
  std::string backend = "cpu";
  bool json = false;
};

void run(const LayerOptions& o) {
  LayerCase<float> c;
  c.cfg = o.cfg;
  c.cfg.validate();
  check_case_fits_in_memory(c.cfg, sizeof(float));
  c.params = moe::init_params<float>(c.cfg, c.cfg.seed);
  run_layer_case(c);

  // sigmoid_bias: the sign-rule update after the step (a no-op in eval mode).
  const bool has_bias = !c.params.expert_bias.empty();
  float bias_min = 0, bias_max = 0;
  if (has_bias) {
    moe::update_expert_bias(c.cfg, c.fwd, c.params);
    const auto [lo, hi] = std::minmax_element(c.params.expert_bias.begin(), c.params.expert_bias.end());
    bias_min = *lo;
    bias_max = *hi;
  }

  const moe::LoadStats& s = c.fwd.stats;
  if (o.json) {
    nlohmann::ordered_json j = io::result_record("layer");
    j["backend"] = o.backend;
    j["device"] = io::host_cpu();
    j["dtype"] = "f32";
    j["config"] = io::config_to_json(c.cfg);
    j["forward_ms"] = stage_times_json(c.fwd.times, c.forward_ms);
    j["backward_ms"] = stage_times_json(c.backward_times, c.backward_ms);
    j["aux_loss"] = c.fwd.aux_loss;
    j["stats"] = io::stats_to_json(s);
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);  // ru_maxrss in KiB on Linux
    j["memory_mib"] = {{"estimate", estimate_case_bytes(c.cfg, sizeof(float)) / (1024.0 * 1024.0)},
                       {"max_rss", static_cast<double>(usage.ru_maxrss) / 1024.0}};
    if (has_bias) j["expert_bias"] = {{"min", bias_min}, {"max", bias_max}};
    fmt::print("{}\n", j.dump());
    return;
  }

  fmt::print("layer: {}\n", c.cfg.summary());
  fmt::print("\n{:<12} {:>12} {:>12}\n", "stage", "forward ms", "backward ms");
  std::vector<std::string> stages;
  for (const auto& [stage, ms] : ordered_stages(c.fwd.times)) stages.push_back(stage);
  for (const auto& [stage, ms] : ordered_stages(c.backward_times))
    if (std::find(stages.begin(), stages.end(), stage) == stages.end()) stages.push_back(stage);
  auto cell = [](const moe::StageTimes& t, const std::string& stage) {
    const auto it = t.ms.find(stage);
    return it == t.ms.end() ? std::string("-") : fmt::format("{:.3f}", it->second);
  };
  for (const std::string& stage : stages)
    fmt::print("{:<12} {:>12} {:>12}\n", stage, cell(c.fwd.times, stage), cell(c.backward_times, stage));
  fmt::print("{:<12} {:>12.3f} {:>12.3f}\n", "total", c.forward_ms, c.backward_ms);

  fmt::print("\naux loss              {:.6g}\n", c.fwd.aux_loss);
  fmt::print("load CV               {:.4f}\n", s.cv);
  fmt::print("MaxVio                {:.4f}\n", s.max_violation);
  fmt::print("drop rate             {:.4f}\n", s.drop_rate);
  fmt::print("tokens without expert {:.4f}\n", s.tokens_without_expert);
  fmt::print("router entropy        {:.4f} nats (per token, mean)\n", s.router_entropy);
  fmt::print("mean-route entropy    {:.4f} nats (max log E = {:.4f})\n", s.mean_entropy,
             std::log(static_cast<double>(c.cfg.experts)));
  if (!s.tokens_per_expert.empty()) {
    const auto [lo, hi] = std::minmax_element(s.tokens_per_expert.begin(), s.tokens_per_expert.end());
    fmt::print("tokens per expert     min {:.6g}, max {:.6g}", *lo, *hi);
    if (s.tokens_per_expert.size() <= 32) {
      fmt::print(" [");
      for (size_t e = 0; e < s.tokens_per_expert.size(); ++e)
        fmt::print("{}{:.6g}", e ? " " : "", s.tokens_per_expert[e]);
      fmt::print("]");
    }
    fmt::print("\n");
  }
  if (has_bias)
    fmt::print("expert bias           [{:.6g}, {:.6g}] after the update{}\n", bias_min, bias_max,
               c.cfg.training ? "" : " (eval: unchanged)");
}

}  // namespace

void add_layer_command(CLI::App& app) {
  auto o = std::make_shared<LayerOptions>();
  CLI::App* sub = app.add_subcommand(
      "layer", "one forward + backward of the MoE layer: stage times, load statistics, aux loss");
  add_layer_options(*sub, o->cfg);
  add_backend_option(*sub, o->backend);
  sub->add_flag("--json", o->json, "print exactly one JSON object instead of the tables");
  sub->callback([o] { run(*o); });
}

}  // namespace moe_bench
