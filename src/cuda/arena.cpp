// defines: DeviceArena (one cudaMalloc carved into named slices)
#include "moe/cuda/arena.hpp"

#include <cstdio>
#include <utility>

#include "moe/cuda/check.cuh"

namespace moe::cuda {

DeviceArena::DeviceArena(const std::vector<ArenaSlice>& slices) {
  size_t total = 0;
  std::vector<size_t> at(slices.size());
  for (size_t i = 0; i < slices.size(); ++i) {
    at[i] = total;
    total += (slices[i].bytes + kAlign - 1) / kAlign * kAlign;
  }
  if (total > 0) MOE_CUDA_CHECK(cudaMalloc(&base_, total));
  bytes_ = total;
  char buf[128];
  for (size_t i = 0; i < slices.size(); ++i) {
    *slices[i].ptr = slices[i].bytes ? static_cast<char*>(base_) + at[i] : nullptr;
    std::snprintf(buf, sizeof buf, "%s%s: %.3f MiB", i ? ", " : "", slices[i].name.c_str(),
                  static_cast<double>(slices[i].bytes) / (1 << 20));
    report_ += buf;
  }
}

DeviceArena::~DeviceArena() {
  if (base_) cudaFree(base_);  // no throw from a destructor; a failure here leaks nothing new
}

DeviceArena::DeviceArena(DeviceArena&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      report_(std::move(other.report_)) {}

DeviceArena& DeviceArena::operator=(DeviceArena&& other) noexcept {
  if (this != &other) {
    if (base_) cudaFree(base_);
    base_ = std::exchange(other.base_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    report_ = std::move(other.report_);
  }
  return *this;
}

}  // namespace moe::cuda
