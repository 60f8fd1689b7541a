// Bad input becomes one ConfigError whose message names the field (and, for names, lists the
// allowed values); non-finite router logits are rejected instead of being silently routed.
// Messages are matched loosely where wording may vary ("non-finite" or "not finite").
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "moe/check.hpp"
#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "test_common.hpp"

namespace moe::test {
namespace {

// The message of the ConfigError `fn` throws, or a marker when it throws nothing / another type.
std::string config_error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type: ") + e.what() + ">";
  }
  return "<no exception>";
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The message says the router logits are non-finite ("non-finite" or "not finite" logits).
bool mentions_non_finite_logits(const std::string& msg) {
  const std::string m = lower(msg);
  const bool finite = m.find("non-finite") != std::string::npos ||
                      m.find("not finite") != std::string::npos;
  return finite && m.find("logit") != std::string::npos;
}

LayerConfig valid_config() {
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::dropless, Activation::gelu);
  return cfg;
}

struct BadCase {
  std::string what;
  std::function<void(LayerConfig&)> edit;
  std::string field;  // must appear in the message
};

TEST(Config, ValidateRejectsEachBadFieldAndNamesIt) {
  ASSERT_NO_THROW(valid_config().validate());
  const std::vector<BadCase> cases = {
      {"k > E", [](LayerConfig& c) { c.top_k = c.experts + 1; }, "top-k"},
      {"k < 1", [](LayerConfig& c) { c.top_k = 0; }, "top-k"},
      {"k < 0", [](LayerConfig& c) { c.top_k = -2; }, "top-k"},
      {"E < 1", [](LayerConfig& c) { c.experts = 0; }, "experts"},
      {"T < 0", [](LayerConfig& c) { c.tokens = -1; }, "tokens"},
      {"H < 1", [](LayerConfig& c) { c.hidden = 0; }, "hidden"},
      {"I < 1", [](LayerConfig& c) { c.inter = 0; }, "inter"},
      {"capacity factor 0 with padded",
       [](LayerConfig& c) {
         c.layout = Layout::padded;
         c.capacity_factor = 0;
       },
       "capacity-factor"},
      {"capacity factor < 0 with padded",
       [](LayerConfig& c) {
         c.layout = Layout::padded;
         c.capacity_factor = -1.25;
       },
       "capacity-factor"},
      {"capacity factor 0 with expert choice",
       [](LayerConfig& c) {
         c.router = Router::expert_choice;
         c.capacity_factor = 0;
       },
       "capacity-factor"},
      {"block size 0",
       [](LayerConfig& c) {
         c.layout = Layout::block;
         c.block_size = 0;
       },
       "block-size"},
      {"chain_of_experts with top-k not a multiple of iterations",
       [](LayerConfig& c) {
         c.router = Router::chain_of_experts;
         c.top_k = 3;
         c.iterations = 2;
       },
       "iterations"},
      {"iterations 0",
       [](LayerConfig& c) {
         c.router = Router::chain_of_experts;
         c.iterations = 0;
       },
       "iterations"},
      {"slots per expert 0",
       [](LayerConfig& c) {
         c.router = Router::soft_moe;
         c.slots_per_expert = 0;
       },
       "slots-per-expert"},
      {"aux-coef for a router without a balance loss",
       [](LayerConfig& c) {
         c.router = Router::noisy_topk;
         c.aux_coef = 0.1;
       },
       "aux-coef"},
      {"switch with k = 2",
       [](LayerConfig& c) {
         c.router = Router::switch_top1;
         c.top_k = 2;
       },
       "top-k"},
  };
  for (const auto& bc : cases) {
    LayerConfig cfg = valid_config();
    bc.edit(cfg);
    const std::string msg = config_error_message([&] { cfg.validate(); });
    EXPECT_NE(msg.find(bc.field), std::string::npos)
        << bc.what << ": message must name '" << bc.field << "', got: " << msg;
  }
  // chain_of_experts divisibility: the message names top-k too
  LayerConfig coe = valid_config();
  coe.router = Router::chain_of_experts;
  coe.top_k = 3;
  EXPECT_NE(config_error_message([&] { coe.validate(); }).find("top-k"), std::string::npos);
}

TEST(Config, LayerForwardRejectsAnInvalidConfig) {
  LayerConfig cfg = valid_config();
  const auto p = random_params<double>(cfg, 1);
  const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 2);
  cfg.top_k = cfg.experts + 1;
  LayerForward<double> fwd;
  const std::string msg = config_error_message([&] { layer_forward(cfg, p, x.data(), fwd); });
  EXPECT_NE(msg.find("top-k"), std::string::npos) << msg;
}

