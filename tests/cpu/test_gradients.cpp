// Central-difference gradient checks of layer_backward, in double, for every router x layout x
// activation (soft_moe has no layout: once per activation). The objective is the one backward
// documents: f = <dy, y> + aux_loss, with the aux losses switched on (aux_coef 0.1, z_coef 0.01)
// so their gradients are checked too, and training = true: noise, jitter and random second
// choices are pure functions of the seed, so f is smooth in the parameters away from selection
// ties. A perturbation can still cross a tie (a discrete choice flips and f jumps); such entries
// are recognised by their one-sided differences disagreeing, skipped, and counted: a case fails
// if more than a small fraction of its entries had to be skipped.
#include <gtest/gtest.h>

#include <set>
#include <sstream>

#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "test_common.hpp"

namespace moe::test {
namespace {

struct GradCase {
  std::string label;
  LayerConfig cfg;
  bool expect_drops = false;   // padded with a binding capacity: some choice must be dropped
  bool expect_skips = false;   // a GShard second-choice policy: some choice must be skipped
};

std::ostream& operator<<(std::ostream& os, const GradCase& c) { return os << c.label; }

std::vector<GradCase> gradient_cases() {
  std::vector<GradCase> cases;
  int idx = 0;
  auto shape = [&idx](LayerConfig& cfg) {
    // Vary the tiny shapes a little between cases; E = 5 is not a power of two.
    const int64_t tokens[] = {6, 9, 12};
    cfg.tokens = tokens[idx % 3];
    cfg.experts = idx % 2 ? 5 : 4;
    cfg.hidden = 5 + idx % 4;
    cfg.inter = 4 + idx % 3;
    cfg.aux_coef = takes_aux_coef(cfg.router) ? 0.1 : -1;
    cfg.z_coef = 0.01;
    cfg.seed = 1000 + idx;
    ++idx;
  };
  for (Router r : kAllRouters) {
    for (Activation a : {Activation::gelu, Activation::swiglu}) {
      if (r == Router::soft_moe) {
        GradCase c;
        c.cfg = small_config(r, Layout::dropless, a);
        shape(c.cfg);
        c.cfg.shared_experts = a == Activation::swiglu ? 1 : 0;
        c.label = case_name(c.cfg);
        cases.push_back(c);
        continue;
      }
      for (Layout l : kAllLayouts) {
        GradCase c;
        c.cfg = small_config(r, l, a);
        shape(c.cfg);
        c.cfg.shared_experts = l == Layout::dropless ? 1 : 0;
        if (l == Layout::padded) c.cfg.capacity_factor = 0.5;  // binds: tokens get dropped
        if (l == Layout::block) c.cfg.block_size = 4;
        if (r == Router::sigmoid_bias) c.cfg.route_scale = 2.5;
        if (r == Router::chain_of_experts && l == Layout::dropless) c.cfg.sequence_length = 3;
        c.expect_drops = l == Layout::padded && is_token_choice(r);
        c.label = case_name(c.cfg);
        cases.push_back(c);
      }
    }
  }
  // A few router options that change the routing math.
  {
    GradCase c;
    c.cfg = small_config(Router::softmax_topk, Layout::dropless, Activation::swiglu);
    shape(c.cfg);
    c.cfg.renormalize = false;
    c.cfg.sequence_length = 3;
    c.label = "softmax_topk_no_renormalize_sequence_groups";
    cases.push_back(c);
  }
  for (SecondPolicy policy : {SecondPolicy::random, SecondPolicy::threshold}) {
    GradCase c;
    c.cfg = small_config(Router::softmax_topk, Layout::padded, Activation::gelu);
    shape(c.cfg);
    c.cfg.tokens = 12;
    c.cfg.capacity_factor = 0.75;
    c.cfg.second_policy = policy;
    // random keeps e2 with probability min(1, g2/thr): thr = 1 makes skips likely
    c.cfg.second_threshold = policy == SecondPolicy::random ? 1.0 : 0.4;
    c.expect_skips = true;
    c.label = "softmax_topk_second_policy_" + std::string(name(policy));
    cases.push_back(c);
  }
  for (Router r : {Router::noisy_topk, Router::switch_top1}) {
    GradCase c;  // eval mode: no noise (noisy_topk's load loss uses hard counts), no jitter
    c.cfg = small_config(r, Layout::dropless, Activation::swiglu);
    shape(c.cfg);
    c.cfg.training = false;
    c.label = std::string(name(r)) + "_eval";
    cases.push_back(c);
  }
  for (Router r : {Router::softmax_topk, Router::soft_moe, Router::expert_choice}) {
    GradCase c;  // a single token
    c.cfg = small_config(r, Layout::padded, Activation::gelu);
    shape(c.cfg);
    c.cfg.tokens = 1;
    c.cfg.capacity_factor = 1.0;
    c.cfg.shared_experts = 1;
    c.label = std::string(name(r)) + "_single_token";
    cases.push_back(c);
  }
  {
    GradCase c;  // k = E: every expert selected, nothing can flip
    c.cfg = small_config(Router::softmax_topk, Layout::block, Activation::gelu);
    shape(c.cfg);
    c.cfg.top_k = c.cfg.experts;
    c.label = "softmax_topk_k_equals_E";
    cases.push_back(c);
  }
  {
    GradCase c;  // chain of 2 iterations with 2 experts each
    c.cfg = small_config(Router::chain_of_experts, Layout::dropless, Activation::swiglu);
    shape(c.cfg);
    c.cfg.top_k = 4;
    c.cfg.experts = 5;
    c.cfg.shared_experts = 1;
    c.label = "chain_of_experts_k4_two_iterations";
    cases.push_back(c);
  }
  {
    GradCase c;  // soft MoE with one slot per expert and two shared experts
    c.cfg = small_config(Router::soft_moe, Layout::dropless, Activation::gelu);
    shape(c.cfg);
    c.cfg.slots_per_expert = 1;
    c.cfg.shared_experts = 2;
    c.label = "soft_moe_one_slot";
    cases.push_back(c);
  }
  return cases;
}

class Gradients : public ::testing::TestWithParam<GradCase> {};

TEST_P(Gradients, MatchCentralDifferencesOfDyDotYPlusAuxLoss) {
  const GradCase& c = GetParam();
  const LayerConfig& cfg = c.cfg;
  ASSERT_NO_THROW(cfg.validate()) << cfg.summary();
  const int64_t T = cfg.tokens, H = cfg.hidden;

  Params<double> p = random_params<double>(cfg, cfg.seed + 7);
  if (cfg.router == Router::sigmoid_bias) {
    // A non-zero selection bias: it must steer selection without entering the gradient.
    p.expert_bias = random_vector<double>(static_cast<size_t>(cfg.experts), cfg.seed + 11, 0.3);
  }
  if (cfg.router == Router::noisy_topk) {
    ASSERT_EQ(p.w_noise.size(), static_cast<size_t>(H * cfg.experts)) << "W_noise shape";
    bool any = false;
    for (double v : p.w_noise) any |= v != 0;
    ASSERT_TRUE(any) << "random_params must give noisy_topk a non-zero W_noise";
  }
  std::vector<double> x = random_vector<double>(static_cast<size_t>(T * H), cfg.seed + 1);
  const std::vector<double> dy = random_vector<double>(static_cast<size_t>(T * H), cfg.seed + 2);

  const LayerForward<double> fwd = run_layer(cfg, p, x);
  ASSERT_EQ(fwd.y.size(), static_cast<size_t>(T * H));
  ASSERT_TRUE(std::isfinite(fwd.aux_loss));
  if (c.expect_drops) {
    int64_t dropped = 0;
    for (const auto& s : fwd.steps) dropped += s.plan.dropped_by_capacity;
    ASSERT_GT(dropped, 0) << "capacity factor 0.5 must drop choices in " << c.label;
  }
  if (c.expect_skips) {
    int64_t skipped = 0;
    for (const auto& s : fwd.steps) skipped += s.plan.skipped_by_policy;
    ASSERT_GT(skipped, 0) << "the second-choice policy must skip some choice in " << c.label;
  }
  if (cfg.router != Router::soft_moe && cfg.router != Router::expert_choice &&
      cfg.router != Router::sigmoid_bias) {
    EXPECT_GT(std::fabs(fwd.aux_loss), 0) << "aux losses are on: they must enter the objective";
  }
  const Backward<double> b = run_backward(cfg, p, x, fwd, dy);
  const double f0 = objective(fwd, dy);

  auto eval = [&]() { return objective(run_layer(cfg, p, x), dy); };

  // (name, values, analytic gradient)
  Params<double> grads = b.grads;
  std::vector<std::tuple<std::string, std::vector<double>*, const std::vector<double>*>> tensors;
  tensors.emplace_back("x", &x, &b.dx);
  auto plist = parameter_list(p);
  auto glist = parameter_list(grads);
  ASSERT_EQ(plist.size(), glist.size());
  for (size_t i = 0; i < plist.size(); ++i) {
    ASSERT_EQ(plist[i].first, glist[i].first);
    if (plist[i].first.ends_with("expert_bias")) continue;  // a buffer: no gradient
    if (plist[i].second->empty()) continue;
    ASSERT_EQ(glist[i].second->size(), plist[i].second->size())
        << "gradient of " << plist[i].first << " has the wrong size";
    tensors.emplace_back(plist[i].first, plist[i].second, glist[i].second);
  }

  constexpr double kEps = 1e-6;
  constexpr size_t kPerTensor = 64;
  Rand pick(cfg.seed + 99);
  int64_t checked = 0, skipped = 0, bad = 0;
  std::ostringstream report;
  for (auto& [tname, values, grad] : tensors) {
    std::vector<size_t> entries;
    if (values->size() <= kPerTensor + 4) {
      entries.resize(values->size());
      std::iota(entries.begin(), entries.end(), size_t{0});
    } else {
      std::set<size_t> chosen;
      while (chosen.size() < kPerTensor) chosen.insert(static_cast<size_t>(pick.index(values->size())));
      entries.assign(chosen.begin(), chosen.end());
    }
    for (size_t i : entries) {
      const double orig = (*values)[i];
      (*values)[i] = orig + kEps;
      const double fp = eval();
      (*values)[i] = orig - kEps;
      const double fm = eval();
      (*values)[i] = orig;
      const double central = (fp - fm) / (2 * kEps);
      const double right = (fp - f0) / kEps, left = (f0 - fm) / kEps;
      if (std::fabs(right - left) > 1e-2 * (1 + std::fabs(central))) {
        ++skipped;  // a selection flipped inside [-eps, eps]: f is not differentiable here
        continue;
      }
      ++checked;
      const double g = (*grad)[i];
      if (!(std::fabs(g - central) <= 1e-6 + 1e-5 * std::fabs(central))) {
        if (bad < 12)
          report << "\n  " << tname << "[" << i << "]: analytic " << g << " numeric " << central;
        ++bad;
      }
    }
  }
  RecordProperty("entries_checked", static_cast<int>(checked));
  RecordProperty("entries_skipped_at_ties", static_cast<int>(skipped));
  EXPECT_EQ(bad, 0) << c.label << ": " << bad << " of " << checked
                    << " gradient entries differ from central differences" << report.str();
  EXPECT_GT(checked, 0);
  EXPECT_LE(skipped * 10, checked + skipped)
      << c.label << ": " << skipped << " of " << checked + skipped
      << " entries sat on a selection tie; too many to trust the check";
}

INSTANTIATE_TEST_SUITE_P(EveryRouterLayoutAndActivation, Gradients,
                         ::testing::ValuesIn(gradient_cases()),
                         [](const ::testing::TestParamInfo<GradCase>& info) {
                           return info.param.label;
                         });

// The selection bias of sigmoid_bias is a buffer: backward must not invent a gradient for it.
TEST(Gradients, SigmoidBiasSelectionBiasGetsNoGradient) {
  LayerConfig cfg = small_config(Router::sigmoid_bias, Layout::dropless, Activation::gelu);
  Params<double> p = random_params<double>(cfg, 5);
  p.expert_bias = random_vector<double>(static_cast<size_t>(cfg.experts), 6, 0.3);
  const auto x = random_vector<double>(static_cast<size_t>(cfg.tokens * cfg.hidden), 7);
  const auto dy = random_vector<double>(x.size(), 8);
  const auto fwd = run_layer(cfg, p, x);
  const auto b = run_backward(cfg, p, x, fwd, dy);
  for (double g : b.grads.expert_bias) EXPECT_EQ(g, 0.0);
}

}  // namespace
}  // namespace moe::test
