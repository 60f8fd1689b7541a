// defines: cpu::experts_forward, cpu::experts_backward — each expert's FFN over its segment
// GELU is the exact erf form; SwiGLU splits the first layer's 2I columns as [gate | up] and
// computes silu(gate) * up. No biases (as in Mixtral, OLMoE, Qwen, DeepSeek experts).
#include <cmath>

#include "blas.hpp"
#include "stages.hpp"

namespace moe::cpu {

namespace {
template <class Real>
Real gelu(Real v) { return Real(0.5) * v * (Real(1) + std::erf(v / std::sqrt(Real(2)))); }
template <class Real>
Real gelu_grad(Real v) {
  return Real(0.5) * (Real(1) + std::erf(v / std::sqrt(Real(2)))) +
         v * std::exp(Real(-0.5) * v * v) / std::sqrt(Real(2 * M_PI));
}
template <class Real>
Real sigmoid(Real v) { return Real(1) / (Real(1) + std::exp(-v)); }
}  // namespace

template <class Real>
void experts_forward(const LayerConfig& cfg, const int64_t* offsets, int64_t num_experts,
                     const Real* w_up, const Real* w_down, const Real* in, Real* pre, Real* act,
                     Real* out) {
  const int64_t H = cfg.hidden, I = cfg.inter, A = cfg.up_width();
  const bool swiglu = cfg.activation == Activation::swiglu;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Real* h = pre + r0 * A;    // (n, A)
    Real* a = act + r0 * I;    // (n, I)
    gemm(false, false, n, A, H, Real(1), in + r0 * H, H, w_up + e * H * A, A, Real(0), h, A);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < I; ++j) {
        if (swiglu) {
          const Real g = h[i * A + j], u = h[i * A + I + j];
          a[i * I + j] = g * sigmoid(g) * u;
        } else {
          a[i * I + j] = gelu(h[i * A + j]);
        }
      }
    gemm(false, false, n, H, I, Real(1), a, I, w_down + e * I * H, H, Real(0), out + r0 * H, H);
  }
}

template <class Real>
void experts_backward(const LayerConfig& cfg, const int64_t* offsets, int64_t num_experts,
                      const Real* w_up, const Real* w_down, const Real* in, const Real* pre,
                      const Real* act, const Real* d_out, Real* d_in, Real* dw_up,
                      Real* dw_down) {
  const int64_t H = cfg.hidden, I = cfg.inter, A = cfg.up_width();
  const bool swiglu = cfg.activation == Activation::swiglu;
  std::vector<Real> da, dh;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    const Real* h = pre + r0 * A;
    const Real* a = act + r0 * I;
    const Real* dy = d_out + r0 * H;
    // dW_down += a^T dy ; da = dy W_down^T
    gemm(true, false, I, H, n, Real(1), a, I, dy, H, Real(1), dw_down + e * I * H, H);
    da.assign(n * I, Real(0));
    gemm(false, true, n, I, H, Real(1), dy, H, w_down + e * I * H, H, Real(0), da.data(), I);
    dh.assign(n * A, Real(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < I; ++j) {
        const Real g = da[i * I + j];
        if (swiglu) {
          const Real v = h[i * A + j], u = h[i * A + I + j], sg = sigmoid(v);
          dh[i * A + j] = g * u * sg * (Real(1) + v * (Real(1) - sg));
          dh[i * A + I + j] = g * v * sg;
        } else {
          dh[i * A + j] = g * gelu_grad(h[i * A + j]);
        }
      }
    // dW_up += in^T dh ; d_in = dh W_up^T
    gemm(true, false, H, A, n, Real(1), in + r0 * H, H, dh.data(), A, Real(1), dw_up + e * H * A,
         A);
    gemm(false, true, n, H, A, Real(1), dh.data(), A, w_up + e * H * A, A, Real(0), d_in + r0 * H,
         H);
  }
}

#define MOE_INSTANTIATE(Real)                                                                 \
  template void experts_forward<Real>(const LayerConfig&, const int64_t*, int64_t, const Real*, \
                                      const Real*, const Real*, Real*, Real*, Real*);         \
  template void experts_backward<Real>(const LayerConfig&, const int64_t*, int64_t,           \
                                       const Real*, const Real*, const Real*, const Real*,    \
                                       const Real*, const Real*, Real*, Real*, Real*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
