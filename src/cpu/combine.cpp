// defines: cpu::combine_forward, cpu::combine_backward
// y[t] = sum over the token's kept rows, in choice order, of weight * yp[row]; written once per
// token (the GPU combine keeps the same order, so no atomics and the same bits every run).
#include <algorithm>

#include "stages.hpp"

namespace moe::cpu {

template <class Real>
void combine_forward(const DispatchPlan& plan, const Routing<Real>& routing, const Real* yp,
                     int64_t hidden, Real* y) {
  for (int64_t t = 0; t < plan.tokens; ++t) {
    Real* dst = y + t * hidden;
    std::fill(dst, dst + hidden, Real(0));
    for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
      const int32_t r = plan.token_rows[i];
      if (r == kDropped) continue;
      const Real w = routing.choice_weight[plan.token_choices[i]];
      const Real* src = yp + int64_t(r) * hidden;
      for (int64_t h = 0; h < hidden; ++h) dst[h] += w * src[h];
    }
  }
}

template <class Real>
void combine_backward(const DispatchPlan& plan, const Routing<Real>& routing, const Real* yp,
                      const Real* dy, int64_t hidden, Real* dyp, Real* d_weight) {
  std::fill(d_weight, d_weight + plan.choices, Real(0));
  const int32_t pad = kPadToken(plan.tokens);
  for (int64_t r = 0; r < plan.rows; ++r) {
    Real* dst = dyp + r * hidden;
    const int32_t t = plan.row_token[r];
    if (t == pad) {
      std::fill(dst, dst + hidden, Real(0));
      continue;
    }
    const int32_t c = plan.row_choice[r];
    const Real w = routing.choice_weight[c];
    const Real* g = dy + int64_t(t) * hidden;
    const Real* src = yp + r * hidden;
    Real dot = 0;
    for (int64_t h = 0; h < hidden; ++h) {
      dst[h] = w * g[h];
      dot += g[h] * src[h];
    }
    d_weight[c] = dot;
  }
}

#define MOE_INSTANTIATE(Real)                                                               \
  template void combine_forward<Real>(const DispatchPlan&, const Routing<Real>&, const Real*, \
                                      int64_t, Real*);                                      \
  template void combine_backward<Real>(const DispatchPlan&, const Routing<Real>&,           \
                                       const Real*, const Real*, int64_t, Real*, Real*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
