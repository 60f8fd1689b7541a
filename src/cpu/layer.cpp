// defines: init_params, random_params, parameter_list, layer_forward, layer_backward,
//          update_expert_bias — the layer assembled from the CPU stages
// chain_of_experts: u_0 = x, u_{c+1} = u_c + MoE_c(u_c) with router c and the shared expert pool;
// the layer returns y = u_C - x = sum_c MoE_c(u_c) (the caller adds the outer residual).
// Shared experts run once on x and are added to y.
#include <chrono>
#include <cmath>

#include "moe/check.hpp"
#include "moe/init.hpp"
#include "moe/layer.hpp"
#include "moe/rng.hpp"
#include "stages.hpp"

namespace moe {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

template <class Real>
Params<Real> make_params(const LayerConfig& cfg, uint64_t seed, bool all_random) {
  cfg.validate();
  const int64_t H = cfg.hidden, E = cfg.experts, I = cfg.inter, A = cfg.up_width();
  const int64_t S = cfg.shared_experts;
  Params<Real> p;
  if (cfg.router == Router::soft_moe) {
    fill_normal(p.w_gate, H * E * cfg.slots_per_expert, 1.0 / std::sqrt(double(H)), seed, 1);
    p.slot_scale = {Real(all_random ? 1.0 + 0.5 * counter_uniform(seed, RngStream::init, 7) : 1.0)};
  } else {
    const int64_t G = cfg.router == Router::chain_of_experts ? cfg.iterations : 1;
    // Switch's reduced init (std sqrt(0.1/H)); Shazeer's gate starts at zero.
    const double gate_std = all_random ? 1.0 / std::sqrt(double(H)) : std::sqrt(0.1 / double(H));
    if (cfg.router == Router::noisy_topk && !all_random)
      p.w_gate.assign(G * H * E, Real(0));
    else
      fill_normal(p.w_gate, G * H * E, gate_std, seed, 1);
  }
  if (cfg.router == Router::noisy_topk) {
    if (all_random)
      fill_normal(p.w_noise, H * E, 1.0 / std::sqrt(double(H)), seed, 2);
    else
      p.w_noise.assign(H * E, Real(0));
  }
  fill_normal(p.w_up, E * H * A, 1.0 / std::sqrt(double(H)), seed, 3);
  fill_normal(p.w_down, E * I * H, 1.0 / std::sqrt(double(I)), seed, 4);
  fill_normal(p.shared_up, S * H * A, 1.0 / std::sqrt(double(H)), seed, 5);
  fill_normal(p.shared_down, S * I * H, 1.0 / std::sqrt(double(I)), seed, 6);
  if (cfg.router == Router::sigmoid_bias) {
    if (all_random)
      fill_normal(p.expert_bias, E, 0.1, seed, 8);
    else
      p.expert_bias.assign(E, Real(0));
  }
  return p;
}

template <class Real>
void check_finite(const std::vector<Real>& v, const char* what) {
  for (size_t i = 0; i < v.size(); ++i)
    MOE_CHECK(std::isfinite(v[i]), what, " are not finite at index ", i,
              " (check the input and the router weights for NaN/Inf)");
}

// Statistics of one routing step, accumulated over chain_of_experts iterations.
template <class Real>
void add_step_stats(const LayerConfig& cfg, const RouteStep<Real>& s, LoadStats& st,
                    double& entropy, double& mean_entropy, double& dropped, double& choices,
                    double& without) {
  const int64_t T = cfg.tokens, E = cfg.experts;
  for (int64_t e = 0; e < E; ++e) st.tokens_per_expert[e] += double(s.plan.counts[e]);
  dropped += double(s.plan.dropped_by_capacity + s.plan.skipped_by_policy);
  choices += double(s.plan.choices);
  std::vector<double> mean(E, 0.0);
  double h = 0;
  for (int64_t t = 0; t < T; ++t) {
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += s.probs[t * E + e];
    for (int64_t e = 0; e < E; ++e) {
      const double q = s.probs[t * E + e] / sum;
      if (q > 0) h -= q * std::log(q);
      mean[e] += q / T;
    }
  }
  double hm = 0;
  for (double q : mean)
    if (q > 0) hm -= q * std::log(q);
  entropy += T > 0 ? h / T : 0;
  mean_entropy += T > 0 ? hm : 0;
  int64_t none = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t i = s.plan.token_offsets[t]; i < s.plan.token_offsets[t + 1]; ++i)
      any = any || s.plan.token_rows[i] != kDropped;
    none += !any;
  }
  without += T > 0 ? double(none) / T : 0;
}
}  // namespace

