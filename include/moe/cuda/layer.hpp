// defines: moe::cuda::LayerWeights, LayerGrads, LayerStage, Layer
// The whole MoE layer on the GPU in bf16, from the stages:
//   forward   gate -> route -> plan -> permute -> experts -> combine
//   backward  combine backward -> experts backward -> permute backward -> route backward -> gate
//             backward
// all on one stream, with no host synchronisation (every size the plan decides stays on the
// device; buffers are sized by PlanShape::max_rows()). What backward needs from forward lives in
// one activation arena allocated once by the constructor (logits, xp, pre, act, yp, and the
// backward's dyp, dweight, dz), next to the route, plan and experts stages' own buffers. No
// allocation happens in forward or backward, so a CUDA graph of either replays (with the seed it
// was captured with: set_seed changes kernel arguments).
//
// Storage: x, y, dx, the weights and every activation are bf16; router math, routing weights and
// the parameter gradients are fp32 (accumulated, like the CPU reference's: zero them first).
// Routers (token choice): softmax_topk (every second-choice policy), noisy_topk (w_noise, the
// noise from the counter RNG of the Layer's seed), switch_top1 (with jitter in training),
// sigmoid_bias (expert_bias optional, zeros when null). Layouts: dropless, block, padded. E = 1
// works (one segment; the dense baseline). chain_of_experts is cuda::ChainLayer (chain.hpp), one
// Layer per iteration.
// Expert choice, in `groups` position groups (route.hpp): token t = b*G + g ranks only among the
// B = T/G tokens of its group, with capacity C per group, as G CPU layer calls of B tokens each
// (the LM's groups across the batch at each position, T = B*S tokens in (b, s) order, G = S) -- in
// one call: one sort over E*G segments, then one plan, one grouped GEMM and one combine, each
// expert's segment holding the picks of every group. No auxiliary loss but the z-loss when
// z_coef > 0 (its mean over all T tokens is the mean of the groups' losses). groups = 1 is plain
// expert choice over all T tokens.
// Switch's jitter in training: the router input x * jitter is kept in fp32 (T, H), with an fp32
// copy of w_gate (H, E), so the logits see the CPU's jittered input to fp32 rounding (a bf16 copy
// of x * U[0.99, 1.01] would move each element by up to half the jitter). The backward reuses that
// buffer for dz W^T once dW_gate is made.
// Randomness (noise, jitter, random second choice) is a pure function of (seed, element) with the
// CPU's counter RNG, so the same seed gives the CPU's draws bit for bit. set_seed() before each
// forward; backward recomputes the noise of its forward's seed.
// The gradient is that of <dy, y> + aux_loss, as moe::layer_backward.
// Memory (grouped backends): the backward adds no (max_rows, *) buffer to the forward's xp, pre,
// act and yp. Each backward intermediate goes into storage whose last reader has run:
//   dyp  into yp   (combine backward; where it reads yp, in place: yp's element is read before
//                   dyp's is written; grouped_fused does not read yp at all, see below)
//   da   into act  (the experts backward computes dw_down = act^T dyp first)
//   dpre into pre  (activation backward, in place)
//   dxp  into yp   (dyp's last reader, da = dyp w_down^T, has run)
// so the experts stage is made without its own da / dpre. The host-offset and strided baselines
// keep a separate dyp and the experts stage's own da and dpre (dxp still reuses yp).
// Router-weight gradient (grouped_fused): dweight = <dy, yp> = <da, act> / weight, since dyp =
// weight * dy; the da GEMM's epilogue sums da * act per row and column tile (row_dot,
// row_dot_parts(I) x R fp32) and a per-choice pass adds the parts and divides, so the combine
// backward writes dyp without reading yp (R*H bf16 less traffic). The other backends read yp.
// Inference (backward = false) with grouped_fused writes no pre at all (nothing reads it back):
// the up-projection's epilogue writes act alone.
// The grouped backends may skip permute altogether (RowSource): the up-projection's loader fetches
// x[row_token[r]] itself (GroupedGemmArgs::gather), and in the backward so does dw_up's, so there
// is no xp; the permute stage's event then marks an empty stage.
// arena_bytes() gives the device bytes before anything is allocated (deterministic in the shape).
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "moe/config.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/experts.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/route.hpp"
#include "moe/cuda/stats.hpp"
#include "moe/stats.hpp"

