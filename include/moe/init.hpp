// defines: moe::fill_normal
// Seeded initial values: element i of tensor `tensor` is stddev * counter_normal(seed, init,
// (tensor << 40) + i), a pure function of its index, so the work splits over threads without
// changing a bit. (The GPU model's 157M-parameter default takes seconds on one core otherwise.)
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "moe/rng.hpp"

namespace moe {

template <class Real>
void fill_normal(std::vector<Real>& v, size_t n, double stddev, uint64_t seed, uint64_t tensor) {
  v.resize(n);
  auto fill = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i)
      v[i] = Real(stddev * counter_normal(seed, RngStream::init, (tensor << 40) + i));
  };
  constexpr size_t kPerThread = size_t(1) << 20;
  const size_t threads =
      std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), n / kPerThread);
  if (threads <= 1) {
    fill(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const size_t chunk = (n + threads - 1) / threads;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back(fill, t * chunk, std::min(n, (t + 1) * chunk));
  for (std::thread& th : pool) th.join();
}

}  // namespace moe
