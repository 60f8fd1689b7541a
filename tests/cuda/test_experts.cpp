// CUDA experts stage (forward and backward, both backends) vs cpu::experts_forward /
// cpu::experts_backward in double on the same bf16-rounded inputs; the grouped GEMM alone vs a
// double GEMM. Fresh seeded random inputs, outputs poisoned (NaN) before each run.
//
// Tolerance: the relative Frobenius error ||gpu - ref|| / ||ref|| of every expert's segment (and
// of every expert's weight-gradient slice) must be < 1e-2. The GPU stores pre, act, da, dpre in
// bf16 (unit roundoff 2^-9 = 0.2 %) and accumulates in fp32; each stored intermediate adds about
// 0.2-0.4 % to what follows, so the deepest output (dw_up, three roundings deep) lands near 0.5 %.
// A wrong row, a wrong expert's weight or an unwritten element gives O(1) errors (or NaN).
// Rows [M, max_rows) must stay poisoned: the stage never writes past M.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/stages.hpp"
#include "cuda_test_util.hpp"
#include "moe/config.hpp"
#include "moe/cuda/experts.hpp"
#include "moe/cuda/grouped_gemm.hpp"
#include "moe/cuda/parity.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/routing.hpp"

namespace moe::test {
namespace {

using cuda::bf16;
using cuda::ExpertsShape;

constexpr double kTolerance = 1e-2;  // relative Frobenius error per segment / per expert slice

struct ExpertsCase {
  std::string name;
  std::vector<int64_t> sizes;  // rows per expert (E = sizes.size())
  int64_t hidden, inter;
  Activation activation;
  int64_t extra_rows = 5;      // max_rows = M + extra_rows (never written)
};

std::vector<ExpertsCase> experts_cases() {
  const Activation S = Activation::swiglu, G = Activation::gelu;
  std::vector<int64_t> e64(64);
  for (int64_t e = 0; e < 64; ++e) e64[e] = (e * 37) % 23 + (e % 9 == 0 ? 0 : 1);  // some empty
  std::vector<int64_t> zipf(11);
  for (int64_t e = 0; e < 11; ++e) zipf[e] = static_cast<int64_t>(900 / std::pow(e + 1, 1.2));
  return {
      {"e1_one_segment_swiglu", {37}, 64, 32, S},
      {"e1_one_segment_gelu", {37}, 64, 32, G},
      {"e5_empty_and_one_row_segments", {0, 1, 0, 130, 1}, 136, 72, S},   // H, I not % 64
      {"e7_skewed_gelu", {300, 0, 1, 17, 129, 0, 64}, 200, 40, G},         // E not a power of 2
      {"e11_zipf", zipf, 104, 56, S},
      {"e64_small_segments", e64, 128, 64, S},
      {"e3_large_segment", {4100, 3, 0}, 256, 136, S},                   // 33 M-tiles, K = 136
      {"e4_all_empty", {0, 0, 0, 0}, 64, 32, S},
      {"e2_no_spare_rows", {129, 255}, 64, 24, G, 0},
      {"e3_widths_not_multiples_of_8", {5, 0, 9}, 100, 30, S},             // cuBLAS loop only
  };
}

// What the CPU reference and the GPU both see (bf16-representable values).
struct Inputs {
  ExpertsShape shape;
  std::vector<int64_t> offsets;         // (E+1)
  std::vector<float> w_up, w_down, xp;  // (E,H,A) (E,I,H) (R,H)
  std::vector<float> dyp;               // (R,H)
  std::vector<float> dw_up0, dw_down0;  // fp32 starting values of the accumulated gradients
};

Inputs make_inputs(const ExpertsCase& c, uint64_t seed) {
  Inputs in;
  const int64_t E = static_cast<int64_t>(c.sizes.size());
  in.offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) in.offsets[e + 1] = in.offsets[e] + c.sizes[e];
  ExpertsShape& s = in.shape;
  s.experts = E;
  s.hidden = c.hidden;
  s.inter = c.inter;
  s.activation = c.activation;
  s.max_rows = in.offsets[E] + c.extra_rows;
  const int64_t H = s.hidden, I = s.inter, A = s.up_width(), R = s.max_rows;
  // Scales keep every intermediate O(1): weights ~ N(0, 1/fan_in).
  in.w_up = round_to<bf16>(random_vector<float>(E * H * A, seed + 1, 1.0 / std::sqrt(H)));
  in.w_down = round_to<bf16>(random_vector<float>(E * I * H, seed + 2, 1.0 / std::sqrt(I)));
  in.xp = round_to<bf16>(random_vector<float>(R * H, seed + 3));
  in.dyp = round_to<bf16>(random_vector<float>(R * H, seed + 4));
  in.dw_up0 = random_vector<float>(E * H * A, seed + 5);
  in.dw_down0 = random_vector<float>(E * I * H, seed + 6);
  return in;
}

struct Reference {
  std::vector<double> pre, act, yp, dxp, dw_up, dw_down;  // dw_*: the increments
};

Reference reference(const Inputs& in) {
  const ExpertsShape& s = in.shape;
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width(), R = s.max_rows;
  LayerConfig cfg;
  cfg.hidden = H;
  cfg.inter = I;
  cfg.activation = s.activation;
  auto dbl = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  const std::vector<double> wu = dbl(in.w_up), wd = dbl(in.w_down), x = dbl(in.xp),
                            dy = dbl(in.dyp);
  Reference r;
  r.pre.assign(R * A, 0);
  r.act.assign(R * I, 0);
  r.yp.assign(R * H, 0);
  cpu::experts_forward<double>(cfg, in.offsets.data(), E, wu.data(), wd.data(), x.data(),
                               r.pre.data(), r.act.data(), r.yp.data());
  r.dxp.assign(R * H, 0);
  r.dw_up.assign(E * H * A, 0);
  r.dw_down.assign(E * I * H, 0);
  cpu::experts_backward<double>(cfg, in.offsets.data(), E, wu.data(), wd.data(), x.data(),
                                r.pre.data(), r.act.data(), dy.data(), r.dxp.data(),
                                r.dw_up.data(), r.dw_down.data());
  return r;
}

// ||got - want|| / ||want|| over [begin, end); a zero reference needs an exact zero.
double relative_error(const std::vector<float>& got, const std::vector<double>& want,
                      int64_t begin, int64_t end) {
  double num = 0, den = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  if (std::isnan(num)) return INFINITY;
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

// Every segment of a (rows, width) tensor within tolerance; rows [M, R) still poisoned (NaN).
::testing::AssertionResult segments_close(const std::string& name, const std::vector<float>& got,
                                          const std::vector<double>& want,
                                          const std::vector<int64_t>& offsets, int64_t width,
                                          int64_t rows) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, M = offsets[E];
  double worst = 0;
  for (int64_t e = 0; e < E; ++e) {
    const double err = relative_error(got, want, offsets[e] * width, offsets[e + 1] * width);
    worst = std::max(worst, err);
    if (!(err < kTolerance))
      return ::testing::AssertionFailure()
             << name << ": expert " << e << " (rows " << offsets[e] << ".." << offsets[e + 1]
             << ") relative error " << err << " >= " << kTolerance;
  }
  for (int64_t i = M * width; i < rows * width; ++i)
    if (!std::isnan(got[i]))
      return ::testing::AssertionFailure()
             << name << ": row " << i / width << " >= M = " << M << " was written";
  return ::testing::AssertionSuccess() << name << " worst " << worst;
}

// Accumulated weight gradients: the increment of every expert's slice within tolerance; the
// slices of empty experts unchanged bit for bit.
::testing::AssertionResult slices_close(const std::string& name, const std::vector<float>& got,
                                        const std::vector<float>& start,
                                        const std::vector<double>& want_increment,
                                        const std::vector<int64_t>& offsets, int64_t slice) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<float> increment(got.size());
  for (size_t i = 0; i < got.size(); ++i) increment[i] = got[i] - start[i];
  for (int64_t e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) {
      for (int64_t i = e * slice; i < (e + 1) * slice; ++i)
        if (got[i] != start[i])
          return ::testing::AssertionFailure() << name << ": empty expert " << e << " changed";
      continue;
    }
    const double err = relative_error(increment, want_increment, e * slice, (e + 1) * slice);
    if (!(err < kTolerance))
      return ::testing::AssertionFailure()
             << name << ": expert " << e << " relative error " << err << " >= " << kTolerance;
  }
  return ::testing::AssertionSuccess();
}

