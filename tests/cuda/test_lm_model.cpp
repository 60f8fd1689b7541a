// The GPU language model (include/moe/cuda/lm/model.hpp) against the CPU Transformer it mirrors:
// the same initial weights and batches must give the same loss, auxiliary loss, gradient norm and
// training trajectory up to bf16 arithmetic, for every router the GPU model runs; and the GPU
// model must be bitwise reproducible, including across a save/restore of its state (checkpoints).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cuda_test_util.hpp"
#include "moe/check.hpp"
#include "moe/cuda/lm/layers.hpp"
#include "moe/cuda/lm/model.hpp"
#include "moe/model/train.hpp"
#include "moe/rng.hpp"

namespace moe::test {
namespace {

using model::FfnKind;
using model::ModelConfig;
using model::TrainConfig;

enum class Kind {
  softmax_topk,
  noisy_topk,
  switch_top1,
  sigmoid_bias,
  chain_of_experts,
  expert_choice,
  soft_moe,
  dense_active
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::softmax_topk: return "softmax_topk";
    case Kind::noisy_topk: return "noisy_topk";
    case Kind::switch_top1: return "switch_top1";
    case Kind::sigmoid_bias: return "sigmoid_bias";
    case Kind::chain_of_experts: return "chain_of_experts";
    case Kind::expert_choice: return "expert_choice";
    case Kind::soft_moe: return "soft_moe";
    case Kind::dense_active: return "dense_active";
  }
  return "?";
}

// heads = 2: head size 32, the fused attention kernels; heads = 4 (head size 16): the cuBLAS path.
TrainConfig tiny_config(Kind kind, int64_t heads = 2) {
  TrainConfig c;
  c.model.layers = 2;
  c.model.d_model = 64;
  c.model.heads = heads;
  c.model.seq = 48;
  c.model.ffn.experts = 8;
  c.model.ffn.top_k = 2;
  c.model.ffn.inter = 96;
  switch (kind) {
    case Kind::softmax_topk: c.model.ffn.router = Router::softmax_topk; break;
    case Kind::noisy_topk: c.model.ffn.router = Router::noisy_topk; break;
    case Kind::switch_top1:
      c.model.ffn.router = Router::switch_top1;
      c.model.ffn.top_k = 1;
      break;
    case Kind::sigmoid_bias:
      c.model.ffn.router = Router::sigmoid_bias;
      c.model.ffn.bias_update_rate = 1e-2;  // large enough that the buffer visibly moves
      break;
    case Kind::chain_of_experts:  // two iterations of two experts from the shared pool of 8
      c.model.ffn.router = Router::chain_of_experts;
      c.model.ffn.top_k = 4;
      c.model.ffn.iterations = 2;
      break;
    case Kind::expert_choice:  // per position over the 6 rows: C = ceil(2 * 6 / 8) = 2
      c.model.ffn.router = Router::expert_choice;
      c.model.ffn.capacity_factor = 2.0;
      break;
    case Kind::soft_moe:  // per position over the 6 rows: 16 slots, two per expert
      c.model.ffn.router = Router::soft_moe;
      c.model.ffn.slots_per_expert = 2;
      break;
    case Kind::dense_active: c.model.ffn_kind = FfnKind::dense_active; break;
  }
  c.batch = 6;
  c.steps = 12;
  c.lr = 3e-3;
  c.warmup = 2;
  return c;
}

// Random byte batches (not the corpus: the test needs no files); row b of step s.
data::Batch random_batch(int64_t B, int64_t S, uint64_t step) {
  data::Batch b;
  b.batch = B;
  b.seq = S;
  b.inputs.resize(B * S);
  b.targets.resize(B * S);
  b.domain.assign(B, 0);
  // Bytes from a skewed distribution (the low 64 values four times as likely) so that the
  // model has something to learn within a few steps.
  for (int64_t i = 0; i < B * S; ++i) {
    const uint64_t r = splitmix64(splitmix64(step * 1000003 + 17) ^ uint64_t(i));
    b.inputs[i] = int32_t(r % 4 == 0 ? (r >> 8) % 256 : (r >> 8) % 64);
  }
  for (int64_t i = 0; i < B * S; ++i)
    b.targets[i] = (i + 1) % S == 0 ? b.inputs[i] : b.inputs[i + 1];
  return b;
}

struct Trajectory {
  std::vector<double> loss, aux, grad_norm;
};

Trajectory train(model::LanguageModel& m, const TrainConfig& cfg, int64_t steps,
                 int64_t first_step = 0) {
  Trajectory t;
  for (int64_t s = first_step; s < first_step + steps; ++s) {
    t.loss.push_back(m.forward(random_batch(cfg.batch, cfg.model.seq, s), true, 1000 + s));
    m.backward();
    t.grad_norm.push_back(m.optimizer_step(model::learning_rate(cfg, s), cfg));
    t.aux.push_back(m.aux_loss());
  }
  return t;
}

// Loss, auxiliary loss and gradient norm of the first step (same weights, same batch) agree to
// bf16 accuracy; over 12 AdamW steps the two trajectories stay together (a wrong gradient
// anywhere makes the GPU's loss fall slower or diverge, which these bounds catch) and both learn.
void expect_trains_like_the_cpu_model(Kind kind, const TrainConfig& cfg) {
  std::unique_ptr<model::LanguageModel> cpu = model::make_cpu_model(cfg.model, 3);
  std::unique_ptr<model::LanguageModel> gpu = cuda::lm::make_gpu_model(cfg.model, 3, cfg.batch);
  ASSERT_EQ(gpu->parameter_count(), cpu->parameter_count());
  EXPECT_EQ(gpu->config().description(), cpu->config().description());
  const Trajectory a = train(*cpu, cfg, cfg.steps), b = train(*gpu, cfg, cfg.steps);
  // First step: identical weights; differences are bf16 rounding of activations and weights.
  EXPECT_NEAR(b.loss[0], a.loss[0], 2e-3 * a.loss[0]) << "first-step loss";
  EXPECT_NEAR(b.aux[0], a.aux[0], 2e-2 * std::abs(a.aux[0]) + 1e-5) << "first-step aux loss";
  EXPECT_NEAR(b.grad_norm[0], a.grad_norm[0], 3e-2 * a.grad_norm[0]) << "first-step gradient norm";
  for (size_t s = 0; s < a.loss.size(); ++s) {
    EXPECT_TRUE(std::isfinite(b.loss[s]));
    EXPECT_NEAR(b.loss[s], a.loss[s], 1.5e-2 * a.loss[s]) << "loss at step " << s;
  }
  EXPECT_LT(a.loss.back(), a.loss.front() - 0.15) << "the CPU model should learn";
  EXPECT_LT(b.loss.back(), b.loss.front() - 0.15) << "the GPU model should learn";
  // Evaluation forwards (another batch size: the evaluation layers) agree too.
  const data::Batch eval = random_batch(2, cfg.model.seq, 999);
  const double ea = cpu->forward(eval, false, 0), eb = gpu->forward(eval, false, 0);
  EXPECT_NEAR(eb, ea, 1.5e-2 * ea) << "evaluation loss";
  ASSERT_EQ(gpu->token_losses().size(), size_t(2 * cfg.model.seq));
  // Routed choices are counted exactly; soft MoE counts combine masses (each token's sums to 1
  // in float), so its totals agree to float rounding, and per domain to the bf16 trajectory.
  const bool masses = kind == Kind::soft_moe;
  std::vector<std::vector<double>> ca, cb;
  std::vector<int32_t> domains = {0, 1};
  cpu->add_routing_counts(domains, 2, ca);
  gpu->add_routing_counts(domains, 2, cb);
  ASSERT_EQ(ca.size(), cb.size());
  for (size_t l = 0; l < ca.size(); ++l) {
    ASSERT_EQ(ca[l].size(), cb[l].size());
    double ta = 0, tb = 0;
    for (size_t i = 0; i < ca[l].size(); ++i) ta += ca[l][i], tb += cb[l][i];
    if (masses) {
      EXPECT_NEAR(tb, ta, 1e-4 * ta) << "combine mass in layer " << l;
      for (int d = 0; d < 2; ++d) {  // each domain (batch row) holds seq tokens
        double da = 0, db = 0;
        for (size_t e = 0; e < ca[l].size() / 2; ++e)
          da += ca[l][d * ca[l].size() / 2 + e], db += cb[l][d * cb[l].size() / 2 + e];
        EXPECT_NEAR(db, da, 1e-4 * da) << "combine mass of domain " << d << ", layer " << l;
      }
    } else {
      EXPECT_EQ(ta, tb) << "routed choices in layer " << l;
    }
  }
  // Statistics of the evaluation forward: the same number of routed choices per layer; entropies
  // and the share of tokens without an expert close (the weights went 12 steps apart in bf16).
  // The layer tests check each statistic against the CPU on equal weights.
  const std::vector<LoadStats> sa = cpu->layer_stats(), sb = gpu->layer_stats();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t l = 0; l < sa.size(); ++l) {
    double na = 0, nb = 0;
    for (double v : sa[l].tokens_per_expert) na += v;
    for (double v : sb[l].tokens_per_expert) nb += v;
    if (masses)
      EXPECT_NEAR(nb, na, 1e-4 * na) << "tokens_per_expert summed, layer " << l;
    else
      EXPECT_EQ(na, nb) << "tokens_per_expert summed, layer " << l;
    EXPECT_NEAR(sb[l].router_entropy, sa[l].router_entropy, 5e-2 * sa[l].router_entropy + 1e-3)
        << "router entropy, layer " << l;
    EXPECT_NEAR(sb[l].mean_entropy, sa[l].mean_entropy, 5e-2 * sa[l].mean_entropy + 1e-3)
        << "mean entropy, layer " << l;
    EXPECT_NEAR(sb[l].tokens_without_expert, sa[l].tokens_without_expert, 0.1)
        << "tokens without an expert, layer " << l;
  }
  if (kind == Kind::sigmoid_bias) {
    const auto& ba = cpu->weights().blocks[0].ffn.expert_bias;
    const auto& bb = gpu->weights().blocks[0].ffn.expert_bias;
    double moved = 0;
    for (float x : bb) moved += std::abs(x);
    EXPECT_GT(moved, 0.0) << "the GPU's selection bias never moved";
    ASSERT_EQ(ba.size(), bb.size());
  }
}

