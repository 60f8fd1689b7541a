// defines: moe_bench::LayerShape, layer_config_names, parse_layer_shape, LayerBenchOptions,
//          run_layer_bench (bench_layer.cpp, CUDA builds)
// `moe-bench bench --layer`: the whole GPU MoE layer at the model configurations of issue 4, or
// at shapes of the user's own (--shape T,H,I,E,K).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/config.hpp"

namespace moe_bench {

struct LayerShape {
  std::string name;
  int64_t T, H, I, E, K;
};

// The named configurations of --config, in the order they run.
std::vector<std::string> layer_config_names();
// The routers --layer takes: the token-choice ones, which cuda::Layer runs with dropless rows at
// any shape (switch with K = 1, whatever the shape says), by their command-line names.
std::vector<std::string> layer_router_names();

// "T,H,I,E,K" (tokens, hidden, intermediate, experts, top-k) -> a shape named
// T<T>_H<H>_I<I>_E<E>_K<K>; throws ConfigError naming what the measured layer cannot take
// (H a multiple of 8, I of 32, 1 <= K <= E <= 4096).
LayerShape parse_layer_shape(const std::string& text);

struct LayerBenchOptions {
  int reps = 20;                     // timed runs (median reported), >= 20
  int warmup = 3;
  std::vector<std::string> configs;  // named configurations; empty (and no shapes) = all
  std::vector<LayerShape> shapes;    // the user's own, after the named ones
  moe::Router router = moe::Router::softmax_topk;
  std::string out;                   // JSONL file (appended); stdout when empty
  std::string command;               // the command line, for the records
};

void run_layer_bench(const LayerBenchOptions& o);

}  // namespace moe_bench
