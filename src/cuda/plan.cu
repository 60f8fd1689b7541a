// defines: plan_forward (device DispatchPlan), PlanShape, PlanBuffers, download_plan
// Routing -> DispatchPlan on the device, matching src/cpu/plan.cpp bit for bit.
//
//   kernel 1  plan_count    one warp per chunk of priority order: per-chunk expert histogram
//   kernel 2  plan_scan     one warp per expert: scan over its chunks (chunk bases), counts,
//                           kept; the last block to finish (a ticket counter) scans the segment
//                           lengths over experts (offsets), M, drops
//   kernel 3  plan_scatter  one warp per chunk: stable ranks by __match_any_sync -> rows;
//                           then padding rows, tail rows and (token choice) the inverse
//   expert choice only: the token-major inverse by a token x expert bitmap
//   kernel 4  plan_ec_mark  bit e of token t for every choice (integer atomicOr: order-free)
//   kernel 5  plan_ec_scan  one block: popcounts per token, exclusive scan -> token_offsets
//   kernel 6  plan_ec_fill  rank of a choice in its token = set bits below its expert
//
// No kernel reads anything back to the host; the launch sizes come from PlanShape alone.
// Determinism: the only atomics are integer ones whose result does not depend on their order.
#include <algorithm>
#include <vector>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/plan.hpp"

