// defines: name(...), parse_*(...), LayerConfig::validate and the derived quantities
#include <cmath>
#include <sstream>

#include "moe/check.hpp"
#include "moe/config.hpp"

namespace moe {

namespace {
template <class Enum, size_t N>
Enum parse_enum(std::string_view text, std::string_view field,
                const std::pair<std::string_view, Enum> (&table)[N]) {
  for (const auto& [n, v] : table)
    if (n == text) return v;
  std::ostringstream allowed;
  for (size_t i = 0; i < N; ++i) allowed << (i ? ", " : "") << table[i].first;
  MOE_FAIL(field, ": unknown value '", text, "' (allowed: ", allowed.str(), ")");
}

constexpr std::pair<std::string_view, Router> kRouterNames[] = {
    {"softmax_topk", Router::softmax_topk},   {"noisy_topk", Router::noisy_topk},
    {"switch", Router::switch_top1},          {"expert_choice", Router::expert_choice},
    {"soft_moe", Router::soft_moe},           {"sigmoid_bias", Router::sigmoid_bias},
    {"chain_of_experts", Router::chain_of_experts}};
constexpr std::pair<std::string_view, Layout> kLayoutNames[] = {
    {"padded", Layout::padded}, {"dropless", Layout::dropless}, {"block", Layout::block}};
constexpr std::pair<std::string_view, Activation> kActivationNames[] = {
    {"gelu", Activation::gelu}, {"swiglu", Activation::swiglu}};
constexpr std::pair<std::string_view, SecondPolicy> kPolicyNames[] = {
    {"all", SecondPolicy::all}, {"random", SecondPolicy::random},
    {"threshold", SecondPolicy::threshold}, {"none", SecondPolicy::none}};

template <class Enum, size_t N>
std::string_view find_name(Enum v, const std::pair<std::string_view, Enum> (&table)[N]) {
  for (const auto& [n, e] : table)
    if (e == v) return n;
  return "?";
}
}  // namespace

std::string_view name(Router r) { return find_name(r, kRouterNames); }
std::string_view name(Layout l) { return find_name(l, kLayoutNames); }
std::string_view name(Activation a) { return find_name(a, kActivationNames); }
std::string_view name(SecondPolicy p) { return find_name(p, kPolicyNames); }
Router parse_router(std::string_view t, std::string_view f) { return parse_enum(t, f, kRouterNames); }
Layout parse_layout(std::string_view t, std::string_view f) { return parse_enum(t, f, kLayoutNames); }
Activation parse_activation(std::string_view t, std::string_view f) {
  return parse_enum(t, f, kActivationNames);
}
SecondPolicy parse_second_policy(std::string_view t, std::string_view f) {
  return parse_enum(t, f, kPolicyNames);
}

bool is_sparse(Router r) { return r != Router::soft_moe; }
bool is_token_choice(Router r) { return r != Router::soft_moe && r != Router::expert_choice; }

void LayerConfig::validate() const {
  // Shapes are limited to int32 row/token indices (the plan stores them as int32).
  constexpr int64_t kMaxIndex = int64_t{1} << 30;
  MOE_CHECK(tokens >= 0 && tokens < kMaxIndex, "tokens must be in [0, 2^30), got ", tokens);
  MOE_CHECK(hidden >= 1 && hidden < kMaxIndex, "hidden must be >= 1, got ", hidden);
  MOE_CHECK(inter >= 1 && inter < kMaxIndex, "inter must be >= 1, got ", inter);
  MOE_CHECK(experts >= 1 && experts <= 4096, "experts must be in [1, 4096], got ", experts);
  MOE_CHECK(shared_experts >= 0 && shared_experts <= 64, "shared-experts must be in [0, 64], got ",
            shared_experts);
  if (router == Router::switch_top1)
    MOE_CHECK(top_k == 1, "top-k must be 1 for the switch router, got ", top_k);
  if (is_token_choice(router))
    MOE_CHECK(top_k >= 1 && top_k <= experts, "top-k must be in [1, experts=", experts, "], got ",
              top_k);
  if (router == Router::chain_of_experts) {
    MOE_CHECK(iterations >= 1 && iterations <= 16, "iterations must be in [1, 16], got ",
              iterations);
    MOE_CHECK(top_k % iterations == 0, "top-k (", top_k,
              ") must be a multiple of iterations (", iterations, ") for chain_of_experts");
  }
  MOE_CHECK(std::isfinite(capacity_factor), "capacity-factor must be finite");
  if ((layout == Layout::padded && is_sparse(router)) || router == Router::expert_choice)
    MOE_CHECK(capacity_factor > 0, "capacity-factor must be > 0 with the ",
              router == Router::expert_choice ? "expert_choice router" : "padded layout",
              ", got ", capacity_factor);
  MOE_CHECK(block_size >= 1 && block_size <= 65536, "block-size must be in [1, 65536], got ",
            block_size);
  MOE_CHECK(slots_per_expert >= 1 && slots_per_expert <= 65536,
            "slots-per-expert must be in [1, 65536], got ", slots_per_expert);
  MOE_CHECK(second_threshold > 0 && std::isfinite(second_threshold),
            "second-threshold must be > 0, got ", second_threshold);
  if (second_policy != SecondPolicy::all)
    MOE_CHECK(router == Router::softmax_topk && top_k == 2,
              "second-policy other than 'all' needs --router softmax_topk and --top-k 2");
  auto nonneg = [](double v, const char* field) {
    MOE_CHECK(std::isfinite(v) && v >= 0, field, " must be a finite value >= 0, got ", v);
  };
  nonneg(importance_coef, "importance-coef");
  nonneg(load_coef, "load-coef");
  MOE_CHECK(std::isfinite(aux_coef), "aux-coef must be finite");
  // A coefficient that nothing reads would be a silent no-op: refuse it.
  MOE_CHECK(aux_coef < 0 || (router != Router::noisy_topk && router != Router::expert_choice &&
                             router != Router::soft_moe),
            "aux-coef does not apply to the ", name(router),
            " router (noisy_topk: use --importance-coef and --load-coef; expert_choice and "
            "soft_moe have no balance loss)");
  MOE_CHECK(std::isfinite(z_coef), "z-coef must be finite");
  MOE_CHECK(noise_epsilon > 0 && std::isfinite(noise_epsilon), "noise-epsilon must be > 0, got ",
            noise_epsilon);
  MOE_CHECK(jitter >= 0 && jitter < 1, "jitter must be in [0, 1), got ", jitter);
  MOE_CHECK(route_scale > 0 && std::isfinite(route_scale), "route-scale must be > 0, got ",
            route_scale);
  nonneg(bias_update_rate, "bias-update-rate");
  MOE_CHECK(sequence_length >= 0, "sequence-length must be >= 0, got ", sequence_length);
  if (sequence_length > 0 && tokens > 0)
    MOE_CHECK(tokens % sequence_length == 0, "sequence-length (", sequence_length,
              ") must divide tokens (", tokens, ")");
}

int64_t LayerConfig::choices_per_step() const {
  if (router == Router::chain_of_experts) return top_k / iterations;
  return top_k;
}

int64_t LayerConfig::capacity() const {
  if (router == Router::expert_choice) {
    // Each expert takes C = ceil(cf * T / E) tokens, at most all of them.
    const double c = std::ceil(capacity_factor * static_cast<double>(tokens) / experts - 1e-9);
    return std::min<int64_t>(tokens, static_cast<int64_t>(c));
  }
  if (layout != Layout::padded) return 0;
  const double c = std::ceil(capacity_factor * static_cast<double>(tokens) * choices_per_step() /
                             experts - 1e-9);
  return static_cast<int64_t>(c);
}

double LayerConfig::resolved_aux_coef() const {
  if (aux_coef >= 0) return aux_coef;
  switch (router) {
    case Router::softmax_topk:
    case Router::switch_top1: return 1e-2;        // GShard / Switch
    case Router::chain_of_experts: return 1e-3;   // CoE (DeepSeek-V2 seq-aux alpha)
    default: return 0;  // noisy_topk has its own two losses; EC/soft/sigmoid_bias use none
  }
}

double LayerConfig::resolved_z_coef() const {
  if (z_coef >= 0) return z_coef;
  switch (router) {
    case Router::softmax_topk:
    case Router::switch_top1: return 1e-3;  // ST-MoE / OLMoE
    default: return 0;
  }
}

std::string LayerConfig::summary() const {
  std::ostringstream os;
  os << "router=" << name(router) << " T=" << tokens << " H=" << hidden << " I=" << inter
     << " E=" << experts << " K=" << top_k << " shared=" << shared_experts
     << " activation=" << name(activation) << " layout=" << name(layout)
     << " cf=" << capacity_factor << " block=" << block_size << " training=" << training
     << " seed=" << seed;
  return os.str();
}

}  // namespace moe
