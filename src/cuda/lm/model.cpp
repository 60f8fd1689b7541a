// defines: moe::cuda::lm::check_gpu_model, make_gpu_model (see include/moe/cuda/lm/model.hpp)
// The CPU Transformer's forward and backward (src/model/transformer.cpp) step for step, with the
// GPU layer kinds of layers.hpp and one MoE layer per block (moe::cuda::Layer, ChainLayer or
// SoftMoeLayer).
#include "moe/cuda/lm/model.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moe/check.hpp"
#include "moe/cuda/arena.hpp"
#include "moe/cuda/chain.hpp"
#include "moe/cuda/check.cuh"
#include "moe/cuda/layer.hpp"
#include "moe/cuda/lm/layers.hpp"
#include "moe/cuda/soft_moe_layer.hpp"
#include "moe/rng.hpp"

namespace moe::cuda::lm {

namespace {

using model::ModelConfig;
using model::TensorRef;

// The CPU model's seed of one FFN call (src/model/transformer.cpp): token-choice routers make one
// call per layer, group 0. Expert choice's per-position calls draw nothing random, so its one
// grouped call needs no seed per group.
uint64_t call_seed(uint64_t noise_seed, int64_t layer) {
  return splitmix64(noise_seed ^ splitmix64(uint64_t(layer) << 32 ^ uint64_t(0)));
}

// Every tensor starts on a 64-element boundary of the flat buffers, so bf16 views stay 128-byte
// aligned for vector loads and TMA.
constexpr int64_t kTensorAlign = 64;

struct TensorSlot {
  std::string name;
  int64_t offset = 0, size = 0;
  bool decay = false, trainable = false;
};

// The MoE FFN of one block: a Layer (token choice, expert choice), a ChainLayer
// (chain_of_experts: one token-choice Layer per iteration), or a SoftMoeLayer (soft_moe: its own
// weights and gradients and the rows regrouped by position, so GpuModel drives it directly; the
// forward/backward/routed helpers below serve the other two).
struct BlockFfn {
  std::unique_ptr<Layer> layer;
  std::unique_ptr<ChainLayer> chain;
  std::unique_ptr<SoftMoeLayer> soft;

  int64_t tokens() const {
    if (soft) return soft->config().tokens * soft->groups();
    return chain ? chain->config().tokens : layer->config().tokens;
  }
  // Soft MoE draws nothing random.
  void set_seed(uint64_t seed) {
    if (chain) chain->set_seed(seed);
    else if (layer) layer->set_seed(seed);
  }
  void forward(const bf16* x, const LayerWeights& w, bf16* y, cudaStream_t stream) {
    if (chain) chain->forward(x, w, y, stream);
    else layer->forward(x, w, y, stream);
  }
  void backward(const bf16* x, const LayerWeights& w, const bf16* dy, const LayerGrads& g,
                cudaStream_t stream) {
    if (chain) chain->backward(x, w, dy, g, stream);
    else layer->backward(x, w, dy, g, stream);
  }
  // Device double, or null for soft MoE (no auxiliary loss).
  const double* aux_loss() const {
    if (soft) return nullptr;
    return chain ? chain->aux_loss() : layer->aux_loss();
  }
  LoadStats stats() const {
    if (soft) return soft->stats();
    return chain ? chain->stats() : layer->stats();
  }
  // The Layers whose routings the CPU counts (every chain iteration's; none for soft MoE, whose
  // counts are combine masses).
  std::vector<const Layer*> routed() const {
    std::vector<const Layer*> out;
    if (soft) return out;
    if (!chain) return {layer.get()};
    for (int64_t c = 0; c < chain->iterations(); ++c) out.push_back(&chain->step(c));
    return out;
  }
};

// Device events around the parts of a step that StepTimes reports.
struct PartEvents {
  cudaEvent_t begin = nullptr, end = nullptr;
};

class GpuModel final : public model::LanguageModel {
 public:
  GpuModel(const ModelConfig& cfg, uint64_t seed, int64_t max_batch);
  ~GpuModel() override;

  const ModelConfig& config() const override { return cfg_; }
  std::string device() const override { return device_name_; }
  std::string dtype() const override {
    return "bfloat16 (fp32 master weights, residual stream and optimiser)";
  }
  double forward(const data::Batch& batch, bool training, uint64_t noise_seed) override;
  void backward() override;
  double optimizer_step(double lr, const model::TrainConfig& cfg) override;
  double aux_loss() override;
  const std::vector<float>& token_losses() override { return losses_host_; }
  std::vector<LoadStats> layer_stats() override;
  void add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                          std::vector<std::vector<double>>& counts) override;
  model::StepTimes times() override;
  int64_t parameter_count() override;
  model::Weights& weights() override;
  model::AdamW& optimizer() override;
  void state_written() override;

 private:
  ModelConfig cfg_;
  int64_t max_batch_;
  std::string device_name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;

  // parameters: flat fp32 weights, gradients, AdamW moments, and the bf16 copy, tensor_list order
  model::Weights host_;  // host mirror (checkpoints); also fixes the tensor order and sizes
  model::AdamW host_opt_;
  std::vector<TensorSlot> slots_;
  std::map<std::string, int64_t> slot_of_;
  int64_t total_ = 0;
  int64_t adam_t_ = 0;
  // The gradient ranges (offset, count) zeroed before each backward: everything but the expert
  // weight gradients, which the FFN backward writes instead of adding to (Layer and ChainLayer:
  // LayerGrads::accumulate_experts = false; SoftMoeLayer: SoftMoeGrads::accumulate_experts =
  // false; the dense GEMMs: accumulate_dweight = false).
  std::vector<std::pair<int64_t, int64_t>> zeroed_;
  float *params_ = nullptr, *grads_ = nullptr, *m_ = nullptr, *v_ = nullptr;
  bf16* params_bf16_ = nullptr;
  // AdamW in one launch: the trainable tensors as chunks with their weight decay, uploaded when
  // the decay first differs from what the device holds.
  std::vector<AdamWChunk> adam_chunks_;
  AdamWChunk* adam_chunks_dev_ = nullptr;
  float adam_chunks_decay_ = -1.0f;
  DeviceArena param_arena_;

