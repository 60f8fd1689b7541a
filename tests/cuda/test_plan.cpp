// CUDA plan vs the CPU reference build_plan: every field, bit for bit, on poisoned buffers;
// also on the routing of expert choice in position groups (route.hpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

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

// Expert choice in G position groups: choice (e*G + g)*C + j picks a token b*G + g of group g, each
// expert C distinct tokens per group, in any order. The device plan equals build_plan in every
// field: one segment per expert with every group's picks, group by group; a token's choices in
// expert order (0..E of them); nothing dropped with the padded capacity G*C.
TEST(PlanExpertChoiceGroups, MatchesTheCpuPlanInEveryField) {
  MOE_REQUIRE_GPU();
  struct Case { int64_t B, G, E, C; Layout layout; };
  for (const Case& k : {Case{16, 24, 8, 3, Layout::dropless}, Case{1, 40, 6, 1, Layout::dropless},
                        Case{6, 32, 8, 2, Layout::padded}, Case{12, 20, 13, 2, Layout::block},
                        Case{5, 9, 3, 5, Layout::dropless}, Case{64, 1, 8, 10, Layout::padded}}) {
    const int64_t B = k.B, G = k.G, E = k.E, C = k.C, T = B * G, N = E * G * C;
    SCOPED_TRACE("B=" + std::to_string(B) + " G=" + std::to_string(G) + " E=" +
                 std::to_string(E) + " C=" + std::to_string(C) + " " + std::string(name(k.layout)));
    for (uint64_t seed : {5u, 6u}) {
      Routing<float> r;
      r.tokens = T;
      r.experts = E;
      r.top_k = 0;
      r.choice_token.resize(static_cast<size_t>(N));
      r.choice_expert.resize(static_cast<size_t>(N));
      r.choice_weight.resize(static_cast<size_t>(N));
      std::vector<int32_t> order(static_cast<size_t>(B));
      for (int64_t e = 0; e < E; ++e)
        for (int64_t g = 0; g < G; ++g) {
          // a seeded shuffle of the group's tokens; the first C are the picks
          for (int64_t b = 0; b < B; ++b) order[b] = static_cast<int32_t>(b);
          for (int64_t b = B - 1; b > 0; --b) {
            const uint64_t u = splitmix64(seed ^ splitmix64(uint64_t((e * G + g) * B + b)));
            std::swap(order[b], order[int64_t(u % uint64_t(b + 1))]);
          }
          for (int64_t j = 0; j < C; ++j) {
            const int64_t i = (e * G + g) * C + j;
            r.choice_token[i] = order[j] * int32_t(G) + int32_t(g);
            r.choice_expert[i] = static_cast<int32_t>(e);
            r.choice_weight[i] = float(counter_uniform(seed, RngStream::init, uint64_t(i)));
          }
        }
      cuda::PlanShape shape;
      shape.tokens = T;
      shape.experts = E;
      shape.top_k = 0;
      shape.choices = N;
      shape.layout = k.layout;
      shape.capacity = k.layout == Layout::padded ? G * C : 0;
      shape.block_size = k.layout == Layout::block ? 16 : 1;
      const DispatchPlan want = build_plan(r, k.layout, shape.capacity, shape.block_size);
      cuda::PlanBuffers plan(shape);
      cuda::RoutingBuffers routing;
      cuda::upload_routing(r, routing, nullptr);
      plan.poison(nullptr);
      cuda::plan_forward(routing.view(), plan.view(), nullptr);
      const DispatchPlan got = cuda::download_plan(plan.view(), nullptr);
      EXPECT_EQ(got.rows, want.rows);
      EXPECT_EQ(got.counts, want.counts);
      EXPECT_EQ(got.kept, want.kept);
      EXPECT_EQ(got.offsets, want.offsets);
      EXPECT_EQ(got.row_token, want.row_token);
      EXPECT_EQ(got.row_choice, want.row_choice);
      EXPECT_EQ(got.token_offsets, want.token_offsets);
      EXPECT_EQ(got.token_rows, want.token_rows);
      EXPECT_EQ(got.token_choices, want.token_choices);
      EXPECT_EQ(got.choice_row, want.choice_row);
      EXPECT_EQ(got.dropped_by_capacity, 0);
      EXPECT_EQ(want.dropped_by_capacity, 0);
    }
  }
}

}  // namespace
}  // namespace moe::test
