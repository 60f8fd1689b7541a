// defines: ModelConfig (validate, layer_config, names), tensor_list, Transformer
// The model assembled from the layer kinds of layers.hpp and the MoE layer of layer.hpp.
#include "moe/model/transformer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include "moe/check.hpp"
#include "moe/init.hpp"
#include "moe/model/layers.hpp"
#include "moe/rng.hpp"

namespace moe::model {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Seed of one FFN call: noise, jitter and random second choices differ between steps, layers and
// position groups, and are a pure function of (noise_seed, layer, group).
uint64_t call_seed(uint64_t noise_seed, int64_t layer, int64_t group) {
  return splitmix64(noise_seed ^ splitmix64(uint64_t(layer) << 32 ^ uint64_t(group)));
}

// The FFN calls scale the auxiliary loss by 1/S when a layer runs S position groups: the layer's
// backward differentiates <dy, y> + aux, so it is given S*dy and its gradients are divided by S.
bool has_aux_loss(const LayerConfig& c) {
  return c.resolved_aux_coef() != 0 || c.resolved_z_coef() != 0 ||
         (c.router == Router::noisy_topk && (c.importance_coef != 0 || c.load_coef != 0));
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// ModelConfig

void ModelConfig::validate() const {
  MOE_CHECK(vocab == data::kVocab, "vocab must be ", data::kVocab, " (byte tokens), got ", vocab);
  MOE_CHECK(layers >= 1 && layers <= 64, "layers must be in [1, 64], got ", layers);
  MOE_CHECK(d_model >= 1 && d_model <= 65536, "d-model must be in [1, 65536], got ", d_model);
  MOE_CHECK(heads >= 1 && d_model % heads == 0, "heads must divide d-model (", d_model, "), got ",
            heads);
  MOE_CHECK(seq >= 1 && seq <= 65536, "seq must be in [1, 65536], got ", seq);
  layer_config(groups_across_batch() ? 1 : seq).validate();
  if (ffn_kind != FfnKind::moe) ffn.validate();  // the MoE the baseline is sized after
}

LayerConfig ModelConfig::layer_config(int64_t tokens) const {
  LayerConfig c = ffn;
  c.hidden = d_model;
  c.tokens = tokens;
  c.sequence_length = 0;
  if (ffn_kind != FfnKind::moe) {
    c.inter = (ffn_kind == FfnKind::dense_active ? ffn.top_k : ffn.experts) * ffn.inter;
    c.router = Router::softmax_topk;
    c.experts = 1;
    c.top_k = 1;
    c.aux_coef = 0;
    c.z_coef = 0;
    c.layout = Layout::dropless;
    c.second_policy = SecondPolicy::all;
  } else if ((c.router == Router::chain_of_experts || c.router == Router::sigmoid_bias) &&
             tokens % seq == 0) {
    // Sequence-wise balance loss (DeepSeek / CoE): the tokens of a call are whole sequences.
    c.sequence_length = seq;
  }
  return c;
}

bool ModelConfig::groups_across_batch() const {
  return ffn_kind == FfnKind::moe &&
         (ffn.router == Router::soft_moe || ffn.router == Router::expert_choice);
}

std::string ModelConfig::name() const {
  switch (ffn_kind) {
    case FfnKind::dense_active: return "dense_active";
    case FfnKind::dense_params: return "dense_params";
    case FfnKind::moe: break;
  }
  return std::string(moe::name(ffn.router));
}

std::string ModelConfig::description() const {
  if (groups_across_batch()) return name() + " (groups across the batch at each position)";
  if (ffn_kind != FfnKind::moe)
    return name() + " (dense FFN, I=" + std::to_string(layer_config(seq).inter) + ")";
  return name();
}

// ---------------------------------------------------------------------------------------------
// tensors

std::vector<TensorRef> tensor_list(Weights& w) {
  std::vector<TensorRef> out;
  out.push_back({"wte", &w.wte, true, true});
  out.push_back({"wpe", &w.wpe, true, true});
  for (size_t l = 0; l < w.blocks.size(); ++l) {
    BlockWeights& b = w.blocks[l];
    const std::string p = "block" + std::to_string(l) + ".";
    out.push_back({p + "ln1_w", &b.ln1_w, false, true});
    out.push_back({p + "ln1_b", &b.ln1_b, false, true});
    out.push_back({p + "qkv_w", &b.qkv_w, true, true});
    out.push_back({p + "qkv_b", &b.qkv_b, false, true});
    out.push_back({p + "proj_w", &b.proj_w, true, true});
    out.push_back({p + "proj_b", &b.proj_b, false, true});
    out.push_back({p + "ln2_w", &b.ln2_w, false, true});
    out.push_back({p + "ln2_b", &b.ln2_b, false, true});
    for (auto& [name, tensor] : parameter_list(b.ffn)) {
      const bool buffer = name == "router.expert_bias";
      const bool decay = !buffer && name != "router.slot_scale";
      out.push_back({p + "ffn." + name, tensor, decay, !buffer});
    }
  }
  out.push_back({"lnf_w", &w.lnf_w, false, true});
  out.push_back({"lnf_b", &w.lnf_b, false, true});
  return out;
}

// ---------------------------------------------------------------------------------------------
// Transformer

Transformer::Transformer(const ModelConfig& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t V = cfg_.vocab, D = cfg_.d_model, S = cfg_.seq, L = cfg_.layers;
  // GPT-2 initialisation: N(0, 0.02), projections into the residual stream scaled by 1/sqrt(2L).
  const double residual_scale = 1.0 / std::sqrt(2.0 * double(L));
  fill_normal(w_.wte, V * D, 0.02, seed, 1);
  fill_normal(w_.wpe, S * D, 0.02, seed, 2);
  w_.blocks.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    BlockWeights& b = w_.blocks[l];
    b.ln1_w.assign(D, 1.0f);
    b.ln1_b.assign(D, 0.0f);
    fill_normal(b.qkv_w, D * 3 * D, 0.02, seed, 16 + 4 * l);
    b.qkv_b.assign(3 * D, 0.0f);
    fill_normal(b.proj_w, D * D, 0.02 * residual_scale, seed, 17 + 4 * l);
    b.proj_b.assign(D, 0.0f);
    b.ln2_w.assign(D, 1.0f);
    b.ln2_b.assign(D, 0.0f);
    // The layer's own (paper) initialisation, its second expert layer scaled like proj.
    b.ffn = init_params<float>(cfg_.layer_config(S), splitmix64(seed ^ (uint64_t(l + 1) << 48)));
    for (float& v : b.ffn.w_down) v = float(v * residual_scale);
    for (float& v : b.ffn.shared_down) v = float(v * residual_scale);
  }
  w_.lnf_w.assign(D, 1.0f);
  w_.lnf_b.assign(D, 0.0f);
  g_ = w_;
  for (TensorRef& t : tensor_list(g_)) std::fill(t.value->begin(), t.value->end(), 0.0f);
  acts_.resize(L);
}

int64_t Transformer::parameter_count() {
  int64_t n = 0;
  for (const TensorRef& t : tensor_list(w_))
    if (t.trainable) n += static_cast<int64_t>(t.value->size());
  return n;
}

double Transformer::forward(const data::Batch& batch, bool training, uint64_t noise_seed) {
  const auto t_start = Clock::now();
  const int64_t B = batch.batch, S = batch.seq, D = cfg_.d_model, V = cfg_.vocab;
  const int64_t L = cfg_.layers, NH = cfg_.heads, N = B * S;
  MOE_CHECK(B >= 1, "batch must have at least one row");
  MOE_CHECK(S >= 1 && S <= cfg_.seq, "batch sequence length ", S, " must be in [1, seq=", cfg_.seq,
            "]");
  MOE_CHECK(static_cast<int64_t>(batch.inputs.size()) == N &&
                static_cast<int64_t>(batch.targets.size()) == N,
            "batch holds ", batch.inputs.size(), " inputs and ", batch.targets.size(),
            " targets, expected B*S = ", N);
  for (int64_t i = 0; i < N; ++i)
    MOE_CHECK(batch.inputs[i] >= 0 && batch.inputs[i] < V && batch.targets[i] >= 0 &&
                  batch.targets[i] < V,
              "batch token at ", i, " is outside the vocabulary [0, ", V, ")");
  times_ = {};
  B_ = B;
  S_ = S;
  inputs_ = batch.inputs;
  targets_ = batch.targets;
  trained_forward_ = training;
  aux_loss_ = 0;
  residual_.resize((L + 1) * N * D);
  residual_mid_.resize(L * N * D);

  encoder_forward(residual_.data(), inputs_.data(), w_.wte.data(), w_.wpe.data(), B, S, D);
  for (int64_t l = 0; l < L; ++l) {
    BlockActivations& a = acts_[l];
    const BlockWeights& bw = w_.blocks[l];
    const float* r = residual_.data() + l * N * D;         // (N, D) block input
    float* mid = residual_mid_.data() + l * N * D;         // (N, D) after attention
    float* r_out = residual_.data() + (l + 1) * N * D;     // (N, D) block output
    a.ln1.resize(N * D);
    a.ln1_mean.resize(N);
    a.ln1_rstd.resize(N);
    layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), r, bw.ln1_w.data(),
                      bw.ln1_b.data(), N, D);
    auto t0 = Clock::now();
    a.qkv.resize(N * 3 * D);
    a.att.resize(B * NH * S * S);
    a.atty.resize(N * D);
    matmul_forward(a.qkv.data(), a.ln1.data(), bw.qkv_w.data(), bw.qkv_b.data(), N, D, 3 * D);
    attention_forward(a.atty.data(), a.att.data(), a.qkv.data(), B, S, D, NH);
    matmul_forward(mid, a.atty.data(), bw.proj_w.data(), bw.proj_b.data(), N, D, D);
    times_.attention_ms += ms_since(t0);
    for (int64_t i = 0; i < N * D; ++i) mid[i] += r[i];
    a.ln2.resize(N * D);
    a.ln2_mean.resize(N);
    a.ln2_rstd.resize(N);
    layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), mid, bw.ln2_w.data(),
                      bw.ln2_b.data(), N, D);
    t0 = Clock::now();
    ffn_forward(l, training, noise_seed);
    times_.moe_ms += ms_since(t0);
    for (int64_t i = 0; i < N * D; ++i) r_out[i] = mid[i] + a.ffn_out[i];
  }
  lnf_.resize(N * D);
  lnf_mean_.resize(N);
  lnf_rstd_.resize(N);
  layernorm_forward(lnf_.data(), lnf_mean_.data(), lnf_rstd_.data(), residual_.data() + L * N * D,
                    w_.lnf_w.data(), w_.lnf_b.data(), N, D);
  logits_.resize(N * V);
  probs_.resize(N * V);
  losses_.resize(N);
  output_forward(logits_.data(), lnf_.data(), w_.wte.data(), N, D, V);
  crossentropy_forward(losses_.data(), probs_.data(), logits_.data(), targets_.data(), N, V);
  double mean = 0;
  for (int64_t i = 0; i < N; ++i) mean += losses_[i];
  mean /= double(N);
  times_.total_ms = ms_since(t_start);
  return mean;
}

