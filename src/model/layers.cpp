// defines: the transformer layer kinds of include/moe/model/layers.hpp (forward, then backward)
#include "moe/model/layers.hpp"

#include <algorithm>
#include <cmath>

#include "cpu/blas.hpp"

namespace moe::model {

// ---------------------------------------------------------------------------------------------
// encoder: byte embedding + learned position

template <class Real>
void encoder_forward(Real* out, const int32_t* tokens, const Real* wte, const Real* wpe,
                     int64_t B, int64_t S, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      Real* o = out + (b * S + s) * D;                  // (D)
      const Real* e = wte + int64_t(tokens[b * S + s]) * D;  // (D)
      const Real* p = wpe + s * D;                      // (D)
      for (int64_t i = 0; i < D; ++i) o[i] = e[i] + p[i];
    }
}

template <class Real>
void encoder_backward(Real* dwte, Real* dwpe, const Real* dout, const int32_t* tokens, int64_t B,
                      int64_t S, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const Real* g = dout + (b * S + s) * D;
      Real* de = dwte + int64_t(tokens[b * S + s]) * D;
      Real* dp = dwpe + s * D;
      for (int64_t i = 0; i < D; ++i) {
        de[i] += g[i];
        dp[i] += g[i];
      }
    }
}

// ---------------------------------------------------------------------------------------------
// layernorm

template <class Real>
void layernorm_forward(Real* out, Real* mean, Real* rstd, const Real* inp, const Real* weight,
                       const Real* bias, int64_t N, int64_t D) {
  for (int64_t n = 0; n < N; ++n) {
    const Real* x = inp + n * D;  // (D)
    Real m = 0;
    for (int64_t i = 0; i < D; ++i) m += x[i];
    m /= Real(D);
    Real v = 0;
    for (int64_t i = 0; i < D; ++i) v += (x[i] - m) * (x[i] - m);
    v /= Real(D);
    const Real r = Real(1) / std::sqrt(v + Real(kLayerNormEps));
    Real* o = out + n * D;
    for (int64_t i = 0; i < D; ++i) o[i] = (x[i] - m) * r * weight[i] + bias[i];
    mean[n] = m;
    rstd[n] = r;
  }
}

template <class Real>
void layernorm_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp,
                        const Real* weight, const Real* mean, const Real* rstd, int64_t N,
                        int64_t D) {
  for (int64_t n = 0; n < N; ++n) {
    const Real* g = dout + n * D;
    const Real* x = inp + n * D;
    Real* dx = dinp + n * D;
    const Real m = mean[n], r = rstd[n];
    // dnorm = g * weight; dx = r * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    Real mean_dnorm = 0, mean_dnorm_norm = 0;
    for (int64_t i = 0; i < D; ++i) {
      const Real norm = (x[i] - m) * r;
      const Real dnorm = g[i] * weight[i];
      mean_dnorm += dnorm;
      mean_dnorm_norm += dnorm * norm;
    }
    mean_dnorm /= Real(D);
    mean_dnorm_norm /= Real(D);
    for (int64_t i = 0; i < D; ++i) {
      const Real norm = (x[i] - m) * r;
      const Real dnorm = g[i] * weight[i];
      dbias[i] += g[i];
      dweight[i] += norm * g[i];
      dx[i] += r * (dnorm - mean_dnorm - norm * mean_dnorm_norm);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// matmul (linear layer)

template <class Real>
void matmul_forward(Real* out, const Real* inp, const Real* weight, const Real* bias, int64_t N,
                    int64_t C, int64_t OC) {
  if (bias) {
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OC, out + n * OC);
  }
  cpu::gemm(false, false, N, OC, C, Real(1), inp, C, weight, OC, Real(bias ? 1 : 0), out, OC);
}

template <class Real>
void matmul_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp,
                     const Real* weight, int64_t N, int64_t C, int64_t OC) {
  // dinp (N,C) += dout (N,OC) * weight^T;  dweight (C,OC) += inp^T * dout;  dbias += sum_n dout
  cpu::gemm(false, true, N, C, OC, Real(1), dout, OC, weight, OC, Real(1), dinp, C);
  cpu::gemm(true, false, C, OC, N, Real(1), inp, C, dout, OC, Real(1), dweight, OC);
  if (dbias)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) dbias[o] += dout[n * OC + o];
}