template <class Real>
std::vector<std::pair<std::string, std::vector<Real>*>> parameter_list(Params<Real>& p) {
  std::vector<std::pair<std::string, std::vector<Real>*>> out;
  auto add = [&](const char* n, std::vector<Real>& v) {
    if (!v.empty()) out.emplace_back(n, &v);
  };
  add("router.w_gate", p.w_gate);
  add("router.w_noise", p.w_noise);
  add("router.slot_scale", p.slot_scale);
  add("experts.w_up", p.w_up);
  add("experts.w_down", p.w_down);
  add("shared.w_up", p.shared_up);
  add("shared.w_down", p.shared_down);
  add("router.expert_bias", p.expert_bias);
  return out;
}

template <class Real>
Params<Real> init_params(const LayerConfig& cfg, uint64_t seed) {
  return make_params<Real>(cfg, seed, false);
}
template <class Real>
Params<Real> random_params(const LayerConfig& cfg, uint64_t seed) {
  return make_params<Real>(cfg, seed, true);
}

template <class Real>
void check_params(const LayerConfig& cfg, const Params<Real>& p) {
  const int64_t H = cfg.hidden, E = cfg.experts, I = cfg.inter, A = cfg.up_width();
  const int64_t S = cfg.shared_experts;
  const bool soft = cfg.router == Router::soft_moe;
  const int64_t G = cfg.router == Router::chain_of_experts ? cfg.iterations : 1;
  auto same = [](const std::vector<Real>& a, int64_t n, const char* name) {
    MOE_CHECK(static_cast<int64_t>(a.size()) == n, "parameter ", name, " has ", a.size(),
              " values, the configuration needs ", n);
  };
  same(p.w_gate, soft ? H * E * cfg.slots_per_expert : G * H * E, "router.w_gate");
  same(p.w_noise, cfg.router == Router::noisy_topk ? H * E : 0, "router.w_noise");
  same(p.slot_scale, soft ? 1 : 0, "router.slot_scale");
  same(p.w_up, E * H * A, "experts.w_up");
  same(p.w_down, E * I * H, "experts.w_down");
  same(p.shared_up, S * H * A, "shared.w_up");
  same(p.shared_down, S * I * H, "shared.w_down");
  same(p.expert_bias, cfg.router == Router::sigmoid_bias ? E : 0, "router.expert_bias");
}

