// Properties of the reference layer, each checked against a formulation written independently
// here: permute copies rows and combine forms the weighted sum of a token's rows; the layer equals
// a naive dense loop over (token, choice); every choice lands in exactly one row or is counted as
// dropped; expert choice fills every expert; padded equals dropless when nothing drops; the block
// layout pads with kPadToken; capacity priority and tie-breaking follow plan.hpp; router weights
// follow the papers; T = 0 works; build_plan on hand-made routings gives the hand-computed rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/layer.hpp"
#include "moe/plan.hpp"
#include "moe/stats.hpp"
#include "test_common.hpp"

namespace moe::test {
namespace {

// ---------------------------------------------------------------------------------------------
// Independent formulations
// ---------------------------------------------------------------------------------------------

double gelu_erf(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
double silu(double v) { return v / (1.0 + std::exp(-v)); }

// One expert FFN on one input vector, with naive loops: act(x W_up) W_down.
// w_up (H, A) with A = I (GELU) or 2I ([gate | up], SwiGLU), w_down (I, H).
std::vector<double> naive_ffn(const LayerConfig& cfg, const double* w_up, const double* w_down,
                              const double* x) {
  const int64_t H = cfg.hidden, I = cfg.inter, A = cfg.up_width();
  std::vector<double> pre(A, 0.0), act(I), out(H, 0.0);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t h = 0; h < H; ++h) pre[a] += x[h] * w_up[h * A + a];
  for (int64_t i = 0; i < I; ++i)
    act[i] = cfg.activation == Activation::swiglu ? silu(pre[i]) * pre[I + i] : gelu_erf(pre[i]);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < I; ++i) out[h] += act[i] * w_down[i * H + h];
  return out;
}

// Sum of the shared experts on every token of `in` (T, H).
std::vector<double> naive_shared(const LayerConfig& cfg, const Params<double>& p,
                                 const std::vector<double>& in) {
  const int64_t T = cfg.tokens, H = cfg.hidden, I = cfg.inter, A = cfg.up_width();
  std::vector<double> y(T * H, 0.0);
  for (int64_t s = 0; s < cfg.shared_experts; ++s)
    for (int64_t t = 0; t < T; ++t) {
      const auto o = naive_ffn(cfg, &p.shared_up[s * H * A], &p.shared_down[s * I * H], &in[t * H]);
      for (int64_t h = 0; h < H; ++h) y[t * H + h] += o[h];
    }
  return y;
}

// sum over kept choices c of token t: weight_c * FFN_{expert_c}(in_t), from the routing and plan
// of one step, in a dense loop over all choices (no rows involved).
std::vector<double> naive_routed(const LayerConfig& cfg, const Params<double>& p,
                                 const RouteStep<double>& s, const std::vector<double>& in) {
  const int64_t T = cfg.tokens, H = cfg.hidden, I = cfg.inter, A = cfg.up_width();
  std::vector<double> y(T * H, 0.0);
  const auto& r = s.routing;
  for (int64_t c = 0; c < r.size(); ++c) {
    const int32_t e = r.choice_expert[c], t = r.choice_token[c];
    if (e == kNoExpert || s.plan.choice_row[c] == kDropped) continue;
    const auto o = naive_ffn(cfg, &p.w_up[e * H * A], &p.w_down[e * I * H], &in[t * H]);
    for (int64_t h = 0; h < H; ++h) y[t * H + h] += r.choice_weight[c] * o[h];
  }
  return y;
}

// Top-k of one score row: value descending, ties to the lower expert index.
std::vector<int32_t> topk(const double* score, int64_t E, int64_t K) {
  std::vector<int32_t> idx(E);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int32_t a, int32_t b) { return score[a] > score[b]; });
  idx.resize(K);
  return idx;
}

std::vector<double> softmax_row(const double* z, int64_t n) {
  double m = z[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, z[i]);
  std::vector<double> p(n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += p[i] = std::exp(z[i] - m);
  for (auto& v : p) v /= s;
  return p;
}

// ---------------------------------------------------------------------------------------------
// The plan invariants (plan.hpp), checked on any routing and plan.
// ---------------------------------------------------------------------------------------------
template <class Real>
void expect_plan_invariants(const Routing<Real>& routing, const DispatchPlan& plan,
                            Layout layout, int64_t capacity, int64_t block_size,
                            const std::string& where) {
  SCOPED_TRACE(where);
  const int64_t T = routing.tokens, E = routing.experts, N = routing.size(), M = plan.rows;
  const int32_t pad = kPadToken(T);
  ASSERT_EQ(plan.layout, layout);
  ASSERT_EQ(plan.tokens, T);
  ASSERT_EQ(plan.experts, E);
  ASSERT_EQ(plan.choices, N);
  ASSERT_EQ(plan.counts.size(), static_cast<size_t>(E));
  ASSERT_EQ(plan.kept.size(), static_cast<size_t>(E));
  ASSERT_EQ(plan.offsets.size(), static_cast<size_t>(E + 1));
  ASSERT_EQ(plan.row_token.size(), static_cast<size_t>(M));
  ASSERT_EQ(plan.row_choice.size(), static_cast<size_t>(M));
  ASSERT_EQ(plan.token_offsets.size(), static_cast<size_t>(T + 1));
  ASSERT_EQ(plan.token_rows.size(), static_cast<size_t>(N));
  ASSERT_EQ(plan.token_choices.size(), static_cast<size_t>(N));
  ASSERT_EQ(plan.choice_row.size(), static_cast<size_t>(N));
  ASSERT_EQ(plan.offsets[0], 0);
  ASSERT_EQ(plan.offsets[E], M);
  for (int64_t e = 0; e < E; ++e) ASSERT_LE(plan.offsets[e], plan.offsets[e + 1]);

  // counts and policy skips, from the routing alone
  std::vector<int64_t> counts(E, 0);
  int64_t skipped = 0;
  std::vector<std::vector<int32_t>> by_expert(E);  // choices of each expert, priority order
  for (int64_t c = 0; c < N; ++c) {
    const int32_t e = routing.choice_expert[c];
    ASSERT_GE(routing.choice_token[c], 0);
    ASSERT_LT(routing.choice_token[c], T);
    if (e == kNoExpert) {
      ++skipped;
      EXPECT_EQ(plan.choice_row[c], kDropped) << "a skipped choice has no row, choice " << c;
      continue;
    }
    ASSERT_GE(e, 0);
    ASSERT_LT(e, E);
    ++counts[e];
    by_expert[e].push_back(static_cast<int32_t>(c));
  }
  if (routing.top_k > 0) {
    // token choice: all k = 0 choices in token order, then k = 1, ...
    const int64_t K = routing.top_k;
    for (auto& v : by_expert)
      std::stable_sort(v.begin(), v.end(), [K](int32_t a, int32_t b) {
        return std::make_pair(a % K, a / K) < std::make_pair(b % K, b / K);
      });
  }  // expert choice: choice index order is the expert's pick order (descending score)
  EXPECT_EQ(plan.counts, counts);
  EXPECT_EQ(plan.skipped_by_policy, skipped);

  // every row: a padding row, or the row of exactly one choice of its own expert
  std::vector<int64_t> rows_of_choice(N, 0);
  int64_t kept_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = plan.offsets[e], len = plan.offsets[e + 1] - r0;
    int64_t kept = 0;
    bool seen_pad = false;
    for (int64_t r = r0; r < r0 + len; ++r) {
      const int32_t c = plan.row_choice[r];
      if (c == -1) {
        EXPECT_EQ(plan.row_token[r], pad) << "padding row " << r << " must carry kPadToken";
        seen_pad = true;
        continue;
      }
      EXPECT_FALSE(seen_pad) << "expert " << e << ": a kept row after padding at row " << r;
      ASSERT_GE(c, 0);
      ASSERT_LT(c, N);
      EXPECT_EQ(routing.choice_expert[c], e) << "row " << r << " sits in the wrong segment";
      EXPECT_EQ(plan.row_token[r], routing.choice_token[c]) << "row " << r;
      EXPECT_EQ(plan.choice_row[c], r) << "choice " << c;
      ++rows_of_choice[c];
      // priority order: the segment's kept rows are the first `kept` choices of the expert
      if (kept < static_cast<int64_t>(by_expert[e].size())) {
        EXPECT_EQ(c, by_expert[e][kept]) << "expert " << e << " position " << kept
                                         << ": rows are not in priority order";
      }
      ++kept;
    }
    EXPECT_EQ(plan.kept[e], kept) << "expert " << e;
    kept_total += kept;
    switch (layout) {
      case Layout::dropless:
        EXPECT_EQ(len, counts[e]) << "dropless segment " << e << " has padding";
        EXPECT_EQ(kept, counts[e]);
        break;
      case Layout::padded:
        EXPECT_EQ(len, capacity) << "padded segment " << e << " must hold C rows";
        EXPECT_EQ(kept, std::min(counts[e], capacity));
        break;
      case Layout::block:
        EXPECT_EQ(len % block_size, 0) << "block segment " << e << " length " << len;
        EXPECT_LT(len - counts[e], block_size) << "block segment " << e << " over-padded";
        EXPECT_EQ(kept, counts[e]);
        break;
    }
  }
  if (layout == Layout::padded) {
    EXPECT_EQ(plan.capacity, capacity);
  }
  for (int64_t c = 0; c < N; ++c) {
    EXPECT_EQ(rows_of_choice[c], plan.choice_row[c] == kDropped ? 0 : 1) << "choice " << c;
  }
  int64_t dropped = 0;
  for (int64_t e = 0; e < E; ++e) dropped += counts[e] - plan.kept[e];
  EXPECT_EQ(plan.dropped_by_capacity, dropped);
  EXPECT_EQ(kept_total + plan.dropped_by_capacity + plan.skipped_by_policy, N)
      << "kept + dropped + skipped must account for every choice";

  // token-major inverse: each token's choices in choice order, with their rows
  EXPECT_EQ(plan.token_offsets[0], 0);
  EXPECT_EQ(plan.token_offsets[T], N);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> expect;
    for (int64_t c = 0; c < N; ++c)
      if (routing.choice_token[c] == t) expect.push_back(static_cast<int32_t>(c));
    ASSERT_LE(plan.token_offsets[t], plan.token_offsets[t + 1]);
    std::vector<int32_t> got(plan.token_choices.begin() + plan.token_offsets[t],
                             plan.token_choices.begin() + plan.token_offsets[t + 1]);
    EXPECT_EQ(got, expect) << "token " << t;
    for (int64_t j = plan.token_offsets[t]; j < plan.token_offsets[t + 1]; ++j)
      EXPECT_EQ(plan.token_rows[j], plan.choice_row[plan.token_choices[j]]) << "token " << t;
  }
}

