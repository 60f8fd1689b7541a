// defines: layer_config_names, layer_router_names, parse_layer_shape, run_layer_bench —
// `moe-bench bench --layer`: the whole MoE layer on the GPU (cuda::Layer: gate, route, plan,
// permute, experts, combine, bf16, dropless; softmax_topk or another token-choice router,
// --router) at the model configurations of issue 4 or at shapes of the user's own (--shape), next
// to a dense-equivalent cuBLAS bf16 GEMM pair with the same FLOPs, measured in the same run on the
// same card.
//
// Method: seeded random inputs and weights (N(0,1) x, weights N(0, 1/fan_in)), CUDA events,
// warm-up first, median of --reps runs (>= 20). Per-stage forward times come from events recorded
// between the stages of one forward (median per stage over the reps), per-stage backward times
// (and the experts stage's five steps) likewise from fresh-gradient backwards, with every stage in
// order on one stream (the totals run the router's auxiliary losses and dw_down on second streams,
// beside the stages after them); the forward total and the
// forward+backward total are timed separately, as whole launches; forward+backward twice, with the
// expert weight gradients accumulated (fwd_bwd_ms) and written fresh (fwd_bwd_fresh_ms, what a
// training step with zeroed gradients needs), and written fresh in bf16 (fwd_bwd_bf16_grads_ms:
// the work of the peer, whose autograd writes bf16 gradients for bf16 parameters); the two fresh
// ones and the fresh fp32 step of a training layer with gathered rows (fwd_bwd_fresh_gathered_ms:
// no permute and no xp) rotate in 6 rounds and report their medians (rounds_fwd_bwd_*). No input
// rotation:
// the layer's working set (weights and activations) is many times the L2 cache.
// FLOPs: forward 6*T*K*H*I (SwiGLU: the up projection 2*T*K*H*2I, the down projection
// 2*T*K*I*H); backward twice that; the gate (2*T*H*E) is not counted.
// Dense equivalent: cublasGemmEx (bf16 in and out, fp32 compute) (T*K, H) x (H, 2I) then
// (T*K, I) x (I, H): exactly the forward's expert FLOPs as two dense GEMMs; for forward+backward
// the same pair and the backward's four GEMMs of one dense FFN over T*K rows (FfnStep), and the
// same as strided-batched GEMMs over E experts of T*K/E rows (even routing, each expert's own
// weights), timed in rounds rotating with the bf16-gradient step (dense_equiv_fwd_bwd_*,
// even_batched_fwd_bwd_*).
// Decode (T = 64 at the Qwen3 shape) is bound by reading weights, not by FLOPs: its floor is the
// bytes of the expert weights the routing actually touches (experts with at least one row, each
// H*2I + I*H bf16 values, counted from the plan of the timed input) plus x, y and the gate over
// the measured device-to-device copy bandwidth (1 GiB copy, read + written bytes, same run).
// Every configuration records that floor; only for decode is it the one that binds.
// Memory: the layer's own device bytes (activation arena, route, plan and experts workspaces,
// sized once) and the cudaMemGetInfo drop from before the layer is built to after one
// forward+backward (adds cuBLAS workspaces and anything the stages allocate lazily), measured
// after a throwaway layer has paid the process's one-time costs (its drop is recorded as well),
// with the layers sharing one cuBLAS handle made before the baseline.
// Experts stage: grouped_fused with w_up's pairs in the blocked order (kLayerBackend /
// kLayerGateUp below; w_up converted once before timing, as a model keeps its parameters).
// Forwards are timed for the training layer (forward_*: it keeps xp, pre and act for the
// backward) and for inference layers (built without backward: the counterpart of the peer's
// no_grad forward; no pre is written): inference_* with the layers' experts stage and
// RowSource::automatic (inference_rows: gathered or permuted, by the shape), and two for
// comparison, the same with the other row source (inference_other_rows_*) and the unfused
// grouped path on split w_up (inference_permuted_*, the first headline); the headline forward
// also replayed from a CUDA graph (inference_graph_ms: no launch gaps, what decode pays there).
// Order: the headline numbers first, in the peer's order (inference forward, training forward,
// forward+backward accumulating, then fresh), then the diagnostics (stage and step times), then
// the dense pair: the card is power-limited under long GEMM-heavy stretches
// (its SM clock drops from 1980 to 1250-1750 MHz at 700 W), so whatever runs later reads slower.
// Clocks: where NVML can be loaded (ClockSampler), the median SM clock and the share of samples
// in which the driver names its power cap, under the headline inference forward, the fresh fp32
// and bf16 steps and the two cuBLAS steps (sm_clock_mhz, power_capped_share, clock_samples).
// Energy: the board's energy per run of the same five and its mean power (energy_per_run_j,
// mean_power_w) come from loops of their own (moe::cuda::energy_loop), a second of each after
// all of its timed loops, which are too short to read energy from.
// The dense pair is timed once after the layers (dense_equiv_*), and then in 6 rounds with the
// inference forward and its other-row-source variant, the three in a rotating order (rounds_*):
// each round's ratios see the same clocks on all sides, and their medians
// (inference_fraction_of_dense_rounds_median, other_rows_over_inference_rounds_median) are the
// numbers to quote.
// Inputs, weights and gradients are not counted (the PyTorch peer reports its peak over the same
// baseline: inputs and parameters allocated before).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "io/jsonl.hpp"
#include "moe-bench/bench_layer.hpp"
#include "moe/check.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/clock_sampler.hpp"
#include "moe/cuda/fill.hpp"
#include "moe/cuda/layer.hpp"