void Transformer::ffn_forward(int64_t l, bool training, uint64_t noise_seed) {
  BlockActivations& a = acts_[l];
  const Params<float>& p = w_.blocks[l].ffn;
  const int64_t B = B_, S = S_, D = cfg_.d_model, N = B * S;
  a.ffn_out.resize(N * D);
  if (!cfg_.groups_across_batch()) {
    // Token choice: all B*S tokens route in one call, in (b, s) order.
    a.ffn.resize(1);
    a.ffn_cfg.assign(1, cfg_.layer_config(N));
    a.ffn_cfg[0].training = training;
    a.ffn_cfg[0].seed = call_seed(noise_seed, l, 0);
    layer_forward(a.ffn_cfg[0], p, a.ln2.data(), a.ffn[0]);
    std::copy(a.ffn[0].y.begin(), a.ffn[0].y.end(), a.ffn_out.begin());
    aux_loss_ += a.ffn[0].aux_loss;
    return;
  }
  // Grouped routers: call s sees the B tokens at position s.
  a.ffn_in.resize(S * B * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      std::copy_n(a.ln2.data() + (b * S + s) * D, D, a.ffn_in.data() + (s * B + b) * D);
  a.ffn.resize(S);
  a.ffn_cfg.assign(S, cfg_.layer_config(B));
  for (int64_t s = 0; s < S; ++s) {
    a.ffn_cfg[s].training = training;
    a.ffn_cfg[s].seed = call_seed(noise_seed, l, s);
    layer_forward(a.ffn_cfg[s], p, a.ffn_in.data() + s * B * D, a.ffn[s]);
    const std::vector<float>& y = a.ffn[s].y;  // (B, D)
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(y.data() + b * D, D, a.ffn_out.data() + (b * S + s) * D);
    aux_loss_ += a.ffn[s].aux_loss / double(S);
  }
}

void Transformer::backward() {
  MOE_CHECK(!inputs_.empty(), "backward called before forward");
  const auto t_start = Clock::now();
  const double total_fwd = times_.total_ms;
  const int64_t B = B_, S = S_, D = cfg_.d_model, V = cfg_.vocab, L = cfg_.layers;
  const int64_t NH = cfg_.heads, N = B * S;
  for (TensorRef& t : tensor_list(g_)) std::fill(t.value->begin(), t.value->end(), 0.0f);

  // loss -> logits -> final LayerNorm
  dlosses_.assign(N, float(1.0 / double(N)));
  dlogits_.assign(N * V, 0.0f);
  crossentropy_backward(dlogits_.data(), dlosses_.data(), probs_.data(), targets_.data(), N, V);
  dlnf_.assign(N * D, 0.0f);
  output_backward(dlnf_.data(), g_.wte.data(), dlogits_.data(), lnf_.data(), w_.wte.data(), N, D, V);
  dres_.assign(N * D, 0.0f);  // gradient of the residual stream, walked down the blocks
  layernorm_backward(dres_.data(), g_.lnf_w.data(), g_.lnf_b.data(), dlnf_.data(),
                     residual_.data() + L * N * D, w_.lnf_w.data(), lnf_mean_.data(),
                     lnf_rstd_.data(), N, D);

  for (int64_t l = L - 1; l >= 0; --l) {
    BlockActivations& a = acts_[l];
    const BlockWeights& bw = w_.blocks[l];
    BlockWeights& bg = g_.blocks[l];
    const float* r = residual_.data() + l * N * D;
    const float* mid = residual_mid_.data() + l * N * D;
    // r_out = mid + FFN(LN2(mid))
    dln_.assign(N * D, 0.0f);
    auto t0 = Clock::now();
    ffn_backward(l, dres_.data(), dln_.data());
    times_.moe_ms += ms_since(t0);
    dmid_ = dres_;
    layernorm_backward(dmid_.data(), bg.ln2_w.data(), bg.ln2_b.data(), dln_.data(), mid,
                       bw.ln2_w.data(), a.ln2_mean.data(), a.ln2_rstd.data(), N, D);
    // mid = r + proj(attention(qkv(LN1(r))))
    t0 = Clock::now();
    datty_.assign(N * D, 0.0f);
    matmul_backward(datty_.data(), bg.proj_w.data(), bg.proj_b.data(), dmid_.data(),
                    a.atty.data(), bw.proj_w.data(), N, D, D);
    dqkv_.assign(N * 3 * D, 0.0f);
    datt_.resize(B * NH * S * S);
    attention_backward(dqkv_.data(), datt_.data(), datty_.data(), a.qkv.data(), a.att.data(), B, S,
                       D, NH);
    dln_.assign(N * D, 0.0f);
    matmul_backward(dln_.data(), bg.qkv_w.data(), bg.qkv_b.data(), dqkv_.data(), a.ln1.data(),
                    bw.qkv_w.data(), N, D, 3 * D);
    times_.attention_ms += ms_since(t0);
    dres_ = dmid_;
    layernorm_backward(dres_.data(), bg.ln1_w.data(), bg.ln1_b.data(), dln_.data(), r,
                       bw.ln1_w.data(), a.ln1_mean.data(), a.ln1_rstd.data(), N, D);
  }
  encoder_backward(g_.wte.data(), g_.wpe.data(), dres_.data(), inputs_.data(), B, S, D);
  times_.total_ms = total_fwd + ms_since(t_start);
}

void Transformer::ffn_backward(int64_t l, const float* dout, float* dinp) {
  BlockActivations& a = acts_[l];
  const Params<float>& p = w_.blocks[l].ffn;
  Params<float>& gp = g_.blocks[l].ffn;
  const int64_t B = B_, S = S_, D = cfg_.d_model, N = B * S;
  if (!cfg_.groups_across_batch()) {
    dx_group_.resize(N * D);
    layer_backward(a.ffn_cfg[0], p, a.ln2.data(), a.ffn[0], dout, dx_group_.data(), gp);
    for (int64_t i = 0; i < N * D; ++i) dinp[i] += dx_group_[i];
    return;
  }
  const bool scale = has_aux_loss(a.ffn_cfg[0]);
  const float up = scale ? float(S) : 1.0f, down = scale ? float(1.0 / double(S)) : 1.0f;
  dy_group_.resize(B * D);
  dx_group_.resize(B * D);
  auto grads = parameter_list(gp);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < D; ++i) dy_group_[b * D + i] = up * dout[(b * S + s) * D + i];
    layer_backward(a.ffn_cfg[s], p, a.ffn_in.data() + s * B * D, a.ffn[s], dy_group_.data(),
                   dx_group_.data(), dffn_group_);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < D; ++i) dinp[(b * S + s) * D + i] += down * dx_group_[b * D + i];
    auto parts = parameter_list(dffn_group_);
    for (size_t t = 0; t < grads.size(); ++t) {
      std::vector<float>& dst = *grads[t].second;
      const std::vector<float>& src = *parts[t].second;
      for (size_t i = 0; i < dst.size(); ++i) dst[i] += down * src[i];
    }
  }
}

