// moe::cuda::Layer: the stages of include/moe/cuda/*.hpp chained on one stream (see layer.hpp).
#include "moe/cuda/layer.hpp"

#include <algorithm>
#include <cstdio>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/combine.hpp"
#include "moe/cuda/gate.hpp"
#include "moe/cuda/permute.hpp"
#include "moe/cuda/stats.hpp"

namespace moe::cuda {

const char* name(LayerStage s) {
  switch (s) {
    case LayerStage::gate: return "gate";
    case LayerStage::route: return "route";
    case LayerStage::plan: return "plan";
    case LayerStage::permute: return "permute";
    case LayerStage::experts: return "experts";
    case LayerStage::combine: return "combine";
    default: return "?";
  }
}

const char* name(LayerBackwardStage s) {
  switch (s) {
    case LayerBackwardStage::combine: return "combine";
    case LayerBackwardStage::experts: return "experts";
    case LayerBackwardStage::permute: return "permute";
    case LayerBackwardStage::route: return "route";
    case LayerBackwardStage::gate: return "gate";
    default: return "?";
  }
}

namespace {

LayerConfig checked(const LayerConfig& cfg, int64_t groups) {
  cfg.validate();
  MOE_CHECK(cfg.router == Router::softmax_topk || cfg.router == Router::sigmoid_bias ||
                cfg.router == Router::switch_top1 || cfg.router == Router::noisy_topk ||
                cfg.router == Router::expert_choice,
            "cuda::Layer: router must be softmax_topk, noisy_topk, sigmoid_bias, switch_top1 or "
            "expert_choice (chain_of_experts: cuda::ChainLayer)");
  MOE_CHECK(cfg.shared_experts == 0, "cuda::Layer: shared_experts must be 0");
  MOE_CHECK(groups == 1 || cfg.router == Router::expert_choice,
            "cuda::Layer: groups must be 1 for ", name(cfg.router), ", got ", groups);
  MOE_CHECK(groups >= 1 && cfg.tokens % groups == 0, "cuda::Layer: groups (", groups,
            ") must be >= 1 and divide tokens (", cfg.tokens, ")");
  return cfg;
}

// Expert choice: N = E*G*C choices (C per group); every expert takes exactly G*C of them, which is
// also the padded layout's capacity (nothing is dropped, as in each of the CPU's group calls).
PlanShape plan_shape_of(const LayerConfig& cfg, int64_t groups) {
  const bool ec = cfg.router == Router::expert_choice;
  const int64_t per_expert = ec ? groups * ec_group_capacity(cfg, groups) : 0;
  PlanShape s;
  s.tokens = cfg.tokens;
  s.experts = cfg.experts;
  s.top_k = ec ? 0 : cfg.choices_per_step();
  s.choices = ec ? cfg.experts * per_expert : cfg.tokens * s.top_k;
  s.layout = cfg.layout;
  s.capacity = cfg.layout == Layout::padded ? (ec ? per_expert : cfg.capacity()) : 0;
  s.block_size = cfg.layout == Layout::block ? cfg.block_size : 1;
  s.validate();
  return s;
}

bool aliases(ExpertsBackend backend, bool backward) {
  return backward &&
         (backend == ExpertsBackend::grouped || backend == ExpertsBackend::grouped_fused);
}

// Whether pre is written: the fused up-projection without a backward writes act alone.
bool keeps_pre(ExpertsBackend backend, bool backward) {
  return backward || backend != ExpertsBackend::grouped_fused;
}

// Whether the router-weight gradient comes from the da GEMM's row dots (combine backward then
// writes dyp only and never reads yp): the fused da GEMM has them.
bool dots_in_da(ExpertsBackend backend, bool backward) {
  return backward && backend == ExpertsBackend::grouped_fused;
}

// Whether the up-projection gathers x's rows itself (no permute pass, no xp; with a backward,
// dw_up gathers them too): grouped backends only; see RowSource for when it pays.
bool gathers(const LayerConfig& cfg, ExpertsBackend backend, bool backward, RowSource rows) {
  rows = resolve_rows(cfg, backend, backward, rows);
  MOE_CHECK(rows != RowSource::gathered || backend == ExpertsBackend::grouped ||
                backend == ExpertsBackend::grouped_fused,
            "cuda::Layer: RowSource::gathered needs a grouped backend (grouped or grouped_fused)");
  return rows == RowSource::gathered;
}

bool has_jitter(const LayerConfig& cfg) {
  return cfg.router == Router::switch_top1 && cfg.training && cfg.jitter > 0;
}

// w_gate in fp32 for the jittered gate GEMM (cuBLAS multiplies operands of one type).
__global__ void widen_kernel(const bf16* in, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

void widen(const bf16* in, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 1024));
  widen_kernel<<<blocks, 256, 0, stream>>>(in, n, out);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace

RowSource resolve_rows(const LayerConfig& cfg, ExpertsBackend backend, bool backward,
                       RowSource rows) {
  if (rows != RowSource::automatic) return rows;
  if (backend != ExpertsBackend::grouped_fused || backward) return RowSource::permuted;
  if (cfg.activation == Activation::swiglu)  // the activation runs under the next tile's mainloop
    return cfg.tokens * cfg.top_k < 128 * cfg.experts ? RowSource::gathered : RowSource::permuted;
  return cfg.inter <= 32 * 256 ? RowSource::gathered : RowSource::permuted;
}

const char* name(RowSource rows) {
  switch (rows) {
    case RowSource::permuted: return "permuted";
    case RowSource::gathered: return "gathered";
    case RowSource::automatic: return "automatic";
  }
  return "?";
}

size_t Layer::arena_bytes(const LayerConfig& c, ExpertsBackend backend, bool backward,
                          int64_t groups, RowSource rows) {
  const LayerConfig cfg = checked(c, groups);
  const PlanShape ps = plan_shape_of(cfg, groups);
  const size_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, I = cfg.inter;
  const size_t R = ps.max_rows(), N = ps.choices;
  const size_t A = cfg.activation == Activation::swiglu ? 2 * I : I;
  const size_t b = sizeof(bf16), f = sizeof(float), bw = backward ? 1 : 0;
  const size_t xp = gathers(cfg, backend, backward, rows) ? 0 : 1;
  const size_t pre = keeps_pre(backend, backward) ? 1 : 0;
  size_t bytes = T * E * f + R * (xp * H + pre * A + I + H) * b;  // logits, xp, pre, act, yp
  bytes += bw * (N * f + T * E * (f + b));             // dweight, dz, dz_bf16
  if (dots_in_da(backend, backward)) bytes += row_dot_parts(I) * R * f;  // row_dot
  if (cfg.router == Router::noisy_topk) bytes += (1 + bw) * T * E * f;  // noise_raw, dr
  if (has_jitter(cfg)) bytes += (T * H + H * E) * f;                    // x_router, w_gate_f32
  if (backward && !aliases(backend, backward)) bytes += R * (H + I + A) * b;  // dyp, da, dpre
  return bytes;
}

Layer::Layer(const LayerConfig& cfg, ExpertsBackend backend, GateUpLayout gate_up, bool backward,
             int64_t groups, cublasHandle_t cublas, RowSource rows)
    : cfg_(checked(cfg, groups)),
      backward_(backward),
      groups_(groups),
      route_(cfg_, groups),
      plan_(plan_shape_of(cfg_, groups)) {
  const int64_t T = cfg_.tokens, H = cfg_.hidden, E = cfg_.experts, I = cfg_.inter;
  const int64_t R = plan_.shape().max_rows(), N = plan_.shape().choices;
  ExpertsShape es;
  es.experts = E;
  es.hidden = H;
  es.inter = I;
  es.activation = cfg_.activation;
  es.max_rows = R;
  es.gate_up = gate_up;
  es.validate();
  const int64_t A = es.up_width();
  alias_ = aliases(backend, backward);
  dots_in_da_ = dots_in_da(backend, backward);
  gather_ = gathers(cfg_, backend, backward, rows);
  keep_pre_ = keeps_pre(backend, backward);
  noisy_ = cfg_.router == Router::noisy_topk;
  jitter_ = has_jitter(cfg_);
  experts_ = std::make_unique<ExpertsWorkspace>(es, backend, backward, /*own_scratch=*/!alias_);
  own_cublas_ = cublas == nullptr;
  if (own_cublas_) MOE_CUBLAS_CHECK(cublasCreate(&cublas_));
  else cublas_ = cublas;
  const size_t b = sizeof(bf16), f = sizeof(float);
  const size_t bw = backward ? 1 : 0;
  arena_ = DeviceArena({
      {"logits", size_t(T * E) * f, reinterpret_cast<void**>(&logits_)},
      {"xp", (gather_ ? 0 : 1) * size_t(R * H) * b, reinterpret_cast<void**>(&xp_)},
      {"pre", (keep_pre_ ? 1 : 0) * size_t(R * A) * b, reinterpret_cast<void**>(&pre_)},
      {"act", size_t(R * I) * b, reinterpret_cast<void**>(&act_)},
      {alias_ ? "yp|dyp|dxp" : "yp|dxp", size_t(R * H) * b, reinterpret_cast<void**>(&yp_)},
      {"dyp", (alias_ ? 0 : bw) * size_t(R * H) * b, reinterpret_cast<void**>(&dyp_)},
      {"dweight", bw * size_t(N) * f, reinterpret_cast<void**>(&dweight_)},
      {"row_dot", (dots_in_da_ ? 1 : 0) * size_t(row_dot_parts(I) * R) * f,
       reinterpret_cast<void**>(&row_dot_)},
      {"dz", bw * size_t(T * E) * f, reinterpret_cast<void**>(&dz_)},
      {"dz_bf16", bw * size_t(T * E) * b, reinterpret_cast<void**>(&dz_bf16_)},
      {"noise_raw", (noisy_ ? 1 : 0) * size_t(T * E) * f, reinterpret_cast<void**>(&noise_raw_)},
      {"dr", (noisy_ ? bw : 0) * size_t(T * E) * f, reinterpret_cast<void**>(&dr_)},
      {"x_router", (jitter_ ? 1 : 0) * size_t(T * H) * f, reinterpret_cast<void**>(&x_router_)},
      {"w_gate_f32", (jitter_ ? 1 : 0) * size_t(H * E) * f,
       reinterpret_cast<void**>(&w_gate_f32_)},
  });
  if (alias_) dyp_ = yp_;
  stats_ = StatsBuffers(T, E, groups_);
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
}

Layer::~Layer() {
  if (join_) cudaEventDestroy(join_);
  if (fork_) cudaEventDestroy(fork_);
  if (side_) cudaStreamDestroy(side_);
  if (own_cublas_ && cublas_) cublasDestroy(cublas_);
}

size_t Layer::bytes() const {
  return arena_.bytes() + route_.arena.bytes() + route_.routing.arena.bytes() + plan_.bytes() +
         experts_->bytes() + stats_.arena.bytes();
}

LayerConfig Layer::forward_config() const {
  LayerConfig c = cfg_;
  c.seed = forward_seed_;
  return c;
}

LoadStats Layer::stats() const {
  MOE_CHECK(has_forward_, "cuda::Layer::stats: call forward first");
  return load_stats(route_.probs, plan_.view(), stats_, stream_);
}

void Layer::update_expert_bias(float* expert_bias, cudaStream_t stream) const {
  if (cfg_.router != Router::sigmoid_bias || !cfg_.training) return;
  MOE_CHECK(has_forward_, "cuda::Layer::update_expert_bias: call forward first");
  moe::cuda::update_expert_bias(plan_.view(), cfg_.top_k, cfg_.bias_update_rate, expert_bias,
                                stream);
}

std::string Layer::report() const {
  char buf[160];
  std::snprintf(buf, sizeof buf, " | route %.2f MiB | plan %.2f MiB | experts %.2f MiB",
                (route_.arena.bytes() + route_.routing.arena.bytes()) / double(1 << 20),
                plan_.bytes() / double(1 << 20), experts_->bytes() / double(1 << 20));
  return "activations " + arena_.report() + buf;
}

void Layer::forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream,
                    cudaEvent_t* events, cudaEvent_t* expert_events) {
  const int64_t T = cfg_.tokens, H = cfg_.hidden, E = cfg_.experts;
  auto mark = [&](LayerStage s) {
    if (events) MOE_CUDA_CHECK(cudaEventRecord(events[int(s)], stream));
  };
  MOE_CHECK(!noisy_ || w.w_noise, "cuda::Layer::forward: noisy_topk needs w.w_noise (H, E)");
  forward_seed_ = cfg_.seed;
  stream_ = stream;
  has_forward_ = true;
  mark(LayerStage::gate);
  if (jitter_) {  // logits = (x * jitter) w_gate in fp32 (layer.hpp)
    jitter_input<bf16, float>(x, T * H, cfg_.seed, cfg_.jitter, x_router_, stream);
    widen(w.w_gate, H * E, w_gate_f32_, stream);
    gate_forward<float>(cublas_, x_router_, w_gate_f32_, T, H, E, logits_, stream);
  } else {
    gate_forward<bf16>(cublas_, x, w.w_gate, T, H, E, logits_, stream);
  }
  if (noisy_) gate_forward<bf16>(cublas_, x, w.w_noise, T, H, E, noise_raw_, stream);
  mark(LayerStage::route);
  if (events) {
    route_forward(cfg_, 0, logits_, noise_raw_, w.expert_bias, route_, stream);
  } else {
    // Nothing in this forward reads the auxiliary losses: their per-chunk sums (a grid of
    // T / 256 blocks and a one-block finalize, latency-bound) run beside plan, permute and the
    // experts, which leave the SMs room, instead of before them. Joined at the end.
    route_choices(cfg_, 0, logits_, noise_raw_, w.expert_bias, route_, stream);
    MOE_CUDA_CHECK(cudaEventRecord(fork_, stream));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(side_, fork_));
    route_aux_losses(cfg_, 0, logits_, noise_raw_, w.expert_bias, route_, side_);
    MOE_CUDA_CHECK(cudaEventRecord(join_, side_));
  }
  mark(LayerStage::plan);
  const RoutingView rv = route_.routing.view();
  plan_forward(rv, plan_.view(), stream);
  mark(LayerStage::permute);
  if (!gather_) permute_forward<bf16>(plan_.view(), x, H, xp_, stream);
  mark(LayerStage::experts);
  ExpertsForwardArgs ea;
  ea.offsets = plan_.view().offsets;
  ea.w_up = w.w_up;
  ea.w_down = w.w_down;
  if (gather_) {
    ea.x = x;
    ea.row_token = plan_.view().row_token;
    ea.tokens = T;
  } else {
    ea.xp = xp_;
  }
  ea.pre = keep_pre_ ? pre_ : nullptr;
  ea.act = act_;
  ea.yp = yp_;
  experts_forward(*experts_, ea, stream, expert_events);
  mark(LayerStage::combine);
  combine_forward<bf16>(plan_.view(), rv, yp_, H, y, stream);
  if (!events) MOE_CUDA_CHECK(cudaStreamWaitEvent(stream, join_));
  mark(LayerStage::count);
}

