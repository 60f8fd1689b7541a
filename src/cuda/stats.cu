// defines: StatsBuffers, load_stats, update_expert_bias (routing statistics on the device)
// See include/moe/cuda/stats.hpp; src/cpu/layer.cpp (add_step_stats, update_expert_bias) is the
// specification.
//
//   stats_partial_kernel    a block per chunk of kChunk tokens: a warp per token (row sum, entropy,
//                           kept row), then a thread per expert (column sum of q over the chunk)
//   stats_group_kernel      G > 1 groups: a block per group, a thread per expert (the group's
//                           mean q in token order), then the entropy of that mean
//   stats_finalize_kernel   one block: the chunk rows in chunk order -> the three scalars
//   expert_bias_kernel      a thread per expert: the sign rule
// Determinism: every sum has a fixed order (per-lane runs, xor butterflies, serial token and chunk
// loops); no atomics.
#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/stats.hpp"
#include "moe/plan.hpp"

namespace moe::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kChunk = static_cast<int>(StatsBuffers::kChunk);
static_assert(kChunk <= 1024, "a chunk's per-token values live in shared memory");

}  // namespace

StatsBuffers::StatsBuffers(int64_t t, int64_t e, int64_t g) : tokens(t), experts(e), groups(g) {
  MOE_CHECK(groups >= 1 && tokens % groups == 0, "stats: groups (", groups,
            ") must be >= 1 and divide tokens (", tokens, ")");
  chunks = (tokens + kChunk - 1) / kChunk;
  const size_t grouped = groups > 1 ? 1 : 0;
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  arena = DeviceArena({{"stats_partial", size_t(chunks * (experts + 2)) * sizeof(double),
                        p(partial)},
                       {"stats_row_sum", grouped * size_t(tokens) * sizeof(double), p(row_sum)},
                       {"stats_group_h", grouped * size_t(groups) * sizeof(double), p(group_h)},
                       {"stats_result", 3 * sizeof(double), p(result)}});
}

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// row_sum_out: null, or (T) each token's row sum (grouped mean entropy).
__global__ void __launch_bounds__(kThreads) stats_partial_kernel(const float* probs,
                                                                 PlanView plan, double* partial,
                                                                 double* row_sum_out) {
  __shared__ double row_sum[kChunk], row_h[kChunk];
  __shared__ int row_none[kChunk];
  const int64_t T = plan.shape.tokens, E = plan.shape.experts;
  const int64_t t0 = blockIdx.x * int64_t{kChunk};
  const int n = static_cast<int>(min(int64_t{kChunk}, T - t0));
  const int lane = threadIdx.x % kWarp;
  // Step 1: a warp per token: sum of the row, entropy of q = p / sum, whether a choice kept a row
  for (int i = threadIdx.x / kWarp; i < n; i += kThreads / kWarp) {
    const int64_t t = t0 + i;
    const float* p = probs + t * E;
    double s = 0;
    for (int64_t e = lane; e < E; e += kWarp) s += p[e];
    s = warp_sum_d(s);
    double h = 0;
    for (int64_t e = lane; e < E; e += kWarp) {
      const double q = p[e] / s;
      if (q > 0) h -= q * log(q);
    }
    h = warp_sum_d(h);
    bool kept = false;
    for (int32_t j = plan.token_offsets[t] + lane; j < plan.token_offsets[t + 1]; j += kWarp)
      kept = kept || plan.token_rows[j] != kDropped;
    kept = __any_sync(0xffffffffu, kept);
    if (lane == 0) {
      row_sum[i] = s;
      row_h[i] = h;
      row_none[i] = !kept;
      if (row_sum_out) row_sum_out[t] = s;
    }
  }
  __syncthreads();
  // Step 2: a thread per expert: sum of q over the chunk's tokens, in token order (the same
  // expression for q as step 1)
  double* out = partial + blockIdx.x * (E + 2);
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    double m = 0;
    for (int i = 0; i < n; ++i) m += probs[(t0 + i) * E + e] / row_sum[i];
    out[e] = m;
  }
  if (threadIdx.x == 0) {
    double h = 0, none = 0;
    for (int i = 0; i < n; ++i) h += row_h[i], none += row_none[i];
    out[E] = h;
    out[E + 1] = none;
  }
}

// Block g: the entropy of group g's mean q over its B = T / G tokens t = b*G + g, b ascending
// (the order of the CPU's call of that group); a thread per expert, then a fixed tree.
__global__ void __launch_bounds__(kThreads) stats_group_kernel(const float* probs,
                                                               const double* row_sum, int64_t T,
                                                               int64_t E, int64_t G,
                                                               double* group_h) {
  __shared__ double buf[kThreads];
  const int64_t g = blockIdx.x, B = T / G;
  double hm = 0;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    double m = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = b * G + g;
      m += probs[t * E + e] / row_sum[t];
    }
    const double q = m / double(B);
    if (q > 0) hm -= q * log(q);
  }
  buf[threadIdx.x] = hm;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) group_h[g] = buf[0];
}

