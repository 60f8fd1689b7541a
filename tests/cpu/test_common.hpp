// defines: moe::test::Rand, random_vector, small_config, token_choice_routers, case_name,
//          objective, run_layer, run_backward, all_near, bitwise_equal, step_top_k
// Helpers shared by the CPU reference tests: inputs are seeded random (never zeros) and shapes
// small, so the whole suite runs in about a second.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "moe/plan.hpp"

namespace moe::test {

// ---------------------------------------------------------------------------------------------
// Random numbers: mt19937_64 bits turned into doubles by hand, so a seed gives the same tensors
// with every standard library (std::*_distribution is implementation-defined).
class Rand {
 public:
  explicit Rand(uint64_t seed) : gen_(seed) {}
  double uniform() { return (static_cast<double>(gen_() >> 11) + 0.5) * 0x1p-53; }  // (0, 1)
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  int64_t index(int64_t n) { return static_cast<int64_t>(gen_() % static_cast<uint64_t>(n)); }

 private:
  std::mt19937_64 gen_;
};

template <class Real>
std::vector<Real> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
  Rand rng(seed);
  std::vector<Real> v(n);
  for (auto& e : v) e = static_cast<Real>(scale * rng.normal());
  return v;
}

// ---------------------------------------------------------------------------------------------
// Configs. Tiny shapes keep gradient checks fast and selection ties rare.
inline LayerConfig small_config(Router router, Layout layout, Activation activation) {
  LayerConfig cfg;
  cfg.tokens = 8;
  cfg.hidden = 6;
  cfg.inter = 4;
  cfg.experts = 4;
  cfg.top_k = router == Router::switch_top1 ? 1 : 2;
  cfg.iterations = 2;
  cfg.router = router;
  cfg.layout = layout;
  cfg.activation = activation;
  cfg.block_size = 4;
  cfg.slots_per_expert = 2;
  cfg.training = true;
  cfg.seed = 1234;
  return cfg;
}

// Token-choice routers (the ones with k choices per token).
// Routers with a load-balance loss that --aux-coef sets (the others refuse the option).
inline bool takes_aux_coef(Router r) {
  return r != Router::noisy_topk && r != Router::expert_choice && r != Router::soft_moe;
}

inline std::vector<Router> token_choice_routers() {
  std::vector<Router> out;
  for (Router r : kAllRouters)
    if (is_token_choice(r)) out.push_back(r);
  return out;
}

inline std::string case_name(const LayerConfig& cfg) {
  std::string s(name(cfg.router));
  if (is_sparse(cfg.router)) s.append("_").append(name(cfg.layout));
  s.append("_").append(name(cfg.activation));
  return s;
}

// ---------------------------------------------------------------------------------------------
// The objective backward differentiates: f = <dy, y> + aux_loss.
template <class Real>
double objective(const LayerForward<Real>& fwd, const std::vector<Real>& dy) {
  double s = 0;
  for (size_t i = 0; i < dy.size(); ++i) s += static_cast<double>(dy[i]) * fwd.y[i];
  return s + fwd.aux_loss;
}

template <class Real>
LayerForward<Real> run_layer(const LayerConfig& cfg, const Params<Real>& p,
                             const std::vector<Real>& x) {
  LayerForward<Real> fwd;
  layer_forward(cfg, p, x.data(), fwd);
  return fwd;
}

template <class Real>
struct Backward {
  std::vector<Real> dx;
  Params<Real> grads;
};

template <class Real>
Backward<Real> run_backward(const LayerConfig& cfg, const Params<Real>& p,
                            const std::vector<Real>& x, const LayerForward<Real>& fwd,
                            const std::vector<Real>& dy) {
  Backward<Real> b;
  b.dx.assign(x.size(), Real(0));
  layer_backward(cfg, p, x.data(), fwd, dy.data(), b.dx.data(), b.grads);
  return b;
}

// ---------------------------------------------------------------------------------------------
// |a - b| <= atol + rtol * |b|, reporting the tensor name, index and both values of the first
// few mismatches and the count.
template <class A, class B>
::testing::AssertionResult all_near(const std::string& tensor, const std::vector<A>& got,
                                    const std::vector<B>& ref, double atol, double rtol) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure()
           << tensor << ": size " << got.size() << " != expected " << ref.size();
  int64_t bad = 0;
  double max_diff = 0;
  std::ostringstream os;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    const double d = std::fabs(g - r);
    if (!(d <= atol + rtol * std::fabs(r))) {  // also catches NaN
      if (bad < 5) os << "\n  [" << i << "] got " << g << " expected " << r;
      ++bad;
    }
    if (d > max_diff || std::isnan(d)) max_diff = d;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << tensor << ": " << bad << " of " << got.size()
                                       << " entries differ, max diff " << max_diff << os.str();
}

template <class Real>
::testing::AssertionResult bitwise_equal(const std::string& tensor, const std::vector<Real>& a,
                                         const std::vector<Real>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << tensor << ": size " << a.size() << " != " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(Real)) != 0)
      return ::testing::AssertionFailure()
             << tensor << ": first difference at [" << i << "]: " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

// Experts each token picks in one routing step of a token-choice router.
inline int64_t step_top_k(const LayerConfig& cfg) { return cfg.choices_per_step(); }

}  // namespace moe::test
