// defines: chain_step_config, ChainLayer (chain_of_experts as C Layer calls; see chain.hpp)
//
//   chain_forward_kernel   after iteration c: y += out, u += out (u_0 = x), u_{c+1} = bf16(u);
//                          after the last, y (bf16) = the sum
//   chain_backward_kernel  after iteration c's backward: a += d_in; the next upstream dy + a, or
//                          dx = a after iteration 0
//   chain_aux_kernel       the iterations' aux losses summed in iteration order
// Every element is owned by one thread: no atomics, the same bits every run.
#include "moe/cuda/chain.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"

namespace moe::cuda {

LayerConfig chain_step_config(const LayerConfig& chain) {
  MOE_CHECK(chain.router == Router::chain_of_experts,
            "chain_step_config: router must be chain_of_experts, got ", name(chain.router));
  chain.validate();
  LayerConfig c = chain;
  c.router = Router::softmax_topk;
  c.top_k = chain.choices_per_step();
  c.renormalize = false;  // the CPU renormalises softmax_topk only
  c.second_policy = SecondPolicy::all;
  c.aux_coef = chain.resolved_aux_coef();
  c.z_coef = chain.resolved_z_coef();
  c.iterations = 1;
  c.validate();
  return c;
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int kThreads = 256;
constexpr int kMaxIterations = 16;  // LayerConfig::validate's bound

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 4096));
}

// x non-null on the first iteration (u = x + out, y = out); u_next null on the last; y_out
// non-null on the last.
__global__ void chain_forward_kernel(const bf16* out, const bf16* x, float* u, float* y,
                                     bf16* u_next, bf16* y_out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float m = __bfloat162float(out[i]);
    const float s = x ? m : y[i] + m;
    if (y_out) y_out[i] = __float2bfloat16(s);
    else y[i] = s;
    if (u_next) {
      const float v = (x ? __bfloat162float(x[i]) : u[i]) + m;
      u[i] = v;
      u_next[i] = __float2bfloat16(v);
    }
  }
}

// first: a = d_in (the last iteration); upstream non-null: upstream = dy + a for the iteration
// below; dx non-null (iteration 0): dx = a.
__global__ void chain_backward_kernel(const bf16* d_in, float* a, const bf16* dy, bf16* upstream,
                                      bf16* dx, bool first, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = (first ? 0.f : a[i]) + __bfloat162float(d_in[i]);
    if (dx) {
      dx[i] = __float2bfloat16(v);
    } else {
      a[i] = v;
      upstream[i] = __float2bfloat16(__bfloat162float(dy[i]) + v);
    }
  }
}

struct AuxPointers {
  const double* p[kMaxIterations];
};

__global__ void chain_aux_kernel(AuxPointers in, int count, double* out) {
  double s = 0;
  for (int c = 0; c < count; ++c) s += *in.p[c];
  *out = s;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// ChainLayer
// ------------------------------------------------------------------------------------------------

ChainLayer::~ChainLayer() {
  steps_.clear();  // the layers go first: they use the handle, they do not own it
  if (own_cublas_) cublasDestroy(own_cublas_);
}

ChainLayer::ChainLayer(const LayerConfig& cfg, ExpertsBackend backend, GateUpLayout gate_up,
                       bool backward, cublasHandle_t cublas)
    : cfg_(cfg), backward_(backward) {
  MOE_CHECK(cfg.router == Router::chain_of_experts,
            "cuda::ChainLayer: router must be chain_of_experts, got ", name(cfg.router));
  cfg_.validate();
  const LayerConfig step = chain_step_config(cfg_);
  const int64_t C = cfg_.iterations;
  MOE_CHECK(C >= 1 && C <= kMaxIterations, "iterations must be in [1, ", kMaxIterations,
            "], got ", C);
  if (cublas == nullptr) {
    MOE_CUBLAS_CHECK(cublasCreate(&own_cublas_));
    cublas = own_cublas_;
  }
  for (int64_t c = 0; c < C; ++c) {
    LayerConfig sc = step;
    sc.seed = cfg_.seed + uint64_t(c);
    steps_.push_back(std::make_unique<Layer>(sc, backend, gate_up, backward, 1, cublas));
  }
  const size_t n = size_t(cfg_.tokens * cfg_.hidden), b = sizeof(bf16), f = sizeof(float);
  arena_ = DeviceArena({
      {"chain_inputs", size_t(C - 1) * n * b, reinterpret_cast<void**>(&inputs_)},
      {"chain_out|d_in", n * b, reinterpret_cast<void**>(&out_)},
      {"chain_u|a", n * f, reinterpret_cast<void**>(&u_)},
      {"chain_y", n * f, reinterpret_cast<void**>(&y_)},
      {"chain_upstream", (backward && C > 1 ? 1 : 0) * n * b,
       reinterpret_cast<void**>(&upstream_)},
      {"chain_aux", sizeof(double), reinterpret_cast<void**>(&aux_loss_)},
  });
}

size_t ChainLayer::bytes() const {
  size_t s = arena_.bytes();
  for (const auto& l : steps_) s += l->bytes();
  return s;
}

void ChainLayer::set_seed(uint64_t seed) {
  cfg_.seed = seed;
  for (size_t c = 0; c < steps_.size(); ++c) steps_[c]->set_seed(seed + c);
}

LayerWeights ChainLayer::step_weights(const LayerWeights& w, int64_t c) const {
  LayerWeights s = w;
  s.w_gate = w.w_gate + c * cfg_.hidden * cfg_.experts;
  return s;
}

void ChainLayer::forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream) {
  const int64_t C = iterations(), n = cfg_.tokens * cfg_.hidden;
  const size_t nd = size_t(n);
  for (int64_t c = 0; c < C; ++c) {
    const bf16* in = c == 0 ? x : inputs_ + size_t(c - 1) * nd;
    steps_[size_t(c)]->forward(in, step_weights(w, c), out_, stream);
    const bool last = c + 1 == C;
    if (n > 0) {
      chain_forward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
          out_, c == 0 ? x : nullptr, u_, y_, last ? nullptr : inputs_ + size_t(c) * nd,
          last ? y : nullptr, n);
      MOE_CUDA_LAUNCH_CHECK();
    }
  }
  AuxPointers p{};
  for (int64_t c = 0; c < C; ++c) p.p[c] = steps_[size_t(c)]->aux_loss();
  chain_aux_kernel<<<1, 1, 0, stream>>>(p, int(C), aux_loss_);
  MOE_CUDA_LAUNCH_CHECK();
}

