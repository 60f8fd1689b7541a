// defines: add_compare_command — `moe-bench compare-layer`: every router on one layer and the same
// input, one forward and one backward each, in one table: time, aux loss and load statistics.
// --jsonl appends one result line per router.
#include <fmt/format.h>
#include <memory>

#include "io/config_io.hpp"
#include "io/files.hpp"
#include "io/jsonl.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/options.hpp"
#include "moe/check.hpp"

namespace moe_bench {

namespace {

struct CompareOptions {
  moe::LayerConfig cfg;  // the layer's defaults are the comparison's defaults
  std::string backend = "cpu";
  std::string jsonl;
};

// The router's own form of the shared configuration: Switch is top-1 by definition.
moe::LayerConfig config_for(moe::LayerConfig cfg, moe::Router router) {
  cfg.router = router;
  if (router == moe::Router::switch_top1) cfg.top_k = 1;
  return cfg;
}

void run(const CompareOptions& o) {
  // The shared settings must be valid on their own (checked with the default router) ...
  o.cfg.validate();
  check_case_fits_in_memory(o.cfg, sizeof(float));
  if (!o.jsonl.empty()) io::check_output_path(o.jsonl);

  fmt::print("compare: {}\n", o.cfg.summary());
  fmt::print("(router column overrides: switch runs with K=1)\n\n");
  fmt::print("{:<17} {:>10} {:>11} {:>11} {:>8} {:>8} {:>9} {:>9}\n", "router", "forward ms",
             "backward ms", "aux loss", "CV", "MaxVio", "drop rate", "entropy");

  const size_t n = static_cast<size_t>(o.cfg.tokens * o.cfg.hidden);
  const std::vector<float> x = seeded_normal<float>(n, o.cfg.seed, kInputTag);
  const std::vector<float> dy = seeded_normal<float>(n, o.cfg.seed, kUpstreamTag);
  int ran = 0;
  for (const moe::Router router : moe::kAllRouters) {
    const std::string label(moe::name(router));
    LayerCase<float> c;
    c.cfg = config_for(o.cfg, router);
    // ... while a router that cannot take them (chain_of_experts with K not a multiple of the
    // iterations, say) is skipped with its reason rather than ending the whole comparison.
    try {
      c.cfg.validate();
    } catch (const moe::ConfigError& e) {
      fmt::print("{:<17} skipped: {}\n", label, e.what());
      continue;
    }
    c.params = moe::init_params<float>(c.cfg, c.cfg.seed);
    c.x = x;
    c.dy = dy;
    run_layer_case(c);
    ++ran;
    const moe::LoadStats& s = c.fwd.stats;
    fmt::print("{:<17} {:>10.2f} {:>11.2f} {:>11.4g} {:>8.4f} {:>8.4f} {:>9.4f} {:>9.4f}\n", label,
               c.forward_ms, c.backward_ms, c.fwd.aux_loss, s.cv, s.max_violation, s.drop_rate,
               s.router_entropy);
    std::fflush(stdout);

    if (!o.jsonl.empty()) {
      nlohmann::ordered_json j = io::result_record("compare-layer");
      j["backend"] = o.backend;
      j["device"] = io::host_cpu();
      j["dtype"] = "f32";
      j["router"] = label;
      j["config"] = io::config_to_json(c.cfg);
      j["forward_ms"] = stage_times_json(c.fwd.times, c.forward_ms);
      j["backward_ms"] = stage_times_json(c.backward_times, c.backward_ms);
      j["aux_loss"] = c.fwd.aux_loss;
      j["stats"] = io::stats_to_json(s);
      io::append_jsonl(o.jsonl, j);
    }
  }
  MOE_CHECK(ran > 0, "no router accepts this configuration");
  if (!o.jsonl.empty()) fmt::print("\nappended {} lines to {}\n", ran, o.jsonl);
  fmt::print("\nentropy: mean router entropy per token (nats); CPU wall times of one call\n");
}

}  // namespace

void add_compare_command(CLI::App& app) {
  auto o = std::make_shared<CompareOptions>();
  CLI::App* sub = app.add_subcommand(
      "compare-layer", "every router on the same layer and input: times, aux loss, load statistics");
  add_layer_options(*sub, o->cfg, /*with_router=*/false);
  add_backend_option(*sub, o->backend);
  sub->add_option("--jsonl", o->jsonl, "append one JSON line per router to this file")
      ->type_name("FILE");
  sub->callback([o] { run(*o); });
}

}  // namespace moe_bench
