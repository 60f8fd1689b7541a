// defines: moe::cuda::RoutingView, moe::cuda::RoutingBuffers, upload_routing, download_routing
// The Routing of include/moe/plan.hpp on the device: three flat arrays over choices. Token choice:
// N = T*K, choice c = t*K + k; expert choice: N = E*C, c = e*C + j. Weights are fp32 on every path
// (router math is fp32 whatever the activation dtype).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/cuda/arena.hpp"
#include "moe/plan.hpp"

namespace moe::cuda {

struct RoutingView {
  int64_t tokens = 0, experts = 0;
  int64_t top_k = 0;                      // K for token choice; 0 for expert choice
  int64_t choices = 0;                    // N
  const int32_t* choice_token = nullptr;  // (N) token of each choice
  const int32_t* choice_expert = nullptr; // (N) expert of each choice, or kNoExpert
  const float* choice_weight = nullptr;   // (N) combine weight, fp32
};

// Owns the three arrays in one arena; route kernels write them, upload_routing fills them.
struct RoutingBuffers {
  int64_t tokens = 0, experts = 0, top_k = 0, choices = 0;
  int32_t* choice_token = nullptr;   // (N)
  int32_t* choice_expert = nullptr;  // (N)
  float* choice_weight = nullptr;    // (N)
  DeviceArena arena;

  RoutingBuffers() = default;
  RoutingBuffers(int64_t tokens, int64_t experts, int64_t top_k, int64_t choices);
  RoutingView view() const {
    return {tokens, experts, top_k, choices, choice_token, choice_expert, choice_weight};
  }
};

// Host <-> device copies for tests and the check command (they synchronise `stream`).
template <class Real>
void upload_routing(const Routing<Real>& host, RoutingBuffers& dev, cudaStream_t stream);
Routing<float> download_routing(const RoutingView& dev, cudaStream_t stream);

}  // namespace moe::cuda
