// CUDA permute / combine (forward and backward) vs the CPU reference stages, fp32 and bf16, on
// poisoned outputs and fresh random inputs; determinism; the identity-experts property.
#include <gtest/gtest.h>

#include "cuda_test_util.hpp"
#include "moe/cuda/combine.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/parity.hpp"
#include "moe/cuda/permute.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"

namespace moe::test {
namespace {

struct RowCase {
  cuda::ParityCase plan;
  int64_t hidden;
};
// Test listings show the case name, not a byte dump of the struct.
void PrintTo(const RowCase& c, std::ostream* os) { *os << c.plan.name << "_h" << c.hidden; }

std::vector<RowCase> row_cases() {
  std::vector<RowCase> v;
  for (const cuda::ParityCase& c : cuda::parity_cases()) {
    if (c.large || c.experts > 1000) continue;  // the plan test covers those
    // H = 1, 7: element-wise path; 136 = 17 bf16 vectors (a partial chunk); 1000: several
    // chunks with a tail.
    for (int64_t h : {1, 7, 136, 1000})
      if (c.tokens * h <= 1'000'000) v.push_back({c, h});
  }
  cuda::ParityCase wide = cuda::parity_cases().back();  // block layout, Zipf, K = 4
  wide.name = "t4000_e64_k4_zipf_block128";
  wide.tokens = 4000;
  wide.large = true;
  v.push_back({wide, 4096});
  return v;
}

class RowsParity : public ::testing::TestWithParam<RowCase> {};

TEST_P(RowsParity, MatchesTheCpuStagesInFp32AndBf16) {
  MOE_REQUIRE_GPU();
  const RowCase& rc = GetParam();
  if (rc.plan.large && small_only()) GTEST_SKIP() << "large case (MOE_TEST_SMALL)";
  for (const cuda::ParityResult& r : cuda::check_rows(rc.plan, rc.hidden, 31))
    EXPECT_TRUE(r.pass()) << r.stage << " " << r.dtype << ": " << r.mismatches << " of "
                          << r.elements << " differ (max error " << r.max_error
                          << " x tolerance):" << r.detail;
}

INSTANTIATE_TEST_SUITE_P(Shapes, RowsParity, ::testing::ValuesIn(row_cases()),
                         [](const auto& info) {
                           return info.param.plan.name + "_h" + std::to_string(info.param.hidden);
                         });

// One forward + backward of the data path on device buffers (bf16).
// Padded layout with capacity drops: padding rows, dropped choices and tokens without rows.
struct DataPath {
  int64_t H;
  cuda::ParityCase c{"zipf_padded", 3000, 13, 3, cuda::Skew::zipf, Layout::padded, 1.25};
  cuda::PlanShape shape = cuda::parity_shape(c);
  int64_t R = shape.max_rows(), Tn = c.tokens;
  cuda::PlanBuffers plan{shape};
  cuda::RoutingBuffers routing;
  Routing<float> host_routing = cuda::parity_routing(c, 7);
  DeviceArray<__nv_bfloat16> x{size_t(Tn * H)}, xp{size_t(R * H)}, y{size_t(Tn * H)},
      dy{size_t(Tn * H)}, dyp{size_t(R * H)}, dx{size_t(Tn * H)};
  DeviceArray<float> dweight{size_t(shape.choices)};

