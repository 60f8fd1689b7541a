// cuda::Layer (the whole MoE layer in bf16: gate, route, plan, permute, experts, combine and the
// backward of each) vs moe::layer_forward / moe::layer_backward in double on the same
// bf16-rounded inputs (x, dy, w_gate, w_noise, w_up, w_down). Small shapes, uniform and skewed
// routing (a common direction in x that the gate weights of expert 0 align with), several layouts
// and routers: noisy_topk and switch_top1 with jitter in training draw the CPU's counter-based
// noise from the seed given by set_seed; E = 1, K = 1 is the trainer's dense baseline.
// Besides y and the gradients: the aux loss (relative 1e-4: fp32 scores against double), the
// load statistics (counts and drop rate exact, entropies relative 1e-5), the expert-bias update
// (bit for bit against the CPU's float instantiation) and the seed's effect on the routing.
//
// Tolerance: relative Frobenius error ||gpu - ref|| / ||ref|| < 2e-2 for y, dx, dW_gate, dW_up,
// dW_down. The GPU stores xp, pre, act, yp, dyp, da, dpre, dxp and dx in bf16 (unit roundoff
// 2^-9) and accumulates in fp32; dx collects two bf16 roundings more than the experts stage's
// dxp (the permute sum, then the gate's dz W^T added), and the router gradient sees dz rounded
// to bf16 before the gate GEMMs. The experts stage alone lands near 0.5 %; a wrong row, a wrong
// expert, a missing aux-loss gradient or an unwritten element gives O(1) errors (or NaN: outputs
// are poisoned first).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cpu/stages.hpp"
#include "cuda_test_util.hpp"
#include "moe/config.hpp"
#include "moe/cuda/chain.hpp"
#include "moe/cuda/gate.hpp"
#include "moe/cuda/layer.hpp"
#include "moe/layer.hpp"

namespace moe::test {
namespace {

using cuda::bf16;
constexpr double kTolerance = 2e-2;

struct LayerCase {
  std::string name;
  int64_t T, H, I, E, K;
  bool skewed = false;
  Router router = Router::softmax_topk;
  Layout layout = Layout::dropless;
  bool training = true;
  uint64_t seed = 0;             // given to the Layer by set_seed, to the CPU by cfg.seed
  double capacity_factor = 1.25;
  SecondPolicy second_policy = SecondPolicy::all;
  double aux_coef = -1, z_coef = -1;
  int64_t iterations = 2;       // chain_of_experts
  int64_t sequence_length = 0;  // balance groups (chain_of_experts, sigmoid_bias)
  int64_t groups = 1;           // expert choice's position groups (token t in group t % groups)
};

LayerConfig config_of(const LayerCase& c) {
  LayerConfig cfg;
  cfg.tokens = c.T;
  cfg.hidden = c.H;
  cfg.inter = c.I;
  cfg.experts = c.E;
  cfg.top_k = c.K;
  cfg.router = c.router;
  cfg.layout = c.layout;
  cfg.block_size = 16;
  cfg.activation = Activation::swiglu;
  cfg.training = c.training;
  cfg.seed = c.seed;
  cfg.capacity_factor = c.capacity_factor;
  cfg.second_policy = c.second_policy;
  cfg.aux_coef = c.aux_coef;
  cfg.z_coef = c.z_coef;
  cfg.iterations = c.iterations;
  cfg.sequence_length = c.sequence_length;
  cfg.validate();
  return cfg;
}

std::vector<double> rounded(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = __bfloat162float(__float2bfloat16(static_cast<float>(v[i])));
  return out;
}
std::vector<bf16> to_bf16(const std::vector<double>& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16(static_cast<float>(v[i]));
  return out;
}
// Smallest gap, over tokens, between the K-th and the (K+1)-th selection score of the CPU step
// (logits, noisy logits, or sigmoid + bias): a GPU logit off by more than this may pick another
// expert, and the comparison then fails for a reason other than a wrong kernel.
double selection_margin(const LayerConfig& cfg, const RouteStep<double>& s,
                        const std::vector<double>& bias) {
  const int64_t T = cfg.tokens, E = cfg.experts, K = cfg.top_k;
  if (K >= E) return INFINITY;
  double margin = INFINITY;
  std::vector<double> v(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      if (cfg.router == Router::noisy_topk) v[e] = s.noisy[i];
      else if (cfg.router == Router::sigmoid_bias)
        v[e] = s.probs[i] + (bias.empty() ? 0 : bias[e]);
      else v[e] = s.logits[i];
    }
    std::sort(v.begin(), v.end(), std::greater<double>());
    margin = std::min(margin, v[size_t(K - 1)] - v[size_t(K)]);
  }
  return margin;
}

template <class T>
double rel_frobenius(const std::vector<T>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    double g;
    if constexpr (std::is_same_v<T, bf16>) g = __bfloat162float(got[i]);
    else g = got[i];
    num += (g - want[i]) * (g - want[i]);
    den += want[i] * want[i];
  }
  return std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-300)) : INFINITY;
}

class LayerParity : public ::testing::TestWithParam<LayerCase> {};

// Inputs of one case: parameters and x, dy rounded to bf16 (both sides compute on the same values).
struct LayerInputs {
  Params<double> p;
  std::vector<double> x, dy;
};

LayerInputs make_inputs(const LayerCase& c, const LayerConfig& cfg) {
  LayerInputs in;
  Params<double>& p = in.p;
  p = random_params<double>(cfg, 11);
  for (double& v : p.expert_bias) v = 0;
  in.x = random_vector<double>(size_t(c.T * c.H), 21);
  in.dy = random_vector<double>(size_t(c.T * c.H), 31);
  if (c.skewed) {  // a common direction u in x; expert 0's gate column aligned with it
    const std::vector<double> u = random_vector<double>(size_t(c.H), 41);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h) in.x[t * c.H + h] += 1.5 * u[h];
    double norm = 0;
    for (double v : u) norm += v * v;
    for (int64_t h = 0; h < c.H; ++h) p.w_gate[h * c.E + 0] += 2.0 * u[h] / norm;
  }
  in.x = rounded(in.x);
  in.dy = rounded(in.dy);
  p.w_gate = rounded(p.w_gate);
  p.w_noise = rounded(p.w_noise);
  p.w_up = rounded(p.w_up);
  p.w_down = rounded(p.w_down);
  return in;
}

// The Layer's inputs and outputs on the device for one case.
struct DeviceLayerData {
  DeviceArray<bf16> x, dy, w_gate, w_noise, w_up, w_down, y, dx;
  DeviceArray<float> bias, dw_gate, dw_noise, dw_up, dw_down;

  DeviceLayerData(const LayerInputs& in, int64_t E)
      : x(to_bf16(in.x)), dy(to_bf16(in.dy)), w_gate(to_bf16(in.p.w_gate)),
        w_noise(to_bf16(in.p.w_noise)), w_up(to_bf16(in.p.w_up)), w_down(to_bf16(in.p.w_down)),
        y(in.x.size()), dx(in.x.size()), bias(std::vector<float>(size_t(E), 0.f)),
        dw_gate(in.p.w_gate.size()), dw_noise(in.p.w_noise.size()), dw_up(in.p.w_up.size()),
        dw_down(in.p.w_down.size()) {
    y.poison();
    dx.poison();
    for (DeviceArray<float>* g : {&dw_gate, &dw_noise, &dw_up, &dw_down}) g->poison(0);
  }
  cuda::LayerWeights weights(Router router) const {
    cuda::LayerWeights w;
    w.w_gate = w_gate.get();
    w.w_up = w_up.get();
    w.w_down = w_down.get();
    w.expert_bias = router == Router::sigmoid_bias ? bias.get() : nullptr;
    w.w_noise = w_noise.get();  // null unless noisy_topk
    return w;
  }
  cuda::LayerGrads grads() const {
    return {dx.get(), dw_gate.get(), dw_up.get(), dw_down.get(), dw_noise.get()};
  }
  // w_up's (gate, up) columns from the split order into `layout` (the fused backend's), for E
  // experts of H rows and I units.
  void reorder_w_up(cuda::GateUpLayout layout, int64_t E, int64_t H, int64_t I) {
    DeviceArray<bf16> pairs(w_up.size());
    cuda::to_gate_up_layout(w_up.get(), pairs.get(), layout, E * H, I, nullptr);
    w_up = std::move(pairs);
  }
};

// What a parity test reads back besides d's arrays after one forward + backward of the layer on
// a stream of its own.
struct LayerRun {
  LoadStats stats;
  Routing<float> routing;
  double aux = 0;
};

LayerRun run_once(cuda::Layer& layer, DeviceLayerData& d, Router router) {
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const cuda::LayerWeights w = d.weights(router);
  layer.forward(d.x.get(), w, d.y.get(), stream);
  layer.backward(d.x.get(), w, d.dy.get(), d.grads(), stream);
  LayerRun run;
  run.stats = layer.stats();
  run.routing = cuda::download_routing(layer.routing(), stream);
  MOE_CUDA_CHECK(cudaMemcpyAsync(&run.aux, layer.aux_loss(), sizeof run.aux,
                                 cudaMemcpyDeviceToHost, stream));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
  return run;
}