// group_h: null (one group: the mean entropy from the chunk rows), or (G) the groups' entropies,
// averaged in group order.
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(const double* partial,
                                                                  int64_t chunks, int64_t T,
                                                                  int64_t E, const double* group_h,
                                                                  int64_t G, double* result) {
  __shared__ double buf[kThreads];
  // entropy of the mean distribution: a thread per expert sums its column over chunks in order
  double hm = 0;
  for (int64_t e = threadIdx.x; e < E && !group_h; e += kThreads) {
    double m = 0;
    for (int64_t c = 0; c < chunks; ++c) m += partial[c * (E + 2) + e];
    const double q = m / double(T);
    if (q > 0) hm -= q * log(q);
  }
  buf[threadIdx.x] = hm;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double h = 0, none = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      h += partial[c * (E + 2) + E];
      none += partial[c * (E + 2) + E + 1];
    }
    double mean_h = buf[0];
    if (group_h) {
      mean_h = 0;
      for (int64_t g = 0; g < G; ++g) mean_h += group_h[g];
      mean_h /= double(G);
    }
    result[0] = h / double(T);
    result[1] = mean_h;
    result[2] = none / double(T);
  }
}

__global__ void expert_bias_kernel(const int32_t* counts, int64_t E, double mean, double rate,
                                   float* bias) {
  const int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (e >= E) return;
  const double err = mean - double(counts[e]);
  const double sign = err > 0 ? 1.0 : (err < 0 ? -1.0 : 0.0);
  bias[e] += static_cast<float>(rate * sign);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

LoadStats load_stats(const float* probs, const PlanView& plan, StatsBuffers& buf,
                     cudaStream_t stream) {
  const int64_t T = plan.shape.tokens, E = plan.shape.experts, N = plan.shape.choices;
  MOE_CHECK(buf.tokens == T && buf.experts == E, "load_stats: buffers were sized for T=",
            buf.tokens, " E=", buf.experts, ", the plan has T=", T, " E=", E);
  const bool grouped = buf.groups > 1;
  double scalars[3] = {0, 0, 0};
  if (T > 0) {
    stats_partial_kernel<<<unsigned(buf.chunks), kThreads, 0, stream>>>(
        probs, plan, buf.partial, grouped ? buf.row_sum : nullptr);
    MOE_CUDA_LAUNCH_CHECK();
    if (grouped) {
      stats_group_kernel<<<unsigned(buf.groups), kThreads, 0, stream>>>(
          probs, buf.row_sum, T, E, buf.groups, buf.group_h);
      MOE_CUDA_LAUNCH_CHECK();
    }
    stats_finalize_kernel<<<1, kThreads, 0, stream>>>(buf.partial, buf.chunks, T, E,
                                                      grouped ? buf.group_h : nullptr, buf.groups,
                                                      buf.result);
    MOE_CUDA_LAUNCH_CHECK();
    MOE_CUDA_CHECK(cudaMemcpyAsync(scalars, buf.result, sizeof scalars, cudaMemcpyDeviceToHost,
                                   stream));
  }
  std::vector<int32_t> counts(size_t(E), 0);
  int32_t drops[2] = {0, 0};
  MOE_CUDA_CHECK(cudaMemcpyAsync(counts.data(), plan.counts, counts.size() * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, stream));
  MOE_CUDA_CHECK(cudaMemcpyAsync(drops, plan.drops, sizeof drops, cudaMemcpyDeviceToHost, stream));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  LoadStats st;
  st.tokens_per_expert.assign(counts.begin(), counts.end());
  st.drop_rate = N > 0 ? double(drops[0] + drops[1]) / double(N) : 0;
  st.router_entropy = scalars[0];
  st.mean_entropy = scalars[1];
  st.tokens_without_expert = scalars[2];
  fill_balance(st);
  return st;
}

void update_expert_bias(const PlanView& plan, int64_t top_k, double rate, float* bias,
                        cudaStream_t stream) {
  const int64_t T = plan.shape.tokens, E = plan.shape.experts;
  MOE_CHECK(bias, "update_expert_bias: expert_bias is null");
  const double mean = double(T * top_k) / double(E);
  expert_bias_kernel<<<unsigned((E + 255) / 256), 256, 0, stream>>>(plan.counts, E, mean, rate,
                                                                    bias);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda
