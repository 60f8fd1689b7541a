// defines: cpu::route_forward, cpu::route_backward — the gate GEMM and every sparse router
// Selection rules (the GPU kernels reproduce them):
//  - top-k per token sorts by (score desc, expert asc); softmax routers select on the logits
//    (softmax is monotone), noisy_topk on the noisy logits, sigmoid_bias on sigmoid + bias;
//  - expert choice sorts each expert's column of probabilities by (prob desc, token asc);
//  - non-finite logits are refused, never routed.
// Auxiliary losses enter the objective with weight 1; their gradients are added to the router's.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "blas.hpp"
#include "moe/check.hpp"
#include "moe/rng.hpp"
#include "stages.hpp"

namespace moe::cpu {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Indices of the k largest v[0..n) by (value desc, index asc).
template <class Real>
void top_indices(const Real* v, int64_t n, int64_t k, int32_t* out, std::vector<int32_t>& idx) {
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto before = [v](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
  std::copy(idx.begin(), idx.begin() + k, out);
}

template <class Real>
void softmax_row(const Real* z, int64_t n, Real* p) {
  Real m = z[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, z[j]);
  Real sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(z[j] - m));
  for (int64_t j = 0; j < n; ++j) p[j] /= sum;
}

template <class Real>
Real logsumexp_row(const Real* z, int64_t n) {
  Real m = z[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, z[j]);
  Real sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(z[j] - m);
  return m + std::log(sum);
}

// dz = p * (dp - <dp, p>) for one softmax row, added into dz.
template <class Real>
void softmax_row_backward(const Real* p, const Real* dp, int64_t n, Real* dz) {
  Real dot = 0;
  for (int64_t j = 0; j < n; ++j) dot += dp[j] * p[j];
  for (int64_t j = 0; j < n; ++j) dz[j] += p[j] * (dp[j] - dot);
}

template <class Real>
Real sigmoid(Real v) { return Real(1) / (Real(1) + std::exp(-v)); }
template <class Real>
Real softplus(Real v) { return v > 20 ? v : std::log1p(std::exp(v)); }
template <class Real>
Real normal_cdf(Real a) { return Real(0.5) * std::erfc(-a / std::sqrt(Real(2))); }
template <class Real>
Real normal_pdf(Real a) { return std::exp(Real(-0.5) * a * a) / std::sqrt(Real(2 * M_PI)); }

int64_t group_length(const LayerConfig& cfg) {
  return cfg.sequence_length > 0 ? cfg.sequence_length : cfg.tokens;
}

// Load-balance loss  coef * E * mean_groups sum_e f_e P_e  with f_e = count_e / (T_g K) (choices
// picked by top-k, before policy and capacity) and P_e = mean_t q_te. Balanced routing gives coef.
template <class Real>
double balance_forward(const LayerConfig& cfg, double coef, int64_t K, const int32_t* selected,
                       const Real* q) {
  const int64_t T = cfg.tokens, E = cfg.experts, L = group_length(cfg);
  if (coef == 0 || T == 0) return 0;
  const int64_t groups = T / L;
  double total = 0;
  std::vector<double> count(E), mass(E);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(count.begin(), count.end(), 0.0);
    std::fill(mass.begin(), mass.end(), 0.0);
    for (int64_t t = g * L; t < (g + 1) * L; ++t) {
      for (int64_t k = 0; k < K; ++k) count[selected[t * K + k]] += 1;
      for (int64_t e = 0; e < E; ++e) mass[e] += q[t * E + e];
    }
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += (count[e] / double(L * K)) * (mass[e] / double(L));
    total += s;
  }
  return coef * E * total / groups;
}

template <class Real>
void balance_backward(const LayerConfig& cfg, double coef, int64_t K, const int32_t* selected,
                      Real* dq) {
  const int64_t T = cfg.tokens, E = cfg.experts, L = group_length(cfg);
  if (coef == 0 || T == 0) return;
  const int64_t groups = T / L;
  std::vector<double> count(E);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(count.begin(), count.end(), 0.0);
    for (int64_t t = g * L; t < (g + 1) * L; ++t)
      for (int64_t k = 0; k < K; ++k) count[selected[t * K + k]] += 1;
    for (int64_t t = g * L; t < (g + 1) * L; ++t)
      for (int64_t e = 0; e < E; ++e)
        dq[t * E + e] += Real(coef * E * (count[e] / double(L * K)) / double(L) / groups);
  }
}

