// CUDA gate + route (forward and backward) vs the CPU reference router, every sparse router;
// expert choice in position groups against the CPU route of each group; soft MoE's dense dispatch
// and combine in fp32 and bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/stages.hpp"
#include "cuda_test_util.hpp"
#include "moe/cuda/parity.hpp"
#include "moe/cuda/route.hpp"
#include "moe/layer.hpp"

namespace moe::test {
namespace {

class RouteParity : public ::testing::TestWithParam<cuda::RouteCase> {};

TEST_P(RouteParity, MatchesTheCpuRouterForwardAndBackward) {
  MOE_REQUIRE_GPU();
  const cuda::RouteCase& c = GetParam();
  if (c.large && small_only()) GTEST_SKIP() << "large case (MOE_TEST_SMALL)";
  for (uint64_t seed : {21u, 22u}) {
    bool backward_checked = false;
    for (const cuda::ParityResult& r : cuda::check_route(c, seed)) {
      if (r.stage == "route.near_ties_skipped") {
        // Rounding-level ties are allowed to pick differently, but they must stay rare.
        EXPECT_LE(r.elements, std::max<int64_t>(1, c.cfg.tokens / 100)) << "too many near ties";
        continue;
      }
      backward_checked = backward_checked || r.stage.rfind("route_backward", 0) == 0;
      EXPECT_TRUE(r.pass()) << r.stage << " " << r.dtype << " seed " << seed << ": "
                            << r.mismatches << " of " << r.elements << " differ (max error "
                            << r.max_error << " x tolerance):" << r.detail;
    }
    if (!backward_checked) std::cout << "  (backward skipped for seed " << seed << ": near ties)\n";
  }
}

INSTANTIATE_TEST_SUITE_P(Routers, RouteParity, ::testing::ValuesIn(cuda::route_cases()),
                         [](const auto& info) { return info.param.name; });

class SoftMoeParity : public ::testing::TestWithParam<cuda::RouteCase> {};

// fp32 and bf16, forward and backward, outputs poisoned, two runs bitwise identical.
TEST_P(SoftMoeParity, MatchesTheCpuSoftMoeForwardAndBackward) {
  MOE_REQUIRE_GPU();
  if (GetParam().large && small_only()) GTEST_SKIP() << "large case (MOE_TEST_SMALL)";
  for (const cuda::ParityResult& r : cuda::check_soft_moe(GetParam(), 31))
    EXPECT_TRUE(r.pass()) << r.stage << " " << r.dtype << ": " << r.mismatches << " of "
                          << r.elements << " differ (max error " << r.max_error
                          << " x tolerance):" << r.detail;
}

INSTANTIATE_TEST_SUITE_P(Shapes, SoftMoeParity, ::testing::ValuesIn(cuda::soft_moe_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(RouteDeterminism, RepeatedRunsAreBitwiseIdentical) {
  MOE_REQUIRE_GPU();
  for (const cuda::RouteCase& c : cuda::route_cases()) {
    if (c.large) continue;
    const LayerConfig& cfg = c.cfg;
    const int64_t T = cfg.tokens, E = cfg.experts;
    DeviceArray<float> logits(random_vector<float>(T * E, 3)), noise(random_vector<float>(T * E, 4));
    cuda::RouteBuffers a(cfg), b(cfg);
    const float* nr = cfg.router == Router::noisy_topk ? noise.get() : nullptr;
    cuda::route_forward(cfg, 0, logits.get(), nr, nullptr, a, nullptr);
    cuda::route_forward(cfg, 0, logits.get(), nr, nullptr, b, nullptr);
    const Routing<float> ra = cuda::download_routing(a.routing.view(), nullptr);
    const Routing<float> rb = cuda::download_routing(b.routing.view(), nullptr);
    EXPECT_EQ(ra.choice_expert, rb.choice_expert) << c.name;
    EXPECT_TRUE(same_bytes(ra.choice_weight, rb.choice_weight)) << c.name;
    double la = 0, lb = 0;
    MOE_CUDA_CHECK(cudaMemcpy(&la, a.aux_loss, 8, cudaMemcpyDeviceToHost));
    MOE_CUDA_CHECK(cudaMemcpy(&lb, b.aux_loss, 8, cudaMemcpyDeviceToHost));
    EXPECT_EQ(la, lb) << c.name;
  }
}

// ---- expert choice in G position groups (route.hpp): one grouped route against G CPU routes of
// B tokens each. The gate is the identity (H = E), so the CPU's logits are the GPU's input bits;
// cpu::route_backward's dx is then its dz.
struct GroupedEcCase {
  std::string name;
  int64_t B, G, E;
  double capacity_factor;
  double z_coef = 0;
};

class RouteExpertChoiceGroups : public ::testing::TestWithParam<GroupedEcCase> {};

TEST_P(RouteExpertChoiceGroups, MatchesTheCpuRouteOfEachGroupForwardAndBackward) {
  MOE_REQUIRE_GPU();
  const GroupedEcCase& c = GetParam();
  const int64_t B = c.B, G = c.G, E = c.E, T = B * G;
  LayerConfig cfg;
  cfg.router = Router::expert_choice;
  cfg.tokens = T;
  cfg.hidden = E;
  cfg.experts = E;
  cfg.top_k = 1;
  cfg.capacity_factor = c.capacity_factor;
  cfg.z_coef = c.z_coef;
  cfg.validate();
  LayerConfig group_cfg = cfg;
  group_cfg.tokens = B;
  const int64_t C = group_cfg.capacity();
  Params<float> p;
  p.w_gate.assign(static_cast<size_t>(E * E), 0.f);
  for (int64_t e = 0; e < E; ++e) p.w_gate[e * E + e] = 1.f;

  for (uint64_t seed : {41u, 42u}) {
    const std::vector<float> logits = random_vector<float>(static_cast<size_t>(T * E), seed, 2.0);
    const std::vector<float> d_weight = random_vector<float>(static_cast<size_t>(E * G * C), seed + 100);
    // CPU: group g is the call over tokens b*G + g, b ascending
    std::vector<RouteStep<float>> steps(static_cast<size_t>(G));
    std::vector<float> dz_ref(static_cast<size_t>(T * E));
    double aux_ref = 0;
    int64_t near_ties = 0;
    std::vector<char> tied(static_cast<size_t>(E * G), 0);
    for (int64_t g = 0; g < G; ++g) {
      std::vector<float> x(static_cast<size_t>(B * E));
      for (int64_t b = 0; b < B; ++b)
        std::copy_n(&logits[(b * G + g) * E], E, &x[b * E]);
      RouteStep<float>& s = steps[static_cast<size_t>(g)];
      cpu::route_forward(group_cfg, p, 0, x.data(), s, nullptr);
      ASSERT_EQ(s.routing.size(), E * C);
      aux_ref += s.aux_loss / double(G);
      // a column whose top C + 1 probabilities hold a rounding-level gap may order differently
      for (int64_t e = 0; e < E; ++e) {
        std::vector<float> col(static_cast<size_t>(B));
        for (int64_t b = 0; b < B; ++b) col[b] = s.probs[b * E + e];
        std::sort(col.begin(), col.end(), std::greater<float>());
        for (int64_t j = 0; j + 1 < std::min(B, C + 1); ++j)
          if (col[j] != col[j + 1] &&  // exact ties: (prob desc, token asc) on both sides
              double(col[j]) - col[j + 1] <= 1e-5 * (std::abs(double(col[j])) + 1e-3))
            tied[e * G + g] = 1;
        near_ties += tied[e * G + g];
      }
      // The objective is sum of <d_weight, weight> + the mean of the groups' z-losses (the CPU
      // model's 1/S scaling): the group's backward gets G * d_weight and its dz is divided by G.
      std::vector<float> dw(static_cast<size_t>(E * C)), dx(static_cast<size_t>(B * E), 0.f);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < C; ++j) dw[e * C + j] = float(G) * d_weight[(e * G + g) * C + j];
      Params<float> grads;
      grads.w_gate.assign(p.w_gate.size(), 0.f);
      cpu::route_backward(group_cfg, p, 0, s, dw.data(), dx.data(), grads);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = 0; e < E; ++e) dz_ref[(b * G + g) * E + e] = dx[b * E + e] / float(G);
    }
    EXPECT_LE(near_ties, std::max<int64_t>(1, E * G / 100)) << "too many near ties";

    cuda::RouteBuffers buf(cfg, G);
    ASSERT_EQ(buf.ec_capacity, C);
    ASSERT_EQ(buf.routing.choices, E * G * C);
    DeviceArray<float> d_logits(logits), d_dw(d_weight), d_dz(static_cast<size_t>(T * E));
    MOE_CUDA_CHECK(cudaMemset(buf.routing.arena.data(), 0x7b, buf.routing.arena.bytes()));
    MOE_CUDA_CHECK(cudaMemset(buf.aux_loss, 0xff, sizeof(double)));
    d_dz.poison();
    cuda::route_forward(cfg, 0, d_logits.get(), nullptr, nullptr, buf, nullptr);
    cuda::route_backward(cfg, 0, buf, d_logits.get(), nullptr, d_dw.get(), d_dz.get(), nullptr,
                         nullptr);
    const Routing<float> r = cuda::download_routing(buf.routing.view(), nullptr);
    double aux = 0;
    MOE_CUDA_CHECK(cudaMemcpy(&aux, buf.aux_loss, sizeof aux, cudaMemcpyDeviceToHost));
    ASSERT_EQ(r.top_k, 0);
    ASSERT_EQ(r.size(), E * G * C);

    // choice (e*G + g)*C + j on the GPU is choice e*C + j of group g's CPU call, token b -> b*G + g
    std::vector<int32_t> token, want_token, expert, want_expert;
    std::vector<float> weight;
    std::vector<double> want_weight;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t g = 0; g < G; ++g) {
        if (tied[e * G + g]) continue;
        const Routing<float>& cr = steps[static_cast<size_t>(g)].routing;
        for (int64_t j = 0; j < C; ++j) {
          const int64_t i = (e * G + g) * C + j, ci = e * C + j;
          token.push_back(r.choice_token[i]);
          want_token.push_back(cr.choice_token[ci] * int32_t(G) + int32_t(g));
          expert.push_back(r.choice_expert[i]);
          want_expert.push_back(cr.choice_expert[ci]);
          weight.push_back(r.choice_weight[i]);
          want_weight.push_back(cr.choice_weight[ci]);
        }
      }
    EXPECT_TRUE(equal("choice_token", token, want_token)) << c.name << " seed " << seed;
    EXPECT_TRUE(equal("choice_expert", expert, want_expert)) << c.name << " seed " << seed;
    // the GPU's softmax uses the fast exponential: a few ulp from the CPU's
    EXPECT_TRUE(close("choice_weight", weight, want_weight, 1e-7, 1e-5)) << c.name;
    EXPECT_NEAR(aux, aux_ref, 1e-9 + 1e-5 * std::abs(aux_ref)) << "z-loss, mean over groups";
    if (near_ties == 0) {
      const std::vector<double> want_dz(dz_ref.begin(), dz_ref.end());
      EXPECT_TRUE(close("dz", d_dz.download(), want_dz, 1e-6, 1e-4)) << c.name << " seed " << seed;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RouteExpertChoiceGroups,
    ::testing::Values(
        GroupedEcCase{"one_group_b64_e8", 64, 1, 8, 1.25},
        GroupedEcCase{"b16_g24_e8", 16, 24, 8, 1.25},
        // one token per group: every expert takes it (C = min(B, ceil(cf/E)) = 1)
        GroupedEcCase{"b1_g48_e8", 1, 48, 8, 1.25},
        // capacity rounding: ceil(2 * 6 / 8) = 2; ceil(1 * 10 / 4) = 3; 1 * 16 / 8 = 2 exactly
        GroupedEcCase{"b6_g32_e8_cf2", 6, 32, 8, 2.0},
        GroupedEcCase{"b10_g7_e4_cf1", 10, 7, 4, 1.0},
        GroupedEcCase{"b16_g5_e8_cf1_exact", 16, 5, 8, 1.0},
        // C = B: each expert takes every token of every group
        GroupedEcCase{"b5_g9_e3_cf4_all", 5, 9, 3, 4.0},
        // E not a power of two, many groups, the z-loss (its mean over T = mean over groups)
        GroupedEcCase{"b12_g40_e13_zloss", 12, 40, 13, 1.5, 1e-3},
        GroupedEcCase{"b8_g64_e1", 8, 64, 1, 1.0}),
    [](const auto& info) { return info.param.name; });

// ---- top-k on exact ties: logits from a few values (many tokens have equal logits, and -0 next
// to +0), every register width of the selection (E up to 32, 64, 128, 256) and the streaming one
// past 256, against the CPU router. The gate is the identity (H = E), so the CPU's logits are the
// GPU's input bits except that -0 becomes +0 there (0 * w terms): the order (score desc, expert
// asc) must not tell them apart.
TEST(RouteTopK, PicksTheCpuRoutersExpertsOnExactTies) {
  MOE_REQUIRE_GPU();
  const float kValues[] = {-2.f, -1.f, -0.f, 0.f, 0.5f, 1.f, 3.f};
  for (Router router : {Router::softmax_topk, Router::sigmoid_bias})
    for (int64_t E : {5, 32, 33, 64, 100, 128, 129, 256, 300})
      for (int64_t K : {1, 2, 8}) {
        if (K > E) continue;
        LayerConfig cfg;
        cfg.router = router;
        cfg.tokens = 96;
        cfg.hidden = E;
        cfg.experts = E;
        cfg.top_k = K;
        cfg.validate();
        const int64_t T = cfg.tokens;
        std::vector<float> logits(static_cast<size_t>(T * E));
        uint64_t state = 0x9e3779b97f4a7c15ull ^ uint64_t(E * 131 + K);
        for (float& v : logits) {
          state = state * 6364136223846793005ull + 1442695040888963407ull;
          v = kValues[(state >> 33) % 7];
        }
        Params<float> p;
        p.w_gate.assign(static_cast<size_t>(E * E), 0.f);
        for (int64_t e = 0; e < E; ++e) p.w_gate[e * E + e] = 1.f;
        if (router == Router::sigmoid_bias) p.expert_bias.assign(static_cast<size_t>(E), 0.f);
        RouteStep<float> ref;
        cpu::route_forward(cfg, p, 0, logits.data(), ref, nullptr);

        cuda::RouteBuffers buf(cfg);
        DeviceArray<float> d_logits(logits);
        MOE_CUDA_CHECK(cudaMemset(buf.routing.arena.data(), 0x7b, buf.routing.arena.bytes()));
        cuda::route_forward(cfg, 0, d_logits.get(), nullptr, nullptr, buf, nullptr);
        const Routing<float> r = cuda::download_routing(buf.routing.view(), nullptr);
        const std::string what = std::string(name(router)) + " E=" + std::to_string(E) +
                                 " K=" + std::to_string(K);
        ASSERT_EQ(r.size(), T * K) << what;
        EXPECT_TRUE(equal("choice_expert", r.choice_expert, ref.routing.choice_expert)) << what;
        EXPECT_TRUE(equal("choice_token", r.choice_token, ref.routing.choice_token)) << what;
        const std::vector<double> want(ref.routing.choice_weight.begin(),
                                       ref.routing.choice_weight.end());
        EXPECT_TRUE(close("choice_weight", r.choice_weight, want, 1e-7, 1e-5)) << what;
      }
}

// The softmax top-k's lane-group kernel against the warp-per-token one: every output bit for bit
// (lse, probabilities, selection, choices and their weights), at every lane-group width (E up to
// 8, 16, 32, 64, 128, 256), K up to 8, with and without renormalisation and the second-choice
// policy, on random logits and on logits drawn from a few values (exact ties, -0 next to +0).
// Outputs poisoned first; the token count leaves the last block partly empty.
TEST(RouteTopK, LaneGroupsWriteTheWarpKernelsBits) {
  MOE_REQUIRE_GPU();
  const float kValues[] = {-2.f, -1.f, -0.f, 0.f, 0.5f, 1.f, 3.f};
  struct Variant { Router router; bool renormalize; SecondPolicy policy; };
  const Variant variants[] = {{Router::softmax_topk, true, SecondPolicy::all},
                              {Router::softmax_topk, false, SecondPolicy::all},
                              {Router::softmax_topk, true, SecondPolicy::threshold},
                              {Router::softmax_topk, false, SecondPolicy::random},
                              {Router::softmax_topk, true, SecondPolicy::none},
                              {Router::switch_top1, false, SecondPolicy::all}};
  int64_t compared = 0;
  for (const Variant& var : variants)
    for (int64_t E : {1, 3, 8, 9, 16, 17, 32, 40, 64, 100, 128, 129, 200, 256})
      for (int64_t K : {1, 2, 3, 8})
        for (bool few_values : {false, true}) {
          if (K > E || (var.router == Router::switch_top1 && K != 1)) continue;
          if (var.policy != SecondPolicy::all && K != 2) continue;
          LayerConfig cfg;
          cfg.router = var.router;
          cfg.tokens = 333;
          cfg.hidden = E;
          cfg.experts = E;
          cfg.top_k = K;
          cfg.renormalize = var.renormalize;
          cfg.second_policy = var.policy;
          cfg.second_threshold = 0.2;
          cfg.training = true;
          cfg.validate();
          const int64_t T = cfg.tokens;
          std::vector<float> logits =
              random_vector<float>(static_cast<size_t>(T * E), uint64_t(E * 10 + K), 2.0);
          if (few_values) {
            uint64_t state = 0x9e3779b97f4a7c15ull ^ uint64_t(E * 131 + K);
            for (float& v : logits) {
              state = state * 6364136223846793005ull + 1442695040888963407ull;
              v = kValues[(state >> 33) % 7];
            }
          }
          DeviceArray<float> d_logits(logits);
          cuda::RouteBuffers group(cfg), warp(cfg);
          for (cuda::RouteBuffers* b : {&group, &warp})
            MOE_CUDA_CHECK(cudaMemset(b->arena.data(), 0xff, b->arena.bytes()));
          MOE_CUDA_CHECK(cudaMemset(group.routing.arena.data(), 0x7b, group.routing.arena.bytes()));
          MOE_CUDA_CHECK(cudaMemset(warp.routing.arena.data(), 0x5c, warp.routing.arena.bytes()));
          cuda::route_choices(cfg, 0, d_logits.get(), nullptr, nullptr, group, nullptr);
          cuda::route_choices(cfg, 0, d_logits.get(), nullptr, nullptr, warp, nullptr,
                              cuda::TopKKernel::warp_per_token);
          auto get = [](const auto* p, int64_t n) {
            std::vector<std::remove_const_t<std::remove_pointer_t<decltype(p)>>> h(
                static_cast<size_t>(n));
            MOE_CUDA_CHECK(cudaMemcpy(h.data(), p, h.size() * sizeof(h[0]),
                                      cudaMemcpyDeviceToHost));
            return h;
          };
          const std::string what = std::string(name(var.router)) + " E=" + std::to_string(E) +
                                   " K=" + std::to_string(K) +
                                   " renormalize=" + std::to_string(var.renormalize) +
                                   " policy=" + std::to_string(int(var.policy)) +
                                   (few_values ? " few values" : " random");
          EXPECT_TRUE(same_bytes(get(group.lse, T), get(warp.lse, T))) << what << ": lse";
          EXPECT_TRUE(same_bytes(get(group.probs, T * E), get(warp.probs, T * E)))
              << what << ": probs";
          EXPECT_TRUE(same_bytes(get(group.selected, T * K), get(warp.selected, T * K)))
              << what << ": selected";
          const Routing<float> rg = cuda::download_routing(group.routing.view(), nullptr);
          const Routing<float> rw = cuda::download_routing(warp.routing.view(), nullptr);
          EXPECT_TRUE(equal("choice_token", rg.choice_token, rw.choice_token)) << what;
          EXPECT_TRUE(equal("choice_expert", rg.choice_expert, rw.choice_expert)) << what;
          EXPECT_TRUE(same_bytes(rg.choice_weight, rw.choice_weight)) << what << ": weights";
          ++compared;
        }
  EXPECT_GT(compared, 100);
}

// Group capacity: the config's capacity for B = T / G tokens (no GPU needed).
TEST(RouteExpertChoiceGroupsConfig, CapacityIsThatOfOneGroupAndGroupsMustDivideTokens) {
  LayerConfig cfg;
  cfg.router = Router::expert_choice;
  cfg.tokens = 6 * 32;
  cfg.experts = 8;
  cfg.capacity_factor = 2.0;
  EXPECT_EQ(cuda::ec_group_capacity(cfg, 32), 2);   // ceil(2 * 6 / 8)
  EXPECT_EQ(cuda::ec_group_capacity(cfg, 1), 48);   // ceil(2 * 192 / 8)
  EXPECT_EQ(cuda::ec_group_capacity(cfg, 192), 1);  // one token: min(B, ceil(2 / 8))
  cfg.capacity_factor = 1.0;
  cfg.tokens = 16 * 5;
  EXPECT_EQ(cuda::ec_group_capacity(cfg, 5), 2);    // exactly 16 / 8, not rounded up
  EXPECT_THROW(cuda::ec_group_capacity(cfg, 3), ConfigError);
  EXPECT_THROW(cuda::ec_group_capacity(cfg, 0), ConfigError);
}

// The grouped sort's index arithmetic (EcGroups, shared with the kernels) on the host, no GPU
// needed: the sort input filled as route_topk_kernel fills it, each segment sorted stably by
// descending key (cub::DeviceSegmentedSort::StableSortPairsDescending), the picks taken as
// route_ec_pick_kernel takes them, from the CPU's own probabilities. The result must be the CPU
// route of each group choice for choice, ties included (rows repeat, so probabilities tie exactly).
TEST(RouteExpertChoiceGroupsEmulation, GroupedSortIndexingGivesTheCpuRouteOfEachGroup) {
  struct Case { int64_t B, G, E; double cf; bool repeat_rows; };
  for (const Case& k : {Case{64, 1, 8, 1.25, false}, Case{16, 24, 8, 1.25, false},
                        Case{1, 48, 8, 1.25, false}, Case{6, 32, 8, 2.0, false},
                        Case{10, 7, 4, 1.0, true}, Case{5, 9, 3, 4.0, true},
                        Case{12, 40, 13, 1.5, true}, Case{8, 16, 1, 1.0, false}}) {
    const int64_t B = k.B, G = k.G, E = k.E, T = B * G;
    SCOPED_TRACE("B=" + std::to_string(B) + " G=" + std::to_string(G) + " E=" + std::to_string(E));
    LayerConfig cfg;
    cfg.router = Router::expert_choice;
    cfg.tokens = B;  // one group's call
    cfg.hidden = E;
    cfg.experts = E;
    cfg.capacity_factor = k.cf;
    cfg.validate();
    const int64_t C = cfg.capacity();
    LayerConfig all = cfg;
    all.tokens = T;
    ASSERT_EQ(cuda::ec_group_capacity(all, G), C);
    Params<float> p;
    p.w_gate.assign(static_cast<size_t>(E * E), 0.f);
    for (int64_t e = 0; e < E; ++e) p.w_gate[e * E + e] = 1.f;
    std::vector<float> logits = random_vector<float>(static_cast<size_t>(T * E), 7, 2.0);
    if (k.repeat_rows)  // token t gets the logits of token t % 3: exact ties inside a group
      for (int64_t t = 0; t < T; ++t)
        std::copy_n(&logits[(t % 3) * E], E, &logits[t * E]);

    std::vector<RouteStep<float>> steps(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      std::vector<float> x(static_cast<size_t>(B * E));
      for (int64_t b = 0; b < B; ++b) std::copy_n(&logits[(b * G + g) * E], E, &x[b * E]);
      cpu::route_forward(cfg, p, 0, x.data(), steps[g], nullptr);
    }
    const cuda::EcGroups eg{T, G, C};
    std::vector<float> keys(static_cast<size_t>(E * T), -1.f);
    std::vector<int32_t> values(static_cast<size_t>(E * T), -1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = eg.sort_index(t, e);
        ASSERT_TRUE(i >= 0 && i < E * T && values[i] == -1) << "entry " << i << " written twice";
        keys[i] = steps[t % G].probs[(t / G) * E + e];
        values[i] = static_cast<int32_t>(t);
      }
    for (int64_t seg = 0; seg < E * G; ++seg) {
      std::vector<std::pair<float, int32_t>> v;
      for (int64_t i = seg * B; i < (seg + 1) * B; ++i) v.emplace_back(keys[i], values[i]);
      std::stable_sort(v.begin(), v.end(),
                       [](const auto& a, const auto& b) { return a.first > b.first; });
      for (int64_t i = 0; i < B; ++i) std::tie(keys[seg * B + i], values[seg * B + i]) = v[i];
    }
    int64_t ties = 0;
    for (int64_t i = 0; i < E * G * C; ++i) {
      const int64_t src = eg.pick_source(i), e = eg.pick_expert(i);
      const int64_t g = (i / C) % G, j = i % C;
      const Routing<float>& r = steps[g].routing;
      ASSERT_EQ(e, r.choice_expert[e * C + j]) << "choice " << i;
      ASSERT_EQ(values[src], int64_t(r.choice_token[e * C + j]) * G + g) << "choice " << i;
      ASSERT_EQ(keys[src], r.choice_weight[e * C + j]) << "choice " << i;
      if (j > 0 && keys[src] == keys[src - 1]) ++ties;
    }
    if (k.repeat_rows && B > 3) {
      EXPECT_GT(ties, 0) << "the case should hold exact ties";
    }
  }
}

}  // namespace
}  // namespace moe::test
