// defines: route_forward, route_backward, RouteBuffers (the router on the device)
// See include/moe/cuda/route.hpp for the contract; src/cpu/route.cpp is the specification.
//
//   route_topk_kernel<Family>   a warp per token: scores, top-k (K steps of WarpTopK in the order
//                               (score desc, expert asc)), weights, per-token loss terms
//   route_softmax_topk_group_kernel<kS>  softmax top-k with K <= 8, E <= 256: kS lanes per token,
//                               the warp kernel's bits
//   route_partial_kernel        a block per chunk of tokens: counts (integer smem atomics), mass,
//                               importance, sum of lse^2 -- in double, each sum in token order;
//                               then the last block to finish (a ticket counter) runs
//   route_finalize              chunks -> groups -> the aux loss (double), the per-group counts and
//                               the per-expert loss gradients backward needs
//   expert choice: route_topk_kernel<kSoftmax> with K = 0 writes the probabilities by (expert,
//                  group), cub::DeviceSegmentedSort (stable, descending) sorts each of the E*G
//                  segments, route_ec_pick_kernel takes the first C of each
//   route_backward_kernel<Family>  a warp per token: d_weight -> dz (and dr), loss gradients added
// Determinism: every sum has a fixed order; the only atomics add integers.
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/route.hpp"
#include "moe/plan.hpp"
#include "moe/rng.hpp"
#include "warp.cuh"  // defines: warp_sum, warp_max

namespace moe::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // tokens per block of the per-token kernels
constexpr int kPartialThreads = 1024;
constexpr int kPartialTile = 128;  // experts per pass of route_partial_kernel
constexpr int kFinalThreads = 1024;
constexpr int kMaxChunk = 256;     // tokens per partial-sum chunk (<= kPartialThreads)

enum Family { kSoftmax = 0, kSigmoid = 1, kNoisy = 2 };

Family family_of(Router r) {
  if (r == Router::sigmoid_bias) return kSigmoid;
  if (r == Router::noisy_topk) return kNoisy;
  return kSoftmax;  // softmax_topk, switch_top1, chain_of_experts, expert_choice
}

int64_t group_length(const LayerConfig& cfg) {
  return cfg.sequence_length > 0 ? cfg.sequence_length : cfg.tokens;
}

// Largest divisor of L that is <= kMaxChunk, so that chunks never straddle a balance group.
int64_t chunk_of(int64_t L) {
  for (int64_t c = std::min<int64_t>(L, kMaxChunk); c > 1; --c)
    if (L % c == 0) return c;
  return 1;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// RouteBuffers
// ------------------------------------------------------------------------------------------------

int64_t ec_group_capacity(const LayerConfig& cfg, int64_t groups) {
  MOE_CHECK(groups >= 1 && cfg.tokens % groups == 0, "expert choice: groups (", groups,
            ") must be >= 1 and divide tokens (", cfg.tokens, ")");
  LayerConfig g = cfg;
  g.tokens = cfg.tokens / groups;
  return g.capacity();
}

RouteBuffers::RouteBuffers(const LayerConfig& cfg, int64_t position_groups) {
  const bool ec = cfg.router == Router::expert_choice;
  MOE_CHECK(is_sparse(cfg.router), "route: ", name(cfg.router), " has no sparse routing");
  MOE_CHECK(position_groups == 1 || ec, "route: groups (", position_groups,
            ") are for expert_choice only, not ", name(cfg.router));
  tokens = cfg.tokens;
  experts = cfg.experts;
  top_k = ec ? 0 : cfg.choices_per_step();
  const int64_t T = tokens, E = experts, K = top_k;
  const int64_t L = T > 0 ? group_length(cfg) : 1;
  chunk = T > 0 ? chunk_of(L) : 1;
  chunks = T > 0 ? T / chunk : 0;
  groups = T > 0 ? T / L : 0;
  ec_groups = ec ? position_groups : 1;
  ec_capacity = ec ? ec_group_capacity(cfg, position_groups) : 0;
  const int64_t G = ec_groups, C = ec_capacity;
  const int64_t N = ec ? E * G * C : T * K;
  routing = RoutingBuffers(T, E, K, N);
  const Family f = family_of(cfg.router);
  const size_t te = static_cast<size_t>(T * E);
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  if (ec && T > 0) {
    MOE_CHECK(E * T < (int64_t{1} << 31), "expert choice: experts*tokens must be < 2^31");
    MOE_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
        nullptr, sort_temp_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(E * T),
        int(E * G), static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr)));
  }
  arena = DeviceArena({
      {"probs", te * 4, p(probs)},
      {"lse", size_t(T) * 4, p(lse)},
      {"selected", size_t(T * K) * 4, p(selected)},
      {"noisy", f == kNoisy ? te * 4 : 0, p(noisy)},
      {"threshold", f == kNoisy ? te * 4 : 0, p(threshold)},
      {"term", f != kSoftmax ? te * 4 : 0, p(term)},
      {"partial", size_t(chunks * (3 * E + 1)) * 8, p(partial)},
      {"group_counts", size_t(groups * E) * 4, p(group_counts)},
      {"d_balance", size_t(groups * E) * 4, p(d_balance)},
      {"d_expert", size_t(2 * E) * 4, p(d_expert)},
      {"aux_loss", 8, p(aux_loss)},
      {"expert_sums", f == kNoisy ? size_t(2 * E) * 8 : 0, p(expert_sums)},
      {"probs_t", ec ? te * 4 : 0, p(probs_t)},
      {"sorted_p", ec ? te * 4 : 0, p(sorted_p)},
      {"token_ids", ec ? te * 4 : 0, p(token_ids)},
      {"sorted_t", ec ? te * 4 : 0, p(sorted_t)},
      {"seg", ec ? size_t(E * G + 1) * 4 : 0, p(seg)},
      {"sort_temp", sort_temp_bytes, &sort_temp},
  });
  counters = DeviceArena({{"done", 4, p(done)}});
  MOE_CUDA_CHECK(cudaMemset(done, 0, sizeof(uint32_t)));  // route_partial_kernel's ticket counter
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

