// defines: the moe-bench subcommands (one file each) and CommandExit
// Each add_*_command registers one subcommand on the top-level app; its callback does the work.
// Errors travel as exceptions and main turns them into one line and an exit code:
//   moe::ConfigError (bad input) -> 2, CLI11 parse errors -> 2, moe::Error -> 1, CommandExit -> its code.
#pragma once
#include <CLI/CLI.hpp>

namespace moe_bench {

// A subcommand that finished and wants a non-zero exit status without an error line
// (replay: tensors differ). It has printed its own report.
struct CommandExit {
  int code;
};

void add_layer_command(CLI::App& app);    // layer.cpp: one forward + backward, times and load stats
void add_export_command(CLI::App& app);   // export.cpp: a case as .safetensors for other frameworks
void add_compare_command(CLI::App& app);  // compare.cpp: every router on one layer, one table
void add_replay_command(CLI::App& app);   // replay.cpp: recompute an exported case and compare
void add_train_command(CLI::App& app);    // train.cpp: train the small LM with one router (CPU)
void add_compare_models_command(CLI::App& app);  // compare_models.cpp: the LM once per router
void add_check_command(CLI::App& app);    // check.cpp (CUDA builds): GPU stages against the CPU
void add_bench_command(CLI::App& app);    // bench.cpp (CUDA builds): stage micro-benchmarks

}  // namespace moe_bench
