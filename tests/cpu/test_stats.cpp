// Load statistics (routing digest section 9) on hand-made cases with known answers: all tokens to
// one expert, perfect balance, a binding capacity, uniform router probabilities.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "moe/stats.hpp"
#include "test_common.hpp"

namespace moe::test {
namespace {

TEST(Stats, AllTokensToOneExpertGiveMaxVioEMinusOne) {
  for (int E : {2, 4, 7}) {
    LoadStats s;
    s.tokens_per_expert.assign(E, 0.0);
    s.tokens_per_expert[E / 2] = 24;
    fill_balance(s);
    EXPECT_NEAR(s.max_violation, E - 1.0, 1e-12) << "E=" << E;
    // loads (L, 0, ..., 0): mean L/E, population std L*sqrt(E-1)/E, so CV = sqrt(E-1)
    EXPECT_NEAR(s.cv, std::sqrt(E - 1.0), 1e-12) << "E=" << E;
  }
}

TEST(Stats, PerfectBalanceGivesZeroCvAndMaxVio) {
  LoadStats s;
  s.tokens_per_expert.assign(6, 5.0);
  fill_balance(s);
  EXPECT_EQ(s.cv, 0.0);
  EXPECT_EQ(s.max_violation, 0.0);
}

TEST(Stats, HandComputedCvAndMaxVio) {
  LoadStats s;
  s.tokens_per_expert = {1, 2, 3, 6};  // mean 3, deviations -2 -1 0 3, var 14/4
  fill_balance(s);
  EXPECT_NEAR(s.cv, std::sqrt(14.0 / 4.0) / 3.0, 1e-12);
  EXPECT_NEAR(s.max_violation, 6.0 / 3.0 - 1.0, 1e-12);
}

TEST(Stats, NoLoadGivesZeroNotNaN) {
  LoadStats s;
  s.tokens_per_expert.assign(4, 0.0);
  fill_balance(s);
  EXPECT_EQ(s.cv, 0.0);
  EXPECT_EQ(s.max_violation, 0.0);
  LoadStats none;  // no experts at all
  fill_balance(none);
  EXPECT_TRUE(std::isfinite(none.cv));
  EXPECT_TRUE(std::isfinite(none.max_violation));
}

TEST(Stats, LayerRoutingEveryTokenToOneExpertReportsIt) {
  LayerConfig cfg = small_config(Router::switch_top1, Layout::dropless, Activation::gelu);
  cfg.tokens = 16;
  cfg.experts = 5;
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts;
  auto p = random_params<double>(cfg, 1);
  std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);
  for (int64_t h = 0; h < H; ++h) p.w_gate[h * E + 2] = 5.0;  // expert 2 wins for positive x
  auto x = random_vector<double>(T * H, 2);
  for (auto& v : x) v = std::fabs(v) + 0.1;
  const auto fwd = run_layer(cfg, p, x);
  std::vector<double> want(E, 0.0);
  want[2] = T;
  EXPECT_EQ(fwd.stats.tokens_per_expert, want);
  EXPECT_NEAR(fwd.stats.max_violation, E - 1.0, 1e-12);
  EXPECT_NEAR(fwd.stats.cv, std::sqrt(E - 1.0), 1e-12);
  EXPECT_EQ(fwd.stats.drop_rate, 0.0);
  EXPECT_EQ(fwd.stats.tokens_without_expert, 0.0);
}

TEST(Stats, DropRateIsDroppedOverChoicesWhenCapacityBinds) {
  for (SecondPolicy policy : {SecondPolicy::all, SecondPolicy::threshold}) {
    LayerConfig cfg = small_config(Router::softmax_topk, Layout::padded, Activation::gelu);
    cfg.tokens = 20;
    cfg.experts = 4;
    cfg.capacity_factor = 0.5;
    cfg.second_policy = policy;
    cfg.second_threshold = 0.3;
    SCOPED_TRACE(std::string(name(policy)));
    const int64_t T = cfg.tokens, K = cfg.top_k;
    const auto p = random_params<double>(cfg, 3);
    const auto x = random_vector<double>(T * cfg.hidden, 4);
    const auto fwd = run_layer(cfg, p, x);
    const auto& plan = fwd.steps[0].plan;
    ASSERT_GT(plan.dropped_by_capacity, 0);
    if (policy == SecondPolicy::threshold) {
      ASSERT_GT(plan.skipped_by_policy, 0);
    }
    const double want =
        static_cast<double>(plan.dropped_by_capacity + plan.skipped_by_policy) / (T * K);
    EXPECT_NEAR(fwd.stats.drop_rate, want, 1e-15);
    // tokens_per_expert counts choices before drops
    for (int64_t e = 0; e < cfg.experts; ++e)
      EXPECT_EQ(fwd.stats.tokens_per_expert[e], static_cast<double>(plan.counts[e]));
    // fraction of tokens whose every choice was dropped or skipped
    int64_t without = 0;
    for (int64_t t = 0; t < T; ++t) {
      bool any = false;
      for (int64_t k = 0; k < K; ++k) any |= plan.choice_row[t * K + k] != kDropped;
      without += !any;
    }
    EXPECT_NEAR(fwd.stats.tokens_without_expert, static_cast<double>(without) / T, 1e-15);
  }
}

TEST(Stats, UniformRouterProbabilitiesHaveEntropyLogE) {
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::dropless, Activation::gelu);
  cfg.tokens = 12;
  cfg.experts = 6;
  auto p = random_params<double>(cfg, 5);
  std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);  // logits 0: p = 1/E for every token
  const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 6);
  const auto fwd = run_layer(cfg, p, x);
  EXPECT_NEAR(fwd.stats.router_entropy, std::log(6.0), 1e-12);
  EXPECT_NEAR(fwd.stats.mean_entropy, std::log(6.0), 1e-12);
  // all ties: every token picks experts 0 and 1
  EXPECT_EQ(fwd.stats.tokens_per_expert, (std::vector<double>{12, 12, 0, 0, 0, 0}));
  EXPECT_NEAR(fwd.stats.max_violation, 12.0 / 4.0 - 1.0, 1e-12);
}

TEST(Stats, EntropiesMatchTheRouterProbabilities) {
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::dropless, Activation::gelu);
  cfg.tokens = 15;
  cfg.experts = 5;
  const int64_t T = cfg.tokens, E = cfg.experts;
  const auto p = random_params<double>(cfg, 7);
  const auto x = random_vector<double>(T * cfg.hidden, 8);
  const auto fwd = run_layer(cfg, p, x);
  const auto& pr = fwd.steps[0].probs;
  double tok = 0;
  std::vector<double> mean(E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      const double v = pr[t * E + e];
      if (v > 0) tok -= v * std::log(v);
      mean[e] += v / T;
    }
  double h_mean = 0;
  for (double v : mean)
    if (v > 0) h_mean -= v * std::log(v);
  EXPECT_NEAR(fwd.stats.router_entropy, tok / T, 1e-12);
  EXPECT_NEAR(fwd.stats.mean_entropy, h_mean, 1e-12);
  EXPECT_LE(fwd.stats.router_entropy, fwd.stats.mean_entropy + 1e-12)
      << "entropy is concave: mean of entropies <= entropy of the mean";
}

}  // namespace
}  // namespace moe::test