struct RouteArgs {
  int64_t T, E, K, C;          // C: expert choice capacity per group
  int64_t G;                   // expert choice groups: token t = b*G + g ranks within group g
  int64_t L, groups, chunk;    // balance groups of L tokens; partial-sum chunks
  const float* logits;         // (T, E)
  const float* noise_raw;      // (T, E) noisy_topk
  const float* bias;           // (E) sigmoid_bias, may be null
  int router;                  // moe::Router
  bool training, renormalize;
  int second_policy;           // moe::SecondPolicy
  double second_threshold;      // compared in double, like the CPU
  float noise_epsilon, route_scale;
  uint64_t seed;               // noise: cfg.seed + step; second choice: cfg.seed
  uint64_t noise_seed;
  double aux_coef, z_coef, importance_coef, load_coef;
  // device outputs (copied out of RouteBuffers)
  int32_t *choice_token, *choice_expert;
  float* choice_weight;
  float *probs, *lse, *noisy, *term, *group_counts, *d_balance, *d_expert, *probs_t;
  int32_t *selected, *threshold, *token_ids;
  double *partial, *aux_loss;
};

// (value desc, index asc): true when (v, i) comes before (w, j).
__device__ __forceinline__ bool before(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}
// The first element of the order among those after (pv, pi), over a warp; all lanes get it.
template <class Score>
__device__ __forceinline__ void warp_next(int E, Score score, float pv, int pi, float& bv,
                                          int& bi) {
  const int lane = threadIdx.x % kWarp;
  bv = -INFINITY;
  bi = E;  // "none"
  for (int e = lane; e < E; e += kWarp) {
    const float v = score(e);
    if (before(pv, pi, v, e) && before(v, e, bv, bi)) bv = v, bi = e;
  }
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, d);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
    if (before(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
}

// A float's position in before()'s order as an unsigned key: larger key, earlier. -0 ties +0 (as
// v > w and v == w see them) and NaN, which before() never puts ahead of anything, is 0, the key
// of "none" (an expert past E or already taken); -INF is still above it.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0u;
  const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Slot j of a lane's registers, read by constant indices (a runtime index would put the arrays in
// local memory); the lane that owns the winner also drops its key.
template <int N>
__device__ __forceinline__ float take_slot(const float (&value)[N], uint32_t (&key)[N], int j,
                                           bool owner) {
  float v = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i == j) {
      v = value[i];
      if (owner) key[i] = 0u;
    }
  return v;
}

// Top-k of a warp's E scores in before()'s order, one element per next(): the same sequence as
// calling warp_next with the previous winner each time.
// kPer > 0 (E <= 32 kPer): every score is evaluated once; lane l keeps the keys of experts
// l + 32 j in registers, and a step is two single-instruction warp reductions -- the largest key,
// then the smallest expert among the lanes holding it -- and the winner's lane drops its key.
// kPer == 0: any E; each step re-reads the scores and runs warp_next's shuffle arg-max (10
// shuffles and E/32 score evaluations per step). With the register form the whole top-k kernel
// went from 33.9 to 23.9 us at Qwen3's shape (ncu, results/h100-80gb-hbm3/layer/kernels_*).
template <int kPer, class Score>
struct WarpTopK {
  float value[kPer];
  uint32_t key[kPer];
  __device__ __forceinline__ WarpTopK(int E, Score score) {
    const int lane = threadIdx.x % kWarp;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = lane + kWarp * j;
      value[j] = e < E ? score(e) : 0.f;
      key[j] = e < E ? order_key(value[j]) : 0u;
    }
  }
  __device__ __forceinline__ void next(int E, float& bv, int& bi) {
    const int lane = threadIdx.x % kWarp;
    uint32_t best = 0u;
    int bj = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (key[j] > best) best = key[j], bj = j;  // strict: the lower expert of a lane wins ties
    const uint32_t top = __reduce_max_sync(0xffffffffu, best);
    const uint32_t mine = top != 0u && best == top ? uint32_t(lane + kWarp * bj) : 0xffffffffu;
    const uint32_t winner = __reduce_min_sync(0xffffffffu, mine);
    if (top == 0u) {  // nothing left but NaN: warp_next's "none"
      bv = -INFINITY;
      bi = E;
      return;
    }
    bi = static_cast<int>(winner);
    const int wj = bi / kWarp, wl = bi % kWarp;
    bv = __shfl_sync(0xffffffffu, take_slot(value, key, wj, lane == wl), wl);
  }
};

template <class Score>
struct WarpTopK<0, Score> {
  Score score;
  float pv = INFINITY;
  int pi = -1;
  __device__ __forceinline__ WarpTopK(int, Score s) : score(s) {}
  __device__ __forceinline__ void next(int E, float& bv, int& bi) {
    warp_next(E, score, pv, pi, bv, bi);
    pv = bv, pi = bi;
  }
};

template <int kPer, class Score>
__device__ __forceinline__ WarpTopK<kPer, Score> warp_topk(int E, Score score) {
  return WarpTopK<kPer, Score>(E, score);
}