// ---------------------------------------------------------------------------------------------
// causal multi-head attention

template <class Real>
void attention_forward(Real* out, Real* att, const Real* qkv, int64_t B, int64_t S, int64_t D,
                       int64_t NH) {
  const int64_t hs = D / NH, C3 = 3 * D;
  const Real scale = Real(1) / std::sqrt(Real(hs));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < S; ++t) {
        const Real* q = qkv + (b * S + t) * C3 + h * hs;   // (hs)
        Real* a = att + ((b * NH + h) * S + t) * S;       // (S) row t of this head
        Real maxv = -INFINITY;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const Real* k = qkv + (b * S + t2) * C3 + D + h * hs;
          Real dot = 0;
          for (int64_t i = 0; i < hs; ++i) dot += q[i] * k[i];
          a[t2] = dot * scale;
          maxv = std::max(maxv, a[t2]);
        }
        Real sum = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          a[t2] = std::exp(a[t2] - maxv);
          sum += a[t2];
        }
        const Real inv = Real(1) / sum;
        for (int64_t t2 = 0; t2 <= t; ++t2) a[t2] *= inv;
        for (int64_t t2 = t + 1; t2 < S; ++t2) a[t2] = 0;  // causal mask
        Real* o = out + (b * S + t) * D + h * hs;          // (hs)
        std::fill(o, o + hs, Real(0));
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const Real* v = qkv + (b * S + t2) * C3 + 2 * D + h * hs;
          for (int64_t i = 0; i < hs; ++i) o[i] += a[t2] * v[i];
        }
      }
}

template <class Real>
void attention_backward(Real* dqkv, Real* datt, const Real* dout, const Real* qkv, const Real* att,
                        int64_t B, int64_t S, int64_t D, int64_t NH) {
  const int64_t hs = D / NH, C3 = 3 * D;
  const Real scale = Real(1) / std::sqrt(Real(hs));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < S; ++t) {
        const Real* a = att + ((b * NH + h) * S + t) * S;  // (S)
        Real* da = datt + ((b * NH + h) * S + t) * S;      // (S)
        const Real* g = dout + (b * S + t) * D + h * hs;   // (hs)
        // out = sum_t2 a[t2] v[t2]:  da[t2] = g . v[t2];  dv[t2] += a[t2] g
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const Real* v = qkv + (b * S + t2) * C3 + 2 * D + h * hs;
          Real* dv = dqkv + (b * S + t2) * C3 + 2 * D + h * hs;
          Real dot = 0;
          for (int64_t i = 0; i < hs; ++i) {
            dot += g[i] * v[i];
            dv[i] += a[t2] * g[i];
          }
          da[t2] = dot;
        }
        // softmax: dscore[t2] = a[t2] * (da[t2] - sum_j a[j] da[j])
        Real inner = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) inner += a[t2] * da[t2];
        const Real* q = qkv + (b * S + t) * C3 + h * hs;
        Real* dq = dqkv + (b * S + t) * C3 + h * hs;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const Real ds = a[t2] * (da[t2] - inner) * scale;
          const Real* k = qkv + (b * S + t2) * C3 + D + h * hs;
          Real* dk = dqkv + (b * S + t2) * C3 + D + h * hs;
          for (int64_t i = 0; i < hs; ++i) {
            dq[i] += ds * k[i];
            dk[i] += ds * q[i];
          }
        }
      }
}

// ---------------------------------------------------------------------------------------------
// tied output head

