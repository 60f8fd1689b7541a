// Tests of the small LM as a whole: its gradient (directional central differences in float, per
// tensor), the causal routing groups of soft MoE and expert choice, a short training run on the
// fixture text, checkpoint save -> resume giving a bitwise-identical continuation, and the refusal
// of truncated, altered or mismatched checkpoints.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "moe/check.hpp"
#include "moe/data.hpp"
#include "moe/model/train.hpp"
#include "moe/model/transformer.hpp"

namespace moe::model {
namespace {

namespace fs = std::filesystem;

std::string fixture_text(const char* file) {
  const fs::path p = fs::path(__FILE__).parent_path().parent_path() / "data" / "corpus" / file;
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The fixture files as a three-domain corpus. Devil's entries are cut by line here (the fixture
// holds too few paragraphs to have a validation one); sayings by record.
const data::Corpus& fixture_corpus() {
  static const data::Corpus c = [] {
    data::Corpus corpus;
    corpus.origin = "fixture";
    const std::pair<const char*, data::DocumentRule> files[] = {
        {"kjv", data::DocumentRule::line},
        {"devil", data::DocumentRule::line},
        {"sayings", data::DocumentRule::record}};
    for (const auto& [domain, rule] : files) {
      data::Domain d;
      d.name = domain;
      data::split_documents(fixture_text((std::string(domain) + ".txt").c_str()), rule, d);
      corpus.domains.push_back(std::move(d));
    }
    return corpus;
  }();
  return c;
}

ModelConfig tiny_model(Router router, FfnKind kind = FfnKind::moe) {
  ModelConfig m;
  m.layers = 2;
  m.d_model = 16;
  m.heads = 2;
  m.seq = 8;
  m.ffn_kind = kind;
  m.ffn.router = router;
  m.ffn.experts = 4;
  m.ffn.top_k = router == Router::switch_top1 ? 1 : 2;
  m.ffn.inter = 8;
  m.ffn.activation = Activation::gelu;
  return m;
}

TrainConfig tiny_training(Router router, FfnKind kind = FfnKind::moe) {
  TrainConfig t;
  t.model = tiny_model(router, kind);
  t.batch = 4;
  t.steps = 6;
  t.lr = 1e-2;
  t.warmup = 2;
  t.eval_every = 3;
  t.val_windows = 2;
  t.seed = 11;
  return t;
}

// A file name unique to the running test and process (ctest may run tests in parallel).
struct TempFile {
  fs::path path;
  explicit TempFile(const std::string& tag) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    path = fs::temp_directory_path() /
           ("moe_test_" + tag + "_" + name + "_" + std::to_string(::getpid()) + ".ckpt");
    fs::remove(path);
  }
  ~TempFile() { fs::remove(path); }
};

std::string router_label(const ::testing::TestParamInfo<Router>& info) {
  return std::string(name(info.param));
}

// ---------------------------------------------------------------------------------------------
// gradient of the whole model

class ModelGradient : public ::testing::TestWithParam<FfnKind> {};

TEST_P(ModelGradient, EveryTensorMatchesADirectionalCentralDifference) {
  // f = mean cross-entropy + aux loss, in float. Along a random unit direction u per tensor,
  // (f(w + h u) - f(w - h u)) / 2h must match <grad, u>. Float forward noise (~1e-6 of f) bounds
  // the numeric side, hence h = 1e-2 and a loose tolerance; wiring mistakes are off by O(1).
  const FfnKind kind = GetParam();
  const Router router = kind == FfnKind::moe ? Router::soft_moe : Router::softmax_topk;
  Transformer model(tiny_model(router, kind), 5);
  const data::Batch batch = data::train_batch(fixture_corpus(), 3, 0, 3, 8);
  auto f = [&] { return model.forward(batch, false, 0) + model.aux_loss(); };
  f();
  model.backward();
  std::vector<TensorRef> w = tensor_list(model.weights());
  const std::vector<TensorRef> g = tensor_list(model.grads());
  std::mt19937_64 gen(9);
  std::normal_distribution<double> normal;
  for (size_t t = 0; t < w.size(); ++t) {
    if (!w[t].trainable) continue;
    std::vector<float>& p = *w[t].value;
    std::vector<double> u(p.size());
    double norm = 0;
    for (double& x : u) {
      x = normal(gen);
      norm += x * x;
    }
    double analytic = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      u[i] /= std::sqrt(norm);
      analytic += u[i] * (*g[t].value)[i];
    }
    const std::vector<float> saved = p;
    constexpr double h = 1e-2;
    for (size_t i = 0; i < p.size(); ++i) p[i] = float(saved[i] + h * u[i]);
    const double up = f();
    for (size_t i = 0; i < p.size(); ++i) p[i] = float(saved[i] - h * u[i]);
    const double down = f();
    p = saved;
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(analytic, numeric, 2e-3 + 3e-2 * std::fabs(numeric)) << w[t].name;
  }
}

INSTANTIATE_TEST_SUITE_P(Ffn, ModelGradient,
                         ::testing::Values(FfnKind::dense_active, FfnKind::moe),
                         [](const ::testing::TestParamInfo<FfnKind>& i) {
                           return i.param == FfnKind::moe ? std::string("soft_moe_grouped")
                                                          : std::string("dense");
                         });

// ---------------------------------------------------------------------------------------------
// routing groups

class CausalRouting : public ::testing::TestWithParam<Router> {};

TEST_P(CausalRouting, ChangingALaterTokenLeavesEarlierLossesUnchanged) {
  // Soft MoE and expert choice mix the tokens of one call: they are causal only because each call
  // holds one position of every sequence. Token choice (dropless) is causal by construction.
  Transformer model(tiny_model(GetParam()), 8);
  data::Batch batch = data::train_batch(fixture_corpus(), 4, 0, 4, 8);
  model.forward(batch, false, 0);
  const std::vector<float> before = model.token_losses();
  const int64_t changed_position = 5;
  batch.inputs[1 * 8 + changed_position] ^= 0x15;
  model.forward(batch, false, 0);
  const std::vector<float> after = model.token_losses();
  for (int64_t b = 0; b < batch.batch; ++b)
    for (int64_t s = 0; s < changed_position; ++s)
      EXPECT_EQ(before[b * 8 + s], after[b * 8 + s]) << "row " << b << " position " << s;
  EXPECT_NE(before[1 * 8 + changed_position], after[1 * 8 + changed_position]);
}

INSTANTIATE_TEST_SUITE_P(Routers, CausalRouting,
                         ::testing::Values(Router::soft_moe, Router::expert_choice,
                                           Router::softmax_topk),
                         router_label);

TEST(ModelConfig, GroupedRoutersNameTheirAdaptation) {
  EXPECT_EQ(tiny_model(Router::soft_moe).description(),
            "soft_moe (groups across the batch at each position)");
  EXPECT_EQ(tiny_model(Router::expert_choice).description(),
            "expert_choice (groups across the batch at each position)");
  EXPECT_EQ(tiny_model(Router::softmax_topk).description(), "softmax_topk");
}

TEST(ModelConfig, DenseBaselinesMatchActiveFlopsOrTotalParameters) {
  const ModelConfig active = tiny_model(Router::softmax_topk, FfnKind::dense_active);
  const ModelConfig params = tiny_model(Router::softmax_topk, FfnKind::dense_params);
  EXPECT_EQ(active.layer_config(8).experts, 1);
  EXPECT_EQ(active.layer_config(8).top_k, 1);
  EXPECT_EQ(active.layer_config(8).inter, 2 * 8);   // K * I
  EXPECT_EQ(params.layer_config(8).inter, 4 * 8);   // E * I
  EXPECT_EQ(params.layer_config(8).resolved_aux_coef(), 0.0);
  // dense_params has the MoE's expert parameters exactly (the MoE adds only its router).
  Transformer moe(tiny_model(Router::softmax_topk), 1), dense(params, 1);
  EXPECT_EQ(moe.parameter_count() - dense.parameter_count(),
            2 * (16 * 4 - 16 * 1));  // per layer: router H*E minus the dense layer's H*1
}

// ---------------------------------------------------------------------------------------------
// training

TEST(Training, AFewStepsOnTheFixtureMakeTheLossFall) {
  TrainConfig cfg = tiny_training(Router::softmax_topk);
  cfg.model.d_model = 32;
  cfg.model.seq = 16;
  cfg.batch = 8;
  cfg.steps = 40;
  cfg.lr = 1e-2;
  cfg.warmup = 5;
  Trainer t(cfg, fixture_corpus());
  const EvalRecord start = t.evaluate();
  EXPECT_NEAR(start.bpb, 8.0, 0.2);  // about uniform over 256 bytes at initialisation
  double first_loss = 0, last_loss = 0;
  while (!t.done()) {
    const StepRecord s = t.train_step();
    if (s.step == 1) first_loss = s.loss;
    last_loss = s.loss;
  }
  const EvalRecord end = t.evaluate();
  EXPECT_LT(last_loss, first_loss - 1.5);
  EXPECT_LT(end.bpb, start.bpb - 2.0);
  ASSERT_EQ(end.domain_bpb.size(), 3u);
  ASSERT_EQ(end.mi_normalized.size(), 2u);
  for (double v : end.mi_normalized) {
    EXPECT_GE(v, 0.0);
    EXPECT_LE(v, 1.0);
  }
}

TEST(Training, MutualInformationIsZeroForIndependentAndFullForAPartition) {
  double h = 0;
  EXPECT_NEAR(mutual_information({5, 5, 5, 5}, 2, 2, &h), 0.0, 1e-12);
  EXPECT_NEAR(h, 1.0, 1e-12);
  EXPECT_NEAR(mutual_information({8, 0, 0, 8}, 2, 2, &h), 1.0, 1e-12);  // I = H(E) = 1 bit
  EXPECT_NEAR(mutual_information({3, 0, 0, 0}, 2, 2, &h), 0.0, 1e-12);
  EXPECT_EQ(h, 0.0);
}

TEST(Training, ScheduleWarmsUpThenDecaysToTheFloor) {
  TrainConfig cfg;
  cfg.lr = 1.0;
  cfg.warmup = 10;
  cfg.steps = 110;
  cfg.min_lr_fraction = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 10), 1.0);
  EXPECT_NEAR(learning_rate(cfg, 60), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(cfg, 110), 0.1, 1e-12);
}