__device__ __forceinline__ float sigmoidf_ref(float v) { return 1.f / (1.f + expf(-v)); }
__device__ __forceinline__ float softplusf_ref(float v) { return v > 20.f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float normal_cdf(float a) { return 0.5f * erfcf(-a * 0.70710678118654752f); }
__device__ __forceinline__ float normal_pdf(float a) {
  return expf(-0.5f * a * a) / 2.5066282746310002f;
}

// softmax_topk with K = 2 and a second-choice policy: whether token t keeps its second choice,
// whose weight (as written) is w
__device__ __forceinline__ bool keeps_second_choice(const RouteArgs& a, int64_t t, float w) {
  if (a.second_policy == int(SecondPolicy::random))
    return a.training ? counter_uniform(a.seed, RngStream::second_choice, uint64_t(t)) <
                            double(w) / a.second_threshold
                      : true;
  if (a.second_policy == int(SecondPolicy::threshold)) return w > a.second_threshold;
  return false;  // none
}

// ---- forward: one warp per token

// kPer: WarpTopK's registers per lane (0: any E).
template <int kFamily, int kPer>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) route_topk_kernel(RouteArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (t >= a.T) return;
  const int E = static_cast<int>(a.E), K = static_cast<int>(a.K);
  const float* z = a.logits + t * a.E;

  // logsumexp of the clean logits (z-loss, every family)
  float m = -INFINITY;
  for (int e = lane; e < E; e += kWarp) m = fmaxf(m, z[e]);
  m = warp_max(m);
  float s = 0.f;
  for (int e = lane; e < E; e += kWarp) s += expf(z[e] - m);
  s = warp_sum(s);
  if (lane == 0) a.lse[t] = m + logf(s);

  float* probs = a.probs + t * a.E;
  if constexpr (kFamily == kSoftmax) {
    // Probabilities with the fast exponential and one reciprocal: within a few ulp of the CPU's
    // exp / sum (the selection itself runs on the logits, so it is exact).
    const float inv_s = 1.f / s;
    auto prob = [&](int e) { return __expf(z[e] - m) * inv_s; };
    for (int e = lane; e < E; e += kWarp) {
      const float p = prob(e);
      probs[e] = p;
      if (K == 0) {  // expert choice: the (e, g) segment's entry and the sort's values
        const int64_t i = EcGroups{a.T, a.G, a.C}.sort_index(t, e);
        a.probs_t[i] = p;
        a.token_ids[i] = static_cast<int32_t>(t);
      }
    }
    if (K == 0) return;
    // top-k on the logits (softmax is monotone)
    // Every lane sees every winner; lane k keeps winner k (K <= 32), the rest re-read `sel`.
    float psum = 0.f;
    int my_e = 0;
    int32_t* sel = a.selected + t * a.K;
    auto top = warp_topk<kPer>(E, [&](int e) { return z[e]; });
    for (int k = 0; k < K; ++k) {
      float bv;
      int bi;
      top.next(E, bv, bi);
      if (lane == k % kWarp) {
        sel[k] = bi;
        if (k < kWarp) my_e = bi;
      }
      // prob(bi) (bv is z[bi]) added in one rounding, as the compiler contracted it before this
      // was spelled out; the lane-group kernel does the same
      psum = fmaf(__expf(bv - m), inv_s, psum);
    }
    if (K > kWarp) __syncwarp();
    const bool renorm = a.router == int(Router::softmax_topk) && a.renormalize;
    for (int k = lane; k < K; k += kWarp) {
      const int64_t c = t * a.K + k;
      const int e = k < kWarp ? my_e : sel[k];
      const float p = prob(e);
      a.choice_token[c] = static_cast<int32_t>(t);
      a.choice_expert[c] = e;
      a.choice_weight[c] = renorm ? p / psum : p;
    }
    const bool policy = a.router == int(Router::softmax_topk) && K == 2 &&
                        a.second_policy != int(SecondPolicy::all);
    const int e2 = __shfl_sync(0xffffffffu, my_e, 1);  // warp-uniform branch: all lanes here
    if (policy && lane == 0) {
      const float p2 = prob(e2);  // the second choice's weight, as written above
      if (!keeps_second_choice(a, t, renorm ? p2 / psum : p2))
        a.choice_expert[t * 2 + 1] = kNoExpert;
    }
  } else if constexpr (kFamily == kSigmoid) {
    float ssum = 0.f;
    for (int e = lane; e < E; e += kWarp) {
      const float v = sigmoidf_ref(z[e]);
      probs[e] = v;
      ssum += v;
    }
    ssum = warp_sum(ssum);
    if (a.aux_coef > 0)
      for (int e = lane; e < E; e += kWarp) a.term[t * a.E + e] = sigmoidf_ref(z[e]) / ssum;
    auto score = [&](int e) { return sigmoidf_ref(z[e]) + (a.bias ? a.bias[e] : 0.f); };
    float sum = 0.f;
    int my_e = 0;
    int32_t* sel = a.selected + t * a.K;
    auto top = warp_topk<kPer>(E, score);
    for (int k = 0; k < K; ++k) {
      float bv;
      int bi;
      top.next(E, bv, bi);
      if (lane == k % kWarp) {
        sel[k] = bi;
        if (k < kWarp) my_e = bi;
      }
      sum += sigmoidf_ref(z[bi]);
    }
    if (K > kWarp) __syncwarp();
    for (int k = lane; k < K; k += kWarp) {
      const int64_t c = t * a.K + k;
      const int e = k < kWarp ? my_e : sel[k];
      a.choice_token[c] = static_cast<int32_t>(t);
      a.choice_expert[c] = e;
      a.choice_weight[c] = a.route_scale * sigmoidf_ref(z[e]) / sum;
    }
  } else {  // kNoisy
    const float* r = a.noise_raw + t * a.E;
    float* h = a.noisy + t * a.E;
    for (int e = lane; e < E; e += kWarp) {
      const float sigma = softplusf_ref(r[e]) + a.noise_epsilon;
      const float n =
          a.training
              ? static_cast<float>(counter_normal(a.noise_seed, RngStream::router_noise,
                                                  static_cast<uint64_t>(t * a.E + e)))
              : 0.f;
      h[e] = __fadd_rn(z[e], __fmul_rn(n, sigma));  // no fma: the CPU rounds n*sigma first
    }
    __syncwarp();
    float hm = -INFINITY;
    for (int e = lane; e < E; e += kWarp) hm = fmaxf(hm, h[e]);
    hm = warp_max(hm);
    float hs = 0.f;
    for (int e = lane; e < E; e += kWarp) hs += expf(h[e] - hm);
    hs = warp_sum(hs);
    for (int e = lane; e < E; e += kWarp) probs[e] = expf(h[e] - hm) / hs;  // statistics only
    // top K+1 of the noisy logits: the (K+1)-th is the load loss's threshold
    const int KK = min(K + 1, E);
    float top0 = 0.f, sum = 0.f, vK = 0.f, vK1 = 0.f;
    int eK = 0, eK1 = 0, my_e = 0;
    int32_t* sel = a.selected + t * a.K;
    auto top = warp_topk<kPer>(E, [&](int e) { return h[e]; });
    for (int k = 0; k < KK; ++k) {
      float bv;
      int bi;
      top.next(E, bv, bi);
      if (k == 0) top0 = bv;
      if (k < K) {
        if (lane == k % kWarp) {
          sel[k] = bi;
          if (k < kWarp) my_e = bi;
        }
        sum += expf(bv - top0);
      }
      if (k == K - 1) vK1 = bv, eK1 = bi;  // the k-th (last kept)
      if (k == K) vK = bv, eK = bi;        // the (k+1)-th
    }
    if (K > kWarp) __syncwarp();
    for (int k = lane; k < K; k += kWarp) {
      const int64_t c = t * a.K + k;
      const int e = k < kWarp ? my_e : sel[k];
      a.choice_token[c] = static_cast<int32_t>(t);
      a.choice_expert[c] = e;
      a.choice_weight[c] = expf(h[e] - top0) / sum;
    }
    if (a.training && K < E) {  // smooth load: Phi((c - threshold) / sigma)
      for (int e = lane; e < E; e += kWarp) {
        const bool in_top = before(h[e], e, vK1, eK1) || e == eK1;
        const int thr = in_top ? eK : eK1;
        const float sigma = softplusf_ref(r[e]) + a.noise_epsilon;
        a.threshold[t * a.E + e] = thr;
        a.term[t * a.E + e] = normal_cdf((z[e] - h[thr]) / sigma);
      }
    }
    (void)vK;
  }
}