struct Param {
  ExpertsCase c;
  cuda::ExpertsBackend backend;
};

class ExpertsParity : public ::testing::TestWithParam<Param> {};

TEST_P(ExpertsParity, ForwardAndBackwardMatchTheCpuReferenceInDouble) {
  MOE_REQUIRE_GPU();
  const Param& p = GetParam();
  const Inputs in = make_inputs(p.c, 91);
  const Reference ref = reference(in);
  const cuda::ExpertsShape& s = in.shape;
  const int64_t E = s.experts, H = s.hidden, I = s.inter, A = s.up_width(), R = s.max_rows;

  std::vector<int32_t> off32(in.offsets.begin(), in.offsets.end());
  DeviceArray<int32_t> offsets(off32);
  DeviceArray<bf16> w_up(to_device_type<bf16>(in.w_up)), w_down(to_device_type<bf16>(in.w_down)),
      xp(to_device_type<bf16>(in.xp)), dyp(to_device_type<bf16>(in.dyp));
  DeviceArray<bf16> pre(R * A), act(R * I), yp(R * H), dxp(R * H);
  DeviceArray<float> dw_up(in.dw_up0), dw_down(in.dw_down0);
  for (auto* a : {&pre, &act, &yp, &dxp}) a->poison();

  cuda::ExpertsWorkspace ws(s, p.backend);
  cuda::experts_forward(ws, {offsets.get(), w_up.get(), w_down.get(), xp.get(), pre.get(),
                             act.get(), yp.get()},
                        nullptr);
  cuda::experts_backward(ws, {offsets.get(), w_up.get(), w_down.get(), xp.get(), pre.get(),
                              act.get(), dyp.get(), dxp.get(), dw_up.get(), dw_down.get()},
                         nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  const auto& o = in.offsets;
  EXPECT_TRUE(segments_close("pre", from_device_type(pre.download()), ref.pre, o, A, R));
  EXPECT_TRUE(segments_close("act", from_device_type(act.download()), ref.act, o, I, R));
  EXPECT_TRUE(segments_close("yp", from_device_type(yp.download()), ref.yp, o, H, R));
  EXPECT_TRUE(segments_close("dxp", from_device_type(dxp.download()), ref.dxp, o, H, R));
  EXPECT_TRUE(slices_close("dw_up", dw_up.download(), in.dw_up0, ref.dw_up, o, H * A));
  EXPECT_TRUE(slices_close("dw_down", dw_down.download(), in.dw_down0, ref.dw_down, o, I * H));
  (void)E;
}

std::vector<Param> params() {
  std::vector<Param> v;
  for (const ExpertsCase& c : experts_cases())
    for (auto b : {cuda::ExpertsBackend::grouped, cuda::ExpertsBackend::cublas_loop_host_offsets})
      if (b != cuda::ExpertsBackend::grouped || (c.hidden % 8 == 0 && c.inter % 8 == 0))
        v.push_back({c, b});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ExpertsParity, ::testing::ValuesIn(params()),
                         [](const auto& info) {
                           return info.param.c.name + "_" +
                                  std::string(cuda::name(info.param.backend));
                         });

// The grouped GEMM alone, both weight layouts, against a double GEMM per segment.
TEST(GroupedGemm, EachSegmentIsItsExpertsProductInBothWeightLayouts) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {3, 0, 257, 1, 0, 64, 130};
  const int64_t E = static_cast<int64_t>(sizes.size()), N = 136, K = 200;
  std::vector<int64_t> o(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) o[e + 1] = o[e] + sizes[e];
  const int64_t M = o[E], R = M + 3;
  const std::vector<float> a = round_to<bf16>(random_vector<float>(R * K, 11));
  const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 12));
  std::vector<int32_t> o32(o.begin(), o.end());
  DeviceArray<int32_t> offsets(o32);
  DeviceArray<bf16> da(to_device_type<bf16>(a)), db(to_device_type<bf16>(b)), dd(R * N);
  for (auto layout : {cuda::WeightLayout::kn, cuda::WeightLayout::nk}) {
    const bool nk = layout == cuda::WeightLayout::nk;
    std::vector<double> want(R * N, 0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = o[e]; r < o[e + 1]; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k)
            acc += double(a[r * K + k]) * b[e * K * N + (nk ? n * K + k : k * N + n)];
          want[r * N + n] = acc;
        }
    dd.poison();
    cuda::GroupedGemm gemm(E, layout);
    gemm.run({offsets.get(), N, K, da.get(), db.get(), dd.get()}, nullptr);
    EXPECT_TRUE(segments_close(std::string("D ") + gemm.name(), from_device_type(dd.download()),
                               want, o, N, R));
  }
}