// ---------------------------------------------------------------------------------------------
// checkpoints

void expect_same_state(Trainer& a, Trainer& b) {
  const auto ta = tensor_list(a.model().weights());
  const auto tb = tensor_list(b.model().weights());
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) {
    ASSERT_EQ(ta[i].value->size(), tb[i].value->size()) << ta[i].name;
    EXPECT_EQ(std::memcmp(ta[i].value->data(), tb[i].value->data(),
                          ta[i].value->size() * sizeof(float)),
              0)
        << ta[i].name << " differs";
  }
  ASSERT_EQ(a.optimizer().m.size(), b.optimizer().m.size());
  for (size_t i = 0; i < a.optimizer().m.size(); ++i) {
    EXPECT_EQ(a.optimizer().m[i], b.optimizer().m[i]) << "AdamW m of trainable tensor " << i;
    EXPECT_EQ(a.optimizer().v[i], b.optimizer().v[i]) << "AdamW v of trainable tensor " << i;
  }
  EXPECT_EQ(a.step(), b.step());
}

class Checkpoint : public ::testing::TestWithParam<Router> {};

TEST_P(Checkpoint, ResumeContinuesBitwiseLikeAnUninterruptedRun) {
  const TrainConfig cfg = tiny_training(GetParam());
  TempFile file("resume");
  Trainer straight(cfg, fixture_corpus());
  std::vector<double> straight_losses;
  while (!straight.done()) straight_losses.push_back(straight.train_step().loss);

  Trainer first(cfg, fixture_corpus());
  for (int i = 0; i < 3; ++i) first.train_step();
  first.evaluate();  // evaluation must not disturb the state
  first.save_checkpoint(file.path.string());

  Trainer resumed(cfg, fixture_corpus());
  resumed.load_checkpoint(file.path.string());
  EXPECT_EQ(resumed.step(), 3);
  std::vector<double> resumed_losses;
  while (!resumed.done()) resumed_losses.push_back(resumed.train_step().loss);
  ASSERT_EQ(resumed_losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed_losses[i], straight_losses[3 + i]) << i;
  expect_same_state(straight, resumed);
  if (GetParam() == Router::sigmoid_bias) {  // the bias buffer moved and was carried over
    const auto& bias = straight.model().weights().blocks[0].ffn.expert_bias;
    bool moved = false;
    for (float b : bias) moved = moved || b != 0.0f;
    EXPECT_TRUE(moved);
  }
}

