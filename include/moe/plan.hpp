// defines: Routing, DispatchPlan, build_plan, kPadToken, kDropped
// Routing says which expert each choice goes to and with which weight; the DispatchPlan turns it
// into rows of xp. The plan is built once per forward and reused by backward.
//
// Row order (every layout): experts ascending; inside one expert, choices in priority order:
// for token choice all k = 0 choices in token order, then all k = 1 choices, ... (so when capacity
// binds, first choices win over second choices, then earlier tokens win); for expert choice the
// expert's picks in descending score. The padded layout keeps the first C of that order and drops
// the rest; dropless keeps all; block pads each segment up to a multiple of block_size.
#pragma once
#include <cstdint>
#include <vector>

#include "moe/config.hpp"

namespace moe {

// Token index carried by padding rows (= T): permute writes zeros there, combine never reads them.
// (Compare with kPadToken(T) since T is a runtime value.)
inline int32_t kPadToken(int64_t tokens) { return static_cast<int32_t>(tokens); }
// Row of a choice that has no row (dropped by capacity, or skipped by a second-choice policy).
inline constexpr int32_t kDropped = -1;
// Expert of a choice that a policy decided not to route (GShard random / threshold second choice).
inline constexpr int32_t kNoExpert = -1;

// Choices of one routing step. Token choice: N = T*K choices, choice c = t*K + k.
// Expert choice: N = E*C choices, choice c = e*C + j (j-th best token of expert e).
template <class Real>
struct Routing {
  int64_t tokens = 0, experts = 0;
  int64_t top_k = 0;                  // K for token choice; 0 for expert choice
  std::vector<int32_t> choice_token;  // (N) token of each choice
  std::vector<int32_t> choice_expert; // (N) expert of each choice, or kNoExpert
  std::vector<Real> choice_weight;    // (N) combine weight (before any capacity drop)
  int64_t size() const { return static_cast<int64_t>(choice_token.size()); }
};

struct DispatchPlan {
  Layout layout = Layout::dropless;
  int64_t tokens = 0, experts = 0;
  int64_t rows = 0;                      // M, padding included
  int64_t capacity = 0;                  // padded: C; otherwise 0
  std::vector<int64_t> counts;           // (E) choices routed to each expert (before drops)
  std::vector<int64_t> kept;             // (E) choices that got a row (after drops)
  std::vector<int64_t> offsets;          // (E+1) segment starts in rows; offsets[E] = M
  std::vector<int32_t> row_token;        // (M) source token of each row, kPadToken for padding
  std::vector<int32_t> row_choice;       // (M) choice index of each row, -1 for padding
  // Token-major inverse, for a deterministic combine: a token's rows in choice order.
  std::vector<int64_t> token_offsets;    // (T+1)
  std::vector<int32_t> token_rows;       // (N) row of each of the token's choices, or kDropped
  std::vector<int32_t> token_choices;    // (N) the matching choice index
  std::vector<int32_t> choice_row;       // (N) row of each choice, or kDropped
  int64_t dropped_by_capacity = 0;       // choices over capacity
  int64_t skipped_by_policy = 0;         // choices with expert kNoExpert
  int64_t choices = 0;                   // N
};

// Build the plan for `layout`; `capacity` is used by the padded layout, `block_size` by block.
template <class Real>
DispatchPlan build_plan(const Routing<Real>& routing, Layout layout, int64_t capacity,
                        int64_t block_size);

}  // namespace moe