namespace moe_bench {

namespace {

using json = nlohmann::ordered_json;
using moe::cuda::bf16;

std::vector<LayerShape> layer_shapes() {
  return {{"olmoe", 16384, 2048, 1024, 64, 8},
          {"qwen3", 16384, 2048, 768, 128, 8},
          {"qwen3_32k", 32768, 2048, 768, 128, 8},
          {"mixtral", 8192, 4096, 14336, 8, 2},
          {"brief_small", 8192, 1024, 4096, 16, 2},
          {"decode", 64, 2048, 768, 128, 8},
          {"lm_gpu", 8192, 512, 1024, 16, 2}};  // one FFN of `moe-bench train --device gpu`
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median ms of `run` over reps launches (events around each), after `warmup` launches.
template <class F>
double time_median(int warmup, int reps, cudaStream_t stream, F&& run) {
  for (int i = 0; i < warmup; ++i) run();
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    run();
    MOE_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> ms(reps);
  for (int i = 0; i < reps; ++i) {
    float m = 0;
    MOE_CUDA_CHECK(cudaEventElapsedTime(&m, ev[2 * i], ev[2 * i + 1]));
    ms[i] = m;
  }
  for (auto& e : ev) MOE_CUDA_CHECK(cudaEventDestroy(e));
  return median(ms);
}

// time_median, with the SM clock sampled into `samples` while the loop runs (warm-up included;
// the energy of loops this short is not read: see moe::cuda::energy_loop).
template <class F>
double time_median_clocked(moe::cuda::ClockSampler& clocks, moe::cuda::ClockSamples& samples,
                           int warmup, int reps, cudaStream_t stream, F&& run) {
  clocks.start(&samples);
  const double ms = time_median(warmup, reps, stream, run);
  clocks.stop();
  return ms;
}

// Events for `reps` runs of n stages (n + 1 boundaries each), and the median of each stage.
struct StageEvents {
  int n, reps;
  std::vector<cudaEvent_t> ev;
  StageEvents(int n_, int reps_) : n(n_), reps(reps_), ev(size_t(reps_) * (n_ + 1)) {
    for (auto& e : ev) MOE_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~StageEvents() {
    for (auto& e : ev) cudaEventDestroy(e);
  }
  cudaEvent_t* of(int r) { return &ev[size_t(r) * (n + 1)]; }
  std::vector<double> medians() {
    std::vector<double> ms(n);
    for (int st = 0; st < n; ++st) {
      std::vector<double> v(reps);
      for (int r = 0; r < reps; ++r) {
        float m = 0;
        MOE_CUDA_CHECK(cudaEventElapsedTime(&m, of(r)[st], of(r)[st + 1]));
        v[r] = m;
      }
      ms[st] = median(v);
    }
    return ms;
  }
};

// Median ms of each forward stage over o.reps forwards, from events recorded between the stages,
// and of the experts stage's steps (up, down) into *steps where asked (grouped backends).
std::vector<double> forward_stage_times(moe::cuda::Layer& layer, const bf16* x,
                                        const moe::cuda::LayerWeights& w, bf16* y,
                                        const LayerBenchOptions& o, cudaStream_t stream,
                                        std::vector<double>* steps = nullptr) {
  StageEvents ev(int(moe::cuda::LayerStage::count), o.reps);
  StageEvents xev(int(moe::cuda::ExpertsForwardStep::count), o.reps);
  for (int i = 0; i < o.warmup; ++i) layer.forward(x, w, y, stream);
  for (int r = 0; r < o.reps; ++r)
    layer.forward(x, w, y, stream, ev.of(r), steps ? xev.of(r) : nullptr);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (steps) *steps = xev.medians();
  return ev.medians();
}

// Median ms of each backward stage over o.reps forward+backward steps with gradients g, from
// events between the stages, and of the experts stage's steps into *steps.
std::vector<double> backward_stage_times(moe::cuda::Layer& layer, const bf16* x,
                                         const moe::cuda::LayerWeights& w, bf16* y,
                                         const bf16* dy, const moe::cuda::LayerGrads& g,
                                         const LayerBenchOptions& o, cudaStream_t stream,
                                         std::vector<double>* steps) {
  StageEvents bev(int(moe::cuda::LayerBackwardStage::count), o.reps);
  StageEvents xev(int(moe::cuda::ExpertsBackwardStep::count), o.reps);
  for (int i = 0; i < o.warmup; ++i) {
    layer.forward(x, w, y, stream);
    layer.backward(x, w, dy, g, stream);
  }
  for (int r = 0; r < o.reps; ++r) {
    layer.forward(x, w, y, stream);
    layer.backward(x, w, dy, g, stream, bev.of(r), xev.of(r));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  *steps = xev.medians();
  return bev.medians();
}

// Row-major D (m, n) = op(A) op(B), bf16 in/out, fp32 compute; op(A) is (m, k), stored (m, k),
// or (k, m) with ta; op(B) is (k, n), stored (k, n), or (n, k) with tb. cuBLAS is column-major:
// it computes D^T = op(B)^T op(A)^T, whose operands are the row-major buffers as they lie.
void gemm_rm(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const bf16* a, const bf16* b,
             bf16* d, bool ta = false, bool tb = false) {
  const float one = 1.f, zero = 0.f;
  MOE_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                int(n), int(m), int(k), &one, b, CUDA_R_16BF, int(tb ? k : n), a,
                                CUDA_R_16BF, int(ta ? m : k), &zero, d, CUDA_R_16BF, int(n),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Row-major op(A) op(B) for `batches` problems at strides sa, sb, sd (elements) apart.
void gemm_rm_batched(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const bf16* a,
                     int64_t sa, const bf16* b, int64_t sb, bf16* d, int64_t sd, int64_t batches,
                     bool ta = false, bool tb = false) {
  if (batches == 1) return gemm_rm(h, m, n, k, a, b, d, ta, tb);
  const float one = 1.f, zero = 0.f;
  MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m), int(k),
      &one, b, CUDA_R_16BF, int(tb ? k : n), sb, a, CUDA_R_16BF, int(ta ? m : k), sa, &zero, d,
      CUDA_R_16BF, int(n), sd, int(batches), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// A SwiGLU FFN's training step as cuBLAS bf16 GEMMs (bf16 out, the weight gradients too), over
// `batches` experts of `rows` rows each: the layer's forward+backward FLOPs without the routing.
// batches = 1, rows = T*K: one dense FFN (the dense equivalent); batches = E, rows = T*K/E: the
// layer with perfectly even routing, each expert's weights and weight gradients its own
// (strided-batched GEMMs: E times the weight bytes of the dense step). Per expert, forward pre =
// xp w_up (rows, 2I), yp = act w_down (rows, H); backward da = dyp w_down^T (rows, I), dW_down =
// act^T dyp (I, H), dxp = dpre w_up^T (rows, H), dW_up = xp^T dpre (H, 2I). The operands are
// buffers of random values (xp and act share one, dyp is yp, dpre is pre), so the values, which
// move the card's power draw, stay those of a real step and never grow from step to step.
struct FfnStep {
  int64_t batches, rows, H, I;
  bf16 *x, *pre, *yp, *da, *dxp, *dw_up, *dw_down;
  const bf16 *w_up, *w_down;
  static constexpr int kGemms = 6;
  static constexpr const char* kNames[kGemms] = {"up", "down", "da", "dw_down", "dxp", "dw_up"};
  // events: null, or kGemms + 1 events recorded on `stream` (the handle's) around each GEMM
  void run(cublasHandle_t h, cudaStream_t stream, cudaEvent_t* events = nullptr) const {
    const int64_t A = 2 * I, M = rows, B = batches;
    auto mark = [&](int i) {
      if (events) MOE_CUDA_CHECK(cudaEventRecord(events[i], stream));
    };
    mark(0);
    gemm_rm_batched(h, M, A, H, x, M * H, w_up, H * A, pre, M * A, B);
    mark(1);
    gemm_rm_batched(h, M, H, I, x, M * I, w_down, I * H, yp, M * H, B);
    mark(2);
    gemm_rm_batched(h, M, I, H, yp, M * H, w_down, I * H, da, M * I, B, false, true);
    mark(3);
    gemm_rm_batched(h, I, H, M, x, M * I, yp, M * H, dw_down, I * H, B, true, false);
    mark(4);
    gemm_rm_batched(h, M, H, A, pre, M * A, w_up, H * A, dxp, M * H, B, false, true);
    mark(5);
    gemm_rm_batched(h, H, A, M, x, M * H, pre, M * A, dw_up, H * A, B, true, false);
    mark(6);
  }
};

template <class T>
T* dev_alloc(size_t n) {
  T* p = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
  return p;
}

// Median GB/s of a 1 GiB device-to-device copy, counting bytes read + bytes written.
double copy_bandwidth(const LayerBenchOptions& o, cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&a, bytes));
  MOE_CUDA_CHECK(cudaMalloc(&b, bytes));
  MOE_CUDA_CHECK(cudaMemsetAsync(a, 1, bytes, stream));
  int i = 0;
  const double ms = time_median(o.warmup, o.reps, stream, [&] {
    MOE_CUDA_CHECK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice,
                                   stream));
    ++i;
  });
  MOE_CUDA_CHECK(cudaFree(a));
  MOE_CUDA_CHECK(cudaFree(b));
  return 2.0 * double(bytes) / (ms * 1e6);
}

// The experts stage of the layers timed here: the activation in the up-projection's epilogue,
// w_up's gate/up pairs in the blocked order (experts.hpp). The unfused path is timed beside it
// for inference (inference_permuted_ms).
constexpr moe::cuda::ExpertsBackend kLayerBackend = moe::cuda::ExpertsBackend::grouped_fused;
constexpr moe::cuda::GateUpLayout kLayerGateUp = moe::cuda::GateUpLayout::blocked;

moe::LayerConfig layer_config(const LayerShape& s, moe::Router router) {
  moe::LayerConfig cfg;
  cfg.tokens = s.T;
  cfg.hidden = s.H;
  cfg.inter = s.I;
  cfg.experts = s.E;
  cfg.top_k = router == moe::Router::switch_top1 ? 1 : s.K;
  cfg.router = router;
  cfg.layout = moe::Layout::dropless;
  cfg.activation = moe::Activation::swiglu;
  cfg.validate();
  return cfg;
}

// What bench_one holds at its peak, from the shapes alone: inputs, weights (w_up twice: as drawn
// and blocked), the fp32 and bf16 weight gradients, then either the two training layers (rows
// permuted and gathered) with the dense step's buffers, or the dense pair's buffers beside two
// inference layers; 1 GiB more for
// cuBLAS, the workspaces and the allocator. A shape that does not fit is refused in one line
// before anything runs.
void check_fits(const LayerShape& s, moe::Router router) {
  const moe::LayerConfig cfg = layer_config(s, router);
  const double T = double(s.T), H = double(s.H), I = double(s.I), E = double(s.E),
               A = 2 * I, M = T * double(cfg.top_k);
  const double base = 2 * (4 * T * H + H * E + 3 * E * H * A + 2 * E * I * H) +
                      4 * (H * E + E * H * A + E * I * H);
  const auto fused = kLayerBackend;
  const double rows = E * std::ceil(M / E);  // the even step's
  const double dense_step = 2 * (rows * (std::max(H, I) + A + 2 * H + I) + 2 * H * A);
  const double training =
      double(moe::cuda::Layer::arena_bytes(cfg, fused, true, 1, moe::cuda::RowSource::permuted)) +
      double(moe::cuda::Layer::arena_bytes(cfg, fused, true, 1, moe::cuda::RowSource::gathered)) +
      dense_step;
  const double dense =
      2 * (M * std::max(H, I) + M * A + M * H) +
      double(moe::cuda::Layer::arena_bytes(cfg, fused, false, 1, moe::cuda::RowSource::permuted)) +
      double(moe::cuda::Layer::arena_bytes(cfg, fused, false, 1, moe::cuda::RowSource::gathered));
  const double need = base + std::max(training, dense) + double(1 << 30);
  size_t free = 0, total = 0;
  MOE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  MOE_CHECK(need <= double(free), "bench --layer ", s.name, ": needs about ",
            fmt::format("{:.1f}", need / double(1 << 30)), " GiB of device memory, ",
            fmt::format("{:.1f}", double(free) / double(1 << 30)), " GiB free");
}

void bench_one(const LayerBenchOptions& o, const std::string& device, const LayerShape& s,
               double copy_gbs, cudaStream_t stream) {
  const moe::LayerConfig cfg = layer_config(s, o.router);
  const int64_t T = s.T, H = s.H, I = s.I, E = s.E, K = cfg.top_k, A = 2 * I;
  int device_index = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device_index));
  // The clock under the headline loops (see Clocks above)
  moe::cuda::ClockSampler clocks(device_index);
  moe::cuda::ClockSamples clk_inference, clk_fresh, clk_bf16, clk_dense_step, clk_even_step;
  // ... and the energy loops' samples (energy_loop), of the same five
  moe::cuda::ClockSamples j_inference, j_fresh, j_bf16, j_dense_step, j_even_step;

