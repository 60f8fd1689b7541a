// defines: moe::test — rel_error, download_float, CublasTest
// Shared by the GPU language-model layer tests (test_lm_layers.cpp, test_lm_flash.cpp).
#pragma once
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cuda_test_util.hpp"

namespace moe::test {

// ||got - want|| / ||want - start|| (start: the += starting values, or none); infinite when got
// holds a NaN or an infinity (an unwritten poisoned element).
inline double rel_error(const std::vector<float>& got, const std::vector<float>& want,
                        const std::vector<float>* start = nullptr) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double diff = 0, ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    const double w = want[i] - (start ? double((*start)[i]) : 0.0);
    const double d = double(got[i]) - double(want[i]);
    diff += d * d;
    ref += w * w;
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

template <class T>
std::vector<float> download_float(const DeviceArray<T>& a) {
  return from_device_type<T>(a.download());
}

// A cuBLAS handle per test; skips without a GPU. Launches go to the default stream (stream_).
class CublasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_REQUIRE_GPU();
    MOE_CUBLAS_CHECK(cublasCreate(&handle_));
  }
  void TearDown() override {
    if (handle_) cublasDestroy(handle_);
  }
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace moe::test