namespace moe::cuda {

// Where the up-projection reads its rows: `permuted`, from xp written by the permute stage;
// `gathered`, x[row_token[r]] fetched by the grouped GEMM's own loader -- no permute
// pass and no xp (R*H bf16 less memory), grouped or grouped_fused backend only; with a backward
// the weight gradient dw_up = xp^T dpre gathers the same rows of x along its reduction
// (GroupedWgradArgs::gather), so the backward needs x and the plan, not a permuted copy;
// `automatic` (the default), gathered where that measured faster, else permuted (resolve_rows).
// The gathered loader re-fetches each row once per 256-wide column tile of the up-projection and
// runs at the rate its cp.async producer warps feed it; with xp the mainloop is TMA-fed. Since the
// SwiGLU epilogue runs under the next tile's mainloop (grouped_gemm_deferred_act_sm90.hpp) the
// TMA-fed up-projection is 11-12 % faster and the gathered one is not (its loader bounds it): on
// an H100, grouped_fused, SwiGLU, the inference forward in alternating rounds, permuted /
// gathered (layer/rounds_4ebc3bd, two rounds): OLMoE 0.954-0.962, Qwen3 0.991-1.005, Qwen3 at
// 32k 0.912-0.919, the brief's small shape 0.967-1.003, Mixtral 0.79 (gathered 1.256-1.265x),
// decode 1.030-1.031 (4 rows per expert: the permute pass is all overhead there). Before it
// (immediate epilogue, layer/rounds_27a6ca2 and rounds_d081554) gathered had been the faster by
// 2-6 % at OLMoE, Qwen3 and decode, which is where GELU (no deferred epilogue) still gathers.
// Training (grouped_fused, fresh fp32 weight gradients, 6 rotating rounds against the permuted
// layer, layer/gathered_training_10c2848): gathered took 1.013x the time at OLMoE and 1.015x at
// Qwen3 (rounds 0.97-1.07 and 0.97-1.13) for 0.50 GiB less (1.77 -> 1.27 GiB, 1.60 -> 1.10);
// with the deferred SwiGLU epilogue on the permuted side 1.047-1.062x and 1.008-1.028x
// (layer/rounds_f550fe0): automatic keeps permuting in training; gathered is the choice where
// memory binds.
enum class RowSource { permuted, gathered, automatic };

// What `rows` means for a layer of this shape: `automatic` is, for grouped_fused without backward,
// `gathered` with SwiGLU when the segments average under one 128-row tile (T*K < 128*E), and with
// GELU when the up-projection has at most 32 column tiles (I <= 8192); `permuted` otherwise. The
// other values are returned as they are (the Layer checks that `gathered` is possible).
RowSource resolve_rows(const LayerConfig& cfg, ExpertsBackend backend, bool backward,
                       RowSource rows);
const char* name(RowSource rows);

struct LayerWeights {
  const bf16* w_gate = nullptr;       // (H, E)
  const bf16* w_up = nullptr;         // (E, H, A) in the Layer's GateUpLayout
  const bf16* w_down = nullptr;       // (E, I, H)
  const float* expert_bias = nullptr; // (E) sigmoid_bias selection bias, may be null
  const bf16* w_noise = nullptr;      // (H, E) noisy_topk noise projection (required there)
};

struct LayerGrads {
  bf16* dx = nullptr;        // (T, H) overwritten
  float* dw_gate = nullptr;  // (H, E) accumulated
  float* dw_up = nullptr;    // (E, H, A) accumulated
  float* dw_down = nullptr;  // (E, I, H) accumulated
  float* dw_noise = nullptr; // (H, E) accumulated; noisy_topk (required there)
  // false: dw_up and dw_down are written instead of added to (beta = 0: never read, an empty
  // expert's slice zeroed), for a step whose only contribution this is; the router gradients
  // above are small and always accumulated.
  bool accumulate_experts = true;
  // Instead of dw_up / dw_down (then null): the expert weight gradients in bf16, written fresh
  // (accumulate_experts false), the fp32 sums rounded once -- PyTorch's gradients for bf16
  // parameters (grouped backends).
  bf16* dw_up_bf16 = nullptr;    // (E, H, A)
  bf16* dw_down_bf16 = nullptr;  // (E, I, H)
};

// Forward stages, in order; forward() can record an event before each and after the last.
enum class LayerStage { gate, route, plan, permute, experts, combine, count };
const char* name(LayerStage s);
// The backward's stages, in the order they run.
enum class LayerBackwardStage { combine, experts, permute, route, gate, count };
const char* name(LayerBackwardStage s);

class Layer {
 public:
  // cfg validated here (throws ConfigError naming what is not supported). groups: expert choice's
  // position groups (above); 1 for every other router.
  // cublas: a handle to share (not owned; the layer sets its stream on every call), or null for
  // a handle of the layer's own. A cuBLAS handle holds 64 MiB of device memory from its creation
  // on an H100, so a model shares one across its layers.
  explicit Layer(const LayerConfig& cfg, ExpertsBackend backend = ExpertsBackend::grouped,
                 GateUpLayout gate_up = GateUpLayout::split, bool backward = true,
                 int64_t groups = 1, cublasHandle_t cublas = nullptr,
                 RowSource rows = RowSource::automatic);
  ~Layer();
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // y (T, H) overwritten. events: null, or int(LayerStage::count) + 1 events recorded on `stream`
  // at the stage boundaries (benchmarks). Without events the router's auxiliary losses run on the
  // layer's second stream beside plan, permute and the experts, joined before forward returns
  // (stream-ordered on `stream`, graph-capturable); with events every stage runs on `stream`.
  // expert_events: null, or the experts stage's step events (experts_forward; grouped backends).
  void forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream,
               cudaEvent_t* events = nullptr, cudaEvent_t* expert_events = nullptr);
  // After forward() with the same x and w; dy (T, H). Once per forward: with the grouped backends
  // the backward overwrites the forward's pre, act and yp (see Memory above).
  // events: null, or int(LayerBackwardStage::count) + 1 events at the stage boundaries;
  // expert_events: null, or the experts stage's step events (experts_backward; grouped backends).
  void backward(const bf16* x, const LayerWeights& w, const bf16* dy, const LayerGrads& g,
                cudaStream_t stream, cudaEvent_t* events = nullptr,
                cudaEvent_t* expert_events = nullptr);