  bf16* x = dev_alloc<bf16>(T * H);
  bf16* dy = dev_alloc<bf16>(T * H);
  bf16* y = dev_alloc<bf16>(T * H);
  bf16* dx = dev_alloc<bf16>(T * H);
  bf16* wg = dev_alloc<bf16>(H * E);
  bf16* wu = dev_alloc<bf16>(E * H * A);
  bf16* wd = dev_alloc<bf16>(E * I * H);
  float* gwg = dev_alloc<float>(H * E);
  float* gwu = dev_alloc<float>(E * H * A);
  float* gwd = dev_alloc<float>(E * I * H);
  bf16* gwu16 = dev_alloc<bf16>(E * H * A);
  bf16* gwd16 = dev_alloc<bf16>(E * I * H);
  // noisy_topk's noise projection and its gradient (the other routers do not read them)
  bf16* wn = dev_alloc<bf16>(H * E);
  float* gwn = dev_alloc<float>(H * E);
  moe::cuda::fill_normal(x, T * H, 1, 1.f, stream);
  moe::cuda::fill_normal(wn, H * E, 7, float(1 / std::sqrt(double(H))), stream);
  MOE_CUDA_CHECK(cudaMemsetAsync(gwn, 0, H * E * sizeof(float), stream));
  moe::cuda::fill_normal(dy, T * H, 2, 1.f, stream);
  moe::cuda::fill_normal(wg, H * E, 3, float(1 / std::sqrt(double(H))), stream);
  moe::cuda::fill_normal(wu, E * H * A, 4, float(1 / std::sqrt(double(H))), stream);
  moe::cuda::fill_normal(wd, E * I * H, 5, float(1 / std::sqrt(double(I))), stream);
  MOE_CUDA_CHECK(cudaMemsetAsync(gwg, 0, H * E * sizeof(float), stream));
  MOE_CUDA_CHECK(cudaMemsetAsync(gwu, 0, E * H * A * sizeof(float), stream));
  MOE_CUDA_CHECK(cudaMemsetAsync(gwd, 0, E * I * H * sizeof(float), stream));
  // The layers run the fused up-projection on w_up with its pairs in the blocked order (a
  // load-time conversion, as a model would keep its parameters; dW_up comes out in that order).
  bf16* wu_blocked = dev_alloc<bf16>(E * H * A);
  moe::cuda::to_gate_up_layout(wu, wu_blocked, kLayerGateUp, E * H, I, stream);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));

  // The first layer of a process also pays one-time costs (kernel modules loaded at their first
  // launch, cuBLAS's first use): a throwaway layer runs one forward + backward first, so the
  // delta below is the layer's own, as the peer's baseline comes after its warm-up step. Its
  // delta is recorded too (mem_delta_first_bytes).
  // The layers share one cuBLAS handle made here, as a model's layers do (and as PyTorch's handle
  // exists before the peer's baseline): a handle holds 64 MiB from its creation on an H100.
  cublasHandle_t cublas = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&cublas));
  size_t free0 = 0, free1 = 0, total = 0;
  double first_delta = 0;
  {
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOE_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
    moe::cuda::Layer warm(cfg, kLayerBackend, kLayerGateUp, /*backward=*/true, /*groups=*/1,
                          cublas);
    const moe::cuda::LayerWeights w{wg, wu_blocked, wd, nullptr, wn};
    warm.forward(x, w, y, stream);
    warm.backward(x, w, dy, moe::cuda::LayerGrads{dx, gwg, gwu, gwd, gwn}, stream);
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOE_CUDA_CHECK(cudaMemGetInfo(&free1, &total));
    first_delta = double(free0) - double(free1);
  }
  // The headline numbers first, in the peer's order (its no_grad forward, then forward+backward
  // accumulating, then fresh), before any diagnostic loop: under long GEMM-heavy stretches the
  // card reaches its power limit and lowers its clocks (layer_rounds.sh samples them), so a
  // number timed after more heavy work reads slower. Inference as the peer's forward under
  // torch.no_grad(): a layer built without backward. The headline is kInference (the layers'
  // experts stage, no pre written, rows as RowSource::automatic picks for the shape); right after
  // it the same with the other row source and the unfused grouped path on split w_up, for
  // comparison.
  struct Inference {
    const char* name;
    moe::cuda::ExpertsBackend backend;
    moe::cuda::GateUpLayout gate_up;
    moe::cuda::RowSource rows;
    double ms = 0;
    double graph_ms = 0;  // the same forward replayed from a CUDA graph (headline variant only):
                          // the rounds' median, timed later than `ms` and so at a lower clock
    double graph_over_eager = 0;  // median over rounds that alternate the two
    size_t bytes = 0;
    std::vector<double> stage_ms;
    std::vector<double> step_ms;  // the experts stage's up and down
  };
  enum { kInference, kOther, kUnfused };
  const moe::cuda::RowSource rows = moe::cuda::resolve_rows(
      cfg, kLayerBackend, /*backward=*/false, moe::cuda::RowSource::automatic);
  const moe::cuda::RowSource other_rows = rows == moe::cuda::RowSource::gathered
                                              ? moe::cuda::RowSource::permuted
                                              : moe::cuda::RowSource::gathered;
  Inference variants[3] = {
      {"fused", kLayerBackend, kLayerGateUp, rows, 0, 0, 0, 0, {}, {}},
      {"fused, other rows", kLayerBackend, kLayerGateUp, other_rows, 0, 0, 0, 0, {}, {}},
      {"unfused", moe::cuda::ExpertsBackend::grouped, moe::cuda::GateUpLayout::split,
       moe::cuda::RowSource::permuted, 0, 0, 0, 0, {}, {}}};
  auto time_inference = [&](int v, bool total, bool stages) {
    Inference& inf = variants[v];
    moe::cuda::Layer infer(cfg, inf.backend, inf.gate_up, /*backward=*/false, /*groups=*/1,
                           cublas, inf.rows);
    const moe::cuda::LayerWeights w{
        wg, inf.gate_up == moe::cuda::GateUpLayout::blocked ? wu_blocked : wu, wd, nullptr, wn};
    inf.bytes = infer.bytes();
    auto forward = [&] { infer.forward(x, w, y, stream); };
    if (total)
      inf.ms = v == kInference ? time_median_clocked(clocks, clk_inference, o.warmup, o.reps,
                                                     stream, forward)
                               : time_median(o.warmup, o.reps, stream, forward);
    if (total && v == kInference) {
      // One graph launch instead of a launch per kernel: what a server replaying its decode step
      // pays; the eager time above is the headline (the peer launches eagerly too). Timed in
      // rounds that alternate eager and graph (either first), since the clock drifts under load.
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      infer.forward(x, w, y, stream);
      MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      auto eager = [&] { infer.forward(x, w, y, stream); };
      auto replay = [&] { MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream)); };
      std::vector<double> graph_ms, ratio;
      for (int r = 0; r < 6; ++r) {
        double e = 0, g = 0;
        if (r % 2 == 0) {
          e = time_median(o.warmup, o.reps, stream, eager);
          g = time_median(o.warmup, o.reps, stream, replay);
        } else {
          g = time_median(o.warmup, o.reps, stream, replay);
          e = time_median(o.warmup, o.reps, stream, eager);
        }
        graph_ms.push_back(g);
        ratio.push_back(g / e);
      }
      inf.graph_ms = median(graph_ms);
      inf.graph_over_eager = median(ratio);
      MOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
      MOE_CUDA_CHECK(cudaGraphDestroy(graph));
    }
    if (stages) inf.stage_ms = forward_stage_times(infer, x, w, y, o, stream, &inf.step_ms);
  };
  time_inference(kInference, /*total=*/true, /*stages=*/false);
  time_inference(kOther, /*total=*/true, /*stages=*/false);
  time_inference(kUnfused, /*total=*/true, /*stages=*/false);

  MOE_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
  double fwd_ms = 0, step_ms = 0, fresh_ms = 0, bf16_ms = 0;
  std::vector<double> fresh_rounds, bf16_rounds, gathered_rounds;
  // FfnStep dense and evenly batched, and the bf16 step beside them
  std::vector<double> dense_step_rounds, even_step_rounds, beside_dense_rounds;
  int64_t even_rows = 0;  // rows per expert of the even step
  std::vector<double> dense_gemm_ms, even_gemm_ms;  // the two steps' GEMMs (FfnStep::kNames)
  size_t gathered_bytes = 0;
  std::vector<double> backward_stage_ms, experts_step_ms, experts_step_bf16_ms;
  std::vector<double> experts_fwd_step_ms;  // the training forward's up and down
  std::vector<double> stage_ms(int(moe::cuda::LayerStage::count));
  size_t layer_bytes = 0;
  int64_t touched = 0;  // experts with at least one routed row
  std::string layer_report;
  {
    moe::cuda::Layer layer(cfg, kLayerBackend, kLayerGateUp, /*backward=*/true, /*groups=*/1,
                           cublas);
    layer_bytes = layer.bytes();
    layer_report = layer.report();
    const moe::cuda::LayerWeights w{wg, wu_blocked, wd, nullptr, wn};
    const moe::cuda::LayerGrads g{dx, gwg, gwu, gwd, gwn};
    layer.forward(x, w, y, stream);
    std::vector<int32_t> counts(E);
    MOE_CUDA_CHECK(cudaMemcpyAsync(counts.data(), layer.plan().counts, E * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
    layer.backward(x, w, dy, g, stream);
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOE_CUDA_CHECK(cudaMemGetInfo(&free1, &total));
    touched = std::count_if(counts.begin(), counts.end(), [](int32_t c) { return c > 0; });

    fwd_ms = time_median(o.warmup, o.reps, stream, [&] { layer.forward(x, w, y, stream); });
    step_ms = time_median(o.warmup, o.reps, stream, [&] {
      layer.forward(x, w, y, stream);
      layer.backward(x, w, dy, g, stream);
    });
    // A training step's usual case: the expert weight gradients written fresh, not added to --
    // in fp32, and in bf16 as the peer's autograd writes them for bf16 parameters. The two
    // alternate in kFreshRounds rounds, either first in every other round: timed one after the
    // other, the second read up to 10 % slow under the power limit (bf16 at OLMoE, calls
    // e633b67 to 3edcf69). Each is the median of its rounds.
    moe::cuda::LayerGrads fresh = g;
    fresh.accumulate_experts = false;
    moe::cuda::LayerGrads fresh16 = fresh;
    fresh16.dw_up = fresh16.dw_down = nullptr;
    fresh16.dw_up_bf16 = gwu16;
    fresh16.dw_down_bf16 = gwd16;
    // The same fresh fp32 step on a training layer whose rows are gathered (no permute, no xp:
    // the up-projection and dw_up fetch x[row_token] themselves) joins the rotation, so that the
    // two row sources are compared in like positions.
    moe::cuda::Layer gathered(cfg, kLayerBackend, kLayerGateUp, /*backward=*/true, /*groups=*/1,
                              cublas, moe::cuda::RowSource::gathered);
    gathered_bytes = gathered.bytes();
    moe::cuda::ClockSamples clk_other;  // the gathered rows' step: not reported
    auto time_step = [&](moe::cuda::Layer& l, const moe::cuda::LayerGrads& grads,
                         moe::cuda::ClockSamples& into) {
      return time_median_clocked(clocks, into, o.warmup, o.reps, stream, [&] {
        l.forward(x, w, y, stream);
        l.backward(x, w, dy, grads, stream);
      });
    };
    constexpr int kFreshRounds = 6;  // each loop in each position twice
    std::vector<double>* rounds_of[3] = {&fresh_rounds, &bf16_rounds, &gathered_rounds};
    for (int r = 0; r < kFreshRounds; ++r)
      for (int i = 0; i < 3; ++i) {
        const int v = (i + r) % 3;
        rounds_of[v]->push_back(v == 0   ? time_step(layer, fresh, clk_fresh)
                                : v == 1 ? time_step(layer, fresh16, clk_bf16)
                                         : time_step(gathered, fresh, clk_other));
      }
    fresh_ms = median(fresh_rounds);
    bf16_ms = median(bf16_rounds);
    // The same FLOPs as cuBLAS steps (FfnStep): one dense FFN, and the layer with even routing
    // as strided-batched GEMMs (E experts of ceil(T*K/E) rows, the weight gradients into the
    // bf16 ones' buffers), rotating with the bf16 step in kFreshRounds rounds: all as long and
    // as hot, so each round's ratios see one clock (the forward's dense pair is timed in short
    // forward-only loops, at a higher clock than forward+backward loops get under the power
    // limit).
    {
      const int64_t M = T * K, Mb = (M + E - 1) / E, rows = E * Mb;
      const int64_t R = std::max(H, I);
      bf16* xr = dev_alloc<bf16>(rows * R);
      FfnStep dense{1, M, H, I, xr, dev_alloc<bf16>(rows * A), dev_alloc<bf16>(rows * H),
                    dev_alloc<bf16>(rows * I), dev_alloc<bf16>(rows * H), dev_alloc<bf16>(H * A),
                    dev_alloc<bf16>(I * H), wu, wd};
      FfnStep even = dense;
      even.batches = E;
      even.rows = Mb;
      even.dw_up = gwu16;
      even.dw_down = gwd16;
      moe::cuda::fill_normal(xr, rows * R, 8, 1.f, stream);
      cublasHandle_t h = nullptr;
      MOE_CUBLAS_CHECK(cublasCreate(&h));
      MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
      for (int r = 0; r < kFreshRounds; ++r) {
        double t[3] = {0, 0, 0};
        for (int i = 0; i < 3; ++i) {
          const int v = (i + r) % 3;
          t[v] = v == 0   ? time_step(layer, fresh16, clk_bf16)
                 : v == 1 ? time_median_clocked(clocks, clk_dense_step, o.warmup, o.reps, stream,
                                                [&] { dense.run(h, stream); })
                          : time_median_clocked(clocks, clk_even_step, o.warmup, o.reps, stream,
                                                [&] { even.run(h, stream); });
        }
        beside_dense_rounds.push_back(t[0]);
        dense_step_rounds.push_back(t[1]);
        even_step_rounds.push_back(t[2]);
      }
      even_rows = Mb;
      // Each GEMM's time (events between them), after the rounds as the layer's step times are
      for (int v = 0; v < 2; ++v) {
        const FfnStep& st = v == 0 ? dense : even;
        StageEvents ev(FfnStep::kGemms, o.reps);
        for (int i = 0; i < o.warmup; ++i) st.run(h, stream);
        for (int r = 0; r < o.reps; ++r) st.run(h, stream, ev.of(r));
        MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        (v == 0 ? dense_gemm_ms : even_gemm_ms) = ev.medians();
      }
      // The energy loops of the training steps, after all of their timed loops
      moe::cuda::energy_loop(clocks, j_fresh, stream, [&] {
        layer.forward(x, w, y, stream);
        layer.backward(x, w, dy, fresh, stream);
      });
      moe::cuda::energy_loop(clocks, j_bf16, stream, [&] {
        layer.forward(x, w, y, stream);
        layer.backward(x, w, dy, fresh16, stream);
      });
      moe::cuda::energy_loop(clocks, j_dense_step, stream, [&] { dense.run(h, stream); });
      moe::cuda::energy_loop(clocks, j_even_step, stream, [&] { even.run(h, stream); });
      MOE_CUBLAS_CHECK(cublasDestroy(h));
      for (bf16* p : {dense.x, dense.pre, dense.yp, dense.da, dense.dxp, dense.dw_up,
                      dense.dw_down})
        MOE_CUDA_CHECK(cudaFree(p));
    }
    // Diagnostics: per-stage forward times, per-stage backward times (fresh fp32 weight
    // gradients) and the experts stage's steps, the steps again with bf16 weight gradients (what
    // the cuBLAS steps' GEMMs write).
    stage_ms = forward_stage_times(layer, x, w, y, o, stream, &experts_fwd_step_ms);
    backward_stage_ms = backward_stage_times(layer, x, w, y, dy, fresh, o, stream,
                                             &experts_step_ms);
    backward_stage_times(layer, x, w, y, dy, fresh16, o, stream, &experts_step_bf16_ms);
  }


  // The inference layers' stages.
  time_inference(kInference, /*total=*/false, /*stages=*/true);
  time_inference(kOther, /*total=*/false, /*stages=*/true);
  time_inference(kUnfused, /*total=*/false, /*stages=*/true);
  const Inference& inf = variants[kInference];
  const double infer_ms = inf.ms;
  const size_t infer_bytes = inf.bytes;
  const std::vector<double>& infer_stage_ms = inf.stage_ms;

  // dense equivalent: (T*K, H) x (H, 2I), then (T*K, I) x (I, H)
  double dense_ms = 0;
  std::vector<double> round_fwd, round_other, round_dense;
  {
    const int64_t M = T * K;
    bf16* a = dev_alloc<bf16>(M * std::max(H, I));
    bf16* pre = dev_alloc<bf16>(M * A);
    bf16* out = dev_alloc<bf16>(M * H);
    moe::cuda::fill_normal(a, M * std::max(H, I), 6, 1.f, stream);
    cublasHandle_t h = nullptr;
    MOE_CUBLAS_CHECK(cublasCreate(&h));
    MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
    auto dense_pair = [&] {
      gemm_rm(h, M, A, H, a, wu, pre);   // expert 0's weights as the dense B
      gemm_rm(h, M, H, I, a, wd, out);
    };
    dense_ms = time_median(o.warmup, o.reps, stream, dense_pair);
    // The share of dense, robust to clock changes between the measurements: the inference
    // forward (the headline variant), the same gathering x's rows, and the dense pair run in
    // kRounds rounds, each round in the next rotation of that order (a loop's position moves
    // its time: see the header), and each round gives its own ratios.
    constexpr int kRounds = 6;
    const Inference& oth = variants[kOther];
    moe::cuda::Layer infer(cfg, inf.backend, inf.gate_up, /*backward=*/false, /*groups=*/1, cublas,
                           inf.rows);
    moe::cuda::Layer infer_other(cfg, oth.backend, oth.gate_up, /*backward=*/false,
                                 /*groups=*/1, cublas, oth.rows);
    const moe::cuda::LayerWeights w{
        wg, inf.gate_up == moe::cuda::GateUpLayout::blocked ? wu_blocked : wu, wd, nullptr, wn};
    const moe::cuda::LayerWeights woth{
        wg, oth.gate_up == moe::cuda::GateUpLayout::blocked ? wu_blocked : wu, wd, nullptr, wn};
    for (int r = 0; r < kRounds; ++r) {
      double t[3] = {0, 0, 0};
      for (int i = 0; i < 3; ++i) {
        const int which = (r + i) % 3;
        if (which == 0)
          t[0] = time_median(o.warmup, o.reps, stream, [&] { infer.forward(x, w, y, stream); });
        else if (which == 1)
          t[1] = time_median(o.warmup, o.reps, stream,
                             [&] { infer_other.forward(x, woth, y, stream); });
        else
          t[2] = time_median(o.warmup, o.reps, stream, dense_pair);
      }
      round_fwd.push_back(t[0]);
      round_other.push_back(t[1]);
      round_dense.push_back(t[2]);
    }
    moe::cuda::energy_loop(clocks, j_inference, stream, [&] { infer.forward(x, w, y, stream); });
    MOE_CUBLAS_CHECK(cublasDestroy(h));
    MOE_CUDA_CHECK(cudaFree(a));
    MOE_CUDA_CHECK(cudaFree(pre));
    MOE_CUDA_CHECK(cudaFree(out));
  }
  for (void* p : {(void*)x, (void*)dy, (void*)y, (void*)dx, (void*)wg, (void*)wu, (void*)wu_blocked,
                  (void*)wd, (void*)gwg, (void*)gwu, (void*)gwd, (void*)gwu16, (void*)gwd16,
                  (void*)wn, (void*)gwn})
    MOE_CUDA_CHECK(cudaFree(p));
  MOE_CUBLAS_CHECK(cublasDestroy(cublas));

  const double flops_fwd = 6.0 * T * K * H * I;
  const double fwd_tf = flops_fwd / (fwd_ms * 1e9);
  const double step_tf = 3 * flops_fwd / (step_ms * 1e9);
  const double dense_tf = flops_fwd / (dense_ms * 1e9);
  const double mem_delta = double(free0) - double(free1);
  // weight-read floor of the forward (see the file header)
  const double floor_bytes = double(touched) * double(H * A + I * H) * sizeof(bf16) +
                             double(2 * T * H + H * E) * sizeof(bf16);
  const double floor_ms = floor_bytes / (copy_gbs * 1e6);

  json j = moe::io::result_record(o.command);
  j["stage"] = "layer";
  j["config"] = s.name;
  j["device"] = device;
  j["T"] = T;
  j["H"] = H;
  j["I"] = I;
  j["E"] = E;
  j["K"] = K;
  j["router"] = std::string(moe::name(o.router));
  j["layout"] = "dropless";
  j["dtype"] = "bf16";
  j["experts_backend"] = std::string(moe::cuda::name(kLayerBackend)) + ", gate_up " +
                        std::string(moe::cuda::name(kLayerGateUp));
  j["activation_arena_bytes"] = moe::cuda::Layer::arena_bytes(cfg, kLayerBackend);
  j["reps"] = o.reps;
  j["warmup"] = o.warmup;
  json st = json::object();
  for (int i = 0; i < int(stage_ms.size()); ++i)
    st[moe::cuda::name(moe::cuda::LayerStage(i))] = stage_ms[i];
  j["forward_stage_ms"] = st;
  json ist = json::object();
  for (int i = 0; i < int(infer_stage_ms.size()); ++i)
    ist[moe::cuda::name(moe::cuda::LayerStage(i))] = infer_stage_ms[i];
  j["forward_ms"] = fwd_ms;
  j["forward_tflops"] = fwd_tf;
  j["inference_stage_ms"] = ist;
  auto steps_json = [](const std::vector<double>& v) {
    json t = json::object();
    for (int i = 0; i < int(v.size()); ++i)
      t[moe::cuda::name(moe::cuda::ExpertsForwardStep(i))] = v[i];
    return t;
  };
  j["experts_forward_step_ms"] = steps_json(experts_fwd_step_ms);
  j["inference_experts_step_ms"] = steps_json(inf.step_ms);
  j["inference_ms"] = infer_ms;
  if (clocks.available()) {
    json mhz = json::object(), capped = json::object(), n = json::object();
    json joules = json::object(), watts = json::object();
    using Loop = std::tuple<const char*, const moe::cuda::ClockSamples*,
                            const moe::cuda::ClockSamples*>;
    for (const auto& [key, c, e] : {Loop{"inference", &clk_inference, &j_inference},
                                    Loop{"fwd_bwd_fresh", &clk_fresh, &j_fresh},
                                    Loop{"fwd_bwd_bf16", &clk_bf16, &j_bf16},
                                    Loop{"dense_step", &clk_dense_step, &j_dense_step},
                                    Loop{"even_step", &clk_even_step, &j_even_step}}) {
      mhz[key] = c->median_mhz();
      capped[key] = c->power_capped_share();
      n[key] = c->size();
      joules[key] = e->energy_per_run_j();
      watts[key] = e->mean_power_w();
    }
    j["sm_clock_mhz"] = mhz;
    j["power_capped_share"] = capped;
    j["clock_samples"] = n;
    j["energy_per_run_j"] = joules;
    j["mean_power_w"] = watts;
  }
  j["inference_tflops"] = flops_fwd / (infer_ms * 1e9);
  j["inference_fraction_of_dense"] = dense_ms / infer_ms;
  j["inference_over_weight_floor"] = infer_ms / floor_ms;
  // The graph's time as the headline's clock would give it: the eager headline times the ratio
  // of the alternating rounds (their own medians run later, warmer, slower).
  const double graph_ms = infer_ms * variants[kInference].graph_over_eager;
  j["inference_graph_ms"] = graph_ms;
  j["inference_graph_rounds_ms"] = variants[kInference].graph_ms;
  j["inference_graph_over_weight_floor"] = graph_ms / floor_ms;
  j["inference_graph_over_eager_rounds_median"] = variants[kInference].graph_over_eager;
  j["inference_layer_bytes"] = infer_bytes;
  j["inference_rows"] = moe::cuda::name(rows);
  j["inference_other_rows"] = moe::cuda::name(other_rows);
  j["inference_experts"] = "grouped_fused, gate_up blocked, no pre";
  j["inference_permuted_ms"] = variants[kUnfused].ms;  // the unfused grouped path, split w_up
  j["inference_other_rows_ms"] = variants[kOther].ms;
  j["inference_permuted_layer_bytes"] = variants[kUnfused].bytes;
  j["inference_other_rows_layer_bytes"] = variants[kOther].bytes;
  for (int v : {kOther, kUnfused}) {
    json vst = json::object();
    for (int i = 0; i < int(variants[v].stage_ms.size()); ++i)
      vst[moe::cuda::name(moe::cuda::LayerStage(i))] = variants[v].stage_ms[i];
    j[v == kOther ? "inference_other_rows_stage_ms" : "inference_permuted_stage_ms"] = vst;
  }
  json bst = json::object();
  for (int i = 0; i < int(backward_stage_ms.size()); ++i)
    bst[moe::cuda::name(moe::cuda::LayerBackwardStage(i))] = backward_stage_ms[i];
  j["backward_stage_ms"] = bst;
  json xst = json::object();
  for (int i = 0; i < int(experts_step_ms.size()); ++i)
    xst[moe::cuda::name(moe::cuda::ExpertsBackwardStep(i))] = experts_step_ms[i];
  j["experts_backward_step_ms"] = xst;
  json xst16 = json::object();
  for (int i = 0; i < int(experts_step_bf16_ms.size()); ++i)
    xst16[moe::cuda::name(moe::cuda::ExpertsBackwardStep(i))] = experts_step_bf16_ms[i];
  j["experts_backward_step_bf16_grads_ms"] = xst16;
  j["fwd_bwd_ms"] = step_ms;
  j["fwd_bwd_tflops"] = step_tf;
  j["fwd_bwd_fresh_ms"] = fresh_ms;
  j["fwd_bwd_fresh_tflops"] = 3 * flops_fwd / (fresh_ms * 1e9);
  j["fwd_bwd_bf16_grads_ms"] = bf16_ms;
  j["fwd_bwd_bf16_grads_tflops"] = 3 * flops_fwd / (bf16_ms * 1e9);
  j["rounds_fwd_bwd_fresh_ms"] = fresh_rounds;
  j["rounds_fwd_bwd_bf16_grads_ms"] = bf16_rounds;
  std::vector<double> gathered_ratio;
  for (size_t r = 0; r < gathered_rounds.size(); ++r)
    gathered_ratio.push_back(gathered_rounds[r] / fresh_rounds[r]);
  j["fwd_bwd_fresh_gathered_ms"] = median(gathered_rounds);
  j["rounds_fwd_bwd_fresh_gathered_ms"] = gathered_rounds;
  j["rounds_gathered_over_fresh"] = gathered_ratio;
  j["gathered_over_fresh_rounds_median"] = median(gathered_ratio);
  j["gathered_layer_bytes"] = gathered_bytes;
  std::vector<double> dense_step_ratio;
  for (size_t r = 0; r < dense_step_rounds.size(); ++r)
    dense_step_ratio.push_back(dense_step_rounds[r] / beside_dense_rounds[r]);
  j["dense_equiv_fwd_bwd_ms"] = median(dense_step_rounds);
  j["dense_equiv_fwd_bwd_tflops"] = 3 * flops_fwd / (median(dense_step_rounds) * 1e9);
  j["rounds_dense_equiv_fwd_bwd_ms"] = dense_step_rounds;
  j["rounds_fwd_bwd_bf16_grads_beside_dense_ms"] = beside_dense_rounds;
  j["rounds_fwd_bwd_bf16_grads_fraction_of_dense"] = dense_step_ratio;
  j["fwd_bwd_bf16_grads_fraction_of_dense_rounds_median"] = median(dense_step_ratio);
  std::vector<double> even_step_ratio;
  for (size_t r = 0; r < even_step_rounds.size(); ++r)
    even_step_ratio.push_back(even_step_rounds[r] / beside_dense_rounds[r]);
  const double even_flops = 18.0 * double(E * even_rows) * H * I;
  j["even_batched_rows_per_expert"] = even_rows;
  j["even_batched_fwd_bwd_ms"] = median(even_step_rounds);
  j["even_batched_fwd_bwd_tflops"] = even_flops / (median(even_step_rounds) * 1e9);
  j["rounds_even_batched_fwd_bwd_ms"] = even_step_rounds;
  j["rounds_fwd_bwd_bf16_grads_fraction_of_even_batched"] = even_step_ratio;
  j["fwd_bwd_bf16_grads_fraction_of_even_batched_rounds_median"] = median(even_step_ratio);
  for (int v = 0; v < 2; ++v) {
    json g = json::object();
    for (int i = 0; i < FfnStep::kGemms; ++i)
      g[FfnStep::kNames[i]] = (v == 0 ? dense_gemm_ms : even_gemm_ms)[i];
    j[v == 0 ? "dense_equiv_fwd_bwd_gemm_ms" : "even_batched_fwd_bwd_gemm_ms"] = g;
  }
  std::vector<double> round_ratio;
  for (size_t r = 0; r < round_fwd.size(); ++r) round_ratio.push_back(round_dense[r] / round_fwd[r]);
  std::vector<double> other_ratio;
  for (size_t r = 0; r < round_fwd.size(); ++r)
    other_ratio.push_back(round_other[r] / round_fwd[r]);
  j["rounds_inference_ms"] = round_fwd;
  j["rounds_inference_other_rows_ms"] = round_other;
  j["rounds_other_rows_over_inference"] = other_ratio;
  j["other_rows_over_inference_rounds_median"] = median(other_ratio);
  j["rounds_dense_equiv_ms"] = round_dense;
  j["rounds_fraction_of_dense"] = round_ratio;
  j["inference_fraction_of_dense_rounds_median"] = median(round_ratio);
  j["dense_equiv_ms"] = dense_ms;
  j["dense_equiv_tflops"] = dense_tf;
  j["forward_fraction_of_dense"] = fwd_tf / dense_tf;
  j["experts_touched"] = touched;
  j["weight_floor_bytes"] = floor_bytes;
  j["copy_gbs"] = copy_gbs;
  j["weight_floor_ms"] = floor_ms;
  j["forward_over_weight_floor"] = fwd_ms / floor_ms;
  j["layer_bytes"] = layer_bytes;
  j["mem_delta_bytes"] = mem_delta;
  j["mem_delta_first_bytes"] = first_delta;
  j["layer_buffers"] = layer_report;
  j["timing_note"] =
      "forward_* / fwd_bwd_*: the training layer (grouped_fused, w_up pairs blocked; saves xp, "
      "pre, act for the backward); inference_*: a layer built without backward (the same experts "
      "stage, no pre written, rows as inference_rows: gathered by the up-projection (no permute, "
      "no xp) or permuted), timed first; then inference_other_rows_ms (the same with the other "
      "row source) and inference_permuted_ms (the unfused grouped path on split w_up); "
      "inference_graph_*: the headline inference forward captured once in a CUDA graph and "
      "replayed (one launch; every other time launches each kernel) in 6 rounds alternating with "
      "the eager forward: inference_graph_over_eager_rounds_median, the rounds' own median "
      "(inference_graph_rounds_ms), and inference_graph_ms = inference_ms x that ratio; "
      "fwd_bwd_fresh_gathered_ms: a training layer with gathered rows (no permute, no xp; dw_up "
      "gathers too), fresh fp32 dW, rotated with fwd_bwd_fresh_ms and fwd_bwd_bf16_grads_ms; "
      "*_stage_ms / experts_forward_step_ms (the training forward's up and down), "
      "inference_experts_step_ms (the inference layer's) / experts_backward_step_ms (fresh fp32 "
      "dW; experts_backward_step_bf16_grads_ms with bf16 dW): every stage and step in order on "
      "one stream (stage "
      "events), where the totals run the router's auxiliary losses beside plan, permute and the "
      "experts, and dw_down beside the da GEMM, on second streams";
  j["flops_accounting"] =
      "forward 6*T*K*H*I (SwiGLU up 2*T*K*H*2I + down 2*T*K*I*H), fwd+bwd 3x that; gate not "
      "counted; dense_equiv = cublasGemmEx bf16 (T*K,H)x(H,2I) + (T*K,I)x(I,H); "
      "dense_equiv_fwd_bwd = that pair and the backward's four (da (T*K,H)x(H,I), dW_down "
      "(I,T*K)x(T*K,H), dxp (T*K,2I)x(2I,H), dW_up (H,T*K)x(T*K,2I)), bf16 out, in 6 rounds "
      "rotating with fwd_bwd_bf16_grads (rounds_fwd_bwd_bf16_grads_beside_dense_ms); "
      "even_batched_fwd_bwd = the same six per expert as cublasGemmStridedBatchedEx over E "
      "experts of even_batched_rows_per_expert = ceil(T*K/E) rows, in the same rotation; "
      "*_fwd_bwd_gemm_ms: each of their GEMMs (events between them) in a loop after the "
      "rotation, before the layer's stage and step events";
  if (o.out.empty()) fmt::print("{}\n", j.dump());
  else moe::io::append_jsonl(o.out, j);

  fmt::print(stderr,
             "layer {:<12} T={} H={} I={} E={} K={}{}: fwd {:.3f} ms ({:.0f} TF/s, {:.0f}% of "
             "dense {:.0f}) | fwd+bwd {:.3f} ms ({:.0f} TF/s), fresh dW {:.3f} ms, bf16 dW {:.3f} ms "
             "| layer {:.2f} GiB, memGetInfo delta "
             "{:.2f} GiB\n  weight floor {:.3f} ms ({} experts touched, {:.0f} GB/s copy): fwd "
             "{:.2f}x the floor\n  stages:",
             s.name, T, H, I, E, K,
             o.router == moe::Router::softmax_topk ? "" : fmt::format(" {}", moe::name(o.router)), fwd_ms, fwd_tf, 100 * fwd_tf / dense_tf, dense_tf, step_ms,
             step_tf, fresh_ms, bf16_ms, layer_bytes / double(1 << 30), mem_delta / double(1 << 30),
             floor_ms,
             touched, copy_gbs, fwd_ms / floor_ms);
  for (int i = 0; i < int(stage_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::LayerStage(i)), stage_ms[i]);
  fmt::print(stderr, "\n  inference (fused, blocked w_up, rows {}): {:.3f} ms ({:.0f}% of dense, "
             "{:.2f}x the floor), layer {:.2f} GiB; rows {} {:.3f} ms ({:.2f} GiB), unfused {:.3f} "
             "ms\n  inference from a CUDA graph: {:.3f} ms ({:.2f}x the floor, {:.3f}x eager in "
             "alternating rounds)\n  stages:",
             moe::cuda::name(rows), infer_ms, 100 * dense_ms / infer_ms, infer_ms / floor_ms,
             infer_bytes / double(1 << 30), moe::cuda::name(other_rows), variants[kOther].ms,
             variants[kOther].bytes / double(1 << 30), variants[kUnfused].ms,
             infer_ms * variants[kInference].graph_over_eager,
             infer_ms * variants[kInference].graph_over_eager / floor_ms,
             variants[kInference].graph_over_eager);
  for (int i = 0; i < int(infer_stage_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::LayerStage(i)), infer_stage_ms[i]);
  for (int v : {kOther, kUnfused}) {
    fmt::print(stderr, "\n  {} inference stages:", variants[v].name);
    for (int i = 0; i < int(variants[v].stage_ms.size()); ++i)
      fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::LayerStage(i)),
                 variants[v].stage_ms[i]);
  }
  fmt::print(stderr, "\n  experts forward steps, training / inference:");
  for (int i = 0; i < int(experts_fwd_step_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f} / {:.3f}", moe::cuda::name(moe::cuda::ExpertsForwardStep(i)),
               experts_fwd_step_ms[i], i < int(inf.step_ms.size()) ? inf.step_ms[i] : 0.0);
  fmt::print(stderr, "\n  backward stages (fresh dW):");
  for (int i = 0; i < int(backward_stage_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::LayerBackwardStage(i)),
               backward_stage_ms[i]);
  fmt::print(stderr, "\n  experts backward steps:");
  for (int i = 0; i < int(experts_step_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::ExpertsBackwardStep(i)),
               experts_step_ms[i]);
  fmt::print(stderr, "\n  the same with bf16 weight gradients:");
  for (int i = 0; i < int(experts_step_bf16_ms.size()); ++i)
    fmt::print(stderr, " {} {:.3f}", moe::cuda::name(moe::cuda::ExpertsBackwardStep(i)),
               experts_step_bf16_ms[i]);
  fmt::print(stderr, "\n  rounds (inference fwd / other rows / dense pair, ms):");
  for (size_t r = 0; r < round_fwd.size(); ++r)
    fmt::print(stderr, " {:.3f}/{:.3f}/{:.3f}", round_fwd[r], round_other[r], round_dense[r]);
  fmt::print(stderr, " -> median share of dense {:.1f}%, other rows / inference {:.3f}\n",
             100 * median(round_ratio), median(other_ratio));
  fmt::print(stderr, "  training with rows gathered: fresh dW {:.3f} ms, {:.3f}x the permuted "
             "layer's (rounds median), layer {:.2f} GiB\n", median(gathered_rounds),
             median(gathered_ratio), gathered_bytes / double(1 << 30));
  fmt::print(stderr, "  rounds (fwd+bwd bf16 dW / the dense FFN's step / evenly batched, ms):");
  for (size_t r = 0; r < dense_step_rounds.size(); ++r)
    fmt::print(stderr, " {:.3f}/{:.3f}/{:.3f}", beside_dense_rounds[r], dense_step_rounds[r],
               even_step_rounds[r]);
  fmt::print(stderr, " -> median share of dense {:.1f}% (dense step {:.0f} TF/s), of evenly "
             "batched {:.1f}% ({:.0f} TF/s)\n", 100 * median(dense_step_ratio),
             3 * flops_fwd / (median(dense_step_rounds) * 1e9), 100 * median(even_step_ratio),
             even_flops / (median(even_step_rounds) * 1e9));
  for (int v = 0; v < 2; ++v) {
    fmt::print(stderr, "  {} step's GEMMs:", v == 0 ? "dense" : "evenly batched");
    for (int i = 0; i < FfnStep::kGemms; ++i)
      fmt::print(stderr, " {} {:.3f}", FfnStep::kNames[i],
                 (v == 0 ? dense_gemm_ms : even_gemm_ms)[i]);
    fmt::print(stderr, "\n");
  }
}

}  // namespace