// Configs for plan/permute checks: several shapes, including T = 1, E not a power of two, k = E,
// and a binding capacity.
std::vector<LayerConfig> plan_configs() {
  std::vector<LayerConfig> out;
  int seed = 0;
  for (Router r : kAllRouters) {
    if (!is_sparse(r)) continue;
    for (Layout l : kAllLayouts) {
      for (int variant = 0; variant < 4; ++variant) {
        LayerConfig cfg = small_config(r, l, Activation::gelu);
        cfg.seed = 500 + seed++;
        cfg.tokens = 16;
        cfg.experts = 5;
        cfg.block_size = 3;
        cfg.capacity_factor = 0.5;
        if (variant == 1) {
          cfg.tokens = 1;
          cfg.capacity_factor = 1.0;
        }
        if (variant == 2) {
          cfg.experts = 3;
          cfg.capacity_factor = 1.25;
          if (r == Router::softmax_topk) cfg.top_k = 3;  // k = E
        }
        if (variant == 3) {
          cfg.tokens = 13;
          cfg.experts = 8;
          cfg.block_size = 4;
          cfg.capacity_factor = 2.0;
          if (r == Router::softmax_topk) cfg.second_policy = SecondPolicy::random;
        }
        out.push_back(cfg);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// (a) permute + combine: identity experts give sum_k w_k x
// ---------------------------------------------------------------------------------------------

TEST(Permute, RowsCopyTheirSourceTokenAndPaddingRowsAreZero) {
  for (const LayerConfig& cfg : plan_configs()) {
    SCOPED_TRACE(cfg.summary());
    const int64_t T = cfg.tokens, H = cfg.hidden;
    const auto p = random_params<double>(cfg, cfg.seed);
    const auto x = random_vector<double>(T * H, cfg.seed + 1);
    const auto fwd = run_layer(cfg, p, x);
    for (size_t si = 0; si < fwd.steps.size(); ++si) {
      const auto& s = fwd.steps[si];
      const std::vector<double>& in = si == 0 ? x : s.input;
      ASSERT_EQ(in.size(), static_cast<size_t>(T * H)) << "step " << si << " input";
      ASSERT_EQ(s.xp.size(), static_cast<size_t>(s.plan.rows * H));
      for (int64_t r = 0; r < s.plan.rows; ++r) {
        const int32_t t = s.plan.row_token[r];
        for (int64_t h = 0; h < H; ++h) {
          const double want = t == kPadToken(T) ? 0.0 : in[t * H + h];
          ASSERT_EQ(s.xp[r * H + h], want) << "step " << si << " row " << r << " h " << h;
        }
      }
    }
  }
}

TEST(Combine, IdentityExpertsReturnTheWeightedSumOfInputs) {
  for (const LayerConfig& cfg : plan_configs()) {
    if (!is_token_choice(cfg.router)) continue;
    SCOPED_TRACE(cfg.summary());
    const int64_t T = cfg.tokens, H = cfg.hidden;
    const auto p = random_params<double>(cfg, cfg.seed);
    const auto x = random_vector<double>(T * H, cfg.seed + 1);
    const auto fwd = run_layer(cfg, p, x);
    const auto& s = fwd.steps[0];
    const auto& plan = s.plan;
    const auto& rt = s.routing;
    const int64_t K = step_top_k(cfg);
    ASSERT_EQ(rt.top_k, K);
    ASSERT_EQ(rt.size(), T * K);
    // combine of identity experts: sum over the token's kept rows of weight * xp[row]
    std::vector<double> y_id(T * H, 0.0), want(T * H, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = plan.token_offsets[t]; j < plan.token_offsets[t + 1]; ++j) {
        const int32_t r = plan.token_rows[j];
        if (r == kDropped) continue;
        const double w = rt.choice_weight[plan.token_choices[j]];
        for (int64_t h = 0; h < H; ++h) y_id[t * H + h] += w * s.xp[r * H + h];
      }
      // sum_k w_k x_t over the choices that kept a row
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = t * K + k;
        ASSERT_EQ(rt.choice_token[c], t);
        if (plan.choice_row[c] == kDropped) continue;
        for (int64_t h = 0; h < H; ++h) want[t * H + h] += rt.choice_weight[c] * x[t * H + h];
      }
    }
    EXPECT_TRUE(all_near("identity combine", y_id, want, 1e-14, 1e-12));
  }
}

TEST(Combine, OutputIsTheWeightedSumOfTheTokensExpertRows) {
  // With no shared experts and one routing step, y[t] = sum over kept rows of weight * yp[row].
  for (const LayerConfig& cfg : plan_configs()) {
    if (cfg.router == Router::chain_of_experts) continue;
    SCOPED_TRACE(cfg.summary());
    const int64_t T = cfg.tokens, H = cfg.hidden;
    const auto p = random_params<double>(cfg, cfg.seed);
    const auto x = random_vector<double>(T * H, cfg.seed + 1);
    const auto fwd = run_layer(cfg, p, x);
    ASSERT_EQ(fwd.steps.size(), 1u);
    const auto& s = fwd.steps[0];
    std::vector<double> want(T * H, 0.0);
    for (int64_t c = 0; c < s.routing.size(); ++c) {
      const int32_t r = s.plan.choice_row[c];
      if (r == kDropped) continue;
      const int32_t t = s.routing.choice_token[c];
      for (int64_t h = 0; h < H; ++h) want[t * H + h] += s.routing.choice_weight[c] * s.yp[r * H + h];
    }
    EXPECT_TRUE(all_near("y", fwd.y, want, 1e-14, 1e-12));
  }
}

// ---------------------------------------------------------------------------------------------
// (b) an independent dense formulation
// ---------------------------------------------------------------------------------------------

TEST(Layer, DroplessTokenChoiceEqualsANaiveDenseLoopOverChoices) {
  // chain_of_experts (layer.cpp): u_0 = x, u_{c+1} = u_c + MoE_c(u_c), y = u_C - x; the shared
  // experts run once on x and are added to y, for every router.
  for (Router r : token_choice_routers()) {
    for (Activation a : {Activation::gelu, Activation::swiglu}) {
      LayerConfig cfg = small_config(r, Layout::dropless, a);
      cfg.tokens = 11;
      cfg.experts = 5;
      cfg.shared_experts = 2;
      cfg.seed = 77;
      SCOPED_TRACE(case_name(cfg));
      const int64_t T = cfg.tokens, H = cfg.hidden;
      const auto p = random_params<double>(cfg, 3);
      const auto x = random_vector<double>(T * H, 4);
      const auto fwd = run_layer(cfg, p, x);
      ASSERT_EQ(fwd.steps.size(), static_cast<size_t>(r == Router::chain_of_experts ? 2 : 1));
      std::vector<double> u = x, y_total = naive_shared(cfg, p, x);
      for (size_t si = 0; si < fwd.steps.size(); ++si) {
        const auto routed = naive_routed(cfg, p, fwd.steps[si], u);
        for (int64_t i = 0; i < T * H; ++i) y_total[i] += routed[i];
        for (int64_t i = 0; i < T * H; ++i) u[i] += routed[i];
        if (si + 1 < fwd.steps.size()) {
          EXPECT_TRUE(all_near("input of step " + std::to_string(si + 1),
                               fwd.steps[si + 1].input, u, 1e-13, 1e-12));
        }
      }
      EXPECT_TRUE(all_near("y", fwd.y, y_total, 1e-13, 1e-12));
    }
  }
}

TEST(Layer, ExpertChoiceEqualsANaiveLoopOverEachExpertsPicks) {
  for (Activation a : {Activation::gelu, Activation::swiglu}) {
    LayerConfig cfg = small_config(Router::expert_choice, Layout::dropless, a);
    cfg.tokens = 10;
    cfg.experts = 3;
    cfg.shared_experts = 1;
    SCOPED_TRACE(case_name(cfg));
    const int64_t T = cfg.tokens, H = cfg.hidden;
    const auto p = random_params<double>(cfg, 8);
    const auto x = random_vector<double>(T * H, 9);
    const auto fwd = run_layer(cfg, p, x);
    ASSERT_EQ(fwd.steps.size(), 1u);
    auto want = naive_routed(cfg, p, fwd.steps[0], x);
    const auto shared = naive_shared(cfg, p, x);
    for (int64_t i = 0; i < T * H; ++i) want[i] += shared[i];
    EXPECT_TRUE(all_near("y", fwd.y, want, 1e-13, 1e-12));
  }
}

TEST(Layer, SoftMoeEqualsTheDispatchCombineFormulation) {
  // Puigcerver et al. 2023 with the vmoe normalisation: logits = scale * x_hat phi_hat,
  // dispatch = softmax over tokens, combine = softmax over slots, y = C f(D^T x) (+ shared).
  for (Activation a : {Activation::gelu, Activation::swiglu}) {
    LayerConfig cfg = small_config(Router::soft_moe, Layout::dropless, a);
    cfg.tokens = 7;
    cfg.experts = 3;
    cfg.slots_per_expert = 2;
    cfg.shared_experts = 1;
    SCOPED_TRACE(case_name(cfg));
    const int64_t T = cfg.tokens, H = cfg.hidden, E = cfg.experts, S = cfg.slots_per_expert;
    const int64_t n = E * S, I = cfg.inter, A = cfg.up_width();
    const auto p = random_params<double>(cfg, 10);
    const auto x = random_vector<double>(T * H, 11);
    ASSERT_EQ(p.w_gate.size(), static_cast<size_t>(H * n));
    ASSERT_EQ(p.slot_scale.size(), 1u);
    const auto fwd = run_layer(cfg, p, x);

    std::vector<double> xhat(T * H), phihat(H * n), logits(T * n);
    for (int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (int64_t h = 0; h < H; ++h) ss += x[t * H + h] * x[t * H + h];
      for (int64_t h = 0; h < H; ++h) xhat[t * H + h] = x[t * H + h] / std::sqrt(ss + 1e-6);
    }
    for (int64_t j = 0; j < n; ++j) {
      double ss = 0;
      for (int64_t h = 0; h < H; ++h) ss += p.w_gate[h * n + j] * p.w_gate[h * n + j];
      for (int64_t h = 0; h < H; ++h) phihat[h * n + j] = p.w_gate[h * n + j] / std::sqrt(ss + 1e-6);
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < n; ++j) {
        double d = 0;
        for (int64_t h = 0; h < H; ++h) d += xhat[t * H + h] * phihat[h * n + j];
        logits[t * n + j] = p.slot_scale[0] * d;
      }
    std::vector<double> dispatch(T * n), combine(T * n);
    for (int64_t j = 0; j < n; ++j) {
      std::vector<double> col(T);
      for (int64_t t = 0; t < T; ++t) col[t] = logits[t * n + j];
      const auto sm = softmax_row(col.data(), T);
      for (int64_t t = 0; t < T; ++t) dispatch[t * n + j] = sm[t];
    }
    for (int64_t t = 0; t < T; ++t) {
      const auto sm = softmax_row(&logits[t * n], n);
      for (int64_t j = 0; j < n; ++j) combine[t * n + j] = sm[j];
    }
    // slot j belongs to expert j / S
    std::vector<double> slots_out(n * H);
    for (int64_t j = 0; j < n; ++j) {
      std::vector<double> in(H, 0.0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) in[h] += dispatch[t * n + j] * x[t * H + h];
      const int64_t e = j / S;
      const auto o = naive_ffn(cfg, &p.w_up[e * H * A], &p.w_down[e * I * H], in.data());
      std::copy(o.begin(), o.end(), slots_out.begin() + j * H);
    }
    auto want = naive_shared(cfg, p, x);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < H; ++h) want[t * H + h] += combine[t * n + j] * slots_out[j * H + h];
    EXPECT_TRUE(all_near("soft dispatch", fwd.soft.dispatch, dispatch, 1e-14, 1e-11));
    EXPECT_TRUE(all_near("soft combine", fwd.soft.combine, combine, 1e-14, 1e-11));
    EXPECT_TRUE(all_near("y", fwd.y, want, 1e-13, 1e-11));
    EXPECT_EQ(fwd.aux_loss, 0.0) << "Soft MoE has no auxiliary loss";
  }
}

// ---------------------------------------------------------------------------------------------
// (c) plan accounting
// ---------------------------------------------------------------------------------------------

TEST(Plan, EveryChoiceLandsInOneRowOrIsCountedAsDropped) {
  for (const LayerConfig& cfg : plan_configs()) {
    const auto p = random_params<double>(cfg, cfg.seed);
    const auto x = random_vector<double>(cfg.tokens * cfg.hidden, cfg.seed + 1);
    const auto fwd = run_layer(cfg, p, x);
    ASSERT_EQ(fwd.steps.size(),
              static_cast<size_t>(cfg.router == Router::chain_of_experts ? cfg.iterations : 1));
    for (size_t si = 0; si < fwd.steps.size(); ++si) {
      const auto& s = fwd.steps[si];
      expect_plan_invariants(s.routing, s.plan, cfg.layout, cfg.capacity(), cfg.block_size,
                             cfg.summary() + " step " + std::to_string(si));
      if (is_token_choice(cfg.router)) {
        EXPECT_EQ(s.routing.top_k, step_top_k(cfg));
        EXPECT_EQ(s.routing.size(), cfg.tokens * step_top_k(cfg));
        for (int64_t c = 0; c < s.routing.size(); ++c)
          EXPECT_EQ(s.routing.choice_token[c], c / step_top_k(cfg)) << "choice c = t*K + k";
      }
    }
  }
}

TEST(Plan, RandomRoutingsWithSkippedChoicesKeepTheInvariants) {
  // build_plan directly on random routings, kNoExpert included, for every layout.
  Rand rng(42);
  for (int trial = 0; trial < 60; ++trial) {
    Routing<double> rt;
    rt.tokens = 1 + rng.index(20);
    rt.experts = 1 + rng.index(7);
    rt.top_k = 1 + rng.index(rt.experts);
    const bool skewed = trial % 3 == 0;  // all tokens to expert 0 where possible
    for (int64_t t = 0; t < rt.tokens; ++t) {
      std::vector<int32_t> experts(rt.experts);
      std::iota(experts.begin(), experts.end(), 0);
      if (!skewed)
        for (int64_t i = rt.experts - 1; i > 0; --i) std::swap(experts[i], experts[rng.index(i + 1)]);
      for (int64_t k = 0; k < rt.top_k; ++k) {
        rt.choice_token.push_back(static_cast<int32_t>(t));
        rt.choice_expert.push_back(k > 0 && rng.uniform() < 0.2 ? kNoExpert : experts[k]);
        rt.choice_weight.push_back(rng.uniform());
      }
    }
    for (Layout l : kAllLayouts) {
      const int64_t capacity = 1 + rng.index(rt.tokens);
      const int64_t block = 1 + rng.index(5);
      const DispatchPlan plan = build_plan(rt, l, capacity, block);
      expect_plan_invariants(rt, plan, l, capacity, block,
                             "trial " + std::to_string(trial) + " " + std::string(name(l)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (d) expert choice
// ---------------------------------------------------------------------------------------------

// Each expert takes exactly C tokens, distinct, the top C of its scores, ties to the lower token.
void expect_expert_choice_picks(const LayerConfig& cfg, const RouteStep<double>& s) {
  const int64_t T = cfg.tokens, E = cfg.experts, C = cfg.capacity();
  ASSERT_EQ(s.routing.top_k, 0);
  ASSERT_EQ(s.routing.size(), E * C);
  ASSERT_EQ(s.probs.size(), static_cast<size_t>(T * E));
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_EQ(s.plan.offsets[e + 1] - s.plan.offsets[e] >= C, true);
    EXPECT_EQ(s.plan.kept[e], C) << "expert " << e << " is not filled exactly";
    std::vector<int32_t> order(T);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return s.probs[a * E + e] > s.probs[b * E + e];
    });
    std::set<int32_t> distinct;
    for (int64_t j = 0; j < C; ++j) {
      const int64_t c = e * C + j;
      EXPECT_EQ(s.routing.choice_expert[c], e);
      EXPECT_EQ(s.routing.choice_token[c], order[j]) << "expert " << e << " pick " << j;
      EXPECT_EQ(s.routing.choice_weight[c], s.probs[order[j] * E + e])
          << "the weight of a pick is the token's probability for the expert";
      distinct.insert(s.routing.choice_token[c]);
    }
    EXPECT_EQ(distinct.size(), static_cast<size_t>(C)) << "expert " << e << " took a token twice";
  }
}

TEST(ExpertChoice, FillsEachExpertExactlyWithItsTopScoringTokens) {
  for (Layout l : kAllLayouts) {
    for (double cf : {0.5, 1.0, 2.0}) {
      LayerConfig cfg = small_config(Router::expert_choice, l, Activation::swiglu);
      cfg.tokens = 14;
      cfg.experts = 5;
      cfg.capacity_factor = cf;
      SCOPED_TRACE(cfg.summary());
      const auto p = random_params<double>(cfg, 21);
      const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 22);
      const auto fwd = run_layer(cfg, p, x);
      ASSERT_EQ(fwd.steps.size(), 1u);
      const auto& s = fwd.steps[0];
      // probs is the softmax over experts of the clean logits
      for (int64_t t = 0; t < cfg.tokens; ++t) {
        const auto sm = softmax_row(&s.logits[t * cfg.experts], cfg.experts);
        for (int64_t e = 0; e < cfg.experts; ++e)
          EXPECT_NEAR(s.probs[t * cfg.experts + e], sm[e], 1e-14);
      }
      expect_expert_choice_picks(cfg, s);
      EXPECT_EQ(s.plan.dropped_by_capacity, 0);
      EXPECT_EQ(fwd.stats.max_violation, 0.0) << "expert choice is balanced by construction";
    }
  }
}

TEST(ExpertChoice, TiedScoresGoToTheLowerTokenIndex) {
  // w_gate = identity (H = E), so logits = x exactly, and equal rows give bitwise-equal scores.
  LayerConfig cfg = small_config(Router::expert_choice, Layout::dropless, Activation::gelu);
  cfg.tokens = 6;
  cfg.experts = 3;
  cfg.hidden = 3;
  cfg.capacity_factor = 1.0;  // C = 2
  auto p = random_params<double>(cfg, 31);
  ASSERT_EQ(p.w_gate.size(), 9u);
  std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);
  for (int e = 0; e < 3; ++e) p.w_gate[e * 3 + e] = 1.0;
  const std::vector<double> x = {
      0.0, 0.0, 0.0,  // t0
      1.0, 0.0, 0.5,  // t1  ties with t4 for expert 0's second place
      2.0, 0.0, 0.0,  // t2  expert 0's best
      0.0, 1.0, 0.0,  // t3
      1.0, 0.0, 0.5,  // t4
      0.0, 0.0, 1.0,  // t5
  };
  const auto fwd = run_layer(cfg, p, x);
  const auto& s = fwd.steps[0];
  ASSERT_EQ(s.probs[1 * 3 + 0], s.probs[4 * 3 + 0]);
  expect_expert_choice_picks(cfg, s);
  EXPECT_EQ(s.routing.choice_token[0], 2);
  EXPECT_EQ(s.routing.choice_token[1], 1) << "t1 and t4 tie; the lower token index wins";
}

// ---------------------------------------------------------------------------------------------
// (e) padded == dropless when nothing drops
// ---------------------------------------------------------------------------------------------

// The padded layout's expert GEMMs run over more rows (the padding) than the dropless ones, and
// OpenBLAS's row results need not be independent of the row count: its Haswell and Zen dgemm
// kernels gave dx 1-2 ulp apart (its Sandybridge and SkylakeX kernels bit for bit). So the tensors
// that pass through those GEMMs agree to 1e-12; the routing, the losses and the counts exactly.
TEST(Layout, PaddedEqualsDroplessWhenNothingDrops) {
  constexpr double kTol = 1e-12;
  for (Router r : kAllRouters) {
    if (!is_sparse(r)) continue;
    for (Activation a : {Activation::gelu, Activation::swiglu}) {
      LayerConfig drop = small_config(r, Layout::dropless, a);
      drop.tokens = 10;
      drop.experts = 4;
      drop.shared_experts = 1;
      drop.capacity_factor = 4.0;  // C >= T for every router here: nothing can drop
      drop.aux_coef = takes_aux_coef(r) ? 0.1 : -1;
      drop.z_coef = 0.01;
      LayerConfig pad = drop;
      pad.layout = Layout::padded;
      SCOPED_TRACE(case_name(pad));
      const int64_t T = drop.tokens, H = drop.hidden;
      auto p = random_params<double>(drop, 41);
      if (r == Router::sigmoid_bias)
        p.expert_bias = random_vector<double>(static_cast<size_t>(drop.experts), 45, 0.3);
      const auto x = random_vector<double>(T * H, 42);
      const auto dy = random_vector<double>(T * H, 43);
      const auto fd = run_layer(drop, p, x);
      const auto fp = run_layer(pad, p, x);
      for (const auto& s : fp.steps) {
        ASSERT_EQ(s.plan.dropped_by_capacity, 0);
        if (is_token_choice(r)) {
          ASSERT_GT(s.plan.rows, s.plan.choices) << "no padding to test";
        }
      }
      EXPECT_TRUE(all_near("y", fp.y, fd.y, kTol, kTol));
      EXPECT_EQ(fp.aux_loss, fd.aux_loss);
      EXPECT_EQ(fp.stats.tokens_per_expert, fd.stats.tokens_per_expert);
      EXPECT_EQ(fp.stats.drop_rate, 0.0);
      const auto bd = run_backward(drop, p, x, fd, dy);
      const auto bp = run_backward(pad, p, x, fp, dy);
      EXPECT_TRUE(all_near("dx", bp.dx, bd.dx, kTol, kTol));
      auto gd = bd.grads;
      auto gp = bp.grads;
      auto ld = parameter_list(gd);
      auto lp = parameter_list(gp);
      ASSERT_EQ(ld.size(), lp.size());
      for (size_t i = 0; i < ld.size(); ++i)
        EXPECT_TRUE(all_near("d" + ld[i].first, *lp[i].second, *ld[i].second, kTol, kTol));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (f) block layout
// ---------------------------------------------------------------------------------------------

TEST(Layout, BlockSegmentsAreMultiplesOfTheBlockAndPaddingRowsAreZero) {
  for (Router r : kAllRouters) {
    if (!is_sparse(r)) continue;
    for (int64_t bs : {1, 3, 4, 16}) {
      LayerConfig cfg = small_config(r, Layout::block, Activation::swiglu);
      cfg.tokens = 13;
      cfg.experts = 5;
      cfg.block_size = bs;
      SCOPED_TRACE(cfg.summary());
      const int64_t T = cfg.tokens, H = cfg.hidden;
      const auto p = random_params<double>(cfg, 51);
      const auto x = random_vector<double>(T * H, 52);
      const auto fwd = run_layer(cfg, p, x);
      for (const auto& s : fwd.steps) {
        int64_t pad_rows = 0;
        for (int64_t e = 0; e < cfg.experts; ++e) {
          const int64_t len = s.plan.offsets[e + 1] - s.plan.offsets[e];
          EXPECT_EQ(len % bs, 0) << "expert " << e;
          EXPECT_EQ(len, (s.plan.counts[e] + bs - 1) / bs * bs) << "expert " << e;
        }
        for (int64_t row = 0; row < s.plan.rows; ++row) {
          if (s.plan.row_choice[row] != -1) continue;
          ++pad_rows;
          EXPECT_EQ(s.plan.row_token[row], kPadToken(T));
          for (int64_t h = 0; h < H; ++h) EXPECT_EQ(s.xp[row * H + h], 0.0) << "row " << row;
        }
        if (bs == 16) {
          EXPECT_GT(pad_rows, 0);
        }
        EXPECT_EQ(s.plan.dropped_by_capacity, 0) << "the block layout never drops";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (g) capacity priority and top-k ties
// ---------------------------------------------------------------------------------------------

TEST(Capacity, FirstChoicesWinOverSecondChoicesThenEarlierTokens) {
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::padded, Activation::gelu);
  cfg.tokens = 24;
  cfg.experts = 4;
  cfg.top_k = 2;
  cfg.capacity_factor = 0.5;  // C = 6 of about 12 choices per expert
  const int64_t T = cfg.tokens, K = 2, C = cfg.capacity();
  ASSERT_EQ(C, 6);
  const auto p = random_params<double>(cfg, 61);
  const auto x = random_vector<double>(T * cfg.hidden, 62);
  const auto fwd = run_layer(cfg, p, x);
  const auto& s = fwd.steps[0];
  expect_plan_invariants(s.routing, s.plan, Layout::padded, C, cfg.block_size, "capacity");
  bool exercised = false;  // a later token's first choice beat an earlier token's second choice
  for (int64_t e = 0; e < cfg.experts; ++e) {
    int64_t last_kept_first = -1, first_dropped_second = T;
    for (int64_t c = 0; c < T * K; ++c) {
      if (s.routing.choice_expert[c] != e) continue;
      const bool kept = s.plan.choice_row[c] != kDropped;
      if (c % K == 0) {
        if (kept) last_kept_first = std::max<int64_t>(last_kept_first, c / K);
      } else if (!kept) {
        first_dropped_second = std::min<int64_t>(first_dropped_second, c / K);
      }
    }
    // a first choice is dropped only if the expert's capacity is filled by first choices
    int64_t first_choices = 0, kept_seconds = 0;
    for (int64_t c = 0; c < T * K; ++c)
      if (s.routing.choice_expert[c] == e) {
        if (c % K == 0) ++first_choices;
        else if (s.plan.choice_row[c] != kDropped) ++kept_seconds;
      }
    if (first_choices >= C) {
      EXPECT_EQ(kept_seconds, 0) << "expert " << e;
    }
    if (first_dropped_second < last_kept_first) exercised = true;
  }
  EXPECT_TRUE(exercised) << "the case must contain a second choice that a later first choice beat";
  EXPECT_GT(s.plan.dropped_by_capacity, 0);
}

TEST(Capacity, HandMadeLogitsPlaceFirstChoicesBeforeSecondChoices) {
  // w_gate = identity (H = E = 3) so logits = x. Capacity C = ceil(0.5*6*2/3) = 2.
  LayerConfig cfg = small_config(Router::softmax_topk, Layout::padded, Activation::gelu);
  cfg.tokens = 6;
  cfg.experts = 3;
  cfg.hidden = 3;
  cfg.top_k = 2;
  cfg.capacity_factor = 0.5;
  ASSERT_EQ(cfg.capacity(), 2);
  auto p = random_params<double>(cfg, 71);
  std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);
  for (int e = 0; e < 3; ++e) p.w_gate[e * 3 + e] = 1.0;
  const std::vector<double> x = {
      2.0, 1.0, 0.0,  // t0: e0 then e1
      2.0, 1.0, 0.0,  // t1: e0 then e1
      0.0, 2.0, 1.0,  // t2: e1 then e2
      1.0, 0.0, 2.0,  // t3: e2 then e0
      0.0, 1.0, 2.0,  // t4: e2 then e1
      0.0, 2.0, 1.0,  // t5: e1 then e2
  };
  const auto fwd = run_layer(cfg, p, x);
  const auto& plan = fwd.steps[0].plan;
  // e0: firsts t0, t1 (C full) -> second t3 dropped.  e1: firsts t2, t5 -> seconds t0, t1, t4
  // dropped.  e2: firsts t3, t4 -> seconds t2, t5 dropped.
  const std::vector<int32_t> row_token = {0, 1, 2, 5, 3, 4};
  const std::vector<int32_t> row_choice = {0, 2, 4, 10, 6, 8};
  EXPECT_EQ(plan.row_token, row_token);
  EXPECT_EQ(plan.row_choice, row_choice);
  EXPECT_EQ(plan.dropped_by_capacity, 6);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{3, 5, 4}));
  EXPECT_EQ(plan.kept, (std::vector<int64_t>{2, 2, 2}));
}

TEST(TopK, TiesGoToTheLowerExpertIndex) {
  // logits = x exactly (w_gate = identity), with ties inside each token's row.
  for (Router r : {Router::softmax_topk, Router::switch_top1, Router::sigmoid_bias,
                   Router::noisy_topk, Router::chain_of_experts}) {
    LayerConfig cfg = small_config(r, Layout::dropless, Activation::gelu);
    cfg.tokens = 4;
    cfg.experts = 4;
    cfg.hidden = 4;
    cfg.training = false;  // no noise / jitter: the tie is exact
    SCOPED_TRACE(std::string(name(r)));
    auto p = random_params<double>(cfg, 81);
    const int64_t G = r == Router::chain_of_experts ? cfg.iterations : 1;
    ASSERT_EQ(p.w_gate.size(), static_cast<size_t>(G * 16));
    std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);
    for (int64_t g = 0; g < G; ++g)
      for (int e = 0; e < 4; ++e) p.w_gate[g * 16 + e * 4 + e] = 1.0;
    if (r == Router::sigmoid_bias) std::fill(p.expert_bias.begin(), p.expert_bias.end(), 0.0);
    const std::vector<double> x = {
        1.0, 2.0, 2.0, 0.5,  // experts 1, 2
        2.0, 2.0, 2.0, 2.0,  // experts 0, 1
        0.5, 3.0, 1.0, 3.0,  // experts 1, 3
        0.0, 0.0, 1.0, 1.0,  // experts 2, 3
    };
    const std::vector<std::vector<int32_t>> want = {{1, 2}, {0, 1}, {1, 3}, {2, 3}};
    const auto fwd = run_layer(cfg, p, x);
    const auto& rt = fwd.steps[0].routing;
    const int64_t K = rt.top_k;
    ASSERT_EQ(K, step_top_k(cfg));
    for (int64_t t = 0; t < 4; ++t)
      for (int64_t k = 0; k < K; ++k)
        EXPECT_EQ(rt.choice_expert[t * K + k], want[t][k]) << "token " << t << " choice " << k;
  }
}

// ---------------------------------------------------------------------------------------------
// (h) router weights
// ---------------------------------------------------------------------------------------------

TEST(Router, SoftmaxTopkWeightsAreTheRenormalisedProbabilitiesOfTheTopK) {
  for (bool renorm : {true, false}) {
    LayerConfig cfg = small_config(Router::softmax_topk, Layout::dropless, Activation::gelu);
    cfg.tokens = 20;
    cfg.experts = 6;
    cfg.top_k = 3;
    cfg.renormalize = renorm;
    const int64_t T = cfg.tokens, E = cfg.experts, K = cfg.top_k, H = cfg.hidden;
    const auto p = random_params<double>(cfg, 91);
    const auto x = random_vector<double>(T * H, 92);
    const auto fwd = run_layer(cfg, p, x);
    const auto& s = fwd.steps[0];
    for (int64_t t = 0; t < T; ++t) {
      // logits = x W_gate, probs = softmax(logits)
      std::vector<double> z(E, 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h) z[e] += x[t * H + h] * p.w_gate[h * E + e];
      for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(s.logits[t * E + e], z[e], 1e-13);
      const auto pr = softmax_row(z.data(), E);
      const auto sel = topk(pr.data(), E, K);
      double kept_mass = 0, wsum = 0;
      for (int64_t k = 0; k < K; ++k) kept_mass += pr[sel[k]];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = t * K + k;
        EXPECT_EQ(s.routing.choice_expert[c], sel[k]);
        const double want = renorm ? pr[sel[k]] / kept_mass : pr[sel[k]];
        EXPECT_NEAR(s.routing.choice_weight[c], want, 1e-14);
        wsum += s.routing.choice_weight[c];
      }
      if (renorm) {
        EXPECT_NEAR(wsum, 1.0, 1e-14) << "token " << t;
      }
    }
  }
}

TEST(Router, SwitchWeightIsTheRawSoftmaxProbabilityOfTheJitteredInput) {
  for (bool training : {true, false}) {
    LayerConfig cfg = small_config(Router::switch_top1, Layout::dropless, Activation::gelu);
    cfg.tokens = 16;
    cfg.experts = 5;
    cfg.training = training;
    cfg.jitter = 0.01;
    SCOPED_TRACE(training ? "training" : "eval");
    const int64_t T = cfg.tokens, E = cfg.experts, H = cfg.hidden;
    const auto p = random_params<double>(cfg, 101);
    const auto x = random_vector<double>(T * H, 102);
    const auto fwd = run_layer(cfg, p, x);
    const auto& s = fwd.steps[0];
    ASSERT_EQ(s.router_input.size(), static_cast<size_t>(T * H));
    bool jittered = false;
    for (int64_t i = 0; i < T * H; ++i) {
      const double f = s.router_input[i] / x[i];
      EXPECT_GE(f, 1 - cfg.jitter - 1e-12);
      EXPECT_LE(f, 1 + cfg.jitter + 1e-12);
      if (!s.jitter.empty()) {
        EXPECT_NEAR(s.router_input[i], x[i] * s.jitter[i], 1e-15);
      }
      jittered |= s.router_input[i] != x[i];
    }
    EXPECT_EQ(jittered, training) << "jitter applies in training only";
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> z(E, 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h) z[e] += s.router_input[t * H + h] * p.w_gate[h * E + e];
      const auto pr = softmax_row(z.data(), E);
      const int32_t best = topk(pr.data(), E, 1)[0];
      EXPECT_EQ(s.routing.choice_expert[t], best);
      EXPECT_NEAR(s.routing.choice_weight[t], pr[best], 1e-14) << "gate = p, never renormalised";
    }
  }
}

TEST(Router, SigmoidBiasSteersSelectionButNotWeights) {
  LayerConfig cfg = small_config(Router::sigmoid_bias, Layout::dropless, Activation::gelu);
  cfg.tokens = 20;
  cfg.experts = 6;
  cfg.top_k = 2;
  cfg.route_scale = 2.5;
  const int64_t T = cfg.tokens, E = cfg.experts, K = cfg.top_k;
  auto p = random_params<double>(cfg, 111);
  const auto x = random_vector<double>(T * cfg.hidden, 112);
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE("bias variant " + std::to_string(variant));
    p.expert_bias.assign(E, 0.0);
    if (variant == 1) p.expert_bias = random_vector<double>(E, 113, 0.3);
    if (variant == 2) p.expert_bias[E - 1] = 10.0;  // every token must pick expert E-1
    const auto fwd = run_layer(cfg, p, x);
    const auto& s = fwd.steps[0];
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> sc(E), biased(E);
      for (int64_t e = 0; e < E; ++e) {
        sc[e] = 1.0 / (1.0 + std::exp(-s.logits[t * E + e]));
        biased[e] = sc[e] + p.expert_bias[e];
        EXPECT_NEAR(s.probs[t * E + e], sc[e], 1e-15) << "scores are the unbiased sigmoids";
      }
      const auto sel = topk(biased.data(), E, K);
      if (variant == 2) {
        EXPECT_EQ(sel[0], E - 1);
      }
      double sum_sel = 0, wsum = 0;
      for (int64_t k = 0; k < K; ++k) sum_sel += sc[sel[k]];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = t * K + k;
        EXPECT_EQ(s.routing.choice_expert[c], sel[k]) << "token " << t;
        EXPECT_NEAR(s.routing.choice_weight[c], cfg.route_scale * sc[sel[k]] / sum_sel, 1e-14);
        wsum += s.routing.choice_weight[c];
      }
      EXPECT_NEAR(wsum, cfg.route_scale, 1e-14);
    }
  }
}

