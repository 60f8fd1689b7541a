// defines: counter_uniform, counter_normal, RngStream
// Counter-based random numbers: a value is a pure function of (seed, stream, index), so the CPU
// reference and the CUDA kernels draw the same noise without sharing state, and any element can be
// recomputed in backward. The mixer is splitmix64 (Steele et al. 2014) applied twice.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

namespace moe {

// Independent streams of one seed.
enum class RngStream : uint64_t { router_noise = 1, jitter = 2, second_choice = 3, init = 4 };

MOE_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

MOE_HD uint64_t counter_bits(uint64_t seed, RngStream stream, uint64_t index) {
  return splitmix64(splitmix64(seed ^ (static_cast<uint64_t>(stream) << 56)) ^ index);
}

// Uniform in (0, 1): 53 random bits, never exactly 0 or 1.
MOE_HD double counter_uniform(uint64_t seed, RngStream stream, uint64_t index) {
  return (static_cast<double>(counter_bits(seed, stream, index) >> 11) + 0.5) *
         (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller from two uniforms of indices 2i and 2i+1.
MOE_HD double counter_normal(uint64_t seed, RngStream stream, uint64_t index) {
  const double u1 = counter_uniform(seed, stream, 2 * index);
  const double u2 = counter_uniform(seed, stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace moe
