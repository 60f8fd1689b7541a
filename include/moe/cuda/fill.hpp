// defines: moe::cuda::fill_normal
// Seeded N(0, scale^2) values written on the device (benchmark inputs: random data, never zeros,
// without a host round trip of gigabytes). Value i is counter_normal(seed, init, i) of
// moe/rng.hpp rounded to T, so the host can recompute any element.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace moe::cuda {

template <class T>
void fill_normal(T* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace moe::cuda
