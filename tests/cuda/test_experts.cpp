// CUDA experts stage (forward and backward, every backend) vs cpu::experts_forward /
// cpu::experts_backward in double on the same bf16-rounded inputs; the grouped GEMMs alone vs
// double GEMMs; the fused up-projection vs the unfused pair; a CUDA graph of forward + backward
// replayed with new offsets; bitwise reproducibility. Fresh seeded random inputs, outputs poisoned
// (NaN) before each run.
//
// Tolerance: the relative Frobenius error ||gpu - ref|| / ||ref|| of every expert's segment (and
// of every expert's weight-gradient slice) must be < 1e-2. The GPU stores pre, act, da, dpre in
// bf16 (unit roundoff 2^-9 = 0.2 %) and accumulates in fp32; each stored intermediate adds about
// 0.2-0.4 % to what follows, so the deepest output (dw_up, three roundings deep) lands near 0.5 %.
// A wrong row, a wrong expert's weight or an unwritten element gives O(1) errors (or NaN).
// Rows [M, max_rows) must stay poisoned: the stage never writes past M. Weight gradients are
// accumulated: an expert with no rows must leave its slices bit for bit unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/stages.hpp"
#include "cuda/grouped_gemm_sm90.hpp"
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
using cuda::ExpertsBackend;
using cuda::ExpertsShape;
using cuda::GateUpLayout;

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
      {"e6_two_n_tiles", {200, 0, 3, 129, 1, 64}, 96, 160, S},            // 2I = 256 + 64
      {"e3_large_segment", {4100, 3, 0}, 256, 136, S},                   // 33 M-tiles, K = 136
      // Last 128-row tiles of 65, 64, 1, 63 and 1 rows: each consumer warpgroup owns 64 of a
      // tile's rows, and the segment ends before, at or one row past the second one's first row
      {"e5_tail_halves", {65, 64, 193, 63, 129}, 128, 64, S},
      {"e4_all_empty", {0, 0, 0, 0}, 64, 32, S},
      {"e2_no_spare_rows", {129, 255}, 64, 24, G, 0},
      {"e3_widths_not_multiples_of_8", {5, 0, 9}, 100, 30, S},             // cuBLAS only
      {"e4_padded_equal_segments", {96, 96, 96, 96}, 128, 64, S, 0},       // + strided batched
      {"e3_padded_gelu", {40, 40, 40}, 64, 48, G, 0},                      // + strided batched
  };
}

// What the CPU reference and the GPU both see (bf16-representable values), in the split layout.
struct Inputs {
  ExpertsShape shape;
  std::vector<int64_t> offsets;         // (E+1)
  std::vector<float> w_up, w_down, xp;  // (E,H,A) (E,I,H) (R,H)
  std::vector<float> dyp;               // (R,H)
  std::vector<float> dw_up0, dw_down0;  // fp32 starting values of the accumulated gradients
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> o(sizes.size() + 1, 0);
  for (size_t e = 0; e < sizes.size(); ++e) o[e + 1] = o[e] + sizes[e];
  return o;
}