TEST_P(LayerParity, ForwardAndBackwardMatchCpu) {
  MOE_REQUIRE_GPU();
  const LayerCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  const Params<double>& p = in.p;

  LayerForward<double> fwd;
  layer_forward(cfg, p, in.x.data(), fwd);
  std::vector<double> dx_ref(in.x.size());
  Params<double> g_ref;
  layer_backward(cfg, p, in.x.data(), fwd, in.dy.data(), dx_ref.data(), g_ref);
  const double margin = selection_margin(cfg, fwd.steps[0], p.expert_bias);

  // built with another seed: set_seed must be what the forward uses
  LayerConfig built = cfg;
  built.seed = c.seed + 1000;
  cuda::Layer layer(built);
  layer.set_seed(c.seed);
  DeviceLayerData d(in, c.E);
  const LayerRun run = run_once(layer, d, c.router);
  const LoadStats& st = run.stats;
  const Routing<float>& routing = run.routing;
  const double aux = run.aux;

  const double e_y = rel_frobenius(d.y.download(), fwd.y);
  const double e_dx = rel_frobenius(d.dx.download(), dx_ref);

  // Training with x's rows gathered (no permute pass and no xp: the up-projection's loader and
  // dw_up's fetch x[row_token] themselves): every output the permuted layer's, bit for bit.
  auto expect_same_outputs = [](const DeviceLayerData& a, const DeviceLayerData& b,
                                const char* what) {
    EXPECT_TRUE(same_bytes(a.y.download(), b.y.download())) << what << ": y";
    EXPECT_TRUE(same_bytes(a.dx.download(), b.dx.download())) << what << ": dx";
    EXPECT_TRUE(same_bytes(a.dw_gate.download(), b.dw_gate.download())) << what << ": dW_gate";
    EXPECT_TRUE(same_bytes(a.dw_noise.download(), b.dw_noise.download())) << what << ": dW_noise";
    EXPECT_TRUE(same_bytes(a.dw_up.download(), b.dw_up.download())) << what << ": dW_up";
    EXPECT_TRUE(same_bytes(a.dw_down.download(), b.dw_down.download())) << what << ": dW_down";
  };
  {
    cuda::Layer gathered(built, cuda::ExpertsBackend::grouped, cuda::GateUpLayout::split,
                         /*backward=*/true, /*groups=*/1, /*cublas=*/nullptr,
                         cuda::RowSource::gathered);
    ASSERT_EQ(gathered.rows(), cuda::RowSource::gathered);
    gathered.set_seed(c.seed);
    DeviceLayerData g(in, c.E);
    run_once(gathered, g, c.router);
    expect_same_outputs(g, d, "gathered training");
  }

  // Inference (no backward): the up-projection gathers x's rows by row_token itself (no permute,
  // no xp), and y must be the training layer's y bit for bit -- padding rows, drops and skipped
  // choices included.
  {
    cuda::Layer infer(built, cuda::ExpertsBackend::grouped, cuda::GateUpLayout::split,
                      /*backward=*/false, /*groups=*/1, /*cublas=*/nullptr,
                      cuda::RowSource::gathered);
    infer.set_seed(c.seed);
    DeviceArray<bf16> y_infer(in.x.size());
    y_infer.poison();
    infer.forward(d.x.get(), d.weights(c.router), y_infer.get(), nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(same_bytes(y_infer.download(), d.y.download()))
        << "the gathered inference forward differs from the training forward";
  }
  // Inference with the activation in the up-projection's epilogue and w_up's pairs in the blocked
  // order: each pre value is the same dot product in the same K order, only in another column,
  // and act keeps the natural order, so y is again the training layer's bit for bit.
  // With its rows gathered as well (no permute, no xp): the same bits again.
  if (c.I % 32 == 0) {
    DeviceArray<bf16> w_up_blocked(in.p.w_up.size());
    cuda::to_gate_up_layout(d.w_up.get(), w_up_blocked.get(), cuda::GateUpLayout::blocked,
                            c.E * c.H, c.I, nullptr);
    cuda::LayerWeights w = d.weights(c.router);
    w.w_up = w_up_blocked.get();
    for (cuda::RowSource rows : {cuda::RowSource::permuted, cuda::RowSource::gathered}) {
      cuda::Layer infer(built, cuda::ExpertsBackend::grouped_fused, cuda::GateUpLayout::blocked,
                        /*backward=*/false, /*groups=*/1, /*cublas=*/nullptr, rows);
      infer.set_seed(c.seed);
      DeviceArray<bf16> y_infer(in.x.size());
      y_infer.poison();
      infer.forward(d.x.get(), w, y_infer.get(), nullptr);
      MOE_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_bytes(y_infer.download(), d.y.download()))
          << "the fused, blocked inference forward ("
          << (rows == cuda::RowSource::gathered ? "gathered" : "permuted")
          << " rows) differs from the training forward";
    }
  }
  // Training with the fused up-projection and w_up's pairs blocked: the forward and every
  // reduction over rows are the default layer's sums in the same order (y, dW_up once put back
  // in the split order, dW_down: bit for bit); dxp = dpre w_up^T reduces over w_up's columns in
  // their stored order, and the router-weight gradient is <da, act> / weight from the da GEMM's
  // epilogue instead of <dy, yp>, so dx and the router's gradients are held to the reference.
  if (c.I % 32 == 0) {
    cuda::Layer fused(built, cuda::ExpertsBackend::grouped_fused, cuda::GateUpLayout::blocked);
    fused.set_seed(c.seed);
    DeviceLayerData f(in, c.E);
    f.reorder_w_up(cuda::GateUpLayout::blocked, c.E, c.H, c.I);
    run_once(fused, f, c.router);
    {  // and with x's rows gathered: the fused permuted layer's bits
      cuda::Layer fused_gathered(built, cuda::ExpertsBackend::grouped_fused,
                                 cuda::GateUpLayout::blocked, /*backward=*/true, /*groups=*/1,
                                 /*cublas=*/nullptr, cuda::RowSource::gathered);
      fused_gathered.set_seed(c.seed);
      DeviceLayerData fg(in, c.E);
      fg.w_up = DeviceArray<bf16>(in.p.w_up.size());
      MOE_CUDA_CHECK(cudaMemcpy(fg.w_up.get(), f.w_up.get(), in.p.w_up.size() * sizeof(bf16),
                                cudaMemcpyDeviceToDevice));
      run_once(fused_gathered, fg, c.router);
      expect_same_outputs(fg, f, "fused, blocked, gathered training");
    }
    DeviceArray<float> dw_up_split(in.p.w_up.size());
    cuda::from_gate_up_layout(f.dw_up.get(), cuda::GateUpLayout::blocked, dw_up_split.get(),
                              c.E * c.H, c.I, nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(same_bytes(f.y.download(), d.y.download())) << "fused, blocked: y";
    EXPECT_TRUE(same_bytes(dw_up_split.download(), d.dw_up.download())) << "fused, blocked: dW_up";
    EXPECT_TRUE(same_bytes(f.dw_down.download(), d.dw_down.download())) << "fused, blocked: dW_down";
    EXPECT_LT(rel_frobenius(f.dw_gate.download(), g_ref.w_gate), kTolerance)
        << "fused, blocked: dW_gate";
    EXPECT_LT(rel_frobenius(f.dw_noise.download(), g_ref.w_noise), kTolerance)
        << "fused, blocked: dW_noise";
    EXPECT_LT(rel_frobenius(f.dx.download(), dx_ref), kTolerance) << "fused, blocked: dx";
  }
  const double e_wg = rel_frobenius(d.dw_gate.download(), g_ref.w_gate);
  const double e_wn = rel_frobenius(d.dw_noise.download(), g_ref.w_noise);
  const double e_wu = rel_frobenius(d.dw_up.download(), g_ref.w_up);
  const double e_wd = rel_frobenius(d.dw_down.download(), g_ref.w_down);
  RecordProperty("errors", ::testing::PrintToString(std::vector<double>{e_y, e_dx, e_wg, e_wn,
                                                                        e_wu, e_wd}));
  std::printf("%s: rel. Frobenius y %.2e dx %.2e dW_gate %.2e dW_noise %.2e dW_up %.2e "
              "dW_down %.2e; aux %.6e (cpu %.6e); selection margin %.2e\n",
              c.name.c_str(), e_y, e_dx, e_wg, e_wn, e_wu, e_wd, aux, fwd.aux_loss, margin);
  const std::string why = "(smallest CPU selection margin " + std::to_string(margin) + ")";
  EXPECT_LT(e_y, kTolerance) << "y " << why;
  EXPECT_LT(e_dx, kTolerance) << "dx " << why;
  EXPECT_LT(e_wg, kTolerance) << "dW_gate " << why;
  EXPECT_LT(e_wn, kTolerance) << "dW_noise " << why;
  EXPECT_LT(e_wu, kTolerance) << "dW_up " << why;
  EXPECT_LT(e_wd, kTolerance) << "dW_down " << why;
  EXPECT_NEAR(aux, fwd.aux_loss, 1e-6 + 1e-4 * std::abs(fwd.aux_loss)) << "aux loss " << why;
  // the same experts as the CPU for the same seed (noise, jitter and policy draws included)
  EXPECT_TRUE(equal("choice_expert", routing.choice_expert, fwd.steps[0].routing.choice_expert))
      << why;

  // load statistics: counts (hence cv, MaxVio) and rates from integers, exactly; entropies from
  // fp32 scores against double ones
  const LoadStats& ref = fwd.stats;
  EXPECT_TRUE(equal("tokens_per_expert", st.tokens_per_expert, ref.tokens_per_expert)) << why;
  EXPECT_DOUBLE_EQ(st.drop_rate, ref.drop_rate);
  EXPECT_DOUBLE_EQ(st.tokens_without_expert, ref.tokens_without_expert);
  EXPECT_DOUBLE_EQ(st.cv, ref.cv);
  EXPECT_DOUBLE_EQ(st.max_violation, ref.max_violation);
  EXPECT_NEAR(st.router_entropy, ref.router_entropy, 1e-7 + 1e-5 * std::abs(ref.router_entropy));
  EXPECT_NEAR(st.mean_entropy, ref.mean_entropy, 1e-7 + 1e-5 * std::abs(ref.mean_entropy));
  std::printf("%s: stats drop_rate %.4f without %.4f cv %.4f entropy %.6f (cpu %.6f) mean "
              "entropy %.6f (cpu %.6f)\n", c.name.c_str(), st.drop_rate,
              st.tokens_without_expert, st.cv, st.router_entropy, ref.router_entropy,
              st.mean_entropy, ref.mean_entropy);
}

// The bf16 Layer's jitter: x (bf16) * jitter in fp32 equals the CPU's float product bit for bit
// (and the double reference to fp32 rounding); dx (bf16) += g (fp32) * jitter to one bf16 rounding.
TEST(LayerParityJitter, Bf16InputGivesTheCpuJitteredInputInFp32) {
  MOE_REQUIRE_GPU();
  const int64_t n = 5000;
  const uint64_t seed = 17;
  const double eps = 1e-2;
  const std::vector<double> x = rounded(random_vector<double>(size_t(n), 61));
  const std::vector<double> dx0 = rounded(random_vector<double>(size_t(n), 62));
  const std::vector<float> g = [&] {
    const std::vector<double> v = random_vector<double>(size_t(n), 63);
    return std::vector<float>(v.begin(), v.end());
  }();
  DeviceArray<bf16> d_x(to_bf16(x)), d_dx(to_bf16(dx0));
  DeviceArray<float> d_out(static_cast<size_t>(n)), d_g(g);
  d_out.poison();
  cuda::jitter_input<bf16, float>(d_x.get(), n, seed, eps, d_out.get(), nullptr);
  cuda::jitter_backward<float, bf16>(d_g.get(), n, seed, eps, d_dx.get(), nullptr);
  const std::vector<float> out = d_out.download();
  const std::vector<bf16> dx = d_dx.download();
  std::vector<float> want(static_cast<size_t>(n));
  std::vector<double> want_double(static_cast<size_t>(n)), want_dx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double u = counter_uniform(seed, RngStream::jitter, uint64_t(i));
    const float j = static_cast<float>(1 - eps + 2 * eps * u);
    want[i] = static_cast<float>(x[i]) * j;
    want_double[i] = x[i] * (1 - eps + 2 * eps * u);
    want_dx[i] = dx0[i] + double(g[i]) * j;
  }
  EXPECT_TRUE(same_bytes(out, want)) << "x * jitter";
  EXPECT_TRUE(close("x * jitter vs double", out, want_double, 0, 0x1p-22));  // two fp32 roundings
  std::vector<float> dxf(dx.size());
  for (size_t i = 0; i < dx.size(); ++i) dxf[i] = __bfloat162float(dx[i]);
  EXPECT_TRUE(close("dx + g * jitter", dxf, want_dx, 1e-6, 0x1p-8));
}

