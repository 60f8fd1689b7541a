// defines: moe::cuda::LayerWeights, LayerGrads, LayerStage, Layer
// The whole MoE layer on the GPU in bf16, from the stages:
//   forward   gate -> route -> plan -> permute -> experts -> combine
//   backward  combine backward -> experts backward -> permute backward -> route backward -> gate
//             backward
// all on one stream, with no host synchronisation (every size the plan decides stays on the
// device; buffers are sized by PlanShape::max_rows()). What backward needs from forward lives in
// one activation arena allocated once by the constructor (logits, xp, pre, act, yp, and the
// backward's dyp, dweight, dz), next to the route, plan and experts stages' own buffers. No
// allocation happens in forward or backward, so a CUDA graph of either replays.
//
// Storage: x, y, dx, the weights and every activation are bf16; router math, routing weights and
// the parameter gradients are fp32 (accumulated, like the CPU reference's: zero them first).
// Routers: token choice without per-step randomness in the router input: softmax_topk (every
// second-choice policy), switch_top1 (jitter only when !training or jitter == 0), sigmoid_bias
// (expert_bias optional, zeros when null). Layouts: dropless, block, padded.
// The gradient is that of <dy, y> + aux_loss, as moe::layer_backward.
// Memory (grouped backends): the backward adds no (max_rows, *) buffer to the forward's xp, pre,
// act and yp. Each backward intermediate goes into storage whose last reader has run:
//   dyp  into yp   (combine backward, in place: yp's element is read before dyp's is written)
//   da   into act  (the experts backward computes dw_down = act^T dyp first)
//   dpre into pre  (activation backward, in place)
//   dxp  into yp   (dyp's last reader, da = dyp w_down^T, has run)
// so the experts stage is made without its own da / dpre. The host-offset and strided baselines
// keep a separate dyp and the experts stage's own da and dpre (dxp still reuses yp).
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

namespace moe::cuda {

struct LayerWeights {
  const bf16* w_gate = nullptr;       // (H, E)
  const bf16* w_up = nullptr;         // (E, H, A) in the Layer's GateUpLayout
  const bf16* w_down = nullptr;       // (E, I, H)
  const float* expert_bias = nullptr; // (E) sigmoid_bias selection bias, may be null
};

struct LayerGrads {
  bf16* dx = nullptr;        // (T, H) overwritten
  float* dw_gate = nullptr;  // (H, E) accumulated
  float* dw_up = nullptr;    // (E, H, A) accumulated
  float* dw_down = nullptr;  // (E, I, H) accumulated
};

// Forward stages, in order; forward() can record an event before each and after the last.
enum class LayerStage { gate, route, plan, permute, experts, combine, count };
const char* name(LayerStage s);

class Layer {
 public:
  // cfg validated here (throws ConfigError naming what is not supported).
  explicit Layer(const LayerConfig& cfg, ExpertsBackend backend = ExpertsBackend::grouped,
                 GateUpLayout gate_up = GateUpLayout::split, bool backward = true);
  ~Layer();
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // y (T, H) overwritten. events: null, or int(LayerStage::count) + 1 events recorded on `stream`
  // at the stage boundaries (benchmarks).
  void forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream,
               cudaEvent_t* events = nullptr);
  // After forward() with the same x and w; dy (T, H). Once per forward: with the grouped backends
  // the backward overwrites the forward's pre, act and yp (see Memory above).
  void backward(const bf16* x, const LayerWeights& w, const bf16* dy, const LayerGrads& g,
                cudaStream_t stream);

  const LayerConfig& config() const { return cfg_; }
  const PlanShape& plan_shape() const { return plan_.shape(); }
  const PlanView& plan() const { return plan_.view(); }
  RoutingView routing() const { return route_.routing.view(); }
  const double* aux_loss() const { return route_.aux_loss; }  // device, after forward
  // Device bytes this layer holds: activation arena + route + plan + experts workspace.
  size_t bytes() const;
  // The activation arena plus the experts stage's da / dpre scratch, computed from the shapes
  // alone (no device needed): what the layer's (max_rows, *) activations cost.
  static size_t arena_bytes(const LayerConfig& cfg, ExpertsBackend backend = ExpertsBackend::grouped,
                            bool backward = true);
  std::string report() const;

 private:
  LayerConfig cfg_;
  bool backward_;
  cublasHandle_t cublas_ = nullptr;
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
  float* dz_ = nullptr;        // (T, E)
  bf16* dz_bf16_ = nullptr;    // (T, E)
  bool alias_ = false;         // grouped backend with backward: the aliasing above
  DeviceArena arena_;
};

}  // namespace moe::cuda