template <class Real>
void layer_forward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                   LayerForward<Real>& out) {
  cfg.validate();
  check_params(cfg, p);
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, I = cfg.inter;
  const int64_t A = cfg.up_width();
  out.y.assign(T * H, Real(0));
  out.aux_loss = 0;
  out.steps.clear();
  out.times = {};
  out.stats = {};
  out.stats.tokens_per_expert.assign(E, 0.0);
  LoadStats& st = out.stats;

  if (cfg.router == Router::soft_moe) {
    cpu::soft_moe_forward(cfg, p, x, out.soft, out.y.data(), &out.times);
    check_finite(out.soft.logits, "router logits");
    const int64_t S = cfg.slots_per_expert, n = E * S;
    std::vector<double> mean(E, 0.0);
    double h = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> q(E, 0.0);
      for (int64_t j = 0; j < n; ++j) q[j / S] += out.soft.combine[t * n + j];
      for (int64_t e = 0; e < E; ++e) {
        st.tokens_per_expert[e] += q[e];
        mean[e] += q[e] / T;
        if (q[e] > 0) h -= q[e] * std::log(q[e]);
      }
    }
    st.router_entropy = T > 0 ? h / T : 0;
    for (double q : mean)
      if (q > 0 && T > 0) st.mean_entropy -= q * std::log(q);
  } else {
    const bool chain = cfg.router == Router::chain_of_experts;
    const int64_t iters = chain ? cfg.iterations : 1;
    std::vector<Real> u, moe_out(T * H);
    if (chain) u.assign(x, x + T * H);
    double entropy = 0, mean_entropy = 0, dropped = 0, choices = 0, without = 0;
    out.steps.resize(iters);
    for (int64_t c = 0; c < iters; ++c) {
      RouteStep<Real>& s = out.steps[c];
      if (chain) s.input = u;
      const Real* in = chain ? s.input.data() : x;
      cpu::route_forward(cfg, p, c, in, s, &out.times);
      auto t0 = Clock::now();
      s.plan = build_plan(s.routing, cfg.layout, cfg.capacity(), cfg.block_size);
      out.times.add("plan", ms_since(t0));
      const int64_t M = s.plan.rows;
      t0 = Clock::now();
      s.xp.assign(M * H, Real(0));
      cpu::permute_forward(s.plan, in, H, s.xp.data());
      out.times.add("permute", ms_since(t0));
      t0 = Clock::now();
      s.pre.assign(M * A, Real(0));
      s.act.assign(M * I, Real(0));
      s.yp.assign(M * H, Real(0));
      cpu::experts_forward(cfg, s.plan.offsets.data(), E, p.w_up.data(), p.w_down.data(),
                           s.xp.data(), s.pre.data(), s.act.data(), s.yp.data());
      out.times.add("experts", ms_since(t0));
      t0 = Clock::now();
      cpu::combine_forward(s.plan, s.routing, s.yp.data(), H, moe_out.data());
      for (int64_t i = 0; i < T * H; ++i) out.y[i] += moe_out[i];
      if (chain && c + 1 < iters)
        for (int64_t i = 0; i < T * H; ++i) u[i] += moe_out[i];
      out.times.add("combine", ms_since(t0));
      out.aux_loss += s.aux_loss;
      add_step_stats(cfg, s, st, entropy, mean_entropy, dropped, choices, without);
    }
    st.router_entropy = entropy / iters;
    st.mean_entropy = mean_entropy / iters;
    st.drop_rate = choices > 0 ? dropped / choices : 0;
    st.tokens_without_expert = without / iters;
  }

  // Shared experts: always active, on x.
  const int64_t S = cfg.shared_experts;
  if (S > 0) {
    auto t0 = Clock::now();
    out.shared_pre.assign(S * T * A, Real(0));
    out.shared_act.assign(S * T * I, Real(0));
    std::vector<Real> ys(T * H);
    const int64_t offsets[2] = {0, T};
    for (int64_t e = 0; e < S; ++e) {
      cpu::experts_forward(cfg, offsets, 1, p.shared_up.data() + e * H * A,
                           p.shared_down.data() + e * I * H, x, out.shared_pre.data() + e * T * A,
                           out.shared_act.data() + e * T * I, ys.data());
      for (int64_t i = 0; i < T * H; ++i) out.y[i] += ys[i];
    }
    out.times.add("shared", ms_since(t0));
  }
  fill_balance(st);
}