// noisy_topk in training: the seed set before forward decides the noise, so the same seed gives
// the same bits (routing, y, and the backward, which redraws its forward's noise even when
// set_seed was called in between) and another seed another routing.
TEST(LayerParitySeed, NoisyTopkSameSeedSameBitsOtherSeedOtherRouting) {
  MOE_REQUIRE_GPU();
  const LayerCase c{.name = "seed", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                    .router = Router::noisy_topk};
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  cuda::Layer layer(cfg);
  DeviceLayerData d(in, c.E);
  const cuda::LayerWeights w = d.weights(c.router);
  const size_t N = size_t(c.T * c.K);
  struct Run {
    std::vector<int32_t> expert;
    std::vector<float> weight;
    std::vector<bf16> y, dx;
    std::vector<float> dw_noise;
  };
  // forward with `seed`, then backward after set_seed(`later`)
  auto run = [&](uint64_t seed, uint64_t later) {
    Run r;
    for (DeviceArray<float>* g : {&d.dw_gate, &d.dw_noise, &d.dw_up, &d.dw_down}) g->poison(0);
    layer.set_seed(seed);
    layer.forward(d.x.get(), w, d.y.get(), nullptr);
    layer.set_seed(later);
    layer.backward(d.x.get(), w, d.dy.get(), d.grads(), nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    const cuda::RoutingView rv = layer.routing();
    EXPECT_EQ(size_t(rv.choices), N);
    r.expert.resize(N);
    r.weight.resize(N);
    MOE_CUDA_CHECK(cudaMemcpy(r.expert.data(), rv.choice_expert, N * 4, cudaMemcpyDeviceToHost));
    MOE_CUDA_CHECK(cudaMemcpy(r.weight.data(), rv.choice_weight, N * 4, cudaMemcpyDeviceToHost));
    r.y = d.y.download();
    r.dx = d.dx.download();
    r.dw_noise = d.dw_noise.download();
    return r;
  };
  const Run a = run(3, 3), b = run(3, 99), other = run(4, 4);
  EXPECT_TRUE(same_bytes(a.expert, b.expert)) << "choice_expert";
  EXPECT_TRUE(same_bytes(a.weight, b.weight)) << "choice_weight";
  EXPECT_TRUE(same_bytes(a.y, b.y)) << "y";
  EXPECT_TRUE(same_bytes(a.dx, b.dx)) << "dx (the backward must use its forward's seed)";
  EXPECT_TRUE(same_bytes(a.dw_noise, b.dw_noise)) << "dW_noise";
  int64_t moved = 0;
  for (size_t i = 0; i < N; ++i) moved += a.expert[i] != other.expert[i];
  // noise of scale softplus(x W_noise) ~ 0.7 against logits of scale 1: many choices move
  EXPECT_GT(moved, int64_t(N / 10)) << "seeds 3 and 4 route " << moved << " of " << N
                                    << " choices differently";
  std::printf("seed 3 vs 4: %lld of %zu choices on another expert\n", (long long)moved, N);
}

// The whole layer has no host synchronisation, so forward + backward can be captured in a CUDA
// graph once and replayed: each replay must give the eager run's bits, also after x changes (the
// routing, plan and segment sizes are recomputed on the device at every replay). Both the grouped
// and the fused backend (forward and backward fork work onto second streams; the capture follows).
class LayerGraph : public ::testing::TestWithParam<LayerCase> {};
void replay_matches_eager(const LayerCase& c, bool fused);

TEST_P(LayerGraph, ReplayOfForwardAndBackwardGivesTheEagerBits) {
  MOE_REQUIRE_GPU();
  const LayerCase& c = GetParam();
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "grouped_fused, w_up interleaved" : "grouped");
    replay_matches_eager(c, fused);
  }
}

void replay_matches_eager(const LayerCase& c, bool fused) {
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  cuda::Layer layer(cfg,
                    fused ? cuda::ExpertsBackend::grouped_fused : cuda::ExpertsBackend::grouped,
                    fused ? cuda::GateUpLayout::interleaved : cuda::GateUpLayout::split, true,
                    c.groups);
  layer.set_seed(c.seed);
  DeviceLayerData d(in, c.E);
  if (fused) d.reorder_w_up(cuda::GateUpLayout::interleaved, c.E, c.H, c.I);
  const cuda::LayerWeights w = d.weights(c.router);
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct Out {
    std::vector<bf16> y, dx;
    std::vector<float> dw_gate, dw_up, dw_down;
  };
  auto zero_grads = [&] {
    for (DeviceArray<float>* g : {&d.dw_gate, &d.dw_noise, &d.dw_up, &d.dw_down})
      MOE_CUDA_CHECK(cudaMemsetAsync(g->get(), 0, g->size() * sizeof(float), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(d.y.get(), 0xff, d.y.size() * sizeof(bf16), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(d.dx.get(), 0xff, d.dx.size() * sizeof(bf16), stream));
  };
  auto step = [&] {
    layer.forward(d.x.get(), w, d.y.get(), stream);
    layer.backward(d.x.get(), w, d.dy.get(), d.grads(), stream);
  };
  auto collect = [&] {
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return Out{d.y.download(), d.dx.download(), d.dw_gate.download(), d.dw_up.download(),
               d.dw_down.download()};
  };
  auto expect_same = [](const Out& a, const Out& b, const char* what) {
    EXPECT_TRUE(same_bytes(a.y, b.y)) << what << ": y";
    EXPECT_TRUE(same_bytes(a.dx, b.dx)) << what << ": dx";
    EXPECT_TRUE(same_bytes(a.dw_gate, b.dw_gate)) << what << ": dW_gate";
    EXPECT_TRUE(same_bytes(a.dw_up, b.dw_up)) << what << ": dW_up";
    EXPECT_TRUE(same_bytes(a.dw_down, b.dw_down)) << what << ": dW_down";
  };

  // eager on x, then on a second input x2 (reversed token order: other routing, same values)
  zero_grads();
  step();
  const Out eager = collect();
  std::vector<double> x2(in.x.size());
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t h = 0; h < c.H; ++h) x2[t * c.H + h] = in.x[(c.T - 1 - t) * c.H + h];
  const std::vector<bf16> x1_bf16 = d.x.download(), x2_bf16 = to_bf16(x2);
  d.x.upload(x2_bf16);
  zero_grads();
  step();
  const Out eager2 = collect();

  // capture once; the graph reads whatever x holds when it is replayed
  d.x.upload(x1_bf16);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  step();
  MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    zero_grads();
    MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    expect_same(collect(), eager, "replay on x");
  }
  d.x.upload(x2_bf16);
  zero_grads();
  MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  expect_same(collect(), eager2, "replay on the second input");
  MOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LayerGraph,
    ::testing::Values(
        LayerCase{.name = "softmax_dropless", .T = 384, .H = 64, .I = 48, .E = 8, .K = 2,
                  .skewed = true},
        LayerCase{.name = "softmax_padded_drops", .T = 384, .H = 64, .I = 48, .E = 8, .K = 2,
                  .skewed = true, .layout = Layout::padded, .capacity_factor = 1.0},
        LayerCase{.name = "noisy_topk", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                  .router = Router::noisy_topk, .seed = 7},
        LayerCase{.name = "sigmoid_bias_block", .T = 300, .H = 64, .I = 32, .E = 6, .K = 2,
                  .router = Router::sigmoid_bias, .layout = Layout::block},
        // expert choice in 24 position groups of 16 tokens (the reversed input regroups them)
        LayerCase{.name = "expert_choice_groups", .T = 384, .H = 64, .I = 32, .E = 8, .K = 1,
                  .router = Router::expert_choice, .groups = 24}),
    [](const auto& info) { return info.param.name; });

// sigmoid_bias: the device update equals moe::update_expert_bias (float) for the counts of the
// same forward; in evaluation it does nothing, on both sides.
TEST(LayerParityExpertBias, UpdateMatchesCpuAndIsANoOpInEvaluation) {
  MOE_REQUIRE_GPU();
  for (const bool training : {true, false}) {
    const LayerCase c{.name = "bias", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2, .skewed = true,
                      .router = Router::sigmoid_bias, .training = training};
    LayerConfig cfg = config_of(c);
    cfg.bias_update_rate = 1e-3;
    LayerInputs in = make_inputs(c, cfg);
    const std::vector<double> b0 = random_vector<double>(size_t(c.E), 51, 0.05);
    std::vector<float> bias_f(b0.begin(), b0.end());
    // the CPU side in float, from the same (bf16-rounded) values
    Params<float> pf;
    pf.w_gate.assign(in.p.w_gate.begin(), in.p.w_gate.end());
    pf.w_up.assign(in.p.w_up.begin(), in.p.w_up.end());
    pf.w_down.assign(in.p.w_down.begin(), in.p.w_down.end());
    pf.expert_bias = bias_f;
    const std::vector<float> xf(in.x.begin(), in.x.end());
    LayerForward<float> fwd;
    layer_forward(cfg, pf, xf.data(), fwd);
    update_expert_bias(cfg, fwd, pf);

    cuda::Layer layer(cfg, cuda::ExpertsBackend::grouped, cuda::GateUpLayout::split,
                      /*backward=*/false);
    DeviceLayerData d(in, c.E);
    d.bias.upload(bias_f);
    cudaStream_t stream = nullptr;
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    layer.forward(d.x.get(), d.weights(c.router), d.y.get(), stream);
    layer.update_expert_bias(d.bias.get(), stream);
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const LoadStats st = layer.stats();
    MOE_CUDA_CHECK(cudaStreamDestroy(stream));
    EXPECT_TRUE(equal("tokens_per_expert", st.tokens_per_expert, fwd.stats.tokens_per_expert))
        << (training ? "training" : "evaluation");
    const std::vector<float> got = d.bias.download();
    EXPECT_TRUE(same_bytes(got, pf.expert_bias)) << (training ? "training" : "evaluation");
    if (!training) {
      EXPECT_TRUE(same_bytes(got, bias_f)) << "evaluation must leave the bias";
    }
    int64_t changed = 0;
    for (int64_t e = 0; e < c.E; ++e) changed += got[e] != bias_f[e];
    if (training) {
      EXPECT_GT(changed, 0) << "skewed routing moves some expert's bias";
    }
  }
}