TEST(Router, SigmoidBiasUpdateFollowsTheSignRuleInTrainingOnly) {
  for (bool training : {true, false}) {
    LayerConfig cfg = small_config(Router::sigmoid_bias, Layout::dropless, Activation::gelu);
    cfg.tokens = 24;
    cfg.experts = 4;
    cfg.training = training;
    cfg.bias_update_rate = 1e-3;
    auto p = random_params<double>(cfg, 121);
    p.expert_bias = {0.1, -0.2, 0.0, 0.05};
    const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 122);
    const auto fwd = run_layer(cfg, p, x);
    const auto before = p.expert_bias;
    update_expert_bias(cfg, fwd, p);
    const auto& counts = fwd.steps[0].plan.counts;
    const double mean = static_cast<double>(cfg.tokens * cfg.top_k) / cfg.experts;
    for (int64_t e = 0; e < cfg.experts; ++e) {
      const double diff = mean - static_cast<double>(counts[e]);
      const double sign = diff > 0 ? 1.0 : diff < 0 ? -1.0 : 0.0;
      const double want = training ? before[e] + cfg.bias_update_rate * sign : before[e];
      EXPECT_NEAR(p.expert_bias[e], want, 1e-15) << "expert " << e << (training ? " train" : " eval");
    }
  }
}