std::vector<std::string> layer_router_names() {
  std::vector<std::string> names;
  for (moe::Router r : {moe::Router::softmax_topk, moe::Router::noisy_topk,
                        moe::Router::switch_top1, moe::Router::sigmoid_bias})
    names.emplace_back(moe::name(r));
  return names;
}

std::vector<std::string> layer_config_names() {
  std::vector<std::string> names;
  for (const LayerShape& s : layer_shapes()) names.push_back(s.name);
  return names;
}

LayerShape parse_layer_shape(const std::string& text) {
  std::vector<int64_t> v;
  size_t at = 0;
  while (true) {
    const size_t comma = text.find(',', at);
    const std::string field = text.substr(at, comma == std::string::npos ? comma : comma - at);
    int64_t n = 0;
    const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), n);
    MOE_CHECK(!field.empty() && ec == std::errc() && end == field.data() + field.size() && n >= 1,
              "--shape ", text, ": '", field, "' is not a positive integer (T,H,I,E,K)");
    v.push_back(n);
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  MOE_CHECK(v.size() == 5, "--shape ", text, ": expected 5 numbers T,H,I,E,K, got ", v.size());
  const LayerShape s{fmt::format("T{}_H{}_I{}_E{}_K{}", v[0], v[1], v[2], v[3], v[4]), v[0], v[1],
                     v[2], v[3], v[4]};
  MOE_CHECK(s.T < (int64_t{1} << 30), "--shape ", text, ": T must be below 2^30");
  MOE_CHECK(s.H % 8 == 0 && s.H <= 65536, "--shape ", text,
            ": H must be a multiple of 8 (16-byte rows for TMA) up to 65536, got ", s.H);
  MOE_CHECK(s.I % 32 == 0 && s.I <= 65536, "--shape ", text,
            ": I must be a multiple of 32 (the fused experts' blocked gate/up order) up to 65536, "
            "got ", s.I);
  MOE_CHECK(s.E <= 4096, "--shape ", text, ": E must be at most 4096, got ", s.E);
  MOE_CHECK(s.K <= s.E, "--shape ", text, ": K must be at most E, got ", s.K);
  return s;
}

void run_layer_bench(const LayerBenchOptions& o) {
  MOE_CHECK(moe::cuda::has_device(), "bench --layer: no CUDA device");
  MOE_CHECK(o.reps >= 20, "reps must be >= 20 for --layer, got ", o.reps);
  MOE_CHECK(o.warmup >= 1, "warmup must be >= 1, got ", o.warmup);
  int dev = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  cudaStream_t stream = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<LayerShape> run;
  for (const LayerShape& s : layer_shapes())
    if ((o.configs.empty() && o.shapes.empty()) ||
        std::find(o.configs.begin(), o.configs.end(), s.name) != o.configs.end())
      run.push_back(s);
  run.insert(run.end(), o.shapes.begin(), o.shapes.end());
  for (const LayerShape& s : run) check_fits(s, o.router);  // before anything is measured
  if (o.router != moe::Router::softmax_topk)
    fmt::print(stderr, "bench --layer: router {} (the PyTorch peer and the headline tables are "
               "softmax_topk's)\n", moe::name(o.router));
  const double copy_gbs = copy_bandwidth(o, stream);
  for (const LayerShape& s : run) bench_one(o, p.name, s, copy_gbs, stream);
  MOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace moe_bench
