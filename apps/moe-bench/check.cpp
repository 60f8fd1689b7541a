// defines: add_check_command — `moe-bench check`: the GPU-vs-CPU parity suite on the GPU present
// (the same comparisons as tests/cuda, from moe/cuda/parity.hpp: gate, route forward/backward,
// soft MoE in fp32 and bf16, plan, permute, combine and their backwards), printed as a pass/fail
// table: one line per stage and dtype over all cases, with the worst error in units of its
// tolerance and the largest relative Frobenius error ||gpu - ref|| / ||ref|| (0 for exact
// comparisons; soft_moe.repeat_bitwise compares two runs bit for bit). --only picks families.
// Exits 1 when anything fails, after listing the failing cases.
#include <cuda_runtime.h>

#include <algorithm>
#include <fmt/format.h>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moe-bench/commands.hpp"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/parity.hpp"

namespace moe_bench {

namespace {

struct CheckOptions {
  bool large = false;
  std::vector<int64_t> hidden{7, 136, 1000};
  uint64_t seed = 2026;
  std::vector<std::string> only;  // families to run (route, soft_moe, plan, rows); empty: all
  bool runs(const std::string& family) const {
    return only.empty() || std::find(only.begin(), only.end(), family) != only.end();
  }
};

struct Summary {
  int cases = 0, failed = 0;
  int64_t elements = 0;
  double worst = 0;
  double rel = 0;  // largest relative Frobenius error ||gpu - ref|| / ||ref|| over the cases
};

void run(const CheckOptions& o) {
  MOE_CHECK(moe::cuda::has_device(), "check: no CUDA device");
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  fmt::print("check: {} (sm_{}{}), seed {}\n", prop.name, prop.major, prop.minor, o.seed);

  std::map<std::string, Summary> table;  // "stage dtype" -> summary
  std::vector<std::string> failures;
  int64_t ties = 0;  // router selections within rounding of a tie, not compared
  auto add = [&](const std::string& where, const std::vector<moe::cuda::ParityResult>& results) {
    for (const auto& r : results) {
      Summary& s = table[fmt::format("{:<28} {}", r.stage, r.dtype)];
      ++s.cases;
      s.elements += r.elements;
      s.worst = std::max(s.worst, r.max_error);
      s.rel = std::max(s.rel, r.rel_error);
      if (!r.pass()) {
        ++s.failed;
        failures.push_back(fmt::format("{} {} {}: {} of {} differ:{}", where, r.stage, r.dtype,
                                       r.mismatches, r.elements, r.detail));
      }
    }
  };
  for (const moe::cuda::RouteCase& c : moe::cuda::route_cases()) {
    if ((c.large && !o.large) || !o.runs("route")) continue;
    for (const auto& r : moe::cuda::check_route(c, o.seed)) {
      if (r.stage == "route.near_ties_skipped") {
        ties += r.elements;
        continue;
      }
      add(c.name, {r});
    }
  }
  for (const moe::cuda::RouteCase& c : moe::cuda::soft_moe_cases()) {
    if ((c.large && !o.large) || !o.runs("soft_moe")) continue;
    add(c.name, moe::cuda::check_soft_moe(c, o.seed));
  }
  for (const moe::cuda::ParityCase& c : moe::cuda::parity_cases()) {
    if (c.large && !o.large) continue;
    if (o.runs("plan")) add(c.name, moe::cuda::check_plan(c, o.seed));
    for (int64_t h : o.hidden) {
      if (!o.runs("rows")) break;
      if (c.tokens * h > 20'000'000 || c.experts > 1000) continue;
      add(fmt::format("{} H={}", c.name, h), moe::cuda::check_rows(c, h, o.seed + h));
    }
  }

  fmt::print("\n{:<28} {:<5} {:>6} {:>12} {:>14} {:>10}  {}\n", "stage", "dtype", "cases",
             "elements", "worst err/tol", "rel err", "result");
  int failed = 0;
  for (const auto& [key, s] : table) {
    fmt::print("{:<34} {:>6} {:>12} {:>14.3g} {:>10.2e}  {}\n", key, s.cases, s.elements, s.worst,
               s.rel, s.failed ? fmt::format("FAIL ({})", s.failed) : "pass");
    failed += s.failed;
  }
  for (const std::string& f : failures) fmt::print("FAIL {}\n", f);
  if (ties) fmt::print("({} router selections within rounding of a tie were not compared)\n", ties);
  fmt::print("\ncheck: {}\n", failed ? fmt::format("{} comparisons FAILED", failed) : "all passed");
  if (failed) throw CommandExit{1};
}

}  // namespace

void add_check_command(CLI::App& app) {
  auto o = std::make_shared<CheckOptions>();
  CLI::App* sub = app.add_subcommand("check", "compare the GPU stages with the CPU reference");
  sub->add_flag("--large", o->large, "also run the large shapes (T up to 40000)");
  sub->add_option("--hidden", o->hidden, "hidden sizes for permute/combine")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the random inputs")->capture_default_str();
  sub->add_option("--only", o->only, "run only these families: route, soft_moe, plan, rows")
      ->check(CLI::IsMember({"route", "soft_moe", "plan", "rows"}));
  sub->callback([o] { run(*o); });
}

}  // namespace moe_bench