TEST(Router, NoisyTopkWeightsAreTheSoftmaxOverTheKeptLogits) {
  for (bool training : {false, true}) {
    LayerConfig cfg = small_config(Router::noisy_topk, Layout::dropless, Activation::gelu);
    cfg.tokens = 20;
    cfg.experts = 6;
    cfg.top_k = 2;
    cfg.training = training;
    SCOPED_TRACE(training ? "training" : "eval");
    const int64_t T = cfg.tokens, E = cfg.experts, K = cfg.top_k, H = cfg.hidden;
    const auto p = random_params<double>(cfg, 131);
    const auto x = random_vector<double>(T * H, 132);
    const auto fwd = run_layer(cfg, p, x);
    const auto& s = fwd.steps[0];
    int64_t differs_from_clean = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> z(E, 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h) z[e] += x[t * H + h] * p.w_gate[h * E + e];
      // eval: no noise, selection and weights from the clean logits
      std::vector<double> hsel = z;
      if (training) {
        ASSERT_EQ(s.noisy.size(), static_cast<size_t>(T * E));
        for (int64_t e = 0; e < E; ++e) hsel[e] = s.noisy[t * E + e];
      } else if (!s.noisy.empty()) {
        for (int64_t e = 0; e < E; ++e) EXPECT_EQ(s.noisy[t * E + e], s.logits[t * E + e]);
      }
      const auto sel = topk(hsel.data(), E, K);
      const auto clean_sel = topk(z.data(), E, K);
      if (sel != clean_sel) ++differs_from_clean;
      std::vector<double> kept(K);
      for (int64_t k = 0; k < K; ++k) kept[k] = hsel[sel[k]];
      const auto w = softmax_row(kept.data(), K);
      for (int64_t k = 0; k < K; ++k) {
        EXPECT_EQ(s.routing.choice_expert[t * K + k], sel[k]) << "token " << t;
        EXPECT_NEAR(s.routing.choice_weight[t * K + k], w[k], 1e-13) << "token " << t;
      }
    }
    if (training) EXPECT_GT(differs_from_clean, 0) << "training noise never changed a selection";
    else EXPECT_EQ(differs_from_clean, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Auxiliary losses: the value of each router's loss, recomputed from its saved routing state
// ---------------------------------------------------------------------------------------------

double normal_cdf(double a) { return 0.5 * std::erfc(-a / std::sqrt(2.0)); }
double softplus(double v) { return v > 20 ? v : std::log1p(std::exp(v)); }

// Shazeer's CV^2 = population variance / (mean^2 + 1e-10).
double cv_squared(const std::vector<double>& v) {
  if (v.size() <= 1) return 0;
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(v.size());
  for (double x : v) var += (x - mean) * (x - mean);
  var /= static_cast<double>(v.size());
  return var / (mean * mean + 1e-10);
}

// z-loss (ST-MoE): coef * mean_t logsumexp(z_t)^2.
double z_loss(const std::vector<double>& logits, int64_t T, int64_t E, double coef) {
  double s = 0;
  for (int64_t t = 0; t < T; ++t) {
    double m = logits[t * E];
    for (int64_t e = 1; e < E; ++e) m = std::max(m, logits[t * E + e]);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[t * E + e] - m);
    const double lse = m + std::log(sum);
    s += lse * lse;
  }
  return coef * s / T;
}

// Balance loss (Switch / GShard / DeepSeek sequence-wise): coef * E * mean over groups of L
// tokens of sum_e f_e P_e, f_e = (top-k picks of e in the group) / (L K), P_e = mean_t q_te.
double balance_loss(const std::vector<int32_t>& picked, const std::vector<double>& q, int64_t T,
                    int64_t E, int64_t K, int64_t L, double coef) {
  const int64_t groups = T / L;
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int64_t t = g * L; t < (g + 1) * L; ++t) {
      for (int64_t k = 0; k < K; ++k) f[picked[t * K + k]] += 1.0 / (L * K);
      for (int64_t e = 0; e < E; ++e) P[e] += q[t * E + e] / L;
    }
    for (int64_t e = 0; e < E; ++e) total += f[e] * P[e];
  }
  return coef * E * total / groups;
}

