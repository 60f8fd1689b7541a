// defines: moe::io::SafeTensor, SafeTensors, write_safetensors, read_safetensors
// The safetensors format, written and read without outside help:
//   [u64 little-endian N][N bytes of JSON header, space-padded to a multiple of 8][data]
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end)} (offsets
// relative to the start of the data) and may hold "__metadata__", a map of strings to strings.
// Writes are atomic (see io/files.hpp); reads validate everything and fail with
// ConfigError("FILE: what is wrong") instead of trusting the file.
#pragma once
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moe::io {

// Bytes per element of a safetensors dtype name (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL), or 0
// when the name is not one of them.
int64_t dtype_size(const std::string& dtype);

template <class T>
constexpr const char* dtype_of() {
  if constexpr (std::is_same_v<T, float>) return "F32";
  else if constexpr (std::is_same_v<T, double>) return "F64";
  else if constexpr (std::is_same_v<T, int32_t>) return "I32";
  else if constexpr (std::is_same_v<T, int64_t>) return "I64";
  else static_assert(sizeof(T) == 0, "safetensors: supported element types are float, double, "
                                      "int32_t and int64_t");
}

struct SafeTensor {
  std::string dtype;           // "F32", "F64", "I32", "I64", ...
  std::vector<int64_t> shape;  // row-major; {} is a scalar
  std::vector<uint8_t> bytes;  // little-endian elements
  int64_t numel() const;
};

// An ordered set of named tensors plus string metadata; the order of add() is the file order.
class SafeTensors {
 public:
  std::map<std::string, std::string> metadata;

  // Throws ConfigError on a duplicate name, an unknown dtype or bytes not matching the shape.
  void add(const std::string& name, SafeTensor tensor);
  template <class T>
  void add(const std::string& name, const std::vector<T>& values, std::vector<int64_t> shape) {
    SafeTensor t{dtype_of<T>(), std::move(shape), {}};
    t.bytes.resize(values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
    add(name, std::move(t));
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws ConfigError("SOURCE: no tensor 'name'") when absent.
  const SafeTensor& at(const std::string& name) const;
  const std::vector<std::string>& names() const { return names_; }
  size_t size() const { return names_.size(); }

  // Values converted to T: float types convert among themselves, integer types among
  // themselves (with a range check); float <-> integer is an error naming the tensor.
  template <class T>
  std::vector<T> get(const std::string& name) const;
  // get() that also checks the shape.
  template <class T>
  std::vector<T> get(const std::string& name, const std::vector<int64_t>& shape) const;

  // Where the tensors came from, used in error messages ("FILE: ..."); set by read_safetensors.
  std::string source = "safetensors";

 private:
  std::vector<std::string> names_;
  std::map<std::string, SafeTensor> index_;
};

// Atomic write; ConfigError naming the path on failure, never a partial file.
void write_safetensors(const std::string& path, const SafeTensors& tensors);
// Full validation; ConfigError("PATH: ...") on a missing or malformed file.
SafeTensors read_safetensors(const std::string& path);
// The same on bytes already in memory (`source` names them in errors).
SafeTensors parse_safetensors(const std::vector<uint8_t>& file, const std::string& source);
std::string serialize_safetensors(const SafeTensors& tensors);

extern template std::vector<float> SafeTensors::get<float>(const std::string&) const;
extern template std::vector<double> SafeTensors::get<double>(const std::string&) const;
extern template std::vector<int32_t> SafeTensors::get<int32_t>(const std::string&) const;
extern template std::vector<int64_t> SafeTensors::get<int64_t>(const std::string&) const;
extern template std::vector<float> SafeTensors::get<float>(const std::string&,
                                                           const std::vector<int64_t>&) const;
extern template std::vector<double> SafeTensors::get<double>(const std::string&,
                                                             const std::vector<int64_t>&) const;
extern template std::vector<int32_t> SafeTensors::get<int32_t>(const std::string&,
                                                               const std::vector<int64_t>&) const;
extern template std::vector<int64_t> SafeTensors::get<int64_t>(const std::string&,
                                                               const std::vector<int64_t>&) const;

}  // namespace moe::io
