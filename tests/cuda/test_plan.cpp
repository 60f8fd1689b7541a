// CUDA plan vs the CPU reference build_plan: every field, bit for bit, on poisoned buffers.
#include <gtest/gtest.h>

#include "cuda_test_util.hpp"
#include "moe/cuda/parity.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"

namespace moe::test {
namespace {

class PlanParity : public ::testing::TestWithParam<cuda::ParityCase> {};

TEST_P(PlanParity, MatchesTheCpuPlanInEveryField) {
  MOE_REQUIRE_GPU();
  const cuda::ParityCase& c = GetParam();
  if (c.large && small_only()) GTEST_SKIP() << "large case (MOE_TEST_SMALL)";
  for (uint64_t seed : {11u, 12u})  // fresh inputs each round
    for (const cuda::ParityResult& r : cuda::check_plan(c, seed))
      EXPECT_TRUE(r.pass()) << r.stage << " seed " << seed << ": " << r.mismatches << " of "
                            << r.elements << " differ:" << r.detail;
}

TEST_P(PlanParity, RepeatedRunsAreBitwiseIdentical) {
  MOE_REQUIRE_GPU();
  const cuda::ParityCase& c = GetParam();
  if (c.large && small_only()) GTEST_SKIP() << "large case (MOE_TEST_SMALL)";
  const cuda::PlanShape shape = cuda::parity_shape(c);
  cuda::PlanBuffers a(shape), b(shape);
  cuda::RoutingBuffers routing;
  cuda::upload_routing(cuda::parity_routing(c, 99), routing, nullptr);
  a.poison(nullptr, 0x11);
  b.poison(nullptr, 0x22);
  cuda::plan_forward(routing.view(), a.view(), nullptr);
  cuda::plan_forward(routing.view(), b.view(), nullptr);
  const DispatchPlan pa = cuda::download_plan(a.view(), nullptr);
  const DispatchPlan pb = cuda::download_plan(b.view(), nullptr);
  EXPECT_EQ(pa.offsets, pb.offsets);
  EXPECT_EQ(pa.row_token, pb.row_token);
  EXPECT_EQ(pa.row_choice, pb.row_choice);
  EXPECT_EQ(pa.token_rows, pb.token_rows);
  EXPECT_EQ(pa.choice_row, pb.choice_row);
}

INSTANTIATE_TEST_SUITE_P(Shapes, PlanParity, ::testing::ValuesIn(cuda::parity_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(PlanShape, RejectsShapesOutsideTheIndexRange) {
  cuda::PlanShape s;
  s.tokens = 10;
  s.experts = 0;
  s.top_k = 1;
  s.choices = 10;
  EXPECT_THROW(s.validate(), ConfigError);
  s.experts = 4;
  s.choices = 11;  // not T*K
  EXPECT_THROW(s.validate(), ConfigError);
  s.choices = 10;
  EXPECT_NO_THROW(s.validate());
}

}  // namespace
}  // namespace moe::test