Inputs make_inputs(const ExpertsCase& c, uint64_t seed) {
  Inputs in;
  const int64_t E = static_cast<int64_t>(c.sizes.size());
  in.offsets = offsets_of(c.sizes);
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

Reference reference(const Inputs& in, const std::vector<int64_t>& offsets) {
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
  cpu::experts_forward<double>(cfg, offsets.data(), E, wu.data(), wd.data(), x.data(),
                               r.pre.data(), r.act.data(), r.yp.data());
  r.dxp.assign(R * H, 0);
  r.dw_up.assign(E * H * A, 0);
  r.dw_down.assign(E * I * H, 0);
  cpu::experts_backward<double>(cfg, offsets.data(), E, wu.data(), wd.data(), x.data(),
                                r.pre.data(), r.act.data(), dy.data(), r.dxp.data(),
                                r.dw_up.data(), r.dw_down.data());
  return r;
}
Reference reference(const Inputs& in) { return reference(in, in.offsets); }

// The CPU reference of each case, computed once (several backends compare against it).
const Reference& cached_reference(const ExpertsCase& c, const Inputs& in) {
  static std::map<std::string, Reference> cache;
  auto it = cache.find(c.name);
  if (it == cache.end()) it = cache.emplace(c.name, reference(in)).first;
  return it->second;
}

// The pair (gate, up) of unit j in a paired layout: interleaved, pair j; blocked, within each
// block of 32 units unit 8q + a is pair 4a + q (experts.hpp).
int64_t pair_of_unit(int64_t j, GateUpLayout layout) {
  if (layout == GateUpLayout::interleaved) return j;
  const int64_t block = j / 32, q = (j % 32) / 8, a = j % 8;
  return 32 * block + 4 * a + q;
}

// A (rows, 2I) matrix between the split layout and `layout` (to_layout: from split).
std::vector<float> reorder(const std::vector<float>& v, int64_t inter, bool to_layout,
                           GateUpLayout layout = GateUpLayout::interleaved) {
  if (layout == GateUpLayout::split) return v;
  const int64_t width = 2 * inter, rows = static_cast<int64_t>(v.size()) / width;
  std::vector<float> out(v.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < inter; ++j) {
      const int64_t split_g = r * width + j, split_u = split_g + inter;
      const int64_t pair_g = r * width + 2 * pair_of_unit(j, layout), pair_u = pair_g + 1;
      if (to_layout) out[pair_g] = v[split_g], out[pair_u] = v[split_u];
      else out[split_g] = v[pair_g], out[split_u] = v[pair_u];
    }
  return out;
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
      if (std::memcmp(got.data() + e * slice, start.data() + e * slice, slice * sizeof(float)))
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

// ------------------------------------------------------------------------------------------------
// one forward + backward of the stage on the device
// ------------------------------------------------------------------------------------------------

// Device copies of a case's inputs, in the layout a backend runs with, and its outputs.
struct Device {
  ExpertsShape shape;  // gate_up set
  DeviceArray<int32_t> offsets;
  DeviceArray<bf16> w_up, w_down, xp, dyp, pre, act, yp, dxp;
  DeviceArray<float> dw_up, dw_down;
  std::vector<float> dw_up0;  // start values in the run's layout

  Device(const Inputs& in, GateUpLayout gate_up) : shape(in.shape) {
    shape.gate_up = gate_up;
    // GELU has no gate/up pairs: every layout is the identity.
    const GateUpLayout l = shape.activation == Activation::swiglu ? gate_up : GateUpLayout::split;
    const int64_t H = shape.hidden, I = shape.inter, A = shape.up_width(), R = shape.max_rows;
    offsets = DeviceArray<int32_t>(std::vector<int32_t>(in.offsets.begin(), in.offsets.end()));
    w_up = DeviceArray<bf16>(to_device_type<bf16>(reorder(in.w_up, I, true, l)));
    w_down = DeviceArray<bf16>(to_device_type<bf16>(in.w_down));
    xp = DeviceArray<bf16>(to_device_type<bf16>(in.xp));
    dyp = DeviceArray<bf16>(to_device_type<bf16>(in.dyp));
    pre = DeviceArray<bf16>(R * A);
    act = DeviceArray<bf16>(R * I);
    yp = DeviceArray<bf16>(R * H);
    dxp = DeviceArray<bf16>(R * H);
    dw_up0 = reorder(in.dw_up0, I, true, l);
    dw_up = DeviceArray<float>(dw_up0);
    dw_down = DeviceArray<float>(in.dw_down0);
  }
  void poison() {
    for (auto* a : {&pre, &act, &yp, &dxp}) a->poison();
  }
  cuda::ExpertsForwardArgs forward_args() const {
    return {offsets.get(), w_up.get(), w_down.get(), xp.get(), pre.get(), act.get(), yp.get()};
  }
  cuda::ExpertsBackwardArgs backward_args() const {
    return {offsets.get(), w_up.get(), w_down.get(), xp.get(), pre.get(),     act.get(),
            dyp.get(),     dxp.get(),  dw_up.get(),  dw_down.get()};
  }
};

// Everything a run produced, as floats in the split layout (what the CPU reference uses).
struct Outputs {
  std::vector<float> pre, act, yp, dxp, dw_up, dw_down;
};

Outputs download(const Device& d) {
  const GateUpLayout l =
      d.shape.activation == Activation::swiglu ? d.shape.gate_up : GateUpLayout::split;
  const int64_t I = d.shape.inter;
  Outputs o;
  o.pre = from_device_type(d.pre.download());
  o.act = from_device_type(d.act.download());
  o.yp = from_device_type(d.yp.download());
  o.dxp = from_device_type(d.dxp.download());
  o.dw_up = d.dw_up.download();
  o.dw_down = d.dw_down.download();
  o.pre = reorder(o.pre, I, false, l), o.dw_up = reorder(o.dw_up, I, false, l);
  return o;
}

// accumulate false: the weight gradients start as NaN (poisoned) and must be overwritten.
// events: the backward's step events (every step in order on one stream), or null.
Outputs run_stage(const Inputs& in, ExpertsBackend backend, GateUpLayout gate_up,
                  bool accumulate = true, cudaEvent_t* events = nullptr,
                  cudaEvent_t* forward_events = nullptr) {
  Device d(in, gate_up);
  d.poison();
  if (!accumulate) d.dw_up.poison(), d.dw_down.poison();
  cuda::ExpertsWorkspace ws(d.shape, backend);
  cuda::experts_forward(ws, d.forward_args(), nullptr, forward_events);
  cuda::ExpertsBackwardArgs b = d.backward_args();
  b.accumulate = accumulate;
  cuda::experts_backward(ws, b, nullptr, events);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  return download(d);
}

void expect_matches_reference(const Outputs& got, const Inputs& in, const Reference& ref,
                              const std::vector<int64_t>& o) {
  const ExpertsShape& s = in.shape;
  const int64_t H = s.hidden, I = s.inter, A = s.up_width(), R = s.max_rows;
  EXPECT_TRUE(segments_close("pre", got.pre, ref.pre, o, A, R));
  EXPECT_TRUE(segments_close("act", got.act, ref.act, o, I, R));
  EXPECT_TRUE(segments_close("yp", got.yp, ref.yp, o, H, R));
  EXPECT_TRUE(segments_close("dxp", got.dxp, ref.dxp, o, H, R));
  EXPECT_TRUE(slices_close("dw_up", got.dw_up, in.dw_up0, ref.dw_up, o, H * A));
  EXPECT_TRUE(slices_close("dw_down", got.dw_down, in.dw_down0, ref.dw_down, o, I * H));
}

// ------------------------------------------------------------------------------------------------
// every backend vs the CPU reference
// ------------------------------------------------------------------------------------------------

struct Param {
  ExpertsCase c;
  ExpertsBackend backend;
  GateUpLayout gate_up;
};

class ExpertsParity : public ::testing::TestWithParam<Param> {};

TEST_P(ExpertsParity, ForwardAndBackwardMatchTheCpuReferenceInDouble) {
  MOE_REQUIRE_GPU();
  const Param& p = GetParam();
  const Inputs in = make_inputs(p.c, 91);
  const Reference& ref = cached_reference(p.c, in);
  expect_matches_reference(run_stage(in, p.backend, p.gate_up), in, ref, in.offsets);
}

// The weight gradients written instead of added to (ExpertsBackwardArgs::accumulate false):
// started from NaN, every expert's slice must be its fresh gradient and an empty expert's zero.
TEST_P(ExpertsParity, OverwrittenWeightGradientsAreTheFreshGradient) {
  MOE_REQUIRE_GPU();
  const Param& p = GetParam();
  const Inputs in = make_inputs(p.c, 91);
  const Reference& ref = cached_reference(p.c, in);
  const Outputs got = run_stage(in, p.backend, p.gate_up, /*accumulate=*/false);
  const ExpertsShape& s = in.shape;
  const int64_t H = s.hidden, I = s.inter, A = s.up_width();
  const std::vector<float> zero_up(got.dw_up.size(), 0.f), zero_down(got.dw_down.size(), 0.f);
  EXPECT_TRUE(slices_close("dw_up", got.dw_up, zero_up, ref.dw_up, in.offsets, H * A));
  EXPECT_TRUE(slices_close("dw_down", got.dw_down, zero_down, ref.dw_down, in.offsets, I * H));
}

bool backend_takes(ExpertsBackend b, const ExpertsCase& c) {
  const bool aligned = c.hidden % 8 == 0 && c.inter % 8 == 0;
  const bool equal = std::adjacent_find(c.sizes.begin(), c.sizes.end(),
                                        std::not_equal_to<>()) == c.sizes.end();
  switch (b) {
    case ExpertsBackend::grouped:
    case ExpertsBackend::grouped_fused: return aligned;
    case ExpertsBackend::cublas_strided_padded: return equal && c.extra_rows == 0;
    default: return true;
  }
}

std::vector<Param> params() {
  std::vector<Param> v;
  for (const ExpertsCase& c : experts_cases())
    for (ExpertsBackend b : cuda::kAllExpertsBackends) {
      if (!backend_takes(b, c)) continue;
      const bool swiglu = c.activation == Activation::swiglu;
      const bool blocks = swiglu && c.inter % 32 == 0;  // GateUpLayout::blocked applies
      if (b == ExpertsBackend::grouped_fused) {
        v.push_back({c, b, GateUpLayout::interleaved});
        if (blocks) v.push_back({c, b, GateUpLayout::blocked});
        continue;
      }
      v.push_back({c, b, GateUpLayout::split});
      // The unfused paths in the fused path's layouts too.
      if (b == ExpertsBackend::grouped && swiglu) v.push_back({c, b, GateUpLayout::interleaved});
      if (blocks) v.push_back({c, b, GateUpLayout::blocked});
    }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ExpertsParity, ::testing::ValuesIn(params()),
                         [](const auto& info) {
                           const Param& p = info.param;
                           std::string n = p.c.name + "_" + std::string(cuda::name(p.backend));
                           if (p.gate_up == GateUpLayout::blocked ||
                               (p.gate_up == GateUpLayout::interleaved &&
                                p.backend != ExpertsBackend::grouped_fused))
                             n += "_" + std::string(cuda::name(p.gate_up));
                           return n;
                         });

// ------------------------------------------------------------------------------------------------
// the grouped GEMMs alone
// ------------------------------------------------------------------------------------------------

// Segments whose last 128-row tile has 3, 1, 64, 2, 65 and 65 rows: each ends before, at or one
// row past the first of the second consumer warpgroup's 64 rows.
TEST(GroupedGemm, EachSegmentIsItsExpertsProductInBothWeightLayouts) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {3, 0, 257, 1, 0, 64, 130, 65, 193};
  const int64_t E = static_cast<int64_t>(sizes.size()), N = 136, K = 200;
  const std::vector<int64_t> o = offsets_of(sizes);
  const int64_t M = o[E], R = M + 3;
  const std::vector<float> a = round_to<bf16>(random_vector<float>(R * K, 11));
  const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 12));
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end()));
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

