// defines: TrainConfig::validate, learning_rate, AdamW, mutual_information, Trainer (train_step,
//          evaluate), config_json, run_training
#include "moe/model/train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numbers>

#include "io/files.hpp"
#include "io/jsonl.hpp"
#include "moe/check.hpp"
#include "moe/rng.hpp"

namespace moe::model {

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Router noise seed of a training step (noise, jitter and random choices differ every step).
uint64_t step_noise_seed(uint64_t seed, int64_t step) {
  constexpr uint64_t kNoiseStream = 0x726f75746572;  // "router"
  return splitmix64(splitmix64(seed ^ kNoiseStream) ^ uint64_t(step));
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// configuration and schedule

void TrainConfig::validate() const {
  model.validate();
  MOE_CHECK(batch >= 1 && batch <= 65536, "batch must be in [1, 65536], got ", batch);
  MOE_CHECK(steps >= 0, "steps must be >= 0, got ", steps);
  MOE_CHECK(std::isfinite(lr) && lr > 0, "lr must be > 0, got ", lr);
  MOE_CHECK(std::isfinite(min_lr_fraction) && min_lr_fraction >= 0 && min_lr_fraction <= 1,
            "min-lr-fraction must be in [0, 1], got ", min_lr_fraction);
  MOE_CHECK(warmup >= 0, "warmup must be >= 0, got ", warmup);
  MOE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight-decay must be >= 0, got ",
            weight_decay);
  MOE_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "AdamW betas must be in [0, 1)");
  MOE_CHECK(std::isfinite(eps) && eps > 0, "AdamW eps must be > 0");
  MOE_CHECK(std::isfinite(grad_clip), "grad-clip must be finite");
  MOE_CHECK(eval_every >= 0, "eval-every must be >= 0, got ", eval_every);
  MOE_CHECK(val_windows >= 1, "val-windows must be >= 1, got ", val_windows);
}

double learning_rate(const TrainConfig& cfg, int64_t step) {
  if (step < cfg.warmup) return cfg.lr * double(step + 1) / double(cfg.warmup);
  const int64_t decay_steps = cfg.steps - cfg.warmup;
  if (decay_steps <= 0) return cfg.lr;
  const double progress = std::min(1.0, double(step - cfg.warmup) / double(decay_steps));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return cfg.lr * (cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cosine);
}

// ---------------------------------------------------------------------------------------------
// AdamW

void AdamW::init(const std::vector<TensorRef>& params) {
  m.clear();
  v.clear();
  for (const TensorRef& p : params)
    if (p.trainable) {
      m.emplace_back(p.value->size(), 0.0f);
      v.emplace_back(p.value->size(), 0.0f);
    }
  t = 0;
}

