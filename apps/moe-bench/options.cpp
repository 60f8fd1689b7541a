// defines: add_layer_options, add_backend_option, seeded_normal, parameter_shape, ordered_stages,
//          stage_times_json, run_layer_case (see options.hpp)
#include "moe-bench/options.hpp"

#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <unistd.h>

#include "moe/check.hpp"
#include "moe/rng.hpp"

namespace moe_bench {

namespace {

template <class Enum, size_t N>
std::string allowed(const Enum (&values)[N]) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += (i ? "|" : "") + std::string(moe::name(values[i]));
  return s;
}

template <class T>
CLI::Option* number(CLI::App& app, const std::string& flag, T& value, const std::string& help) {
  return app.add_option(flag, value, help)->capture_default_str();
}

// An enum option read as text; `parse` throws moe::ConfigError naming the allowed values.
template <class Enum, class Parse>
CLI::Option* choice(CLI::App& app, const std::string& flag, Enum& value, Parse parse,
                    const std::string& help, const std::string& type_name) {
  return app
      .add_option_function<std::string>(
          flag, [&value, parse](const std::string& text) { value = parse(text); }, help)
      ->default_str(std::string(moe::name(value)))
      ->type_name(type_name);
}

}  // namespace

void add_layer_options(CLI::App& app, moe::LayerConfig& cfg, bool with_router) {
  using moe::Activation, moe::Layout, moe::Router, moe::SecondPolicy;
  const std::string shape = "Layer shape";
  number(app, "--tokens", cfg.tokens, "T, tokens in the batch")->group(shape);
  number(app, "--hidden", cfg.hidden, "H, model width")->group(shape);
  number(app, "--inter", cfg.inter, "I, hidden units of one expert")->group(shape);
  number(app, "--experts", cfg.experts, "E, routed experts")->group(shape);
  number(app, "--top-k", cfg.top_k,
         "K, experts per token (chain_of_experts: total over all iterations)")
      ->group(shape);
  number(app, "--shared-experts", cfg.shared_experts, "always-active experts")->group(shape);
  constexpr Activation kActivations[] = {Activation::gelu, Activation::swiglu};
  choice(app, "--activation", cfg.activation,
         [](const std::string& s) { return moe::parse_activation(s, "activation"); },
         "expert activation", allowed(kActivations))
      ->group(shape);

  const std::string router = "Router";
  if (with_router)
    choice(app, "--router", cfg.router,
           [](const std::string& s) { return moe::parse_router(s, "router"); },
           "routing algorithm", allowed(moe::kAllRouters))
        ->group(router);
  number(app, "--seed", cfg.seed, "seed of parameters, inputs, noise and jitter")->group(router);
  app.add_flag_callback("--eval", [&cfg] { cfg.training = false; },
                        "evaluation mode: no noise, jitter, random second choice or bias update "
                        "(default: training)")
      ->group(router);
  const std::string renormalize_default = cfg.renormalize ? "on" : "off";
  app.add_flag_callback("--renormalize", [&cfg] { cfg.renormalize = true; },
                        "softmax_topk: divide the kept weights by their sum (default: " +
                            renormalize_default + ")")
      ->group(router);
  app.add_flag_callback("--no-renormalize", [&cfg] { cfg.renormalize = false; },
                        "softmax_topk: keep the softmax weights as they are")
      ->group(router);
  constexpr SecondPolicy kPolicies[] = {SecondPolicy::all, SecondPolicy::random,
                                        SecondPolicy::threshold, SecondPolicy::none};
  choice(app, "--second-policy", cfg.second_policy,
         [](const std::string& s) { return moe::parse_second_policy(s, "second-policy"); },
         "GShard second-choice policy (softmax_topk, K=2)", allowed(kPolicies))
      ->group(router);
  number(app, "--second-threshold", cfg.second_threshold,
         "GShard threshold of the second choice")
      ->group(router);
  number(app, "--aux-coef", cfg.aux_coef, "load-balance loss coefficient (< 0: router default)")
      ->group(router);
  number(app, "--z-coef", cfg.z_coef, "router z-loss coefficient (< 0: router default)")
      ->group(router);
  number(app, "--importance-coef", cfg.importance_coef, "noisy_topk: importance loss weight")
      ->group(router);
  number(app, "--load-coef", cfg.load_coef, "noisy_topk: load loss weight")->group(router);
  number(app, "--noise-epsilon", cfg.noise_epsilon, "noisy_topk: noise floor epsilon")
      ->group(router);
  number(app, "--jitter", cfg.jitter, "switch: multiplicative input jitter epsilon")->group(router);
  number(app, "--slots-per-expert", cfg.slots_per_expert, "soft_moe: S slots per expert")
      ->group(router);
  number(app, "--route-scale", cfg.route_scale, "sigmoid_bias: weight scale")->group(router);
  number(app, "--bias-update-rate", cfg.bias_update_rate, "sigmoid_bias: bias update rate u")
      ->group(router);
  number(app, "--iterations", cfg.iterations, "chain_of_experts: sequential iterations")
      ->group(router);
  number(app, "--sequence-length", cfg.sequence_length,
         "tokens per sequence for sequence-wise aux losses (0: one group)")
      ->group(router);

  const std::string layout = "Layout";
  constexpr Layout kLayouts[] = {Layout::padded, Layout::dropless, Layout::block};
  choice(app, "--layout", cfg.layout,
         [](const std::string& s) { return moe::parse_layout(s, "layout"); },
         "rows of the dispatch plan", allowed(kLayouts))
      ->group(layout);
  number(app, "--capacity-factor", cfg.capacity_factor,
         "padded: C = ceil(cf*T*K/E); expert_choice: C = ceil(cf*T/E)")
      ->group(layout);
  number(app, "--block-size", cfg.block_size, "block layout: segment size multiple")
      ->group(layout);
}

