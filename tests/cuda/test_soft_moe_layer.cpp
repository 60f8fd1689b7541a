// cuda::SoftMoeLayer (soft MoE over G groups of B tokens in bf16: route, dispatch, experts,
// combine and the backward of each) vs the CPU language model's way of running it: G calls of
// moe::layer_forward / layer_backward with tokens = B, one per group, in double on the same
// bf16-rounded inputs (x, dy, phi, w_up, w_down; the scale is fp32 on both), the parameter
// gradients summed over the groups as Transformer::ffn_backward sums them (soft MoE has no aux
// loss, so no 1/G scaling). Also the load statistics as Transformer::layer_stats aggregates the
// G calls, the per-token expert mass that add_routing_counts adds, and run-to-run bits.
//
// Tolerance: relative Frobenius error ||gpu - ref|| / ||ref|| < 2e-2 for y, dx, d phi, dW_up and
// dW_down (test_layer.cpp's bound for the whole layer in bf16): the GPU rounds D, C, slots_in,
// pre, act, slots_out, y, d_slots_out, da, dpre, d_slots_in and dx to bf16 (unit roundoff 2^-9)
// and accumulates in fp32; dx takes two bf16 roundings (D d_slots_in, then the norm's backward
// added). A host model of these roundings (every bf16 and fp32 store of the layer, on these cases
// and seeds 11..13) lands at 3e-3 .. 6e-3 for every tensor. A wrong group, slot row or stride
// gives O(1) errors, an unwritten element NaN (outputs are poisoned first; the accumulated
// gradients start from random values, not zeros).
// d scale is a sum over G*B*n terms whose softmax backwards cancel: its error is bounded by the
// size of what goes into it, ||m||_2 with m_i = |u_i| (D_i (|dD_i| + |a_j| + sum_t |D dD|) +
// C_i (|dC_i| + |b_t| + sum_j |C dC|)) (the bound of parity.cpp's soft_moe check, summed over
// the groups). Here dD and dC carry the bf16 experts' error too; the host model lands at 3e-3
// ||m||_2 at most, the bound is 2e-2 ||m||_2.
// Statistics come from the fp32 logits on the GPU: relative 1e-4. A CUDA graph of forward +
// backward replays to the eager bits; transpose_row_blocks moves the LM's rows exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/blas.hpp"
#include "cpu/stages.hpp"
#include "cuda_test_util.hpp"
#include "lm_test_util.hpp"
#include "moe/config.hpp"
#include "moe/cuda/soft_moe_layer.hpp"
#include "moe/layer.hpp"