// CV^2 = population variance / (mean^2 + 1e-10), as in Shazeer's cv_squared; 0 for one expert.
double cv_squared(const std::vector<double>& v) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n <= 1) return 0;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  return var / (mean * mean + 1e-10);
}
void cv_squared_backward(const std::vector<double>& v, double scale, std::vector<double>& dv) {
  const int64_t n = static_cast<int64_t>(v.size());
  dv.assign(n, 0.0);
  if (n <= 1) return;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double den = mean * mean + 1e-10;
  for (int64_t i = 0; i < n; ++i)
    dv[i] = scale * ((2 * (v[i] - mean) / n) / den - var * 2 * mean / (n * den * den));
}


}  // namespace

// ---------------------------------------------------------------------------------------------
// forward

template <class Real>
void route_forward(const LayerConfig& cfg, const Params<Real>& p, int64_t step, const Real* x,
                   RouteStep<Real>& s, StageTimes* times) {
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts;
  const Router router = cfg.router;
  const bool token_choice = is_token_choice(router);
  const int64_t K = token_choice ? cfg.choices_per_step() : 0;
  const Real* w_gate = p.w_gate.data() + step * H * E;  // (H, E)

  // ---- gate: logits = x_router W_gate (fp32 or fp64 accumulation, "selective precision")
  auto t0 = Clock::now();
  const Real* xr = x;
  s.jitter.clear();
  if (router == Router::switch_top1 && cfg.training && cfg.jitter > 0) {
    s.jitter.resize(T * H);
    s.router_input.resize(T * H);
    for (int64_t i = 0; i < T * H; ++i) {
      const double u = counter_uniform(cfg.seed, RngStream::jitter, static_cast<uint64_t>(i));
      s.jitter[i] = Real(1 - cfg.jitter + 2 * cfg.jitter * u);
      s.router_input[i] = x[i] * s.jitter[i];
    }
    xr = s.router_input.data();
  } else {
    s.router_input.assign(x, x + T * H);
  }
  s.logits.assign(T * E, Real(0));
  gemm(false, false, T, E, H, Real(1), xr, H, w_gate, E, Real(0), s.logits.data(), E);
  if (router == Router::noisy_topk) {
    s.noise_raw.assign(T * E, Real(0));
    gemm(false, false, T, E, H, Real(1), x, H, p.w_noise.data(), E, Real(0), s.noise_raw.data(),
         E);
  }
  for (int64_t i = 0; i < T * E; ++i)
    MOE_CHECK(std::isfinite(s.logits[i]) &&
                  (router != Router::noisy_topk || std::isfinite(s.noise_raw[i])),
              "router logits are not finite at token ", i / E, ", expert ", i % E,
              " (check the input and the router weights for NaN/Inf)");
  if (times) times->add("gate", std::chrono::duration<double, std::milli>(Clock::now() - t0).count());

  // ---- route
  t0 = Clock::now();
  Routing<Real>& r = s.routing;
  r.tokens = T;
  r.experts = E;
  r.top_k = K;
  s.probs.assign(T * E, Real(0));
  s.aux_loss = 0;
  std::vector<int32_t> idx;
  const double z_coef = cfg.resolved_z_coef();
  const double aux_coef = cfg.resolved_aux_coef();

  if (router == Router::expert_choice) {
    for (int64_t t = 0; t < T; ++t) softmax_row(&s.logits[t * E], E, &s.probs[t * E]);
    const int64_t C = cfg.capacity();
    r.choice_token.resize(E * C);
    r.choice_expert.resize(E * C);
    r.choice_weight.resize(E * C);
    std::vector<Real> column(T);
    std::vector<int32_t> picked(C);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t = 0; t < T; ++t) column[t] = s.probs[t * E + e];
      top_indices(column.data(), T, C, picked.data(), idx);
      for (int64_t j = 0; j < C; ++j) {
        r.choice_token[e * C + j] = picked[j];
        r.choice_expert[e * C + j] = static_cast<int32_t>(e);
        r.choice_weight[e * C + j] = column[picked[j]];
      }
    }
    s.selected.clear();
  } else {
    MOE_ASSERT(token_choice);
    s.selected.assign(T * K, 0);
    r.choice_token.resize(T * K);
    r.choice_expert.resize(T * K);
    r.choice_weight.resize(T * K);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) r.choice_token[t * K + k] = static_cast<int32_t>(t);

    if (router == Router::noisy_topk) {
      const bool noisy = cfg.training;
      s.noisy.resize(T * E);
      for (int64_t i = 0; i < T * E; ++i) {
        const Real sigma = softplus(s.noise_raw[i]) + Real(cfg.noise_epsilon);
        const Real n =
            noisy ? Real(counter_normal(cfg.seed + step, RngStream::router_noise, uint64_t(i))) : 0;
        s.noisy[i] = s.logits[i] + n * sigma;
      }
      std::vector<int32_t> top(std::min(K + 1, E));
      s.threshold_expert.assign(T * E, -1);
      const bool smooth_load = noisy && K < E;
      for (int64_t t = 0; t < T; ++t) {
        const Real* h = &s.noisy[t * E];
        top_indices(h, E, static_cast<int64_t>(top.size()), top.data(), idx);
        Real m = h[top[0]], sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += std::exp(h[top[k]] - m);
        for (int64_t k = 0; k < K; ++k) {
          s.selected[t * K + k] = top[k];
          r.choice_expert[t * K + k] = top[k];
          r.choice_weight[t * K + k] = std::exp(h[top[k]] - m) / sum;
        }
        softmax_row(h, E, &s.probs[t * E]);  // statistics only (router entropy)
        if (smooth_load) {
          // In the top k, the threshold is the (k+1)-th noisy logit; outside it, the k-th.
          std::vector<bool> in_top(E, false);
          for (int64_t k = 0; k < K; ++k) in_top[top[k]] = true;
          for (int64_t e = 0; e < E; ++e)
            s.threshold_expert[t * E + e] = in_top[e] ? top[K] : top[K - 1];
        }
      }
      // Importance and load losses (Shazeer 2017, eq. 6-10).
      std::vector<double> importance(E, 0.0), load(E, 0.0);
      for (int64_t c = 0; c < T * K; ++c) importance[r.choice_expert[c]] += r.choice_weight[c];
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
          if (smooth_load) {
            const int64_t i = t * E + e;
            const Real sigma = softplus(s.noise_raw[i]) + Real(cfg.noise_epsilon);
            const Real thr = s.noisy[t * E + s.threshold_expert[i]];
            load[e] += normal_cdf((s.logits[i] - thr) / sigma);
          }
        }
      if (!smooth_load)
        for (int64_t c = 0; c < T * K; ++c) load[r.choice_expert[c]] += 1;
      if (T > 0)
        s.aux_loss += cfg.importance_coef * cv_squared(importance) +
                      cfg.load_coef * cv_squared(load);
    } else if (router == Router::sigmoid_bias) {
      std::vector<Real> biased(E);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          s.probs[t * E + e] = sigmoid(s.logits[t * E + e]);
          biased[e] = s.probs[t * E + e] + (p.expert_bias.empty() ? Real(0) : p.expert_bias[e]);
        }
        int32_t* sel = &s.selected[t * K];
        top_indices(biased.data(), E, K, sel, idx);
        Real sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += s.probs[t * E + sel[k]];
        for (int64_t k = 0; k < K; ++k) {
          r.choice_expert[t * K + k] = sel[k];
          r.choice_weight[t * K + k] = Real(cfg.route_scale) * s.probs[t * E + sel[k]] / sum;
        }
      }
      if (aux_coef > 0) {  // optional sequence-wise balance loss on s / sum(s)
        std::vector<Real> q(T * E);
        for (int64_t t = 0; t < T; ++t) {
          Real sum = 0;
          for (int64_t e = 0; e < E; ++e) sum += s.probs[t * E + e];
          for (int64_t e = 0; e < E; ++e) q[t * E + e] = s.probs[t * E + e] / sum;
        }
        s.aux_loss += balance_forward(cfg, aux_coef, K, s.selected.data(), q.data());
      }
    } else {
      // softmax_topk, switch_top1, chain_of_experts: softmax over E, top-k on the logits.
      const bool renorm = router == Router::softmax_topk && cfg.renormalize;
      for (int64_t t = 0; t < T; ++t) {
        const Real* z = &s.logits[t * E];
        Real* pr = &s.probs[t * E];
        softmax_row(z, E, pr);
        int32_t* sel = &s.selected[t * K];
        top_indices(z, E, K, sel, idx);
        Real sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += pr[sel[k]];
        for (int64_t k = 0; k < K; ++k) {
          r.choice_expert[t * K + k] = sel[k];
          r.choice_weight[t * K + k] = renorm ? pr[sel[k]] / sum : pr[sel[k]];
        }
        if (router == Router::softmax_topk && K == 2 && cfg.second_policy != SecondPolicy::all) {
          // GShard: the second choice keeps its weight when kept; the first is not rescaled.
          const Real g2 = r.choice_weight[t * K + 1];
          bool keep = false;
          if (cfg.second_policy == SecondPolicy::random)
            keep = cfg.training
                       ? counter_uniform(cfg.seed, RngStream::second_choice, uint64_t(t)) <
                             g2 / cfg.second_threshold
                       : true;
          else if (cfg.second_policy == SecondPolicy::threshold)
            keep = g2 > cfg.second_threshold;
          if (!keep) r.choice_expert[t * K + 1] = kNoExpert;
        }
      }
      s.aux_loss += balance_forward(cfg, aux_coef, K, s.selected.data(), s.probs.data());
    }
  }
  if (z_coef > 0 && T > 0 && router != Router::sigmoid_bias) {
    double zsum = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double lse = logsumexp_row(&s.logits[t * E], E);
      zsum += lse * lse;
    }
    s.aux_loss += z_coef * zsum / T;
  }
  if (times) times->add("route", ms_since(t0));
}

