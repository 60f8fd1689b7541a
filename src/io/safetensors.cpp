// defines: moe::io::SafeTensors, write_safetensors, read_safetensors (see safetensors.hpp)
#include "io/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <limits>
#include <nlohmann/json.hpp>

#include "io/files.hpp"
#include "moe/check.hpp"

namespace moe::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; a big-endian host would need byte swaps");

namespace {

constexpr std::pair<const char*, int64_t> kDtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
    {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// numel of a shape, or -1 when it overflows `limit` (the element count can never exceed it).
int64_t checked_numel(const std::vector<int64_t>& shape, int64_t limit) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d == 0) return 0;
    if (n > limit / d) return -1;
    n *= d;
  }
  return n;
}

template <class Src, class Dst>
void convert(const std::vector<uint8_t>& bytes, std::vector<Dst>& out) {
  const size_t n = bytes.size() / sizeof(Src);
  out.resize(n);
  for (size_t i = 0; i < n; ++i) {
    Src v;
    std::memcpy(&v, bytes.data() + i * sizeof(Src), sizeof(Src));
    out[i] = static_cast<Dst>(v);
  }
}

}  // namespace

int64_t dtype_size(const std::string& dtype) {
  for (const auto& [name, size] : kDtypes)
    if (dtype == name) return size;
  return 0;
}

int64_t SafeTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void SafeTensors::add(const std::string& name, SafeTensor tensor) {
  MOE_CHECK(!name.empty() && name != "__metadata__", source, ": invalid tensor name '", name, "'");
  MOE_CHECK(!contains(name), source, ": tensor '", name, "' added twice");
  const int64_t size = dtype_size(tensor.dtype);
  MOE_CHECK(size > 0, source, ": tensor '", name, "' has unknown dtype '", tensor.dtype, "'");
  const int64_t numel = checked_numel(tensor.shape, std::numeric_limits<int64_t>::max() / size);
  MOE_CHECK(numel >= 0 && numel * size == static_cast<int64_t>(tensor.bytes.size()), source,
            ": tensor '", name, "' has ", tensor.bytes.size(), " bytes, shape ",
            shape_text(tensor.shape), " of ", tensor.dtype, " needs ", numel * size);
  names_.push_back(name);
  index_.emplace(name, std::move(tensor));
}

const SafeTensor& SafeTensors::at(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) MOE_FAIL(source, ": no tensor '", name, "'");
  return it->second;
}

template <class T>
std::vector<T> SafeTensors::get(const std::string& name) const {
  const SafeTensor& t = at(name);
  std::vector<T> out;
  if constexpr (std::is_floating_point_v<T>) {
    if (t.dtype == "F32") convert<float>(t.bytes, out);
    else if (t.dtype == "F64") convert<double>(t.bytes, out);
    else MOE_FAIL(source, ": tensor '", name, "' is ", t.dtype, ", expected F32 or F64");
  } else {
    std::vector<int64_t> wide;
    if (t.dtype == "I32") convert<int32_t>(t.bytes, wide);
    else if (t.dtype == "I64") convert<int64_t>(t.bytes, wide);
    else MOE_FAIL(source, ": tensor '", name, "' is ", t.dtype, ", expected I32 or I64");
    out.resize(wide.size());
    for (size_t i = 0; i < wide.size(); ++i) {
      MOE_CHECK(wide[i] >= std::numeric_limits<T>::min() && wide[i] <= std::numeric_limits<T>::max(),
                source, ": tensor '", name, "' element ", i, " = ", wide[i], " does not fit ",
                dtype_of<T>());
      out[i] = static_cast<T>(wide[i]);
    }
  }
  return out;
}

template <class T>
std::vector<T> SafeTensors::get(const std::string& name, const std::vector<int64_t>& shape) const {
  const SafeTensor& t = at(name);
  MOE_CHECK(t.shape == shape, source, ": tensor '", name, "' has shape ", shape_text(t.shape),
            ", expected ", shape_text(shape));
  return get<T>(name);
}

template std::vector<float> SafeTensors::get<float>(const std::string&) const;
template std::vector<double> SafeTensors::get<double>(const std::string&) const;
template std::vector<int32_t> SafeTensors::get<int32_t>(const std::string&) const;
template std::vector<int64_t> SafeTensors::get<int64_t>(const std::string&) const;
template std::vector<float> SafeTensors::get<float>(const std::string&,
                                                    const std::vector<int64_t>&) const;
template std::vector<double> SafeTensors::get<double>(const std::string&,
                                                      const std::vector<int64_t>&) const;
template std::vector<int32_t> SafeTensors::get<int32_t>(const std::string&,
                                                        const std::vector<int64_t>&) const;
template std::vector<int64_t> SafeTensors::get<int64_t>(const std::string&,
                                                        const std::vector<int64_t>&) const;

