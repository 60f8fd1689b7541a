// defines: SoftMoeLayer (constructor, forward, backward, stats, expert_mass),
//          transpose_row_blocks
// Soft MoE over G groups on the device: the route, dispatch, combine stages of soft_moe.cu with a
// group dimension around the experts stage of experts.cu; include/moe/cuda/soft_moe_layer.hpp has
// the contract, src/cpu/soft_moe.cpp (one group) and src/model/transformer.cpp (the groups) the
// specification.
//   statistics: a warp per token recomputes the combine softmax from the fp32 logits and sums it
//               per expert (q, and -sum q log q); a thread per (group, expert) sums q over the
//               group's tokens; one block adds those in group order (fixed orders, doubles).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/soft_moe_layer.hpp"
#include "warp.cuh"  // defines: warp_sum, warp_max

namespace moe::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block));
}

LayerConfig checked(const LayerConfig& cfg, int64_t groups, ExpertsBackend backend) {
  cfg.validate();
  MOE_CHECK(cfg.router == Router::soft_moe, "SoftMoeLayer: router must be soft_moe, got ",
            name(cfg.router));
  MOE_CHECK(cfg.tokens >= 1, "SoftMoeLayer: tokens (per group) must be >= 1, got ", cfg.tokens);
  MOE_CHECK(cfg.shared_experts == 0, "SoftMoeLayer: shared experts are not supported, got ",
            cfg.shared_experts);
  MOE_CHECK(groups >= 1 && groups <= 65535, "SoftMoeLayer: groups must be in [1, 65535], got ",
            groups);
  MOE_CHECK(is_host_sync_free(backend), "SoftMoeLayer: experts backend ", name(backend),
            " synchronises the host; use cublas_strided_padded, grouped or grouped_fused");
  MOE_CHECK(cfg.experts * cfg.slots_per_expert * groups < (int64_t{1} << 31),
            "SoftMoeLayer: experts * slots-per-expert * groups must be below 2^31 (slot rows)");
  return cfg;
}

// q[t, e] = sum_s softmax(L[t, :])[e S + s] and h[t] = -sum_e q log q (q > 0), as the CPU's
// layer_forward sums its combine weights; a warp per token, lanes over experts.
__global__ void __launch_bounds__(kBlock)
    expert_mass_kernel(const float* __restrict__ L, int64_t T, int64_t E, int64_t S,
                       float* __restrict__ q, float* __restrict__ h) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (t >= T) return;
  const int64_t n = E * S;
  const float* row = L + t * n;
  float m = -INFINITY;
  for (int64_t j = lane; j < n; j += kWarp) m = fmaxf(m, row[j]);
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) sum += expf(row[j] - m);
  sum = warp_sum(sum);
  float ent = 0.f;
  for (int64_t e = lane; e < E; e += kWarp) {
    float qe = 0.f;
    for (int64_t s = 0; s < S; ++s) qe += expf(row[e * S + s] - m) / sum;
    q[t * E + e] = qe;
    if (qe > 0.f) ent -= qe * logf(qe);
  }
  ent = warp_sum(ent);
  if (lane == 0) h[t] = ent;
}

// group_mass[g, e] = sum over the group's B tokens of q[t, e], in token order; a thread per (g, e).
__global__ void group_mass_kernel(const float* __restrict__ q, int64_t G, int64_t B, int64_t E,
                                  double* __restrict__ group_mass) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= G * E) return;
  const int64_t g = i / E, e = i - g * E;
  double acc = 0;
  for (int64_t b = 0; b < B; ++b) acc += q[(g * B + b) * E + e];
  group_mass[i] = acc;
}

// Sum of v over threads, fixed order (strided partials, then a tree); valid in thread 0.
__device__ double block_sum(double v, double* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  const double r = buf[0];
  __syncthreads();
  return r;
}

// One block: out[e] = sum_g group_mass[g, e] (group order); out[E] = mean_t h[t];
// out[E + 1] = mean_g entropy(group_mass[g, :] / B).
__global__ void __launch_bounds__(kBlock)
    stats_finalize_kernel(const double* __restrict__ group_mass, const float* __restrict__ h,
                          int64_t G, int64_t B, int64_t E, double* __restrict__ out) {
  __shared__ double buf[kBlock];
  for (int64_t e = threadIdx.x; e < E; e += kBlock) {
    double acc = 0;
    for (int64_t g = 0; g < G; ++g) acc += group_mass[g * E + e];
    out[e] = acc;
  }
  double hs = 0;
  for (int64_t t = threadIdx.x; t < G * B; t += kBlock) hs += h[t];
  const double h_total = block_sum(hs, buf);
  double hm = 0;
  for (int64_t g = threadIdx.x; g < G; g += kBlock)
    for (int64_t e = 0; e < E; ++e) {
      const double p = group_mass[g * E + e] / double(B);
      if (p > 0) hm -= p * log(p);
    }
  const double hm_total = block_sum(hm, buf);
  if (threadIdx.x == 0) {
    out[E] = h_total / double(G * B);
    out[E + 1] = hm_total / double(G);
  }
}