void ChainLayer::backward(const bf16* x, const LayerWeights& w, const bf16* dy,
                          const LayerGrads& g, cudaStream_t stream) {
  MOE_CHECK(backward_, "cuda::ChainLayer::backward: built with backward = false");
  const int64_t C = iterations(), n = cfg_.tokens * cfg_.hidden;
  const size_t nd = size_t(n);
  const int64_t HE = cfg_.hidden * cfg_.experts;
  for (int64_t c = C - 1; c >= 0; --c) {
    const bf16* in = c == 0 ? x : inputs_ + size_t(c - 1) * nd;
    LayerGrads gc = g;
    gc.dx = c == 0 && C == 1 ? g.dx : out_;  // one iteration: dx is d_in itself
    gc.dw_gate = g.dw_gate + c * HE;
    // the shared pool's gradient sums the iterations: only the first one run may write it fresh
    gc.accumulate_experts = c == C - 1 ? g.accumulate_experts : true;
    steps_[size_t(c)]->backward(in, step_weights(w, c), c == C - 1 ? dy : upstream_, gc, stream);
    if (C == 1 || n == 0) continue;
    // upstream_ is read by this iteration's backward above and rewritten here for the next:
    // stream order separates them.
    chain_backward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        out_, u_, dy, c == 0 ? nullptr : upstream_, c == 0 ? g.dx : nullptr, c == C - 1, n);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

LoadStats chain_stats(const std::vector<LoadStats>& steps, const std::vector<int64_t>& choices) {
  MOE_CHECK(!steps.empty() && steps.size() == choices.size(),
            "chain_stats: one choice count per iteration needed");
  const double C = double(steps.size());
  LoadStats s;
  s.tokens_per_expert.assign(steps[0].tokens_per_expert.size(), 0.0);
  int64_t dropped = 0, total = 0;
  for (size_t c = 0; c < steps.size(); ++c) {
    const LoadStats& st = steps[c];
    for (size_t e = 0; e < s.tokens_per_expert.size(); ++e)
      s.tokens_per_expert[e] += st.tokens_per_expert[e];
    // drop_rate is an integer count over N: recover the count, so that the chain's rate is the
    // CPU's dropped / choices over all iterations rather than a mean of ratios
    dropped += std::llround(st.drop_rate * double(choices[c]));
    total += choices[c];
    s.router_entropy += st.router_entropy;
    s.mean_entropy += st.mean_entropy;
    s.tokens_without_expert += st.tokens_without_expert;
  }
  s.router_entropy /= C;
  s.mean_entropy /= C;
  s.tokens_without_expert /= C;
  s.drop_rate = total > 0 ? double(dropped) / double(total) : 0;
  fill_balance(s);
  return s;
}

LoadStats ChainLayer::stats() const {
  std::vector<LoadStats> steps;
  std::vector<int64_t> choices;
  for (const auto& l : steps_) {
    steps.push_back(l->stats());
    choices.push_back(l->plan_shape().choices);
  }
  return chain_stats(steps, choices);
}

}  // namespace moe::cuda
