// defines: parity_cases, parity_shape, parity_routing, check_plan, check_rows
// GPU stages vs the CPU reference stages (src/cpu), shared by tests/cuda and `moe-bench check`.
#include "moe/cuda/parity.hpp"
#include "moe/cuda/convert.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = bound.empty() ? atol + rtol * std::abs(want[i]) : bound[i];
    const double d = std::abs(double{got[i]} - want[i]);
    const double ratio = tol > 0 ? d / tol : (d == 0 ? 0 : INFINITY);
    if (!(ratio <= 1)) {
      if (r.mismatches < 5) os << " [" << i << "] " << got[i] << " vs " << want[i] << ";";
      ++r.mismatches;
    }
    if (!(ratio <= r.max_error)) r.max_error = std::isnan(ratio) ? INFINITY : ratio;
    err2 += d * d;
    ref2 += want[i] * want[i];
  }
  r.rel_error = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  if (std::isnan(r.rel_error)) r.rel_error = INFINITY;
  r.detail = os.str();
  return r;
}

// Relative Frobenius error ||got - want|| / ||want|| <= rtol (+ atol / ||want|| for tensors that
// are zero in exact arithmetic). Every element must be finite (an unwritten, poisoned element is
// NaN): the tolerance for bf16 operands, whose per-element error is one rounding (2^-9 relative)
// of inputs that partly cancel, so that no per-element bound is both tight and safe.
ParityResult compare_frobenius(std::string stage, std::string dtype, const std::vector<float>& got,
                               const std::vector<double>& want, double rtol, double atol = 1e-30) {
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
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (r.mismatches < 5) os << " [" << i << "] " << got[i] << " vs " << want[i] << ";";
      ++r.mismatches;
      continue;
    }
    const double d = double{got[i]} - want[i];
    err2 += d * d;
    ref2 += want[i] * want[i];
  }
  const double err = std::sqrt(err2), ref = std::sqrt(ref2), tol = rtol * ref + atol;
  r.rel_error = r.mismatches ? INFINITY : (ref > 0 ? err / ref : err);
  r.max_error = r.mismatches ? INFINITY : err / tol;
  if (r.mismatches) {
    os << " (" << r.mismatches << " not finite)";
  } else if (!(err <= tol)) {
    r.mismatches = 1;
    os << " relative Frobenius error " << r.rel_error << " above " << rtol;
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
  const std::vector<float> x = round_to<T>(normal(Tn * H, seed + 1)),
                           yp = round_to<T>(normal(R * H, seed + 2)),
                           dy = round_to<T>(normal(Tn * H, seed + 3)),
                           dx0 = round_to<T>(normal(Tn * H, seed + 4));

  PlanBuffers dplan(shape);
  RoutingBuffers drouting;
  upload_routing(routing, drouting, nullptr);
  Buffer<T> dx_in(Tn * H), dxp(R * H), dyp_in(R * H), ddy(Tn * H), dyp(R * H), ddx(Tn * H),
      dyv(Tn * H);
  Buffer<float> dweight(N);
  dx_in.upload(to_device_type<T>(x));
  dyp_in.upload(to_device_type<T>(yp));
  ddy.upload(to_device_type<T>(dy));
  ddx.upload(to_device_type<T>(dx0));  // permute backward accumulates
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
  out.push_back(compare("permute", dt, from_device_type<T>(dxp.download(M * H)),
                        std::vector<double>(xp_ref.begin(), xp_ref.end()), 0, 0));

  // combine: fp32 sum in choice order, one rounding to T.
  const Routing<double> rd = to_double(routing);
  const std::vector<double> yp_d(yp.begin(), yp.end()), dy_d(dy.begin(), dy.end());
  std::vector<double> y_ref(Tn * H);
  cpu::combine_forward(plan, rd, yp_d.data(), H, y_ref.data());
  out.push_back(compare("combine", dt, from_device_type<T>(dyv.download(Tn * H)), y_ref, 1e-5, rtol));

  // combine backward: dyp = w * dy (one rounding); dweight = <dy, yp> (fp32 dot).
  std::vector<double> dyp_ref(M * H), dw_ref(N);
  cpu::combine_backward(plan, rd, yp_d.data(), dy_d.data(), H, dyp_ref.data(), dw_ref.data());
  const std::vector<float> dyp_gpu = from_device_type<T>(dyp.download(M * H));
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
  dx_ref = round_to<T>(dx_ref);
  out.push_back(compare("permute_backward", dt, from_device_type<T>(ddx.download(Tn * H)),
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
  dx.upload(to_device_type<T>(x));
  dw.upload(to_device_type<T>(w));
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
    const std::vector<float> xb = round_to<__nv_bfloat16>(s.router_input),
                             wb = round_to<__nv_bfloat16>(w);
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

#include "cpu/blas.hpp"
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
      {"soft_moe_t1", base(1, 64, 5, 3)},  // n = 15: with 3 slots, bf16 dw_gate can pass 1e-2
      {"soft_moe_e4_s2", base(300, 48, 4, 2)},
      {"soft_moe_e7_s3", base(513, 40, 7, 3)},       // n = 21: a partial column tile
      {"soft_moe_e5_s2_h37", base(200, 37, 5, 2)},   // rows not a multiple of 16 bytes
      {"soft_moe_e16_s1_wide", base(1024, 256, 16, 1)},
      {"soft_moe_e12_s3_chunks", base(2100, 64, 12, 3)},  // 9 row chunks, the last partial
      {"soft_moe_t8192_e64_s2", base(8192, 512, 64, 2), true},
  };
  for (auto& rc : v) rc.cfg.validate();
  return v;
}

namespace {

template <class A>
std::vector<double> to_f64(const std::vector<A>& v) {
  return std::vector<double>(v.begin(), v.end());
}

Params<double> to_f64(const Params<float>& p) {
  Params<double> d;
  d.w_gate = to_f64(p.w_gate);
  d.w_noise = to_f64(p.w_noise);
  d.slot_scale = to_f64(p.slot_scale);
  d.w_up = to_f64(p.w_up);
  d.w_down = to_f64(p.w_down);
  d.shared_up = to_f64(p.shared_up);
  d.shared_down = to_f64(p.shared_down);
  d.expert_bias = to_f64(p.expert_bias);
  return d;
}

// What one run of the device path leaves behind, as float (bf16 widens exactly).
struct SoftDeviceRun {
  std::vector<float> x_inv_norm, phi_inv_norm, logits, dispatch, combine, slots_in, y,
      d_slots_out, dx, dphi, dscale;
};

// Forward (route, dispatch, combine) and backward (combine, then the experts' backward on the
// CPU in double, then dispatch and route) on the device, every output poisoned first.
template <class Elem>
SoftDeviceRun run_soft_moe_device(cublasHandle_t handle, const LayerConfig& cfg,
                                  const Params<double>& p, const SoftStep<double>& s,
                                  const std::vector<float>& x, const std::vector<float>& phi,
                                  float scale, const std::vector<float>& slots_out,
                                  const std::vector<float>& dy) {
  const int64_t Tn = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
  const int64_t n = E * S;
  SoftMoeBuffers<Elem> b(cfg);
  MOE_CUDA_CHECK(cudaMemset(b.arena.data(), 0xff, b.arena.bytes()));  // NaN in fp32 and bf16
  Buffer<Elem> dev_x(Tn * H), dev_phi(H * n), dev_slots_out(n * H), dev_dy(Tn * H), slots_in(n * H),
      y(Tn * H), d_slots_out(n * H), d_slots_in(n * H), ddx(Tn * H);
  Buffer<float> dev_scale(1), dphi(H * n), dscale(1);
  dev_x.upload(to_device_type<Elem>(x));
  dev_phi.upload(to_device_type<Elem>(phi));
  dev_scale.upload({scale});
  dev_slots_out.upload(to_device_type<Elem>(slots_out));
  dev_dy.upload(to_device_type<Elem>(dy));
  slots_in.poison();
  y.poison();
  d_slots_out.poison();
  soft_moe_route_forward<Elem>(handle, dev_x.get(), dev_phi.get(), dev_scale.get(), b, nullptr);
  soft_moe_dispatch_forward<Elem>(handle, b, dev_x.get(), slots_in.get(), nullptr);
  soft_moe_combine_forward<Elem>(handle, b, dev_slots_out.get(), y.get(), nullptr);
  soft_moe_combine_backward<Elem>(handle, b, dev_slots_out.get(), dev_dy.get(), d_slots_out.get(),
                                  nullptr);
  SoftDeviceRun r;
  r.d_slots_out = from_device_type<Elem>(d_slots_out.download(n * H));

  // the experts' backward on the CPU, on the device's d_slots_out
  std::vector<int64_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
  std::vector<double> dso = to_f64(r.d_slots_out), dsi(n * H, 0.0), dwu(p.w_up.size(), 0.0),
                      dwd(p.w_down.size(), 0.0);
  cpu::experts_backward(cfg, offsets.data(), E, p.w_up.data(), p.w_down.data(), s.slots_in.data(),
                        s.pre.data(), s.act.data(), dso.data(), dsi.data(), dwu.data(),
                        dwd.data());
  d_slots_in.upload(to_device_type<Elem>(std::vector<float>(dsi.begin(), dsi.end())));
  MOE_CUDA_CHECK(cudaMemset(ddx.get(), 0, Tn * H * sizeof(Elem)));  // accumulated (+=)
  MOE_CUDA_CHECK(cudaMemset(dphi.get(), 0, H * n * sizeof(float)));
  MOE_CUDA_CHECK(cudaMemset(dscale.get(), 0, sizeof(float)));
  soft_moe_dispatch_backward<Elem>(handle, b, dev_x.get(), d_slots_in.get(), ddx.get(), nullptr);
  soft_moe_route_backward<Elem>(handle, b, dev_x.get(), dev_phi.get(), dev_scale.get(), ddx.get(),
                                dphi.get(), dscale.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  auto get = [](const auto* d, int64_t count) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(d)>>;
    std::vector<V> h(count);
    if (count) MOE_CUDA_CHECK(cudaMemcpy(h.data(), d, count * sizeof(V), cudaMemcpyDeviceToHost));
    return from_device_type<V>(h);
  };
  r.x_inv_norm = get(b.x_inv_norm, Tn);
  r.phi_inv_norm = get(b.phi_inv_norm, n);
  r.logits = get(b.logits, Tn * n);
  r.dispatch = get(b.dispatch, Tn * n);
  r.combine = get(b.combine, Tn * n);
  r.slots_in = from_device_type<Elem>(slots_in.download(n * H));
  r.y = from_device_type<Elem>(y.download(Tn * H));
  r.dx = from_device_type<Elem>(ddx.download(Tn * H));
  r.dphi = dphi.download(H * n);
  r.dscale = dscale.download(1);
  return r;
}

// Elements whose bits differ between two runs.
ParityResult compare_bits(std::string stage, std::string dtype, const SoftDeviceRun& a,
                          const SoftDeviceRun& b) {
  ParityResult r;
  r.stage = std::move(stage);
  r.dtype = std::move(dtype);
  std::ostringstream os;
  auto one = [&](const char* name, const std::vector<float>& u, const std::vector<float>& v) {
    r.elements += static_cast<int64_t>(u.size());
    int64_t bad = u.size() == v.size() ? 0 : 1;
    for (size_t i = 0; u.size() == v.size() && i < u.size(); ++i)
      if (std::memcmp(&u[i], &v[i], sizeof(float)) != 0) ++bad;
    if (bad) os << " " << name << ": " << bad << " differ;";
    r.mismatches += bad;
  };
  one("logits", a.logits, b.logits);
  one("dispatch", a.dispatch, b.dispatch);
  one("combine", a.combine, b.combine);
  one("slots_in", a.slots_in, b.slots_in);
  one("y", a.y, b.y);
  one("d_slots_out", a.d_slots_out, b.d_slots_out);
  one("dx", a.dx, b.dx);
  one("dw_gate", a.dphi, b.dphi);
  one("dscale", a.dscale, b.dscale);
  r.max_error = r.mismatches ? INFINITY : 0;
  r.detail = os.str();
  return r;
}

template <class Elem>
void check_soft_moe_typed(const RouteCase& rc, uint64_t seed, cublasHandle_t handle,
                          std::vector<ParityResult>& out) {
  const LayerConfig& cfg = rc.cfg;
  const int64_t Tn = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
  const int64_t n = E * S;
  const char* dt = dtype_name<Elem>();
  constexpr bool kBf16 = !std::is_same_v<Elem, float>;

  // Inputs rounded to Elem, so that the reference (double) sees what the device sees. The
  // experts' weights stay as drawn: the experts run on the CPU in this check.
  const Params<float> pf = random_params<float>(cfg, seed);
  const std::vector<float> x = round_to<Elem>(normal(Tn * H, seed + 1)),
                           dy = round_to<Elem>(normal(Tn * H, seed + 2)),
                           phi = round_to<Elem>(pf.w_gate);
  Params<double> p = to_f64(pf);
  p.w_gate = to_f64(phi);
  const std::vector<double> xd = to_f64(x), dyd = to_f64(dy);

  // ---- reference in double: forward, backward, and the pieces the tolerances need
  SoftStep<double> s;
  std::vector<double> y_ref(Tn * H), dx_ref(Tn * H, 0.0);
  cpu::soft_moe_forward(cfg, p, xd.data(), s, y_ref.data(), nullptr);
  Params<double> g;
  g.w_gate.assign(p.w_gate.size(), 0.0);
  g.slot_scale.assign(1, 0.0);
  g.w_up.assign(p.w_up.size(), 0.0);
  g.w_down.assign(p.w_down.size(), 0.0);
  cpu::soft_moe_backward(cfg, p, xd.data(), s, dyd.data(), dx_ref.data(), g);
  // d_slots_out = C^T dy; dC = dy slots_out^T; dD = x d_slots_in^T
  std::vector<double> dso_ref(n * H), dC(Tn * n), dD(Tn * n), dsi(n * H, 0.0),
      dwu(p.w_up.size(), 0.0), dwd(p.w_down.size(), 0.0);
  cpu::gemm(true, false, n, H, Tn, 1.0, s.combine.data(), n, dyd.data(), H, 0.0, dso_ref.data(), H);
  cpu::gemm(false, true, Tn, n, H, 1.0, dyd.data(), H, s.slots_out.data(), H, 0.0, dC.data(), n);
  std::vector<int64_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * S;
  cpu::experts_backward(cfg, offsets.data(), E, p.w_up.data(), p.w_down.data(), s.slots_in.data(),
                        s.pre.data(), s.act.data(), dso_ref.data(), dsi.data(), dwu.data(),
                        dwd.data());
  cpu::gemm(false, true, Tn, n, H, 1.0, xd.data(), H, dsi.data(), H, 0.0, dD.data(), n);
  // The slot scale's gradient sums terms that cancel: its tolerance scales with what goes in
  // (cpu::soft_moe_scale_grad_magnitude_sq; 1e-2 of its norm for bf16).
  const double scale = p.slot_scale[0];
  const double m2 = cpu::soft_moe_scale_grad_magnitude_sq(
      Tn, n, s.dispatch.data(), dD.data(), s.combine.data(), dC.data(), s.logits.data(), scale);

  // ---- device, twice (fresh buffers each time: the second run checks determinism)
  const std::vector<float> slots_out = round_to<Elem>(
      std::vector<float>(s.slots_out.begin(), s.slots_out.end()));
  const SoftDeviceRun r = run_soft_moe_device<Elem>(handle, cfg, p, s, x, phi, float(scale),
                                                    slots_out, dy);
  const SoftDeviceRun again = run_soft_moe_device<Elem>(handle, cfg, p, s, x, phi, float(scale),
                                                        slots_out, dy);

  auto scaled = [](const std::vector<double>& ref, double rel) {
    double m = 0;
    for (double v : ref) m = std::max(m, std::abs(v));
    return rel * m + 1e-7;
  };
  // Rows carry the path's dtype (the storage of x, y and the weights); the norms, logits, dw_gate
  // and dscale are fp32 tensors on both paths.
  // fp32 router math on both paths: element-wise
  out.push_back(compare("soft_moe.x_inv_norm", dt, r.x_inv_norm, s.x_inv_norm, 0, 1e-5));
  out.push_back(compare("soft_moe.phi_inv_norm", dt, r.phi_inv_norm, s.phi_inv_norm, 0, 1e-5));
  // |x_hat phi_hat| <= 1, so an fp32 dot product of H terms is off by a few 1e-6 of scale at most
  // in practice (blocked sums); 2e-5 * |scale| leaves room and still catches any real error.
  out.push_back(compare("soft_moe.logits", dt, r.logits, s.logits, 2e-5 * std::abs(scale), 1e-4));
  // the weights: fp32 math, one rounding to Elem
  const double w_rtol = kBf16 ? 1.01 * storage_eps<Elem>() + 1e-4 : 1e-4;
  out.push_back(compare("soft_moe.dispatch", dt, r.dispatch, s.dispatch, 1e-7, w_rtol));
  out.push_back(compare("soft_moe.combine", dt, r.combine, s.combine, 1e-7, w_rtol));
  const double dscale_tol = (kBf16 ? 1e-2 : 1e-4) * std::sqrt(m2) + 1e-7;
  if constexpr (kBf16) {
    // GEMM outputs and gradients: relative Frobenius error <= 1e-2
    constexpr double kTol = 1e-2;
    out.push_back(compare_frobenius("soft_moe.slots_in", dt, r.slots_in, s.slots_in, kTol));
    out.push_back(compare_frobenius("soft_moe.y", dt, r.y, y_ref, kTol));
    out.push_back(compare_frobenius("soft_moe_backward.d_slots_out", dt, r.d_slots_out, dso_ref,
                                    kTol));
    out.push_back(compare_frobenius("soft_moe_backward.dx", dt, r.dx, dx_ref, kTol));
    out.push_back(compare_frobenius("soft_moe_backward.dw_gate", dt, r.dphi, g.w_gate, kTol));
  } else {
    auto loose = [&](const std::vector<double>& ref) { return scaled(ref, 1e-4); };
    out.push_back(compare("soft_moe.slots_in", dt, r.slots_in, s.slots_in, scaled(s.slots_in, 1e-5),
                          1e-4));
    out.push_back(compare("soft_moe.y", dt, r.y, y_ref, scaled(y_ref, 1e-5), 1e-4));
    out.push_back(compare("soft_moe_backward.d_slots_out", dt, r.d_slots_out, dso_ref,
                          loose(dso_ref), 1e-3));
    out.push_back(compare("soft_moe_backward.dx", dt, r.dx, dx_ref, loose(dx_ref), 1e-3));
    out.push_back(compare("soft_moe_backward.dw_gate", dt, r.dphi, g.w_gate, loose(g.w_gate), 1e-3));
  }
  out.push_back(compare("soft_moe_backward.dscale", dt, r.dscale, g.slot_scale, 0, 0, {dscale_tol}));
  out.push_back(compare_bits("soft_moe.repeat_bitwise", dt, r, again));
}

}  // namespace

std::vector<ParityResult> check_soft_moe(const RouteCase& rc, uint64_t seed) {
  std::vector<ParityResult> out;
  cublasHandle_t handle = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&handle));
  try {
    check_soft_moe_typed<float>(rc, seed, handle, out);
    check_soft_moe_typed<__nv_bfloat16>(rc, seed, handle, out);
  } catch (...) {
    cublasDestroy(handle);
    throw;
  }
  MOE_CUBLAS_CHECK(cublasDestroy(handle));
  return out;
}

}  // namespace moe::cuda