// out row q P + p = in row p Q + q; a warp per output row, 16-byte packs where H and the
// pointers allow (kVec = 8), else one element per lane.
template <int kVec>
__global__ void __launch_bounds__(kBlock)
    transpose_row_blocks_kernel(const bf16* __restrict__ in, bf16* __restrict__ out, int64_t P,
                                int64_t Q, int64_t H) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * int64_t{kBlock / kWarp} + threadIdx.x / kWarp;
  if (r >= P * Q) return;
  const int64_t q = r / P, p = r - q * P;
  const bf16* src = in + (p * Q + q) * H;
  bf16* dst = out + r * H;
  if constexpr (kVec == 8) {
    for (int64_t h = int64_t{lane} * kVec; h < H; h += kWarp * kVec)
      *reinterpret_cast<uint4*>(dst + h) = __ldg(reinterpret_cast<const uint4*>(src + h));
  } else {
    for (int64_t h = lane; h < H; h += kWarp) dst[h] = src[h];
  }
}

}  // namespace

void transpose_row_blocks(const bf16* in, bf16* out, int64_t P, int64_t Q, int64_t H,
                          cudaStream_t stream) {
  MOE_CHECK(in != out, "transpose_row_blocks cannot run in place");
  if (P * Q == 0 || H == 0) return;
  const unsigned blocks = blocks_for(P * Q, kBlock / kWarp);
  const bool packs = H % 8 == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (packs)
    transpose_row_blocks_kernel<8><<<blocks, kBlock, 0, stream>>>(in, out, P, Q, H);
  else
    transpose_row_blocks_kernel<1><<<blocks, kBlock, 0, stream>>>(in, out, P, Q, H);
  MOE_CUDA_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// construction
// ------------------------------------------------------------------------------------------------

SoftMoeLayer::SoftMoeLayer(const LayerConfig& cfg, int64_t groups, ExpertsBackend backend,
                           GateUpLayout gate_up, bool backward, cublasHandle_t cublas)
    : cfg_(checked(cfg, groups, backend)),
      groups_(groups),
      backward_(backward),
      route_(cfg_, groups) {
  const int64_t G = groups_, B = cfg_.tokens, H = cfg_.hidden, E = cfg_.experts;
  const int64_t S = cfg_.slots_per_expert, I = cfg_.inter, A = cfg_.up_width();
  const int64_t R = E * S * G;
  ExpertsShape shape;
  shape.experts = E;
  shape.hidden = H;
  shape.inter = I;
  shape.activation = cfg_.activation;
  shape.max_rows = R;
  shape.gate_up = gate_up;
  own_cublas_ = cublas == nullptr;
  if (own_cublas_) MOE_CUBLAS_CHECK(cublasCreate(&cublas));
  cublas_ = cublas;
  // The experts stage's cuBLAS baselines run on the same handle (and stream).
  experts_ = std::make_unique<ExpertsWorkspace>(shape, backend, backward, /*own_scratch=*/true,
                                                cublas_);
  const size_t b = sizeof(bf16), f = sizeof(float), d = sizeof(double);
  const size_t r = R, bw = backward ? 1 : 0, T = G * B;
  auto p = [](auto*& ptr) { return reinterpret_cast<void**>(&ptr); };
  arena_ = DeviceArena({{"soft.offsets", (E + 1) * sizeof(int32_t), p(offsets_)},
                        {"soft.slots_in", r * H * b, p(slots_in_)},
                        {"soft.pre", r * A * b, p(pre_)},
                        {"soft.act", r * I * b, p(act_)},
                        {"soft.slots_out", r * H * b, p(slots_out_)},
                        {"soft.d_slots_out", bw * r * H * b, p(d_slots_out_)},
                        {"soft.d_slots_in", bw * r * H * b, p(d_slots_in_)},
                        {"soft.mass", T * E * f, p(mass_)},
                        {"soft.entropy", T * f, p(entropy_)},
                        {"soft.group_mass", G * E * d, p(group_mass_)},
                        {"soft.stats", (E + 2) * d, p(stats_out_)}});
  std::vector<int32_t> offsets(E + 1);
  for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(e * S * G);
  MOE_CUDA_CHECK(cudaMemcpy(offsets_, offsets.data(), offsets.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice));
}

SoftMoeLayer::~SoftMoeLayer() {
  experts_.reset();  // it uses the handle, it does not own it
  if (own_cublas_ && cublas_) cublasDestroy(cublas_);
}

size_t SoftMoeLayer::bytes() const {
  return route_.arena.bytes() + arena_.bytes() + experts_->bytes();
}

std::string SoftMoeLayer::report() const {
  return route_.arena.report() + ", " + arena_.report() + ", " + experts_->report();
}

// ------------------------------------------------------------------------------------------------
// forward and backward
// ------------------------------------------------------------------------------------------------

void SoftMoeLayer::forward(const bf16* x, const SoftMoeWeights& w, bf16* y, cudaStream_t stream) {
  MOE_CHECK(x && y && w.phi && w.scale && w.w_up && w.w_down,
            "SoftMoeLayer::forward: null pointer argument");
  soft_moe_route_forward<bf16>(cublas_, x, w.phi, w.scale, route_, stream);
  soft_moe_dispatch_forward<bf16>(cublas_, route_, x, slots_in_, stream);
  ExpertsForwardArgs a;
  a.offsets = offsets_;
  a.w_up = w.w_up;
  a.w_down = w.w_down;
  a.xp = slots_in_;
  a.pre = pre_;
  a.act = act_;
  a.yp = slots_out_;
  experts_forward(*experts_, a, stream);
  soft_moe_combine_forward<bf16>(cublas_, route_, slots_out_, y, stream);
  has_forward_ = true;
  stream_ = stream;
}

void SoftMoeLayer::backward(const bf16* x, const SoftMoeWeights& w, const bf16* dy,
                            const SoftMoeGrads& g, cudaStream_t stream) {
  MOE_CHECK(backward_, "SoftMoeLayer::backward: the layer was made without backward buffers");
  MOE_CHECK(has_forward_, "SoftMoeLayer::backward: no forward ran");
  MOE_CHECK(x && dy && w.phi && w.scale && w.w_up && w.w_down && g.dx && g.dphi && g.dscale &&
                g.dw_up && g.dw_down,
            "SoftMoeLayer::backward: null pointer argument");
  soft_moe_combine_backward<bf16>(cublas_, route_, slots_out_, dy, d_slots_out_, stream);
  ExpertsBackwardArgs a;
  a.offsets = offsets_;
  a.w_up = w.w_up;
  a.w_down = w.w_down;
  a.xp = slots_in_;
  a.pre = pre_;
  a.act = act_;
  a.dyp = d_slots_out_;
  a.dxp = d_slots_in_;
  a.dw_up = g.dw_up;
  a.dw_down = g.dw_down;
  a.accumulate = g.accumulate_experts;
  experts_backward(*experts_, a, stream);
  // The dispatch and route backwards add into dx.
  MOE_CUDA_CHECK(cudaMemsetAsync(g.dx, 0, size_t(route_.tokens * route_.hidden) * sizeof(bf16),
                                 stream));
  soft_moe_dispatch_backward<bf16>(cublas_, route_, x, d_slots_in_, g.dx, stream);
  soft_moe_route_backward<bf16>(cublas_, route_, x, w.phi, w.scale, g.dx, g.dphi, g.dscale,
                                stream);
}

// ------------------------------------------------------------------------------------------------
// statistics
// ------------------------------------------------------------------------------------------------

const float* SoftMoeLayer::expert_mass(cudaStream_t stream) const {
  MOE_CHECK(has_forward_, "SoftMoeLayer::expert_mass: no forward ran");
  const int64_t T = route_.tokens;
  expert_mass_kernel<<<blocks_for(T, kBlock / kWarp), kBlock, 0, stream>>>(
      route_.logits, T, cfg_.experts, cfg_.slots_per_expert, mass_, entropy_);
  MOE_CUDA_LAUNCH_CHECK();
  return mass_;
}

LoadStats SoftMoeLayer::stats() const {
  MOE_CHECK(has_forward_, "SoftMoeLayer::stats: no forward ran");
  const int64_t G = groups_, B = cfg_.tokens, E = cfg_.experts;
  expert_mass(stream_);
  group_mass_kernel<<<blocks_for(G * E, kBlock), kBlock, 0, stream_>>>(mass_, G, B, E,
                                                                        group_mass_);
  MOE_CUDA_LAUNCH_CHECK();
  stats_finalize_kernel<<<1, kBlock, 0, stream_>>>(group_mass_, entropy_, G, B, E, stats_out_);
  MOE_CUDA_LAUNCH_CHECK();
  std::vector<double> host(E + 2);
  MOE_CUDA_CHECK(cudaMemcpyAsync(host.data(), stats_out_, host.size() * sizeof(double),
                                 cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  LoadStats s;
  s.tokens_per_expert.assign(host.begin(), host.begin() + E);
  s.router_entropy = host[E];
  s.mean_entropy = host[E + 1];
  fill_balance(s);
  return s;
}

}  // namespace moe::cuda
