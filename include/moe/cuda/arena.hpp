// defines: moe::cuda::DeviceArena, moe::cuda::ArenaSlice
// One cudaMalloc per lifetime (plan buffers, routing buffers, benchmark inputs), carved into named
// slices from a table: no allocation in the step loop, one place that knows the total size.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace moe::cuda {

struct ArenaSlice {
  std::string name;  // for the size report
  size_t bytes;      // 0: the pointer is set to nullptr
  void** ptr;        // where the slice's device address is written
};

class DeviceArena {
 public:
  // Every slice starts on a 256-byte boundary (16-byte vector loads need 16; 256 keeps each slice
  // on its own cache lines so that tests can poison one without touching its neighbours).
  static constexpr size_t kAlign = 256;

  DeviceArena() = default;
  explicit DeviceArena(const std::vector<ArenaSlice>& slices);
  ~DeviceArena();
  DeviceArena(DeviceArena&& other) noexcept;
  DeviceArena& operator=(DeviceArena&& other) noexcept;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  size_t bytes() const { return bytes_; }
  void* data() const { return base_; }
  // "name: 1.23 MiB, ..." for logs.
  std::string report() const { return report_; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  std::string report_;
};

}  // namespace moe::cuda