  // The seed of the next forward's noise, jitter and random second choice (cfg.seed). The
  // backward uses the seed its forward ran with, whatever was set since.
  void set_seed(uint64_t seed) { cfg_.seed = seed; }

  // Load statistics of the last forward, equal to the CPU's LayerForward::stats for the same
  // inputs (fill_balance applied). Enqueues two small reductions on the last forward's stream,
  // synchronises that stream and reads back E + 2 integers and 3 doubles. Valid until the next
  // forward (backward leaves what it reads untouched).
  LoadStats stats() const;
  // sigmoid_bias in training: expert_bias[e] += bias_update_rate * sign(T*K/E - count_e), with the
  // counts of the last forward, on the device (no host sync); like moe::update_expert_bias, a
  // no-op for other routers and in evaluation. Order it after forward (same stream, or an event).
  void update_expert_bias(float* expert_bias, cudaStream_t stream) const;

  const LayerConfig& config() const { return cfg_; }
  int64_t groups() const { return groups_; }
  const PlanShape& plan_shape() const { return plan_.shape(); }
  const PlanView& plan() const { return plan_.view(); }
  // The last forward's routing on the device, valid until the next forward: routing().choices
  // (= N = T*K) choices, choice c = t*K + k; choice_token (N) int32, choice_expert (N) int32 (or
  // kNoExpert = -1 for a second choice a policy skipped), choice_weight (N) fp32. Expert choice:
  // N = E*G*C, choice c = (e*G + g)*C + j, the j-th best token of group g for expert e. Download
  // with cudaMemcpy after the forward's stream has run (or download_routing in routing.hpp).
  RoutingView routing() const { return route_.routing.view(); }
  const double* aux_loss() const { return route_.aux_loss; }  // device, after forward
  // Device bytes this layer holds: activation arena + route + plan + experts workspace + the
  // stats scratch.
  size_t bytes() const;
  RowSource rows() const { return gather_ ? RowSource::gathered : RowSource::permuted; }
  // The activation arena (with noisy_topk's noise_raw and dr, and the jitter's fp32 router input,
  // where the router has them) plus the experts stage's da / dpre scratch, computed from the
  // shapes alone (no device needed): what the layer's (max_rows, *) activations cost.
  static size_t arena_bytes(const LayerConfig& cfg, ExpertsBackend backend = ExpertsBackend::grouped,
                            bool backward = true, int64_t groups = 1,
                            RowSource rows = RowSource::automatic);
  std::string report() const;

