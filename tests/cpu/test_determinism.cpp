// Same inputs, same bits: repeated forward + backward in float on a moderate case gives bitwise
// identical y, aux loss, dx and every parameter gradient, for every router. The second run reuses
// the output objects of the first (stale state must not leak) and starts from poisoned gradient
// buffers (backward must overwrite, not accumulate into, what it is given).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "test_common.hpp"

namespace moe::test {
namespace {

class Determinism : public ::testing::TestWithParam<std::tuple<Router, Layout>> {};

TEST_P(Determinism, RepeatedForwardAndBackwardGiveIdenticalBits) {
  const auto [router, layout] = GetParam();
  LayerConfig cfg = small_config(router, layout, Activation::swiglu);
  cfg.tokens = 256;
  cfg.hidden = 64;
  cfg.inter = 128;
  cfg.experts = 8;
  cfg.shared_experts = 1;
  cfg.capacity_factor = 1.0;  // padded: binds for an unbalanced router
  cfg.block_size = 16;
  cfg.seed = 2024;
  if (router == Router::softmax_topk) cfg.second_policy = SecondPolicy::random;
  ASSERT_NO_THROW(cfg.validate());
  const int64_t T = cfg.tokens, H = cfg.hidden;

  Params<float> p = random_params<float>(cfg, 17);
  if (router == Router::sigmoid_bias)
    p.expert_bias = random_vector<float>(static_cast<size_t>(cfg.experts), 18, 0.1);
  const auto x = random_vector<float>(static_cast<size_t>(T * H), 19);
  const auto dy = random_vector<float>(static_cast<size_t>(T * H), 20);

  // run 1: fresh objects
  LayerForward<float> f1;
  layer_forward(cfg, p, x.data(), f1);
  std::vector<float> dx1(T * H, 0.0f);
  Params<float> g1;
  layer_backward(cfg, p, x.data(), f1, dy.data(), dx1.data(), g1);

  // run 2: reuse run 1's objects, poisoned
  LayerForward<float> f2;
  layer_forward(cfg, p, x.data(), f2);
  layer_forward(cfg, p, x.data(), f2);
  std::vector<float> dx2(T * H, std::numeric_limits<float>::quiet_NaN());
  Params<float> g2 = g1;
  for (auto& [n, t] : parameter_list(g2)) std::fill(t->begin(), t->end(), 7.0f);
  layer_backward(cfg, p, x.data(), f2, dy.data(), dx2.data(), g2);

  ASSERT_EQ(f1.y.size(), static_cast<size_t>(T * H));
  bool finite = true;
  for (float v : f1.y) finite &= std::isfinite(v);
  EXPECT_TRUE(finite) << "y has non-finite values";
  EXPECT_TRUE(bitwise_equal("y", f1.y, f2.y));
  EXPECT_EQ(f1.aux_loss, f2.aux_loss);
  EXPECT_TRUE(bitwise_equal("dx", dx1, dx2));
  auto l1 = parameter_list(g1);
  auto l2 = parameter_list(g2);
  ASSERT_EQ(l1.size(), l2.size());
  for (size_t i = 0; i < l1.size(); ++i) {
    if (l1[i].first.ends_with("expert_bias")) continue;  // a buffer, not a gradient
    EXPECT_TRUE(bitwise_equal("d" + l1[i].first, *l1[i].second, *l2[i].second));
  }
  EXPECT_EQ(f1.stats.tokens_per_expert, f2.stats.tokens_per_expert);
  EXPECT_EQ(f1.stats.drop_rate, f2.stats.drop_rate);
}

std::vector<std::tuple<Router, Layout>> determinism_cases() {
  std::vector<std::tuple<Router, Layout>> out;
  for (Router r : kAllRouters) {
    if (!is_sparse(r)) {
      out.emplace_back(r, Layout::dropless);
      continue;
    }
    for (Layout l : kAllLayouts) out.emplace_back(r, l);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(EveryRouter, Determinism, ::testing::ValuesIn(determinism_cases()),
                         [](const ::testing::TestParamInfo<std::tuple<Router, Layout>>& info) {
                           const Router r = std::get<0>(info.param);
                           std::string s(name(r));
                           if (is_sparse(r)) s.append("_").append(name(std::get<1>(info.param)));
                           return s;
                         });

}  // namespace
}  // namespace moe::test