TEST(AuxLoss, EachRouterAddsItsPapersLossWithTheConfiguredCoefficients) {
  for (Router r : kAllRouters) {
    for (int64_t seq : {0, 4}) {
      LayerConfig cfg = small_config(r, Layout::padded, Activation::gelu);
      cfg.tokens = 12;
      cfg.experts = 5;
      cfg.capacity_factor = 0.5;  // drops and policy skips must not change the loss
      cfg.aux_coef = takes_aux_coef(r) ? 0.1 : -1;
      cfg.z_coef = 0.01;
      cfg.sequence_length = seq;
      if (r == Router::softmax_topk) {
        cfg.second_policy = SecondPolicy::random;
        cfg.second_threshold = 1.0;
      }
      SCOPED_TRACE(std::string(name(r)) + " sequence_length " + std::to_string(seq));
      const int64_t T = cfg.tokens, E = cfg.experts, H = cfg.hidden;
      auto p = random_params<double>(cfg, 151);
      const auto x = random_vector<double>(T * H, 152);
      const auto fwd = run_layer(cfg, p, x);
      const int64_t L = seq > 0 ? seq : T;
      double want = 0;
      if (r == Router::soft_moe) {
        want = 0;  // Soft MoE has no auxiliary loss
      } else {
        for (const auto& s : fwd.steps) {
          const int64_t K = s.routing.top_k;
          // the experts top-k picked, before any policy skip or capacity drop
          std::vector<int32_t> picked(T * std::max<int64_t>(K, 1), 0);
          for (int64_t t = 0; t < T; ++t) {
            std::vector<double> row(E);
            for (int64_t e = 0; e < E; ++e) {
              row[e] = r == Router::sigmoid_bias ? s.probs[t * E + e] + p.expert_bias[e]
                       : r == Router::noisy_topk  ? s.noisy[t * E + e]
                                                  : s.logits[t * E + e];
            }
            const auto sel = topk(row.data(), E, std::max<int64_t>(K, 1));
            for (int64_t k = 0; k < K; ++k) picked[t * K + k] = sel[k];
          }
          switch (r) {
            case Router::softmax_topk:
            case Router::switch_top1:
            case Router::chain_of_experts:
              want += balance_loss(picked, s.probs, T, E, K, L, cfg.aux_coef);
              want += z_loss(s.logits, T, E, cfg.z_coef);
              break;
            case Router::sigmoid_bias: {  // DeepSeek-V3 sequence-wise loss on s / sum(s); no z-loss
              std::vector<double> q(T * E);
              for (int64_t t = 0; t < T; ++t) {
                double sum = 0;
                for (int64_t e = 0; e < E; ++e) sum += s.probs[t * E + e];
                for (int64_t e = 0; e < E; ++e) q[t * E + e] = s.probs[t * E + e] / sum;
              }
              want += balance_loss(picked, q, T, E, K, L, cfg.aux_coef);
              break;
            }
            case Router::noisy_topk: {  // Shazeer eq. 6-10: CV^2 of importance and of smooth load
              std::vector<double> importance(E, 0.0), load(E, 0.0);
              for (int64_t c = 0; c < T * K; ++c)
                importance[s.routing.choice_expert[c]] += s.routing.choice_weight[c];
              for (int64_t t = 0; t < T; ++t) {
                std::vector<double> h(&s.noisy[t * E], &s.noisy[t * E] + E);
                const auto top = topk(h.data(), E, K + 1);
                for (int64_t e = 0; e < E; ++e) {
                  const bool in_top = std::find(top.begin(), top.begin() + K, e) != top.begin() + K;
                  const double thr = h[in_top ? top[K] : top[K - 1]];  // k-th best excluding e
                  const double sigma = softplus(s.noise_raw[t * E + e]) + cfg.noise_epsilon;
                  load[e] += normal_cdf((s.logits[t * E + e] - thr) / sigma);
                }
              }
              want += cfg.importance_coef * cv_squared(importance) +
                      cfg.load_coef * cv_squared(load);
              want += z_loss(s.logits, T, E, cfg.z_coef);
              break;
            }
            case Router::expert_choice:  // no balance loss: balanced by construction
              want += z_loss(s.logits, T, E, cfg.z_coef);
              break;
            case Router::soft_moe:
              break;
          }
        }
      }
      EXPECT_NEAR(fwd.aux_loss, want, 1e-12 * (1 + std::fabs(want)));
    }
  }
}

