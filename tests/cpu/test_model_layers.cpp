// Central-difference gradient checks, in double, of the transformer's own layer kinds
// (include/moe/model/layers.hpp): attention, layernorm, the byte embedding with its tied output
// head, the cross-entropy loss, and the linear layer. Each check takes a scalar objective
// f = <g, out> with a fixed random g, runs backward with g as the upstream gradient, and compares
// every gradient entry with (f(x + h) - f(x - h)) / 2h. The layers are smooth, so the tolerance is
// tight. Backward accumulates (+=): the buffers start from a nonzero value that is subtracted.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moe/model/layers.hpp"

namespace moe::model {
namespace {

std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::vector<double> v(n);
  for (double& x : v) {
    const double u1 = (double(gen() >> 11) + 0.5) * 0x1p-53, u2 = (double(gen() >> 11) + 0.5) * 0x1p-53;
    x = scale * std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Compares `analytic` (the gradient of f with respect to `x`) with central differences of f.
::testing::AssertionResult matches_numeric(const std::string& name, std::vector<double>& x,
                                           const std::vector<double>& analytic,
                                           const std::function<double()>& f) {
  constexpr double h = 1e-6, atol = 1e-7, rtol = 1e-5;
  if (analytic.size() != x.size())
    return ::testing::AssertionFailure() << name << ": gradient size " << analytic.size()
                                         << " != " << x.size();
  int bad = 0;
  std::string report;
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f();
    x[i] = saved - h;
    const double down = f();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    if (!(std::fabs(numeric - analytic[i]) <= atol + rtol * std::fabs(numeric))) {
      if (bad < 5)
        report += "\n  [" + std::to_string(i) + "] analytic " + std::to_string(analytic[i]) +
                  " numeric " + std::to_string(numeric);
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << name << ": " << bad << " of " << x.size()
                                       << " entries differ" << report;
}

// Backward adds into its outputs: start from `base`, return (buffer - base).
std::vector<double> minus(const std::vector<double>& buffer, const std::vector<double>& base) {
  std::vector<double> d(buffer.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = buffer[i] - base[i];
  return d;
}

TEST(ModelLayers, AttentionGradientMatchesCentralDifferences) {
  const int64_t B = 2, S = 5, D = 6, NH = 2;
  std::vector<double> qkv = randn(B * S * 3 * D, 1);
  const std::vector<double> g = randn(B * S * D, 2);
  std::vector<double> out(B * S * D), att(B * NH * S * S);
  auto f = [&] {
    attention_forward(out.data(), att.data(), qkv.data(), B, S, D, NH);
    return dot(out, g);
  };
  f();
  const std::vector<double> base = randn(qkv.size(), 3);
  std::vector<double> dqkv = base, datt(att.size());
  attention_backward(dqkv.data(), datt.data(), g.data(), qkv.data(), att.data(), B, S, D, NH);
  EXPECT_TRUE(matches_numeric("dqkv", qkv, minus(dqkv, base), f));
}

TEST(ModelLayers, AttentionIsCausal) {
  const int64_t B = 1, S = 6, D = 4, NH = 2;
  std::vector<double> qkv = randn(B * S * 3 * D, 4);
  std::vector<double> out(B * S * D), out2(B * S * D), att(B * NH * S * S);
  attention_forward(out.data(), att.data(), qkv.data(), B, S, D, NH);
  for (int64_t i = 0; i < 3 * D; ++i) qkv[(S - 1) * 3 * D + i] += 1.0;  // change the last token
  attention_forward(out2.data(), att.data(), qkv.data(), B, S, D, NH);
  for (int64_t i = 0; i < (S - 1) * D; ++i) EXPECT_EQ(out[i], out2[i]) << i;
}

TEST(ModelLayers, LayerNormGradientMatchesCentralDifferences) {
  const int64_t N = 3, D = 7;
  std::vector<double> x = randn(N * D, 5, 2.0), w = randn(D, 6), b = randn(D, 7);
  const std::vector<double> g = randn(N * D, 8);
  std::vector<double> out(N * D), mean(N), rstd(N);
  auto f = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, D);
    return dot(out, g);
  };
  f();
  const std::vector<double> bx = randn(N * D, 9), bw = randn(D, 10), bb = randn(D, 11);
  std::vector<double> dx = bx, dw = bw, db = bb;
  layernorm_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), mean.data(),
                     rstd.data(), N, D);
  EXPECT_TRUE(matches_numeric("dinp", x, minus(dx, bx), f));
  EXPECT_TRUE(matches_numeric("dweight", w, minus(dw, bw), f));
  EXPECT_TRUE(matches_numeric("dbias", b, minus(db, bb), f));
}

TEST(ModelLayers, EmbeddingAndTiedOutputGradientMatchesCentralDifferences) {
  // logits = encoder(tokens) * wte^T: wte receives both the embedding and the output gradient.
  const int64_t B = 2, S = 3, D = 4, V = 11;
  const std::vector<int32_t> tokens = {3, 7, 3, 0, 10, 7};
  std::vector<double> wte = randn(V * D, 12), wpe = randn(S * D, 13);
  const std::vector<double> g = randn(B * S * V, 14);
  std::vector<double> h(B * S * D), logits(B * S * V);
  auto f = [&] {
    encoder_forward(h.data(), tokens.data(), wte.data(), wpe.data(), B, S, D);
    output_forward(logits.data(), h.data(), wte.data(), B * S, D, V);
    return dot(logits, g);
  };
  f();
  const std::vector<double> bte = randn(V * D, 15), bpe = randn(S * D, 16);
  std::vector<double> dwte = bte, dwpe = bpe, dh(B * S * D, 0.0);
  output_backward(dh.data(), dwte.data(), g.data(), h.data(), wte.data(), B * S, D, V);
  encoder_backward(dwte.data(), dwpe.data(), dh.data(), tokens.data(), B, S, D);
  EXPECT_TRUE(matches_numeric("dwte", wte, minus(dwte, bte), f));
  EXPECT_TRUE(matches_numeric("dwpe", wpe, minus(dwpe, bpe), f));
}

TEST(ModelLayers, CrossEntropyGradientMatchesCentralDifferences) {
  const int64_t N = 4, V = 9;
  std::vector<double> logits = randn(N * V, 17, 3.0);
  const std::vector<int32_t> targets = {0, 8, 4, 4};
  const std::vector<double> g = randn(N, 18);
  std::vector<double> losses(N), probs(N * V);
  auto f = [&] {
    crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
    return dot(losses, g);
  };
  f();
  for (int64_t n = 0; n < N; ++n) {  // the loss is -log softmax[target]
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(logits[n * V + v]);
    EXPECT_NEAR(losses[n], std::log(z) - logits[n * V + targets[n]], 1e-12);
  }
  const std::vector<double> base = randn(N * V, 19);
  std::vector<double> dlogits = base;
  crossentropy_backward(dlogits.data(), g.data(), probs.data(), targets.data(), N, V);
  EXPECT_TRUE(matches_numeric("dlogits", logits, minus(dlogits, base), f));
}

TEST(ModelLayers, MatmulGradientMatchesCentralDifferences) {
  const int64_t N = 5, C = 4, OC = 6;
  std::vector<double> x = randn(N * C, 20), w = randn(C * OC, 21), b = randn(OC, 22);
  const std::vector<double> g = randn(N * OC, 23);
  std::vector<double> out(N * OC);
  auto f = [&] {
    matmul_forward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
    return dot(out, g);
  };
  f();
  const std::vector<double> bx = randn(N * C, 24), bw = randn(C * OC, 25), bb = randn(OC, 26);
  std::vector<double> dx = bx, dw = bw, db = bb;
  matmul_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), N, C, OC);
  EXPECT_TRUE(matches_numeric("dinp", x, minus(dx, bx), f));
  EXPECT_TRUE(matches_numeric("dweight", w, minus(dw, bw), f));
  EXPECT_TRUE(matches_numeric("dbias", b, minus(db, bb), f));
}

}  // namespace
}  // namespace moe::model
