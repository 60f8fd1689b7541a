// defines: parity_cases, parity_shape, parity_routing, check_plan, check_rows
// GPU stages vs the CPU reference stages (src/cpu), shared by tests/cuda and `moe-bench check`.
#include "moe/cuda/parity.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>

#include "cpu/stages.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/combine.hpp"
#include "moe/cuda/permute.hpp"
#include "moe/cuda/routing.hpp"
#include "moe/rng.hpp"

namespace moe::cuda {

// ------------------------------------------------------------------------------------------------
// cases
// ------------------------------------------------------------------------------------------------

std::vector<ParityCase> parity_cases() {
  const Layout D = Layout::dropless, P = Layout::padded, B = Layout::block;
  const Skew U = Skew::uniform, Z = Skew::zipf, O = Skew::one_expert;
  return {
      {"t0_dropless", 0, 4, 2, U, D},
      {"t1_e1_k1", 1, 1, 1, U, D},
      {"t1_k_eq_e_padded", 1, 7, 7, U, P, 1.0},
      {"t1_k_eq_e_block", 1, 7, 7, U, B, 1.0, 4},
      {"e6_uniform_dropless", 1000, 6, 2, U, D},
      {"e6_uniform_padded_cf1", 1000, 6, 2, U, P, 1.0},
      {"e6_uniform_block4", 1000, 6, 2, U, B, 1.0, 4},
      {"e13_zipf_padded", 3000, 13, 3, Z, P, 1.25},
      {"e13_zipf_block8", 3000, 13, 3, Z, B, 1.0, 8},
      {"one_expert_k1_padded", 777, 10, 1, O, P, 1.0},
      {"one_expert_k1_dropless", 777, 10, 1, O, D},
      {"one_expert_k2_block128", 777, 10, 2, O, B, 1.0, 128},
      {"k_eq_e_dropless", 50, 5, 5, U, D},
      {"k_eq_e_padded", 50, 5, 5, Z, P, 0.5},
      {"k_eq_e_40_block", 9, 40, 40, U, B, 1.0, 3},
      {"skipped_second_choice_padded", 500, 8, 2, U, P, 1.0, 4, 0.3},
      {"skipped_second_choice_dropless", 500, 8, 2, Z, D, 1.0, 4, 0.5},
      {"e4096_k8", 300, 4096, 8, U, D},
      {"e1000_zipf_padded", 2000, 1000, 4, Z, P, 2.0},
      {"expert_choice_t1", 1, 3, 0, U, P, 1.0},
      {"expert_choice_e12", 500, 12, 0, U, P, 1.25},
      {"expert_choice_all_tokens", 64, 7, 0, U, P, 7.0},
      {"expert_choice_e100", 3000, 100, 0, U, P, 2.0},
      {"expert_choice_block8", 500, 12, 0, U, B, 1.1, 8},
      {"expert_choice_dropless", 300, 33, 0, U, D, 1.5},
      {"t16384_e128_k2_dropless", 16384, 128, 2, U, D, 1.25, 4, 0, true},
      {"t16384_e128_k2_zipf_padded", 16384, 128, 2, Z, P, 1.25, 4, 0, true},
      {"t40000_e64_k4_zipf_block128", 40000, 64, 4, Z, B, 1.0, 128, 0, true},
  };
}

int64_t parity_capacity(const ParityCase& c) {
  if (c.top_k == 0)
    return std::min<int64_t>(
        c.tokens, static_cast<int64_t>(std::ceil(c.capacity_factor * c.tokens / c.experts - 1e-9)));
  if (c.layout != Layout::padded) return 0;
  return static_cast<int64_t>(std::ceil(c.capacity_factor * c.tokens * c.top_k / c.experts - 1e-9));
}

PlanShape parity_shape(const ParityCase& c) {
  PlanShape s;
  s.tokens = c.tokens;
  s.experts = c.experts;
  s.top_k = c.top_k;
  s.choices = c.top_k ? c.tokens * c.top_k : c.experts * parity_capacity(c);
  s.layout = c.layout;
  s.capacity = parity_capacity(c);  // padded rows per expert (expert choice: its C)
  s.block_size = c.block_size;
  return s;
}

Routing<float> parity_routing(const ParityCase& c, uint64_t seed) {
  if (c.top_k == 0) return synthetic_expert_choice(c.tokens, c.experts, parity_capacity(c), seed);
  SyntheticRouting s;
  s.tokens = c.tokens;
  s.experts = c.experts;
  s.top_k = c.top_k;
  s.skew = c.skew;
  s.no_expert_fraction = c.no_expert;
  s.seed = seed;
  return synthetic_token_choice(s);
}

// ------------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------------

namespace {

template <class T>
class Buffer {  // device array with poison / upload / download
 public:
  explicit Buffer(size_t n) : n_(n) {
    if (n) MOE_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  ~Buffer() {
    if (p_) cudaFree(p_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }
  void poison() {  // 0xFF bytes: NaN in fp32 and bf16
    if (n_) MOE_CUDA_CHECK(cudaMemset(p_, 0xff, n_ * sizeof(T)));
  }
  void upload(const std::vector<T>& h) {
    MOE_ASSERT(h.size() == n_);
    if (n_) MOE_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download(size_t n) const {
    std::vector<T> h(n);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    if (n) MOE_CUDA_CHECK(cudaMemcpy(h.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

template <class T>
std::vector<T> to_dev(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) o[i] = v[i];
    else o[i] = __float2bfloat16(v[i]);
  }
  return o;
}
template <class T>
std::vector<float> from_dev(const std::vector<T>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) o[i] = v[i];
    else o[i] = __bfloat162float(v[i]);
  }
  return o;
}
template <class T>
std::vector<float> rounded(std::vector<float> v) {
  return from_dev<T>(to_dev<T>(v));
}
template <class T>
constexpr const char* dtype_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}
template <class T>
constexpr double storage_eps() {
  return std::is_same_v<T, float> ? 0x1p-24 : 0x1p-8;
}

std::vector<float> normal(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(counter_normal(seed, RngStream::init, i));
  return v;
}

// |got - want| <= bound[i] (or atol + rtol |want| when bound is empty). NaN never passes.
ParityResult compare(std::string stage, std::string dtype, const std::vector<float>& got,
                     const std::vector<double>& want, double atol, double rtol,
                     const std::vector<double>& bound = {}) {
  ParityResult r;
  r.stage = std::move(stage);
  r.dtype = std::move(dtype);
  r.elements = static_cast<int64_t>(want.size());
  if (got.size() != want.size()) {
    r.mismatches = 1;
    r.detail = "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
    return r;
  }
  std::ostringstream os;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = bound.empty() ? atol + rtol * std::abs(want[i]) : bound[i];
    const double d = std::abs(double{got[i]} - want[i]);
    const double ratio = tol > 0 ? d / tol : (d == 0 ? 0 : INFINITY);
    if (!(ratio <= 1)) {
      if (r.mismatches < 5) os << " [" << i << "] " << got[i] << " vs " << want[i] << ";";
      ++r.mismatches;
    }
    if (!(ratio <= r.max_error)) r.max_error = std::isnan(ratio) ? INFINITY : ratio;
  }
  r.detail = os.str();
  return r;
}

template <class A, class B>
ParityResult compare_exact(std::string stage, const std::vector<A>& got, const std::vector<B>& want) {
  ParityResult r;
  r.stage = std::move(stage);
  r.dtype = "int32";
  r.elements = static_cast<int64_t>(want.size());
  if (got.size() != want.size()) {
    r.mismatches = 1;
    r.detail = "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
    return r;
  }
  std::ostringstream os;
  for (size_t i = 0; i < got.size(); ++i)
    if (static_cast<int64_t>(got[i]) != static_cast<int64_t>(want[i])) {
      if (r.mismatches < 5) os << " [" << i << "] " << got[i] << " vs " << want[i] << ";";
      ++r.mismatches;
    }
  r.max_error = r.mismatches ? INFINITY : 0;
  r.detail = os.str();
  return r;
}

Routing<double> to_double(const Routing<float>& r) {
  Routing<double> d;
  d.tokens = r.tokens;
  d.experts = r.experts;
  d.top_k = r.top_k;
  d.choice_token = r.choice_token;
  d.choice_expert = r.choice_expert;
  d.choice_weight.assign(r.choice_weight.begin(), r.choice_weight.end());
  return d;
}

template <class T>
void check_rows_typed(const ParityCase& c, int64_t H, uint64_t seed,
                      std::vector<ParityResult>& out) {
  const PlanShape shape = parity_shape(c);
  const int64_t Tn = c.tokens, R = shape.max_rows();
  const Routing<float> routing = parity_routing(c, seed);
  const DispatchPlan plan = build_plan(routing, shape.layout, shape.capacity, shape.block_size);
  const int64_t M = plan.rows, N = routing.size();
  const std::vector<float> x = rounded<T>(normal(Tn * H, seed + 1)),
                           yp = rounded<T>(normal(R * H, seed + 2)),
                           dy = rounded<T>(normal(Tn * H, seed + 3)),
                           dx0 = rounded<T>(normal(Tn * H, seed + 4));

  PlanBuffers dplan(shape);
  RoutingBuffers drouting;
  upload_routing(routing, drouting, nullptr);
  Buffer<T> dx_in(Tn * H), dxp(R * H), dyp_in(R * H), ddy(Tn * H), dyp(R * H), ddx(Tn * H),
      dyv(Tn * H);
  Buffer<float> dweight(N);
  dx_in.upload(to_dev<T>(x));
  dyp_in.upload(to_dev<T>(yp));
  ddy.upload(to_dev<T>(dy));
  ddx.upload(to_dev<T>(dx0));  // permute backward accumulates
  dplan.poison(nullptr);
  dxp.poison();
  dyv.poison();
  dyp.poison();
  dweight.poison();
  plan_forward(drouting.view(), dplan.view(), nullptr);
  permute_forward<T>(dplan.view(), dx_in.get(), H, dxp.get(), nullptr);
  combine_forward<T>(dplan.view(), drouting.view(), dyp_in.get(), H, dyv.get(), nullptr);
  combine_backward<T>(dplan.view(), drouting.view(), dyp_in.get(), ddy.get(), H, dyp.get(),
                      dweight.get(), nullptr);
  permute_backward<T>(dplan.view(), dyp.get(), H, ddx.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const char* dt = dtype_name<T>();
  const double rtol = 1.01 * storage_eps<T>() + 1e-6;

  // permute: a copy (padding rows zero), exact.
  std::vector<float> xp_ref(M * H);
  cpu::permute_forward(plan, x.data(), H, xp_ref.data());
  out.push_back(compare("permute", dt, from_dev<T>(dxp.download(M * H)),
                        std::vector<double>(xp_ref.begin(), xp_ref.end()), 0, 0));

  // combine: fp32 sum in choice order, one rounding to T.
  const Routing<double> rd = to_double(routing);
  const std::vector<double> yp_d(yp.begin(), yp.end()), dy_d(dy.begin(), dy.end());
  std::vector<double> y_ref(Tn * H);
  cpu::combine_forward(plan, rd, yp_d.data(), H, y_ref.data());
  out.push_back(compare("combine", dt, from_dev<T>(dyv.download(Tn * H)), y_ref, 1e-5, rtol));

  // combine backward: dyp = w * dy (one rounding); dweight = <dy, yp> (fp32 dot).
  std::vector<double> dyp_ref(M * H), dw_ref(N);
  cpu::combine_backward(plan, rd, yp_d.data(), dy_d.data(), H, dyp_ref.data(), dw_ref.data());
  const std::vector<float> dyp_gpu = from_dev<T>(dyp.download(M * H));
  out.push_back(compare("combine_backward.dyp", dt, dyp_gpu, dyp_ref, 1e-6, rtol));
  std::vector<double> bound(N);
  for (int64_t ch = 0; ch < N; ++ch) {
    double mag = 0;
    const int32_t r = plan.choice_row[ch];
    if (r >= 0)
      for (int64_t h = 0; h < H; ++h)
        mag += std::abs(dy_d[routing.choice_token[ch] * H + h] * yp_d[r * H + h]);
    // Worst case of the kernel's order: H/32 sequential fma per lane, then a 5-level butterfly.
    bound[ch] = (H / 32.0 + 6) * 0x1p-24 * mag + 1e-7;
  }
  out.push_back(compare("combine_backward.dweight", "fp32", dweight.download(N), dw_ref, 0, 0,
                        bound));

  // permute backward: dx += the GPU's own dyp rows, the CPU's fp32 order, exact.
  std::vector<float> dx_ref = dx0;
  cpu::permute_backward(plan, dyp_gpu.data(), H, dx_ref.data());
  dx_ref = rounded<T>(dx_ref);
  out.push_back(compare("permute_backward", dt, from_dev<T>(ddx.download(Tn * H)),
                        std::vector<double>(dx_ref.begin(), dx_ref.end()), 0, 0));
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// suites
// ------------------------------------------------------------------------------------------------

std::vector<ParityResult> check_plan(const ParityCase& c, uint64_t seed) {
  const PlanShape shape = parity_shape(c);
  const Routing<float> routing = parity_routing(c, seed);
  const DispatchPlan want = build_plan(routing, shape.layout, shape.capacity, shape.block_size);
  PlanBuffers plan(shape);
  RoutingBuffers drouting;
  upload_routing(routing, drouting, nullptr);
  plan.poison(nullptr);
  plan_forward(drouting.view(), plan.view(), nullptr);
  const DispatchPlan got = download_plan(plan.view(), nullptr);
  // Rows in [M, max_rows) must read as padding too (later stages size grids by max_rows).
  const int64_t R = shape.max_rows();
  std::vector<int32_t> tail_token(R), tail_choice(R);
  if (R) {
    MOE_CUDA_CHECK(cudaMemcpy(tail_token.data(), plan.view().row_token, R * 4,
                              cudaMemcpyDeviceToHost));
    MOE_CUDA_CHECK(cudaMemcpy(tail_choice.data(), plan.view().row_choice, R * 4,
                              cudaMemcpyDeviceToHost));
  }
  const int64_t M = std::min<int64_t>(got.rows, R);
  std::vector<int32_t> tail_got, tail_want;
  for (int64_t r = M; r < R; ++r) {
    tail_got.push_back(tail_token[r]);
    tail_got.push_back(tail_choice[r]);
    tail_want.push_back(kPadToken(c.tokens));
    tail_want.push_back(-1);
  }
  std::vector<ParityResult> out;
  out.push_back(compare_exact("plan.rows", std::vector<int64_t>{got.rows},
                              std::vector<int64_t>{want.rows}));
  out.push_back(compare_exact("plan.counts", got.counts, want.counts));
  out.push_back(compare_exact("plan.kept", got.kept, want.kept));
  out.push_back(compare_exact("plan.offsets", got.offsets, want.offsets));
  out.push_back(compare_exact("plan.row_token", got.row_token, want.row_token));
  out.push_back(compare_exact("plan.row_choice", got.row_choice, want.row_choice));
  out.push_back(compare_exact("plan.tail_rows", tail_got, tail_want));
  out.push_back(compare_exact("plan.token_offsets", got.token_offsets, want.token_offsets));
  out.push_back(compare_exact("plan.token_rows", got.token_rows, want.token_rows));
  out.push_back(compare_exact("plan.token_choices", got.token_choices, want.token_choices));
  out.push_back(compare_exact("plan.choice_row", got.choice_row, want.choice_row));
  out.push_back(compare_exact(
      "plan.drops", std::vector<int64_t>{got.dropped_by_capacity, got.skipped_by_policy},
      std::vector<int64_t>{want.dropped_by_capacity, want.skipped_by_policy}));
  return out;
}

std::vector<ParityResult> check_rows(const ParityCase& c, int64_t hidden, uint64_t seed) {
  std::vector<ParityResult> out;
  check_rows_typed<float>(c, hidden, seed, out);
  check_rows_typed<__nv_bfloat16>(c, hidden, seed, out);
  return out;
}

}  // namespace moe::cuda

// ------------------------------------------------------------------------------------------------
// router
// ------------------------------------------------------------------------------------------------

#include "moe/cuda/gate.hpp"
#include "moe/cuda/route.hpp"

namespace moe::cuda {

std::vector<RouteCase> route_cases() {
  auto base = [](Router r, int64_t T, int64_t H, int64_t E, int64_t K) {
    LayerConfig c;
    c.router = r;
    c.tokens = T;
    c.hidden = H;
    c.inter = 16;
    c.experts = E;
    c.top_k = K;
    c.training = true;
    c.seed = 77;
    c.layout = Layout::dropless;
    return c;
  };
  std::vector<RouteCase> v;
  v.push_back({"softmax_topk_e16_k2", base(Router::softmax_topk, 512, 64, 16, 2)});
  {
    LayerConfig c = base(Router::softmax_topk, 512, 48, 7, 2);
    c.renormalize = false;
    c.sequence_length = 128;  // four balance groups
    v.push_back({"softmax_topk_e7_no_renorm_groups", c});
  }
  {
    LayerConfig c = base(Router::softmax_topk, 400, 32, 9, 2);
    c.second_policy = SecondPolicy::random;
    v.push_back({"softmax_topk_second_random", c});
    c.second_policy = SecondPolicy::threshold;
    v.push_back({"softmax_topk_second_threshold", c});
  }
  v.push_back({"softmax_topk_t1_k_eq_e", base(Router::softmax_topk, 1, 16, 5, 5)});
  v.push_back({"softmax_topk_e4096_k8", base(Router::softmax_topk, 64, 32, 4096, 8)});
  v.push_back({"switch_jitter_e8", base(Router::switch_top1, 300, 64, 8, 1)});
  {
    LayerConfig c = base(Router::switch_top1, 300, 64, 8, 1);
    c.training = false;
    v.push_back({"switch_eval_e8", c});
  }
  {
    LayerConfig c = base(Router::chain_of_experts, 256, 32, 12, 4);
    c.iterations = 2;
    v.push_back({"chain_of_experts_step0", c});
  }
  {
    LayerConfig c = base(Router::sigmoid_bias, 384, 64, 32, 4);
    c.route_scale = 2.5;
    c.aux_coef = 1e-3;
    c.sequence_length = 96;
    v.push_back({"sigmoid_bias_e32_k4_seqaux", c});
    c.aux_coef = -1;  // default: none
    c.sequence_length = 0;
    v.push_back({"sigmoid_bias_e32_k4", c});
  }
  v.push_back({"noisy_topk_e10_k2", base(Router::noisy_topk, 400, 32, 10, 2)});
  {
    LayerConfig c = base(Router::noisy_topk, 400, 32, 10, 2);
    c.training = false;
    v.push_back({"noisy_topk_eval", c});
    c = base(Router::noisy_topk, 100, 32, 4, 4);
    v.push_back({"noisy_topk_k_eq_e", c});
  }
  {
    LayerConfig c = base(Router::expert_choice, 512, 32, 8, 1);
    c.capacity_factor = 1.25;
    v.push_back({"expert_choice_e8", c});
    c = base(Router::expert_choice, 97, 32, 13, 1);
    c.capacity_factor = 2.0;
    c.z_coef = 1e-3;
    v.push_back({"expert_choice_e13_zloss", c});
  }
  v.push_back({"softmax_topk_t16384_e128_k2", base(Router::softmax_topk, 16384, 128, 128, 2), true});
  for (auto& rc : v) rc.cfg.validate();
  return v;
}

namespace {

// Per token (per expert for expert choice): true when the selection boundary is within `eps`
// (relative) of a tie, so rounding differences between CPU and GPU may pick differently.
std::vector<char> near_ties(const LayerConfig& cfg, const RouteStep<float>& s,
                            const Params<float>& p) {
  const int64_t T = cfg.tokens, E = cfg.experts;
  const double eps = 1e-5;
  auto tie = [&](std::vector<float> v, int64_t k) {
    if (k <= 0 || k >= static_cast<int64_t>(v.size())) return false;
    std::sort(v.begin(), v.end(), std::greater<float>());
    return std::abs(double(v[k - 1]) - v[k]) <= eps * (std::abs(double(v[k - 1])) + 1e-3);
  };
  if (cfg.router == Router::expert_choice) {
    std::vector<char> out(E);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> col(T);
      for (int64_t t = 0; t < T; ++t) col[t] = s.probs[t * E + e];
      out[e] = tie(col, cfg.capacity());
    }
    return out;
  }
  const int64_t K = cfg.choices_per_step();
  std::vector<char> out(T);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> score(E);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      if (cfg.router == Router::noisy_topk) score[e] = s.noisy[i];
      else if (cfg.router == Router::sigmoid_bias)
        score[e] = s.probs[i] + (p.expert_bias.empty() ? 0.f : p.expert_bias[e]);
      else score[e] = s.logits[i];
    }
    out[t] = tie(score, K) || (cfg.router == Router::noisy_topk && tie(score, K + 1));
    if (cfg.router == Router::softmax_topk && cfg.second_policy != SecondPolicy::all) {
      const double g2 = s.routing.choice_weight[t * K + 1];
      const double u = counter_uniform(cfg.seed, RngStream::second_choice, uint64_t(t));
      const double thr = cfg.second_threshold;
      out[t] = out[t] || std::abs(u - g2 / thr) < 1e-5 || std::abs(g2 - thr) < 1e-5;
    }
  }
  return out;
}

template <class T>
std::vector<float> gate_on_device(const std::vector<float>& x, const std::vector<float>& w,
                                  int64_t Tn, int64_t H, int64_t E, cublasHandle_t h) {
  Buffer<T> dx(Tn * H), dw(H * E);
  Buffer<float> logits(Tn * E);
  dx.upload(to_dev<T>(x));
  dw.upload(to_dev<T>(w));
  logits.poison();
  gate_forward<T>(h, dx.get(), dw.get(), Tn, H, E, logits.get(), nullptr);
  return logits.download(Tn * E);
}

// Reference GEMM in double with the per-element bound 1e-5 * sum |a b| + 1e-6.
void gemm_ref(const std::vector<float>& a, const std::vector<float>& b, int64_t m, int64_t k,
              int64_t n, std::vector<double>& out, std::vector<double>& bound) {
  out.assign(m * n, 0.0);
  bound.assign(m * n, 1e-6);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < k; ++l) {
      const double av = a[i * k + l];
      for (int64_t j = 0; j < n; ++j) {
        out[i * n + j] += av * b[l * n + j];
        bound[i * n + j] += 1e-5 * std::abs(av * b[l * n + j]);
      }
    }
}

}  // namespace

std::vector<ParityResult> check_route(const RouteCase& rc, uint64_t seed) {
  const LayerConfig& cfg = rc.cfg;
  const int64_t Tn = cfg.tokens, H = cfg.hidden, E = cfg.experts;
  Params<float> p = random_params<float>(cfg, seed);
  if (cfg.router == Router::sigmoid_bias) {
    p.expert_bias = normal(E, seed + 5);
    for (float& b : p.expert_bias) b *= 0.05f;
  }
  const std::vector<float> x = normal(Tn * H, seed + 1);
  RouteStep<float> s;
  cpu::route_forward(cfg, p, 0, x.data(), s, nullptr);
  std::vector<ParityResult> out;
  cublasHandle_t handle = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&handle));
  const std::vector<float> w(p.w_gate.begin(), p.w_gate.begin() + H * E);

  // ---- gate: jitter bit for bit, then the GEMM in fp32 and bf16
  Buffer<float> dx_in(Tn * H), dxr(Tn * H);
  dx_in.upload(x);
  dxr.poison();
  const bool jitter = cfg.router == Router::switch_top1 && cfg.training && cfg.jitter > 0;
  if (jitter) {
    jitter_input<float>(dx_in.get(), Tn * H, cfg.seed, cfg.jitter, dxr.get(), nullptr);
    out.push_back(compare("gate.jitter", "fp32", dxr.download(Tn * H),
                          std::vector<double>(s.router_input.begin(), s.router_input.end()), 0, 0));
  }
  {
    std::vector<double> ref, bound;
    gemm_ref(s.router_input, w, Tn, H, E, ref, bound);
    out.push_back(compare("gate", "fp32",
                          gate_on_device<float>(s.router_input, w, Tn, H, E, handle), ref, 0, 0,
                          bound));
    const std::vector<float> xb = rounded<__nv_bfloat16>(s.router_input),
                             wb = rounded<__nv_bfloat16>(w);
    gemm_ref(xb, wb, Tn, H, E, ref, bound);
    out.push_back(compare("gate", "bf16", gate_on_device<__nv_bfloat16>(xb, wb, Tn, H, E, handle),
                          ref, 0, 0, bound));
  }

  // ---- route forward on the CPU's logits
  RouteBuffers buf(cfg);
  Buffer<float> logits(Tn * E), noise_raw(Tn * E), bias(E);
  logits.upload(s.logits);
  const bool noisy = cfg.router == Router::noisy_topk;
  if (noisy) noise_raw.upload(s.noise_raw);
  if (!p.expert_bias.empty()) bias.upload(p.expert_bias);
  MOE_CUDA_CHECK(cudaMemset(buf.arena.data(), 0xff, buf.arena.bytes()));
  MOE_CUDA_CHECK(cudaMemset(buf.routing.arena.data(), 0x7b, buf.routing.arena.bytes()));
  route_forward(cfg, 0, logits.get(), noisy ? noise_raw.get() : nullptr,
                p.expert_bias.empty() ? nullptr : bias.get(), buf, nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const Routing<float> got = download_routing(buf.routing.view(), nullptr);
  const Routing<float>& want = s.routing;
  const std::vector<char> tie = near_ties(cfg, s, p);
  int64_t ties = 0;
  {
    // Selection and weights, item by item, leaving out near ties.
    const bool ec = cfg.router == Router::expert_choice;
    const int64_t N = want.size(), per = ec ? cfg.capacity() : cfg.choices_per_step();
    std::vector<int32_t> ge, we, gt, wt;
    std::vector<float> gw;
    std::vector<double> ww;
    for (int64_t unit = 0; unit < (ec ? E : Tn); ++unit) {
      if (tie[unit]) {
        ++ties;
        continue;
      }
      for (int64_t j = unit * per; j < (unit + 1) * per && j < N; ++j) {
        ge.push_back(got.choice_expert[j]);
        we.push_back(want.choice_expert[j]);
        gt.push_back(got.choice_token[j]);
        wt.push_back(want.choice_token[j]);
        gw.push_back(got.choice_weight[j]);
        ww.push_back(want.choice_weight[j]);
      }
    }
    out.push_back(compare_exact("route.choice_expert", ge, we));
    out.push_back(compare_exact("route.choice_token", gt, wt));
    out.push_back(compare("route.choice_weight", "fp32", gw, ww, 1e-6, 2e-5));
    if (!ec) {
      std::vector<int32_t> gs(Tn * cfg.choices_per_step());
      if (!gs.empty())
        MOE_CUDA_CHECK(cudaMemcpy(gs.data(), buf.selected, gs.size() * 4, cudaMemcpyDeviceToHost));
      std::vector<int32_t> a, b;
      const int64_t K = cfg.choices_per_step();
      for (int64_t t = 0; t < Tn; ++t)
        if (!tie[t])
          for (int64_t k = 0; k < K; ++k) a.push_back(gs[t * K + k]), b.push_back(s.selected[t * K + k]);
      out.push_back(compare_exact("route.selected", a, b));
    }
  }
  {
    std::vector<float> probs(Tn * E);
    if (!probs.empty())
      MOE_CUDA_CHECK(cudaMemcpy(probs.data(), buf.probs, probs.size() * 4, cudaMemcpyDeviceToHost));
    out.push_back(compare("route.probs", "fp32", probs,
                          std::vector<double>(s.probs.begin(), s.probs.end()), 1e-7, 2e-5));
    double aux = 0;
    MOE_CUDA_CHECK(cudaMemcpy(&aux, buf.aux_loss, 8, cudaMemcpyDeviceToHost));
    out.push_back(compare("route.aux_loss", "fp64", {static_cast<float>(aux)}, {s.aux_loss},
                          1e-7, 1e-4));
  }

  // ---- route backward through the gate, against cpu::route_backward
  if (ties == 0) {
    const int64_t N = want.size();
    const std::vector<float> dweight = normal(N, seed + 9);
    Params<float> g;
    g.w_gate.assign(p.w_gate.size(), 0.f);
    g.w_noise.assign(p.w_noise.size(), 0.f);
    std::vector<float> dx_ref(Tn * H, 0.f);
    cpu::route_backward(cfg, p, 0, s, dweight.data(), dx_ref.data(), g);

    Buffer<float> ddw(N), dz(Tn * E), dr(Tn * E), dwg(H * E), dwn(H * E), ddx(Tn * H),
        tmp(Tn * H), dwn_w(H * E), xr(Tn * H);
    ddw.upload(dweight);
    dz.poison();
    dr.poison();
    route_backward(cfg, 0, buf, logits.get(), noisy ? noise_raw.get() : nullptr, ddw.get(),
                   dz.get(), noisy ? dr.get() : nullptr, nullptr);
    MOE_CUDA_CHECK(cudaMemset(dwg.get(), 0, H * E * 4));
    MOE_CUDA_CHECK(cudaMemset(ddx.get(), 0, Tn * H * 4));
    Buffer<float> dw_gate(H * E);
    dw_gate.upload(w);
    xr.upload(s.router_input);
    if (jitter) {  // dx += (dz W^T) * jitter
      MOE_CUDA_CHECK(cudaMemset(tmp.get(), 0, Tn * H * 4));
      gate_backward<float>(handle, xr.get(), dw_gate.get(), dz.get(), Tn, H, E, dwg.get(),
                           tmp.get(), nullptr, nullptr);
      jitter_backward<float>(tmp.get(), Tn * H, cfg.seed, cfg.jitter, ddx.get(), nullptr);
    } else {
      gate_backward<float>(handle, xr.get(), dw_gate.get(), dz.get(), Tn, H, E, dwg.get(),
                           ddx.get(), nullptr, nullptr);
    }
    if (noisy) {
      MOE_CUDA_CHECK(cudaMemset(dwn.get(), 0, H * E * 4));
      dwn_w.upload(p.w_noise);
      gate_backward<float>(handle, dx_in.get(), dwn_w.get(), dr.get(), Tn, H, E, dwn.get(),
                           ddx.get(), nullptr, nullptr);
    }
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    auto scaled = [](const std::vector<float>& ref) {  // tolerance from the tensor's scale
      double m = 0;
      for (float v : ref) m = std::max(m, double(std::abs(v)));
      return 1e-4 * m + 1e-7;
    };
    const std::vector<float> gw_ref(g.w_gate.begin(), g.w_gate.begin() + H * E);
    out.push_back(compare("route_backward.dw_gate", "fp32", dwg.download(H * E),
                          std::vector<double>(gw_ref.begin(), gw_ref.end()), scaled(gw_ref), 1e-3));
    out.push_back(compare("route_backward.dx", "fp32", ddx.download(Tn * H),
                          std::vector<double>(dx_ref.begin(), dx_ref.end()), scaled(dx_ref), 1e-3));
    if (noisy)
      out.push_back(compare("route_backward.dw_noise", "fp32", dwn.download(H * E),
                            std::vector<double>(g.w_noise.begin(), g.w_noise.end()),
                            scaled(g.w_noise), 1e-3));
  }
  MOE_CUBLAS_CHECK(cublasDestroy(handle));
  if (ties) {
    ParityResult r;
    r.stage = "route.near_ties_skipped";
    r.dtype = "-";
    r.elements = ties;
    out.push_back(r);
  }
  return out;
}

}  // namespace moe::cuda

