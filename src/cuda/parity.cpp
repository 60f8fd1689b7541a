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
