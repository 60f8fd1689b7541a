// defines: add_layer_options, add_backend_option, LayerCase, run_layer_case, seeded_normal,
//          parameter_shape, ordered_stages, stage_times_json, check_case_fits_in_memory
// What the subcommands share: the LayerConfig options, and one "case" (config, parameters,
// seeded input and upstream gradient, forward, backward) run the same way everywhere.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "moe/config.hpp"
#include "moe/layer.hpp"

namespace moe::io {}

namespace moe_bench {

namespace io = moe::io;

// Every LayerConfig field as an option (--tokens, --top-k, --router, ...), each showing its
// default in --help. Router, layout, activation and second policy are read as text and converted
// with moe::parse_*, so an unknown value fails with the engine's message. `with_router` = false
// leaves --router out (compare runs every router).
void add_layer_options(CLI::App& app, moe::LayerConfig& cfg, bool with_router = true);

// --backend: only "cpu" exists for these commands; anything else is a ConfigError.
void add_backend_option(CLI::App& app, std::string& backend);

// Deterministic N(0,1) values for input x and upstream gradient dy: a pure function of
// (seed, tag, index), so every command and every run sees the same case.
inline constexpr uint64_t kInputTag = 0x78;     // x
inline constexpr uint64_t kUpstreamTag = 0x6479;  // dy
template <class Real>
std::vector<Real> seeded_normal(size_t n, uint64_t seed, uint64_t tag);

// Shape of a tensor of parameter_list() by its name ("experts.w_up" -> (E, H, A)); a flat (n)
// when the name is unknown or the sizes do not match the documented shape.
std::vector<int64_t> parameter_shape(const moe::LayerConfig& cfg, const std::string& name,
                                     size_t numel);

// Stage names of StageTimes in pipeline order (gate, route, plan, ...), unknown ones last.
std::vector<std::pair<std::string, double>> ordered_stages(const moe::StageTimes& times);

// {"gate": ms, "route": ms, ..., "total": total} in pipeline order.
nlohmann::ordered_json stage_times_json(const moe::StageTimes& times, double total);

// Rough bytes one forward + backward of `cfg` holds (inputs, activations of every step, weights
// and their gradients, backward temporaries), for a clear error before the allocator fails or
// the machine starts swapping.
double estimate_case_bytes(const moe::LayerConfig& cfg, size_t real_size);
// ConfigError when the estimate exceeds 80% of this machine's physical memory.
void check_case_fits_in_memory(const moe::LayerConfig& cfg, size_t real_size);

template <class Real>
struct LayerCase {
  moe::LayerConfig cfg;
  moe::Params<Real> params;
  std::vector<Real> x;   // (T, H)
  std::vector<Real> dy;  // (T, H) upstream gradient
  moe::LayerForward<Real> fwd;
  std::vector<Real> dx;  // (T, H)
  moe::Params<Real> grads;
  moe::StageTimes backward_times;
  double forward_ms = 0, backward_ms = 0;  // wall time of the whole call
};

// cfg.validate(), the memory check, then x / dy from the seed when empty (params must be set), forward, backward.
template <class Real>
void run_layer_case(LayerCase<Real>& c);

}  // namespace moe_bench