// ---- forward, softmax top-k: a group of lanes per token

// The warp-per-token kernel above repeats each token's bookkeeping on all 32 lanes and takes a
// warp-wide reduction pair per selection step: about 1000 issued instructions a token at Qwen3's
// E = 128, and it is issue-bound there (ncu, results/h100-80gb-hbm3/layer/kernels_7b3bd02). Here
// kS lanes share a token (the smallest power of two >= E / kGroupSlots), each holding the experts
// e = s + kS j of its lane s, so a warp routes 32 / kS tokens at once. It writes the warp kernel's
// bits (test RouteTopK.LaneGroupsWriteTheWarpKernelsBits):
// - the max and the sum of exponentials keep the warp kernel's association. Its lane l folded
//   experts l, l + 32, ... in order, then a butterfly over l with distances 16, 8, .., 1. Lane s
//   here stands for the kVirtual = 32 / kS lanes l = s + kS v: it folds their experts from its
//   registers, runs the butterfly's distances >= kS among them, and the rest across the group;
// - the top-k is the same order, (logit desc, expert asc): each step takes the group's largest
//   (order key, ~expert) pair, 64 bits, by xor shuffles.
constexpr int kGroupSlots = 8;   // experts per lane; also the largest K this kernel takes
constexpr int kGroupMaxE = 32 * kGroupSlots;
constexpr int kGroupThreads = 128;

template <int kS>
__global__ void __launch_bounds__(kGroupThreads) route_softmax_topk_group_kernel(RouteArgs a) {
  constexpr int kVirtual = kWarp / kS;
  const int lane = threadIdx.x % kWarp, s = lane % kS;
  const int64_t t = (blockIdx.x * int64_t{kGroupThreads} + threadIdx.x) / kS;
  if (t >= a.T) return;  // a token's lanes leave together
  const unsigned group = kS == kWarp ? 0xffffffffu : ((1u << kS) - 1u) << (lane - s);
  const int E = static_cast<int>(a.E), K = static_cast<int>(a.K);
  const float* z = a.logits + t * a.E;

  float v[kGroupSlots];
  uint32_t key[kGroupSlots];
#pragma unroll
  for (int j = 0; j < kGroupSlots; ++j) {
    const int e = s + kS * j;
    v[j] = e < E ? z[e] : 0.f;
    key[j] = e < E ? order_key(v[j]) : 0u;
  }
  auto valid = [&](int j) { return j < kGroupSlots && s + kS * j < E; };

  // max, then the sum of exponentials: lane l = s + kS u of the warp kernel folded slots
  // u, u + kVirtual, ... (its experts l, l + 32, ...)
  float part[kVirtual];
#pragma unroll
  for (int u = 0; u < kVirtual; ++u) {
    part[u] = -INFINITY;
#pragma unroll
    for (int j = u; j < kGroupSlots; j += kVirtual)
      if (valid(j)) part[u] = fmaxf(part[u], v[j]);
  }
#pragma unroll
  for (int h = kVirtual / 2; h > 0; h /= 2)
#pragma unroll
    for (int u = 0; u < h; ++u) part[u] = fmaxf(part[u], part[u + h]);
  float m = part[0];
#pragma unroll
  for (int d = kS / 2; d > 0; d /= 2) m = fmaxf(m, __shfl_xor_sync(group, m, d, kS));
#pragma unroll
  for (int u = 0; u < kVirtual; ++u) {
    part[u] = 0.f;
#pragma unroll
    for (int j = u; j < kGroupSlots; j += kVirtual)
      if (valid(j)) part[u] += expf(v[j] - m);
  }
#pragma unroll
  for (int h = kVirtual / 2; h > 0; h /= 2)
#pragma unroll
    for (int u = 0; u < h; ++u) part[u] += part[u + h];
  float sum = part[0];
#pragma unroll
  for (int d = kS / 2; d > 0; d /= 2) sum += __shfl_xor_sync(group, sum, d, kS);
  if (s == 0) a.lse[t] = m + logf(sum);

  const float inv_s = 1.f / sum;
  float* probs = a.probs + t * a.E;
#pragma unroll
  for (int j = 0; j < kGroupSlots; ++j)
    if (valid(j)) probs[s + kS * j] = __expf(v[j] - m) * inv_s;

  // top-k: the group's largest (key, ~expert); key 0 (NaN, taken, past E) is "none"
  int chosen[kGroupSlots];
  float chosen_p[kGroupSlots];
  float psum = 0.f;
#pragma unroll
  for (int k = 0; k < kGroupSlots; ++k) {
    if (k >= K) break;
    uint64_t best = 0;
#pragma unroll
    for (int j = 0; j < kGroupSlots; ++j)
      if (key[j] != 0u)
        best = max(best, uint64_t{key[j]} << 32 | uint32_t(~uint32_t(s + kS * j)));
#pragma unroll
    for (int d = kS / 2; d > 0; d /= 2) best = max(best, __shfl_xor_sync(group, best, d, kS));
    float bv = -INFINITY;
    int bi = E;
    if (best != 0) {
      bi = static_cast<int>(~static_cast<uint32_t>(best));
      const int ws = bi % kS, wj = bi / kS;
      bv = __shfl_sync(group, take_slot(v, key, wj, s == ws), ws, kS);
    }
    chosen[k] = bi;
    chosen_p[k] = __expf(bv - m) * inv_s;  // prob(bi): bv is z[bi]
    psum = fmaf(__expf(bv - m), inv_s, psum);  // one rounding, as in the warp kernel
  }

  const bool renorm = a.router == int(Router::softmax_topk) && a.renormalize;
  const bool policy = a.router == int(Router::softmax_topk) && K == 2 &&
                      a.second_policy != int(SecondPolicy::all);
#pragma unroll
  for (int k = 0; k < kGroupSlots; ++k) {
    if (k >= K) break;
    if (k % kS != s) continue;
    const int64_t c = t * a.K + k;
    const float w = renorm ? chosen_p[k] / psum : chosen_p[k];
    int e = chosen[k];
    a.selected[c] = e;
    if (policy && k == 1 && !keeps_second_choice(a, t, w)) e = kNoExpert;
    a.choice_token[c] = static_cast<int32_t>(t);
    a.choice_expert[c] = e;
    a.choice_weight[c] = w;
  }
}