  // activations of the last forward, sized for max_batch rows
  int64_t B_ = 0;
  bool training_ = false, have_backward_ = false;
  int32_t *tokens_ = nullptr, *targets_ = nullptr;
  float* residual_ = nullptr;      // (L+1, N, D)
  float* residual_mid_ = nullptr;  // (L, N, D)
  bf16 *ln1_ = nullptr, *ln2_ = nullptr;           // (L, N, D)
  float *ln1_stats_ = nullptr, *ln2_stats_ = nullptr;  // (L, 2, N) mean, rstd
  bf16* qkv_ = nullptr;            // (L, N, 3D)
  bf16* atty_ = nullptr;           // (L, N, D)
  bool flash_ = false;             // fused attention (flash_attention_*) for this head size
  float* lse_ = nullptr;           // (L, B, NH, S) flash: log-sum-exp of each query row
  char* attention_ = nullptr;      // (L, AttentionState::bytes) the cuBLAS path's saved state
  size_t attention_bytes_ = 0;
  bf16* ffn_out_ = nullptr;        // (L, N, D)
  // dense baselines: the FFN as two cuBLAS GEMMs around the activation (no routing)
  bool dense_ = false;
  int64_t inter_ = 0, up_width_ = 0;  // I, and A = 2I (SwiGLU) or I
  bool swiglu_ = true;
  bf16* dense_pre_ = nullptr;      // (L, N, A)
  bf16* dense_act_ = nullptr;      // (L, N, I)
  bf16* dense_dact_ = nullptr;     // (N, I) backward
  bf16* dense_dpre_ = nullptr;     // (N, A) backward
  // soft_moe: the SoftMoeLayer mixes the B tokens at each position, so its rows are the LM's
  // regrouped by position (row s*B + b). x is regrouped again from ln2 in the backward (the
  // same bits) rather than kept per block.
  bool soft_ = false;
  bf16* soft_x_ = nullptr;         // (N, D) ln2 by position
  bf16* soft_y_ = nullptr;         // (N, D) y by position; dy by position in the backward
  bf16* lnf_ = nullptr;            // (N, D)
  float* lnf_stats_ = nullptr;     // (2, N)
  float* logits_ = nullptr;        // (N, V)
  float* losses_ = nullptr;        // (N)
  bf16* dlogits_ = nullptr;        // (N, V)
  // backward scratch
  float *dlnf_ = nullptr, *dres_ = nullptr, *dmid_ = nullptr, *dln1_ = nullptr;  // (N, D)
  bf16 *dy_ = nullptr, *dln2_ = nullptr, *datty_ = nullptr;                     // (N, D)
  bf16* dqkv_ = nullptr;                                                        // (N, 3D)
  void* scratch_ = nullptr;
  double* sumsq_ = nullptr;
  float* clip_scale_ = nullptr;
  DeviceArena act_arena_;
  std::vector<float> losses_host_;

  // the FFN: one Layer per block for training (with backward) and per evaluation batch size
  std::vector<BlockFfn> train_ffn_;
  std::map<int64_t, std::vector<BlockFfn>> eval_ffn_;
  std::vector<BlockFfn>* last_ffn_ = nullptr;

  // timing: attention and FFN of every block, forward and backward, and the whole step
  std::vector<PartEvents> attention_events_, ffn_events_;  // (2L) forward then backward
  PartEvents step_events_;
  bool timed_backward_ = false;