// The plain GEMMs store each tile under the next tile's mainloop (DeferredStoreKernel, a CTA's
// last tile at once): with enough tiles that every CTA has several (3 column tiles, the last
// partial: 3 x 87 = 261 tiles of 128x256 over the segments below, 2 per SM on a 132-SM card),
// segments of 1, 127, 128 and 129 rows and empty ones, K of one partial slice (40) and of many
// (600, partial last slice), in both weight layouts. Every row of M is written and matches the
// double reference (per element, sampled rows: every 7th and each segment's first and last
// two), rows past M stay untouched, and in the (K, N) layout D is bit for bit the TMA store
// epilogue's (the gathered GEMM with the identity as its gather).
TEST(GroupedGemm, DeferredStoreWritesEveryTileWithManyTilesPerCta) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {1, 0, 3000, 129, 2500, 0, 700, 4000, 127, 128};
  const int64_t E = static_cast<int64_t>(sizes.size()), N = 520;
  const std::vector<int64_t> o = offsets_of(sizes);
  const int64_t M = o[E], R = M + 5;
  std::vector<int64_t> sample;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = o[e]; r < o[e + 1]; ++r)
      if (r % 7 == 0 || r - o[e] < 2 || o[e + 1] - r <= 2) sample.push_back(r);
  std::vector<int32_t> identity(R);
  for (int64_t r = 0; r < R; ++r) identity[r] = static_cast<int32_t>(r);
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end())), dgather(identity);
  for (int64_t K : {40, 600}) {
    const std::vector<float> a = round_to<bf16>(random_vector<float>(R * K, 61 + K));
    const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 62 + K));
    DeviceArray<bf16> da(to_device_type<bf16>(a)), db(to_device_type<bf16>(b)), dd(R * N),
        tma(R * N);
    for (auto layout : {cuda::WeightLayout::kn, cuda::WeightLayout::nk}) {
      const bool nk = layout == cuda::WeightLayout::nk;
      SCOPED_TRACE("K = " + std::to_string(K) + (nk ? ", B (N, K)" : ", B (K, N)"));
      dd.poison();
      cuda::GroupedGemm gemm(E, layout);
      gemm.run({offsets.get(), N, K, da.get(), db.get(), dd.get()}, nullptr);
      const std::vector<float> got = from_device_type(dd.download());
      EXPECT_TRUE(std::none_of(got.begin(), got.begin() + M * N,
                               [](float v) { return std::isnan(v); }))
          << "rows of M left unwritten";
      EXPECT_TRUE(std::all_of(got.begin() + M * N, got.end(),
                              [](float v) { return std::isnan(v); }))
          << "rows past M were written";
      int64_t bad = 0, first_bad = -1;
      size_t e = 0;
      for (const int64_t r : sample) {
        while (o[e + 1] <= r) ++e;
        for (int64_t n = 0; n < N; ++n) {
          double want = 0;
          for (int64_t k = 0; k < K; ++k)
            want += double(a[r * K + k]) * b[e * K * N + (nk ? n * K + k : k * N + n)];
          // bf16 rounding (half an ulp: 2^-9 relative) plus fp32 accumulation.
          if (!(std::abs(got[r * N + n] - want) <= std::abs(want) / 256 + 1e-3)) {
            if (bad++ == 0) first_bad = r * N + n;
          }
        }
      }
      EXPECT_EQ(bad, 0) << "values off the reference, the first at row " << first_bad / N
                        << ", column " << first_bad % N;
      if (!nk) {
        tma.poison();
        cuda::GroupedGemmArgs g{offsets.get(), N, K, da.get(), db.get(), tma.get()};
        g.gather = dgather.get();
        g.gather_rows = R;
        gemm.run(g, nullptr);
        EXPECT_TRUE(same_bytes(from_device_type(tma.download()), got))
            << "the deferred store differs from the TMA store epilogue";
      }
    }
  }
}

// Rows gathered by index for the gathered GEMM tests: segments {3, 0, 257, 1, 0, 64, 130, 700}
// (M rows, R = M + 3), x (T = 97, K = 200: a partial last K tile) with repeated and unused
// rows, one padding index (T), two stray ones (-1, T + 7), and xp the permuted copy (zero rows
// where the index is outside [0, T)).
struct GatheredRows {
  static constexpr int64_t T = 97, K = 200;
  std::vector<int64_t> o;
  int64_t E = 0, M = 0, R = 0;
  std::vector<float> x, xp;
  std::vector<int32_t> gather;

  explicit GatheredRows(uint64_t seed) {
    const std::vector<int64_t> sizes = {3, 0, 257, 1, 0, 64, 130, 700};
    E = static_cast<int64_t>(sizes.size());
    o = offsets_of(sizes);
    M = o[E], R = M + 3;
    x = round_to<bf16>(random_vector<float>(T * K, seed));
    gather.assign(R, static_cast<int32_t>(T));
    const std::vector<float> pick = random_vector<float>(M, seed + 2);
    for (int64_t r = 0; r < M; ++r)
      gather[r] = static_cast<int32_t>(std::min<int64_t>(T - 1, std::abs(pick[r]) * T));
    gather[o[2] + 5] = static_cast<int32_t>(T);  // padding
    gather[o[2] + 200] = -1;                     // stray indices: zero rows as well
    gather[o[7] + 699] = static_cast<int32_t>(T + 7);
    xp.assign(R * K, 0.f);
    for (int64_t r = 0; r < M; ++r)
      if (gather[r] >= 0 && gather[r] < T)
        std::copy_n(x.begin() + gather[r] * K, K, xp.begin() + r * K);
  }
};

// A's rows fetched by index (the permute folded into the loader): the same products, bit for bit,
// as the plain GEMM on the permuted copy, padding and stray indices reading as zero rows.
TEST(GroupedGemm, GatheredRowsGiveThePermutedProductBitForBit) {
  MOE_REQUIRE_GPU();
  const GatheredRows g_in(31);
  const int64_t T = GatheredRows::T, K = GatheredRows::K;
  const int64_t E = g_in.E, N = 136, R = g_in.R;
  const std::vector<int64_t>& o = g_in.o;
  const std::vector<float>&x = g_in.x, &xp = g_in.xp;
  const std::vector<int32_t>& gather = g_in.gather;
  const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 32));
  std::vector<double> want(R * N, 0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = o[e]; r < o[e + 1]; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += double(xp[r * K + k]) * b[(e * K + k) * N + n];
        want[r * N + n] = acc;
      }

  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end())), dgather(gather);
  DeviceArray<bf16> dx(to_device_type<bf16>(x)), dxp(to_device_type<bf16>(xp)),
      db(to_device_type<bf16>(b)), plain(R * N), gathered(R * N);
  cuda::GroupedGemm gemm(E, cuda::WeightLayout::kn);
  plain.poison(), gathered.poison();
  gemm.run({offsets.get(), N, K, dxp.get(), db.get(), plain.get()}, nullptr);
  cuda::GroupedGemmArgs g{offsets.get(), N, K, dx.get(), db.get(), gathered.get()};
  g.gather = dgather.get();
  g.gather_rows = T;
  gemm.run(g, nullptr);
  const std::vector<float> got = from_device_type(gathered.download());
  EXPECT_TRUE(segments_close("D gathered", got, want, o, N, R));
  EXPECT_TRUE(same_bytes(from_device_type(plain.download()), got))
      << "the gathered GEMM differs from the plain GEMM on the permuted rows";

  cuda::GroupedGemm nk(E, cuda::WeightLayout::nk);
  EXPECT_THROW(nk.run(g, nullptr), ConfigError);  // gathering is the up-projection's (kn) only
  g.gather_rows = 0;
  EXPECT_THROW(gemm.run(g, nullptr), ConfigError);
}

// The fused up-projection (activation in the epilogue) with its A rows gathered: pre and act the
// same bits as the fused GEMM on the permuted copy, for both paired layouts, padding and stray
// indices reading as zero rows; rows past M are left as they were.
TEST(GroupedGemmAct, GatheredRowsGiveThePermutedResultBitForBit) {
  MOE_REQUIRE_GPU();
  const GatheredRows g_in(41);
  const int64_t T = GatheredRows::T, K = GatheredRows::K;
  const int64_t E = g_in.E, I = 160, N = 2 * I, M = g_in.M, R = g_in.R;
  const std::vector<int64_t>& o = g_in.o;
  const std::vector<float>&x = g_in.x, &xp = g_in.xp;
  const std::vector<int32_t>& gather = g_in.gather;
  const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 42));

  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end())), dgather(gather);
  DeviceArray<bf16> dx(to_device_type<bf16>(x)), dxp(to_device_type<bf16>(xp)),
      db(to_device_type<bf16>(b));
  cuda::GroupedGemmAct gemm(E, Activation::swiglu);
  for (bool blocked : {false, true}) {
    SCOPED_TRACE(blocked ? "blocked" : "interleaved");
    DeviceArray<bf16> pre_p(R * N), act_p(R * I), pre_g(R * N), act_g(R * I);
    for (auto* a : {&pre_p, &act_p, &pre_g, &act_g}) a->poison();
    cuda::GroupedGemmActArgs plain{offsets.get(), N, K, dxp.get(), db.get(), pre_p.get(),
                                   act_p.get(), blocked};
    gemm.run(plain, nullptr);
    cuda::GroupedGemmActArgs g{offsets.get(), N, K, dx.get(), db.get(), pre_g.get(), act_g.get(),
                               blocked};
    g.gather = dgather.get();
    g.gather_rows = T;
    gemm.run(g, nullptr);
    const std::vector<float> act = from_device_type(act_g.download());
    EXPECT_TRUE(same_bytes(from_device_type(pre_p.download()), from_device_type(pre_g.download())))
        << "pre differs between the gathered and the permuted rows";
    EXPECT_TRUE(same_bytes(from_device_type(act_p.download()), act))
        << "act differs between the gathered and the permuted rows";
    EXPECT_FALSE(std::isnan(act[(o[7] + 699) * I])) << "the last row was not written";
    EXPECT_TRUE(std::all_of(act.begin() + M * I, act.end(), [](float v) { return std::isnan(v); }))
        << "rows past M were written";
    g.gather_rows = 0;
    EXPECT_THROW(gemm.run(g, nullptr), ConfigError);
  }
}

