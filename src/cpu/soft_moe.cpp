// defines: cpu::soft_moe_forward, cpu::soft_moe_backward (Puigcerver et al. 2023)
// n = E*S slots. logits L = scale * x_hat phi_hat with x_hat, phi_hat L2-normalised (eps 1e-6);
// dispatch D = softmax of L over tokens (per slot), combine C = softmax of L over slots (per
// token); slots_in = D^T x (unnormalised x), expert e runs its S slots, y = C slots_out.
// All T tokens form one group: as published this mixes every token, so it is not causal.
#include <chrono>
#include <cmath>
#include <vector>

#include "blas.hpp"
#include "stages.hpp"

namespace moe::cpu {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
constexpr double kNormEps = 1e-6;
}  // namespace

template <class Real>
void soft_moe_forward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                      SoftStep<Real>& s, Real* y, StageTimes* times) {
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
  const int64_t n = E * S, A = cfg.up_width(), I = cfg.inter;
  auto t0 = Clock::now();
  s.x_norm.resize(T * H);
  s.x_inv_norm.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    Real sq = 0;
    for (int64_t h = 0; h < H; ++h) sq += x[t * H + h] * x[t * H + h];
    s.x_inv_norm[t] = Real(1) / std::sqrt(sq + Real(kNormEps));
    for (int64_t h = 0; h < H; ++h) s.x_norm[t * H + h] = x[t * H + h] * s.x_inv_norm[t];
  }
  s.phi_norm.resize(H * n);
  s.phi_inv_norm.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    Real sq = 0;
    for (int64_t h = 0; h < H; ++h) sq += p.w_gate[h * n + j] * p.w_gate[h * n + j];
    s.phi_inv_norm[j] = Real(1) / std::sqrt(sq + Real(kNormEps));
    for (int64_t h = 0; h < H; ++h) s.phi_norm[h * n + j] = p.w_gate[h * n + j] * s.phi_inv_norm[j];
  }
  s.logits.assign(T * n, Real(0));
  gemm(false, false, T, n, H, p.slot_scale[0], s.x_norm.data(), H, s.phi_norm.data(), n, Real(0),
       s.logits.data(), n);
  if (times) times->add("gate", ms_since(t0));

  t0 = Clock::now();
  s.dispatch.resize(T * n);
  s.combine.resize(T * n);
  for (int64_t j = 0; j < n; ++j) {  // softmax over tokens, per slot
    Real m = -INFINITY;
    for (int64_t t = 0; t < T; ++t) m = std::max(m, s.logits[t * n + j]);
    Real sum = 0;
    for (int64_t t = 0; t < T; ++t) sum += (s.dispatch[t * n + j] = std::exp(s.logits[t * n + j] - m));
    for (int64_t t = 0; t < T; ++t) s.dispatch[t * n + j] /= sum;
  }
  for (int64_t t = 0; t < T; ++t) {  // softmax over slots, per token
    const Real* l = &s.logits[t * n];
    Real m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, l[j]);
    Real sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (s.combine[t * n + j] = std::exp(l[j] - m));
    for (int64_t j = 0; j < n; ++j) s.combine[t * n + j] /= sum;
  }
  if (times) times->add("route", ms_since(t0));

  t0 = Clock::now();
  s.slots_in.assign(n * H, Real(0));
  gemm(true, false, n, H, T, Real(1), s.dispatch.data(), n, x, H, Real(0), s.slots_in.data(), H);
  if (times) times->add("dispatch", ms_since(t0));

  t0 = Clock::now();
  std::vector<int64_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
  s.pre.assign(n * A, Real(0));
  s.act.assign(n * I, Real(0));
  s.slots_out.assign(n * H, Real(0));
  experts_forward(cfg, offsets.data(), E, p.w_up.data(), p.w_down.data(), s.slots_in.data(),
                  s.pre.data(), s.act.data(), s.slots_out.data());
  if (times) times->add("experts", ms_since(t0));

  t0 = Clock::now();
  gemm(false, false, T, H, n, Real(1), s.combine.data(), n, s.slots_out.data(), H, Real(0), y, H);
  if (times) times->add("combine", ms_since(t0));
}

