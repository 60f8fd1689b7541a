// defines: moe::cuda::lm::check_gpu_model, make_gpu_model
// The small LM of include/moe/model/transformer.hpp on the GPU, as a moe::model::LanguageModel the
// CPU's Trainer drives (schedule, data, evaluation, checkpoints and records are shared).
//
// Same model, same initial weights (drawn by the CPU Transformer's constructor and copied up), same
// objective (mean cross-entropy + every layer's auxiliary loss), same AdamW, clipping and
// sigmoid_bias update; only the arithmetic differs:
//   * master weights, gradients and AdamW moments fp32; every matrix also kept as a bf16 copy that
//     the GEMMs read (refreshed by the AdamW kernel); the expert (or dense FFN) weight gradients
//     are written by the FFN backward each step, every other gradient zeroed and accumulated;
//   * residual stream fp32; LayerNorm outputs, qkv, attention and the FFN's activations bf16;
//     cuBLAS GEMMs accumulate in fp32; softmax, LayerNorm and the loss computed in fp32;
//   * the FFN is moe::cuda::Layer (gate -> route -> plan -> permute -> grouped experts -> combine
//     and its backward), one per block, called on all B*S tokens of the batch; chain_of_experts is
//     moe::cuda::ChainLayer (include/moe/cuda/chain.hpp), one Layer per iteration; expert choice
//     is one Layer call with S position groups (token (b, s) ranks among the B tokens at position
//     s: the CPU model's S calls of B tokens, in one sort, one plan and one grouped GEMM); soft
//     MoE is moe::cuda::SoftMoeLayer (include/moe/cuda/soft_moe_layer.hpp) over S groups of the
//     B tokens at each position (the CPU model's S calls), the rows regrouped by position around
//     it, its softmax scale read from the fp32 master weight.
// The dense layer kinds are include/moe/cuda/lm/layers.hpp; attention runs in the fused kernels
// (flash_attention_*, head sizes 32, 64, 128: only the output and a log-sum-exp per query row are
// kept for backward), else in the cuBLAS path that keeps the (S, S) probabilities. Everything runs on one stream; a step
// reads back only the per-token losses, the auxiliary losses and the gradient norm.
//
// Routers: every router of the CPU model — the token-choice routers of moe::cuda::Layer
// (softmax_topk, noisy_topk, switch_top1, sigmoid_bias), chain_of_experts, expert_choice,
// soft_moe — and the dense baselines. Shared experts are refused with a ConfigError naming them.
#pragma once
#include <cstdint>
#include <memory>

#include "moe/model/train.hpp"

namespace moe::cuda::lm {

// Throws ConfigError when the GPU model cannot run `cfg` (shared experts, soft_moe beyond its
// layer's limits, d_model not a multiple of 8) or no GPU is present.
void check_gpu_model(const model::ModelConfig& cfg);

// The model with the CPU Transformer's initial weights for `seed`, its buffers sized for batches
// of at most `max_batch` rows.
std::unique_ptr<model::LanguageModel> make_gpu_model(const model::ModelConfig& cfg, uint64_t seed,
                                                     int64_t max_batch);

}  // namespace moe::cuda::lm