class LmModelParity : public ::testing::TestWithParam<Kind> {};

TEST_P(LmModelParity, TrainsLikeTheCpuModel) {
  MOE_REQUIRE_GPU();
  expect_trains_like_the_cpu_model(GetParam(), tiny_config(GetParam()));
}

// The attention fallback for head sizes the fused kernels do not take.
TEST(LmModelParityCublasAttention, TrainsLikeTheCpuModel) {
  MOE_REQUIRE_GPU();
  expect_trains_like_the_cpu_model(Kind::softmax_topk, tiny_config(Kind::softmax_topk, 4));
}

// The weights the GPU model hands back (checkpoints) are the CPU model's initial ones, bit for
// bit, and other expert shapes and activations train like the CPU model: I not a multiple of 32
// (the fused kernels' blocked gate/up order needs one), GELU experts.
TEST(LmModelParityShapes, WeightsComeBackAsTheCpuModelDrewThem) {
  MOE_REQUIRE_GPU();
  const TrainConfig cfg = tiny_config(Kind::softmax_topk);
  auto cpu = model::make_cpu_model(cfg.model, 3);
  auto gpu = cuda::lm::make_gpu_model(cfg.model, 3, cfg.batch);
  const auto a = model::tensor_list(cpu->weights()), b = model::tensor_list(gpu->weights());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(*a[i].value == *b[i].value) << a[i].name;
}