template <class Real>
void output_forward(Real* logits, const Real* inp, const Real* wte, int64_t N, int64_t D,
                    int64_t V) {
  cpu::gemm(false, true, N, V, D, Real(1), inp, D, wte, D, Real(0), logits, V);
}

template <class Real>
void output_backward(Real* dinp, Real* dwte, const Real* dlogits, const Real* inp, const Real* wte,
                     int64_t N, int64_t D, int64_t V) {
  // dinp (N,D) += dlogits (N,V) * wte (V,D);  dwte (V,D) += dlogits^T * inp
  cpu::gemm(false, false, N, D, V, Real(1), dlogits, V, wte, D, Real(1), dinp, D);
  cpu::gemm(true, false, V, D, N, Real(1), dlogits, V, inp, D, Real(1), dwte, D);
}

// ---------------------------------------------------------------------------------------------
// softmax cross-entropy

template <class Real>
void crossentropy_forward(Real* losses, Real* probs, const Real* logits, const int32_t* targets,
                          int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n) {
    const Real* z = logits + n * V;  // (V)
    Real* p = probs + n * V;         // (V)
    Real maxv = z[0];
    for (int64_t v = 1; v < V; ++v) maxv = std::max(maxv, z[v]);
    Real sum = 0;
    for (int64_t v = 0; v < V; ++v) {
      p[v] = std::exp(z[v] - maxv);
      sum += p[v];
    }
    const Real inv = Real(1) / sum;
    for (int64_t v = 0; v < V; ++v) p[v] *= inv;
    // -log p[target] from the logits (exact even when p[target] underflows)
    losses[n] = std::log(sum) + maxv - z[targets[n]];
  }
}

template <class Real>
void crossentropy_backward(Real* dlogits, const Real* dlosses, const Real* probs,
                           const int32_t* targets, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n) {
    Real* dz = dlogits + n * V;
    const Real* p = probs + n * V;
    const Real g = dlosses[n];
    for (int64_t v = 0; v < V; ++v) dz[v] += (p[v] - (v == targets[n] ? Real(1) : Real(0))) * g;
  }
}

// ---------------------------------------------------------------------------------------------

#define MOE_INSTANTIATE(Real)                                                                     \
  template void encoder_forward<Real>(Real*, const int32_t*, const Real*, const Real*, int64_t,   \
                                      int64_t, int64_t);                                          \
  template void encoder_backward<Real>(Real*, Real*, const Real*, const int32_t*, int64_t,        \
                                       int64_t, int64_t);                                         \
  template void layernorm_forward<Real>(Real*, Real*, Real*, const Real*, const Real*,            \
                                        const Real*, int64_t, int64_t);                           \
  template void layernorm_backward<Real>(Real*, Real*, Real*, const Real*, const Real*,           \
                                         const Real*, const Real*, const Real*, int64_t, int64_t); \
  template void matmul_forward<Real>(Real*, const Real*, const Real*, const Real*, int64_t,       \
                                     int64_t, int64_t);                                           \
  template void matmul_backward<Real>(Real*, Real*, Real*, const Real*, const Real*, const Real*, \
                                      int64_t, int64_t, int64_t);                                 \
  template void attention_forward<Real>(Real*, Real*, const Real*, int64_t, int64_t, int64_t,     \
                                        int64_t);                                                 \
  template void attention_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*,     \
                                         int64_t, int64_t, int64_t, int64_t);                     \
  template void output_forward<Real>(Real*, const Real*, const Real*, int64_t, int64_t, int64_t); \
  template void output_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*,        \
                                      int64_t, int64_t, int64_t);                                 \
  template void crossentropy_forward<Real>(Real*, Real*, const Real*, const int32_t*, int64_t,    \
                                           int64_t);                                              \
  template void crossentropy_backward<Real>(Real*, const Real*, const Real*, const int32_t*,      \
                                            int64_t, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::model
