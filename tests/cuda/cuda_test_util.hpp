// defines: MOE_REQUIRE_GPU, DeviceArray, to_device_type, from_device_type, expect_close,
//          expect_equal, same_bytes, not_rounded_once, poison bytes
// Helpers for the CUDA parity tests: every GPU stage is compared with the CPU reference on fresh
// seeded random inputs, with its outputs poisoned before the run so that an unwritten element
// fails the comparison instead of passing on leftover data.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/cuda/convert.hpp"
#include "moe/cuda/parity.hpp"

#include "moe/cuda/check.cuh"
#include "moe/rng.hpp"

namespace moe::test {

// Skip (not fail) where there is no GPU: CI builds and runs this suite without one.
#define MOE_REQUIRE_GPU()                                              \
  do {                                                                 \
    if (!::moe::cuda::has_device()) GTEST_SKIP() << "no CUDA device";  \
  } while (0)

// MOE_TEST_SMALL=1 leaves out the large cases (compute-sanitizer runs are ~100x slower).
inline bool small_only() {
  const char* s = std::getenv("MOE_TEST_SMALL");
  return s && *s && *s != '0';
}

// 0xFF bytes: NaN in fp32 and bf16, -1 in int32 (use 0x7b for int arrays, see PlanBuffers::poison).
inline constexpr int kPoisonFloat = 0xff;

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n) MOE_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    MOE_ASSERT(host.size() == n_);
    if (n_) MOE_CUDA_CHECK(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) MOE_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison(int byte = kPoisonFloat) {
    if (n_) MOE_CUDA_CHECK(cudaMemset(p_, byte, n_ * sizeof(T)));
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Seeded standard-normal values (never zeros), from the counter RNG: the same on every platform.
template <class Real>
std::vector<Real> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
  std::vector<Real> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<Real>(scale * counter_normal(seed, RngStream::init, i));
  return v;
}

using cuda::from_device_type;
using cuda::round_to;
using cuda::to_device_type;

template <class T>
constexpr const char* dtype_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}
// Unit roundoff of the device type's storage (the error of writing one fp32 result).
template <class T>
constexpr double storage_eps() {
  return std::is_same_v<T, float> ? 0x1p-24 : 0x1p-8;
}

// |got - want| <= atol + rtol * |want| elementwise; NaN never passes. Prints the tensor name, the
// first mismatches (at most 10) with their index and the largest difference.
inline ::testing::AssertionResult close(const std::string& name, const std::vector<float>& got,
                                        const std::vector<double>& want, double atol,
                                        double rtol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << name << ": size " << got.size() << " != " << want.size();
  std::ostringstream os;
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(d <= atol + rtol * std::abs(want[i]))) {
      if (bad < 10) os << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
    if (d > worst || std::isnan(d)) worst = d;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << name << ": " << bad << " of " << got.size()
                                       << " elements differ (max diff " << worst << ")"
                                       << os.str();
}

template <class A, class B>
::testing::AssertionResult equal(const std::string& name, const std::vector<A>& got,
                                 const std::vector<B>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << name << ": size " << got.size() << " != " << want.size();
  std::ostringstream os;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (static_cast<int64_t>(got[i]) != static_cast<int64_t>(want[i])) {
      if (bad < 10) os << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << name << ": " << bad << " of " << got.size() << " entries differ" << os.str();
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// How many entries of `got` (bf16 values as floats) are not the fp32 value rounded once to bf16
// (round to nearest even): 0 when a bf16 output is its fp32 twin's single rounding.
inline int64_t not_rounded_once(const std::vector<float>& fp32, const std::vector<float>& got) {
  int64_t bad = fp32.size() == got.size() ? 0 : int64_t(std::max(fp32.size(), got.size()));
  for (size_t i = 0; i < std::min(fp32.size(), got.size()); ++i)
    bad += got[i] != __bfloat162float(__float2bfloat16(fp32[i]));
  return bad;
}

}  // namespace moe::test

namespace moe::cuda {
// Test listings show the case name, not a byte dump of the struct (found by argument lookup).
inline void PrintTo(const ParityCase& c, std::ostream* os) { *os << c.name; }
inline void PrintTo(const RouteCase& c, std::ostream* os) { *os << c.name; }
}  // namespace moe::cuda