INSTANTIATE_TEST_SUITE_P(Routers, Checkpoint,
                         ::testing::Values(Router::sigmoid_bias, Router::noisy_topk,
                                           Router::switch_top1, Router::soft_moe),
                         router_label);

std::string refusal(Trainer& t, const fs::path& path) {
  try {
    t.load_checkpoint(path.string());
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(Checkpoint, CorruptTruncatedOrMismatchedFilesAreRefusedWithOneLine) {
  const TrainConfig cfg = tiny_training(Router::softmax_topk);
  TempFile file("good"), bad("bad");
  Trainer t(cfg, fixture_corpus());
  t.train_step();
  t.save_checkpoint(file.path.string());
  std::string bytes;
  {
    std::ifstream in(file.path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write_bad = [&](const std::string& content) {
    std::ofstream out(bad.path, std::ios::binary | std::ios::trunc);
    out << content;
  };
  auto expect_refused = [&](const std::string& what, const std::string& expected) {
    Trainer fresh(cfg, fixture_corpus());
    const std::string msg = refusal(fresh, bad.path);
    EXPECT_NE(msg.find(expected), std::string::npos) << what << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << what << ": " << msg;
  };

  write_bad(bytes.substr(0, bytes.size() - 100));
  expect_refused("truncated", "corrupt or truncated");
  write_bad(bytes.substr(0, 12));
  expect_refused("cut inside the header", "truncated");
  write_bad("");
  expect_refused("empty", "not a moe-bench checkpoint");
  std::string magic = bytes;
  magic[0] = 'X';
  write_bad(magic);
  expect_refused("wrong magic", "not a moe-bench checkpoint");
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x40;
  write_bad(flipped);
  expect_refused("one flipped bit", "checksum mismatch");

  TrainConfig other = cfg;
  other.model.ffn.experts = 8;
  Trainer mismatched(other, fixture_corpus());
  const std::string msg = refusal(mismatched, file.path);
  EXPECT_NE(msg.find("does not match this run: ffn.experts is 4 in the checkpoint, 8 here"),
            std::string::npos)
      << msg;

  TrainConfig longer = cfg;  // more steps: allowed (the schedule's end moves)
  longer.steps = 12;
  Trainer extended(longer, fixture_corpus());
  EXPECT_NO_THROW(extended.load_checkpoint(file.path.string()));
  EXPECT_EQ(extended.step(), 1);
}

TEST(Training, TheRunLoopWritesEveryRecordKindAndResumesFromItsCheckpoint) {
  TrainConfig cfg = tiny_training(Router::soft_moe);
  TempFile ckpt("loop"), jsonl("loop_jsonl");
  {
    Trainer t(cfg, fixture_corpus());
    RunOptions o;
    o.command = "test";
    o.checkpoint = ckpt.path.string();
    o.jsonl = jsonl.path.string();
    int evals = 0;
    o.on_eval = [&](const Trainer&, const EvalRecord&) { ++evals; };
    const RunSummary sum = run_training(t, o);
    EXPECT_EQ(sum.steps, 6);
    EXPECT_EQ(evals, 3);  // start, step 3, step 6
    EXPECT_EQ(sum.final_eval.step, 6);
  }
  std::map<std::string, int> kinds;
  {
    std::ifstream in(jsonl.path);
    for (std::string line; std::getline(in, line);) {
      const auto r = nlohmann::json::parse(line);
      kinds[r.at("kind").get<std::string>()]++;
      EXPECT_EQ(r.at("router"), "soft_moe (groups across the batch at each position)");
      if (r.at("kind") == "summary") {
        EXPECT_EQ(r.at("mi_domain_expert_normalized").size(), 2u);
        EXPECT_EQ(r.at("val_bpb_domain").size(), 3u);
        EXPECT_TRUE(r.contains("time_ms_per_step"));
      }
      if (r.at("kind") == "step") {
        EXPECT_TRUE(r.at("time_ms").contains("moe"));
        EXPECT_TRUE(r.at("load").contains("max_violation"));
      }
    }
  }
  EXPECT_EQ(kinds["config"], 1);
  EXPECT_EQ(kinds["step"], 6);
  EXPECT_EQ(kinds["eval"], 3);
  EXPECT_EQ(kinds["summary"], 1);

  TrainConfig longer = cfg;
  longer.steps = 9;
  Trainer t(longer, fixture_corpus());
  RunOptions o;
  o.resume = ckpt.path.string();
  int evals = 0;
  o.on_eval = [&](const Trainer&, const EvalRecord&) { ++evals; };
  const RunSummary sum = run_training(t, o);
  EXPECT_EQ(sum.steps, 3);  // 6 -> 9, no evaluation at the start of a resumed run
  EXPECT_EQ(evals, 1);
  EXPECT_EQ(t.step(), 9);
}

TEST(Checkpoint, IsWrittenAtomically) {
  const TrainConfig cfg = tiny_training(Router::softmax_topk);
  TempFile file("atomic");
  Trainer t(cfg, fixture_corpus());
  t.save_checkpoint(file.path.string());
  for (const auto& entry : fs::directory_iterator(file.path.parent_path()))
    EXPECT_EQ(entry.path().string().find(file.path.string() + ".tmp"), std::string::npos)
        << "temporary file left behind: " << entry.path();
  EXPECT_THROW(t.save_checkpoint("/nonexistent-dir/x.ckpt"), ConfigError);
}

}  // namespace
}  // namespace moe::model
