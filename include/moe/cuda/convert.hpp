// defines: to_device_type, from_device_type, round_to — host-side float <-> device element type
// Exact for float; round-to-nearest-even for bf16. Parity checks round the CPU reference's inputs
// with round_to so both sides compute on the same values.
#pragma once
#include <cuda_bf16.h>

#include <type_traits>
#include <vector>

namespace moe::cuda {

template <class T>
std::vector<T> to_device_type(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) out[i] = v[i];
    else out[i] = __float2bfloat16(v[i]);
  }
  return out;
}

template <class T>
std::vector<float> from_device_type(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) out[i] = v[i];
    else out[i] = __bfloat162float(v[i]);
  }
  return out;
}

template <class T>
std::vector<float> round_to(const std::vector<float>& v) {
  return from_device_type<T>(to_device_type<T>(v));
}

}  // namespace moe::cuda
