// defines: moe::cuda::Skew, SyntheticRouting, synthetic_token_choice, synthetic_expert_choice,
//          parse_skew, name(Skew)
// Seeded random Routing for parity tests, `moe-bench check` and `moe-bench bench`, independent of
// any router: the plan, permute and combine stages see the load patterns they must handle.
//   uniform     each token picks K distinct experts uniformly
//   zipf        expert e is picked with probability proportional to 1/(e+1)^s (s = 1.2), K distinct
//   one_expert  every first choice is expert 0 (all tokens to one expert), the rest uniform
// Weights are random in (0, 1), normalised over the token's K choices.
#pragma once
#include <cstdint>
#include <string_view>

#include "moe/plan.hpp"

namespace moe::cuda {

enum class Skew { uniform, zipf, one_expert };
std::string_view name(Skew s);
Skew parse_skew(std::string_view text, std::string_view field = "routing");

struct SyntheticRouting {
  int64_t tokens = 0, experts = 0, top_k = 1;
  Skew skew = Skew::uniform;
  double zipf_exponent = 1.2;
  double no_expert_fraction = 0;  // choices k >= 1 set to kNoExpert (GShard's skipped 2nd choice)
  uint64_t seed = 0;
};

Routing<float> synthetic_token_choice(const SyntheticRouting& spec);
// Expert choice: every expert takes `capacity` distinct random tokens, best first.
Routing<float> synthetic_expert_choice(int64_t tokens, int64_t experts, int64_t capacity,
                                       uint64_t seed);

}  // namespace moe::cuda
