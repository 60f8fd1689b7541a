// defines: synthetic_token_choice, synthetic_expert_choice (seeded random Routing)
#include "moe/cuda/synthetic.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moe/check.hpp"
#include "moe/rng.hpp"

namespace moe::cuda {

std::string_view name(Skew s) {
  switch (s) {
    case Skew::uniform: return "uniform";
    case Skew::zipf: return "zipf";
    case Skew::one_expert: return "one_expert";
  }
  return "?";
}

Skew parse_skew(std::string_view text, std::string_view field) {
  for (Skew s : {Skew::uniform, Skew::zipf, Skew::one_expert})
    if (name(s) == text) return s;
  MOE_FAIL(field, ": unknown value '", text, "' (allowed: uniform, zipf, one_expert)");
}

namespace {
// Counter-based draws (moe/rng.hpp) keyed by (token, k, attempt): a shape's routing does not
// depend on the order in which it is generated.
double draw(uint64_t seed, uint64_t index) {
  return counter_uniform(seed, RngStream::init, index);
}
}  // namespace

Routing<float> synthetic_token_choice(const SyntheticRouting& s) {
  MOE_CHECK(s.experts >= 1 && s.top_k >= 1 && s.top_k <= s.experts,
            "top-k must be in [1, experts], got ", s.top_k);
  const int64_t T = s.tokens, E = s.experts, K = s.top_k;
  Routing<float> r;
  r.tokens = T;
  r.experts = E;
  r.top_k = K;
  r.choice_token.resize(T * K);
  r.choice_expert.resize(T * K);
  r.choice_weight.resize(T * K);
  std::vector<double> popularity(E, 1.0);
  if (s.skew == Skew::zipf)
    for (int64_t e = 0; e < E; ++e) popularity[e] = 1.0 / std::pow(e + 1.0, s.zipf_exponent);
  std::vector<double> left(E);
  std::vector<int32_t> picked;
  for (int64_t t = 0; t < T; ++t) {
    // Sampling without replacement: draw from the remaining mass, remove the pick.
    left = popularity;
    double mass = std::accumulate(left.begin(), left.end(), 0.0);
    picked.clear();
    uint64_t n = static_cast<uint64_t>(t) * 4096 * 4;
    for (int64_t k = 0; k < K; ++k) {
      int32_t e = 0;
      if (k == 0 && s.skew == Skew::one_expert) {
        e = 0;
      } else {
        double u = draw(s.seed, n++) * mass;
        e = static_cast<int32_t>(E - 1);
        for (int64_t i = 0; i < E; ++i) {
          if (left[i] <= 0) continue;
          if (u < left[i]) { e = static_cast<int32_t>(i); break; }
          u -= left[i];
        }
        while (left[e] <= 0) e = (e + E - 1) % E;  // rounding at the end of the range
      }
      mass -= left[e];
      left[e] = 0;
      picked.push_back(e);
    }
    double sum = 0;
    std::vector<double> w(K);
    for (int64_t k = 0; k < K; ++k) sum += (w[k] = 0.05 + draw(s.seed ^ 0x5bd1e995, t * K + k));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = t * K + k;
      r.choice_token[c] = static_cast<int32_t>(t);
      r.choice_expert[c] = picked[k];
      r.choice_weight[c] = static_cast<float>(w[k] / sum);
      if (k > 0 && s.no_expert_fraction > 0 && draw(s.seed ^ 0x27d4eb2f, c) < s.no_expert_fraction)
        r.choice_expert[c] = kNoExpert;
    }
  }
  return r;
}

Routing<float> synthetic_expert_choice(int64_t tokens, int64_t experts, int64_t capacity,
                                       uint64_t seed) {
  MOE_CHECK(capacity >= 0 && capacity <= tokens, "capacity must be in [0, tokens], got ",
            capacity);
  Routing<float> r;
  r.tokens = tokens;
  r.experts = experts;
  r.top_k = 0;
  const int64_t N = experts * capacity;
  r.choice_token.resize(N);
  r.choice_expert.resize(N);
  r.choice_weight.resize(N);
  std::vector<int32_t> order(tokens);
  for (int64_t e = 0; e < experts; ++e) {
    std::iota(order.begin(), order.end(), 0);
    for (int64_t j = 0; j < capacity; ++j) {  // partial Fisher-Yates: C distinct tokens
      const int64_t pick = j + static_cast<int64_t>(draw(seed, e * tokens + j) * (tokens - j));
      std::swap(order[j], order[std::min(pick, tokens - 1)]);
      const int64_t c = e * capacity + j;
      r.choice_token[c] = order[j];
      r.choice_expert[c] = static_cast<int32_t>(e);
      r.choice_weight[c] = static_cast<float>(draw(seed ^ 0x5bd1e995, c));
    }
  }
  return r;
}

}  // namespace moe::cuda