// Expert choice: segment offsets of the sort, seg[i] = i * B for i in [0, E*G] (B = T / G).
__global__ void route_ec_segments_kernel(int64_t segments, int64_t B, int32_t* seg) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i <= segments) seg[i] = static_cast<int32_t>(i * B);
}

// Expert choice: the first C entries of each (expert, group) segment; choice i = (e*G + g)*C + j
// comes from segment e*G + g (EcGroups).
__global__ void route_ec_pick_kernel(RouteArgs a, const float* sorted_p, const int32_t* sorted_t) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= a.E * a.G * a.C) return;
  const EcGroups eg{a.T, a.G, a.C};
  const int64_t src = eg.pick_source(i);
  a.choice_token[i] = sorted_t[src];
  a.choice_expert[i] = static_cast<int32_t>(eg.pick_expert(i));
  a.choice_weight[i] = sorted_p[src];
}

// ---- auxiliary losses

// Block c sums tokens [c*chunk, (c+1)*chunk): partial[c] = (counts (E), mass (E), importance (E),
// sum of lse^2), all in double, in a fixed order. The block's threads form `rows` x `tile`: thread
// (r, e) sums a contiguous run of chunk/rows tokens of column e, then row 0 adds the rows in
// order -- short serial sums, and one partial row per 256 tokens, so that the single-block
// finalize reads little (a first version with one row per 32 tokens spent 44 us there).
__device__ void route_finalize(const RouteArgs& a, double* scratch);

__global__ void __launch_bounds__(kPartialThreads) route_partial_kernel(RouteArgs a,
                                                                        const float* mass_src,
                                                                        double* scratch,
                                                                        uint32_t* done) {
  extern __shared__ int32_t counts[];  // (E)
  __shared__ double rows_mass[kPartialThreads], rows_imp[kPartialThreads];
  const int E = static_cast<int>(a.E), K = static_cast<int>(a.K);
  const int64_t t0 = blockIdx.x * a.chunk, t1 = t0 + a.chunk;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  if (K > 0)
    for (int64_t i = t0 * K + threadIdx.x; i < t1 * K; i += blockDim.x)
      atomicAdd(&counts[a.selected[i]], 1);  // integers: order-free
  __syncthreads();
  double* out = a.partial + blockIdx.x * (3 * a.E + 1);
  const int tile = min(E, kPartialTile), rows = kPartialThreads / tile;
  const int r = threadIdx.x / tile, col = threadIdx.x % tile;
  const int64_t run = (a.chunk + rows - 1) / rows;
  const int64_t r0 = min(t1, t0 + r * run), r1 = min(t1, r0 + run);
  const bool noisy = a.router == int(Router::noisy_topk);
  for (int e0 = 0; e0 < E; e0 += tile) {
    const int e = e0 + col;
    double mass = 0, importance = 0;
    if (r < rows && e < E) {
      if (mass_src) {
#pragma unroll 8
        for (int64_t t = r0; t < r1; ++t) mass += mass_src[t * a.E + e];  // loads run ahead
      }
      if (noisy)
        for (int64_t c = r0 * K; c < r1 * K; ++c)
          if (a.choice_expert[c] == e) importance += a.choice_weight[c];
    }
    rows_mass[threadIdx.x] = mass;
    rows_imp[threadIdx.x] = importance;
    __syncthreads();
    if (r == 0 && e < E) {
      for (int q = 1; q < rows; ++q) {
        mass += rows_mass[q * tile + col];
        importance += rows_imp[q * tile + col];
      }
      out[e] = counts[e];
      out[a.E + e] = mass;
      out[2 * a.E + e] = importance;
    }
    __syncthreads();
  }
  // sum of lse^2 over the chunk: one token per thread, then a fixed tree
  const int64_t t = t0 + threadIdx.x;
  rows_mass[threadIdx.x] = t < t1 ? double(a.lse[t]) * a.lse[t] : 0.0;
  __syncthreads();
  for (int w = kPartialThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) rows_mass[threadIdx.x] += rows_mass[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[3 * a.E] = rows_mass[0];

  // The last block to finish sums every block's row (saves a one-block launch after this one).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  route_finalize(a, scratch);
  if (threadIdx.x == 0) *done = 0u;  // every block has counted: ready for the next launch
}

// Sum of column `col` of the partial rows [c0, c1), by the tpe consecutive lanes of a group: each
// lane sums a contiguous run, then a butterfly inside the group (a fixed order); every lane of the
// group gets the total.
__device__ __forceinline__ double column_sum(const double* P, int64_t stride, int64_t col,
                                             int64_t c0, int64_t c1, int tpe, int sub) {
  const int64_t n = c1 - c0, per = (n + tpe - 1) / tpe;
  const int64_t b = c0 + min(n, sub * per), e = c0 + min(n, (sub + 1) * per);
  // Other blocks' rows, read from L2 (ld.cg); each batch's loads are issued before its sum.
  constexpr int kBatch = 8;
  double v = 0;
  for (int64_t c0 = b; c0 < e; c0 += kBatch) {
    double x[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) x[i] = c0 + i < e ? __ldcg(P + (c0 + i) * stride + col) : 0.0;
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      if (c0 + i < e) v += x[i];
  }
  for (int d = tpe / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d, tpe);
  return v;
}

// Block-wide sum in a fixed order (per-thread values, then a tree over shared memory).
__device__ double block_sum(double v) {
  __shared__ double buf[kFinalThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kFinalThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  const double r = buf[0];
  __syncthreads();
  return r;
}

// CV^2 = population variance / (mean^2 + 1e-10) of v (E); and its gradient scaled by `scale`.
__device__ double cv_squared(const double* v, int E, double scale, float* grad) {
  if (E <= 1) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) grad[e] = 0.f;
    return 0;
  }
  double s = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s += v[e];
  const double mean = block_sum(s) / E;
  double q = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) q += (v[e] - mean) * (v[e] - mean);
  const double var = block_sum(q) / E;
  const double den = mean * mean + 1e-10;
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    grad[e] = static_cast<float>(scale *
                                 ((2 * (v[e] - mean) / E) / den - var * 2 * mean / (E * den * den)));
  return var / den;
}