namespace moe::cuda {

// ------------------------------------------------------------------------------------------------
// PlanShape, PlanBuffers
// ------------------------------------------------------------------------------------------------

void PlanShape::validate() const {
  constexpr int64_t kMax = int64_t{1} << 31;
  MOE_CHECK(tokens >= 0 && tokens < (int64_t{1} << 30), "tokens must be in [0, 2^30), got ",
            tokens);
  MOE_CHECK(experts >= 1 && experts <= 4096, "experts must be in [1, 4096], got ", experts);
  MOE_CHECK(top_k >= 0 && top_k <= experts, "top-k must be in [0, experts], got ", top_k);
  if (top_k > 0)
    MOE_CHECK(choices == tokens * top_k, "choices must be tokens*top-k = ", tokens * top_k,
              " for token choice, got ", choices);
  MOE_CHECK(choices >= 0 && choices < kMax, "choices must be in [0, 2^31), got ", choices);
  MOE_CHECK(block_size >= 1 && block_size <= 65536, "block-size must be in [1, 65536], got ",
            block_size);
  MOE_CHECK(layout != Layout::padded || capacity >= 0, "capacity must be >= 0, got ", capacity);
  MOE_CHECK(max_rows() < kMax, "rows (", max_rows(), ") must be < 2^31");
}

PlanBuffers::PlanBuffers(const PlanShape& s) {
  s.validate();
  view_.shape = s;
  const size_t E = s.experts, T = s.tokens, N = s.choices, R = s.max_rows(), G = s.chunks();
  const size_t words = (E + 31) / 32;
  const bool ec = s.top_k == 0;
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  arena_ = DeviceArena({{"counts", E * 4, p(view_.counts)},
                        {"kept", E * 4, p(view_.kept)},
                        {"offsets", (E + 1) * 4, p(view_.offsets)},
                        {"num_rows", 4, p(view_.num_rows)},
                        {"drops", 2 * 4, p(view_.drops)},
                        {"row_token", R * 4, p(view_.row_token)},
                        {"row_choice", R * 4, p(view_.row_choice)},
                        {"token_offsets", (T + 1) * 4, p(view_.token_offsets)},
                        {"token_rows", N * 4, p(view_.token_rows)},
                        {"token_choices", N * 4, p(view_.token_choices)},
                        {"choice_row", N * 4, p(view_.choice_row)},
                        {"chunk_base", G * (E + 1) * 4, p(view_.chunk_base)},
                        {"token_mask", ec ? T * words * 4 : 0, p(view_.token_mask)}});
  counters_ = DeviceArena({{"scan_done", 4, p(view_.scan_done)}});
  MOE_CUDA_CHECK(cudaMemset(view_.scan_done, 0, sizeof(uint32_t)));
}

void PlanBuffers::poison(cudaStream_t stream, int byte) const {
  if (arena_.bytes()) MOE_CUDA_CHECK(cudaMemsetAsync(arena_.data(), byte, arena_.bytes(), stream));
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int kWarp = 32;
constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / kWarp;  // experts (chunk_base rows) per plan_scan block
constexpr int kScanItems = 4;  // kScanThreads * kScanItems >= 4096 experts
static_assert(kScanThreads * kScanItems >= 4096, "plan_scan must cover E <= 4096");
constexpr int kRunMax = static_cast<int>(PlanShape::kMaxChunks / kWarp);  // chunks per lane
constexpr int kCountBatch = 8;  // choices per lane loaded before plan_count's atomics
constexpr int32_t kAbsent = INT32_MIN;  // past the chunk's end (kNoExpert is a real choice)

// Priority position i -> choice index. Token choice is visited k-major (all first choices in
// token order, then all second choices, ...), which is what makes first choices win capacity.
// 32-bit arithmetic: N < 2^31 (PlanShape::validate), and a 64-bit division costs ~10x more.
__device__ __forceinline__ int32_t priority_choice(int64_t i, int64_t T, int64_t K) {
  if (K == 0) return static_cast<int32_t>(i);
  const uint32_t ui = static_cast<uint32_t>(i), uT = static_cast<uint32_t>(T);
  const uint32_t k = ui / uT, t = ui - k * uT;
  return static_cast<int32_t>(t * static_cast<uint32_t>(K) + k);
}

__global__ void plan_count_kernel(RoutingView routing, PlanView plan) {
  extern __shared__ int32_t hist[];  // (E+1) counts of this chunk; [E] = kNoExpert
  const auto& s = plan.shape;
  const int E = static_cast<int>(s.experts);
  const int lane = threadIdx.x;
  for (int e = lane; e <= E; e += kWarp) hist[e] = 0;
  __syncwarp();
  const int64_t chunk = s.chunk_size();
  const int64_t begin = blockIdx.x * chunk, end = min(s.choices, begin + chunk);
  // A batch's loads are all issued before its atomics (they do not wait on each other).
  for (int64_t i0 = begin; i0 < end; i0 += kWarp * kCountBatch) {
    int32_t es[kCountBatch];
#pragma unroll
    for (int b = 0; b < kCountBatch; ++b) {
      const int64_t i = i0 + b * kWarp + lane;
      es[b] = i < end ? routing.choice_expert[priority_choice(i, s.tokens, s.top_k)] : kAbsent;
    }
#pragma unroll
    for (int b = 0; b < kCountBatch; ++b) {
      const int32_t e = es[b];
      if (e == kAbsent) continue;
      MOE_DEVICE_ASSERT(e < E);  // kNoExpert (< 0) or a real expert
      atomicAdd(&hist[e < 0 ? E : e], 1);  // shared integer atomic: the count is order-free
    }
  }
  __syncwarp();
  const int64_t G = gridDim.x;  // chunk_base is expert-major: a column of this chunk
  for (int e = lane; e <= E; e += kWarp) plan.chunk_base[e * G + blockIdx.x] = hist[e];
}

// Exclusive scan of `v` over the whole block (blockDim.x == kScanThreads); returns the prefix of
// this thread and writes the block total to *total.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t* total) {
  __shared__ int32_t warp_sums[kScanThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int32_t incl = v;
#pragma unroll
  for (int d = 1; d < kWarp; d *= 2) {
    const int32_t n = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += n;
  }
  if (lane == kWarp - 1) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t w = warp_sums[lane];  // kScanThreads / kWarp == 32 warps
#pragma unroll
    for (int d = 1; d < kWarp; d *= 2) {
      const int32_t n = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += n;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int32_t before = warp ? warp_sums[warp - 1] : 0;
  *total = warp_sums[kWarp - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return before + incl - v;
}

// Block b, warp w: expert e = kScanWarps b + w (e = E: kNoExpert), whose G chunk counts are one
// contiguous row of chunk_base. The warp walks the row 32 chunks at a time (coalesced), each
// slice's loads issued before any scan; a shuffle scan per slice plus the running total turns
// chunk_base[e][g] into the number of expert-e choices in chunks before g (the first rank chunk g
// hands out). Then counts and kept (e = E: the choices skipped by policy). The last block to
// finish scans the segment lengths over experts into offsets, and sums the drops.
__global__ void __launch_bounds__(kScanThreads) plan_scan_kernel(PlanView plan) {
  const auto& s = plan.shape;
  const int E = static_cast<int>(s.experts);
  const int G = static_cast<int>(s.chunks());
  const int lane = threadIdx.x % kWarp;
  const int e = blockIdx.x * kScanWarps + static_cast<int>(threadIdx.x) / kWarp;
  if (e <= E) {  // whole warps: E + 1 rows, one warp each
    int32_t* row = plan.chunk_base + int64_t{e} * G;
    int32_t v[kRunMax];
#pragma unroll
    for (int i = 0; i < kRunMax; ++i) {
      const int g = i * kWarp + lane;
      v[i] = g < G ? row[g] : 0;
    }
    int32_t base = 0;
#pragma unroll
    for (int i = 0; i < kRunMax; ++i) {
      if (i * kWarp >= G) break;  // warp-uniform
      int32_t incl = v[i];
#pragma unroll
      for (int d = 1; d < kWarp; d *= 2) {
        const int32_t n = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += n;
      }
      const int g = i * kWarp + lane;
      if (g < G) row[g] = base + incl - v[i];
      base += __shfl_sync(0xffffffffu, incl, kWarp - 1);
    }
    const int32_t total = base;
    if (lane == 0) {
      if (e == E) {
        plan.drops[1] = total;  // skipped by policy
      } else {
        plan.counts[e] = total;
        plan.kept[e] = s.layout == Layout::padded
                           ? static_cast<int32_t>(min(static_cast<int64_t>(total), s.capacity))
                           : total;
      }
    }
  }

  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(plan.scan_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  // offsets = exclusive scan of the segment lengths, blocked: thread i owns experts [4i, 4i+4).
  // counts and kept come from other blocks: read from L2.
  int32_t len[kScanItems], sum = 0, dropped = 0;
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) {
    const int x = threadIdx.x * kScanItems + j;
    const int32_t count = x < E ? __ldcg(plan.counts + x) : 0;
    const int32_t kept = x < E ? __ldcg(plan.kept + x) : 0;
    int32_t l = count;
    if (s.layout == Layout::padded) {
      l = x < E ? static_cast<int32_t>(s.capacity) : 0;
    } else if (s.layout == Layout::block) {
      const int32_t b = static_cast<int32_t>(s.block_size);
      l = (count + b - 1) / b * b;
    }
    len[j] = l;
    sum += l;
    dropped += count - kept;
  }
  int32_t total, total_dropped;
  int32_t at = block_exclusive_scan(sum, &total);
  block_exclusive_scan(dropped, &total_dropped);  // integers: the order does not matter
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) {
    const int x = threadIdx.x * kScanItems + j;
    if (x < E) plan.offsets[x] = at;
    at += len[j];
  }
  if (threadIdx.x == 0) {
    plan.offsets[E] = total;
    *plan.num_rows = total;
    plan.drops[0] = total_dropped;
    *plan.scan_done = 0u;  // every block has counted: ready for the next launch
  }
}

__global__ void plan_scatter_kernel(RoutingView routing, PlanView plan) {
  extern __shared__ int32_t tables[];  // (3, E): next rank in this chunk, kept, segment start
  const auto& s = plan.shape;
  const int E = static_cast<int>(s.experts);
  const int32_t T = static_cast<int32_t>(s.tokens);
  const int lane = threadIdx.x;
  const int g = blockIdx.x, G = gridDim.x;
  int32_t* next_rank = tables;
  int32_t* kept = tables + E;
  int32_t* start = tables + 2 * E;
  for (int e = lane; e < E; e += kWarp) {
    next_rank[e] = plan.chunk_base[int64_t{e} * G + g];
    kept[e] = plan.kept[e];
    start[e] = plan.offsets[e];
  }
  __syncwarp();

  // Step 1: rows of this chunk's choices. Lanes with the same expert form a __match_any_sync
  // group; a lane's rank is the number of group members on lower lanes (= earlier in priority),
  // and the group's lowest lane advances the expert's counter by the group size. The experts and
  // tokens of kBatch steps are loaded before the first step, so the steps run back to back.
  constexpr int kBatch = 8;
  const int64_t chunk = s.chunk_size();
  const int64_t begin = g * chunk, end = min(s.choices, begin + chunk);
  const unsigned lower = (1u << lane) - 1;
  for (int64_t i0 = begin; i0 < end; i0 += kWarp * kBatch) {
    int32_t cs[kBatch], es[kBatch], ts[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t i = i0 + b * kWarp + lane;
      cs[b] = i < end ? priority_choice(i, s.tokens, s.top_k) : -1;
      es[b] = i < end ? routing.choice_expert[cs[b]] : -2;  // -2: a group of its own
      ts[b] = i < end ? routing.choice_token[cs[b]] : 0;
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int32_t c = cs[b], e = es[b];
      const unsigned group = __match_any_sync(0xffffffffu, e);
      const int leader = __ffs(group) - 1;
      int32_t base = 0;
      if (lane == leader && e >= 0) {
        base = next_rank[e];
        next_rank[e] = base + __popc(group);
      }
      base = __shfl_sync(0xffffffffu, base, leader);
      __syncwarp();  // orders the leader's next_rank update before the next step's reads
      if (c < 0) continue;
      int32_t row = kDropped;
      if (e >= 0) {
        const int32_t rank = base + __popc(group & lower);
        if (rank < kept[e]) {
          row = start[e] + rank;
          plan.row_token[row] = ts[b];
          plan.row_choice[row] = c;
        }
      }
      plan.choice_row[c] = row;
      if (s.top_k > 0) {  // token choice: token-major order is choice order
        plan.token_rows[c] = row;
        plan.token_choices[c] = c;
      }
    }
  }

  // Step 2: padding rows [offsets[e] + kept[e], offsets[e+1]) of experts g, g+G, ...
  for (int e = g; e < E; e += G) {
    const int32_t from = start[e] + kept[e], to = plan.offsets[e + 1];
    for (int32_t r = from + lane; r < to; r += kWarp) {
      plan.row_token[r] = T;  // kPadToken
      plan.row_choice[r] = -1;
    }
  }
  // Step 3: rows past M (the static bound is larger than M) read as padding, in slices.
  const int64_t R = s.max_rows(), M = *plan.num_rows;
  const int64_t tail = (R - M + G - 1) / G;
  for (int64_t r = M + g * tail + lane; r < min(R, M + (g + 1) * tail); r += kWarp) {
    plan.row_token[r] = T;
    plan.row_choice[r] = -1;
  }
  // Step 4: token choice inverse offsets: every token has exactly K choices.
  if (s.top_k > 0) {
    const int64_t per = (s.tokens + 1 + G - 1) / G;
    for (int64_t t = g * per + lane; t < min(s.tokens + 1, (g + 1) * per); t += kWarp)
      plan.token_offsets[t] = static_cast<int32_t>(t * s.top_k);
  }
}

// ---- expert choice: the token-major inverse (a token has 0..E choices, in expert order)

__global__ void plan_ec_mark_kernel(RoutingView routing, PlanView plan) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= routing.choices) return;
  const int words = (static_cast<int>(plan.shape.experts) + 31) / 32;
  const int32_t t = routing.choice_token[c], e = routing.choice_expert[c];
  if (e >= 0) atomicOr(&plan.token_mask[int64_t{t} * words + e / 32], 1u << (e % 32));
}

__global__ void __launch_bounds__(kScanThreads) plan_ec_scan_kernel(PlanView plan) {
  const int64_t T = plan.shape.tokens;
  const int words = (static_cast<int>(plan.shape.experts) + 31) / 32;
  const int64_t per = (T + kScanThreads - 1) / kScanThreads;  // tokens per thread, contiguous
  const int64_t t0 = threadIdx.x * per, t1 = min(T, t0 + per);
  auto count = [&](int64_t t) {
    int32_t n = 0;
    for (int w = 0; w < words; ++w) n += __popc(plan.token_mask[t * words + w]);
    return n;
  };
  int32_t sum = 0;
  for (int64_t t = t0; t < t1; ++t) sum += count(t);
  int32_t total;
  int32_t at = block_exclusive_scan(sum, &total);
  for (int64_t t = t0; t < t1; ++t) {
    plan.token_offsets[t] = at;
    at += count(t);
  }
  if (threadIdx.x == 0) plan.token_offsets[T] = total;
}

__global__ void plan_ec_fill_kernel(RoutingView routing, PlanView plan) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= routing.choices) return;
  const int words = (static_cast<int>(plan.shape.experts) + 31) / 32;
  const int32_t t = routing.choice_token[c], e = routing.choice_expert[c];
  if (e < 0) return;  // expert choice names an expert in every choice (see routing.hpp)
  const uint32_t* mask = plan.token_mask + int64_t{t} * words;
  int32_t rank = __popc(mask[e / 32] & ((1u << (e % 32)) - 1));
  for (int w = 0; w < e / 32; ++w) rank += __popc(mask[w]);
  const int32_t slot = plan.token_offsets[t] + rank;
  plan.token_rows[slot] = plan.choice_row[c];
  plan.token_choices[slot] = static_cast<int32_t>(c);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