  int64_t N() const { return B_ * cfg_.seq; }
  const TensorSlot& slot(const std::string& name) const;
  float* param(const std::string& name) { return params_ + slot(name).offset; }
  bf16* param_bf16(const std::string& name) { return params_bf16_ + slot(name).offset; }
  float* grad(const std::string& name) { return grads_ + slot(name).offset; }
  bool has(const std::string& name) const { return slot_of_.count(name) != 0; }
  std::vector<BlockFfn>& ffn_layers(int64_t tokens, bool training);
  LayerWeights ffn_weights(int64_t l);
  SoftMoeWeights soft_weights(int64_t l);
  void upload_state();
  void record(cudaEvent_t e) { MOE_CUDA_CHECK(cudaEventRecord(e, stream_)); }
};

std::string block(int64_t l) { return "block" + std::to_string(l) + "."; }

GpuModel::GpuModel(const ModelConfig& cfg, uint64_t seed, int64_t max_batch)
    : cfg_(cfg), max_batch_(max_batch) {
  check_gpu_model(cfg_);
  MOE_CHECK(max_batch >= 1, "batch must be >= 1, got ", max_batch);
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  device_name_ = prop.name;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MOE_CUBLAS_CHECK(cublasCreate(&cublas_));
  MOE_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));

  // The CPU model draws the initial weights: both backends start from the same bits.
  {
    model::Transformer init(cfg_, seed);
    host_ = init.weights();
  }
  std::vector<TensorRef> list = model::tensor_list(host_);
  for (const TensorRef& t : list) {
    TensorSlot s{t.name, total_, int64_t(t.value->size()), t.decay, t.trainable};
    slot_of_[t.name] = int64_t(slots_.size());
    slots_.push_back(s);
    total_ += (s.size + kTensorAlign - 1) / kTensorAlign * kTensorAlign;
  }
  host_opt_.init(list);
  {
    auto fresh = [&](const std::string& name) {
      auto ends = [&](const std::string& tail) {
        return name.size() >= tail.size() &&
               name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
      };
      return ends(".ffn.experts.w_up") || ends(".ffn.experts.w_down");
    };
    int64_t begin = 0;  // start of the range being gathered
    for (const TensorSlot& s : slots_) {
      if (!fresh(s.name)) continue;
      if (s.offset > begin) zeroed_.emplace_back(begin, s.offset - begin);
      // The alignment gap after a fresh tensor is never written: it stays at its zero.
      begin = s.offset + s.size;
    }
    if (total_ > begin) zeroed_.emplace_back(begin, total_ - begin);
  }
  for (const TensorSlot& s : slots_)
    if (s.trainable) add_adamw_chunks(adam_chunks_, s.offset, s.size, 0.0f);
  const size_t f = sizeof(float), b = sizeof(bf16), P = size_t(total_);
  param_arena_ = DeviceArena({
      {"params", P * f, reinterpret_cast<void**>(&params_)},
      {"grads", P * f, reinterpret_cast<void**>(&grads_)},
      {"adam_m", P * f, reinterpret_cast<void**>(&m_)},
      {"adam_v", P * f, reinterpret_cast<void**>(&v_)},
      {"params_bf16", P * b, reinterpret_cast<void**>(&params_bf16_)},
      {"adam_chunks", adam_chunks_.size() * sizeof(AdamWChunk),
       reinterpret_cast<void**>(&adam_chunks_dev_)},
  });
  MOE_CUDA_CHECK(cudaMemsetAsync(params_, 0, P * f, stream_));  // alignment gaps stay 0
  MOE_CUDA_CHECK(cudaMemsetAsync(grads_, 0, P * f, stream_));
  MOE_CUDA_CHECK(cudaMemsetAsync(m_, 0, P * f, stream_));
  MOE_CUDA_CHECK(cudaMemsetAsync(v_, 0, P * f, stream_));
  upload_state();

  const int64_t L = cfg_.layers, D = cfg_.d_model, V = cfg_.vocab, S = cfg_.seq;
  const int64_t NH = cfg_.heads, Nm = max_batch_ * S;
  // A dense FFN is one expert that every token takes with weight 1 (softmax of a single logit):
  // run it as plain GEMMs. Its router weights exist (the CPU model's E = 1 layer) but get no
  // gradient, as on the CPU.
  dense_ = cfg_.ffn_kind != model::FfnKind::moe;
  soft_ = !dense_ && cfg_.ffn.router == Router::soft_moe;
  {
    const LayerConfig lc = cfg_.layer_config(S);
    inter_ = lc.inter;
    up_width_ = lc.up_width();
    swiglu_ = lc.activation == Activation::swiglu;
  }
  const size_t dense_rows = dense_ ? size_t(Nm) : 0;
  const size_t soft_rows = soft_ ? size_t(Nm) : 0;
  const size_t n = size_t(Nm), nd = size_t(Nm * D);
  // The fused kernels keep only the log-sum-exp per query row (the output and qkv are kept
  // anyway); the cuBLAS path keeps head-major q, k, v and the (S, S) probabilities per layer.
  flash_ = flash_attention_supported(D, NH);
  attention_bytes_ = flash_ ? 0 : AttentionState::bytes(max_batch_, S, D, NH);
  attention_bytes_ = (attention_bytes_ + DeviceArena::kAlign - 1) / DeviceArena::kAlign *
                     DeviceArena::kAlign;
  const size_t attention_scratch = flash_
                                       ? flash_attention_scratch_bytes(max_batch_, S, D, NH)
                                       : attention_scratch_bytes(max_batch_, S, D, NH);
  const size_t scratch = std::max({layernorm_scratch_bytes(Nm, D),
                                   matmul_scratch_bytes(Nm, 3 * D), attention_scratch,
                                   sumsq_scratch_bytes(total_)});
  act_arena_ = DeviceArena({
      {"tokens", n * 4, reinterpret_cast<void**>(&tokens_)},
      {"targets", n * 4, reinterpret_cast<void**>(&targets_)},
      {"residual", (L + 1) * nd * f, reinterpret_cast<void**>(&residual_)},
      {"residual_mid", L * nd * f, reinterpret_cast<void**>(&residual_mid_)},
      {"ln1", L * nd * b, reinterpret_cast<void**>(&ln1_)},
      {"ln2", L * nd * b, reinterpret_cast<void**>(&ln2_)},
      {"ln1_stats", L * 2 * n * f, reinterpret_cast<void**>(&ln1_stats_)},
      {"ln2_stats", L * 2 * n * f, reinterpret_cast<void**>(&ln2_stats_)},
      {"qkv", L * 3 * nd * b, reinterpret_cast<void**>(&qkv_)},
      {"atty", L * nd * b, reinterpret_cast<void**>(&atty_)},
      {"attention", L * attention_bytes_, reinterpret_cast<void**>(&attention_)},
      {"lse", flash_ ? L * size_t(max_batch_ * NH * S) * f : 0, reinterpret_cast<void**>(&lse_)},
      {"ffn_out", L * nd * b, reinterpret_cast<void**>(&ffn_out_)},
      {"dense_pre", L * dense_rows * up_width_ * b, reinterpret_cast<void**>(&dense_pre_)},
      {"dense_act", L * dense_rows * inter_ * b, reinterpret_cast<void**>(&dense_act_)},
      {"dense_dact", dense_rows * inter_ * b, reinterpret_cast<void**>(&dense_dact_)},
      {"dense_dpre", dense_rows * up_width_ * b, reinterpret_cast<void**>(&dense_dpre_)},
      {"soft_x", soft_rows * D * b, reinterpret_cast<void**>(&soft_x_)},
      {"soft_y", soft_rows * D * b, reinterpret_cast<void**>(&soft_y_)},
      {"lnf", nd * b, reinterpret_cast<void**>(&lnf_)},
      {"lnf_stats", 2 * n * f, reinterpret_cast<void**>(&lnf_stats_)},
      {"logits", n * V * f, reinterpret_cast<void**>(&logits_)},
      {"losses", n * f, reinterpret_cast<void**>(&losses_)},
      {"dlogits", n * V * b, reinterpret_cast<void**>(&dlogits_)},
      {"dlnf", nd * f, reinterpret_cast<void**>(&dlnf_)},
      {"dres", nd * f, reinterpret_cast<void**>(&dres_)},
      {"dmid", nd * f, reinterpret_cast<void**>(&dmid_)},
      {"dln1", nd * f, reinterpret_cast<void**>(&dln1_)},
      {"dy", nd * b, reinterpret_cast<void**>(&dy_)},
      {"dln2", nd * b, reinterpret_cast<void**>(&dln2_)},
      {"datty", nd * b, reinterpret_cast<void**>(&datty_)},
      {"dqkv", 3 * nd * b, reinterpret_cast<void**>(&dqkv_)},
      {"scratch", scratch, &scratch_},
      {"sumsq", sizeof(double), reinterpret_cast<void**>(&sumsq_)},
      {"clip_scale", f, reinterpret_cast<void**>(&clip_scale_)},
  });
  attention_events_.resize(2 * L);
  ffn_events_.resize(2 * L);
  auto make = [](PartEvents& p) {
    MOE_CUDA_CHECK(cudaEventCreate(&p.begin));
    MOE_CUDA_CHECK(cudaEventCreate(&p.end));
  };
  for (PartEvents& p : attention_events_) make(p);
  for (PartEvents& p : ffn_events_) make(p);
  make(step_events_);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