// Run by the last block of route_partial_kernel (kFinalThreads threads), after every block's
// partial row is written.
__device__ void route_finalize(const RouteArgs& a, double* scratch) {
  const int E = static_cast<int>(a.E);
  const int64_t cpg = a.L / a.chunk;  // chunks per group
  const int64_t chunks = a.T / a.chunk;
  const double* P = a.partial;
  const int64_t stride = 3 * a.E + 1;
  // tpe lanes per expert column (a power of two, at most a warp)
  int tpe = 1;
  while (tpe < kWarp && 2 * tpe * E <= kFinalThreads) tpe *= 2;
  const int sub = threadIdx.x % tpe, per_pass = kFinalThreads / tpe;
  double loss = 0;
  const bool noisy = a.router == int(Router::noisy_topk);
  const bool balance = !noisy && a.K > 0 && a.aux_coef > 0;
  if (balance) {
    double total = 0;
    for (int64_t g = 0; g < a.groups; ++g) {
      double part = 0;
      for (int pass = 0; pass * per_pass < E; ++pass) {
        const int e = pass * per_pass + static_cast<int>(threadIdx.x) / tpe;
        const int ec = min(e, E - 1);  // every lane joins the shuffles
        const double cnt = column_sum(P, stride, ec, g * cpg, (g + 1) * cpg, tpe, sub);
        const double mass = column_sum(P, stride, a.E + ec, g * cpg, (g + 1) * cpg, tpe, sub);
        if (e < E && sub == 0) {
          a.group_counts[g * a.E + e] = static_cast<float>(cnt);
          // d balance / d q_te for every token of group g: what route_backward adds per expert
          a.d_balance[g * a.E + e] = static_cast<float>(
              a.aux_coef * a.E * (double(static_cast<float>(cnt)) / double(a.L * a.K)) /
              double(a.L) / a.groups);
          part += (cnt / double(a.L * a.K)) * (mass / double(a.L));
        }
      }
      total += block_sum(part);
    }
    loss += a.aux_coef * E * total / a.groups;
  }
  if (noisy) {
    double* importance = scratch;  // (E)
    double* load = scratch + a.E;  // (E)
    const bool smooth = a.training && a.K < a.E;
    for (int pass = 0; pass * per_pass < E; ++pass) {
      const int e = pass * per_pass + static_cast<int>(threadIdx.x) / tpe;
      const int ec = min(e, E - 1);
      const double imp = column_sum(P, stride, 2 * a.E + ec, 0, chunks, tpe, sub);
      const double ld = column_sum(P, stride, (smooth ? a.E : 0) + ec, 0, chunks, tpe, sub);
      if (e < E && sub == 0) {
        importance[e] = imp;
        load[e] = ld;
      }
    }
    __syncthreads();
    loss += a.importance_coef * cv_squared(importance, E, a.importance_coef, a.d_expert);
    loss += a.load_coef * cv_squared(load, E, a.load_coef, a.d_expert + a.E);
  }
  if (a.z_coef > 0 && a.router != int(Router::sigmoid_bias)) {
    double z = 0;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
      z += __ldcg(P + c * stride + 3 * a.E);
    loss += a.z_coef * block_sum(z) / a.T;
  }
  if (threadIdx.x == 0) *a.aux_loss = loss;
}

// ---- backward: one warp per token, a row of E floats of shared memory per warp

struct BackArgs {
  RouteArgs f;
  const float* d_weight;  // (N)
  const float* weight;    // (N) forward weights
  float* dz;              // (T, E)
  float* dr;              // (T, E) noisy_topk
};

template <int kFamily>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) route_backward_kernel(BackArgs b) {
  extern __shared__ float rows[];  // (kWarpsPerBlock, E)
  const RouteArgs& a = b.f;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (t >= a.T) return;
  const int E = static_cast<int>(a.E), K = static_cast<int>(a.K);
  float* d = rows + (threadIdx.x / kWarp) * a.E;  // d probs / d scores / d noisy logits
  const float* z = a.logits + t * a.E;
  const float* p = a.probs + t * a.E;
  float* dz = b.dz + t * a.E;
  const float lse = a.lse[t];
  const int64_t g = t / a.L;
  // balance loss: d/dq_te = coef * E * (count_ge / (L K)) / L / groups, the same for every token
  // of the group
  const bool balance = kFamily != kNoisy && a.K > 0 && a.aux_coef > 0;
  auto dbalance = [&](int e) -> float { return balance ? a.d_balance[g * a.E + e] : 0.f; };
  const float zscale = static_cast<float>(a.z_coef * 2.0 / a.T);
  const bool zloss = a.z_coef > 0 && kFamily != kSigmoid;

  for (int e = lane; e < E; e += kWarp) d[e] = 0.f;
  __syncwarp();
  if (K == 0) {  // expert choice: dp is scattered into dz by route_ec_scatter_kernel
    for (int e = lane; e < E; e += kWarp) d[e] = dz[e];
    __syncwarp();
  }
  const int32_t* sel = a.selected + t * a.K;
  const float* dw = b.d_weight + t * a.K;

  if constexpr (kFamily == kSoftmax) {
    if (K > 0) {
      const bool renorm = a.router == int(Router::softmax_topk) && a.renormalize;
      float sum = 0.f, dot = 0.f;
      if (renorm && K <= kWarp) {
        // lane k loads choice k's terms (all loads at once, not K dependent pairs in a row), then
        // every lane adds them in k order, like the CPU
        const float pk = lane < K ? p[sel[lane]] : 0.f, dwk = lane < K ? dw[lane] : 0.f;
        for (int k = 0; k < K; ++k) {
          const float pj = __shfl_sync(0xffffffffu, pk, k);
          sum += pj;
          dot += __shfl_sync(0xffffffffu, dwk, k) * pj;
        }
      } else if (renorm) {
        for (int k = 0; k < K; ++k) {  // in k order, like the CPU
          sum += p[sel[k]];
          dot += dw[k] * p[sel[k]];
        }
      }
      for (int k = lane; k < K; k += kWarp)
        d[sel[k]] = renorm ? (dw[k] - dot / sum) / sum : dw[k];
      __syncwarp();
    }
    float dot = 0.f;
    for (int e = lane; e < E; e += kWarp) {
      d[e] += dbalance(e);
      dot += d[e] * p[e];
    }
    dot = warp_sum(dot);
    for (int e = lane; e < E; e += kWarp) {
      float v = p[e] * (d[e] - dot);
      if (zloss) v += zscale * lse * expf(z[e] - lse);
      dz[e] = v;
    }
  } else if constexpr (kFamily == kSigmoid) {
    float sum = 0.f, dot = 0.f;
    for (int k = 0; k < K; ++k) {
      sum += p[sel[k]];
      dot += dw[k] * p[sel[k]];
    }
    for (int k = lane; k < K; k += kWarp)
      d[sel[k]] = a.route_scale / sum * (dw[k] - dot / sum);
    __syncwarp();
    if (balance) {  // q = s / sum(s)
      float ssum = 0.f;
      for (int e = lane; e < E; e += kWarp) ssum += p[e];
      ssum = warp_sum(ssum);
      float qdot = 0.f;
      for (int e = lane; e < E; e += kWarp) qdot += dbalance(e) * p[e] / ssum;
      qdot = warp_sum(qdot);
      for (int e = lane; e < E; e += kWarp) d[e] += (dbalance(e) - qdot) / ssum;
    }
    for (int e = lane; e < E; e += kWarp) dz[e] = d[e] * p[e] * (1.f - p[e]);
  } else {  // kNoisy: d holds d noisy logits
    const float* w = b.weight + t * a.K;
    const float* d_imp = a.d_expert;
    const float* d_load = a.d_expert + a.E;
    float dot = 0.f;
    for (int k = 0; k < K; ++k) dot += (dw[k] + d_imp[sel[k]]) * w[k];
    for (int k = lane; k < K; k += kWarp) d[sel[k]] = w[k] * (dw[k] + d_imp[sel[k]] - dot);
    __syncwarp();
    const float* r = a.noise_raw + t * a.E;
    const float* h = a.noisy + t * a.E;
    float* dr = b.dr + t * a.E;
    const bool smooth = a.training && K < E;
    // pass 1: the load loss's direct terms (dz, dsigma) and its pull on the two thresholds
    float pull_in = 0.f, pull_out = 0.f;  // onto threshold top[K] (in-top rows) / top[K-1]
    int thr_in = -1, thr_out = -1;
    for (int e = lane; e < E; e += kWarp) {
      float dze = 0.f, dsig = 0.f;
      if (smooth) {
        const float sigma = softplusf_ref(r[e]) + a.noise_epsilon;
        const int thr = a.threshold[t * a.E + e];
        const float av = (z[e] - h[thr]) / sigma;
        const float da = d_load[e] * normal_pdf(av);
        dze = da / sigma;
        dsig = -da * av / sigma;
        const bool in_top = thr != sel[K - 1];
        if (in_top) pull_in += -da / sigma, thr_in = thr;
        else pull_out += -da / sigma, thr_out = thr;
      }
      dz[e] = dze;
      dr[e] = dsig;
    }
    if (smooth) {
      pull_in = warp_sum(pull_in);
      pull_out = warp_sum(pull_out);
      // every lane that saw an in-top row knows top[K]; share it
      thr_in = __reduce_max_sync(0xffffffffu, thr_in);
      thr_out = __reduce_max_sync(0xffffffffu, thr_out);
      __syncwarp();
      if (lane == 0) {
        if (thr_in >= 0) d[thr_in] += pull_in;
        if (thr_out >= 0) d[thr_out] += pull_out;
      }
    }
    __syncwarp();
    // pass 2: dz += dh; dsigma += dh * n; dr = dsigma * sigmoid(r)
    for (int e = lane; e < E; e += kWarp) {
      float v = dz[e] + d[e];
      if (zloss) v += zscale * lse * expf(z[e] - lse);
      dz[e] = v;
      float dsig = dr[e];
      if (a.training) {
        const float n = static_cast<float>(counter_normal(
            a.noise_seed, RngStream::router_noise, static_cast<uint64_t>(t * a.E + e)));
        dsig += d[e] * n;
      }
      dr[e] = dsig * sigmoidf_ref(r[e]);
    }
  }
}