// SwiGLU runs each tile's activation (and pre's stores) under the next tile's mainloop
// (grouped_gemm_deferred_act_sm90.hpp): pre and act must be the immediate epilogue's bits
// (grouped_gemm::Bf16Sm90Act, Bf16Sm90ActGather), blocked and interleaved pairs, with and without
// pre, permuted and gathered. Enough tiles that every CTA has several (348 tiles of 128x256: 2.6
// per SM on a 132-SM card), segments of 1, 127, 128 and 129 rows and empty ones, K of one partial
// slice (40) and of more slices than the 8 that carry deferred blocks (600, partial last slice).
// Rows past M stay untouched.
TEST(GroupedGemmAct, DeferredActivationGivesTheImmediateBitsWithManyTilesPerCta) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {1, 0, 3000, 129, 2500, 0, 700, 4000, 127, 128};
  const int64_t E = static_cast<int64_t>(sizes.size()), I = 512, N = 2 * I, T = 3001;
  const std::vector<int64_t> o = offsets_of(sizes);
  const int64_t M = o[E], R = M + 5;
  std::vector<int32_t> gather(R, static_cast<int32_t>(T));
  const std::vector<float> pick = random_vector<float>(M, 51);
  for (int64_t r = 0; r < M; ++r)
    gather[r] = static_cast<int32_t>(std::min<int64_t>(T - 1, std::abs(pick[r]) * T));
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end())), dgather(gather);
  cuda::GroupedGemmAct gemm(E, Activation::swiglu);  // SwiGLU: the deferred kernels
  int device = 0, sms = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DeviceArray<uint8_t> ws(std::max(cuda::grouped_gemm::Bf16Sm90Act::workspace_bytes(E, sms),
                                   cuda::grouped_gemm::Bf16Sm90ActGather::workspace_bytes(E, sms)));
  for (int64_t K : {40, 600}) {
    SCOPED_TRACE("K = " + std::to_string(K));
    const std::vector<float> x = round_to<bf16>(random_vector<float>(T * K, 52));
    std::vector<float> xp(R * K, 0.f);
    for (int64_t r = 0; r < M; ++r) std::copy_n(x.begin() + gather[r] * K, K, xp.begin() + r * K);
    const std::vector<float> b = round_to<bf16>(random_vector<float>(E * K * N, 53));
    DeviceArray<bf16> dx(to_device_type<bf16>(x)), dxp(to_device_type<bf16>(xp)),
        db(to_device_type<bf16>(b));
    for (int form = 0; form < 8; ++form) {
      const bool gathered = form & 1, with_pre = form & 2, blocked = form & 4;
      SCOPED_TRACE(std::string(gathered ? "gathered" : "permuted") +
                   (with_pre ? ", pre" : ", act only") +
                   (blocked ? ", blocked" : ", interleaved"));
      DeviceArray<bf16> pre_i(R * N), act_i(R * I), pre_d(R * N), act_d(R * I);
      for (auto* a : {&pre_i, &act_i, &pre_d, &act_d}) a->poison();
      cuda::GroupedGemmActArgs a{offsets.get(), N, K, gathered ? dx.get() : dxp.get(),
                                 db.get(), with_pre ? pre_i.get() : nullptr, act_i.get(),
                                 blocked};
      if (gathered) a.gather = dgather.get(), a.gather_rows = T;
      if (gathered)
        cuda::grouped_gemm::Bf16Sm90ActGather::run(a, Activation::swiglu, E, ws.get(), sms,
                                                   nullptr);
      else
        cuda::grouped_gemm::Bf16Sm90Act::run(a, Activation::swiglu, E, ws.get(), sms, nullptr);
      a.pre = with_pre ? pre_d.get() : nullptr;
      a.act = act_d.get();
      gemm.run(a, nullptr);
      const std::vector<float> want = from_device_type(act_i.download());
      const std::vector<float> got = from_device_type(act_d.download());
      EXPECT_TRUE(std::none_of(want.begin(), want.begin() + M * I,
                               [](float v) { return std::isnan(v); }))
          << "the immediate kernel left rows unwritten";
      EXPECT_TRUE(same_bytes(want, got)) << "deferred act differs from the immediate";
      EXPECT_TRUE(std::all_of(got.begin() + M * I, got.end(),
                              [](float f) { return std::isnan(f); }))
          << "act rows past M were written";
      const std::vector<float> pre_want = from_device_type(pre_i.download());
      const std::vector<float> pre_got = from_device_type(pre_d.download());
      EXPECT_TRUE(same_bytes(pre_want, pre_got)) << "deferred pre differs from the immediate";
      if (!with_pre) {
        EXPECT_TRUE(std::all_of(pre_got.begin(), pre_got.end(),
                                [](float f) { return std::isnan(f); }))
            << "pre was written although its pointer was null";
      }
    }
  }
}

// dW_e += X_e^T Y_e with K = m_e: segments of 1, 3, 5 (< 8), 64, 130, 257 rows, two empty ones.
// dW = X^T Y with X's rows fetched by index along the reduction (dw_up from x and the plan): the
// same bits as the kernel on the permuted copy, in all three forms (accumulated fp32, fp32 written
// fresh, bf16), with padding and stray indices reading as zero rows, a partial M tile (P = 200)
// and segments that end inside a K slice.
TEST(GroupedWgrad, GatheredRowsGiveThePermutedGradientBitForBit) {
  MOE_REQUIRE_GPU();
  const GatheredRows g_in(41);
  const int64_t T = GatheredRows::T, P = GatheredRows::K, Q = 136;
  const int64_t E = g_in.E, R = g_in.R;
  const std::vector<int64_t>& o = g_in.o;
  const std::vector<float> y = round_to<bf16>(random_vector<float>(R * Q, 42));
  const std::vector<float> dw0 = random_vector<float>(E * P * Q, 43);
  std::vector<double> want(E * P * Q, 0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = o[e]; r < o[e + 1]; ++r)
      for (int64_t i = 0; i < P; ++i) {
        const double xv = g_in.xp[r * P + i];
        for (int64_t j = 0; j < Q; ++j) want[(e * P + i) * Q + j] += xv * y[r * Q + j];
      }
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end())), dgather(g_in.gather);
  DeviceArray<bf16> dx(to_device_type<bf16>(g_in.x)), dxp(to_device_type<bf16>(g_in.xp)),
      dy(to_device_type<bf16>(y));
  cuda::GroupedWgrad wgrad(E);
  for (int form = 0; form < 3; ++form) {  // accumulated fp32, fp32 written fresh, bf16
    SCOPED_TRACE(form == 0 ? "accumulated" : form == 1 ? "fp32 written fresh" : "bf16");
    DeviceArray<float> plain(dw0), gathered(dw0);
    DeviceArray<bf16> plain16(E * P * Q), gathered16(E * P * Q);
    if (form > 0) plain.poison(), gathered.poison();
    plain16.poison(), gathered16.poison();
    cuda::GroupedWgradArgs a{offsets.get(), P, Q, dxp.get(), dy.get(), plain.get(), form == 0};
    if (form == 2) a.dw = nullptr, a.dw_bf16 = plain16.get();
    wgrad.run(a, nullptr);
    a.x = dx.get();
    a.gather = dgather.get();
    a.gather_rows = T;
    if (form == 2) a.dw_bf16 = gathered16.get();
    else a.dw = gathered.get();
    wgrad.run(a, nullptr);
    if (form == 2) {
      EXPECT_TRUE(same_bytes(plain16.download(), gathered16.download()));
    } else {
      const std::vector<float> got = gathered.download();
      EXPECT_TRUE(same_bytes(plain.download(), got));
      const std::vector<float> start = form == 0 ? dw0 : std::vector<float>(E * P * Q, 0.f);
      EXPECT_TRUE(slices_close("dW gathered", got, start, want, o, P * Q));
    }
  }
}