TEST(LmModelParityShapes, InterNotAMultipleOf32TrainsLikeTheCpuModel) {
  MOE_REQUIRE_GPU();
  TrainConfig cfg = tiny_config(Kind::softmax_topk);
  cfg.model.ffn.inter = 72;
  expect_trains_like_the_cpu_model(Kind::softmax_topk, cfg);
}

TEST(LmModelParityShapes, GeluExpertsTrainLikeTheCpuModel) {
  MOE_REQUIRE_GPU();
  TrainConfig cfg = tiny_config(Kind::chain_of_experts);
  cfg.model.ffn.activation = Activation::gelu;
  expect_trains_like_the_cpu_model(Kind::chain_of_experts, cfg);
}

// The dense baselines run as cuBLAS GEMMs around the activation: GELU and the dense_params size.
TEST(LmModelParityDense, GeluDenseParamsTrainsLikeTheCpuModel) {
  MOE_REQUIRE_GPU();
  TrainConfig cfg = tiny_config(Kind::dense_active);
  cfg.model.ffn_kind = FfnKind::dense_params;
  cfg.model.ffn.activation = Activation::gelu;
  expect_trains_like_the_cpu_model(Kind::dense_active, cfg);
}

// Two GPU runs give the same bits; saving the state after k steps into a fresh model and
// continuing gives the same bits as the uninterrupted run (what a checkpoint resume relies on).
// The fresh model starts with zero gradient buffers, the uninterrupted one with the last step's:
// the expert weight gradients, written rather than zeroed and added to, must not depend on them.
TEST_P(LmModelParity, GpuRunsAreBitwiseReproducibleAcrossARestore) {
  MOE_REQUIRE_GPU();
  const TrainConfig cfg = tiny_config(GetParam());
  auto a = cuda::lm::make_gpu_model(cfg.model, 5, cfg.batch);
  auto b = cuda::lm::make_gpu_model(cfg.model, 5, cfg.batch);
  const Trajectory ta = train(*a, cfg, 6);
  const Trajectory tb1 = train(*b, cfg, 3);
  // Copy b's state into a fresh model c (weights, buffers, AdamW moments), continue there.
  auto c = cuda::lm::make_gpu_model(cfg.model, 77, cfg.batch);  // other initial weights
  {
    const model::Weights w = b->weights();
    const model::AdamW o = b->optimizer();
    c->weights() = w;
    c->optimizer() = o;
    c->state_written();
  }
  const Trajectory tc = train(*c, cfg, 3, 3);
  for (int s = 0; s < 3; ++s) EXPECT_EQ(ta.loss[s], tb1.loss[s]) << "step " << s;
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(ta.loss[3 + s], tc.loss[s]) << "step " << 3 + s << " after the restore";
    EXPECT_EQ(ta.grad_norm[3 + s], tc.grad_norm[s]) << "step " << 3 + s << " after the restore";
  }
}