TEST(AuxLoss, DefaultCoefficientsAreThePapers) {
  auto cfg_for = [](Router r) {
    LayerConfig cfg = small_config(r, Layout::dropless, Activation::gelu);
    return cfg;
  };
  EXPECT_EQ(cfg_for(Router::softmax_topk).resolved_aux_coef(), 1e-2);   // GShard
  EXPECT_EQ(cfg_for(Router::switch_top1).resolved_aux_coef(), 1e-2);    // Switch
  EXPECT_EQ(cfg_for(Router::softmax_topk).resolved_z_coef(), 1e-3);     // ST-MoE
  EXPECT_EQ(cfg_for(Router::chain_of_experts).resolved_aux_coef(), 1e-3);  // CoE seq-aux
  EXPECT_EQ(cfg_for(Router::expert_choice).resolved_aux_coef(), 0.0);
  EXPECT_EQ(cfg_for(Router::soft_moe).resolved_aux_coef(), 0.0);
  EXPECT_EQ(cfg_for(Router::sigmoid_bias).resolved_aux_coef(), 0.0);  // aux-loss-free
  // balanced routing makes the balance loss equal its coefficient: uniform probabilities and
  // every expert picked equally often (k = E)
  LayerConfig cfg = cfg_for(Router::softmax_topk);
  cfg.top_k = cfg.experts;
  cfg.z_coef = 0;
  auto p = random_params<double>(cfg, 161);
  std::fill(p.w_gate.begin(), p.w_gate.end(), 0.0);
  const auto x = random_vector<double>(cfg.tokens * cfg.hidden, 162);
  const auto fwd = run_layer(cfg, p, x);
  EXPECT_NEAR(fwd.aux_loss, cfg.resolved_aux_coef(), 1e-15);
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

TEST(Params, InitFollowsThePapersAndShapesFollowTheConfig) {
  for (Router r : kAllRouters) {
    LayerConfig cfg = small_config(r, Layout::dropless, Activation::swiglu);
    cfg.shared_experts = 2;
    SCOPED_TRACE(std::string(name(r)));
    const int64_t H = cfg.hidden, E = cfg.experts, I = cfg.inter, A = cfg.up_width();
    const auto p = init_params<double>(cfg, 171);
    const int64_t G = r == Router::chain_of_experts ? cfg.iterations : 1;
    const int64_t gate = r == Router::soft_moe ? H * E * cfg.slots_per_expert : G * H * E;
    EXPECT_EQ(p.w_gate.size(), static_cast<size_t>(gate));
    EXPECT_EQ(p.w_noise.size(), static_cast<size_t>(r == Router::noisy_topk ? H * E : 0));
    EXPECT_EQ(p.slot_scale.size(), static_cast<size_t>(r == Router::soft_moe ? 1 : 0));
    EXPECT_EQ(p.w_up.size(), static_cast<size_t>(E * H * A));
    EXPECT_EQ(p.w_down.size(), static_cast<size_t>(E * I * H));
    EXPECT_EQ(p.shared_up.size(), static_cast<size_t>(2 * H * A));
    EXPECT_EQ(p.shared_down.size(), static_cast<size_t>(2 * I * H));
    EXPECT_EQ(p.expert_bias.size(), static_cast<size_t>(r == Router::sigmoid_bias ? E : 0));
    if (r == Router::noisy_topk) {  // Shazeer: W_g = W_noise = 0
      for (double v : p.w_gate) EXPECT_EQ(v, 0.0);
      for (double v : p.w_noise) EXPECT_EQ(v, 0.0);
    }
    if (r == Router::soft_moe) {
      EXPECT_EQ(p.slot_scale[0], 1.0);
    }
    for (double v : p.expert_bias) EXPECT_EQ(v, 0.0);
    // same seed, same parameters; another seed, other parameters
    auto q = init_params<double>(cfg, 171);
    auto o = init_params<double>(cfg, 172);
    EXPECT_EQ(p.w_up, q.w_up);
    EXPECT_NE(p.w_up, o.w_up);
  }
}

// ---------------------------------------------------------------------------------------------
// (i) T = 0
// ---------------------------------------------------------------------------------------------

TEST(Layer, ZeroTokensWorkForEveryRouterAndLayout) {
  for (Router r : kAllRouters) {
    for (Layout l : kAllLayouts) {
      if (!is_sparse(r) && l != Layout::dropless) continue;
      LayerConfig cfg = small_config(r, l, Activation::swiglu);
      cfg.tokens = 0;
      cfg.shared_experts = 1;
      cfg.aux_coef = takes_aux_coef(r) ? 0.1 : -1;
      cfg.z_coef = 0.01;
      SCOPED_TRACE(case_name(cfg));
      ASSERT_NO_THROW(cfg.validate());
      auto p = random_params<double>(cfg, 141);
      const std::vector<double> x, dy;
      LayerForward<double> fwd;
      ASSERT_NO_THROW(layer_forward(cfg, p, x.data(), fwd));
      EXPECT_TRUE(fwd.y.empty());
      EXPECT_EQ(fwd.aux_loss, 0.0);
      const LoadStats& st = fwd.stats;
      for (double v : {st.cv, st.max_violation, st.drop_rate, st.router_entropy, st.mean_entropy,
                       st.tokens_without_expert})
        EXPECT_TRUE(std::isfinite(v));
      for (double v : st.tokens_per_expert) EXPECT_EQ(v, 0.0);
      std::vector<double> dx;
      Params<double> grads;
      ASSERT_NO_THROW(layer_backward(cfg, p, x.data(), fwd, dy.data(), dx.data(), grads));
      auto gl = parameter_list(grads);
      for (auto& [n, g] : gl)
        for (double v : *g) EXPECT_EQ(v, 0.0) << "d" << n << " with no tokens";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (j) build_plan on hand-made routings, expected rows written out by hand
// ---------------------------------------------------------------------------------------------

// T = 3, E = 4, K = 2; expert 3 receives nothing, token 1's second choice is skipped.
//   t0: k0 -> e1 (0.6), k1 -> e0 (0.4)      choices 0, 1
//   t1: k0 -> e1 (0.7), k1 -> none (0.3)    choices 2, 3
//   t2: k0 -> e2 (0.5), k1 -> e1 (0.5)      choices 4, 5
// Priority inside e1: c0 (t0,k0), c2 (t1,k0), then c5 (t2,k1).
Routing<double> hand_routing() {
  Routing<double> r;
  r.tokens = 3;
  r.experts = 4;
  r.top_k = 2;
  r.choice_token = {0, 0, 1, 1, 2, 2};
  r.choice_expert = {1, 0, 1, kNoExpert, 2, 1};
  r.choice_weight = {0.6, 0.4, 0.7, 0.3, 0.5, 0.5};
  return r;
}

TEST(Plan, HandMadeRoutingDroplessLayout) {
  const DispatchPlan p = build_plan(hand_routing(), Layout::dropless, 0, 1);
  EXPECT_EQ(p.rows, 5);
  EXPECT_EQ(p.capacity, 0);
  EXPECT_EQ(p.counts, (std::vector<int64_t>{1, 3, 1, 0}));
  EXPECT_EQ(p.kept, (std::vector<int64_t>{1, 3, 1, 0}));
  EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 1, 4, 5, 5}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{0, 0, 1, 2, 2}));
  EXPECT_EQ(p.row_choice, (std::vector<int32_t>{1, 0, 2, 5, 4}));
  EXPECT_EQ(p.choice_row, (std::vector<int32_t>{1, 0, 2, kDropped, 4, 3}));
  EXPECT_EQ(p.token_offsets, (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{1, 0, 2, kDropped, 4, 3}));
  EXPECT_EQ(p.token_choices, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(p.dropped_by_capacity, 0);
  EXPECT_EQ(p.skipped_by_policy, 1);
  EXPECT_EQ(p.choices, 6);
}

TEST(Plan, HandMadeRoutingPaddedLayoutDropsTheLastSecondChoice) {
  const DispatchPlan p = build_plan(hand_routing(), Layout::padded, 2, 1);
  const int32_t pad = kPadToken(3);
  EXPECT_EQ(p.rows, 8);
  EXPECT_EQ(p.capacity, 2);
  EXPECT_EQ(p.counts, (std::vector<int64_t>{1, 3, 1, 0}));
  EXPECT_EQ(p.kept, (std::vector<int64_t>{1, 2, 1, 0}));
  EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 2, 4, 6, 8}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{0, pad, 0, 1, 2, pad, pad, pad}));
  EXPECT_EQ(p.row_choice, (std::vector<int32_t>{1, -1, 0, 2, 4, -1, -1, -1}));
  EXPECT_EQ(p.choice_row, (std::vector<int32_t>{2, 0, 3, kDropped, 4, kDropped}));
  EXPECT_EQ(p.token_offsets, (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{2, 0, 3, kDropped, 4, kDropped}));
  EXPECT_EQ(p.token_choices, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(p.dropped_by_capacity, 1);
  EXPECT_EQ(p.skipped_by_policy, 1);
}