void add_backend_option(CLI::App& app, std::string& backend) {
  app.add_option_function<std::string>(
         "--backend",
         [&backend](const std::string& text) {
           MOE_CHECK(text == "cpu", "backend: unknown value '", text, "' (allowed: cpu)");
           backend = text;
         },
         "where the layer runs (only cpu for now)")
      ->default_str(backend)
      ->type_name("NAME");
}

template <class Real>
std::vector<Real> seeded_normal(size_t n, uint64_t seed, uint64_t tag) {
  // The init stream of a seed mixed with the tag: independent of the parameters' draws.
  const uint64_t s = moe::splitmix64(seed ^ (tag << 32) ^ 0x5eedc0deull);
  std::vector<Real> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<Real>(moe::counter_normal(s, moe::RngStream::init, i));
  return v;
}
template std::vector<float> seeded_normal<float>(size_t, uint64_t, uint64_t);
template std::vector<double> seeded_normal<double>(size_t, uint64_t, uint64_t);

std::vector<int64_t> parameter_shape(const moe::LayerConfig& cfg, const std::string& name,
                                     size_t numel) {
  const int64_t H = cfg.hidden, E = cfg.experts, I = cfg.inter, A = cfg.up_width();
  const int64_t S = cfg.shared_experts;
  std::vector<int64_t> shape;
  if (name == "router.w_gate") {
    if (cfg.router == moe::Router::soft_moe) shape = {H, E * cfg.slots_per_expert};
    else shape = {cfg.router == moe::Router::chain_of_experts ? cfg.iterations : 1, H, E};
  } else if (name == "router.w_noise") {
    shape = {H, E};
  } else if (name == "router.slot_scale") {
    shape = {1};
  } else if (name == "router.expert_bias") {
    shape = {E};
  } else if (name == "experts.w_up") {
    shape = {E, H, A};
  } else if (name == "experts.w_down") {
    shape = {E, I, H};
  } else if (name == "shared.w_up") {
    shape = {S, H, A};
  } else if (name == "shared.w_down") {
    shape = {S, I, H};
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  if (shape.empty() || n != static_cast<int64_t>(numel)) shape = {static_cast<int64_t>(numel)};
  return shape;
}

std::vector<std::pair<std::string, double>> ordered_stages(const moe::StageTimes& times) {
  static const char* const kOrder[] = {"gate",    "route",   "plan",   "permute",
                                       "experts", "combine", "shared", "soft_moe"};
  std::vector<std::pair<std::string, double>> out;
  for (const char* stage : kOrder)
    if (const auto it = times.ms.find(stage); it != times.ms.end()) out.emplace_back(*it);
  for (const auto& [stage, ms] : times.ms)
    if (std::find(std::begin(kOrder), std::end(kOrder), stage) == std::end(kOrder))
      out.emplace_back(stage, ms);
  return out;
}

nlohmann::ordered_json stage_times_json(const moe::StageTimes& times, double total) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [stage, ms] : ordered_stages(times)) j[stage] = ms;
  j["total"] = total;
  return j;
}