  explicit DataPath(int64_t hidden = 520) : H(hidden) {
    cuda::upload_routing(host_routing, routing, nullptr);
    cuda::fill_normal(x.get(), Tn * H, 1, 1.f, nullptr);
    cuda::fill_normal(dy.get(), Tn * H, 2, 1.f, nullptr);
  }
  void run() {
    plan.poison(nullptr);
    for (auto* a : {&xp, &y, &dyp, &dx}) a->poison();
    dweight.poison();
    MOE_CUDA_CHECK(cudaMemset(dx.get(), 0, Tn * H * 2));
    cuda::plan_forward(routing.view(), plan.view(), nullptr);
    cuda::permute_forward(plan.view(), x.get(), H, xp.get(), nullptr);
    cuda::combine_forward(plan.view(), routing.view(), xp.get(), H, y.get(), nullptr);
    cuda::combine_backward(plan.view(), routing.view(), xp.get(), dy.get(), H, dyp.get(),
                           dweight.get(), nullptr);
    cuda::permute_backward(plan.view(), dyp.get(), H, dx.get(), nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

// permute backward overwriting dx (a layer's backward, where dx starts) gives the bits of adding
// into a zeroed dx, without reading dx: poisoned first, tokens without rows come out 0.
TEST(RowsPermuteBackward, OverwritingEqualsAddingIntoZeros) {
  MOE_REQUIRE_GPU();
  DataPath p;
  p.run();  // dx: added into zeros
  const auto added = p.dx.download();
  p.dx.poison();
  cuda::permute_backward(p.plan.view(), p.dyp.get(), p.H, p.dx.get(), nullptr,
                         /*accumulate=*/false);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(same_bytes(added, p.dx.download()));
}

// The combine backward without yp (the fused layer's, whose router-weight gradient comes from
// the da GEMM): the same dyp bits as the full kernel, padding rows zeroed, for a vector width
// (520) and the element-wise path (7).
TEST(RowsCombineBackward, WithoutYpWritesTheSameDyp) {
  MOE_REQUIRE_GPU();
  for (int64_t h : {520, 7}) {
    SCOPED_TRACE("H = " + std::to_string(h));
    DataPath p(h);
    p.run();
    const auto full = p.dyp.download();
    p.dyp.poison();
    cuda::combine_backward<__nv_bfloat16>(p.plan.view(), p.routing.view(), nullptr, p.dy.get(),
                                          p.H, p.dyp.get(), nullptr, nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(same_bytes(full, p.dyp.download()));
    EXPECT_THROW(cuda::combine_backward<__nv_bfloat16>(p.plan.view(), p.routing.view(), nullptr,
                                                       p.dy.get(), p.H, p.dyp.get(),
                                                       p.dweight.get(), nullptr),
                 ConfigError);
  }
}

// dweight from the da GEMM's row dots: each choice's parts added in part order, over its weight;
// 0 for a dropped choice and for a zero weight. Random parts, some weights set to 0.
TEST(RowsCombineBackward, DweightFromRowDotsAddsThePartsAndDividesByTheWeight) {
  MOE_REQUIRE_GPU();
  DataPath p(8);
  const int64_t N = p.shape.choices, parts = 3, ld = p.R + 5;
  for (int64_t c = 0; c < N; c += 7) p.host_routing.choice_weight[c] = 0.f;
  cuda::upload_routing(p.host_routing, p.routing, nullptr);
  p.run();
  const std::vector<float> dots = random_vector<float>(parts * ld, 11);
  DeviceArray<float> row_dot(dots);
  p.dweight.poison();
  cuda::combine_dweight_from_row_dots(p.plan.view(), p.routing.view(), row_dot.get(), parts, ld,
                                      p.dweight.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = p.dweight.download();
  std::vector<int32_t> choice_row(static_cast<size_t>(N));
  MOE_CUDA_CHECK(cudaMemcpy(choice_row.data(), p.plan.view().choice_row, N * sizeof(int32_t),
                            cudaMemcpyDeviceToHost));
  int64_t dropped = 0, zero = 0, bad = 0;
  for (int64_t c = 0; c < N; ++c) {
    const int32_t r = choice_row[size_t(c)];
    const float w = p.host_routing.choice_weight[size_t(c)];
    float sum = 0.f;
    if (r >= 0)
      for (int64_t q = 0; q < parts; ++q) sum += dots[size_t(q * ld + r)];
    const float want = r >= 0 && w != 0.f ? sum / w : 0.f;
    dropped += r < 0;
    zero += r >= 0 && w == 0.f;
    bad += !same_bytes(std::vector<float>{got[size_t(c)]}, std::vector<float>{want});
  }
  EXPECT_EQ(bad, 0) << "of " << N << " choices";
  EXPECT_GT(dropped, 0) << "the case should drop choices";
  EXPECT_GT(zero, 0);
  EXPECT_THROW(cuda::combine_dweight_from_row_dots(p.plan.view(), p.routing.view(), row_dot.get(),
                                                   parts, p.R - 1, p.dweight.get(), nullptr),
               ConfigError);
}

TEST(RowsDeterminism, RepeatedRunsAreBitwiseIdentical) {
  MOE_REQUIRE_GPU();
  DataPath p;
  p.run();
  const auto xp = p.xp.download(), y = p.y.download(), dyp = p.dyp.download(),
             dx = p.dx.download();
  const auto dw = p.dweight.download();
  p.run();
  EXPECT_TRUE(same_bytes(xp, p.xp.download()));
  EXPECT_TRUE(same_bytes(y, p.y.download()));
  EXPECT_TRUE(same_bytes(dyp, p.dyp.download()));
  EXPECT_TRUE(same_bytes(dx, p.dx.download()));
  EXPECT_TRUE(same_bytes(dw, p.dweight.download()));
}

TEST(RowsProperty, IdentityExpertsReturnTheWeightedSumOfInputs) {
  MOE_REQUIRE_GPU();
  constexpr int64_t H = 256;
  cuda::ParityCase c{"block16", 700, 9, 3, cuda::Skew::uniform, Layout::block, 1.0, 16};
  const cuda::PlanShape shape = cuda::parity_shape(c);
  const Routing<float> host = cuda::parity_routing(c, 3);
  cuda::PlanBuffers plan(shape);
  cuda::RoutingBuffers routing;
  cuda::upload_routing(host, routing, nullptr);
  const std::vector<float> x = random_vector<float>(c.tokens * H, 5);
  DeviceArray<float> dx(x), dxp(size_t(shape.max_rows() * H)), dy(size_t(c.tokens * H));
  dy.poison();
  cuda::plan_forward(routing.view(), plan.view(), nullptr);
  cuda::permute_forward(plan.view(), dx.get(), H, dxp.get(), nullptr);
  cuda::combine_forward(plan.view(), routing.view(), dxp.get(), H, dy.get(), nullptr);
  const std::vector<float> y = dy.download();
  std::vector<double> want(y.size(), 0.0);
  for (int64_t ch = 0; ch < host.size(); ++ch) {
    const int64_t t = host.choice_token[ch];
    for (int64_t h = 0; h < H; ++h)
      want[t * H + h] += double{host.choice_weight[ch]} * x[t * H + h];
  }
  EXPECT_TRUE(close("y", y, want, 1e-5, 1e-5));
}

}  // namespace
}  // namespace moe::test
