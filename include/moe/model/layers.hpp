// defines: moe::model — encoder_forward/backward, layernorm_forward/backward,
//          matmul_forward/backward, attention_forward/backward, output_forward/backward,
//          crossentropy_forward/backward
// The transformer's own layer kinds on the CPU, in the llm.c manner: one forward/backward pair per
// kind, plain loops over row-major buffers whose shapes are written beside them, cblas GEMMs for
// the matrix products. B batch rows, S positions, D model width, NH heads (head size D/NH),
// N = B*S tokens, V vocabulary. Templated on float (training) and double (gradient checks).
//
// One convention for every backward: it ADDS into its gradient outputs (weights and activations
// alike), so the caller zeroes them once per step and a tensor used twice (the tied embedding,
// the residual stream) collects both contributions without copies.
#pragma once
#include <cstdint>

namespace moe::model {

// out (B,S,D) = wte[tokens[b,s]] + wpe[s];  tokens (B,S), wte (V,D), wpe (>=S,D)
template <class Real>
void encoder_forward(Real* out, const int32_t* tokens, const Real* wte, const Real* wpe,
                     int64_t B, int64_t S, int64_t D);
template <class Real>
void encoder_backward(Real* dwte, Real* dwpe, const Real* dout, const int32_t* tokens, int64_t B,
                      int64_t S, int64_t D);

// out (N,D) = (inp - mean) * rstd * weight + bias, per row; mean, rstd (N) kept for backward.
inline constexpr double kLayerNormEps = 1e-5;
template <class Real>
void layernorm_forward(Real* out, Real* mean, Real* rstd, const Real* inp, const Real* weight,
                       const Real* bias, int64_t N, int64_t D);
template <class Real>
void layernorm_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp,
                        const Real* weight, const Real* mean, const Real* rstd, int64_t N,
                        int64_t D);

// out (N,OC) = inp (N,C) * weight (C,OC) + bias (OC); bias may be null.
template <class Real>
void matmul_forward(Real* out, const Real* inp, const Real* weight, const Real* bias, int64_t N,
                    int64_t C, int64_t OC);
template <class Real>
void matmul_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp,
                     const Real* weight, int64_t N, int64_t C, int64_t OC);

// Causal multi-head self-attention. qkv (B,S,3D) holds [q | k | v] per token, head h in columns
// h*hs .. h*hs+hs-1 of each; out (B,S,D); att (B,NH,S,S) the softmax probabilities (zero above
// the diagonal), kept for backward. Scores are scaled by 1/sqrt(hs).
template <class Real>
void attention_forward(Real* out, Real* att, const Real* qkv, int64_t B, int64_t S, int64_t D,
                       int64_t NH);
// datt (B,NH,S,S) is scratch (overwritten).
template <class Real>
void attention_backward(Real* dqkv, Real* datt, const Real* dout, const Real* qkv, const Real* att,
                        int64_t B, int64_t S, int64_t D, int64_t NH);

// Output head tied to the byte embedding: logits (N,V) = inp (N,D) * wte^T, wte (V,D).
template <class Real>
void output_forward(Real* logits, const Real* inp, const Real* wte, int64_t N, int64_t D,
                    int64_t V);
template <class Real>
void output_backward(Real* dinp, Real* dwte, const Real* dlogits, const Real* inp, const Real* wte,
                     int64_t N, int64_t D, int64_t V);

// losses (N) = -log softmax(logits)[target] in nats; probs (N,V) the softmax, kept for backward.
template <class Real>
void crossentropy_forward(Real* losses, Real* probs, const Real* logits, const int32_t* targets,
                          int64_t N, int64_t V);
// dlogits (N,V) += (probs - onehot(target)) * dlosses[n]
template <class Real>
void crossentropy_backward(Real* dlogits, const Real* dlosses, const Real* probs,
                           const int32_t* targets, int64_t N, int64_t V);

}  // namespace moe::model