template <class Real>
void layer_backward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                    const LayerForward<Real>& fwd, const Real* dy, Real* dx, Params<Real>& g,
                    StageTimes* times) {
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, I = cfg.inter;
  const int64_t A = cfg.up_width();
  g = {};
  auto zero_like = [](std::vector<Real>& d, const std::vector<Real>& s) { d.assign(s.size(), Real(0)); };
  zero_like(g.w_gate, p.w_gate);
  zero_like(g.w_noise, p.w_noise);
  zero_like(g.slot_scale, p.slot_scale);
  zero_like(g.w_up, p.w_up);
  zero_like(g.w_down, p.w_down);
  zero_like(g.shared_up, p.shared_up);
  zero_like(g.shared_down, p.shared_down);
  zero_like(g.expert_bias, p.expert_bias);  // a buffer: its gradient stays zero
  std::fill(dx, dx + T * H, Real(0));
  StageTimes local;
  StageTimes& tm = times ? *times : local;

  if (cfg.router == Router::soft_moe) {
    auto t0 = Clock::now();
    cpu::soft_moe_backward(cfg, p, x, fwd.soft, dy, dx, g);
    tm.add("soft_moe", ms_since(t0));
  } else {
    const int64_t iters = static_cast<int64_t>(fwd.steps.size());
    std::vector<Real> a_next(T * H, Real(0)), upstream(T * H), d_in(T * H);
    for (int64_t c = iters - 1; c >= 0; --c) {
      const RouteStep<Real>& s = fwd.steps[c];
      const int64_t M = s.plan.rows;
      for (int64_t i = 0; i < T * H; ++i) upstream[i] = dy[i] + a_next[i];
      auto t0 = Clock::now();
      std::vector<Real> dyp(M * H), d_weight(s.routing.size());
      cpu::combine_backward(s.plan, s.routing, s.yp.data(), upstream.data(), H, dyp.data(),
                            d_weight.data());
      tm.add("combine", ms_since(t0));
      t0 = Clock::now();
      std::vector<Real> dxp(M * H, Real(0));
      cpu::experts_backward(cfg, s.plan.offsets.data(), E, p.w_up.data(), p.w_down.data(),
                            s.xp.data(), s.pre.data(), s.act.data(), dyp.data(), dxp.data(),
                            g.w_up.data(), g.w_down.data());
      tm.add("experts", ms_since(t0));
      t0 = Clock::now();
      std::fill(d_in.begin(), d_in.end(), Real(0));
      cpu::permute_backward(s.plan, dxp.data(), H, d_in.data());
      tm.add("permute", ms_since(t0));
      t0 = Clock::now();
      cpu::route_backward(cfg, p, c, s, d_weight.data(), d_in.data(), g);
      tm.add("route", ms_since(t0));
      for (int64_t i = 0; i < T * H; ++i) a_next[i] += d_in[i];
    }
    std::copy(a_next.begin(), a_next.end(), dx);
  }

  const int64_t S = cfg.shared_experts;
  if (S > 0) {
    auto t0 = Clock::now();
    const int64_t offsets[2] = {0, T};
    std::vector<Real> dxs(T * H);
    for (int64_t e = 0; e < S; ++e) {
      cpu::experts_backward(cfg, offsets, 1, p.shared_up.data() + e * H * A,
                            p.shared_down.data() + e * I * H, x,
                            fwd.shared_pre.data() + e * T * A, fwd.shared_act.data() + e * T * I,
                            dy, dxs.data(), g.shared_up.data() + e * H * A,
                            g.shared_down.data() + e * I * H);
      for (int64_t i = 0; i < T * H; ++i) dx[i] += dxs[i];
    }
    tm.add("shared", ms_since(t0));
  }
}

template <class Real>
void update_expert_bias(const LayerConfig& cfg, const LayerForward<Real>& fwd, Params<Real>& p) {
  if (cfg.router != Router::sigmoid_bias || !cfg.training || fwd.steps.empty()) return;
  const int64_t E = cfg.experts;
  const auto& counts = fwd.steps[0].plan.counts;
  const double mean = double(cfg.tokens * cfg.top_k) / double(E);
  for (int64_t e = 0; e < E; ++e) {
    const double err = mean - double(counts[e]);
    const double sign = err > 0 ? 1.0 : (err < 0 ? -1.0 : 0.0);
    p.expert_bias[e] += Real(cfg.bias_update_rate * sign);
  }
}

#define MOE_INSTANTIATE(Real)                                                                   \
  template std::vector<std::pair<std::string, std::vector<Real>*>> parameter_list<Real>(        \
      Params<Real>&);                                                                           \
  template Params<Real> init_params<Real>(const LayerConfig&, uint64_t);                        \
  template Params<Real> random_params<Real>(const LayerConfig&, uint64_t);                      \
  template void layer_forward<Real>(const LayerConfig&, const Params<Real>&, const Real*,       \
                                    LayerForward<Real>&);                                       \
  template void layer_backward<Real>(const LayerConfig&, const Params<Real>&, const Real*,      \
                                     const LayerForward<Real>&, const Real*, Real*,             \
                                     Params<Real>&, StageTimes*);                               \
  template void update_expert_bias<Real>(const LayerConfig&, const LayerForward<Real>&,        \
                                         Params<Real>&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