// ---------------------------------------------------------------------------------------------
// write

std::string serialize_safetensors(const SafeTensors& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!tensors.metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : tensors.metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const std::string& name : tensors.names()) {
    const SafeTensor& t = tensors.at(name);
    const uint64_t end = offset + t.bytes.size();
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  // Invalid UTF-8 in a name or a metadata value is replaced rather than failing the write.
  std::string text = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  // Pad with spaces so the data starts 8-byte aligned (8-byte length + header).
  text.append((8 - text.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += text;
  for (const std::string& name : tensors.names()) {
    const auto& b = tensors.at(name).bytes;
    out.append(reinterpret_cast<const char*>(b.data()), b.size());
  }
  return out;
}

void write_safetensors(const std::string& path, const SafeTensors& tensors) {
  write_file_atomically(path, serialize_safetensors(tensors));
}

// ---------------------------------------------------------------------------------------------
// read

SafeTensors parse_safetensors(const std::vector<uint8_t>& file, const std::string& source) {
  const uint64_t size = file.size();
  MOE_CHECK(size >= 8, source, ": too short for a safetensors file (", size,
            " bytes; the header length alone takes 8)");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(file[i]) << (8 * i);
  MOE_CHECK(header_len <= size - 8, source, ": header length ", header_len,
            " runs past the end of the file (", size, " bytes): not a safetensors file");
  MOE_CHECK(header_len >= 2, source, ": header of ", header_len, " bytes cannot hold a JSON object");

  const char* begin = reinterpret_cast<const char*>(file.data() + 8);
  // ordered_json keeps the file's tensor order.
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(begin, begin + header_len);
  } catch (const nlohmann::ordered_json::parse_error& e) {
    MOE_FAIL(source, ": header is not valid JSON (error at byte ", e.byte, " of ", header_len, ")");
  }
  MOE_CHECK(header.is_object(), source, ": header is not a JSON object");

  const uint64_t data_size = size - 8 - header_len;
  const uint8_t* data = file.data() + 8 + header_len;
  SafeTensors out;
  out.source = source;

  struct Entry {
    std::string name;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      MOE_CHECK(value.is_object(), source, ": __metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        MOE_CHECK(v.is_string(), source, ": __metadata__ value of '", k, "' is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = source + ": tensor '" + name + "'";
    MOE_CHECK(value.is_object(), where, " is not an object");
    MOE_CHECK(value.contains("dtype") && value["dtype"].is_string(), where, " has no string dtype");
    MOE_CHECK(value.contains("shape") && value["shape"].is_array(), where, " has no shape array");
    MOE_CHECK(value.contains("data_offsets") && value["data_offsets"].is_array() &&
                  value["data_offsets"].size() == 2,
              where, " has no data_offsets [begin, end]");
    SafeTensor t;
    t.dtype = value["dtype"].get<std::string>();
    const int64_t esize = dtype_size(t.dtype);
    MOE_CHECK(esize > 0, where, " has unknown dtype '", t.dtype,
              "' (known: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
    for (const auto& d : value["shape"]) {
      MOE_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), where,
                " has a shape entry that is not a non-negative integer");
      MOE_CHECK(d.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                where, " has a dimension too large for int64");
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& offs = value["data_offsets"];
    MOE_CHECK(offs[0].is_number_unsigned() && offs[1].is_number_unsigned(), where,
              " has data_offsets that are not non-negative integers");
    const uint64_t b = offs[0].get<uint64_t>(), e = offs[1].get<uint64_t>();
    MOE_CHECK(b <= e && e <= data_size, where, " has data_offsets [", b, ", ", e,
              ") outside the data (", data_size, " bytes)");
    const int64_t numel = checked_numel(t.shape, static_cast<int64_t>(data_size / esize) + 1);
    MOE_CHECK(numel >= 0 && static_cast<uint64_t>(numel) * esize == e - b, where, ": shape ",
              shape_text(t.shape), " of ", t.dtype, " does not match its ", e - b, " bytes");
    t.bytes.assign(data + b, data + e);
    entries.push_back({name, b, e});
    out.add(name, std::move(t));
  }

  // The data must be covered exactly once: no overlaps, no holes.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t covered = 0;
  for (const Entry& e : entries) {
    MOE_CHECK(e.begin == covered, source, ": tensor '", e.name, "' starts at byte ", e.begin,
              e.begin < covered ? ", overlapping the previous tensor" : ", leaving a hole before it");
    covered = e.end;
  }
  MOE_CHECK(covered == data_size, source, ": ", data_size - covered,
            " bytes after the last tensor are not part of any tensor");
  return out;
}

SafeTensors read_safetensors(const std::string& path) {
  return parse_safetensors(read_file(path), path);
}

}  // namespace moe::io