// Events at the forward's and backward's stage and step boundaries (benchmarks): every interval
// is measured (finite, >= 0) and recording them changes no bit of the outputs. With events every
// stage runs in order on one stream; without, the router's auxiliary losses run on the layer's
// second stream and (grouped_fused) dw_down beside the da GEMM on the experts' second stream.
TEST(LayerBackwardEvents, StageTimesAreRecordedAndChangeNothing) {
  MOE_REQUIRE_GPU();
  const LayerCase c{"t256_e8_k2_events", 256, 64, 32, 8, 2, true};
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  const int nf = int(cuda::LayerStage::count), nb = int(cuda::LayerBackwardStage::count),
            nx = int(cuda::ExpertsBackwardStep::count);
  std::vector<cudaEvent_t> fev(nf + 1), bev(nb + 1), xev(nx + 1);
  for (auto* v : {&fev, &bev, &xev})
    for (auto& e : *v) MOE_CUDA_CHECK(cudaEventCreate(&e));
  auto check = [](const std::vector<cudaEvent_t>& ev, const char* what) {
    for (size_t i = 0; i + 1 < ev.size(); ++i) {
      float ms = -1;
      ASSERT_EQ(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]), cudaSuccess) << what << " " << i;
      EXPECT_TRUE(std::isfinite(ms) && ms >= 0) << what << " " << i << ": " << ms;
    }
  };
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "grouped_fused, w_up blocked" : "grouped");
    cuda::Layer layer(cfg,
                      fused ? cuda::ExpertsBackend::grouped_fused : cuda::ExpertsBackend::grouped,
                      fused ? cuda::GateUpLayout::blocked : cuda::GateUpLayout::split);
    DeviceLayerData plain(in, c.E), timed(in, c.E);
    if (fused)
      for (DeviceLayerData* d : {&plain, &timed})
        d->reorder_w_up(cuda::GateUpLayout::blocked, c.E, c.H, c.I);
    const cuda::LayerWeights wp = plain.weights(c.router), wt = timed.weights(c.router);
    double aux_plain = 0, aux_timed = 0;
    layer.forward(plain.x.get(), wp, plain.y.get(), nullptr);
    MOE_CUDA_CHECK(cudaMemcpy(&aux_plain, layer.aux_loss(), sizeof(double), cudaMemcpyDefault));
    layer.backward(plain.x.get(), wp, plain.dy.get(), plain.grads(), nullptr);
    layer.forward(timed.x.get(), wt, timed.y.get(), nullptr, fev.data());
    MOE_CUDA_CHECK(cudaMemcpy(&aux_timed, layer.aux_loss(), sizeof(double), cudaMemcpyDefault));
    layer.backward(timed.x.get(), wt, timed.dy.get(), timed.grads(), nullptr, bev.data(),
                   xev.data());
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    check(fev, "forward stage");
    check(bev, "backward stage");
    check(xev, "experts step");
    EXPECT_EQ(std::memcmp(&aux_plain, &aux_timed, sizeof(double)), 0) << "aux loss";
    EXPECT_TRUE(same_bytes(plain.y.download(), timed.y.download()));
    EXPECT_TRUE(same_bytes(plain.dx.download(), timed.dx.download()));
    EXPECT_TRUE(same_bytes(plain.dw_up.download(), timed.dw_up.download()));
    EXPECT_TRUE(same_bytes(plain.dw_down.download(), timed.dw_down.download()));
    EXPECT_TRUE(same_bytes(plain.dw_gate.download(), timed.dw_gate.download()));
  }
  for (auto* v : {&fev, &bev, &xev})
    for (auto& e : *v) MOE_CUDA_CHECK(cudaEventDestroy(e));

  // The host-offset baselines run their steps in another order: no step events there.
  DeviceLayerData d(in, c.E);
  const cuda::LayerWeights w = d.weights(c.router);
  std::vector<cudaEvent_t> steps(nx + 1);
  for (auto& e : steps) MOE_CUDA_CHECK(cudaEventCreate(&e));
  cuda::Layer loop(cfg, cuda::ExpertsBackend::cublas_loop_host_offsets);
  loop.forward(d.x.get(), w, d.y.get(), nullptr);
  EXPECT_THROW(loop.backward(d.x.get(), w, d.dy.get(), d.grads(), nullptr, nullptr, steps.data()),
               ConfigError);
  for (auto& e : steps) MOE_CUDA_CHECK(cudaEventDestroy(e));
}