namespace moe::test {
namespace {

using cuda::bf16;
using cuda::ExpertsBackend;
using cuda::GateUpLayout;
constexpr double kTolerance = 2e-2;
constexpr double kScaleTolerance = 2e-2;  // of ||m||_2, see above
constexpr double kStatsTolerance = 1e-4;

struct SoftCase {
  std::string name;
  int64_t G, B, H, I, E, S;
  Activation activation = Activation::swiglu;
  ExpertsBackend backend = ExpertsBackend::cublas_strided_padded;
  GateUpLayout gate_up = GateUpLayout::split;
  uint64_t seed = 11;
};
// Test listings show the case name, not a byte dump of the struct.
void PrintTo(const SoftCase& c, std::ostream* os) { *os << c.name; }

LayerConfig config_of(const SoftCase& c) {
  LayerConfig cfg;
  cfg.router = Router::soft_moe;
  cfg.tokens = c.B;
  cfg.hidden = c.H;
  cfg.inter = c.I;
  cfg.experts = c.E;
  cfg.top_k = 1;
  cfg.slots_per_expert = c.S;
  cfg.activation = c.activation;
  cfg.validate();
  return cfg;
}

std::vector<double> to_f64(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_f32(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// SwiGLU's [gate | up] columns of a (rows, 2I) matrix, and back (GateUpLayout::interleaved).
template <class T>
std::vector<T> interleave(const std::vector<T>& split, int64_t rows, int64_t I) {
  std::vector<T> out(split.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < I; ++j) {
      out[r * 2 * I + 2 * j] = split[r * 2 * I + j];
      out[r * 2 * I + 2 * j + 1] = split[r * 2 * I + I + j];
    }
  return out;
}
template <class T>
std::vector<T> deinterleave(const std::vector<T>& inter, int64_t rows, int64_t I) {
  std::vector<T> out(inter.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < I; ++j) {
      out[r * 2 * I + j] = inter[r * 2 * I + 2 * j];
      out[r * 2 * I + I + j] = inter[r * 2 * I + 2 * j + 1];
    }
  return out;
}

struct Inputs {
  Params<double> p;          // bf16-rounded phi, w_up, w_down; fp32 scale
  std::vector<float> x, dy;  // (G*B, H) bf16-rounded
};

Inputs make_inputs(const SoftCase& c, const LayerConfig& cfg) {
  const Params<float> pf = random_params<float>(cfg, c.seed);
  Inputs in;
  in.p.w_gate = to_f64(round_to<bf16>(pf.w_gate));
  in.p.slot_scale = to_f64(pf.slot_scale);
  in.p.w_up = to_f64(round_to<bf16>(pf.w_up));
  in.p.w_down = to_f64(round_to<bf16>(pf.w_down));
  in.x = round_to<bf16>(random_vector<float>(c.G * c.B * c.H, c.seed + 1));
  in.dy = round_to<bf16>(random_vector<float>(c.G * c.B * c.H, c.seed + 2));
  return in;
}

// The CPU model's G calls, in double.
struct Reference {
  std::vector<double> y, dx;   // (G*B, H)
  Params<double> grads;        // summed over the groups
  LoadStats stats;             // as Transformer::layer_stats
  std::vector<double> mass;    // (G*B, E) combine mass per expert, as add_routing_counts adds it
  double scale_bound = 0;      // ||m||_2 over all groups
};

Reference reference(const SoftCase& c, const LayerConfig& cfg, const Inputs& in) {
  const int64_t G = c.G, B = c.B, H = c.H, E = c.E, S = c.S, n = E * S;
  Reference r;
  r.y.assign(G * B * H, 0.0);
  r.dx.assign(G * B * H, 0.0);
  r.mass.assign(G * B * E, 0.0);
  r.stats.tokens_per_expert.assign(E, 0.0);
  r.grads.w_gate.assign(in.p.w_gate.size(), 0.0);
  r.grads.slot_scale.assign(1, 0.0);
  r.grads.w_up.assign(in.p.w_up.size(), 0.0);
  r.grads.w_down.assign(in.p.w_down.size(), 0.0);
  auto sums = parameter_list(r.grads);
  double m2 = 0;
  const std::vector<double> x = to_f64(in.x), dy = to_f64(in.dy);
  for (int64_t g = 0; g < G; ++g) {
    const double* xg = x.data() + g * B * H;
    const double* dyg = dy.data() + g * B * H;
    LayerForward<double> f;
    layer_forward(cfg, in.p, xg, f);
    std::copy(f.y.begin(), f.y.end(), r.y.begin() + g * B * H);
    Params<double> part;
    std::vector<double> dxg(B * H);
    layer_backward(cfg, in.p, xg, f, dyg, dxg.data(), part);
    std::copy(dxg.begin(), dxg.end(), r.dx.begin() + g * B * H);
    auto parts = parameter_list(part);
    for (size_t t = 0; t < sums.size(); ++t) {
      std::vector<double>& dst = *sums[t].second;
      const std::vector<double>& src = *parts[t].second;
      for (size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
    }
    for (int64_t e = 0; e < E; ++e) r.stats.tokens_per_expert[e] += f.stats.tokens_per_expert[e];
    r.stats.router_entropy += f.stats.router_entropy / double(G);
    r.stats.mean_entropy += f.stats.mean_entropy / double(G);
    const SoftStep<double>& s = f.soft;
    for (int64_t t = 0; t < B; ++t)
      for (int64_t j = 0; j < n; ++j) r.mass[(g * B + t) * E + j / S] += s.combine[t * n + j];

    // ||m||_2 of this group: dC = dy slots_out^T, d_slots_out = C^T dy, the experts' backward,
    // dD = x d_slots_in^T (as soft_moe_backward forms them)
    std::vector<double> dC(B * n), dD(B * n), dso(n * H), dsi(n * H, 0.0),
        dwu(in.p.w_up.size(), 0.0), dwd(in.p.w_down.size(), 0.0);
    cpu::gemm(false, true, B, n, H, 1.0, dyg, H, s.slots_out.data(), H, 0.0, dC.data(), n);
    cpu::gemm(true, false, n, H, B, 1.0, s.combine.data(), n, dyg, H, 0.0, dso.data(), H);
    std::vector<int64_t> offsets(E + 1);
    for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
    cpu::experts_backward(cfg, offsets.data(), E, in.p.w_up.data(), in.p.w_down.data(),
                          s.slots_in.data(), s.pre.data(), s.act.data(), dso.data(), dsi.data(),
                          dwu.data(), dwd.data());
    cpu::gemm(false, true, B, n, H, 1.0, xg, H, dsi.data(), H, 0.0, dD.data(), n);
    m2 += cpu::soft_moe_scale_grad_magnitude_sq(B, n, s.dispatch.data(), dD.data(),
                                                s.combine.data(), dC.data(), s.logits.data(),
                                                in.p.slot_scale[0]);
  }
  fill_balance(r.stats);
  r.scale_bound = std::sqrt(m2);
  return r;
}

// One forward + backward on the device; what it leaves, as float.
struct DeviceRun {
  std::vector<float> y, dx, dphi, dscale, dw_up, dw_down;  // dw_up in the split layout
  std::vector<float> mass;                                 // (G*B, E)
  LoadStats stats;
};

// Starting values of the accumulated gradients: random, so that += is checked.
struct GradStarts {
  std::vector<float> dphi, dscale, dw_up, dw_down;  // dw_up in the split layout
};

// accumulate_experts false: dw_up and dw_down start as NaN and must come out written fresh.
DeviceRun run_device(const SoftCase& c, const LayerConfig& cfg, const Inputs& in,
                     const GradStarts& st, bool accumulate_experts = true) {
  const int64_t G = c.G, B = c.B, H = c.H, E = c.E, I = c.I, T = G * B;
  const bool inter = c.gate_up == GateUpLayout::interleaved && c.activation == Activation::swiglu;
  cuda::SoftMoeLayer layer(cfg, G, c.backend, c.gate_up);

  const std::vector<float> w_up = to_f32(in.p.w_up);
  DeviceArray<bf16> x(to_device_type<bf16>(in.x)), dy(to_device_type<bf16>(in.dy)),
      phi(to_device_type<bf16>(to_f32(in.p.w_gate))),
      wu(to_device_type<bf16>(inter ? interleave(w_up, E * H, I) : w_up)),
      wd(to_device_type<bf16>(to_f32(in.p.w_down)));
  DeviceArray<float> scale(std::vector<float>{float(in.p.slot_scale[0])});
  DeviceArray<bf16> y(T * H), dx(T * H);
  DeviceArray<float> dphi(st.dphi), dscale(st.dscale),
      dwu(inter ? interleave(st.dw_up, E * H, I) : st.dw_up), dwd(st.dw_down);
  y.poison();
  dx.poison();
  if (!accumulate_experts) {
    dwu.poison();
    dwd.poison();
  }

  cuda::SoftMoeWeights w;
  w.phi = phi.get();
  w.scale = scale.get();
  w.w_up = wu.get();
  w.w_down = wd.get();
  cuda::SoftMoeGrads g;
  g.dx = dx.get();
  g.dphi = dphi.get();
  g.dscale = dscale.get();
  g.dw_up = dwu.get();
  g.dw_down = dwd.get();
  g.accumulate_experts = accumulate_experts;
  layer.forward(x.get(), w, y.get(), nullptr);
  layer.backward(x.get(), w, dy.get(), g, nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  DeviceRun r;
  r.y = download_float(y);
  r.dx = download_float(dx);
  r.dphi = dphi.download();
  r.dscale = dscale.download();
  r.dw_up = dwu.download();
  if (inter) r.dw_up = deinterleave(r.dw_up, E * H, I);
  r.dw_down = dwd.download();
  r.stats = layer.stats();
  const float* mass = layer.expert_mass(nullptr);
  r.mass.resize(T * E);
  MOE_CUDA_CHECK(cudaMemcpy(r.mass.data(), mass, r.mass.size() * sizeof(float),
                            cudaMemcpyDeviceToHost));
  return r;
}

std::vector<float> plus(const std::vector<float>& start, const std::vector<double>& d) {
  std::vector<float> out(start.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = float(double(start[i]) + d[i]);
  return out;
}

class SoftMoeLayerParity : public ::testing::TestWithParam<SoftCase> {};

TEST_P(SoftMoeLayerParity, MatchesTheCpuLayerRunGroupByGroup) {
  MOE_REQUIRE_GPU();
  const SoftCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Inputs in = make_inputs(c, cfg);
  const Reference ref = reference(c, cfg, in);

  GradStarts st;
  st.dphi = random_vector<float>(in.p.w_gate.size(), c.seed + 3, 0.1);
  st.dscale = random_vector<float>(1, c.seed + 4, 0.1);
  st.dw_up = random_vector<float>(in.p.w_up.size(), c.seed + 5, 0.1);
  st.dw_down = random_vector<float>(in.p.w_down.size(), c.seed + 6, 0.1);
  const DeviceRun r = run_device(c, cfg, in, st);

  const double e_y = rel_error(r.y, to_f32(ref.y));
  const double e_dx = rel_error(r.dx, to_f32(ref.dx));
  const double e_phi = rel_error(r.dphi, plus(st.dphi, ref.grads.w_gate), &st.dphi);
  const double e_up = rel_error(r.dw_up, plus(st.dw_up, ref.grads.w_up), &st.dw_up);
  const double e_down = rel_error(r.dw_down, plus(st.dw_down, ref.grads.w_down), &st.dw_down);
  const std::string why = c.name;
  EXPECT_LT(e_y, kTolerance) << "y " << why;
  EXPECT_LT(e_dx, kTolerance) << "dx " << why;
  EXPECT_LT(e_phi, kTolerance) << "dphi " << why;
  EXPECT_LT(e_up, kTolerance) << "dw_up " << why;
  EXPECT_LT(e_down, kTolerance) << "dw_down " << why;
  const double d_scale = double(r.dscale[0]) - double(st.dscale[0]);
  EXPECT_LE(std::abs(d_scale - ref.grads.slot_scale[0]), kScaleTolerance * ref.scale_bound + 1e-6)
      << "dscale " << why << ": got " << d_scale << " want " << ref.grads.slot_scale[0]
      << " (||m|| = " << ref.scale_bound << ")";
  std::printf("%s: rel errors y %.2e dx %.2e dphi %.2e dw_up %.2e dw_down %.2e; dscale %.6g vs "
              "%.6g (||m|| %.3g)\n",
              why.c_str(), e_y, e_dx, e_phi, e_up, e_down, d_scale, ref.grads.slot_scale[0],
              ref.scale_bound);

  // statistics: as Transformer::layer_stats and add_routing_counts see the G calls
  const double T = double(c.G * c.B);
  EXPECT_TRUE(close("tokens_per_expert", to_f32(std::vector<double>(
                                              r.stats.tokens_per_expert.begin(),
                                              r.stats.tokens_per_expert.end())),
                    ref.stats.tokens_per_expert, kStatsTolerance * T / double(c.E),
                    kStatsTolerance));
  EXPECT_NEAR(r.stats.router_entropy, ref.stats.router_entropy,
              kStatsTolerance * (1 + ref.stats.router_entropy));
  EXPECT_NEAR(r.stats.mean_entropy, ref.stats.mean_entropy,
              kStatsTolerance * (1 + ref.stats.mean_entropy));
  EXPECT_NEAR(r.stats.cv, ref.stats.cv, 1e-3 * (1 + ref.stats.cv));
  EXPECT_NEAR(r.stats.max_violation, ref.stats.max_violation, 1e-3 * (1 + ref.stats.max_violation));
  EXPECT_EQ(r.stats.drop_rate, 0.0);
  EXPECT_EQ(r.stats.tokens_without_expert, 0.0);
  EXPECT_TRUE(close("expert_mass", r.mass, ref.mass, 1e-6, kStatsTolerance));

  // same inputs, same bits
  const DeviceRun again = run_device(c, cfg, in, st);
  EXPECT_TRUE(same_bytes(r.y, again.y)) << "y " << why;
  EXPECT_TRUE(same_bytes(r.dx, again.dx)) << "dx " << why;
  EXPECT_TRUE(same_bytes(r.dphi, again.dphi)) << "dphi " << why;
  EXPECT_TRUE(same_bytes(r.dscale, again.dscale)) << "dscale " << why;
  EXPECT_TRUE(same_bytes(r.dw_up, again.dw_up)) << "dw_up " << why;
  EXPECT_TRUE(same_bytes(r.dw_down, again.dw_down)) << "dw_down " << why;
}

// The expert weight gradients written fresh (what the language model's step uses) are the ones
// accumulated onto zeros: beta 0 or 1 on zeros, equal to within fp32 roundoff (cuBLAS may pick
// another algorithm for beta 0; the fresh run starts from NaN, which never passes); every other
// output is unchanged bit for bit.
TEST_P(SoftMoeLayerParity, FreshExpertGradientsAreTheAccumulatedOnesFromZero) {
  MOE_REQUIRE_GPU();
  const SoftCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Inputs in = make_inputs(c, cfg);
  GradStarts st;
  st.dphi = random_vector<float>(in.p.w_gate.size(), c.seed + 3, 0.1);
  st.dscale = random_vector<float>(1, c.seed + 4, 0.1);
  st.dw_up.assign(in.p.w_up.size(), 0.f);
  st.dw_down.assign(in.p.w_down.size(), 0.f);
  const DeviceRun accumulated = run_device(c, cfg, in, st);
  const DeviceRun fresh = run_device(c, cfg, in, st, /*accumulate_experts=*/false);
  auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  EXPECT_TRUE(close("dw_up", fresh.dw_up, as_double(accumulated.dw_up), 1e-9, 1e-6));
  EXPECT_TRUE(close("dw_down", fresh.dw_down, as_double(accumulated.dw_down), 1e-9, 1e-6));
  EXPECT_TRUE(same_bytes(fresh.y, accumulated.y));
  EXPECT_TRUE(same_bytes(fresh.dx, accumulated.dx));
  EXPECT_TRUE(same_bytes(fresh.dphi, accumulated.dphi));
  EXPECT_TRUE(same_bytes(fresh.dscale, accumulated.dscale));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SoftMoeLayerParity,
    ::testing::Values(
        SoftCase{"g1_b40_e4_s2", 1, 40, 64, 32, 4, 2},
        SoftCase{"g9_b1_e3_s2", 9, 1, 48, 24, 3, 2},  // B = 1: every dispatch weight is 1
        SoftCase{"g7_b5_e3_s2", 7, 5, 40, 24, 3, 2},
        SoftCase{"g3_b300_e2_s3_chunks", 3, 300, 32, 16, 2, 3},  // 2 row chunks per group
        SoftCase{.name = "g5_b6_e3_s2_gelu", .G = 5, .B = 6, .H = 32, .I = 16, .E = 3, .S = 2,
                 .activation = Activation::gelu},
        // the GPU language model's FFN (G = S = 512, B = 16, E = 16, one slot) scaled down
        SoftCase{"lm_g64_b16_e16_s1", 64, 16, 64, 32, 16, 1},
        SoftCase{.name = "lm_g64_b16_e16_s1_grouped", .G = 64, .B = 16, .H = 64, .I = 32,
                 .E = 16, .S = 1, .backend = ExpertsBackend::grouped},
        SoftCase{.name = "lm_g64_b16_e16_s1_grouped_fused_interleaved", .G = 64, .B = 16,
                 .H = 64, .I = 32, .E = 16, .S = 1, .backend = ExpertsBackend::grouped_fused,
                 .gate_up = GateUpLayout::interleaved}),
    [](const auto& info) { return info.param.name; });

// A CUDA graph of forward + backward replays to the eager bits, also on another input: every
// size stays on the device and nothing is allocated or synchronised inside the calls.
class SoftMoeLayerGraph : public ::testing::TestWithParam<SoftCase> {};

TEST_P(SoftMoeLayerGraph, ReplayOfForwardAndBackwardGivesTheEagerBits) {
  MOE_REQUIRE_GPU();
  const SoftCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Inputs in = make_inputs(c, cfg);
  const int64_t T = c.G * c.B, H = c.H;
  cuda::SoftMoeLayer layer(cfg, c.G, c.backend, c.gate_up);
  const std::vector<bf16> x1 = to_device_type<bf16>(in.x);
  std::vector<float> x2f(in.x.size());  // reversed rows: other groups, other routing
  for (int64_t t = 0; t < T; ++t)
    std::copy_n(in.x.data() + (T - 1 - t) * H, H, x2f.data() + t * H);
  const std::vector<bf16> x2 = to_device_type<bf16>(x2f);
  DeviceArray<bf16> x(x1), dy(to_device_type<bf16>(in.dy)),
      phi(to_device_type<bf16>(to_f32(in.p.w_gate))), wu(to_device_type<bf16>(to_f32(in.p.w_up))),
      wd(to_device_type<bf16>(to_f32(in.p.w_down))), y(T * H), dx(T * H);
  DeviceArray<float> scale(std::vector<float>{float(in.p.slot_scale[0])}),
      dphi(in.p.w_gate.size()), dscale(1), dwu(in.p.w_up.size()), dwd(in.p.w_down.size());
  cuda::SoftMoeWeights w{phi.get(), scale.get(), wu.get(), wd.get()};
  cuda::SoftMoeGrads g{dx.get(), dphi.get(), dscale.get(), dwu.get(), dwd.get()};
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct Out {
    std::vector<bf16> y, dx;
    std::vector<float> dphi, dscale, dw_up, dw_down;
  };
  auto reset = [&] {
    for (DeviceArray<float>* a : {&dphi, &dscale, &dwu, &dwd})
      MOE_CUDA_CHECK(cudaMemsetAsync(a->get(), 0, a->size() * sizeof(float), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(y.get(), kPoisonFloat, y.size() * sizeof(bf16), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(dx.get(), kPoisonFloat, dx.size() * sizeof(bf16), stream));
  };
  auto step = [&] {
    layer.forward(x.get(), w, y.get(), stream);
    layer.backward(x.get(), w, dy.get(), g, stream);
  };
  auto collect = [&] {
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return Out{y.download(), dx.download(), dphi.download(), dscale.download(), dwu.download(),
               dwd.download()};
  };
  auto expect_same = [&](const Out& a, const Out& b, const char* what) {
    EXPECT_TRUE(same_bytes(a.y, b.y)) << c.name << " " << what << ": y";
    EXPECT_TRUE(same_bytes(a.dx, b.dx)) << c.name << " " << what << ": dx";
    EXPECT_TRUE(same_bytes(a.dphi, b.dphi)) << c.name << " " << what << ": dphi";
    EXPECT_TRUE(same_bytes(a.dscale, b.dscale)) << c.name << " " << what << ": dscale";
    EXPECT_TRUE(same_bytes(a.dw_up, b.dw_up)) << c.name << " " << what << ": dw_up";
    EXPECT_TRUE(same_bytes(a.dw_down, b.dw_down)) << c.name << " " << what << ": dw_down";
  };

  reset();
  step();
  const Out eager = collect();
  x.upload(x2);
  reset();
  step();
  const Out eager2 = collect();
  EXPECT_FALSE(same_bytes(eager.y, eager2.y)) << "the second input must give another output";

  x.upload(x1);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  step();
  MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    reset();
    MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    expect_same(collect(), eager, "replay on x");
  }
  x.upload(x2);
  reset();
  MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  expect_same(collect(), eager2, "replay on the second input");
  MOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(
    Backends, SoftMoeLayerGraph,
    ::testing::Values(SoftCase{"lm_g64_b16_e16_s1", 64, 16, 64, 32, 16, 1},
                      SoftCase{.name = "lm_g64_b16_e16_s1_grouped", .G = 64, .B = 16, .H = 64,
                               .I = 32, .E = 16, .S = 1, .backend = ExpertsBackend::grouped}),
    [](const auto& info) { return info.param.name; });

// The language model's (B, S, H) rows to the layer's (S, B, H) groups and back, exactly.
TEST(SoftMoeLayer, TransposeRowBlocksSwapsBatchAndPositionOrders) {
  MOE_REQUIRE_GPU();
  struct Shape { int64_t P, Q, H; };
  for (const Shape sh : {Shape{3, 5, 40}, Shape{4, 7, 13}, Shape{1, 6, 8}, Shape{5, 1, 16}}) {
    const int64_t P = sh.P, Q = sh.Q, H = sh.H;
    const std::vector<float> host = round_to<bf16>(random_vector<float>(P * Q * H, 21 + H));
    DeviceArray<bf16> in(to_device_type<bf16>(host)), out(P * Q * H), back(P * Q * H);
    out.poison();
    back.poison();
    cuda::transpose_row_blocks(in.get(), out.get(), P, Q, H, nullptr);
    cuda::transpose_row_blocks(out.get(), back.get(), Q, P, H, nullptr);
    const std::vector<float> got = download_float(out), again = download_float(back);
    std::vector<float> want(P * Q * H);
    for (int64_t p = 0; p < P; ++p)
      for (int64_t q = 0; q < Q; ++q)
        std::copy_n(host.data() + (p * Q + q) * H, H, want.data() + (q * P + p) * H);
    EXPECT_TRUE(same_bytes(got, want)) << "P=" << P << " Q=" << Q << " H=" << H;
    EXPECT_TRUE(same_bytes(again, host)) << "P=" << P << " Q=" << Q << " H=" << H;
  }
}

// Refused at construction, before anything touches the device (runs without a GPU).
TEST(SoftMoeLayer, RefusesOtherRoutersEmptyGroupsAndHostSyncingBackends) {
  LayerConfig cfg = config_of(SoftCase{"refused", 2, 4, 32, 16, 2, 1});
  EXPECT_THROW(cuda::SoftMoeLayer(cfg, 0), ConfigError);
  EXPECT_THROW(cuda::SoftMoeLayer(cfg, 65536), ConfigError);
  EXPECT_THROW(cuda::SoftMoeLayer(cfg, 2, ExpertsBackend::cublas_loop_host_offsets), ConfigError);
  LayerConfig topk = cfg;
  topk.router = Router::softmax_topk;
  EXPECT_THROW(cuda::SoftMoeLayer(topk, 2), ConfigError);
  LayerConfig empty = cfg;
  empty.tokens = 0;
  EXPECT_THROW(cuda::SoftMoeLayer(empty, 2), ConfigError);
  LayerConfig shared = cfg;
  shared.shared_experts = 1;
  EXPECT_THROW(cuda::SoftMoeLayer(shared, 2), ConfigError);
}

}  // namespace
}  // namespace moe::test