 private:
  LayerConfig forward_config() const;  // cfg_ with the last forward's seed

  LayerConfig cfg_;
  bool backward_;
  int64_t groups_ = 1;         // expert choice's position groups
  bool noisy_ = false;         // noisy_topk: noise_raw and dr
  bool jitter_ = false;        // switch_top1 in training with jitter > 0: x_router, w_gate_f32
  bool has_forward_ = false;   // forward ran: stats() and update_expert_bias() have counts
  uint64_t forward_seed_ = 0;  // cfg_.seed when forward last ran
  cudaStream_t stream_ = nullptr;  // the last forward's stream (stats)
  cublasHandle_t cublas_ = nullptr;
  bool own_cublas_ = false;
  RouteBuffers route_;
  PlanBuffers plan_;
  std::unique_ptr<ExpertsWorkspace> experts_;
  // activation arena
  float* logits_ = nullptr;    // (T, E)
  bf16* xp_ = nullptr;         // (R, H)
  bf16* pre_ = nullptr;        // (R, A)
  bf16* act_ = nullptr;        // (R, I)
  bf16* yp_ = nullptr;         // (R, H); dyp, then dxp in the backward (grouped); dxp otherwise
  bf16* dyp_ = nullptr;        // (R, H); == yp_ with the grouped backends
  float* dweight_ = nullptr;   // (N)
  float* row_dot_ = nullptr;   // (row_dot_parts(I), R) grouped_fused backward: <da, act> parts
  float* dz_ = nullptr;        // (T, E)
  bf16* dz_bf16_ = nullptr;    // (T, E); also dr's bf16 copy (noisy_topk)
  float* noise_raw_ = nullptr; // (T, E) x W_noise (noisy_topk)
  float* dr_ = nullptr;        // (T, E) d noise_raw (noisy_topk, backward)
  float* x_router_ = nullptr;  // (T, H) x * jitter in fp32; dz W_gate^T in the backward (jitter)
  float* w_gate_f32_ = nullptr;// (H, E) w_gate in fp32 (jitter)
  bool alias_ = false;         // grouped backend with backward: the aliasing above
  bool dots_in_da_ = false;    // grouped_fused with backward: dweight from the da GEMM's row dots
  bool gather_ = false;        // the up-projection gathers x's rows: no permute, no xp
  bool keep_pre_ = true;       // pre is written (false: grouped_fused without backward)
  DeviceArena arena_;
  mutable StatsBuffers stats_;  // stats() scratch (no host-visible state)
  cudaStream_t side_ = nullptr;  // forward: the router's auxiliary losses beside the rest
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
};

}  // namespace moe::cuda