void Transformer::update_router_buffers() {
  if (!trained_forward_) return;
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    BlockActivations& a = acts_[l];
    for (size_t c = 0; c < a.ffn.size(); ++c) update_expert_bias(a.ffn_cfg[c], a.ffn[c], w_.blocks[l].ffn);
  }
}

std::vector<LoadStats> Transformer::layer_stats() const {
  std::vector<LoadStats> out;
  for (const BlockActivations& a : acts_) {
    LoadStats s;
    if (a.ffn.empty()) {
      out.push_back(s);
      continue;
    }
    const int64_t E = a.ffn_cfg[0].experts;
    s.tokens_per_expert.assign(E, 0.0);
    const double calls = double(a.ffn.size());
    for (const LayerForward<float>& f : a.ffn) {
      for (int64_t e = 0; e < E; ++e) s.tokens_per_expert[e] += f.stats.tokens_per_expert[e];
      s.drop_rate += f.stats.drop_rate / calls;
      s.router_entropy += f.stats.router_entropy / calls;
      s.mean_entropy += f.stats.mean_entropy / calls;
      s.tokens_without_expert += f.stats.tokens_without_expert / calls;
    }
    fill_balance(s);
    out.push_back(s);
  }
  return out;
}

void Transformer::add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                                     std::vector<std::vector<double>>& counts) const {
  const int64_t S = S_;
  const bool grouped = cfg_.groups_across_batch();
  counts.resize(cfg_.layers);
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    const BlockActivations& a = acts_[l];
    if (a.ffn.empty()) continue;
    const int64_t E = a.ffn_cfg[0].experts;
    counts[l].resize(num_domains * E, 0.0);
    std::vector<double>& n = counts[l];
    // Row (sequence) of token t of call c.
    auto row_of = [&](int64_t t) { return grouped ? t : t / S; };
    for (size_t c = 0; c < a.ffn.size(); ++c) {
      const LayerForward<float>& f = a.ffn[c];
      const LayerConfig& lc = a.ffn_cfg[c];
      if (lc.router == Router::soft_moe) {
        const int64_t slots = lc.slots_per_expert, n_slots = E * slots;
        for (int64_t t = 0; t < lc.tokens; ++t) {
          const int64_t d = row_domain[row_of(t)];
          for (int64_t j = 0; j < n_slots; ++j)
            n[d * E + j / slots] += f.soft.combine[t * n_slots + j];
        }
        continue;
      }
      for (const RouteStep<float>& step : f.steps) {
        const Routing<float>& r = step.routing;
        for (int64_t i = 0; i < r.size(); ++i) {
          if (r.choice_expert[i] == kNoExpert) continue;
          const int64_t d = row_domain[row_of(r.choice_token[i])];
          n[d * E + r.choice_expert[i]] += 1.0;
        }
      }
    }
  }
}

}  // namespace moe::model