TEST(Plan, HandMadeRoutingBlockLayoutPadsEachSegmentToTheBlock) {
  const DispatchPlan p = build_plan(hand_routing(), Layout::block, 0, 2);
  const int32_t pad = kPadToken(3);
  EXPECT_EQ(p.rows, 8);
  EXPECT_EQ(p.counts, (std::vector<int64_t>{1, 3, 1, 0}));
  EXPECT_EQ(p.kept, (std::vector<int64_t>{1, 3, 1, 0}));
  EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 2, 6, 8, 8}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{0, pad, 0, 1, 2, pad, 2, pad}));
  EXPECT_EQ(p.row_choice, (std::vector<int32_t>{1, -1, 0, 2, 5, -1, 4, -1}));
  EXPECT_EQ(p.choice_row, (std::vector<int32_t>{2, 0, 3, kDropped, 6, 4}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{2, 0, 3, kDropped, 6, 4}));
  EXPECT_EQ(p.dropped_by_capacity, 0);
  EXPECT_EQ(p.skipped_by_policy, 1);
}

// Expert choice: E = 2, C = 2, T = 3. e0 picks t2 then t0; e1 picks t0 then t1.
Routing<double> hand_expert_choice() {
  Routing<double> r;
  r.tokens = 3;
  r.experts = 2;
  r.top_k = 0;
  r.choice_token = {2, 0, 0, 1};
  r.choice_expert = {0, 0, 1, 1};
  r.choice_weight = {0.9, 0.5, 0.4, 0.3};
  return r;
}