double estimate_case_bytes(const moe::LayerConfig& c, size_t real_size) {
  const double T = static_cast<double>(c.tokens), H = static_cast<double>(c.hidden);
  const double E = static_cast<double>(c.experts), I = static_cast<double>(c.inter);
  const double A = static_cast<double>(c.up_width()), S = static_cast<double>(c.shared_experts);
  const bool chain = c.router == moe::Router::chain_of_experts;
  const double steps = chain ? static_cast<double>(c.iterations) : 1;
  double rows;  // rows of xp per step (slots for soft MoE)
  if (c.router == moe::Router::soft_moe) rows = E * static_cast<double>(c.slots_per_expert);
  else if (c.router == moe::Router::expert_choice) rows = E * static_cast<double>(c.capacity());
  else rows = T * static_cast<double>(c.choices_per_step());
  if (c.layout == moe::Layout::padded && moe::is_sparse(c.router))
    rows = std::max(rows, E * static_cast<double>(c.capacity()));
  if (c.layout == moe::Layout::block) rows += E * static_cast<double>(c.block_size);
  const double gate_cols = c.router == moe::Router::soft_moe ? E * static_cast<double>(c.slots_per_expert) : E;
  const double per_step = rows * (2 * H + A + I) + T * (2 * H + 6 * gate_cols);
  const double activations = steps * per_step + S * T * (A + I);
  const double tokens = 6 * T * H;                         // x, dy, dx, y and the case's copies
  const double weights = (E + S) * (H * A + I * H) + steps * H * gate_cols * 2;
  // Backward holds gradients the size of the activations and of the weights.
  return real_size * (tokens + 2 * activations + 2 * weights);
}

void check_case_fits_in_memory(const moe::LayerConfig& cfg, size_t real_size) {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return;  // unknown: let the allocator decide
  const double physical = static_cast<double>(pages) * static_cast<double>(page);
  const double need = estimate_case_bytes(cfg, real_size);
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  MOE_CHECK(need <= 0.8 * physical, "this layer needs about ", fmt::format("{:.1f}", need / kGiB),
            " GiB, more than this machine's ", fmt::format("{:.1f}", physical / kGiB),
            " GiB allow; use fewer --tokens, a smaller --hidden/--inter or fewer --experts");
}

template <class Real>
void run_layer_case(LayerCase<Real>& c) {
  using Clock = std::chrono::steady_clock;
  c.cfg.validate();
  check_case_fits_in_memory(c.cfg, sizeof(Real));
  const size_t n = static_cast<size_t>(c.cfg.tokens * c.cfg.hidden);
  if (c.x.empty()) c.x = seeded_normal<Real>(n, c.cfg.seed, kInputTag);
  if (c.dy.empty()) c.dy = seeded_normal<Real>(n, c.cfg.seed, kUpstreamTag);
  MOE_ASSERT(c.x.size() == n && c.dy.size() == n);

  auto t0 = Clock::now();
  moe::layer_forward(c.cfg, c.params, c.x.data(), c.fwd);
  c.forward_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();

  c.dx.assign(n, Real(0));
  c.backward_times = {};
  t0 = Clock::now();
  moe::layer_backward(c.cfg, c.params, c.x.data(), c.fwd, c.dy.data(), c.dx.data(), c.grads,
                      &c.backward_times);
  c.backward_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
template void run_layer_case<float>(LayerCase<float>&);
template void run_layer_case<double>(LayerCase<double>&);

}  // namespace moe_bench
