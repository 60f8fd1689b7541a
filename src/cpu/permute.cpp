// defines: cpu::permute_forward, cpu::permute_backward
// Forward gathers x rows into expert order (padding rows are zero); backward sums each token's
// rows in choice order, so the result does not depend on the row layout.
#include <algorithm>
#include <cstring>

#include "stages.hpp"

namespace moe::cpu {

template <class Real>
void permute_forward(const DispatchPlan& plan, const Real* x, int64_t hidden, Real* xp) {
  const int32_t pad = kPadToken(plan.tokens);
  for (int64_t r = 0; r < plan.rows; ++r) {
    const int32_t t = plan.row_token[r];
    Real* dst = xp + r * hidden;
    if (t == pad)
      std::fill(dst, dst + hidden, Real(0));
    else
      std::memcpy(dst, x + int64_t(t) * hidden, sizeof(Real) * hidden);
  }
}

template <class Real>
void permute_backward(const DispatchPlan& plan, const Real* dxp, int64_t hidden, Real* dx) {
  for (int64_t t = 0; t < plan.tokens; ++t) {
    Real* dst = dx + t * hidden;
    for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
      const int32_t r = plan.token_rows[i];
      if (r == kDropped) continue;
      const Real* src = dxp + int64_t(r) * hidden;
      for (int64_t h = 0; h < hidden; ++h) dst[h] += src[h];
    }
  }
}

template void permute_forward<float>(const DispatchPlan&, const float*, int64_t, float*);
template void permute_forward<double>(const DispatchPlan&, const double*, int64_t, double*);
template void permute_backward<float>(const DispatchPlan&, const float*, int64_t, float*);
template void permute_backward<double>(const DispatchPlan&, const double*, int64_t, double*);

}  // namespace moe::cpu