// bf16 expert weight gradients (PyTorch's for bf16 parameters): each element is the fresh fp32
// gradient rounded once, and every other gradient is unchanged bit for bit.
TEST(LayerBf16ExpertGradients, AreTheFreshFp32GradientsRoundedOnce) {
  MOE_REQUIRE_GPU();
  const LayerCase c{"t256_e8_k2_bf16_dw", 256, 64, 32, 8, 2, true};
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  cuda::Layer layer(cfg);
  DeviceLayerData f32(in, c.E), f16(in, c.E);
  const cuda::LayerWeights w = f32.weights(c.router);
  cuda::LayerGrads g32 = f32.grads();
  g32.accumulate_experts = false;
  f32.dw_up.poison();
  f32.dw_down.poison();
  layer.forward(f32.x.get(), w, f32.y.get(), nullptr);
  layer.backward(f32.x.get(), w, f32.dy.get(), g32, nullptr);

  DeviceArray<bf16> up16(in.p.w_up.size()), down16(in.p.w_down.size());
  up16.poison();
  down16.poison();
  cuda::LayerGrads g16 = f16.grads();
  g16.accumulate_experts = false;
  g16.dw_up = g16.dw_down = nullptr;
  g16.dw_up_bf16 = up16.get();
  g16.dw_down_bf16 = down16.get();
  layer.forward(f16.x.get(), w, f16.y.get(), nullptr);
  layer.backward(f16.x.get(), w, f16.dy.get(), g16, nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  EXPECT_EQ(not_rounded_once(f32.dw_up.download(), from_device_type(up16.download())), 0);
  EXPECT_EQ(not_rounded_once(f32.dw_down.download(), from_device_type(down16.download())), 0);
  EXPECT_TRUE(same_bytes(f32.dx.download(), f16.dx.download()));
  EXPECT_TRUE(same_bytes(f32.dw_gate.download(), f16.dw_gate.download()));

  // Accumulating into bf16 is refused.
  g16.accumulate_experts = true;
  layer.forward(f16.x.get(), w, f16.y.get(), nullptr);
  EXPECT_THROW(layer.backward(f16.x.get(), w, f16.dy.get(), g16, nullptr), ConfigError);
}

// A layer of `moe-bench bench --layer`'s kind: softmax_topk, dropless, SwiGLU.
LayerConfig bench_config(int64_t T, int64_t H, int64_t I, int64_t E, int64_t K) {
  LayerConfig cfg;
  cfg.tokens = T;
  cfg.hidden = H;
  cfg.inter = I;
  cfg.experts = E;
  cfg.top_k = K;
  cfg.router = Router::softmax_topk;
  cfg.layout = Layout::dropless;
  cfg.activation = Activation::swiglu;
  cfg.validate();
  return cfg;
}

// RowSource::automatic (no GPU): gathered exactly where the alternating rounds measured it faster
// (grouped_fused inference: with SwiGLU only where segments average under one 128-row tile, with
// GELU where the up-projection has at most 32 column tiles), permuted elsewhere; and the arena
// follows the resolved choice.
TEST(LayerRows, AutomaticGathersOnlyWhereItMeasuredFaster) {
  struct Shape { const char* name; int64_t T, H, I, E, K; Activation act; bool gathers; };
  const Activation swiglu = Activation::swiglu, gelu = Activation::gelu;
  for (const Shape& s : {Shape{"olmoe", 16384, 2048, 1024, 64, 8, swiglu, false},
                         Shape{"qwen3", 16384, 2048, 768, 128, 8, swiglu, false},
                         Shape{"qwen3_32k", 32768, 2048, 768, 128, 8, swiglu, false},
                         Shape{"brief_small", 8192, 1024, 4096, 16, 2, swiglu, false},
                         Shape{"mixtral", 8192, 4096, 14336, 8, 2, swiglu, false},
                         Shape{"decode", 64, 2048, 768, 128, 8, swiglu, true},
                         Shape{"15 rows per expert", 240, 2048, 768, 128, 8, swiglu, true},
                         Shape{"olmoe gelu", 16384, 2048, 1024, 64, 8, gelu, true},
                         Shape{"gelu, 33 column tiles", 1024, 512, 8448, 8, 2, gelu, false}}) {
    LayerConfig cfg = bench_config(s.T, s.H, s.I, s.E, s.K);
    cfg.activation = s.act;
    cfg.validate();
    const auto automatic = cuda::RowSource::automatic;
    const auto fused = cuda::ExpertsBackend::grouped_fused;
    EXPECT_EQ(cuda::resolve_rows(cfg, fused, false, automatic),
              s.gathers ? cuda::RowSource::gathered : cuda::RowSource::permuted)
        << s.name;
    // not for training (gathered measured 1.3-1.5 % slower there), nor on a backend the rounds
    // did not measure
    EXPECT_EQ(cuda::resolve_rows(cfg, fused, true, automatic), cuda::RowSource::permuted) << s.name;
    EXPECT_EQ(cuda::resolve_rows(cfg, cuda::ExpertsBackend::grouped, false, automatic),
              cuda::RowSource::permuted)
        << s.name;
    // explicit choices pass through
    EXPECT_EQ(cuda::resolve_rows(cfg, fused, false, cuda::RowSource::permuted),
              cuda::RowSource::permuted);
    EXPECT_EQ(cuda::resolve_rows(cfg, fused, false, cuda::RowSource::gathered),
              cuda::RowSource::gathered);
    EXPECT_EQ(cuda::Layer::arena_bytes(cfg, fused, false, 1, automatic),
              cuda::Layer::arena_bytes(cfg, fused, false, 1,
                                       s.gathers ? cuda::RowSource::gathered
                                                 : cuda::RowSource::permuted))
        << s.name;
  }
}

// The (max_rows, *) activation bytes from the shapes alone (no GPU): the grouped backend aliases
// dyp, da, dpre and dxp onto yp, act and pre (layer.hpp); a host-offset baseline keeps dyp, da and
// dpre apart, as every backend did before. Printed for the bench shapes (bench --layer).
TEST(LayerMemory, ArenaBytesAtBenchShapes) {
  struct Shape { const char* name; int64_t T, H, I, E, K; };
  for (const Shape& s : {Shape{"olmoe", 16384, 2048, 1024, 64, 8},
                         Shape{"qwen3", 16384, 2048, 768, 128, 8},
                         Shape{"mixtral", 8192, 4096, 14336, 8, 2},
                         Shape{"brief_small", 8192, 1024, 4096, 16, 2}}) {
    const LayerConfig cfg = bench_config(s.T, s.H, s.I, s.E, s.K);
    const size_t separate = cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::cublas_loop_host_offsets);
    const size_t aliased = cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::grouped);
    const size_t R = size_t(s.T * s.K);
    EXPECT_EQ(separate - aliased, R * size_t(s.H + s.I + 2 * s.I) * sizeof(bf16)) << s.name;
    // Inference: the grouped backend gathers x's rows in the up-projection, so it has no xp.
    const size_t infer_permuted = cuda::Layer::arena_bytes(
        cfg, cuda::ExpertsBackend::grouped, false, 1, cuda::RowSource::permuted);
    const size_t infer_gathered = cuda::Layer::arena_bytes(
        cfg, cuda::ExpertsBackend::grouped, false, 1, cuda::RowSource::gathered);
    EXPECT_EQ(infer_permuted - infer_gathered, R * size_t(s.H) * sizeof(bf16)) << s.name;
    // Inference with the activation in the up-projection's epilogue writes no pre at all.
    const size_t fused = cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::grouped_fused, false,
                                                  1, cuda::RowSource::permuted);
    const size_t fused_gathered = cuda::Layer::arena_bytes(
        cfg, cuda::ExpertsBackend::grouped_fused, false, 1, cuda::RowSource::gathered);
    EXPECT_EQ(infer_permuted - fused, R * size_t(2 * s.I) * sizeof(bf16)) << s.name;
    EXPECT_EQ(fused - fused_gathered, R * size_t(s.H) * sizeof(bf16)) << s.name;
    EXPECT_EQ(cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::grouped_fused),
              aliased + size_t(cuda::row_dot_parts(s.I)) * R * sizeof(float))
        << s.name << ": training keeps pre, and the da GEMM's row dots";
    // Training may gather too (dw_up gathers x's rows along its reduction): no xp either.
    EXPECT_EQ(aliased - cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::grouped, true, 1,
                                                 cuda::RowSource::gathered),
              R * size_t(s.H) * sizeof(bf16))
        << s.name;
    // Gathering needs a grouped backend.
    EXPECT_THROW(cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::cublas_loop_host_offsets,
                                          false, 1, cuda::RowSource::gathered),
                 ConfigError);
    std::printf("%s: activation arena + experts scratch %.3f GiB separate, %.3f GiB aliased "
                "(%.1f %%)\n", s.name, separate / double(1 << 30), aliased / double(1 << 30),
                100.0 * aliased / separate);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayerParity,
    ::testing::Values(
        LayerCase{"t256_e8_k2_uniform", 256, 64, 32, 8, 2},
        LayerCase{"t200_e16_k4_skewed", 200, 128, 64, 16, 4, true},
        LayerCase{"t333_e5_k1_skewed", 333, 64, 48, 5, 1, true},
        LayerCase{"t128_e64_k8_uniform", 128, 64, 32, 64, 8},
        LayerCase{"t256_e8_k2_sigmoid_bias", 256, 64, 32, 8, 2, false, Router::sigmoid_bias},
        LayerCase{"t256_e8_k2_block16_skewed", 256, 64, 32, 8, 2, true, Router::softmax_topk,
                  Layout::block},
        // capacity drops (first choices of the skewed expert) and policy skips: the statistics
        LayerCase{.name = "t256_e8_k2_padded_cf1_skewed", .T = 256, .H = 64, .I = 32, .E = 8,
                  .K = 2, .skewed = true, .layout = Layout::padded, .capacity_factor = 1.0},
        LayerCase{.name = "t256_e8_k2_random_second", .T = 256, .H = 64, .I = 32, .E = 8,
                  .K = 2, .seed = 6, .second_policy = SecondPolicy::random},
        // noisy_topk: training (noise of seed 5, smooth load loss) and evaluation (no noise)
        LayerCase{.name = "t256_e8_k2_noisy", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                  .router = Router::noisy_topk, .seed = 5},
        LayerCase{.name = "t200_e16_k4_noisy_skewed", .T = 200, .H = 128, .I = 64, .E = 16,
                  .K = 4, .skewed = true, .router = Router::noisy_topk, .seed = 8},
        LayerCase{.name = "t256_e8_k2_noisy_eval", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                  .router = Router::noisy_topk, .training = false},
        // switch_top1 with jitter 1e-2 in training, dropless and padded with drops
        LayerCase{.name = "t300_e8_k1_switch_jitter", .T = 300, .H = 64, .I = 48, .E = 8,
                  .K = 1, .router = Router::switch_top1, .seed = 7},
        LayerCase{.name = "t256_e8_k1_switch_jitter_padded_skewed", .T = 256, .H = 64, .I = 32,
                  .E = 8, .K = 1, .skewed = true, .router = Router::switch_top1,
                  .layout = Layout::padded, .seed = 9, .capacity_factor = 1.0},
        // the dense baseline: one expert, with the default losses and with none
        LayerCase{"t256_e1_k1_dense", 256, 64, 48, 1, 1},
        LayerCase{.name = "t256_e1_k1_dense_no_aux", .T = 256, .H = 64, .I = 48, .E = 1,
                  .K = 1, .aux_coef = 0, .z_coef = 0}),
    [](const auto& info) { return info.param.name; });

// ---- chain_of_experts: C token-choice Layer calls (cuda::ChainLayer) against the CPU. Iteration
// c > 0 runs on u_c rounded to bf16, a perturbation of 2^-9 relative that can move a near-tied
// selection, so the reference runs the CPU layer of chain_step_config on the GPU's own u_c (the
// decomposition ChainStepConfig.CpuLayersOfTheStepConfigReproduceTheCpuChain proves equal to the
// CPU chain): y = sum of the iterations, backward in reverse with the upstream dy + dL/du_{c+1},
// dx = dL/du_0. The recurrence itself is checked on its own: the GPU's u_{c+1} against u_c + y_c.
// Iteration 0 sees x itself, so its routing is also compared with the CPU chain's. The tolerance
// is the single layer's; the upstream is rounded to bf16 once per iteration.
class ChainLayerParity : public ::testing::TestWithParam<LayerCase> {};