void Layer::backward(const bf16* x, const LayerWeights& w, const bf16* dy, const LayerGrads& g,
                     cudaStream_t stream, cudaEvent_t* events, cudaEvent_t* expert_events) {
  auto mark = [&](LayerBackwardStage s) {
    if (events) MOE_CUDA_CHECK(cudaEventRecord(events[int(s)], stream));
  };
  MOE_CHECK(backward_, "cuda::Layer::backward: built with backward = false");
  MOE_CHECK(!noisy_ || (w.w_noise && g.dw_noise),
            "cuda::Layer::backward: noisy_topk needs w.w_noise and g.dw_noise (H, E)");
  const int64_t T = cfg_.tokens, H = cfg_.hidden, E = cfg_.experts;
  const LayerConfig c = forward_config();
  const RoutingView rv = route_.routing.view();
  // combine: dyp = weight * dy (grouped: in place over yp), dweight = <dy, yp>; grouped_fused:
  // dyp only, dweight from the da GEMM's row dots below
  mark(LayerBackwardStage::combine);
  if (dots_in_da_)
    combine_backward<bf16>(plan_.view(), rv, nullptr, dy, H, dyp_, nullptr, stream);
  else
    combine_backward<bf16>(plan_.view(), rv, yp_, dy, H, dyp_, dweight_, stream);
  // experts: dw_down, dxp (into yp's storage: yp is dead; grouped: so is dyp once da is made),
  // dw_up; grouped: da into act, dpre into pre (layer.hpp)
  bf16* dxp = yp_;
  ExpertsBackwardArgs eb;
  eb.offsets = plan_.view().offsets;
  eb.w_up = w.w_up;
  eb.w_down = w.w_down;
  if (gather_) {  // dw_up gathers x's rows as the up-projection did: there is no xp
    eb.x = x;
    eb.row_token = plan_.view().row_token;
    eb.tokens = T;
  } else {
    eb.xp = xp_;
  }
  eb.pre = pre_;
  eb.act = act_;
  eb.dyp = dyp_;
  eb.dxp = dxp;
  eb.dw_up = g.dw_up;
  eb.dw_down = g.dw_down;
  eb.accumulate = g.accumulate_experts;
  eb.dw_up_bf16 = g.dw_up_bf16;
  eb.dw_down_bf16 = g.dw_down_bf16;
  if (alias_) {
    eb.da = act_;
    eb.dpre = pre_;
  }
  eb.row_dot = row_dot_;
  mark(LayerBackwardStage::experts);
  experts_backward(*experts_, eb, stream, expert_events);
  // permute: dx = sum of the token's dxp rows (written, not added to: dx starts here)
  mark(LayerBackwardStage::permute);
  permute_backward<bf16>(plan_.view(), dxp, H, g.dx, stream, /*accumulate=*/false);
  // route: dweight -> dz (aux-loss and z-loss gradients included); noisy_topk: dr, with the
  // forward's noise
  mark(LayerBackwardStage::route);
  if (dots_in_da_)
    combine_dweight_from_row_dots(plan_.view(), rv, row_dot_, row_dot_parts(cfg_.inter),
                                  plan_.shape().max_rows(), dweight_, stream);
  route_backward(c, 0, route_, logits_, noise_raw_, dweight_, dz_, dr_, stream);
  mark(LayerBackwardStage::gate);
  if (jitter_) {
    // dW_gate += x_router^T dz (fp32), then x_router is dead: it takes dz W^T (fp32), and
    // dx += (dz W^T) * jitter
    widen(w.w_gate, H * E, w_gate_f32_, stream);
    gate_backward<float>(cublas_, x_router_, w_gate_f32_, dz_, T, H, E, g.dw_gate, nullptr,
                         nullptr, stream);
    MOE_CUDA_CHECK(cudaMemsetAsync(x_router_, 0, size_t(T * H) * sizeof(float), stream));
    gate_backward<float>(cublas_, nullptr, w_gate_f32_, dz_, T, H, E, nullptr, x_router_,
                         nullptr, stream);
    jitter_backward<float, bf16>(x_router_, T * H, c.seed, c.jitter, g.dx, stream);
  } else {
    // gate: dW_gate += x^T dz, dx += dz W^T
    gate_backward<bf16>(cublas_, x, w.w_gate, dz_, T, H, E, g.dw_gate, g.dx, dz_bf16_, stream);
  }
  // noisy_topk: dW_noise += x^T dr, dx += dr W_noise^T (dz_bf16 is free again: stream order)
  if (noisy_)
    gate_backward<bf16>(cublas_, x, w.w_noise, dr_, T, H, E, g.dw_noise, g.dx, dz_bf16_, stream);
  mark(LayerBackwardStage::count);
}

}  // namespace moe::cuda
