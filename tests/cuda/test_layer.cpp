// cuda::Layer (the whole MoE layer in bf16: gate, route, plan, permute, experts, combine and the
// backward of each) vs moe::layer_forward / moe::layer_backward in double on the same
// bf16-rounded inputs (x, dy, w_gate, w_up, w_down). Small shapes, uniform and skewed routing
// (a common direction in x that the gate weights of expert 0 align with), several layouts.
//
// Tolerance: relative Frobenius error ||gpu - ref|| / ||ref|| < 2e-2 for y, dx, dW_gate, dW_up,
// dW_down. The GPU stores xp, pre, act, yp, dyp, da, dpre, dxp and dx in bf16 (unit roundoff
// 2^-9) and accumulates in fp32; dx collects two bf16 roundings more than the experts stage's
// dxp (the permute sum, then the gate's dz W^T added), and the router gradient sees dz rounded
// to bf16 before the gate GEMMs. The experts stage alone lands near 0.5 %; a wrong row, a wrong
// expert, a missing aux-loss gradient or an unwritten element gives O(1) errors (or NaN: outputs
// are poisoned first).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "moe/config.hpp"
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
};

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

TEST_P(LayerParity, ForwardAndBackwardMatchCpu) {
  MOE_REQUIRE_GPU();
  const LayerCase& c = GetParam();
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
  cfg.validate();

  Params<double> p = random_params<double>(cfg, 11);
  p.w_noise.clear();
  for (double& v : p.expert_bias) v = 0;
  std::vector<double> x = random_vector<double>(size_t(c.T * c.H), 21);
  std::vector<double> dy = random_vector<double>(size_t(c.T * c.H), 31);
  if (c.skewed) {  // a common direction u in x; expert 0's gate column aligned with it
    const std::vector<double> u = random_vector<double>(size_t(c.H), 41);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h) x[t * c.H + h] += 1.5 * u[h];
    double norm = 0;
    for (double v : u) norm += v * v;
    for (int64_t h = 0; h < c.H; ++h) p.w_gate[h * c.E + 0] += 2.0 * u[h] / norm;
  }
  x = rounded(x);
  dy = rounded(dy);
  p.w_gate = rounded(p.w_gate);
  p.w_up = rounded(p.w_up);
  p.w_down = rounded(p.w_down);

  LayerForward<double> fwd;
  layer_forward(cfg, p, x.data(), fwd);
  std::vector<double> dx_ref(x.size());
  Params<double> g_ref;
  layer_backward(cfg, p, x.data(), fwd, dy.data(), dx_ref.data(), g_ref);

  cuda::Layer layer(cfg);
  DeviceArray<bf16> d_x(to_bf16(x)), d_dy(to_bf16(dy)), d_wg(to_bf16(p.w_gate)),
      d_wu(to_bf16(p.w_up)), d_wd(to_bf16(p.w_down));
  DeviceArray<float> d_bias(std::vector<float>(size_t(c.E), 0.f));
  DeviceArray<bf16> d_y(x.size()), d_dx(x.size());
  DeviceArray<float> d_gw(p.w_gate.size()), d_gu(p.w_up.size()), d_gd(p.w_down.size());
  MOE_CUDA_CHECK(cudaMemset(d_y.get(), kPoisonFloat, x.size() * sizeof(bf16)));
  MOE_CUDA_CHECK(cudaMemset(d_dx.get(), kPoisonFloat, x.size() * sizeof(bf16)));
  MOE_CUDA_CHECK(cudaMemset(d_gw.get(), 0, p.w_gate.size() * sizeof(float)));
  MOE_CUDA_CHECK(cudaMemset(d_gu.get(), 0, p.w_up.size() * sizeof(float)));
  MOE_CUDA_CHECK(cudaMemset(d_gd.get(), 0, p.w_down.size() * sizeof(float)));

  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::LayerWeights w{d_wg.get(), d_wu.get(), d_wd.get(),
                       c.router == Router::sigmoid_bias ? d_bias.get() : nullptr};
  layer.forward(d_x.get(), w, d_y.get(), stream);
  layer.backward(d_x.get(), w, d_dy.get(), {d_dx.get(), d_gw.get(), d_gu.get(), d_gd.get()},
                 stream);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));

  const double e_y = rel_frobenius(d_y.download(), fwd.y);
  const double e_dx = rel_frobenius(d_dx.download(), dx_ref);
  const double e_wg = rel_frobenius(d_gw.download(), g_ref.w_gate);
  const double e_wu = rel_frobenius(d_gu.download(), g_ref.w_up);
  const double e_wd = rel_frobenius(d_gd.download(), g_ref.w_down);
  RecordProperty("errors", ::testing::PrintToString(std::vector<double>{e_y, e_dx, e_wg, e_wu,
                                                                        e_wd}));
  std::printf("%s: rel. Frobenius y %.2e dx %.2e dW_gate %.2e dW_up %.2e dW_down %.2e\n",
              c.name.c_str(), e_y, e_dx, e_wg, e_wu, e_wd);
  EXPECT_LT(e_y, kTolerance) << "y";
  EXPECT_LT(e_dx, kTolerance) << "dx";
  EXPECT_LT(e_wg, kTolerance) << "dW_gate";
  EXPECT_LT(e_wu, kTolerance) << "dW_up";
  EXPECT_LT(e_wd, kTolerance) << "dW_down";
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
    LayerConfig cfg;
    cfg.tokens = s.T;
    cfg.hidden = s.H;
    cfg.inter = s.I;
    cfg.experts = s.E;
    cfg.top_k = s.K;
    cfg.router = Router::softmax_topk;
    cfg.layout = Layout::dropless;
    cfg.activation = Activation::swiglu;
    cfg.validate();
    const size_t separate = cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::cublas_loop_host_offsets);
    const size_t aliased = cuda::Layer::arena_bytes(cfg, cuda::ExpertsBackend::grouped);
    const size_t R = size_t(s.T * s.K);
    EXPECT_EQ(separate - aliased, R * size_t(s.H + s.I + 2 * s.I) * sizeof(bf16)) << s.name;
    std::printf("%s: activation arena + experts scratch %.3f GiB separate, %.3f GiB aliased "
                "(%.1f %%)\n", s.name, separate / double(1 << 30), aliased / double(1 << 30),
                100.0 * aliased / separate);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayerParity,
    ::testing::Values(LayerCase{"t256_e8_k2_uniform", 256, 64, 32, 8, 2},
                      LayerCase{"t200_e16_k4_skewed", 200, 128, 64, 16, 4, true},
                      LayerCase{"t333_e5_k1_skewed", 333, 64, 48, 5, 1, true},
                      LayerCase{"t128_e64_k8_uniform", 128, 64, 32, 64, 8},
                      LayerCase{"t256_e8_k2_sigmoid_bias", 256, 64, 32, 8, 2, false,
                                Router::sigmoid_bias},
                      LayerCase{"t256_e8_k2_block16_skewed", 256, 64, 32, 8, 2, true,
                                Router::softmax_topk, Layout::block}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace moe::test
