// defines: moe_bench::LayerBenchOptions, run_layer_bench (bench_layer.cpp, CUDA builds)
// `moe-bench bench --layer`: the whole GPU MoE layer at the model configurations of issue 4.
#pragma once
#include <string>
#include <vector>

namespace moe_bench {

struct LayerBenchOptions {
  int reps = 20;                     // timed runs (median reported), >= 20
  int warmup = 3;
  std::vector<std::string> configs;  // olmoe, qwen3, mixtral, brief_small; empty = all
  std::string out;                   // JSONL file (appended); stdout when empty
  std::string command;               // the command line, for the records
};

void run_layer_bench(const LayerBenchOptions& o);

}  // namespace moe_bench
