// defines: Trainer::save_checkpoint, Trainer::load_checkpoint (format in include/moe/model/train.hpp)
// Floats are stored in the host's byte order (little-endian on every machine this project targets).
#include <cstring>
#include <string>
#include <vector>

#include "io/files.hpp"
#include "moe/check.hpp"
#include "moe/model/train.hpp"

namespace moe::model {

namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'C', 'K', 'P', 'T', '1'};
constexpr int kVersion = 1;
constexpr size_t kDigest = 32;  // md5 as hex

// Fields a resumed run may change: they do not alter the training trajectory up to the step
// (steps only moves the end of the cosine schedule).
bool may_differ(const std::string& path) {
  return path == "train.steps" || path == "train.eval_every" || path == "train.val_windows";
}

// First field (as "section.key") whose value differs between a and b, or "".
std::string first_difference(const nlohmann::ordered_json& a, const nlohmann::ordered_json& b, std::string* va,
                             std::string* vb) {
  for (const auto& [section, fields] : b.items()) {
    for (const auto& [key, value] : fields.items()) {
      const std::string path = section + "." + key;
      if (may_differ(path)) continue;
      const nlohmann::ordered_json* other = nullptr;
      if (a.contains(section) && a[section].is_object() && a[section].contains(key))
        other = &a[section][key];
      if (!other || *other != value) {
        *va = other ? other->dump() : "absent";
        *vb = value.dump();
        return path;
      }
    }
  }
  return "";
}

void append_floats(std::string& out, const std::vector<float>& v) {
  out.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

}  // namespace

void Trainer::save_checkpoint(const std::string& path) {
  std::vector<TensorRef> tensors = tensor_list(model_->weights());
  const AdamW& opt = model_->optimizer();
  nlohmann::ordered_json h;
  h["format"] = "moe-bench checkpoint";
  h["version"] = kVersion;
  h["config"] = config_json(cfg_);
  h["step"] = step_;
  h["adam_t"] = opt.t;
  h["data"] = {{"seed", cfg_.seed}, {"next_step", step_}};  // batches are f(seed, step)
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const TensorRef& t : tensors)
    list.push_back({{"name", t.name}, {"size", t.value->size()}, {"trainable", t.trainable}});
  h["tensors"] = list;
  const std::string header = h.dump();

  std::string bytes(kMagic, sizeof kMagic);
  const uint64_t header_len = header.size();
  bytes.append(reinterpret_cast<const char*>(&header_len), sizeof header_len);
  bytes += header;
  for (const TensorRef& t : tensors) append_floats(bytes, *t.value);
  for (size_t i = 0; i < opt.m.size(); ++i) {
    append_floats(bytes, opt.m[i]);
    append_floats(bytes, opt.v[i]);
  }
  bytes += data::md5_hex(bytes.data(), bytes.size());
  io::write_file_atomically(path, bytes);
}

void Trainer::load_checkpoint(const std::string& path) {
  const std::vector<uint8_t> file = io::read_file(path);
  const char* p = reinterpret_cast<const char*>(file.data());
  const size_t size = file.size();
  const std::string what = "checkpoint " + path;
  MOE_CHECK(size >= sizeof kMagic && std::memcmp(p, kMagic, sizeof kMagic) == 0, what,
            ": not a moe-bench checkpoint (wrong magic bytes)");
  MOE_CHECK(size >= sizeof kMagic + sizeof(uint64_t) + kDigest, what, ": truncated (", size,
            " bytes)");
  const size_t body = size - kDigest;
  MOE_CHECK(data::md5_hex(p, body) == std::string(p + body, kDigest), what,
            ": corrupt or truncated (checksum mismatch)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, p + sizeof kMagic, sizeof header_len);
  const size_t header_at = sizeof kMagic + sizeof header_len;
  MOE_CHECK(header_len <= body - header_at, what, ": corrupt (header length past the end)");
  nlohmann::ordered_json h;
  try {
    h = nlohmann::ordered_json::parse(p + header_at, p + header_at + header_len);
  } catch (const nlohmann::ordered_json::exception&) {
    MOE_FAIL(what, ": corrupt (unreadable header)");
  }
  MOE_CHECK(h.value("format", "") == "moe-bench checkpoint" && h.contains("config"), what,
            ": not a moe-bench checkpoint (no format tag)");
  MOE_CHECK(h.value("version", 0) == kVersion, what, ": format version ", h.value("version", 0),
            ", this build reads version ", kVersion);
  std::string theirs, ours;
  const std::string field = first_difference(h["config"], config_json(cfg_), &theirs, &ours);
  MOE_CHECK(field.empty(), what, " does not match this run: ", field, " is ", theirs,
            " in the checkpoint, ", ours, " here");

  std::vector<TensorRef> tensors = tensor_list(model_->weights());
  const nlohmann::ordered_json& list = h["tensors"];
  MOE_CHECK(list.is_array() && list.size() == tensors.size(), what, ": holds ", list.size(),
            " tensors, this model has ", tensors.size());
  size_t floats = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = list[i].value("name", "");
    const size_t n = list[i].value("size", size_t(0));
    MOE_CHECK(name == tensors[i].name && n == tensors[i].value->size(), what, ": tensor ", i, " is ",
              name, " (", n, " values), this model expects ", tensors[i].name, " (",
              tensors[i].value->size(), " values)");
    floats += n * (tensors[i].trainable ? 3 : 1);  // value, and m, v when trainable
  }
  const size_t data_at = header_at + header_len;
  MOE_CHECK(body - data_at == floats * sizeof(float), what, ": corrupt (", body - data_at,
            " bytes of tensor data, expected ", floats * sizeof(float), ")");

  const char* cursor = p + data_at;
  auto read_into = [&cursor](std::vector<float>& v) {
    std::memcpy(v.data(), cursor, v.size() * sizeof(float));
    cursor += v.size() * sizeof(float);
  };
  const int64_t step = h.value("step", int64_t(0)), adam_t = h.value("adam_t", int64_t(0));
  MOE_CHECK(step >= 0 && adam_t == step, what, ": corrupt (step ", step, ", optimiser step ",
            adam_t, ")");
  for (TensorRef& t : tensors) read_into(*t.value);
  AdamW& opt = model_->optimizer();
  opt.init(tensors);
  for (size_t i = 0; i < opt.m.size(); ++i) {
    read_into(opt.m[i]);
    read_into(opt.v[i]);
  }
  opt.t = adam_t;
  step_ = step;
  model_->state_written();
}

}  // namespace moe::model
