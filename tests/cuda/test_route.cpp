// CUDA gate + route (forward and backward) vs the CPU reference router, every sparse router;
// soft MoE's dense dispatch and combine in fp32 and bf16.
#include <gtest/gtest.h>

#include "cuda_test_util.hpp"
#include "moe/cuda/parity.hpp"
#include "moe/cuda/route.hpp"

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

}  // namespace
}  // namespace moe::test