TEST_P(ChainLayerParity, ForwardAndBackwardMatchCpu) {
  MOE_REQUIRE_GPU();
  const LayerCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  ASSERT_EQ(cfg.router, Router::chain_of_experts);
  const LayerInputs in = make_inputs(c, cfg);
  const Params<double>& p = in.p;
  const int64_t C = c.iterations, n = c.T * c.H, HE = c.H * c.E;
  ASSERT_EQ(p.w_gate.size(), size_t(C * HE));

  cuda::ChainLayer layer(cfg);
  ASSERT_EQ(layer.iterations(), C);
  layer.set_seed(c.seed);
  DeviceLayerData d(in, c.E);
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const cuda::LayerWeights w = d.weights(c.router);
  layer.forward(d.x.get(), w, d.y.get(), stream);
  // the iterations' inputs u_1 .. u_{C-1}, before the backward reuses anything
  std::vector<std::vector<double>> inputs(static_cast<size_t>(C));
  inputs[0] = in.x;
  for (int64_t k = 1; k < C; ++k) {
    std::vector<bf16> u(static_cast<size_t>(n));
    MOE_CUDA_CHECK(cudaMemcpyAsync(u.data(), layer.input(k), u.size() * sizeof(bf16),
                                   cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    inputs[k].resize(u.size());
    for (size_t i = 0; i < u.size(); ++i) inputs[k][i] = __bfloat162float(u[i]);
  }
  layer.backward(d.x.get(), w, d.dy.get(), d.grads(), stream);
  const LoadStats st = layer.stats();
  std::vector<Routing<float>> routings;
  for (int64_t k = 0; k < C; ++k)
    routings.push_back(cuda::download_routing(layer.step(k).routing(), stream));
  double aux = 0;
  MOE_CUDA_CHECK(cudaMemcpyAsync(&aux, layer.aux_loss(), sizeof aux, cudaMemcpyDeviceToHost,
                                 stream));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));

  // reference: the CPU layer of each iteration on the GPU's input of that iteration
  const LayerConfig step_cfg = cuda::chain_step_config(cfg);
  std::vector<Params<double>> ps(static_cast<size_t>(C), p);
  std::vector<LayerForward<double>> f(static_cast<size_t>(C));
  std::vector<double> y_ref(static_cast<size_t>(n), 0.0);
  double aux_ref = 0, margin = INFINITY;
  std::vector<LoadStats> step_stats;
  std::vector<int64_t> step_choices;
  for (int64_t k = 0; k < C; ++k) {
    ps[k].w_gate.assign(p.w_gate.begin() + k * HE, p.w_gate.begin() + (k + 1) * HE);
    layer_forward(step_cfg, ps[k], inputs[k].data(), f[k]);
    for (int64_t i = 0; i < n; ++i) y_ref[i] += f[k].y[i];
    aux_ref += f[k].aux_loss;
    step_stats.push_back(f[k].stats);
    step_choices.push_back(f[k].steps[0].plan.choices);
    margin = std::min(margin, selection_margin(step_cfg, f[k].steps[0], p.expert_bias));
    if (k + 1 < C) {  // the recurrence: u_{k+1} = u_k + y_k, then rounded to bf16
      std::vector<double> u_next(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) u_next[i] = inputs[k][i] + f[k].y[i];
      const double e_u = rel_frobenius(inputs[k + 1], u_next);
      EXPECT_LT(e_u, 1e-2) << "u_" << k + 1 << " = u_" << k << " + MoE_" << k << "(u_" << k << ")";
    }
  }
  const LoadStats ref = cuda::chain_stats(step_stats, step_choices);
  std::vector<double> a(static_cast<size_t>(n), 0.0), upstream(a.size()), d_in(a.size());
  Params<double> g_ref;
  g_ref.w_gate.assign(p.w_gate.size(), 0.0);
  g_ref.w_up.assign(p.w_up.size(), 0.0);
  g_ref.w_down.assign(p.w_down.size(), 0.0);
  for (int64_t k = C - 1; k >= 0; --k) {
    for (int64_t i = 0; i < n; ++i) upstream[i] = in.dy[i] + a[i];
    Params<double> gk;
    layer_backward(step_cfg, ps[k], inputs[k].data(), f[k], upstream.data(), d_in.data(), gk);
    for (int64_t i = 0; i < n; ++i) a[i] += d_in[i];
    std::copy(gk.w_gate.begin(), gk.w_gate.end(), g_ref.w_gate.begin() + k * HE);
    for (size_t i = 0; i < g_ref.w_up.size(); ++i) g_ref.w_up[i] += gk.w_up[i];
    for (size_t i = 0; i < g_ref.w_down.size(); ++i) g_ref.w_down[i] += gk.w_down[i];
  }
  // iteration 0 runs on x on both sides: the CPU chain's own routing
  LayerForward<double> chain;
  layer_forward(cfg, p, in.x.data(), chain);
  EXPECT_TRUE(equal("choice_expert", routings[0].choice_expert,
                    chain.steps[0].routing.choice_expert))
      << "iteration 0 against the CPU chain";

  const double e_y = rel_frobenius(d.y.download(), y_ref);
  const double e_dx = rel_frobenius(d.dx.download(), a);
  const double e_wg = rel_frobenius(d.dw_gate.download(), g_ref.w_gate);
  const double e_wu = rel_frobenius(d.dw_up.download(), g_ref.w_up);
  const double e_wd = rel_frobenius(d.dw_down.download(), g_ref.w_down);
  std::printf("%s: rel. Frobenius y %.2e dx %.2e dW_gate %.2e dW_up %.2e dW_down %.2e; aux %.6e "
              "(cpu %.6e, cpu chain on x %.6e); selection margin %.2e\n",
              c.name.c_str(), e_y, e_dx, e_wg, e_wu, e_wd, aux, aux_ref, chain.aux_loss, margin);
  const std::string why = "(smallest CPU selection margin " + std::to_string(margin) + ")";
  EXPECT_LT(e_y, kTolerance) << "y " << why;
  EXPECT_LT(e_dx, kTolerance) << "dx " << why;
  EXPECT_LT(e_wg, kTolerance) << "dW_gate (every iteration's slice) " << why;
  EXPECT_LT(e_wu, kTolerance) << "dW_up (summed over iterations) " << why;
  EXPECT_LT(e_wd, kTolerance) << "dW_down (summed over iterations) " << why;
  EXPECT_NEAR(aux, aux_ref, 1e-6 + 1e-4 * std::abs(aux_ref)) << "aux loss " << why;
  for (int64_t k = 0; k < C; ++k) {
    EXPECT_EQ(routings[k].top_k, step_cfg.top_k);
    EXPECT_TRUE(equal("choice_expert", routings[k].choice_expert,
                      f[k].steps[0].routing.choice_expert))
        << "iteration " << k << " " << why;
  }

  EXPECT_TRUE(equal("tokens_per_expert", st.tokens_per_expert, ref.tokens_per_expert)) << why;
  EXPECT_DOUBLE_EQ(st.drop_rate, ref.drop_rate);
  EXPECT_DOUBLE_EQ(st.tokens_without_expert, ref.tokens_without_expert);
  EXPECT_DOUBLE_EQ(st.cv, ref.cv);
  EXPECT_DOUBLE_EQ(st.max_violation, ref.max_violation);
  EXPECT_NEAR(st.router_entropy, ref.router_entropy, 1e-7 + 1e-5 * std::abs(ref.router_entropy));
  EXPECT_NEAR(st.mean_entropy, ref.mean_entropy, 1e-7 + 1e-5 * std::abs(ref.mean_entropy));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ChainLayerParity,
    ::testing::Values(
        LayerCase{.name = "chain_t256_e8_k2_c2", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                  .router = Router::chain_of_experts},
        LayerCase{.name = "chain_t200_e16_k6_c3_skewed", .T = 200, .H = 128, .I = 64, .E = 16,
                  .K = 6, .skewed = true, .router = Router::chain_of_experts, .iterations = 3},
        LayerCase{.name = "chain_t256_e8_k2_c1", .T = 256, .H = 64, .I = 32, .E = 8, .K = 2,
                  .router = Router::chain_of_experts, .iterations = 1},
        // capacity drops in every iteration, counted over all of them
        LayerCase{.name = "chain_t256_e8_k4_c2_padded_cf1_skewed", .T = 256, .H = 64, .I = 32,
                  .E = 8, .K = 4, .skewed = true, .router = Router::chain_of_experts,
                  .layout = Layout::padded, .capacity_factor = 1.0},
        // sequence-wise balance loss (the LM's groups of seq tokens), block layout, z-loss on
        LayerCase{.name = "chain_t192_e6_k4_c2_seq48_block", .T = 192, .H = 64, .I = 48, .E = 6,
                  .K = 4, .router = Router::chain_of_experts, .layout = Layout::block,
                  .z_coef = 1e-3, .sequence_length = 48}),
    [](const auto& info) { return info.param.name; });