// Expert choice backward, step 1: dp[t][e] = d_weight of the choice (t, e) (each pair at most
// once: an expert picks distinct tokens of a group, and the groups hold distinct tokens), written
// into dz, which was zeroed.
__global__ void route_ec_scatter_kernel(RouteArgs a, const float* d_weight, float* dz) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= a.E * a.G * a.C) return;
  dz[int64_t{a.choice_token[c]} * a.E + a.choice_expert[c]] = d_weight[c];
}

RouteArgs make_args(const LayerConfig& cfg, int64_t step, const float* logits,
                    const float* noise_raw, const float* bias, const RouteBuffers& b) {
  RouteArgs a{};
  a.T = b.tokens;
  a.E = b.experts;
  a.K = b.top_k;
  a.C = b.ec_capacity;
  a.G = b.ec_groups;
  a.L = b.tokens > 0 ? group_length(cfg) : 1;
  a.groups = b.groups;
  a.chunk = b.chunk;
  a.logits = logits;
  a.noise_raw = noise_raw;
  a.bias = bias;
  a.router = int(cfg.router);
  a.training = cfg.training;
  a.renormalize = cfg.renormalize;
  a.second_policy = int(cfg.second_policy);
  a.second_threshold = cfg.second_threshold;
  a.noise_epsilon = static_cast<float>(cfg.noise_epsilon);
  a.route_scale = static_cast<float>(cfg.route_scale);
  a.seed = cfg.seed;
  a.noise_seed = cfg.seed + step;
  a.aux_coef = cfg.resolved_aux_coef();
  a.z_coef = cfg.resolved_z_coef();
  a.importance_coef = cfg.importance_coef;
  a.load_coef = cfg.load_coef;
  a.choice_token = b.routing.choice_token;
  a.choice_expert = b.routing.choice_expert;
  a.choice_weight = b.routing.choice_weight;
  a.probs = b.probs;
  a.lse = b.lse;
  a.noisy = b.noisy;
  a.term = b.term;
  a.group_counts = b.group_counts;
  a.d_balance = b.d_balance;
  a.d_expert = b.d_expert;
  a.probs_t = b.probs_t;
  a.selected = b.selected;
  a.threshold = b.threshold;
  a.token_ids = b.token_ids;
  a.partial = b.partial;
  a.aux_loss = b.aux_loss;
  return a;
}