void plan_forward(const RoutingView& routing, const PlanView& plan, cudaStream_t stream) {
  const PlanShape& s = plan.shape;
  MOE_CHECK(routing.tokens == s.tokens && routing.experts == s.experts &&
                routing.top_k == s.top_k && routing.choices == s.choices,
            "plan_forward: routing (T=", routing.tokens, ", E=", routing.experts,
            ", K=", routing.top_k, ", N=", routing.choices, ") does not match the plan's shape (T=",
            s.tokens, ", E=", s.experts, ", K=", s.top_k, ", N=", s.choices, ")");
  const int G = static_cast<int>(s.chunks());
  const size_t E = s.experts;
  plan_count_kernel<<<G, kWarp, (E + 1) * sizeof(int32_t), stream>>>(routing, plan);
  MOE_CUDA_LAUNCH_CHECK();
  plan_scan_kernel<<<static_cast<unsigned>((E + 1 + kScanWarps - 1) / kScanWarps), kScanThreads, 0,
                     stream>>>(plan);
  MOE_CUDA_LAUNCH_CHECK();
  plan_scatter_kernel<<<G, kWarp, 3 * E * sizeof(int32_t), stream>>>(routing, plan);
  MOE_CUDA_LAUNCH_CHECK();
  if (s.top_k == 0) {
    const size_t words = (E + 31) / 32;
    if (s.tokens > 0)
      MOE_CUDA_CHECK(cudaMemsetAsync(plan.token_mask, 0, s.tokens * words * 4, stream));
    const int threads = 256;
    const int blocks = static_cast<int>(std::max<int64_t>(1, (s.choices + threads - 1) / threads));
    plan_ec_mark_kernel<<<blocks, threads, 0, stream>>>(routing, plan);
    MOE_CUDA_LAUNCH_CHECK();
    plan_ec_scan_kernel<<<1, kScanThreads, 0, stream>>>(plan);
    MOE_CUDA_LAUNCH_CHECK();
    plan_ec_fill_kernel<<<blocks, threads, 0, stream>>>(routing, plan);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

DispatchPlan download_plan(const PlanView& v, cudaStream_t stream) {
  const PlanShape& s = v.shape;
  const int64_t E = s.experts, T = s.tokens, N = s.choices, R = s.max_rows();
  auto get = [&](const int32_t* src, int64_t n) {
    std::vector<int32_t> h(n);
    if (n > 0)
      MOE_CUDA_CHECK(cudaMemcpyAsync(h.data(), src, n * 4, cudaMemcpyDeviceToHost, stream));
    return h;
  };
  auto counts = get(v.counts, E), kept = get(v.kept, E), offsets = get(v.offsets, E + 1);
  auto drops = get(v.drops, 2), row_token = get(v.row_token, R), row_choice = get(v.row_choice, R);
  auto token_offsets = get(v.token_offsets, T + 1);
  DispatchPlan p;
  p.token_rows = get(v.token_rows, N);
  p.token_choices = get(v.token_choices, N);
  p.choice_row = get(v.choice_row, N);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  p.layout = s.layout;
  p.tokens = T;
  p.experts = E;
  p.choices = N;
  p.capacity = s.layout == Layout::padded ? s.capacity : 0;
  p.rows = offsets[E];
  MOE_ASSERT(p.rows <= R);
  p.counts.assign(counts.begin(), counts.end());
  p.kept.assign(kept.begin(), kept.end());
  p.offsets.assign(offsets.begin(), offsets.end());
  p.row_token.assign(row_token.begin(), row_token.begin() + p.rows);
  p.row_choice.assign(row_choice.begin(), row_choice.begin() + p.rows);
  p.token_offsets.assign(token_offsets.begin(), token_offsets.end());
  p.dropped_by_capacity = drops[0];
  p.skipped_by_policy = drops[1];
  return p;
}

}  // namespace moe::cuda