// The chain has no host synchronisation either: forward + backward captured once replay to the
// eager bits.
TEST(ChainLayerGraph, ReplayOfForwardAndBackwardGivesTheEagerBits) {
  MOE_REQUIRE_GPU();
  const LayerCase c{.name = "chain_graph", .T = 256, .H = 64, .I = 32, .E = 8, .K = 4,
                    .skewed = true, .router = Router::chain_of_experts};
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  cuda::ChainLayer layer(cfg);
  DeviceLayerData d(in, c.E);
  const cuda::LayerWeights w = d.weights(c.router);
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto run = [&] {
    for (DeviceArray<float>* g : {&d.dw_gate, &d.dw_up, &d.dw_down})
      MOE_CUDA_CHECK(cudaMemsetAsync(g->get(), 0, g->size() * sizeof(float), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(d.y.get(), 0xff, d.y.size() * sizeof(bf16), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(d.dx.get(), 0xff, d.dx.size() * sizeof(bf16), stream));
  };
  auto step = [&] {
    layer.forward(d.x.get(), w, d.y.get(), stream);
    layer.backward(d.x.get(), w, d.dy.get(), d.grads(), stream);
  };
  run();
  step();
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<bf16> y = d.y.download(), dx = d.dx.download();
  const std::vector<float> wg = d.dw_gate.download(), wu = d.dw_up.download();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  step();
  MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  run();
  MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  EXPECT_TRUE(same_bytes(d.y.download(), y)) << "y";
  EXPECT_TRUE(same_bytes(d.dx.download(), dx)) << "dx";
  EXPECT_TRUE(same_bytes(d.dw_gate.download(), wg)) << "dW_gate";
  EXPECT_TRUE(same_bytes(d.dw_up.download(), wu)) << "dW_up";
  MOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// accumulate_experts = false: the chain's first backward iteration writes dw_up and dw_down, the
// others add to them, so poisoned buffers end up with the values a zeroed, accumulated run gives.
TEST(ChainLayerFreshGradients, WrittenFreshEqualsAccumulatedFromZero) {
  MOE_REQUIRE_GPU();
  const LayerCase c{.name = "chain_fresh", .T = 256, .H = 64, .I = 32, .E = 8, .K = 4,
                    .router = Router::chain_of_experts, .iterations = 2};
  const LayerConfig cfg = config_of(c);
  const LayerInputs in = make_inputs(c, cfg);
  cuda::ChainLayer layer(cfg);
  DeviceLayerData d(in, c.E);
  const cuda::LayerWeights w = d.weights(c.router);
  auto run = [&](bool accumulate) {
    d.dw_gate.poison(0);
    if (accumulate) {
      d.dw_up.poison(0);
      d.dw_down.poison(0);
    } else {
      d.dw_up.poison();  // NaN: must never be read
      d.dw_down.poison();
    }
    cuda::LayerGrads g = d.grads();
    g.accumulate_experts = accumulate;
    layer.forward(d.x.get(), w, d.y.get(), nullptr);
    layer.backward(d.x.get(), w, d.dy.get(), g, nullptr);
    return std::make_pair(d.dw_up.download(), d.dw_down.download());
  };
  const auto accumulated = run(true), fresh = run(false);
  // the same kernels with beta 0 or 1 on zeros: equal up to the sign of zero (NaN never passes)
  auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  EXPECT_TRUE(close("dW_up", fresh.first, as_double(accumulated.first), 1e-9, 1e-6));
  EXPECT_TRUE(close("dW_down", fresh.second, as_double(accumulated.second), 1e-9, 1e-6));
}

// The per-iteration configuration is the CPU's routing of a chain step (no GPU needed).
TEST(ChainStepConfig, IsUnrenormalisedSoftmaxTopkWithTheChainsCoefficients) {
  LayerConfig cfg;
  cfg.tokens = 96;
  cfg.experts = 8;
  cfg.top_k = 6;
  cfg.iterations = 3;
  cfg.router = Router::chain_of_experts;
  cfg.layout = Layout::padded;
  cfg.capacity_factor = 1.5;
  cfg.sequence_length = 48;
  const LayerConfig s = cuda::chain_step_config(cfg);
  EXPECT_EQ(s.router, Router::softmax_topk);
  EXPECT_EQ(s.top_k, 2);
  EXPECT_FALSE(s.renormalize);
  EXPECT_EQ(s.second_policy, SecondPolicy::all);
  EXPECT_EQ(s.resolved_aux_coef(), cfg.resolved_aux_coef());  // 1e-3, not softmax_topk's 1e-2
  EXPECT_EQ(s.resolved_z_coef(), 0.0);                         // none, not softmax_topk's 1e-3
  EXPECT_EQ(s.capacity(), cfg.capacity());                     // from K / iterations
  EXPECT_EQ(s.sequence_length, 48);
  cfg.router = Router::softmax_topk;
  EXPECT_THROW(cuda::chain_step_config(cfg), ConfigError);
}

// The decomposition ChainLayer runs, executed with the CPU layer (no GPU needed): per iteration a
// layer of chain_step_config on its w_gate slice, u_{c+1} = u_c + y_c, y = sum_c y_c; backward in
// reverse with the upstream dy + dL/du_{c+1}, dx = dL/du_0; dw_gate per slice, dw_up and dw_down
// summed; aux losses summed; chain_stats of the iterations' statistics. It must reproduce the CPU
// chain_of_experts layer to double rounding (the same operations in another grouping).
TEST(ChainStepConfig, CpuLayersOfTheStepConfigReproduceTheCpuChain) {
  for (const LayerCase& c :
       {LayerCase{.name = "c3_padded_cf1_skewed", .T = 96, .H = 32, .I = 16, .E = 8, .K = 6,
                  .skewed = true, .router = Router::chain_of_experts,
                  .layout = Layout::padded, .capacity_factor = 1.0, .iterations = 3},
        LayerCase{.name = "c2_seq48_zloss_block", .T = 192, .H = 32, .I = 24, .E = 6, .K = 4,
                  .router = Router::chain_of_experts, .layout = Layout::block, .z_coef = 1e-3,
                  .sequence_length = 48}}) {
    SCOPED_TRACE(c.name);
    const LayerConfig cfg = config_of(c);
    const LayerInputs in = make_inputs(c, cfg);
    const Params<double>& p = in.p;
    const int64_t n = c.T * c.H, HE = c.H * c.E, C = c.iterations;
    LayerForward<double> ref;
    layer_forward(cfg, p, in.x.data(), ref);
    std::vector<double> dx_ref(static_cast<size_t>(n));
    Params<double> g_ref;
    layer_backward(cfg, p, in.x.data(), ref, in.dy.data(), dx_ref.data(), g_ref);

    const LayerConfig step = cuda::chain_step_config(cfg);
    std::vector<Params<double>> ps(static_cast<size_t>(C), p);
    std::vector<std::vector<double>> inputs(static_cast<size_t>(C));
    std::vector<LayerForward<double>> f(static_cast<size_t>(C));
    std::vector<double> u = in.x, y(static_cast<size_t>(n), 0.0);
    double aux = 0;
    std::vector<LoadStats> stats;
    std::vector<int64_t> choices;
    for (int64_t k = 0; k < C; ++k) {
      ps[k].w_gate.assign(p.w_gate.begin() + k * HE, p.w_gate.begin() + (k + 1) * HE);
      inputs[k] = u;
      layer_forward(step, ps[k], inputs[k].data(), f[k]);
      for (int64_t i = 0; i < n; ++i) y[i] += f[k].y[i], u[i] += f[k].y[i];
      aux += f[k].aux_loss;
      stats.push_back(f[k].stats);
      choices.push_back(f[k].steps[0].plan.choices);
      EXPECT_EQ(f[k].steps[0].routing.choice_expert, ref.steps[k].routing.choice_expert)
          << "iteration " << k;
    }
    const size_t nn = static_cast<size_t>(n);
    std::vector<double> a(nn, 0.0), upstream(nn), d_in(nn);
    Params<double> g;
    g.w_gate.assign(p.w_gate.size(), 0.0);
    g.w_up.assign(p.w_up.size(), 0.0);
    g.w_down.assign(p.w_down.size(), 0.0);
    for (int64_t k = C - 1; k >= 0; --k) {
      for (int64_t i = 0; i < n; ++i) upstream[i] = in.dy[i] + a[i];
      Params<double> gk;
      layer_backward(step, ps[k], inputs[k].data(), f[k], upstream.data(), d_in.data(), gk);
      for (int64_t i = 0; i < n; ++i) a[i] += d_in[i];
      std::copy(gk.w_gate.begin(), gk.w_gate.end(), g.w_gate.begin() + k * HE);
      for (size_t i = 0; i < g.w_up.size(); ++i) g.w_up[i] += gk.w_up[i];
      for (size_t i = 0; i < g.w_down.size(); ++i) g.w_down[i] += gk.w_down[i];
    }
    auto near = [](const std::vector<double>& got, const std::vector<double>& want) {
      std::vector<float> gf(got.begin(), got.end());
      double scale = 0;
      for (double v : want) scale = std::max(scale, std::abs(v));
      return close("", gf, want, 1e-6 * scale, 1e-6);  // float copies of double values
    };
    EXPECT_TRUE(near(y, ref.y)) << "y";
    EXPECT_TRUE(near(a, dx_ref)) << "dx";
    EXPECT_TRUE(near(g.w_gate, g_ref.w_gate)) << "dW_gate";
    EXPECT_TRUE(near(g.w_up, g_ref.w_up)) << "dW_up";
    EXPECT_TRUE(near(g.w_down, g_ref.w_down)) << "dW_down";
    EXPECT_NEAR(aux, ref.aux_loss, 1e-12 * std::abs(ref.aux_loss) + 1e-15) << "aux loss";
    EXPECT_GT(ref.aux_loss, 0.0);
    const LoadStats st = cuda::chain_stats(stats, choices);
    EXPECT_EQ(st.tokens_per_expert, ref.stats.tokens_per_expert);
    EXPECT_DOUBLE_EQ(st.drop_rate, ref.stats.drop_rate);
    EXPECT_DOUBLE_EQ(st.router_entropy, ref.stats.router_entropy);
    EXPECT_DOUBLE_EQ(st.mean_entropy, ref.stats.mean_entropy);
    EXPECT_DOUBLE_EQ(st.tokens_without_expert, ref.stats.tokens_without_expert);
    EXPECT_DOUBLE_EQ(st.cv, ref.stats.cv);
    if (c.layout == Layout::padded) {
      EXPECT_GT(st.drop_rate, 0.0) << "the case should drop";
    }
  }
}

// ---- expert choice in G position groups (layer.hpp): one Layer call against G CPU layer calls of
// B = T/G tokens each (token t = b*G + g), the way the CPU LM runs expert choice: y and dx
// scattered back to the tokens, parameter gradients summed over the calls, the z-loss averaged over
// them (so, as in Transformer::ffn_backward, a call's backward gets G*dy and its gradients are
// divided by G when there is a z-loss), the statistics combined as Transformer::layer_stats does.
// G = 1 is plain expert choice over all T tokens.
class ExpertChoiceGroupsParity : public ::testing::TestWithParam<LayerCase> {};

TEST_P(ExpertChoiceGroupsParity, ForwardAndBackwardMatchTheCpuGroupCalls) {
  MOE_REQUIRE_GPU();
  const LayerCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  ASSERT_EQ(cfg.router, Router::expert_choice);
  const int64_t G = c.groups, T = c.T, B = T / G, H = c.H, E = c.E;
  ASSERT_EQ(B * G, T);
  const LayerInputs in = make_inputs(c, cfg);
  const Params<double>& p = in.p;
  LayerConfig group_cfg = cfg;
  group_cfg.tokens = B;
  const int64_t C = group_cfg.capacity();
  const double up = cfg.resolved_z_coef() > 0 ? double(G) : 1.0, down = 1.0 / up;

  // CPU: call g sees tokens b*G + g, b ascending
  std::vector<double> y_ref(static_cast<size_t>(T * H)), dx_ref(static_cast<size_t>(T * H));
  Params<double> g_ref;
  g_ref.w_gate.assign(p.w_gate.size(), 0.0);
  g_ref.w_up.assign(p.w_up.size(), 0.0);
  g_ref.w_down.assign(p.w_down.size(), 0.0);
  double aux_ref = 0, boundary = INFINITY, order = INFINITY;
  LoadStats st_ref;
  st_ref.tokens_per_expert.assign(static_cast<size_t>(E), 0.0);
  std::vector<Routing<double>> routings;
  for (int64_t g = 0; g < G; ++g) {
    std::vector<double> xg(static_cast<size_t>(B * H)), dyg(xg.size()), dxg(xg.size());
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(&in.x[(b * G + g) * H], H, &xg[b * H]);
      for (int64_t h = 0; h < H; ++h) dyg[b * H + h] = up * in.dy[(b * G + g) * H + h];
    }
    LayerForward<double> f;
    layer_forward(group_cfg, p, xg.data(), f);
    Params<double> gg;
    layer_backward(group_cfg, p, xg.data(), f, dyg.data(), dxg.data(), gg);
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(&f.y[b * H], H, &y_ref[(b * G + g) * H]);
      for (int64_t h = 0; h < H; ++h) dx_ref[(b * G + g) * H + h] = down * dxg[b * H + h];
    }
    for (size_t i = 0; i < gg.w_gate.size(); ++i) g_ref.w_gate[i] += down * gg.w_gate[i];
    for (size_t i = 0; i < gg.w_up.size(); ++i) g_ref.w_up[i] += down * gg.w_up[i];
    for (size_t i = 0; i < gg.w_down.size(); ++i) g_ref.w_down[i] += down * gg.w_down[i];
    aux_ref += f.aux_loss / double(G);
    for (int64_t e = 0; e < E; ++e) st_ref.tokens_per_expert[e] += f.stats.tokens_per_expert[e];
    st_ref.drop_rate += f.stats.drop_rate / double(G);
    st_ref.router_entropy += f.stats.router_entropy / double(G);
    st_ref.mean_entropy += f.stats.mean_entropy / double(G);
    st_ref.tokens_without_expert += f.stats.tokens_without_expert / double(G);
    // gaps of each expert's column: at the capacity boundary (which tokens) and inside the top C
    // (their order, the rows' order)
    const std::vector<double>& pr = f.steps[0].probs;
    for (int64_t e = 0; e < E; ++e) {
      std::vector<double> col(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) col[b] = pr[b * E + e];
      std::sort(col.begin(), col.end(), std::greater<double>());
      if (C < B) boundary = std::min(boundary, col[C - 1] - col[C]);
      for (int64_t j = 0; j + 1 < C; ++j) order = std::min(order, col[j] - col[j + 1]);
    }
    routings.push_back(f.steps[0].routing);
  }
  fill_balance(st_ref);

  cuda::Layer layer(cfg, cuda::ExpertsBackend::grouped, cuda::GateUpLayout::split, true, G);
  ASSERT_EQ(layer.groups(), G);
  DeviceLayerData d(in, E);
  const LayerRun run = run_once(layer, d, c.router);
  const LoadStats& st = run.stats;
  const Routing<float>& r = run.routing;
  const double aux = run.aux;

  const double e_y = rel_frobenius(d.y.download(), y_ref);
  const double e_dx = rel_frobenius(d.dx.download(), dx_ref);
  const double e_wg = rel_frobenius(d.dw_gate.download(), g_ref.w_gate);
  const double e_wu = rel_frobenius(d.dw_up.download(), g_ref.w_up);
  const double e_wd = rel_frobenius(d.dw_down.download(), g_ref.w_down);
  std::printf("%s: G=%lld B=%lld C=%lld rel. Frobenius y %.2e dx %.2e dW_gate %.2e dW_up %.2e "
              "dW_down %.2e; aux %.6e (cpu %.6e); margins: capacity boundary %.2e, order %.2e\n",
              c.name.c_str(), (long long)G, (long long)B, (long long)C, e_y, e_dx, e_wg, e_wu, e_wd,
              aux, aux_ref, boundary, order);
  const std::string why = "(smallest CPU capacity-boundary gap " + std::to_string(boundary) + ")";
  EXPECT_LT(e_y, kTolerance) << "y " << why;
  EXPECT_LT(e_dx, kTolerance) << "dx " << why;
  EXPECT_LT(e_wg, kTolerance) << "dW_gate " << why;
  EXPECT_LT(e_wu, kTolerance) << "dW_up " << why;
  EXPECT_LT(e_wd, kTolerance) << "dW_down " << why;
  EXPECT_NEAR(aux, aux_ref, 1e-9 + 1e-4 * std::abs(aux_ref)) << "aux loss (z-loss only)";

  // Training on grouped_fused (w_up blocked): the router-weight gradient from the da GEMM's row
  // dots, each (expert, slot) choice's over its weight; the gradients held to the same reference.
  if (c.I % 32 == 0) {
    cuda::Layer fused(cfg, cuda::ExpertsBackend::grouped_fused, cuda::GateUpLayout::blocked, true,
                      G);
    DeviceLayerData f(in, E);
    f.reorder_w_up(cuda::GateUpLayout::blocked, E, H, c.I);
    run_once(fused, f, c.router);
    DeviceArray<float> dw_up_split(in.p.w_up.size());
    cuda::from_gate_up_layout(f.dw_up.get(), cuda::GateUpLayout::blocked, dw_up_split.get(),
                              E * H, c.I, nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(same_bytes(f.y.download(), d.y.download())) << "fused, blocked: y";
    EXPECT_LT(rel_frobenius(f.dx.download(), dx_ref), kTolerance) << "fused, blocked: dx";
    EXPECT_LT(rel_frobenius(f.dw_gate.download(), g_ref.w_gate), kTolerance)
        << "fused, blocked: dW_gate";
    EXPECT_LT(rel_frobenius(dw_up_split.download(), g_ref.w_up), kTolerance)
        << "fused, blocked: dW_up";
    EXPECT_TRUE(same_bytes(f.dw_down.download(), d.dw_down.download()))
        << "fused, blocked: dW_down";
  }

  // choice (e*G + g)*C + j is the CPU call g's choice e*C + j, its token b being b*G + g
  ASSERT_EQ(r.top_k, 0);
  ASSERT_EQ(r.size(), E * G * C);
  if (order > 1e-5 && boundary > 1e-5) {
    std::vector<int64_t> token, want_token;
    std::vector<int32_t> expert, want_expert;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < C; ++j) {
          token.push_back(r.choice_token[(e * G + g) * C + j]);
          want_token.push_back(int64_t(routings[g].choice_token[e * C + j]) * G + g);
          expert.push_back(r.choice_expert[(e * G + g) * C + j]);
          want_expert.push_back(routings[g].choice_expert[e * C + j]);
        }
    EXPECT_TRUE(equal("choice_token", token, want_token));
    EXPECT_TRUE(equal("choice_expert", expert, want_expert));
  } else {
    std::printf("%s: choice order not compared (a rounding-level gap)\n", c.name.c_str());
  }

  EXPECT_TRUE(equal("tokens_per_expert", st.tokens_per_expert, st_ref.tokens_per_expert));
  for (double v : st.tokens_per_expert) EXPECT_EQ(v, double(G * C)) << "every expert full";
  EXPECT_EQ(st.drop_rate, 0.0);
  EXPECT_EQ(st_ref.drop_rate, 0.0);
  EXPECT_NEAR(st.tokens_without_expert, st_ref.tokens_without_expert, 1e-12) << why;
  EXPECT_DOUBLE_EQ(st.cv, st_ref.cv);
  EXPECT_NEAR(st.router_entropy, st_ref.router_entropy,
              1e-7 + 1e-5 * std::abs(st_ref.router_entropy));
  EXPECT_NEAR(st.mean_entropy, st_ref.mean_entropy, 1e-7 + 1e-5 * std::abs(st_ref.mean_entropy))
      << "the mean entropy of each group's mean, averaged over groups";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ExpertChoiceGroupsParity,
    ::testing::Values(
        LayerCase{.name = "ec_b16_g24_e8", .T = 384, .H = 64, .I = 32, .E = 8, .K = 1,
                  .router = Router::expert_choice, .groups = 24},
        // the LM test's shape: 6 rows, C = ceil(2 * 6 / 8) = 2
        LayerCase{.name = "ec_b6_g48_e8_cf2", .T = 288, .H = 64, .I = 96, .E = 8, .K = 1,
                  .router = Router::expert_choice, .capacity_factor = 2.0, .groups = 48},
        // one token per group: every expert takes it
        LayerCase{.name = "ec_b1_g64_e6", .T = 64, .H = 64, .I = 32, .E = 6, .K = 1,
                  .router = Router::expert_choice, .groups = 64},
        // one group: plain expert choice over all tokens
        LayerCase{.name = "ec_one_group_t256_e8", .T = 256, .H = 64, .I = 32, .E = 8, .K = 1,
                  .router = Router::expert_choice, .groups = 1},
        // E not a power of two, the padded layout (capacity G*C per expert, nothing dropped)
        LayerCase{.name = "ec_b12_g20_e13_padded_cf2", .T = 240, .H = 64, .I = 32, .E = 13,
                  .K = 1, .router = Router::expert_choice, .layout = Layout::padded,
                  .capacity_factor = 2.0, .groups = 20},
        // block layout, skewed scores, the z-loss (its mean over T = the mean over the calls)
        LayerCase{.name = "ec_b16_g16_e8_block16_skewed_zloss", .T = 256, .H = 128, .I = 64,
                  .E = 8, .K = 1, .skewed = true, .router = Router::expert_choice,
                  .layout = Layout::block, .z_coef = 1e-3, .groups = 16}),
    [](const auto& info) { return info.param.name; });

// The configuration is refused before anything is allocated, so this runs without a GPU too.
TEST(ExpertChoiceGroupsConfig, GroupsMustDivideTokensAndAreForExpertChoiceOnly) {
  LayerCase c{.name = "bad", .T = 96, .H = 64, .I = 32, .E = 8, .K = 2};
  auto make = [&](int64_t groups) {
    cuda::Layer layer(config_of(c), cuda::ExpertsBackend::grouped, cuda::GateUpLayout::split,
                      true, groups);
  };
  EXPECT_THROW(make(4), ConfigError);  // softmax_topk takes no groups
  c.router = Router::expert_choice;
  EXPECT_THROW(make(7), ConfigError);  // 7 does not divide 96
  EXPECT_THROW(make(0), ConfigError);
  MOE_REQUIRE_GPU();  // a valid layer allocates
  EXPECT_NO_THROW(make(12));
}

// What the grouped Layer relies on, checked with the CPU stages (no GPU needed): the G groups'
// expert-choice routings as one Routing (choice (e*G + g)*C + j = group g's choice e*C + j, token
// b -> b*G + g) give one plan whose segment e holds every group's picks of expert e, group by
// group, each in its call's order, nothing dropped; permute -> experts -> combine over that plan
// gives the group calls' outputs (each token's rows combined in expert order, as in its call).
TEST(ExpertChoiceGroupsPipeline, OnePlanOverAllGroupsGivesTheOutputsOfTheGroupCalls) {
  for (const Layout layout : {Layout::dropless, Layout::padded, Layout::block}) {
    SCOPED_TRACE(std::string(name(layout)));
    const LayerCase c{.name = "pipeline", .T = 96, .H = 16, .I = 8, .E = 5, .K = 1,
                      .router = Router::expert_choice, .layout = layout, .capacity_factor = 1.5,
                      .groups = 12};
    const LayerConfig cfg = config_of(c);
    const LayerInputs in = make_inputs(c, cfg);
    const int64_t G = c.groups, T = c.T, B = T / G, H = c.H, E = c.E;
    LayerConfig group_cfg = cfg;
    group_cfg.tokens = B;
    const int64_t C = group_cfg.capacity();
    ASSERT_EQ(C, 3);  // ceil(1.5 * 8 / 5)
    std::vector<double> y_ref(static_cast<size_t>(T * H));
    Routing<double> all;
    all.tokens = T;
    all.experts = E;
    all.top_k = 0;
    const size_t N = static_cast<size_t>(E * G * C);
    all.choice_token.assign(N, -1);
    all.choice_expert.assign(N, -1);
    all.choice_weight.assign(N, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> xg(static_cast<size_t>(B * H));
      for (int64_t b = 0; b < B; ++b) std::copy_n(&in.x[(b * G + g) * H], H, &xg[b * H]);
      LayerForward<double> f;
      layer_forward(group_cfg, in.p, xg.data(), f);
      for (int64_t b = 0; b < B; ++b) std::copy_n(&f.y[b * H], H, &y_ref[(b * G + g) * H]);
      const Routing<double>& r = f.steps[0].routing;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < C; ++j) {
          const int64_t i = (e * G + g) * C + j;
          all.choice_token[i] = r.choice_token[e * C + j] * int32_t(G) + int32_t(g);
          all.choice_expert[i] = r.choice_expert[e * C + j];
          all.choice_weight[i] = r.choice_weight[e * C + j];
        }
    }
    const DispatchPlan plan = build_plan(all, layout, G * C, cfg.block_size);
    EXPECT_EQ(plan.dropped_by_capacity + plan.skipped_by_policy, 0);
    for (int64_t e = 0; e < E; ++e) {
      EXPECT_EQ(plan.counts[e], G * C);
      for (int64_t q = 0; q < G * C; ++q)
        EXPECT_EQ(plan.row_choice[plan.offsets[e] + q], e * G * C + q) << "expert " << e;
    }
    const int64_t M = plan.rows, A = cfg.up_width();
    std::vector<double> xp(static_cast<size_t>(M * H)), pre(static_cast<size_t>(M * A));
    std::vector<double> act(static_cast<size_t>(M * c.I)), yp(static_cast<size_t>(M * H));
    std::vector<double> y(static_cast<size_t>(T * H));
    cpu::permute_forward(plan, in.x.data(), H, xp.data());
    cpu::experts_forward(cfg, plan.offsets.data(), E, in.p.w_up.data(), in.p.w_down.data(),
                         xp.data(), pre.data(), act.data(), yp.data());
    cpu::combine_forward(plan, all, yp.data(), H, y.data());
    double scale = 0;
    for (double v : y_ref) scale = std::max(scale, std::abs(v));
    EXPECT_GT(scale, 0.0);
    const std::vector<float> yf(y.begin(), y.end());
    EXPECT_TRUE(close("y", yf, y_ref, 1e-6 * scale, 1e-6));
  }
}

}  // namespace
}  // namespace moe::test
