// defines: moe::cuda::ParityCase, ParityResult, parity_cases, parity_shape, parity_routing,
//          check_data_path
// The GPU-vs-CPU parity suite as library code, so the CUDA tests (tests/cuda) and
// `moe-bench check` run the same comparisons: every GPU stage against the CPU reference stage
// (src/cpu) on fresh seeded random inputs, outputs poisoned before the run.
// Tolerances: exact for index outputs and copies; otherwise |gpu - ref| <= atol + rtol*|ref|
// with rtol = one rounding of the storage type (2^-8 bf16, 2^-24 fp32, x1.01) plus fp32
// accumulation error, and dot products bounded by the worst case of their summation order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/cuda/plan.hpp"
#include "moe/cuda/synthetic.hpp"
#include "moe/plan.hpp"

namespace moe::cuda {

struct ParityCase {
  std::string name;
  int64_t tokens = 0, experts = 1, top_k = 1;  // top_k = 0: expert choice
  Skew skew = Skew::uniform;
  Layout layout = Layout::dropless;
  double capacity_factor = 1.25;  // padded layout; expert choice: C = ceil(cf * T / E)
  int64_t block_size = 4;
  double no_expert = 0;           // fraction of choices k >= 1 set to kNoExpert
  bool large = false;             // left out of the small suite (compute-sanitizer runs)
};

// T = 1, E not a power of two, K = E, Zipf, all tokens to one expert, binding capacity, skipped
// choices, expert choice in every layout, E = 4096, and large shapes (large = true).
std::vector<ParityCase> parity_cases();
int64_t parity_capacity(const ParityCase& c);
PlanShape parity_shape(const ParityCase& c);
Routing<float> parity_routing(const ParityCase& c, uint64_t seed);

struct ParityResult {
  std::string stage;    // plan, permute, combine, combine_backward.dyp, ...
  std::string dtype;    // fp32, bf16, int32
  std::string detail;   // first mismatches, or empty
  double max_error = 0; // largest |gpu - ref| / (atol + rtol |ref|); <= 1 passes
  double rel_error = 0; // ||gpu - ref||_2 / ||ref||_2 over the tensor (float comparisons)
  int64_t elements = 0, mismatches = 0;
  bool pass() const { return mismatches == 0; }
};

// Router cases: every sparse router, training and eval, E not a power of two, K = E, T = 1,
// E = 4096, balance groups, GShard's second-choice policies.
struct RouteCase {
  std::string name;
  LayerConfig cfg;
  bool large = false;
};
std::vector<RouteCase> route_cases();

// gate (fp32 and bf16, with switch's jitter), route forward (on the CPU's logits: selection,
// weights, probabilities, aux loss) and route backward through the gate (dW_gate, dW_noise, dx).
// Tokens whose k-th and (k+1)-th scores are within rounding of each other (or experts, for
// expert choice) may legitimately pick differently; they are counted, not failed, and the
// backward comparison is skipped when any occurred.
std::vector<ParityResult> check_route(const RouteCase& c, uint64_t seed);

// Soft MoE in fp32 and in bf16: norms, logits, both softmaxes, the dispatch and combine GEMMs,
// and the backward of all of them (the experts' backward in between runs on the CPU) against
// cpu::soft_moe_forward / soft_moe_backward in double on the same (bf16-rounded) inputs.
// Tolerances: the fp32 router math (inverse norms, logits) element-wise on both paths; the
// dispatch and combine weights element-wise with one rounding of the storage type; on the fp32
// path every other tensor element-wise (1e-4 of the tensor's largest value + 1e-4 relative
// forward, 1e-3 backward); on the bf16 path the GEMM outputs and gradients (slots_in, y,
// d_slots_out, dx, dw_gate) by relative Frobenius error <= 1e-2, every element finite; dscale
// within 1e-4 (fp32) or 1e-2 (bf16) of the norm of the magnitudes that enter its sum (see
// check_soft_moe_typed in parity.cpp).
// Each path runs twice on fresh buffers: soft_moe.repeat_bitwise counts the bits that differ.
// Cases: T = 1, E not a power of two, S > 1, H not a multiple of 8, several row chunks.
std::vector<RouteCase> soft_moe_cases();
std::vector<ParityResult> check_soft_moe(const RouteCase& c, uint64_t seed);

// The plan (every field, exact) for `c`.
std::vector<ParityResult> check_plan(const ParityCase& c, uint64_t seed);
// permute, combine and both backwards at hidden size `hidden`, in fp32 and bf16.
std::vector<ParityResult> check_rows(const ParityCase& c, int64_t hidden, uint64_t seed);

}  // namespace moe::cuda
