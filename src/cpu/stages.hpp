// defines: the CPU stage functions the layer is built from (internal to libmoe)
//   route_forward / route_backward   gate GEMM + router (token choice and expert choice)
//   permute_forward / permute_backward, experts_forward / experts_backward,
//   combine_forward / combine_backward, soft_moe_forward / soft_moe_backward,
//   soft_moe_scale_grad_magnitude_sq (the parity tolerance of the slot scale's gradient)
// Activation-gradient outputs are written (=), parameter gradients are accumulated (+=), so
// chain_of_experts iterations and shared experts can add into the same buffers.
#pragma once
#include <cstdint>

#include "moe/config.hpp"
#include "moe/layer.hpp"

namespace moe::cpu {

template <class Real>
void route_forward(const LayerConfig& cfg, const Params<Real>& p, int64_t step, const Real* x,
                   RouteStep<Real>& s, StageTimes* times);
// d_weight (N): gradient of the objective w.r.t. each choice's combine weight (0 when dropped).
// Adds the router's input gradient into dx (T, H) and parameter gradients into g.
template <class Real>
void route_backward(const LayerConfig& cfg, const Params<Real>& p, int64_t step,
                    const RouteStep<Real>& s, const Real* d_weight, Real* dx, Params<Real>& g);

template <class Real>
void permute_forward(const DispatchPlan& plan, const Real* x, int64_t hidden, Real* xp);
// dx (T, H) += each token's rows in choice order.
template <class Real>
void permute_backward(const DispatchPlan& plan, const Real* dxp, int64_t hidden, Real* dx);

// Expert FFN over segments [offsets[e], offsets[e+1]) of rows; pre (M, A), act (M, I), out (M, H).
template <class Real>
void experts_forward(const LayerConfig& cfg, const int64_t* offsets, int64_t num_experts,
                     const Real* w_up, const Real* w_down, const Real* in, Real* pre, Real* act,
                     Real* out);
// d_in (M, H) written; dw_up, dw_down accumulated.
template <class Real>
void experts_backward(const LayerConfig& cfg, const int64_t* offsets, int64_t num_experts,
                      const Real* w_up, const Real* w_down, const Real* in, const Real* pre,
                      const Real* act, const Real* d_out, Real* d_in, Real* dw_up, Real* dw_down);

// y[t] = sum over the token's kept rows (choice order) of weight * yp[row]; y is written.
template <class Real>
void combine_forward(const DispatchPlan& plan, const Routing<Real>& routing, const Real* yp,
                     int64_t hidden, Real* y);
// dyp[row] = weight * dy[token] (padding rows 0); d_weight[c] = <dy[token], yp[row]> (0 dropped).
template <class Real>
void combine_backward(const DispatchPlan& plan, const Routing<Real>& routing, const Real* yp,
                      const Real* dy, int64_t hidden, Real* dyp, Real* d_weight);

template <class Real>
void soft_moe_forward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                      SoftStep<Real>& s, Real* y, StageTimes* times);
template <class Real>
void soft_moe_backward(const LayerConfig& cfg, const Params<Real>& p, const Real* x,
                       const SoftStep<Real>& s, const Real* dy, Real* dx, Params<Real>& g);

// What the slot scale's gradient sums, for a tolerance on it (parity checks and tests): with
// u = logits / scale, d scale = sum_i dL_i u_i and dL = D (dD - a_j) + C (dC - b_t), where the
// column dots are a_j = <D[:, j], dD[:, j]> and the row dots b_t = <C[t, :], dC[t, :]>. Both
// softmax backwards cancel, so the sum's error is bounded by the size of what goes into it, not
// by the sum: m_i = |u_i| (D_i (|dD_i| + |a_j| + sum_t |D dD|) + C_i (|dC_i| + |b_t| +
// sum_j |C dC|)). Returns sum_i m_i^2 over the (tokens, slots) entries; a tolerance is a multiple
// of its square root (bf16: one rounding of D and C, 2^-9 relative, lands near 4e-3 ||m|| at worst
// in 60 seeds of a NumPy model of this path).
double soft_moe_scale_grad_magnitude_sq(int64_t tokens, int64_t slots, const double* dispatch,
                                        const double* d_dispatch, const double* combine,
                                        const double* d_combine, const double* logits,
                                        double scale);

}  // namespace moe::cpu