GpuModel::~GpuModel() {
  if (stream_) cudaStreamSynchronize(stream_);
  auto destroy = [](PartEvents& p) {
    if (p.begin) cudaEventDestroy(p.begin);
    if (p.end) cudaEventDestroy(p.end);
  };
  for (PartEvents& p : attention_events_) destroy(p);
  for (PartEvents& p : ffn_events_) destroy(p);
  destroy(step_events_);
  train_ffn_.clear();
  eval_ffn_.clear();
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

const TensorSlot& GpuModel::slot(const std::string& name) const {
  auto it = slot_of_.find(name);
  MOE_ASSERT(it != slot_of_.end());
  return slots_[it->second];
}

void GpuModel::upload_state() {
  std::vector<TensorRef> list = model::tensor_list(host_);
  size_t moment = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    const TensorSlot& s = slots_[i];
    const size_t bytes = size_t(s.size) * sizeof(float);
    MOE_CUDA_CHECK(cudaMemcpyAsync(params_ + s.offset, list[i].value->data(), bytes,
                                   cudaMemcpyHostToDevice, stream_));
    if (!s.trainable) continue;
    MOE_CUDA_CHECK(cudaMemcpyAsync(m_ + s.offset, host_opt_.m[moment].data(), bytes,
                                   cudaMemcpyHostToDevice, stream_));
    MOE_CUDA_CHECK(cudaMemcpyAsync(v_ + s.offset, host_opt_.v[moment].data(), bytes,
                                   cudaMemcpyHostToDevice, stream_));
    ++moment;
  }
  adam_t_ = host_opt_.t;
  to_bf16(params_bf16_, params_, total_, stream_);
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

model::Weights& GpuModel::weights() {
  std::vector<TensorRef> list = model::tensor_list(host_);
  for (size_t i = 0; i < list.size(); ++i)
    MOE_CUDA_CHECK(cudaMemcpyAsync(list[i].value->data(), params_ + slots_[i].offset,
                                   size_t(slots_[i].size) * sizeof(float), cudaMemcpyDeviceToHost,
                                   stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return host_;
}

model::AdamW& GpuModel::optimizer() {
  size_t moment = 0;
  for (const TensorSlot& s : slots_) {
    if (!s.trainable) continue;
    const size_t bytes = size_t(s.size) * sizeof(float);
    MOE_CUDA_CHECK(cudaMemcpyAsync(host_opt_.m[moment].data(), m_ + s.offset, bytes,
                                   cudaMemcpyDeviceToHost, stream_));
    MOE_CUDA_CHECK(cudaMemcpyAsync(host_opt_.v[moment].data(), v_ + s.offset, bytes,
                                   cudaMemcpyDeviceToHost, stream_));
    ++moment;
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  host_opt_.t = adam_t_;
  return host_opt_;
}

void GpuModel::state_written() { upload_state(); }

int64_t GpuModel::parameter_count() {
  int64_t n = 0;
  for (const TensorSlot& s : slots_)
    if (s.trainable) n += s.size;
  return n;
}

std::vector<BlockFfn>& GpuModel::ffn_layers(int64_t tokens, bool training) {
  std::vector<BlockFfn>& layers = training ? train_ffn_ : eval_ffn_[tokens];
  if (training && !layers.empty()) {
    MOE_CHECK(layers[0].tokens() == tokens, "GPU model: training batches must all have ",
              layers[0].tokens() / cfg_.seq, " rows");
  }
  if (layers.empty()) {
    LayerConfig c = cfg_.layer_config(tokens);
    c.training = training;
    const bool chain = c.router == Router::chain_of_experts;
    // Expert choice ranks the B tokens at each position (the CPU model's S calls of B tokens):
    // one call over the N = B*S tokens in (b, s) order with S position groups.
    const int64_t groups = cfg_.groups_across_batch() ? cfg_.seq : 1;
    // Soft MoE mixes the B tokens at each position: the CPU model's S calls of B tokens, one
    // SoftMoeLayer call over S groups of B. Its experts take S*slots uniform rows each, what
    // the default strided-batched cuBLAS backend is made for.
    LayerConfig soft_cfg = cfg_.layer_config(tokens / cfg_.seq);
    soft_cfg.training = training;
    for (int64_t l = 0; l < cfg_.layers; ++l) {
      BlockFfn f;
      if (soft_)
        f.soft = std::make_unique<SoftMoeLayer>(soft_cfg, cfg_.seq,
                                                ExpertsBackend::cublas_strided_padded,
                                                GateUpLayout::split, /*backward=*/training,
                                                cublas_);
      else if (chain)  // the model's cuBLAS handle: 64 MiB saved per layer (see Layer)
        f.chain = std::make_unique<ChainLayer>(c, ExpertsBackend::grouped, GateUpLayout::split,
                                               /*backward=*/training, cublas_);
      else
        f.layer = std::make_unique<Layer>(c, ExpertsBackend::grouped, GateUpLayout::split,
                                          /*backward=*/training, groups, cublas_);
      layers.push_back(std::move(f));
    }
  }
  return layers;
}

SoftMoeWeights GpuModel::soft_weights(int64_t l) {
  const std::string p = block(l) + "ffn.";
  SoftMoeWeights w;
  w.phi = param_bf16(p + "router.w_gate");
  w.scale = param(p + "router.slot_scale");  // the fp32 master value AdamW updates
  w.w_up = param_bf16(p + "experts.w_up");
  w.w_down = param_bf16(p + "experts.w_down");
  return w;
}

LayerWeights GpuModel::ffn_weights(int64_t l) {
  const std::string p = block(l) + "ffn.";
  LayerWeights w;
  w.w_gate = param_bf16(p + "router.w_gate");
  w.w_up = param_bf16(p + "experts.w_up");
  w.w_down = param_bf16(p + "experts.w_down");
  if (has(p + "router.w_noise")) w.w_noise = param_bf16(p + "router.w_noise");
  if (has(p + "router.expert_bias")) w.expert_bias = param(p + "router.expert_bias");
  return w;
}

double GpuModel::forward(const data::Batch& batch, bool training, uint64_t noise_seed) {
  const int64_t B = batch.batch, S = batch.seq, D = cfg_.d_model, V = cfg_.vocab;
  const int64_t L = cfg_.layers, NH = cfg_.heads;
  MOE_CHECK(B >= 1 && B <= max_batch_, "GPU model: batch of ", B, " rows, the model was sized for ",
            max_batch_);
  MOE_CHECK(S == cfg_.seq, "GPU model: batch sequence length ", S, " must equal seq=", cfg_.seq);
  const int64_t N = B * S;
  MOE_CHECK(int64_t(batch.inputs.size()) == N && int64_t(batch.targets.size()) == N,
            "batch holds ", batch.inputs.size(), " inputs and ", batch.targets.size(),
            " targets, expected B*S = ", N);
  for (int64_t i = 0; i < N; ++i)
    MOE_CHECK(batch.inputs[i] >= 0 && batch.inputs[i] < V && batch.targets[i] >= 0 &&
                  batch.targets[i] < V,
              "batch token at ", i, " is outside the vocabulary [0, ", V, ")");
  B_ = B;
  training_ = training;
  have_backward_ = false;
  timed_backward_ = false;
  const size_t nd = size_t(N * D);
  record(step_events_.begin);
  MOE_CUDA_CHECK(cudaMemcpyAsync(tokens_, batch.inputs.data(), N * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream_));
  MOE_CUDA_CHECK(cudaMemcpyAsync(targets_, batch.targets.data(), N * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream_));
  std::vector<BlockFfn>* ffn = dense_ ? nullptr : &ffn_layers(N, training);
  last_ffn_ = ffn;

  encoder_forward(residual_, tokens_, param("wte"), param("wpe"), B, S, D, stream_);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = block(l);
    const float* r = residual_ + l * nd;
    float* mid = residual_mid_ + l * nd;
    float* r_out = residual_ + (l + 1) * nd;
    bf16* ln1 = ln1_ + l * nd;
    bf16* ln2 = ln2_ + l * nd;
    float* s1 = ln1_stats_ + l * 2 * N;
    float* s2 = ln2_stats_ + l * 2 * N;
    bf16* qkv = qkv_ + l * 3 * nd;
    bf16* atty = atty_ + l * nd;
    bf16* ffn_out = ffn_out_ + l * nd;
    layernorm_forward(ln1, s1, s1 + N, r, param(p + "ln1_w"), param(p + "ln1_b"), N, D, stream_);
    record(attention_events_[l].begin);
    matmul_forward<bf16>(cublas_, qkv, ln1, param_bf16(p + "qkv_w"), param(p + "qkv_b"), N, D,
                         3 * D, false, stream_);
    if (flash_) {
      flash_attention_forward(atty, lse_ + l * B * NH * S, qkv, B, S, D, NH, stream_);
    } else {
      AttentionState st;
      st.bind(attention_ + l * attention_bytes_, B, S, D, NH);
      attention_forward(cublas_, atty, st, qkv, B, S, D, NH, scratch_, stream_);
    }
    // mid = r + atty proj_w + proj_b
    MOE_CUDA_CHECK(cudaMemcpyAsync(mid, r, nd * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    matmul_forward<float>(cublas_, mid, atty, param_bf16(p + "proj_w"), param(p + "proj_b"), N, D,
                          D, true, stream_);
    record(attention_events_[l].end);
    layernorm_forward(ln2, s2, s2 + N, mid, param(p + "ln2_w"), param(p + "ln2_b"), N, D, stream_);
    record(ffn_events_[l].begin);
    if (dense_) {
      bf16* pre = dense_pre_ + size_t(l) * N * up_width_;
      bf16* act = dense_act_ + size_t(l) * N * inter_;
      matmul_forward<bf16>(cublas_, pre, ln2, param_bf16(p + "ffn.experts.w_up"), nullptr, N, D,
                           up_width_, false, stream_);
      ffn_activation_forward(act, pre, N, inter_, swiglu_, stream_);
      matmul_forward<bf16>(cublas_, ffn_out, act, param_bf16(p + "ffn.experts.w_down"), nullptr, N,
                           inter_, D, false, stream_);
    } else if (soft_) {
      transpose_row_blocks(ln2, soft_x_, B, S, D, stream_);
      (*ffn)[l].soft->forward(soft_x_, soft_weights(l), soft_y_, stream_);
      transpose_row_blocks(soft_y_, ffn_out, S, B, D, stream_);
    } else {
      (*ffn)[l].set_seed(call_seed(noise_seed, l));
      (*ffn)[l].forward(ln2, ffn_weights(l), ffn_out, stream_);
    }
    record(ffn_events_[l].end);
    residual_add(r_out, mid, ffn_out, int64_t(nd), stream_);
  }
  layernorm_forward(lnf_, lnf_stats_, lnf_stats_ + N, residual_ + L * nd, param("lnf_w"),
                    param("lnf_b"), N, D, stream_);
  output_forward(cublas_, logits_, lnf_, param_bf16("wte"), N, D, V, stream_);
  crossentropy_forward(losses_, training ? dlogits_ : nullptr, logits_, targets_, N, V,
                       float(1.0 / double(N)), stream_);
  record(step_events_.end);
  losses_host_.resize(N);
  MOE_CUDA_CHECK(cudaMemcpyAsync(losses_host_.data(), losses_, N * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  double mean = 0;
  for (float x : losses_host_) mean += x;
  return mean / double(N);
}

void GpuModel::backward() {
  MOE_CHECK(B_ > 0 && training_, "GPU model: backward needs a training forward first");
  MOE_CHECK(!have_backward_, "GPU model: one backward per forward");
  have_backward_ = true;
  timed_backward_ = true;
  const int64_t B = B_, S = cfg_.seq, D = cfg_.d_model, V = cfg_.vocab, L = cfg_.layers;
  const int64_t NH = cfg_.heads, N = B * S;
  const size_t nd = size_t(N * D);
  // Every gradient is written in full each step (the fresh ones by the FFN backward), so the
  // clipping norm and AdamW see this step's gradient alone.
  for (const auto& [offset, count] : zeroed_)
    MOE_CUDA_CHECK(
        cudaMemsetAsync(grads_ + offset, 0, size_t(count) * sizeof(float), stream_));

  // loss -> logits (dlogits made by the forward's cross-entropy) -> final LayerNorm
  output_backward(cublas_, dlnf_, grad("wte"), dlogits_, lnf_, param_bf16("wte"), N, D, V, stream_);
  MOE_CUDA_CHECK(cudaMemsetAsync(dres_, 0, nd * sizeof(float), stream_));
  layernorm_backward<float>(dres_, grad("lnf_w"), grad("lnf_b"), dlnf_, residual_ + L * nd,
                            param("lnf_w"), lnf_stats_, lnf_stats_ + N, N, D, scratch_, stream_);
  for (int64_t l = L - 1; l >= 0; --l) {
    const std::string p = block(l);
    const float* r = residual_ + l * nd;
    const float* mid = residual_mid_ + l * nd;
    const float* s1 = ln1_stats_ + l * 2 * N;
    const float* s2 = ln2_stats_ + l * 2 * N;
    // r_out = mid + FFN(LN2(mid))
    record(ffn_events_[L + l].begin);
    to_bf16(dy_, dres_, int64_t(nd), stream_);
    if (dense_) {
      const bf16* pre = dense_pre_ + size_t(l) * N * up_width_;
      const bf16* act = dense_act_ + size_t(l) * N * inter_;
      matmul_backward<bf16>(cublas_, dense_dact_, grad(p + "ffn.experts.w_down"), nullptr, dy_,
                            act, param_bf16(p + "ffn.experts.w_down"), N, inter_, D, scratch_,
                            stream_, /*accumulate_dweight=*/false);
      ffn_activation_backward(dense_dpre_, dense_dact_, pre, N, inter_, swiglu_, stream_);
      matmul_backward<bf16>(cublas_, dln2_, grad(p + "ffn.experts.w_up"), nullptr, dense_dpre_,
                            ln2_ + l * nd, param_bf16(p + "ffn.experts.w_up"), N, D, up_width_,
                            scratch_, stream_, /*accumulate_dweight=*/false);
    } else if (soft_) {
      // dy_ is free once regrouped, so the layer's dx goes there before its way back.
      transpose_row_blocks(ln2_ + l * nd, soft_x_, B, S, D, stream_);
      transpose_row_blocks(dy_, soft_y_, B, S, D, stream_);
      SoftMoeGrads g;
      g.dx = dy_;
      g.dphi = grad(p + "ffn.router.w_gate");
      g.dscale = grad(p + "ffn.router.slot_scale");
      g.dw_up = grad(p + "ffn.experts.w_up");
      g.dw_down = grad(p + "ffn.experts.w_down");
      g.accumulate_experts = false;
      (*last_ffn_)[l].soft->backward(soft_x_, soft_weights(l), soft_y_, g, stream_);
      transpose_row_blocks(dy_, dln2_, S, B, D, stream_);
    } else {
      LayerGrads g;
      g.dx = dln2_;
      g.dw_gate = grad(p + "ffn.router.w_gate");
      g.dw_up = grad(p + "ffn.experts.w_up");
      g.dw_down = grad(p + "ffn.experts.w_down");
      if (has(p + "ffn.router.w_noise")) g.dw_noise = grad(p + "ffn.router.w_noise");
      g.accumulate_experts = false;
      (*last_ffn_)[l].backward(ln2_ + l * nd, ffn_weights(l), dy_, g, stream_);
    }
    record(ffn_events_[L + l].end);
    MOE_CUDA_CHECK(
        cudaMemcpyAsync(dmid_, dres_, nd * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    layernorm_backward<bf16>(dmid_, grad(p + "ln2_w"), grad(p + "ln2_b"), dln2_, mid,
                             param(p + "ln2_w"), s2, s2 + N, N, D, scratch_, stream_);
    // mid = r + proj(attention(qkv(LN1(r))))
    record(attention_events_[L + l].begin);
    to_bf16(dy_, dmid_, int64_t(nd), stream_);
    matmul_backward<bf16>(cublas_, datty_, grad(p + "proj_w"), grad(p + "proj_b"), dy_,
                          atty_ + l * nd, param_bf16(p + "proj_w"), N, D, D, scratch_, stream_);
    if (flash_) {
      flash_attention_backward(dqkv_, datty_, atty_ + l * nd, lse_ + l * B * NH * S,
                               qkv_ + l * 3 * nd, B, S, D, NH, scratch_, stream_);
    } else {
      AttentionState st;
      st.bind(attention_ + l * attention_bytes_, B, S, D, NH);
      attention_backward(cublas_, dqkv_, datty_, st, B, S, D, NH, scratch_, stream_);
    }
    matmul_backward<float>(cublas_, dln1_, grad(p + "qkv_w"), grad(p + "qkv_b"), dqkv_,
                           ln1_ + l * nd, param_bf16(p + "qkv_w"), N, D, 3 * D, scratch_, stream_);
    record(attention_events_[L + l].end);
    MOE_CUDA_CHECK(
        cudaMemcpyAsync(dres_, dmid_, nd * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    layernorm_backward<float>(dres_, grad(p + "ln1_w"), grad(p + "ln1_b"), dln1_, r,
                              param(p + "ln1_w"), s1, s1 + N, N, D, scratch_, stream_);
  }
  encoder_backward(grad("wte"), grad("wpe"), dres_, tokens_, B, S, D, V, stream_);
  record(step_events_.end);
}

double GpuModel::optimizer_step(double lr, const model::TrainConfig& cfg) {
  MOE_CHECK(have_backward_, "GPU model: optimizer_step needs a backward first");
  // Gradients of buffers and of the alignment gaps are zero, so the flat sum is the trainable one.
  sum_squares(sumsq_, grads_, total_, false, scratch_, stream_);
  clip_scale(clip_scale_, sumsq_, cfg.grad_clip > 0 ? float(cfg.grad_clip) : 0.0f, stream_);
  ++adam_t_;
  const float c1 = float(1.0 / (1.0 - std::pow(cfg.beta1, double(adam_t_))));
  const float c2 = float(1.0 / (1.0 - std::pow(cfg.beta2, double(adam_t_))));
  // One launch for every trainable tensor (about a hundred per-tensor launches before).
  if (float(cfg.weight_decay) != adam_chunks_decay_) {
    adam_chunks_.clear();
    for (const TensorSlot& s : slots_)
      if (s.trainable)
        add_adamw_chunks(adam_chunks_, s.offset, s.size, s.decay ? float(cfg.weight_decay) : 0.f);
    MOE_CUDA_CHECK(cudaMemcpyAsync(adam_chunks_dev_, adam_chunks_.data(),
                                   adam_chunks_.size() * sizeof(AdamWChunk),
                                   cudaMemcpyHostToDevice, stream_));
    adam_chunks_decay_ = float(cfg.weight_decay);
  }
  adamw_update_chunks(params_, params_bf16_, grads_, m_, v_, adam_chunks_dev_,
                      int64_t(adam_chunks_.size()), float(lr), float(cfg.beta1), float(cfg.beta2),
                      float(cfg.eps), c1, c2, clip_scale_, stream_);
  if (cfg_.ffn_kind == model::FfnKind::moe && cfg_.ffn.router == Router::sigmoid_bias)
    for (int64_t l = 0; l < cfg_.layers; ++l)
      train_ffn_[l].layer->update_expert_bias(param(block(l) + "ffn.router.expert_bias"), stream_);
  double sq = 0;
  MOE_CUDA_CHECK(cudaMemcpyAsync(&sq, sumsq_, sizeof sq, cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return std::sqrt(sq);
}

double GpuModel::aux_loss() {
  if (!last_ffn_) return 0;
  std::vector<double> per_layer(last_ffn_->size(), 0.0);
  for (size_t l = 0; l < per_layer.size(); ++l)
    if (const double* a = (*last_ffn_)[l].aux_loss())
      MOE_CUDA_CHECK(
          cudaMemcpyAsync(&per_layer[l], a, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  double sum = 0;
  for (double a : per_layer) sum += a;
  return sum;
}

std::vector<LoadStats> GpuModel::layer_stats() {
  std::vector<LoadStats> out;
  if (dense_ && B_ > 0) {
    // One expert takes every token: the CPU's E = 1 layer reports exactly this.
    LoadStats s;
    s.tokens_per_expert = {double(N())};
    fill_balance(s);
    out.assign(cfg_.layers, s);
    return out;
  }
  if (!last_ffn_) return out;
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (const BlockFfn& f : *last_ffn_) out.push_back(f.stats());
  return out;
}

void GpuModel::add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                                  std::vector<std::vector<double>>& counts) {
  const int64_t S = cfg_.seq;
  counts.resize(cfg_.layers);
  if (dense_ && B_ > 0) {  // every token's one choice goes to expert 0
    for (int64_t l = 0; l < cfg_.layers; ++l) {
      counts[l].resize(num_domains, 0.0);
      for (int64_t t = 0; t < N(); ++t) counts[l][row_domain[t / S]] += 1.0;
    }
    return;
  }
  if (!last_ffn_) return;
  std::vector<int32_t> token, expert;
  std::vector<float> mass;
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    if (const SoftMoeLayer* soft = (*last_ffn_)[l].soft.get()) {
      // The combine mass of each expert per token, added to the domain of the token's row (the
      // CPU adds each slot's combine weight; here the slots of an expert are summed first).
      const int64_t E = soft->config().experts, B = soft->config().tokens;
      const int64_t T = B * soft->groups();
      counts[l].resize(num_domains * E, 0.0);
      mass.resize(size_t(T * E));
      MOE_CUDA_CHECK(cudaMemcpyAsync(mass.data(), soft->expert_mass(stream_),
                                     mass.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                     stream_));
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (int64_t t = 0; t < T; ++t)  // row t = s*B + b holds batch row b
        for (int64_t e = 0; e < E; ++e)
          counts[l][row_domain[t % B] * E + e] += double(mass[size_t(t * E + e)]);
      continue;
    }
    for (const Layer* layer : (*last_ffn_)[l].routed()) {
      const RoutingView r = layer->routing();
      const int64_t E = r.experts;
      counts[l].resize(num_domains * E, 0.0);
      token.resize(r.choices);
      expert.resize(r.choices);
      MOE_CUDA_CHECK(cudaMemcpyAsync(token.data(), r.choice_token, r.choices * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream_));
      MOE_CUDA_CHECK(cudaMemcpyAsync(expert.data(), r.choice_expert, r.choices * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream_));
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (int64_t i = 0; i < r.choices; ++i) {
        if (expert[i] == kNoExpert) continue;
        counts[l][row_domain[token[i] / S] * E + expert[i]] += 1.0;
      }
    }
  }
}

model::StepTimes GpuModel::times() {
  model::StepTimes t;
  if (B_ == 0) return t;
  MOE_CUDA_CHECK(cudaEventSynchronize(step_events_.end));
  auto ms = [](const PartEvents& p) {
    float v = 0;
    MOE_CUDA_CHECK(cudaEventElapsedTime(&v, p.begin, p.end));
    return double(v);
  };
  const int64_t L = cfg_.layers, parts = timed_backward_ ? 2 * L : L;
  for (int64_t i = 0; i < parts; ++i) {
    t.attention_ms += ms(attention_events_[i]);
    t.moe_ms += ms(ffn_events_[i]);
  }
  t.total_ms = ms(step_events_);
  return t;
}

}  // namespace

void check_gpu_model(const ModelConfig& cfg) {
  cfg.validate();
  MOE_CHECK(has_device(), "--device gpu: no CUDA device is visible");
  if (cfg.ffn_kind == model::FfnKind::moe) {
    const Router r = cfg.ffn.router;
    MOE_CHECK(cfg.ffn.shared_experts == 0,
              "--device gpu: shared experts are not available on the GPU model");
    if (r == Router::soft_moe) {
      // SoftMoeLayer's limits (one group per position, int32 slot rows), checked here so that
      // they fail before anything is allocated rather than at the first batch.
      MOE_CHECK(cfg.seq <= 65535, "--device gpu: soft_moe takes seq up to 65535 (one group per "
                "position), got ", cfg.seq);
      MOE_CHECK(cfg.ffn.experts * cfg.ffn.slots_per_expert * cfg.seq < (int64_t{1} << 31),
                "--device gpu: soft_moe needs experts * slots-per-expert * seq below 2^31, got ",
                cfg.ffn.experts * cfg.ffn.slots_per_expert * cfg.seq);
    }
  }
  MOE_CHECK(cfg.d_model % 8 == 0, "--device gpu: d-model must be a multiple of 8, got ",
            cfg.d_model);
}

std::unique_ptr<model::LanguageModel> make_gpu_model(const ModelConfig& cfg, uint64_t seed,
                                                     int64_t max_batch) {
  return std::make_unique<GpuModel>(cfg, seed, max_batch);
}

}  // namespace moe::cuda::lm