// The experts stage on the offsets the GPU plan leaves on the device (padded layout: padding rows
// inside segments, some experts over capacity).
TEST(ExpertsPlan, RunsOnThePlansDeviceOffsets) {
  MOE_REQUIRE_GPU();
  const cuda::ParityCase pc{"e13_zipf_padded", 3000, 13, 3, cuda::Skew::zipf, Layout::padded, 1.25};
  const cuda::PlanShape shape = cuda::parity_shape(pc);
  cuda::PlanBuffers plan(shape);
  cuda::RoutingBuffers routing;
  cuda::upload_routing(cuda::parity_routing(pc, 5), routing, nullptr);
  cuda::plan_forward(routing.view(), plan.view(), nullptr);
  const DispatchPlan host_plan = cuda::download_plan(plan.view(), nullptr);

  ExpertsCase c{"plan", {}, 128, 64, Activation::swiglu};
  for (int64_t e = 0; e < pc.experts; ++e)
    c.sizes.push_back(host_plan.offsets[e + 1] - host_plan.offsets[e]);
  c.extra_rows = shape.max_rows() - host_plan.offsets[pc.experts];
  const Inputs in = make_inputs(c, 17);
  const Reference ref = reference(in);
  const int64_t H = c.hidden, I = c.inter, A = in.shape.up_width(), R = in.shape.max_rows;
  ASSERT_EQ(R, shape.max_rows());
  DeviceArray<bf16> w_up(to_device_type<bf16>(in.w_up)), w_down(to_device_type<bf16>(in.w_down)),
      xp(to_device_type<bf16>(in.xp));
  DeviceArray<bf16> pre(R * A), act(R * I), yp(R * H);
  for (auto* a : {&pre, &act, &yp}) a->poison();
  cuda::ExpertsWorkspace ws(in.shape, cuda::ExpertsBackend::grouped, false);
  cuda::experts_forward(ws, {plan.view().offsets, w_up.get(), w_down.get(), xp.get(), pre.get(),
                             act.get(), yp.get()},
                        nullptr);
  EXPECT_TRUE(segments_close("yp", from_device_type(yp.download()), ref.yp, in.offsets, H, R));
}

TEST(ExpertsWorkspace, RefusesShapesTheGroupedGemmCannotTake) {
  MOE_REQUIRE_GPU();
  cuda::ExpertsShape s{4, 100, 64, Activation::swiglu, 10};  // H = 100: rows not 16-byte aligned
  EXPECT_THROW(cuda::ExpertsWorkspace(s, cuda::ExpertsBackend::grouped), ConfigError);
  EXPECT_NO_THROW(cuda::ExpertsWorkspace(s, cuda::ExpertsBackend::cublas_loop_host_offsets));
  s.experts = 0;
  EXPECT_THROW(cuda::ExpertsWorkspace(s, cuda::ExpertsBackend::cublas_loop_host_offsets),
               ConfigError);
}

}  // namespace
}  // namespace moe::test