TEST(Plan, HandMadeExpertChoiceRoutingInEveryLayout) {
  for (Layout l : kAllLayouts) {
    SCOPED_TRACE(std::string(name(l)));
    const DispatchPlan p = build_plan(hand_expert_choice(), l, 2, 3);
    const int32_t pad = kPadToken(3);
    if (l == Layout::block) {
      EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 3, 6}));
      EXPECT_EQ(p.row_token, (std::vector<int32_t>{2, 0, pad, 0, 1, pad}));
      EXPECT_EQ(p.row_choice, (std::vector<int32_t>{0, 1, -1, 2, 3, -1}));
      EXPECT_EQ(p.choice_row, (std::vector<int32_t>{0, 1, 3, 4}));
      EXPECT_EQ(p.token_rows, (std::vector<int32_t>{1, 3, 4, 0}));
    } else {
      EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 2, 4}));
      EXPECT_EQ(p.row_token, (std::vector<int32_t>{2, 0, 0, 1}));
      EXPECT_EQ(p.row_choice, (std::vector<int32_t>{0, 1, 2, 3}));
      EXPECT_EQ(p.choice_row, (std::vector<int32_t>{0, 1, 2, 3}));
      EXPECT_EQ(p.token_rows, (std::vector<int32_t>{1, 2, 3, 0}));
    }
    EXPECT_EQ(p.counts, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(p.kept, (std::vector<int64_t>{2, 2}));
    // token-major inverse: t0 has choices 1 and 2, t1 choice 3, t2 choice 0
    EXPECT_EQ(p.token_offsets, (std::vector<int64_t>{0, 2, 3, 4}));
    EXPECT_EQ(p.token_choices, (std::vector<int32_t>{1, 2, 3, 0}));
    EXPECT_EQ(p.dropped_by_capacity, 0);
    EXPECT_EQ(p.skipped_by_policy, 0);
  }
}

TEST(Plan, EmptyRoutingGivesAnEmptyPlan) {
  for (Layout l : kAllLayouts) {
    Routing<double> r;
    r.experts = 3;
    r.top_k = 2;
    const DispatchPlan p = build_plan(r, l, 0, 4);
    EXPECT_EQ(p.rows, 0) << name(l);
    EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 0, 0, 0}));
    EXPECT_EQ(p.token_offsets, (std::vector<int64_t>{0}));
    EXPECT_EQ(p.choices, 0);
  }
}

}  // namespace
}  // namespace moe::test
