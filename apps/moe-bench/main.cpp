// moe-bench: one command-line tool for the MoE routing study (run a layer, compare routers,
// export / replay cases, and on CUDA builds check and benchmark the GPU stages).
// Every failure ends in one line on stderr and an exit code: 2 for bad input (options, configs,
// files), 1 for a failure inside the library; --help exits 0.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fmt/format.h>
#include <new>
#include <string>

#include "moe-bench/commands.hpp"
#include "moe/check.hpp"

namespace {

std::string one_line(std::string text) {
  for (char& ch : text)
    if (ch == '\n' || ch == '\r') ch = ' ';
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

int fail(int code, const std::string& message) {
  std::fflush(stdout);
  fmt::print(stderr, "moe-bench: error: {}\n", one_line(message));
  return code;
}

#ifdef MOE_HAVE_CUDA
constexpr const char* kUnavailable = "not part of this build";
#else
constexpr const char* kUnavailable = "built without CUDA";
#endif

// A subcommand this build cannot run still exists, accepts anything and says why (exit 2).
[[maybe_unused]] void add_unavailable_command(CLI::App& app, const std::string& name,
                                              const std::string& help, const std::string& why) {
  CLI::App* sub = app.add_subcommand(name, help + " (" + why + ")");
  sub->allow_extras();
  sub->prefix_command();
  sub->callback([why] { throw moe::ConfigError(why); });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moe-bench: Mixture-of-Experts routing study tool", "moe-bench"};
  app.require_subcommand(1);
  app.fallthrough(false);
  moe_bench::add_layer_command(app);
  moe_bench::add_compare_command(app);
  moe_bench::add_train_command(app);
  moe_bench::add_compare_models_command(app);
  moe_bench::add_export_command(app);
  moe_bench::add_replay_command(app);
#if defined(MOE_HAVE_CUDA) && defined(MOE_BENCH_HAS_CHECK)
  moe_bench::add_check_command(app);
#else
  add_unavailable_command(app, "check", "compare the GPU stages with the CPU reference",
                          kUnavailable);
#endif
#if defined(MOE_HAVE_CUDA) && defined(MOE_BENCH_HAS_BENCH)
  moe_bench::add_bench_command(app);
#else
  add_unavailable_command(app, "bench", "benchmark the GPU stages", kUnavailable);
#endif

  try {
    app.parse(argc, argv);  // the chosen subcommand's callback runs inside parse
    return 0;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --help-all
    return fail(2, e.what());
  } catch (const moe_bench::CommandExit& e) {
    return e.code;
  } catch (const moe::ConfigError& e) {
    return fail(2, e.what());
  } catch (const moe::Error& e) {
    return fail(1, e.what());
  } catch (const std::bad_alloc&) {
    return fail(1, "out of memory (try fewer --tokens or a smaller layer)");
  } catch (const std::exception& e) {
    return fail(1, e.what());
  }
}