// ---------------------------------------------------------------------------------------------
// backward

template <class Real>
void route_backward(const LayerConfig& cfg, const Params<Real>& p, int64_t step,
                    const RouteStep<Real>& s, const Real* d_weight, Real* dx, Params<Real>& g) {
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts;
  if (T == 0) return;
  const Router router = cfg.router;
  const Routing<Real>& r = s.routing;
  const int64_t K = r.top_k;
  const double z_coef = cfg.resolved_z_coef();
  const double aux_coef = cfg.resolved_aux_coef();
  std::vector<Real> dz(T * E, Real(0));   // gradient w.r.t. the clean logits
  std::vector<Real> dr;                   // noisy_topk: gradient w.r.t. x W_noise

  if (router == Router::expert_choice) {
    std::vector<Real> dp(T * E, Real(0));
    for (int64_t c = 0; c < r.size(); ++c)
      dp[int64_t(r.choice_token[c]) * E + r.choice_expert[c]] += d_weight[c];
    for (int64_t t = 0; t < T; ++t)
      softmax_row_backward(&s.probs[t * E], &dp[t * E], E, &dz[t * E]);
  } else if (router == Router::noisy_topk) {
    const bool noisy = cfg.training;
    const bool smooth_load = noisy && K < E;
    std::vector<Real> dh(T * E, Real(0));       // d noisy logits
    std::vector<Real> dsigma(T * E, Real(0));
    // Importance: Imp_e = sum of the token's gates G_te.
    std::vector<double> importance(E, 0.0), d_imp;
    for (int64_t c = 0; c < T * K; ++c) importance[r.choice_expert[c]] += r.choice_weight[c];
    cv_squared_backward(importance, cfg.importance_coef, d_imp);
    for (int64_t t = 0; t < T; ++t) {
      // G = softmax over the k selected noisy logits.
      Real dot = 0;
      std::vector<Real> dG(K);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = t * K + k;
        dG[k] = d_weight[c] + Real(d_imp[r.choice_expert[c]]);
        dot += dG[k] * r.choice_weight[c];
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = t * K + k;
        dh[t * E + r.choice_expert[c]] += r.choice_weight[c] * (dG[k] - dot);
      }
    }
    if (smooth_load) {
      std::vector<double> load(E, 0.0), d_load;
      std::vector<Real> a(T * E);
      for (int64_t i = 0; i < T * E; ++i) {
        const Real sigma = softplus(s.noise_raw[i]) + Real(cfg.noise_epsilon);
        const int64_t t = i / E;
        a[i] = (s.logits[i] - s.noisy[t * E + s.threshold_expert[i]]) / sigma;
        load[i % E] += normal_cdf(a[i]);
      }
      cv_squared_backward(load, cfg.load_coef, d_load);
      for (int64_t i = 0; i < T * E; ++i) {
        const int64_t t = i / E, e = i % E;
        const Real sigma = softplus(s.noise_raw[i]) + Real(cfg.noise_epsilon);
        const Real da = Real(d_load[e]) * normal_pdf(a[i]);
        dz[i] += da / sigma;
        dsigma[i] += -da * a[i] / sigma;
        dh[t * E + s.threshold_expert[i]] += -da / sigma;
      }
    }
    // H = c + n * sigma, sigma = softplus(x W_noise) + eps.
    dr.assign(T * E, Real(0));
    for (int64_t i = 0; i < T * E; ++i) {
      dz[i] += dh[i];
      if (noisy) {
        const Real n = Real(counter_normal(cfg.seed + step, RngStream::router_noise, uint64_t(i)));
        dsigma[i] += dh[i] * n;
      }
      dr[i] = dsigma[i] * sigmoid(s.noise_raw[i]);
    }
  } else if (router == Router::sigmoid_bias) {
    std::vector<Real> ds(T * E, Real(0));
    const Real R = Real(cfg.route_scale);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* sel = &s.selected[t * K];
      Real sum = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) sum += s.probs[t * E + sel[k]];
      for (int64_t k = 0; k < K; ++k) dot += d_weight[t * K + k] * s.probs[t * E + sel[k]];
      for (int64_t k = 0; k < K; ++k)
        ds[t * E + sel[k]] += R / sum * (d_weight[t * K + k] - dot / sum);
    }
    if (aux_coef > 0) {
      std::vector<Real> dq(T * E, Real(0));
      balance_backward(cfg, aux_coef, K, s.selected.data(), dq.data());
      for (int64_t t = 0; t < T; ++t) {  // q = s / sum(s)
        Real sum = 0, dot = 0;
        for (int64_t e = 0; e < E; ++e) sum += s.probs[t * E + e];
        for (int64_t e = 0; e < E; ++e) dot += dq[t * E + e] * s.probs[t * E + e] / sum;
        for (int64_t e = 0; e < E; ++e) ds[t * E + e] += (dq[t * E + e] - dot) / sum;
      }
    }
    for (int64_t i = 0; i < T * E; ++i) dz[i] += ds[i] * s.probs[i] * (1 - s.probs[i]);
  } else {
    const bool renorm = router == Router::softmax_topk && cfg.renormalize;
    std::vector<Real> dp(T * E, Real(0));
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* sel = &s.selected[t * K];
      if (renorm) {
        Real sum = 0, dot = 0;
        for (int64_t k = 0; k < K; ++k) sum += s.probs[t * E + sel[k]];
        for (int64_t k = 0; k < K; ++k) dot += d_weight[t * K + k] * s.probs[t * E + sel[k]];
        for (int64_t k = 0; k < K; ++k)
          dp[t * E + sel[k]] += (d_weight[t * K + k] - dot / sum) / sum;
      } else {
        for (int64_t k = 0; k < K; ++k) dp[t * E + sel[k]] += d_weight[t * K + k];
      }
    }
    balance_backward(cfg, aux_coef, K, s.selected.data(), dp.data());
    for (int64_t t = 0; t < T; ++t)
      softmax_row_backward(&s.probs[t * E], &dp[t * E], E, &dz[t * E]);
  }
  if (z_coef > 0 && router != Router::sigmoid_bias) {
    std::vector<Real> pr(E);
    for (int64_t t = 0; t < T; ++t) {
      const Real* z = &s.logits[t * E];
      const Real lse = logsumexp_row(z, E);
      softmax_row(z, E, pr.data());
      for (int64_t e = 0; e < E; ++e) dz[t * E + e] += Real(z_coef * 2.0 / T) * lse * pr[e];
    }
  }

  // ---- gate backward: dW = x_router^T dz, dx += (dz W^T) * jitter
  const Real* w_gate = p.w_gate.data() + step * H * E;
  gemm(true, false, H, E, T, Real(1), s.router_input.data(), H, dz.data(), E, Real(1),
       g.w_gate.data() + step * H * E, E);
  if (s.jitter.empty()) {
    gemm(false, true, T, H, E, Real(1), dz.data(), E, w_gate, E, Real(1), dx, H);
  } else {
    std::vector<Real> dxr(T * H, Real(0));
    gemm(false, true, T, H, E, Real(1), dz.data(), E, w_gate, E, Real(0), dxr.data(), H);
    for (int64_t i = 0; i < T * H; ++i) dx[i] += dxr[i] * s.jitter[i];
  }
  if (router == Router::noisy_topk) {
    // router_input holds x itself for noisy_topk (no jitter).
    gemm(true, false, H, E, T, Real(1), s.router_input.data(), H, dr.data(), E, Real(1),
         g.w_noise.data(), E);
    gemm(false, true, T, H, E, Real(1), dr.data(), E, p.w_noise.data(), E, Real(1), dx, H);
  }
}

#define MOE_INSTANTIATE(Real)                                                                  \
  template void route_forward<Real>(const LayerConfig&, const Params<Real>&, int64_t,          \
                                    const Real*, RouteStep<Real>&, StageTimes*);               \
  template void route_backward<Real>(const LayerConfig&, const Params<Real>&, int64_t,         \
                                     const RouteStep<Real>&, const Real*, Real*, Params<Real>&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