template <class Real>
void soft_moe_backward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                       const SoftStep<Real>& s, const Real* dy, Real* dx, Params<Real>& g) {
  const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
  const int64_t n = E * S;
  if (T == 0) return;
  // combine: y = C slots_out
  std::vector<Real> dC(T * n, Real(0)), d_slots_out(n * H, Real(0));
  gemm(false, true, T, n, H, Real(1), dy, H, s.slots_out.data(), H, Real(0), dC.data(), n);
  gemm(true, false, n, H, T, Real(1), s.combine.data(), n, dy, H, Real(0), d_slots_out.data(), H);
  // experts
  std::vector<int64_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
  std::vector<Real> d_slots_in(n * H, Real(0));
  experts_backward(cfg, offsets.data(), E, p.w_up.data(), p.w_down.data(), s.slots_in.data(),
                   s.pre.data(), s.act.data(), d_slots_out.data(), d_slots_in.data(),
                   g.w_up.data(), g.w_down.data());
  // dispatch: slots_in = D^T x  ->  dD = x d_slots_in^T, dx += D d_slots_in
  std::vector<Real> dD(T * n, Real(0));
  gemm(false, true, T, n, H, Real(1), x, H, d_slots_in.data(), H, Real(0), dD.data(), n);
  gemm(false, false, T, H, n, Real(1), s.dispatch.data(), n, d_slots_in.data(), H, Real(1), dx, H);
  // the two softmaxes share the logits
  std::vector<Real> dL(T * n, Real(0));
  for (int64_t j = 0; j < n; ++j) {
    Real dot = 0;
    for (int64_t t = 0; t < T; ++t) dot += s.dispatch[t * n + j] * dD[t * n + j];
    for (int64_t t = 0; t < T; ++t) dL[t * n + j] += s.dispatch[t * n + j] * (dD[t * n + j] - dot);
  }
  for (int64_t t = 0; t < T; ++t) {
    Real dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += s.combine[t * n + j] * dC[t * n + j];
    for (int64_t j = 0; j < n; ++j) dL[t * n + j] += s.combine[t * n + j] * (dC[t * n + j] - dot);
  }
  // L = scale * x_hat phi_hat
  const Real scale = p.slot_scale[0];
  Real d_scale = 0;
  for (int64_t i = 0; i < T * n; ++i) d_scale += dL[i] * s.logits[i];
  g.slot_scale[0] += scale != Real(0) ? d_scale / scale : Real(0);
  if (scale == Real(0)) {  // logits are 0: recompute x_hat phi_hat for the scale gradient
    std::vector<Real> m(T * n, Real(0));
    gemm(false, false, T, n, H, Real(1), s.x_norm.data(), H, s.phi_norm.data(), n, Real(0),
         m.data(), n);
    Real acc = 0;
    for (int64_t i = 0; i < T * n; ++i) acc += dL[i] * m[i];
    g.slot_scale[0] += acc;
  }
  std::vector<Real> dx_hat(T * H, Real(0)), dphi_hat(H * n, Real(0));
  gemm(false, true, T, H, n, scale, dL.data(), n, s.phi_norm.data(), n, Real(0), dx_hat.data(), H);
  gemm(true, false, H, n, T, scale, s.x_norm.data(), H, dL.data(), n, Real(0), dphi_hat.data(), n);
  // x_hat = x * inv, inv = (|x|^2 + eps)^-1/2:  dx = inv * dx_hat - inv^3 * x * <x, dx_hat>
  for (int64_t t = 0; t < T; ++t) {
    Real dot = 0;
    for (int64_t h = 0; h < H; ++h) dot += x[t * H + h] * dx_hat[t * H + h];
    const Real inv = s.x_inv_norm[t];
    for (int64_t h = 0; h < H; ++h)
      dx[t * H + h] += inv * dx_hat[t * H + h] - inv * inv * inv * x[t * H + h] * dot;
  }
  for (int64_t j = 0; j < n; ++j) {
    Real dot = 0;
    for (int64_t h = 0; h < H; ++h) dot += p.w_gate[h * n + j] * dphi_hat[h * n + j];
    const Real inv = s.phi_inv_norm[j];
    for (int64_t h = 0; h < H; ++h)
      g.w_gate[h * n + j] +=
          inv * dphi_hat[h * n + j] - inv * inv * inv * p.w_gate[h * n + j] * dot;
  }
}

double soft_moe_scale_grad_magnitude_sq(int64_t tokens, int64_t slots, const double* dispatch,
                                        const double* d_dispatch, const double* combine,
                                        const double* d_combine, const double* logits,
                                        double scale) {
  const int64_t n = slots;
  std::vector<double> m(tokens * n, 0.0);
  // One softmax's part: for each line o (a column of D, a row of C), its entries at
  // o * step_line + i * step_entry.
  auto add = [&](const double* P, const double* dP, int64_t lines, int64_t entries,
                 int64_t step_line, int64_t step_entry) {
    for (int64_t o = 0; o < lines; ++o) {
      double dot = 0, mag = 0;
      for (int64_t i = 0; i < entries; ++i) {
        const int64_t at = o * step_line + i * step_entry;
        dot += P[at] * dP[at];
        mag += std::abs(P[at] * dP[at]);
      }
      for (int64_t i = 0; i < entries; ++i) {
        const int64_t at = o * step_line + i * step_entry;
        m[at] += P[at] * (std::abs(dP[at]) + std::abs(dot) + mag);
      }
    }
  };
  add(dispatch, d_dispatch, n, tokens, 1, n);  // column dots a_j
  add(combine, d_combine, tokens, n, n, 1);    // row dots b_t
  double m2 = 0;
  for (int64_t i = 0; i < tokens * n; ++i) m2 += std::pow(m[i] * logits[i] / scale, 2);
  return m2;
}

#define MOE_INSTANTIATE(Real)                                                                  \
  template void soft_moe_forward<Real>(const LayerConfig&, const Params<Real>&, const Real*,   \
                                       SoftStep<Real>&, Real*, StageTimes*);                   \
  template void soft_moe_backward<Real>(const LayerConfig&, const Params<Real>&, const Real*,  \
                                        const SoftStep<Real>&, const Real*, Real*, Params<Real>&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