// Fresh dW stored from registers (fp32: row half 0 at once, row half 1 under the next tile's
// mainloop; bf16: the tile under the next tile's mainloop; a CTA's last tile at once): with every
// CTA holding several tiles (11 x 3 tiles of 128x256 per expert, the last row and column tiles
// partial, 8 non-empty experts: 264 tiles, 2 per SM on a 132-SM card), segments of 1 to 900 rows
// and two empty ones. fp32: every element written and equal to the accumulating kernel's (TMA
// epilogue) from zeros, sampled rows of each dW_e (every 7th, the first and last two) match the
// double reference per element, empty experts are 0; bf16: every element is the fp32 result
// rounded once.
TEST(GroupedWgrad, RegisterStoresWriteEveryTileWithManyTilesPerCta) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {1, 0, 300, 129, 500, 0, 70, 900, 127, 128};
  const int64_t E = static_cast<int64_t>(sizes.size()), P = 1288, Q = 520;
  const std::vector<int64_t> o = offsets_of(sizes);
  const int64_t R = o[E] + 3;
  const std::vector<float> x = round_to<bf16>(random_vector<float>(R * P, 71));
  const std::vector<float> y = round_to<bf16>(random_vector<float>(R * Q, 72));
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end()));
  DeviceArray<bf16> dx(to_device_type<bf16>(x)), dy(to_device_type<bf16>(y)), dw16(E * P * Q);
  DeviceArray<float> dw(E * P * Q);
  cuda::GroupedWgrad wgrad(E);
  dw.poison();
  wgrad.run({offsets.get(), P, Q, dx.get(), dy.get(), dw.get(), /*accumulate=*/false}, nullptr);
  const std::vector<float> got = dw.download();
  EXPECT_TRUE(std::none_of(got.begin(), got.end(), [](float v) { return std::isnan(v); }))
      << "dW elements left unwritten";
  int64_t bad = 0, first_bad = -1;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < P; ++i) {
      if (i % 7 != 0 && i >= 2 && i < P - 2) continue;
      for (int64_t j = 0; j < Q; ++j) {
        double want = 0;
        for (int64_t r = o[e]; r < o[e + 1]; ++r) want += double(x[r * P + i]) * y[r * Q + j];
        const float v = got[(e * P + i) * Q + j];
        // fp32 sums of up to 900 products; a misplaced value is off by O(1).
        if (!(std::abs(v - want) <= std::abs(want) * 1e-3 + 1e-2) && bad++ == 0)
          first_bad = (e * P + i) * Q + j;
      }
    }
  EXPECT_EQ(bad, 0) << "fp32 dW off the reference, the first at expert " << first_bad / (P * Q)
                    << ", row " << first_bad / Q % P << ", column " << first_bad % Q;
  // The same accumulators through the TMA epilogue (0 + acc: equal values, -0 read as +0).
  DeviceArray<float> dw_acc(std::vector<float>(E * P * Q, 0.f));
  wgrad.run({offsets.get(), P, Q, dx.get(), dy.get(), dw_acc.get(), /*accumulate=*/true}, nullptr);
  const std::vector<float> acc = dw_acc.download();
  int64_t differ = 0;
  for (int64_t i = 0; i < E * P * Q; ++i) differ += got[i] == acc[i] ? 0 : 1;
  EXPECT_EQ(differ, 0) << "fresh fp32 dW differs from the accumulating kernel's from zeros";

  dw16.poison();
  cuda::GroupedWgradArgs a16{offsets.get(), P, Q, dx.get(), dy.get(), nullptr, false};
  a16.dw_bf16 = dw16.get();
  wgrad.run(a16, nullptr);
  EXPECT_EQ(not_rounded_once(got, from_device_type(dw16.download())), 0)
      << "bf16 dW differs from the fp32 dW rounded once";
}

TEST(GroupedWgrad, EachSliceGainsItsSegmentsProductAndEmptyExpertsKeepTheirBits) {
  MOE_REQUIRE_GPU();
  const std::vector<int64_t> sizes = {3, 0, 257, 1, 0, 64, 130, 5};
  const int64_t E = static_cast<int64_t>(sizes.size()), P = 136, Q = 200;
  const std::vector<int64_t> o = offsets_of(sizes);
  const int64_t R = o[E] + 3;
  const std::vector<float> x = round_to<bf16>(random_vector<float>(R * P, 21));
  const std::vector<float> y = round_to<bf16>(random_vector<float>(R * Q, 22));
  const std::vector<float> dw0 = random_vector<float>(E * P * Q, 23);
  std::vector<double> want(E * P * Q, 0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < Q; ++j) {
        double acc = 0;
        for (int64_t r = o[e]; r < o[e + 1]; ++r) acc += double(x[r * P + i]) * y[r * Q + j];
        want[(e * P + i) * Q + j] = acc;
      }
  DeviceArray<int32_t> offsets(std::vector<int32_t>(o.begin(), o.end()));
  DeviceArray<bf16> dx(to_device_type<bf16>(x)), dy(to_device_type<bf16>(y));
  DeviceArray<float> dw(dw0);
  cuda::GroupedWgrad wgrad(E);
  wgrad.run({offsets.get(), P, Q, dx.get(), dy.get(), dw.get()}, nullptr);
  EXPECT_TRUE(slices_close(std::string("dW ") + wgrad.name(), dw.download(), dw0, want, o, P * Q));

  // Overwriting (beta = 0): from NaN, each slice is its product alone and empty experts are 0.
  dw.poison();
  wgrad.run({offsets.get(), P, Q, dx.get(), dy.get(), dw.get(), /*accumulate=*/false}, nullptr);
  const std::vector<float> zeros(E * P * Q, 0.f);
  EXPECT_TRUE(slices_close("dW overwritten", dw.download(), zeros, want, o, P * Q));

  // bf16 dW (written fresh): from NaN, every element is the fp32 result rounded once (the same
  // accumulators, stored through the bf16 epilogue), empty experts exactly 0.
  const std::vector<float> fresh = dw.download();
  DeviceArray<bf16> dw16(E * P * Q);
  dw16.poison();
  cuda::GroupedWgradArgs a16{offsets.get(), P, Q, dx.get(), dy.get(), nullptr, false};
  a16.dw_bf16 = dw16.get();
  wgrad.run(a16, nullptr);
  const std::vector<float> got16 = from_device_type(dw16.download());
  EXPECT_EQ(not_rounded_once(fresh, got16), 0) << "bf16 dW differs from the fp32 dW rounded once";
  EXPECT_TRUE(slices_close("dW bf16", got16, zeros, want, o, P * Q));
  a16.accumulate = true;  // bf16 accumulation would round every step: refused
  EXPECT_THROW(wgrad.run(a16, nullptr), ConfigError);
  a16.accumulate = false;
  a16.dw = dw.get();      // exactly one of dw, dw_bf16
  EXPECT_THROW(wgrad.run(a16, nullptr), ConfigError);
}

// ------------------------------------------------------------------------------------------------
// the fused up-projection vs the unfused pair
// ------------------------------------------------------------------------------------------------

// Largest distance in bf16 units in the last place between two bf16 tensors (as floats).
int64_t max_ulp(const std::vector<float>& a, const std::vector<float>& b, int64_t n,
                int64_t* differing) {
  auto key = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const int32_t s = static_cast<int32_t>(u >> 16);  // bf16 bits
    return s & 0x8000 ? 0x8000 - (s & 0x7fff) : s;      // monotone in the value
  };
  int64_t worst = 0;
  *differing = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t d = std::abs(int64_t{key(a[i])} - key(b[i]));
    *differing += d != 0;
    worst = std::max(worst, d);
  }
  return worst;
}

struct FusedParam {
  Activation activation;
  GateUpLayout gate_up;
  int64_t inter;  // 136: no whole 32-unit block at the end; 160: 2I = 320, two N tiles
};

class FusedUpProjection : public ::testing::TestWithParam<FusedParam> {};

// Segments with empty, one-row and multi-tile experts; the name keys the reference cache, so it
// must tell the shapes apart.
ExpertsCase fused_case(const FusedParam& p) {
  return {"fused_" + std::string(name(p.activation)) + "_i" + std::to_string(p.inter),
          {70, 0, 1, 300, 129, 5, 0, 256}, 192, p.inter, p.activation, 3};
}

// Same mainloop and the same activation functions on the same bf16-rounded pre: pre is identical
// bit for bit, act and yp should be too (at most one bf16 ulp is allowed for act, in case the two
// kernels' compilations contract the fp32 arithmetic differently; the counts are printed).
TEST_P(FusedUpProjection, EqualsTheUnfusedPairAndNeedsNoPre) {
  MOE_REQUIRE_GPU();
  const FusedParam& p = GetParam();
  const ExpertsCase c = fused_case(p);
  const Inputs in = make_inputs(c, 33);
  const int64_t I = in.shape.inter, A = in.shape.up_width(), M = in.offsets.back();
  Device unfused(in, p.gate_up), fused(in, p.gate_up);
  unfused.poison(), fused.poison();
  cuda::ExpertsWorkspace ws_unfused(unfused.shape, ExpertsBackend::grouped, false);
  cuda::ExpertsWorkspace ws_fused(fused.shape, ExpertsBackend::grouped_fused, false);
  cuda::experts_forward(ws_unfused, unfused.forward_args(), nullptr);
  cuda::experts_forward(ws_fused, fused.forward_args(), nullptr);
  const Outputs u = download(unfused), f = download(fused);
  EXPECT_TRUE(same_bytes(u.pre, f.pre)) << "pre differs between the fused and unfused paths";
  int64_t differing = 0;
  const int64_t ulp = max_ulp(u.act, f.act, M * I, &differing);
  std::printf("[ fused    ] %s %s act: %ld of %ld values differ, max %ld bf16 ulp\n",
              std::string(name(p.activation)).c_str(), std::string(cuda::name(p.gate_up)).c_str(),
              (long)differing, (long)(M * I), (long)ulp);
  EXPECT_LE(ulp, 1);
  const Reference& ref = cached_reference(c, in);
  const int64_t H = in.shape.hidden, R = in.shape.max_rows;
  EXPECT_TRUE(segments_close("pre", f.pre, ref.pre, in.offsets, A, R));
  EXPECT_TRUE(segments_close("act", f.act, ref.act, in.offsets, I, R));
  EXPECT_TRUE(segments_close("yp", f.yp, ref.yp, in.offsets, H, R));

  // Forward only: no pre at all, the same act and yp.
  Device no_pre(in, p.gate_up);
  no_pre.poison();
  cuda::ExpertsForwardArgs args = no_pre.forward_args();
  args.pre = nullptr;
  cuda::experts_forward(ws_fused, args, nullptr);
  const Outputs n = download(no_pre);
  EXPECT_TRUE(same_bytes(n.act, f.act));
  EXPECT_TRUE(same_bytes(n.yp, f.yp));
  EXPECT_TRUE(std::all_of(n.pre.begin(), n.pre.end(), [](float v) { return std::isnan(v); }))
      << "pre was written although its pointer was null";
}

// Sum over the parts of row r of the da GEMM's row dots, and the double reference
// sum_u (dyp[r] . w_down[e][u]) * act[r, u] with act as the forward stored it; `scale` is
// sum_u |da * act|, for the tolerance: the GPU multiplies da rounded to bf16 by act in fp32, so
// each term is within 2^-7 of the reference's (bf16's unit roundoff 2^-8 each from da's and act's
// rounding).
struct RowDot {
  double got, want, scale;
};
std::vector<RowDot> row_dots(const Inputs& in, const std::vector<float>& act,
                             const std::vector<float>& row_dot) {
  const ExpertsShape& s = in.shape;
  const int64_t H = s.hidden, I = s.inter, R = s.max_rows, P = cuda::row_dot_parts(I);
  std::vector<RowDot> v;
  for (int64_t e = 0; e < s.experts; ++e)
    for (int64_t r = in.offsets[e]; r < in.offsets[e + 1]; ++r) {
      RowDot d{0, 0, 0};
      for (int64_t p = 0; p < P; ++p) d.got += row_dot[p * R + r];
      for (int64_t u = 0; u < I; ++u) {
        double da = 0;
        for (int64_t h = 0; h < H; ++h)
          da += double(in.dyp[r * H + h]) * in.w_down[(e * I + u) * H + h];
        d.want += da * act[r * I + u];
        d.scale += std::abs(da * act[r * I + u]);
      }
      v.push_back(d);
    }
  return v;
}