INSTANTIATE_TEST_SUITE_P(Routers, LmModelParity,
                         ::testing::Values(Kind::softmax_topk, Kind::noisy_topk, Kind::switch_top1,
                                           Kind::sigmoid_bias, Kind::chain_of_experts,
                                           Kind::expert_choice, Kind::soft_moe,
                                           Kind::dense_active),
                         [](const auto& info) { return std::string(kind_name(info.param)); });

// The dense baselines' FFN weight gradients are written by the GEMM (beta = 0) rather than added
// to a zeroed buffer: from a NaN-poisoned buffer they equal the accumulated ones from zero, and
// an empty batch writes zeros.
TEST(LmModelDenseGradients, MatmulBackwardWritesTheWeightGradientOverWhatWasThere) {
  MOE_REQUIRE_GPU();
  const int64_t N = 300, C = 64, OC = 96;
  using cuda::lm::bf16;
  DeviceArray<bf16> inp(to_device_type<bf16>(random_vector<float>(N * C, 1)));
  DeviceArray<bf16> dout(to_device_type<bf16>(random_vector<float>(N * OC, 2)));
  DeviceArray<bf16> weight(to_device_type<bf16>(random_vector<float>(C * OC, 3, 0.2)));
  DeviceArray<float> fresh(size_t(C * OC)), summed(size_t(C * OC));
  DeviceArray<uint8_t> scratch(cuda::lm::matmul_scratch_bytes(N, OC));
  cublasHandle_t handle = nullptr;
  MOE_CUBLAS_CHECK(cublasCreate(&handle));
  fresh.poison();
  summed.upload(std::vector<float>(size_t(C * OC), 0.0f));
  cuda::lm::matmul_backward<bf16>(handle, nullptr, fresh.get(), nullptr, dout.get(), inp.get(),
                                  weight.get(), N, C, OC, scratch.get(), nullptr, false);
  cuda::lm::matmul_backward<bf16>(handle, nullptr, summed.get(), nullptr, dout.get(), inp.get(),
                                  weight.get(), N, C, OC, scratch.get(), nullptr, true);
  const std::vector<float> a = fresh.download(), b = summed.download();
  double scale = 0;
  for (float x : b) scale = std::max(scale, double(std::abs(x)));
  ASSERT_GT(scale, 0.0);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << "dweight element " << i << " not written";
    // One fp32 GEMM either way; cuBLAS may pick another kernel for beta = 0.
    EXPECT_NEAR(a[i], b[i], 1e-5 * scale) << "dweight element " << i;
  }
  fresh.poison();
  cuda::lm::matmul_backward<bf16>(handle, nullptr, fresh.get(), nullptr, dout.get(), inp.get(),
                                  weight.get(), 0, C, OC, scratch.get(), nullptr, false);
  for (float x : fresh.download()) ASSERT_EQ(x, 0.0f) << "an empty batch's dweight";
  cublasDestroy(handle);
}

TEST(LmModelConfig, RefusesWhatTheGpuModelDoesNotRun) {
  MOE_REQUIRE_GPU();
  {
    TrainConfig c = tiny_config(Kind::softmax_topk);
    c.model.ffn.shared_experts = 1;
    EXPECT_THROW(cuda::lm::make_gpu_model(c.model, 0, c.batch), ConfigError);
  }
  // Soft MoE makes one group per position, at most 65535 (refused before anything is allocated).
  TrainConfig c = tiny_config(Kind::soft_moe);
  c.model.seq = 65536;
  EXPECT_THROW(cuda::lm::check_gpu_model(c.model), ConfigError);
  c.model.seq = 48;
  EXPECT_NO_THROW(cuda::lm::check_gpu_model(c.model));
}

}  // namespace
}  // namespace moe::test
