// defines: build_plan (CPU reference)
// Counting sort of choices by expert in priority order; see include/moe/plan.hpp for the contract.
#include <algorithm>

#include "moe/check.hpp"
#include "moe/plan.hpp"

namespace moe {

template <class Real>
DispatchPlan build_plan(const Routing<Real>& routing, Layout layout, int64_t capacity,
                        int64_t block_size) {
  const int64_t T = routing.tokens, E = routing.experts, N = routing.size();
  const bool token_choice = routing.top_k > 0;
  const int64_t K = routing.top_k;
  MOE_ASSERT(!token_choice || N == T * K);
  MOE_ASSERT(block_size >= 1);
  DispatchPlan plan;
  plan.layout = layout;
  plan.tokens = T;
  plan.experts = E;
  plan.choices = N;
  plan.capacity = layout == Layout::padded ? capacity : 0;
  plan.counts.assign(E, 0);
  plan.kept.assign(E, 0);
  plan.offsets.assign(E + 1, 0);
  plan.choice_row.assign(N, kDropped);

  // Priority order: token choice visits (k, t) k-major, so first choices come before second
  // choices; expert choice visits choices in their stored order (expert-major, best first).
  auto priority = [&](int64_t i) -> int64_t {
    if (!token_choice) return i;
    const int64_t k = i / T, t = i % T;
    return t * K + k;
  };
  for (int64_t i = 0; i < N; ++i) {
    const int32_t e = routing.choice_expert[priority(i)];
    if (e == kNoExpert) { ++plan.skipped_by_policy; continue; }
    MOE_ASSERT(e >= 0 && e < E);
    ++plan.counts[e];
  }
  for (int64_t e = 0; e < E; ++e) {
    int64_t kept = plan.counts[e], len = kept;
    if (layout == Layout::padded) {
      kept = std::min(kept, capacity);
      len = capacity;
    } else if (layout == Layout::block) {
      len = (kept + block_size - 1) / block_size * block_size;
    }
    plan.kept[e] = kept;
    plan.offsets[e + 1] = plan.offsets[e] + len;
  }
  plan.rows = plan.offsets[E];
  plan.row_token.assign(plan.rows, kPadToken(T));
  plan.row_choice.assign(plan.rows, -1);

  std::vector<int64_t> fill(E, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = priority(i);
    const int32_t e = routing.choice_expert[c];
    if (e == kNoExpert) continue;
    if (fill[e] >= plan.kept[e]) { ++plan.dropped_by_capacity; continue; }
    const int64_t r = plan.offsets[e] + fill[e]++;
    plan.row_token[r] = routing.choice_token[c];
    plan.row_choice[r] = static_cast<int32_t>(c);
    plan.choice_row[c] = static_cast<int32_t>(r);
  }

  // Token-major inverse: a token's choices in choice order (k order, or expert order for
  // expert choice, whose choices are stored expert-major).
  plan.token_offsets.assign(T + 1, 0);
  for (int64_t c = 0; c < N; ++c) ++plan.token_offsets[routing.choice_token[c] + 1];
  for (int64_t t = 0; t < T; ++t) plan.token_offsets[t + 1] += plan.token_offsets[t];
  plan.token_rows.assign(N, kDropped);
  plan.token_choices.assign(N, -1);
  std::vector<int64_t> pos(plan.token_offsets.begin(), plan.token_offsets.end() - 1);
  for (int64_t c = 0; c < N; ++c) {
    const int64_t slot = pos[routing.choice_token[c]]++;
    plan.token_rows[slot] = plan.choice_row[c];
    plan.token_choices[slot] = static_cast<int32_t>(c);
  }
  return plan;
}

template DispatchPlan build_plan<float>(const Routing<float>&, Layout, int64_t, int64_t);
template DispatchPlan build_plan<double>(const Routing<double>&, Layout, int64_t, int64_t);

}  // namespace moe