// ------------------------------------------------------------------------------------------------
// soft MoE
// ------------------------------------------------------------------------------------------------

#include "moe/cuda/soft_moe.hpp"

namespace moe::cuda {

std::vector<RouteCase> soft_moe_cases() {
  auto base = [](int64_t T, int64_t H, int64_t E, int64_t S) {
    LayerConfig c;
    c.router = Router::soft_moe;
    c.tokens = T;
    c.hidden = H;
    c.inter = 8;
    c.experts = E;
    c.top_k = 1;
    c.slots_per_expert = S;
    c.seed = 5;
    return c;
  };
  std::vector<RouteCase> v = {
      {"soft_moe_t1", base(1, 16, 3, 1)},
      {"soft_moe_e4_s2", base(300, 48, 4, 2)},
      {"soft_moe_e7_s3", base(513, 40, 7, 3)},
      {"soft_moe_e16_s1_wide", base(1024, 256, 16, 1)},
  };
  for (auto& rc : v) rc.cfg.validate();
  return v;
}

std::vector<ParityResult> check_soft_moe(const RouteCase& rc, uint64_t seed) {
  const LayerConfig& cfg = rc.cfg;
  const int64_t Tn = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
  const int64_t n = E * S;
  Params<float> p = random_params<float>(cfg, seed);
  const std::vector<float> x = normal(Tn * H, seed + 1), dy = normal(Tn * H, seed + 2);
  SoftStep<float> s;
  std::vector<float> y_ref(Tn * H);
  cpu::soft_moe_forward(cfg, p, x.data(), s, y_ref.data(), nullptr);
  std::vector<float> dx_ref(Tn * H, 0.f);
  Params<float> g;
  g.w_gate.assign(p.w_gate.size(), 0.f);
  g.slot_scale.assign(1, 0.f);
  g.w_up.assign(p.w_up.size(), 0.f);
  g.w_down.assign(p.w_down.size(), 0.f);
  cpu::soft_moe_backward(cfg, p, x.data(), s, dy.data(), dx_ref.data(), g);

  std::vector<ParityResult> out;
  cublasHandle_t handle = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&handle));
  SoftMoeBuffers b(cfg);
  MOE_CUDA_CHECK(cudaMemset(b.arena.data(), 0xff, b.arena.bytes()));  // poison ...
  MOE_CUDA_CHECK(cudaMemset(b.zero, 0, sizeof(float)));                 // ... but the constant
  Buffer<float> dx_in(Tn * H), phi(H * n), scale(1), slots_in(n * H), slots_out(n * H),
      y(Tn * H), ddy(Tn * H), d_slots_out(n * H), d_slots_in(n * H), ddx(Tn * H), dphi(H * n),
      dscale(1);
  dx_in.upload(x);
  phi.upload(p.w_gate);
  scale.upload(p.slot_scale);
  slots_out.upload(s.slots_out);
  ddy.upload(dy);
  slots_in.poison();
  y.poison();
  d_slots_out.poison();
  soft_moe_route_forward(handle, dx_in.get(), phi.get(), scale.get(), b, nullptr);
  soft_moe_dispatch_forward(handle, b, dx_in.get(), slots_in.get(), nullptr);
  soft_moe_combine_forward(handle, b, slots_out.get(), y.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  auto get = [](const float* d, int64_t count) {
    std::vector<float> h(count);
    if (count) MOE_CUDA_CHECK(cudaMemcpy(h.data(), d, count * 4, cudaMemcpyDeviceToHost));
    return h;
  };
  auto dbl = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  auto scaled = [](const std::vector<float>& ref) {
    double m = 0;
    for (float v : ref) m = std::max(m, double(std::abs(v)));
    return 1e-5 * m + 1e-7;
  };
  out.push_back(compare("soft_moe.x_norm", "fp32", get(b.x_norm, Tn * H), dbl(s.x_norm), 1e-7, 1e-5));
  out.push_back(compare("soft_moe.logits", "fp32", get(b.logits, Tn * n), dbl(s.logits),
                        scaled(s.logits), 1e-4));
  out.push_back(compare("soft_moe.dispatch", "fp32", get(b.dispatch, Tn * n), dbl(s.dispatch),
                        1e-7, 1e-4));
  out.push_back(compare("soft_moe.combine", "fp32", get(b.combine, Tn * n), dbl(s.combine),
                        1e-7, 1e-4));
  out.push_back(compare("soft_moe.slots_in", "fp32", slots_in.download(n * H), dbl(s.slots_in),
                        scaled(s.slots_in), 1e-4));
  out.push_back(compare("soft_moe.y", "fp32", y.download(Tn * H), dbl(y_ref), scaled(y_ref), 1e-4));

  // backward: combine (GPU) -> experts (CPU) -> dispatch and route (GPU)
  soft_moe_combine_backward(handle, b, slots_out.get(), ddy.get(), d_slots_out.get(), nullptr);
  std::vector<float> dso = d_slots_out.download(n * H), dsi(n * H, 0.f),
                     dwu(p.w_up.size(), 0.f), dwd(p.w_down.size(), 0.f);
  std::vector<int64_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
  cpu::experts_backward(cfg, offsets.data(), E, p.w_up.data(), p.w_down.data(),
                        s.slots_in.data(), s.pre.data(), s.act.data(), dso.data(), dsi.data(),
                        dwu.data(), dwd.data());
  d_slots_in.upload(dsi);
  MOE_CUDA_CHECK(cudaMemset(ddx.get(), 0, Tn * H * 4));
  MOE_CUDA_CHECK(cudaMemset(dphi.get(), 0, H * n * 4));
  MOE_CUDA_CHECK(cudaMemset(dscale.get(), 0, 4));
  soft_moe_dispatch_backward(handle, b, dx_in.get(), d_slots_in.get(), ddx.get(), nullptr);
  soft_moe_route_backward(handle, b, dx_in.get(), phi.get(), scale.get(), ddx.get(), dphi.get(),
                          dscale.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  auto loose = [](const std::vector<float>& ref) {
    double m = 0;
    for (float v : ref) m = std::max(m, double(std::abs(v)));
    return 1e-4 * m + 1e-7;
  };
  out.push_back(compare("soft_moe_backward.dw_up", "fp32", dwu, dbl(g.w_up), loose(g.w_up), 1e-3));
  out.push_back(compare("soft_moe_backward.dx", "fp32", ddx.download(Tn * H), dbl(dx_ref),
                        loose(dx_ref), 1e-3));
  out.push_back(compare("soft_moe_backward.dw_gate", "fp32", dphi.download(H * n), dbl(g.w_gate),
                        loose(g.w_gate), 1e-3));
  out.push_back(compare("soft_moe_backward.dscale", "fp32", dscale.download(1),
                        dbl(g.slot_scale), 1e-6, 1e-3));
  MOE_CUBLAS_CHECK(cublasDestroy(handle));
  return out;
}

}  // namespace moe::cuda