// The backward on grouped_fused runs the activation backward in the da GEMM's epilogue
// (GroupedGemmActGrad): dpre must be the unfused pair's (plain da GEMM, bf16 da, elementwise
// backward) bit for bit, and so dxp and both weight gradients; rows past M of dpre are not
// written; and dpre written in place over pre gives the same bits. With the row dots asked for
// (the router-weight gradient) too: dpre's bits do not move, each row's parts add up to
// <da, act> to fp32 accuracy, and no part of a row past M is written.
TEST_P(FusedUpProjection, BackwardEqualsTheUnfusedPairInPlaceOrNot) {
  MOE_REQUIRE_GPU();
  const FusedParam& p = GetParam();
  const Inputs in = make_inputs(fused_case(p), 33);
  const int64_t A = in.shape.up_width(), M = in.offsets.back(), R = in.shape.max_rows;
  const int64_t P = cuda::row_dot_parts(in.shape.inter);
  struct Run {
    Outputs out;
    std::vector<float> dpre;     // in the run's layout
    std::vector<float> row_dot;  // (P, R), fused with dots only
  };
  auto run = [&](ExpertsBackend backend, bool in_place, bool dots) {
    Device d(in, p.gate_up);
    d.poison();
    cuda::ExpertsWorkspace ws(d.shape, backend);
    cuda::experts_forward(ws, d.forward_args(), nullptr);
    DeviceArray<bf16> dpre(R * A);
    DeviceArray<float> row_dot(P * R);
    dpre.poison();
    row_dot.poison();
    cuda::ExpertsBackwardArgs b = d.backward_args();
    b.dpre = in_place ? d.pre.get() : dpre.get();
    if (dots) b.row_dot = row_dot.get();
    cuda::experts_backward(ws, b, nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    return Run{download(d), from_device_type((in_place ? d.pre : dpre).download()),
               dots ? row_dot.download() : std::vector<float>{}};
  };
  const Run unfused = run(ExpertsBackend::grouped, false, false);
  for (auto [in_place, dots] : std::vector<std::pair<bool, bool>>{
           {false, false}, {true, false}, {false, true}, {true, true}}) {
    SCOPED_TRACE(std::string(in_place ? "dpre over pre" : "dpre apart") +
                 (dots ? ", row dots" : ""));
    const Run fused = run(ExpertsBackend::grouped_fused, in_place, dots);
    if (dots) {
      int64_t bad = 0;
      for (const RowDot& d : row_dots(in, fused.out.act, fused.row_dot))
        bad += !(std::abs(d.got - d.want) <= 0x1p-7 * d.scale + 1e-30);
      EXPECT_EQ(bad, 0) << "rows whose row dot is off";
      for (int64_t q = 0; q < P; ++q)
        for (int64_t r = M; r < R; ++r)
          EXPECT_TRUE(std::isnan(fused.row_dot[q * R + r])) << "row dot of row " << r << " past M";
    }
    int64_t differing = 0;
    const int64_t ulp = max_ulp(unfused.dpre, fused.dpre, M * A, &differing);
    EXPECT_EQ(ulp, 0) << differing << " of " << M * A << " dpre values differ";
    EXPECT_TRUE(same_bytes(unfused.out.dxp, fused.out.dxp)) << "dxp differs";
    EXPECT_TRUE(same_bytes(unfused.out.dw_up, fused.out.dw_up)) << "dw_up differs";
    EXPECT_TRUE(same_bytes(unfused.out.dw_down, fused.out.dw_down)) << "dw_down differs";
    if (!in_place) {
      EXPECT_TRUE(std::all_of(fused.dpre.begin() + M * A, fused.dpre.end(),
                              [](float v) { return std::isnan(v); }))
          << "rows past M of dpre were written";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Activations, FusedUpProjection,
                         ::testing::Values(FusedParam{Activation::swiglu, GateUpLayout::interleaved, 136},
                                           FusedParam{Activation::gelu, GateUpLayout::interleaved, 136},
                                           FusedParam{Activation::swiglu, GateUpLayout::blocked,
                                                      160},
                                           // I > 256: two column tiles, two row-dot parts
                                           FusedParam{Activation::swiglu, GateUpLayout::blocked,
                                                      288}),
                         [](const auto& info) {
                           const FusedParam& p = info.param;
                           std::string n(name(p.activation));
                           if (p.gate_up == GateUpLayout::blocked) n += "_blocked";
                           if (p.inter > 256) n += "_i" + std::to_string(p.inter);
                           return n;
                         });

TEST(GroupedGemmActGrad, RefusesWhatItCannotTake) {
  MOE_REQUIRE_GPU();
  const int64_t E = 2, N = 40, K = 64, R = 16;
  DeviceArray<int32_t> offsets(std::vector<int32_t>{0, 9, 16});
  DeviceArray<bf16> a(R * K), b(E * N * K), pre(R * 2 * N), dpre(R * 2 * N);
  cuda::GroupedGemmActGrad swiglu(E, Activation::swiglu), gelu(E, Activation::gelu);
  cuda::GroupedGemmActGradArgs args{offsets.get(), N, K, a.get(), b.get(), pre.get(), dpre.get(),
                                    /*blocked=*/true};
  EXPECT_THROW(swiglu.run(args, nullptr), ConfigError);  // blocked needs N % 32 == 0
  args.n = 64;
  EXPECT_THROW(gelu.run(args, nullptr), ConfigError);    // blocked is SwiGLU's
  args.blocked = false;
  args.pre = nullptr;
  EXPECT_THROW(swiglu.run(args, nullptr), ConfigError);
  args.pre = pre.get();
  args.n = 36;                                           // not a multiple of 8
  EXPECT_THROW(swiglu.run(args, nullptr), ConfigError);
}

// ------------------------------------------------------------------------------------------------
// no host synchronisation: a CUDA graph of forward + backward, replayed with new offsets
// ------------------------------------------------------------------------------------------------

class ExpertsGraph : public ::testing::TestWithParam<ExpertsBackend> {};

// Captured once (global capture mode: any synchronising call would fail the capture), replayed for
// three routings of the same buffers -- offsets rewritten on the device between replays, outputs
// poisoned and gradients reset -- and each replay must match the CPU reference of its routing.
TEST_P(ExpertsGraph, ForwardAndBackwardReplayWithTheOffsetsOnTheDevice) {
  MOE_REQUIRE_GPU();
  const std::vector<std::vector<int64_t>> routings = {
      {5, 0, 130, 64, 1, 33}, {0, 0, 300, 0, 0, 0}, {40, 41, 39, 1, 77, 2}};
  int64_t rows = 0;
  for (const auto& r : routings) rows = std::max(rows, std::accumulate(r.begin(), r.end(), int64_t{0}));
  ExpertsCase c{"graph", routings[0], 128, 64, Activation::swiglu, 0};
  c.extra_rows = rows + 4 - std::accumulate(routings[0].begin(), routings[0].end(), int64_t{0});
  const Inputs in = make_inputs(c, 57);
  const GateUpLayout gate_up = GetParam() == ExpertsBackend::grouped_fused
                                   ? GateUpLayout::interleaved
                                   : GateUpLayout::split;
  Device d(in, gate_up);
  cuda::ExpertsWorkspace ws(d.shape, GetParam());

  cudaStream_t stream;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  cuda::experts_forward(ws, d.forward_args(), stream);
  cuda::experts_backward(ws, d.backward_args(), stream);
  MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  for (const auto& sizes : routings) {
    const std::vector<int64_t> o = offsets_of(sizes);
    d.offsets.upload(std::vector<int32_t>(o.begin(), o.end()));
    d.dw_up.upload(d.dw_up0);
    d.dw_down.upload(in.dw_down0);
    d.poison();
    MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    SCOPED_TRACE("routing with M = " + std::to_string(o.back()));
    expect_matches_reference(download(d), in, reference(in, o), o);
  }
  MOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(Backends, ExpertsGraph,
                         ::testing::Values(ExpertsBackend::grouped, ExpertsBackend::grouped_fused),
                         [](const auto& info) { return std::string(cuda::name(info.param)); });

// ------------------------------------------------------------------------------------------------
// determinism
// ------------------------------------------------------------------------------------------------

class ExpertsDeterminism : public ::testing::TestWithParam<ExpertsBackend> {};

// The cases the bit-for-bit comparisons run on: many small segments, skewed, and GELU.
bool determinism_case(const ExpertsCase& c) {
  return c.name == "e64_small_segments" || c.name == "e11_zipf" || c.name == "e7_skewed_gelu";
}

// No atomics, no split-K, fixed reduction orders: the same inputs give the same bits, forward and
// backward (weight gradients included), run after run.
TEST_P(ExpertsDeterminism, TwoRunsAreBitwiseIdentical) {
  MOE_REQUIRE_GPU();
  for (const ExpertsCase& c : experts_cases()) {
    if (!determinism_case(c)) continue;
    const Inputs in = make_inputs(c, 77);
    const GateUpLayout gate_up = GetParam() == ExpertsBackend::grouped_fused
                                     ? GateUpLayout::interleaved
                                     : GateUpLayout::split;
    const Outputs a = run_stage(in, GetParam(), gate_up), b = run_stage(in, GetParam(), gate_up);
    const std::vector<std::tuple<const char*, const std::vector<float>*,
                                 const std::vector<float>*>>
        pairs = {{"pre", &a.pre, &b.pre}, {"act", &a.act, &b.act}, {"yp", &a.yp, &b.yp},
                 {"dxp", &a.dxp, &b.dxp}, {"dw_up", &a.dw_up, &b.dw_up},
                 {"dw_down", &a.dw_down, &b.dw_down}};
    for (const auto& [name, x, y] : pairs)
      EXPECT_TRUE(same_bytes(*x, *y)) << c.name << ": " << name << " differs between two runs";
  }
}

// grouped_fused runs dw_down on a second stream beside the da GEMM unless step events are asked
// for; both forms must give the same bits (outputs poisoned; dW accumulated and fresh).
TEST(ExpertsSideStream, DwDownBesideTheDaGemmGivesTheInOrderBits) {
  MOE_REQUIRE_GPU();
  std::vector<cudaEvent_t> events(int(cuda::ExpertsBackwardStep::count) + 1);
  for (auto& e : events) MOE_CUDA_CHECK(cudaEventCreate(&e));
  int checked = 0;
  for (const ExpertsCase& c : experts_cases()) {
    if (!determinism_case(c)) continue;
    const Inputs in = make_inputs(c, 91);
    for (bool accumulate : {true, false}) {
      const Outputs side = run_stage(in, ExpertsBackend::grouped_fused,
                                     GateUpLayout::interleaved, accumulate);
      const Outputs in_order = run_stage(in, ExpertsBackend::grouped_fused,
                                         GateUpLayout::interleaved, accumulate, events.data());
      for (const auto& [name, x, y] :
           std::vector<std::tuple<const char*, const std::vector<float>*,
                                  const std::vector<float>*>>{
               {"dxp", &side.dxp, &in_order.dxp},
               {"dw_up", &side.dw_up, &in_order.dw_up},
               {"dw_down", &side.dw_down, &in_order.dw_down}}) {
        EXPECT_TRUE(same_bytes(*x, *y))
            << c.name << " accumulate " << accumulate << ": " << name << " differs";
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 18);  // three cases, accumulated and fresh dW, three outputs
  for (auto& e : events) MOE_CUDA_CHECK(cudaEventDestroy(e));
}

// The forward's step events (benchmarks time up and down with them): every boundary recorded,
// the steps' times add up to the whole, and the outputs keep the bits of a run without events;
// a backend that is not grouped refuses them.
TEST(ExpertsStepEvents, ForwardStepsAreRecordedAndKeepTheBits) {
  MOE_REQUIRE_GPU();
  constexpr int kEvents = int(cuda::ExpertsForwardStep::count) + 1;
  std::vector<cudaEvent_t> events(kEvents);
  for (auto& e : events) MOE_CUDA_CHECK(cudaEventCreate(&e));
  int checked = 0;
  for (const ExpertsCase& c : experts_cases()) {
    if (!determinism_case(c)) continue;
    const Inputs in = make_inputs(c, 93);
    for (ExpertsBackend backend : {ExpertsBackend::grouped, ExpertsBackend::grouped_fused}) {
      const GateUpLayout gate_up = backend == ExpertsBackend::grouped_fused
                                       ? GateUpLayout::interleaved
                                       : GateUpLayout::split;
      const Outputs plain = run_stage(in, backend, gate_up);
      const Outputs timed = run_stage(in, backend, gate_up, true, nullptr, events.data());
      for (const auto& [name, x, y] :
           std::vector<std::tuple<const char*, const std::vector<float>*,
                                  const std::vector<float>*>>{
               {"pre", &plain.pre, &timed.pre}, {"act", &plain.act, &timed.act},
               {"yp", &plain.yp, &timed.yp}})
        EXPECT_TRUE(same_bytes(*x, *y)) << c.name << " " << cuda::name(backend) << ": " << name;
      float step[kEvents - 1] = {}, whole = 0;
      for (int i = 0; i + 1 < kEvents; ++i) {
        ASSERT_EQ(cudaEventElapsedTime(&step[i], events[i], events[i + 1]), cudaSuccess)
            << c.name << ": step " << i << " not recorded";
        EXPECT_GE(step[i], 0.f);
      }
      ASSERT_EQ(cudaEventElapsedTime(&whole, events[0], events[kEvents - 1]), cudaSuccess);
      EXPECT_GT(whole, 0.f) << c.name << " " << cuda::name(backend);
      EXPECT_NEAR(step[0] + step[1], whole, 1e-3f + 1e-3f * whole);
      ++checked;
    }
    Device d(in, GateUpLayout::split);
    cuda::ExpertsWorkspace ws(d.shape, ExpertsBackend::cublas_grouped_host_offsets);
    EXPECT_THROW(cuda::experts_forward(ws, d.forward_args(), nullptr, events.data()), ConfigError);
  }
  EXPECT_EQ(checked, 6);  // three cases, two backends
  for (auto& e : events) MOE_CUDA_CHECK(cudaEventDestroy(e));
}

INSTANTIATE_TEST_SUITE_P(Backends, ExpertsDeterminism,
                         ::testing::Values(ExpertsBackend::grouped, ExpertsBackend::grouped_fused),
                         [](const auto& info) { return std::string(cuda::name(info.param)); });

// ------------------------------------------------------------------------------------------------
// on the plan's own offsets; refusals
// ------------------------------------------------------------------------------------------------

// The experts stage on the offsets the GPU plan leaves on the device (padded layout: padding rows
// inside segments, some experts over capacity), by every backend that needs no host round trip.
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
  const int64_t H = c.hidden, R = in.shape.max_rows;
  ASSERT_EQ(R, shape.max_rows());
  for (ExpertsBackend b : {ExpertsBackend::grouped, ExpertsBackend::grouped_fused,
                           ExpertsBackend::cublas_strided_padded}) {
    SCOPED_TRACE(std::string(cuda::name(b)));
    Device d(in, b == ExpertsBackend::grouped_fused ? GateUpLayout::interleaved
                                                    : GateUpLayout::split);
    d.poison();
    cuda::ExpertsWorkspace ws(d.shape, b, false);
    cuda::ExpertsForwardArgs args = d.forward_args();
    args.offsets = plan.view().offsets;
    cuda::experts_forward(ws, args, nullptr);
    EXPECT_TRUE(segments_close("yp", from_device_type(d.yp.download()), ref.yp, in.offsets, H, R));
  }
}

TEST(ExpertsWorkspace, RefusesShapesTheBackendsCannotTake) {
  MOE_REQUIRE_GPU();
  cuda::ExpertsShape s{4, 100, 64, Activation::swiglu, 10};  // H = 100: rows not 16-byte aligned
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::grouped), ConfigError);
  EXPECT_NO_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::cublas_loop_host_offsets));
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::cublas_strided_padded), ConfigError);
  s.hidden = 128;
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::grouped_fused), ConfigError)
      << "SwiGLU fused needs the interleaved gate/up layout";
  s.gate_up = GateUpLayout::interleaved;
  EXPECT_NO_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::grouped_fused));
  s.gate_up = GateUpLayout::blocked;
  EXPECT_NO_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::grouped_fused));
  s.inter = 72;  // the blocked layout orders units in blocks of 32
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::grouped_fused), ConfigError);
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::cublas_loop_host_offsets), ConfigError);
  s.inter = 64;
  s.experts = 0;
  EXPECT_THROW(cuda::ExpertsWorkspace(s, ExpertsBackend::cublas_loop_host_offsets), ConfigError);
}