TEST(Config, UnknownNamesListTheAllowedValues) {
  {
    const std::string msg = config_error_message([] { parse_router("top2"); });
    EXPECT_NE(msg.find("router"), std::string::npos) << msg;
    EXPECT_NE(msg.find("top2"), std::string::npos) << msg;
    for (Router r : kAllRouters)
      EXPECT_NE(msg.find(std::string(name(r))), std::string::npos) << name(r) << " in " << msg;
  }
  {
    const std::string msg = config_error_message([] { parse_layout("sparse"); });
    EXPECT_NE(msg.find("layout"), std::string::npos) << msg;
    for (Layout l : kAllLayouts)
      EXPECT_NE(msg.find(std::string(name(l))), std::string::npos) << name(l) << " in " << msg;
  }
  {
    const std::string msg = config_error_message([] { parse_activation("relu"); });
    EXPECT_NE(msg.find("activation"), std::string::npos) << msg;
    for (Activation a : {Activation::gelu, Activation::swiglu})
      EXPECT_NE(msg.find(std::string(name(a))), std::string::npos) << name(a) << " in " << msg;
  }
  {
    const std::string msg = config_error_message([] { parse_router("", "--router"); });
    EXPECT_NE(msg.find("--router"), std::string::npos) << "the caller's field name: " << msg;
  }
}

TEST(Config, NamesRoundTripThroughParse) {
  for (Router r : kAllRouters) EXPECT_EQ(parse_router(name(r)), r);
  for (Layout l : kAllLayouts) EXPECT_EQ(parse_layout(name(l)), l);
  for (Activation a : {Activation::gelu, Activation::swiglu}) EXPECT_EQ(parse_activation(name(a)), a);
  for (SecondPolicy s : {SecondPolicy::all, SecondPolicy::random, SecondPolicy::threshold,
                         SecondPolicy::none})
    EXPECT_EQ(parse_second_policy(name(s)), s);
}

TEST(Layer, ParametersOfTheWrongShapeAreRejectedByName) {
  for (Router r : kAllRouters) {
    LayerConfig cfg = small_config(r, Layout::dropless, Activation::swiglu);
    cfg.shared_experts = 1;
    SCOPED_TRACE(std::string(name(r)));
    const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 9);
    auto good = random_params<double>(cfg, 10);
    const size_t tensors = parameter_list(good).size();
    for (size_t i = 0; i < tensors; ++i) {
      auto bad = good;
      auto list = parameter_list(bad);
      list[i].second->pop_back();
      LayerForward<double> fwd;
      const std::string msg = config_error_message([&] { layer_forward(cfg, bad, x.data(), fwd); });
      EXPECT_NE(msg.find(list[i].first), std::string::npos)
          << "short " << list[i].first << " must be named: " << msg;
    }
    // a parameter the router does not have is rejected too (the config and params disagree)
    auto extra = good;
    extra.w_noise.assign(r == Router::noisy_topk ? 1 : cfg.hidden * cfg.experts, 0.5);
    LayerForward<double> fwd;
    EXPECT_NE(config_error_message([&] { layer_forward(cfg, extra, x.data(), fwd); }).find("w_noise"),
              std::string::npos);
  }
}

TEST(Layer, NonFiniteInputIsRejectedNotRouted) {
  for (Router r : kAllRouters) {
    LayerConfig cfg = small_config(r, Layout::dropless, Activation::gelu);
    SCOPED_TRACE(std::string(name(r)));
    const auto p = random_params<double>(cfg, 3);
    const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 4);
    {
      auto bad_x = x;
      bad_x[3 * cfg.hidden + 2] = std::numeric_limits<double>::quiet_NaN();
      LayerForward<double> fwd;
      const std::string msg = config_error_message([&] { layer_forward(cfg, p, bad_x.data(), fwd); });
      EXPECT_TRUE(mentions_non_finite_logits(msg)) << "NaN in x: " << msg;
    }
    {
      auto bad_p = p;
      bad_p.w_gate[1] = std::numeric_limits<double>::infinity();
      LayerForward<double> fwd;
      const std::string msg = config_error_message([&] { layer_forward(cfg, bad_p, x.data(), fwd); });
      EXPECT_TRUE(mentions_non_finite_logits(msg)) << "Inf in w_gate: " << msg;
    }
  }
}

TEST(Layer, NonFiniteInputIsRejectedInFloatToo) {
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::padded, Activation::swiglu);
  const auto p = random_params<float>(cfg, 5);
  auto x = random_vector<float>(cfg.tokens * cfg.hidden, 6);
  x[0] = -std::numeric_limits<float>::infinity();
  LayerForward<float> fwd;
  const std::string msg = config_error_message([&] { layer_forward(cfg, p, x.data(), fwd); });
  EXPECT_TRUE(mentions_non_finite_logits(msg)) << msg;
}

}  // namespace
}  // namespace moe::test
