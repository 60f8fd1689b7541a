// defines: add_replay_command — `moe-bench replay FILE`: read a case written by `export`, rebuild
// its configuration from the metadata, recompute forward and backward from the stored x, parameters
// and dy, and compare every stored result. Exit 0 when all match, 1 when any differs, 2 when the
// file is missing or malformed.
#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <limits>
#include <memory>

#include "io/config_io.hpp"
#include "io/safetensors.hpp"
#include "moe-bench/commands.hpp"
#include "moe-bench/options.hpp"
#include "moe/check.hpp"

namespace moe_bench {

namespace {

constexpr const char* kFormat = "moe-routing-bench case v1";

struct ReplayOptions {
  std::string file;
  double rtol = 1e-5;
  double atol = 1e-6;
};

struct Row {
  std::string name;
  size_t count = 0;
  double error = 0;  // max |a - b| / (|b| + atol); mismatching integers count as infinity
  bool ok = true;
  std::string note;
};

// a: recomputed, b: stored.
template <class A, class B>
Row compare(const std::string& name, const std::vector<A>& a, const std::vector<B>& b,
            const ReplayOptions& o) {
  Row row{name, b.size(), 0, true, ""};
  if (a.size() != b.size()) {
    row.ok = false;
    row.error = std::numeric_limits<double>::infinity();
    row.note = fmt::format("recomputed {} values, stored {}", a.size(), b.size());
    return row;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    double e;
    if (std::isnan(x) || std::isnan(y)) e = (std::isnan(x) && std::isnan(y)) ? 0 : INFINITY;
    else if (x == y) e = 0;  // also equal infinities
    else e = std::abs(x - y) / (std::abs(y) + o.atol);
    if (e > row.error || std::isnan(e)) row.error = e;
  }
  row.ok = row.error <= o.rtol;
  return row;
}

Row missing(const std::string& name, const std::string& why) {
  return Row{name, 0, std::numeric_limits<double>::infinity(), false, why};
}

template <class Real>
std::vector<Row> replay(const io::SafeTensors& st, const moe::LayerConfig& cfg,
                        const ReplayOptions& o) {
  const int64_t T = cfg.tokens, H = cfg.hidden;
  LayerCase<Real> c;
  c.cfg = cfg;
  c.params = moe::init_params<Real>(cfg, cfg.seed);
  for (auto& [name, values] : moe::parameter_list(c.params)) {
    std::vector<Real> stored = st.get<Real>(name);
    MOE_CHECK(stored.size() == values->size(), st.source, ": tensor '", name, "' has ",
              stored.size(), " values, the stored configuration needs ", values->size());
    *values = std::move(stored);
  }
  c.x = st.get<Real>("x", {T, H});
  c.dy = st.get<Real>("dy", {T, H});
  run_layer_case(c);

  std::vector<Row> rows;
  auto check_float = [&](const std::string& name, const std::vector<Real>& recomputed) {
    if (!st.contains(name)) rows.push_back(missing(name, "not in the file"));
    else rows.push_back(compare(name, recomputed, st.get<Real>(name), o));
  };
  auto check_int = [&](const std::string& name, const auto& recomputed) {
    if (!st.contains(name)) return;  // routing and plan tensors are informative extras
    Row r = compare(name, recomputed, st.get<int64_t>(name), ReplayOptions{o.file, 0, 1});
    if (!r.ok) r.note = "integers differ";
    rows.push_back(r);
  };

  // Routing and plan: exact, for every routing step the file holds.
  const bool chain = cfg.router == moe::Router::chain_of_experts;
  for (size_t i = 0; i < c.fwd.steps.size(); ++i) {
    const std::string routing = chain ? fmt::format("routing.{}.", i) : "routing.";
    const std::string plan = chain ? fmt::format("plan.{}.", i) : "plan.";
    const auto& s = c.fwd.steps[i];
    check_int(routing + "expert", s.routing.choice_expert);
    check_int(routing + "token", s.routing.choice_token);
    if (st.contains(routing + "weight")) check_float(routing + "weight", s.routing.choice_weight);
    check_int(plan + "row_token", s.plan.row_token);
    check_int(plan + "offsets", s.plan.offsets);
    if (!chain) break;
  }
  if (st.contains("soft.dispatch")) check_float("soft.dispatch", c.fwd.soft.dispatch);
  if (st.contains("soft.combine")) check_float("soft.combine", c.fwd.soft.combine);

  check_float("y", c.fwd.y);
  check_float("aux_loss", std::vector<Real>{static_cast<Real>(c.fwd.aux_loss)});
  check_float("grad.x", c.dx);
  auto grads = moe::parameter_list(c.grads);
  for (const std::string& name : st.names()) {
    if (name.rfind("grad.", 0) != 0 || name == "grad.x") continue;
    const std::string param = name.substr(5);
    const auto it = std::find_if(grads.begin(), grads.end(),
                                 [&](const auto& g) { return g.first == param; });
    if (it == grads.end()) rows.push_back(missing(name, "no such gradient recomputed"));
    else rows.push_back(compare(name, *it->second, st.get<Real>(name), o));
  }
  // A gradient the engine computes but the file lacks is a mismatch too.
  for (const auto& [param, values] : grads)
    if (!st.contains("grad." + param)) rows.push_back(missing("grad." + param, "not in the file"));
  return rows;
}

void run(const ReplayOptions& o) {
  MOE_CHECK(o.rtol >= 0 && std::isfinite(o.rtol), "rtol must be a finite value >= 0");
  MOE_CHECK(o.atol >= 0 && std::isfinite(o.atol), "atol must be a finite value >= 0");
  const io::SafeTensors st = io::read_safetensors(o.file);
  const auto format = st.metadata.find("format");
  MOE_CHECK(format != st.metadata.end() && format->second == kFormat, o.file,
            ": not a moe-routing-bench case (metadata 'format' is ",
            format == st.metadata.end() ? std::string("missing") : "'" + format->second + "'",
            ", expected '", kFormat, "')");
  const moe::LayerConfig cfg = io::config_from_strings(st.metadata, o.file);
  const std::string dtype = st.at("x").dtype;
  MOE_CHECK(dtype == "F32" || dtype == "F64", o.file, ": tensor 'x' is ", dtype,
            ", expected F32 or F64");

  fmt::print("replay: {}\n        {} ({})\n\n", o.file, cfg.summary(), dtype);
  const std::vector<Row> rows =
      dtype == "F64" ? replay<double>(st, cfg, o) : replay<float>(st, cfg, o);

  size_t width = 8;
  for (const Row& r : rows) width = std::max(width, r.name.size());
  fmt::print("{:<{}} {:>10} {:>12}  {}\n", "tensor", width, "values", "max rel err", "status");
  size_t bad = 0;
  for (const Row& r : rows) {
    bad += !r.ok;
    fmt::print("{:<{}} {:>10} {:>12.3e}  {}{}\n", r.name, width, r.count, r.error,
               r.ok ? "ok" : "MISMATCH", r.note.empty() ? "" : " (" + r.note + ")");
  }
  fmt::print("\n{} of {} tensors match (rtol {:g}, atol {:g})\n", rows.size() - bad, rows.size(),
             o.rtol, o.atol);
  if (bad) throw CommandExit{1};
}

}  // namespace

void add_replay_command(CLI::App& app) {
  auto o = std::make_shared<ReplayOptions>();
  CLI::App* sub = app.add_subcommand(
      "replay", "recompute a case written by `export` and compare every stored result");
  sub->add_option("file", o->file, "case file (.safetensors)")->required()->type_name("FILE");
  sub->add_option("--rtol", o->rtol, "largest accepted max |a-b|/(|b|+atol)")->capture_default_str();
  sub->add_option("--atol", o->atol, "absolute floor of the relative error's denominator")
      ->capture_default_str();
  sub->callback([o] { run(*o); });
}

}  // namespace moe_bench