unsigned token_blocks(int64_t T) {
  return static_cast<unsigned>(std::max<int64_t>(1, (T + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

void route_forward(const LayerConfig& cfg, int64_t step, const float* logits,
                   const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                   cudaStream_t stream) {
  route_choices(cfg, step, logits, noise_raw, expert_bias, out, stream, TopKKernel::automatic);
  route_aux_losses(cfg, step, logits, noise_raw, expert_bias, out, stream);
}

void route_choices(const LayerConfig& cfg, int64_t step, const float* logits,
                   const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                   cudaStream_t stream, TopKKernel kernel) {
  MOE_CHECK(out.tokens == cfg.tokens && out.experts == cfg.experts,
            "route_forward: buffers were sized for another shape");
  const Family f = family_of(cfg.router);
  MOE_CHECK(f != kNoisy || noise_raw, "route_forward: noisy_topk needs noise_raw");
  const RouteArgs a = make_args(cfg, step, logits, noise_raw, expert_bias, out);
  if (a.T == 0) return;
  const unsigned blocks = token_blocks(a.T), threads = kWarp * kWarpsPerBlock;
  // WarpTopK's registers per lane: the smallest of 1, 2, 4, 8 that holds E; past 256, none.
  auto topk = [&](auto family) {
    constexpr int F = decltype(family)::value;
    if (a.E <= 32) route_topk_kernel<F, 1><<<blocks, threads, 0, stream>>>(a);
    else if (a.E <= 64) route_topk_kernel<F, 2><<<blocks, threads, 0, stream>>>(a);
    else if (a.E <= 128) route_topk_kernel<F, 4><<<blocks, threads, 0, stream>>>(a);
    else if (a.E <= 256) route_topk_kernel<F, 8><<<blocks, threads, 0, stream>>>(a);
    else route_topk_kernel<F, 0><<<blocks, threads, 0, stream>>>(a);
  };
  // softmax top-k with K <= 8 and E <= 256 (every preset): a group of lanes per token
  auto group = [&](auto lanes) {
    constexpr int kS = decltype(lanes)::value;
    const int64_t threads_total = a.T * kS;
    route_softmax_topk_group_kernel<kS>
        <<<unsigned((threads_total + kGroupThreads - 1) / kGroupThreads), kGroupThreads, 0,
           stream>>>(a);
  };
  const bool grouped = f == kSoftmax && kernel == TopKKernel::automatic && a.K >= 1 &&
                       a.K <= kGroupSlots && a.E <= kGroupMaxE;
  if (grouped) {
    if (a.E <= 8) group(std::integral_constant<int, 1>{});
    else if (a.E <= 16) group(std::integral_constant<int, 2>{});
    else if (a.E <= 32) group(std::integral_constant<int, 4>{});
    else if (a.E <= 64) group(std::integral_constant<int, 8>{});
    else if (a.E <= 128) group(std::integral_constant<int, 16>{});
    else group(std::integral_constant<int, 32>{});
  } else switch (f) {
    case kSoftmax: topk(std::integral_constant<int, kSoftmax>{}); break;
    case kSigmoid: topk(std::integral_constant<int, kSigmoid>{}); break;
    case kNoisy: topk(std::integral_constant<int, kNoisy>{}); break;
  }
  MOE_CUDA_LAUNCH_CHECK();

  if (cfg.router == Router::expert_choice) {
    // one segment per (expert, group): seg[i] = i * B, written on the device (no host copy)
    const int64_t segments = a.E * a.G, N = segments * a.C;
    route_ec_segments_kernel<<<unsigned((segments + 1 + 255) / 256), 256, 0, stream>>>(
        segments, a.T / a.G, out.seg);
    MOE_CUDA_LAUNCH_CHECK();
    size_t bytes = out.sort_temp_bytes;
    MOE_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
        out.sort_temp, bytes, out.probs_t, out.sorted_p, out.token_ids, out.sorted_t,
        int(a.E * a.T), int(segments), out.seg, out.seg + 1, stream));
    if (N > 0) {
      route_ec_pick_kernel<<<unsigned((N + 255) / 256), 256, 0, stream>>>(a, out.sorted_p,
                                                                          out.sorted_t);
      MOE_CUDA_LAUNCH_CHECK();
    }
  }
}

void route_aux_losses(const LayerConfig& cfg, int64_t step, const float* logits,
                      const float* noise_raw, const float* expert_bias, RouteBuffers& out,
                      cudaStream_t stream) {
  const Family f = family_of(cfg.router);
  const RouteArgs a = make_args(cfg, step, logits, noise_raw, expert_bias, out);
  if (a.T == 0) {  // otherwise route_finalize writes it
    MOE_CUDA_CHECK(cudaMemsetAsync(out.aux_loss, 0, sizeof(double), stream));
    return;
  }
  // auxiliary losses: per-chunk partial sums, then one block
  const float* mass = f == kSoftmax ? out.probs : out.term;
  const bool need_mass = (f == kSoftmax && a.K > 0 && a.aux_coef > 0) ||
                         (f == kSigmoid && a.aux_coef > 0) ||
                         (f == kNoisy && cfg.training && a.K < a.E);
  static_assert(kPartialThreads == kFinalThreads, "the last partial block runs route_finalize");
  route_partial_kernel<<<unsigned(out.chunks), kPartialThreads, a.E * sizeof(int32_t), stream>>>(
      a, need_mass ? mass : nullptr, out.expert_sums, out.done);
  MOE_CUDA_LAUNCH_CHECK();
}

void route_backward(const LayerConfig& cfg, int64_t step, const RouteBuffers& fwd,
                    const float* logits, const float* noise_raw, const float* d_weight,
                    float* dz, float* dr, cudaStream_t stream) {
  const Family f = family_of(cfg.router);
  MOE_CHECK(f != kNoisy || (noise_raw && dr), "route_backward: noisy_topk needs noise_raw and dr");
  BackArgs b{};
  b.f = make_args(cfg, step, logits, noise_raw, nullptr, fwd);
  b.d_weight = d_weight;
  b.weight = fwd.routing.choice_weight;
  b.dz = dz;
  b.dr = dr;
  const RouteArgs& a = b.f;
  if (a.T == 0) return;
  if (cfg.router == Router::expert_choice) {
    MOE_CUDA_CHECK(cudaMemsetAsync(dz, 0, a.T * a.E * sizeof(float), stream));
    const int64_t N = a.E * a.G * a.C;
    if (N > 0) {
      route_ec_scatter_kernel<<<unsigned((N + 255) / 256), 256, 0, stream>>>(a, d_weight, dz);
      MOE_CUDA_LAUNCH_CHECK();
    }
  }
  const unsigned blocks = token_blocks(a.T), threads = kWarp * kWarpsPerBlock;
  const size_t smem = kWarpsPerBlock * a.E * sizeof(float);  // E <= 4096: 64 KiB
  auto launch = [&](auto kernel) {
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<blocks, threads, smem, stream>>>(b);
    MOE_CUDA_LAUNCH_CHECK();
  };
  switch (f) {
    case kSoftmax: launch(route_backward_kernel<kSoftmax>); break;
    case kSigmoid: launch(route_backward_kernel<kSigmoid>); break;
    case kNoisy: launch(route_backward_kernel<kNoisy>); break;
  }
}

}  // namespace moe::cuda