void AdamW::update(const std::vector<TensorRef>& params, const std::vector<TensorRef>& grads,
                   double lr, const TrainConfig& cfg) {
  ++t;
  const float b1 = float(cfg.beta1), b2 = float(cfg.beta2), eps = float(cfg.eps);
  const float c1 = float(1.0 / (1.0 - std::pow(cfg.beta1, double(t))));
  const float c2 = float(1.0 / (1.0 - std::pow(cfg.beta2, double(t))));
  const float step = float(lr);
  size_t slot = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    std::vector<float>& p = *params[i].value;
    const std::vector<float>& g = *grads[i].value;
    std::vector<float>& mi = m[slot];
    std::vector<float>& vi = v[slot];
    ++slot;
    const float wd = params[i].decay ? float(cfg.weight_decay) : 0.0f;
    for (size_t j = 0; j < p.size(); ++j) {
      mi[j] = b1 * mi[j] + (1 - b1) * g[j];
      vi[j] = b2 * vi[j] + (1 - b2) * g[j] * g[j];
      const float mhat = mi[j] * c1, vhat = vi[j] * c2;
      p[j] -= step * (mhat / (std::sqrt(vhat) + eps) + wd * p[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the CPU model

namespace {

class CpuModel final : public LanguageModel {
 public:
  CpuModel(const ModelConfig& cfg, uint64_t seed) : model_(cfg, seed) {
    opt_.init(tensor_list(model_.weights()));
  }
  const ModelConfig& config() const override { return model_.config(); }
  std::string device() const override { return io::host_cpu(); }
  std::string dtype() const override { return "float32"; }
  double forward(const data::Batch& batch, bool training, uint64_t noise_seed) override {
    return model_.forward(batch, training, noise_seed);
  }
  void backward() override { model_.backward(); }
  double optimizer_step(double lr, const TrainConfig& cfg) override {
    const std::vector<TensorRef> params = tensor_list(model_.weights());
    const std::vector<TensorRef> grads = tensor_list(model_.grads());
    double sq = 0;
    for (const TensorRef& g : grads)
      if (g.trainable)
        for (float x : *g.value) sq += double(x) * double(x);
    const double norm = std::sqrt(sq);
    if (cfg.grad_clip > 0 && norm > cfg.grad_clip) {
      const float scale = float(cfg.grad_clip / norm);
      for (const TensorRef& g : grads)
        for (float& x : *g.value) x *= scale;
    }
    opt_.update(params, grads, lr, cfg);
    model_.update_router_buffers();
    return norm;
  }
  double aux_loss() override { return model_.aux_loss(); }
  const std::vector<float>& token_losses() override { return model_.token_losses(); }
  std::vector<LoadStats> layer_stats() override { return model_.layer_stats(); }
  void add_routing_counts(const std::vector<int32_t>& row_domain, int64_t num_domains,
                          std::vector<std::vector<double>>& counts) override {
    model_.add_routing_counts(row_domain, num_domains, counts);
  }
  StepTimes times() override { return model_.times(); }
  int64_t parameter_count() override { return model_.parameter_count(); }
  Weights& weights() override { return model_.weights(); }
  AdamW& optimizer() override { return opt_; }

 private:
  Transformer model_;
  AdamW opt_;
};

}  // namespace

std::unique_ptr<LanguageModel> make_cpu_model(const ModelConfig& cfg, uint64_t seed) {
  return std::make_unique<CpuModel>(cfg, seed);
}

// ---------------------------------------------------------------------------------------------
// specialisation

double mutual_information(const std::vector<double>& counts, int64_t domains, int64_t experts,
                          double* h_experts) {
  MOE_ASSERT(static_cast<int64_t>(counts.size()) == domains * experts);
  double total = 0;
  std::vector<double> pd(domains, 0.0), pe(experts, 0.0);
  for (int64_t d = 0; d < domains; ++d)
    for (int64_t e = 0; e < experts; ++e) {
      const double n = counts[d * experts + e];
      pd[d] += n;
      pe[e] += n;
      total += n;
    }
  if (h_experts) *h_experts = 0;
  if (total <= 0) return 0;
  double h = 0;
  for (double n : pe)
    if (n > 0) h -= (n / total) * std::log2(n / total);
  if (h_experts) *h_experts = h;
  // I(D;E) = sum_{d,e} p(d,e) log p(d,e) / (p(d) p(e))
  double mi = 0;
  for (int64_t d = 0; d < domains; ++d)
    for (int64_t e = 0; e < experts; ++e) {
      const double n = counts[d * experts + e];
      if (n > 0) mi += (n / total) * std::log2(n * total / (pd[d] * pe[e]));
    }
  return std::max(0.0, mi);
}

// ---------------------------------------------------------------------------------------------
// Trainer

Trainer::Trainer(const TrainConfig& cfg, const data::Corpus& corpus)
    : Trainer(cfg, corpus, make_cpu_model((cfg.validate(), cfg.model), cfg.seed)) {}

Trainer::Trainer(const TrainConfig& cfg, const data::Corpus& corpus,
                 std::unique_ptr<LanguageModel> model)
    : cfg_(cfg), corpus_(corpus), model_(std::move(model)) {
  cfg_.validate();
  MOE_CHECK(model_ != nullptr, "Trainer: no model");
  val_ = data::validation_batches(corpus_, cfg_.val_windows, cfg_.batch, cfg_.model.seq);
  // Fail now, not at the first step, when no domain holds one training window.
  data::train_batch(corpus_, cfg_.seed, 0, 1, cfg_.model.seq);
}

StepRecord Trainer::train_step() {
  const auto t0 = Clock::now();
  const data::Batch batch = data::train_batch(corpus_, cfg_.seed, step_, cfg_.batch, cfg_.model.seq);
  StepRecord rec;
  rec.loss = model_->forward(batch, true, step_noise_seed(cfg_.seed, step_));
  if (!std::isfinite(rec.loss))
    throw Error("training diverged at step " + std::to_string(step_) +
                ": the loss is not finite (try a lower --lr)");
  model_->backward();
  rec.lr = learning_rate(cfg_, step_);
  rec.grad_norm = model_->optimizer_step(rec.lr, cfg_);
  ++step_;

  rec.step = step_;
  rec.aux_loss = model_->aux_loss();
  rec.step_ms = ms_since(t0);
  rec.tokens_per_s = double(cfg_.batch * cfg_.model.seq) / (rec.step_ms / 1000.0);
  const StepTimes times = model_->times();
  rec.attention_ms = times.attention_ms;
  rec.moe_ms = times.moe_ms;
  rec.other_ms = rec.step_ms - rec.attention_ms - rec.moe_ms;
  const std::vector<LoadStats> stats = model_->layer_stats();
  for (const LoadStats& s : stats) {
    const double w = 1.0 / double(stats.size());
    rec.cv += w * s.cv;
    rec.max_violation += w * s.max_violation;
    rec.drop_rate += w * s.drop_rate;
    rec.router_entropy += w * s.router_entropy;
    rec.mean_entropy += w * s.mean_entropy;
  }
  return rec;
}

EvalRecord Trainer::evaluate() {
  const auto t0 = Clock::now();
  const int64_t D = static_cast<int64_t>(corpus_.domains.size());
  EvalRecord ev;
  ev.step = step_;
  std::vector<double> loss_sum(D, 0.0), bytes(D, 0.0);
  for (const data::Batch& b : val_) {
    model_->forward(b, false, 0);
    const std::vector<float>& losses = model_->token_losses();
    for (int64_t t = 0; t < b.batch * b.seq; ++t) {
      const int64_t d = b.domain[t / b.seq];
      loss_sum[d] += losses[t];
      bytes[d] += 1;
    }
    model_->add_routing_counts(b.domain, D, ev.counts);
  }
  const double ln2 = std::numbers::ln2;
  double all_loss = 0, all_bytes = 0;
  for (int64_t d = 0; d < D; ++d) {
    ev.domains.push_back(corpus_.domains[d].name);
    ev.domain_bpb.push_back(loss_sum[d] / bytes[d] / ln2);
    ev.domain_bytes.push_back(bytes[d]);
    all_loss += loss_sum[d];
    all_bytes += bytes[d];
  }
  ev.bpb = all_loss / all_bytes / ln2;
  ev.experts = cfg_.model.layer_config(1).experts;
  for (const std::vector<double>& c : ev.counts) {
    double h = 0;
    const double mi = mutual_information(c, D, ev.experts, &h);
    ev.mi_bits.push_back(mi);
    ev.mi_normalized.push_back(h > 0 ? mi / h : 0.0);
    std::vector<double> load(ev.experts, 0.0);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t e = 0; e < ev.experts; ++e) load[e] += c[d * ev.experts + e];
    double mean = 0, maxv = 0;
    for (double x : load) {
      mean += x / double(ev.experts);
      maxv = std::max(maxv, x);
    }
    ev.max_violation.push_back(mean > 0 ? maxv / mean - 1.0 : 0.0);
  }
  ev.eval_ms = ms_since(t0);
  return ev;
}

// ---------------------------------------------------------------------------------------------
// configuration as JSON

nlohmann::ordered_json config_json(const TrainConfig& cfg) {
  const ModelConfig& m = cfg.model;
  const LayerConfig& f = m.ffn;
  nlohmann::ordered_json j;
  j["model"] = {{"vocab", m.vocab},     {"layers", m.layers}, {"d_model", m.d_model},
                {"heads", m.heads},     {"seq", m.seq},       {"ffn", m.name()}};
  j["ffn"] = {{"router", std::string(name(f.router))},
              {"experts", f.experts},
              {"top_k", f.top_k},
              {"inter", f.inter},
              {"shared_experts", f.shared_experts},
              {"activation", std::string(name(f.activation))},
              {"layout", std::string(name(f.layout))},
              {"capacity_factor", f.capacity_factor},
              {"block_size", f.block_size},
              {"renormalize", f.renormalize},
              {"second_policy", std::string(name(f.second_policy))},
              {"second_threshold", f.second_threshold},
              {"aux_coef", f.aux_coef},
              {"z_coef", f.z_coef},
              {"importance_coef", f.importance_coef},
              {"load_coef", f.load_coef},
              {"noise_epsilon", f.noise_epsilon},
              {"jitter", f.jitter},
              {"slots_per_expert", f.slots_per_expert},
              {"route_scale", f.route_scale},
              {"bias_update_rate", f.bias_update_rate},
              {"iterations", f.iterations}};
  j["train"] = {{"batch", cfg.batch},
                {"steps", cfg.steps},
                {"lr", cfg.lr},
                {"min_lr_fraction", cfg.min_lr_fraction},
                {"warmup", cfg.warmup},
                {"weight_decay", cfg.weight_decay},
                {"beta1", cfg.beta1},
                {"beta2", cfg.beta2},
                {"eps", cfg.eps},
                {"grad_clip", cfg.grad_clip},
                {"eval_every", cfg.eval_every},
                {"val_windows", cfg.val_windows},
                {"seed", cfg.seed}};
  return j;
}

// ---------------------------------------------------------------------------------------------
// the loop

namespace {

nlohmann::ordered_json record(const Trainer& t, const RunOptions& o, const char* kind) {
  nlohmann::ordered_json r = io::result_record(o.command);
  r["kind"] = kind;
  r["run"] = t.config().model.name();
  r["seed"] = t.config().seed;
  r["router"] = t.config().model.description();
  r["device"] = t.model().device();
  r["dtype"] = t.model().dtype();
  return r;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  return v[mid];
}

nlohmann::ordered_json eval_json(const EvalRecord& ev) {
  nlohmann::ordered_json j;
  j["step"] = ev.step;
  j["val_bpb"] = ev.bpb;
  nlohmann::ordered_json per;
  for (size_t d = 0; d < ev.domains.size(); ++d) per[ev.domains[d]] = ev.domain_bpb[d];
  j["val_bpb_domain"] = per;
  j["eval_ms"] = ev.eval_ms;
  return j;
}

}  // namespace

RunSummary run_training(Trainer& trainer, const RunOptions& o) {
  // Bad output paths fail before any work.
  if (!o.jsonl.empty()) io::check_output_path(o.jsonl);
  if (!o.checkpoint.empty()) io::check_output_path(o.checkpoint);
  const bool resumed = !o.resume.empty();
  if (resumed) trainer.load_checkpoint(o.resume);
  const TrainConfig& cfg = trainer.config();
  RunSummary sum;
  sum.parameters = trainer.model().parameter_count();
  if (!o.jsonl.empty()) {
    nlohmann::ordered_json r = record(trainer, o, "config");
    r["config"] = config_json(cfg);
    r["parameters"] = sum.parameters;
    r["start_step"] = trainer.step();
    if (resumed) r["resumed_from"] = o.resume;
    io::append_jsonl(o.jsonl, r);
  }
  auto emit_eval = [&](const EvalRecord& ev) {
    if (o.on_eval) o.on_eval(trainer, ev);
    if (!o.jsonl.empty()) {
      nlohmann::ordered_json r = record(trainer, o, "eval");
      r.update(eval_json(ev));
      io::append_jsonl(o.jsonl, r);
    }
    sum.final_eval = ev;
  };
  std::vector<double> step_ms, attention_ms, moe_ms, other_ms;
  bool have_eval = false;
  if (!resumed || trainer.done()) {
    emit_eval(trainer.evaluate());
    have_eval = true;
  }
  while (!trainer.done()) {
    const StepRecord s = trainer.train_step();
    ++sum.steps;
    sum.train_seconds += s.step_ms / 1000.0;
    step_ms.push_back(s.step_ms);
    attention_ms.push_back(s.attention_ms);
    moe_ms.push_back(s.moe_ms);
    other_ms.push_back(s.other_ms);
    sum.final_loss = s.loss;
    if (o.on_step) o.on_step(trainer, s);
    if (!o.jsonl.empty()) {
      nlohmann::ordered_json r = record(trainer, o, "step");
      r["step"] = s.step;
      r["loss"] = s.loss;
      r["aux_loss"] = s.aux_loss;
      r["lr"] = s.lr;
      r["grad_norm"] = s.grad_norm;
      r["tokens_per_s"] = s.tokens_per_s;
      r["time_ms"] = {{"step", s.step_ms}, {"attention", s.attention_ms}, {"moe", s.moe_ms},
                      {"other", s.other_ms}};
      r["load"] = {{"cv", s.cv},
                   {"max_violation", s.max_violation},
                   {"drop_rate", s.drop_rate},
                   {"router_entropy", s.router_entropy},
                   {"mean_entropy", s.mean_entropy}};
      io::append_jsonl(o.jsonl, r);
    }
    const bool eval_now =
        trainer.done() || (cfg.eval_every > 0 && trainer.step() % cfg.eval_every == 0);
    if (eval_now) {
      emit_eval(trainer.evaluate());
      have_eval = true;
      if (!o.checkpoint.empty()) trainer.save_checkpoint(o.checkpoint);
    }
  }
  if (!have_eval) emit_eval(trainer.evaluate());
  if (sum.steps > 0) {
    const double tokens = double(cfg.batch * cfg.model.seq);
    sum.mean_tokens_per_s = double(sum.steps) * tokens / sum.train_seconds;
    sum.step_ms = median(step_ms);
    sum.tokens_per_s = tokens / (sum.step_ms / 1000.0);
    sum.attention_ms = median(attention_ms);
    sum.moe_ms = median(moe_ms);
    sum.other_ms = median(other_ms);
  }
  if (!o.jsonl.empty()) {
    const EvalRecord& ev = sum.final_eval;
    nlohmann::ordered_json r = record(trainer, o, "summary");
    r.update(eval_json(ev));
    r["config"] = config_json(cfg);
    r["parameters"] = sum.parameters;
    r["steps_run"] = sum.steps;
    r["train_seconds"] = sum.train_seconds;
    r["tokens_per_s"] = sum.tokens_per_s;
    r["mean_tokens_per_s"] = sum.mean_tokens_per_s;
    r["final_train_loss"] = sum.final_loss;
    r["time_ms_per_step"] = {{"median_step", sum.step_ms}, {"attention", sum.attention_ms},
                             {"moe", sum.moe_ms}, {"other", sum.other_ms}};
    double mi_mean = 0;
    for (double v : ev.mi_normalized) mi_mean += v / double(ev.mi_normalized.size());
    r["experts"] = ev.experts;
    r["mi_domain_expert_bits"] = ev.mi_bits;
    r["mi_domain_expert_normalized"] = ev.mi_normalized;
    r["mi_domain_expert_normalized_mean"] = mi_mean;
    r["val_max_violation"] = ev.max_violation;
    r["val_routing_counts"] = ev.counts;
    r["domains"] = ev.domains;
    io::append_jsonl(o.jsonl, r);
  }
  return sum;
}

}  // namespace moe::model