TEST(ExpertsBackendNames, RoundTrip) {
  for (ExpertsBackend b : cuda::kAllExpertsBackends)
    EXPECT_EQ(cuda::parse_experts_backend(cuda::name(b)), b);
  EXPECT_THROW(cuda::parse_experts_backend("cutlass"), ConfigError);
}

// The device reordering helpers agree with the host one and invert each other, for every layout.
TEST(GateUpLayout, ToAndFromEveryLayoutAreInverse) {
  MOE_REQUIRE_GPU();
  const int64_t rows = 5, I = 96;
  const std::vector<float> v = round_to<bf16>(random_vector<float>(rows * 2 * I, 4));
  for (GateUpLayout l : {GateUpLayout::split, GateUpLayout::interleaved, GateUpLayout::blocked}) {
    SCOPED_TRACE(std::string(cuda::name(l)));
    const std::vector<float> want = reorder(v, I, true, l);
    DeviceArray<bf16> split(to_device_type<bf16>(v)), in_l(rows * 2 * I), back(rows * 2 * I);
    in_l.poison(), back.poison();
    cuda::to_gate_up_layout(split.get(), in_l.get(), l, rows, I, nullptr);
    cuda::from_gate_up_layout(in_l.get(), l, back.get(), rows, I, nullptr);
    EXPECT_TRUE(same_bytes(from_device_type(in_l.download()), want));
    EXPECT_TRUE(same_bytes(from_device_type(back.download()), v));
    DeviceArray<float> f(want), fs(rows * 2 * I);
    fs.poison();
    cuda::from_gate_up_layout(f.get(), l, fs.get(), rows, I, nullptr);
    EXPECT_TRUE(same_bytes(fs.download(), v));
  }
  // Unit 8q + a of a block is pair 4a + q: unit 9 (q = 1, a = 1) is pair 5, unit 33 is pair 36.
  EXPECT_EQ(pair_of_unit(9, GateUpLayout::blocked), 5);
  EXPECT_EQ(pair_of_unit(33, GateUpLayout::blocked), 36);
  DeviceArray<bf16> a(rows * 2 * 40), b(rows * 2 * 40);
  EXPECT_THROW(cuda::to_gate_up_layout(a.get(), b.get(), GateUpLayout::blocked, rows, 40, nullptr),
               ConfigError);
}

TEST(GateUpLayout, InterleaveAndSplitAreInverse) {
  MOE_REQUIRE_GPU();
  const int64_t rows = 37, I = 24;
  const std::vector<float> v = round_to<bf16>(random_vector<float>(rows * 2 * I, 3));
  DeviceArray<bf16> split(to_device_type<bf16>(v)), inter(rows * 2 * I), back(rows * 2 * I);
  cuda::interleave_gate_up(split.get(), inter.get(), rows, I, nullptr);
  cuda::split_gate_up(inter.get(), back.get(), rows, I, nullptr);
  EXPECT_TRUE(same_bytes(from_device_type(inter.download()), reorder(v, I, true)));
  EXPECT_TRUE(same_bytes(from_device_type(back.download()), v));
  DeviceArray<float> f(reorder(v, I, true)), fs(rows * 2 * I);
  cuda::split_gate_up(f.get(), fs.get(), rows, I, nullptr);
  EXPECT_TRUE(same_bytes(fs.download(), v));
}

}  // namespace
}  // namespace moe::test
