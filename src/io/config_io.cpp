// defines: moe::io::config_to_strings, config_from_strings, config_to_json, stats_to_json
#include "io/config_io.hpp"

#include <charconv>
#include <fmt/format.h>
#include <system_error>
#include <type_traits>

#include "moe/check.hpp"

namespace moe::io {

namespace {

// The one list of LayerConfig fields. `f(name, member)` is called for each, in struct order.
template <class Config, class F>
void for_each_field(Config& c, F&& f) {
  f("tokens", c.tokens);
  f("hidden", c.hidden);
  f("inter", c.inter);
  f("experts", c.experts);
  f("top_k", c.top_k);
  f("shared_experts", c.shared_experts);
  f("activation", c.activation);
  f("router", c.router);
  f("training", c.training);
  f("seed", c.seed);
  f("layout", c.layout);
  f("capacity_factor", c.capacity_factor);
  f("block_size", c.block_size);
  f("renormalize", c.renormalize);
  f("second_policy", c.second_policy);
  f("second_threshold", c.second_threshold);
  f("aux_coef", c.aux_coef);
  f("z_coef", c.z_coef);
  f("importance_coef", c.importance_coef);
  f("load_coef", c.load_coef);
  f("noise_epsilon", c.noise_epsilon);
  f("jitter", c.jitter);
  f("slots_per_expert", c.slots_per_expert);
  f("route_scale", c.route_scale);
  f("bias_update_rate", c.bias_update_rate);
  f("iterations", c.iterations);
  f("sequence_length", c.sequence_length);
}

template <class T>
constexpr bool is_enum_field = std::is_same_v<T, Router> || std::is_same_v<T, Layout> ||
                               std::is_same_v<T, Activation> || std::is_same_v<T, SecondPolicy>;

template <class T>
std::string to_text(const T& v) {
  if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
  else if constexpr (is_enum_field<T>) return std::string(name(v));
  else return fmt::format("{}", v);  // doubles: shortest form that reads back exactly
}

template <class T>
void from_text(const std::string& text, T& v, const std::string& where) {
  if constexpr (std::is_same_v<T, bool>) {
    MOE_CHECK(text == "true" || text == "false", where, " = '", text, "' is not true/false");
    v = text == "true";
  } else if constexpr (std::is_same_v<T, Router>) {
    v = parse_router(text, where);
  } else if constexpr (std::is_same_v<T, Layout>) {
    v = parse_layout(text, where);
  } else if constexpr (std::is_same_v<T, Activation>) {
    v = parse_activation(text, where);
  } else if constexpr (std::is_same_v<T, SecondPolicy>) {
    v = parse_second_policy(text, where);
  } else {
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, v);
    MOE_CHECK(ec == std::errc() && ptr == end && !text.empty(), where, " = '", text,
              "' is not a valid ", std::is_floating_point_v<T> ? "number" : "integer");
  }
}

template <class T>
nlohmann::ordered_json to_json_value(const T& v) {
  if constexpr (is_enum_field<T>) return std::string(name(v));
  else return v;
}

}  // namespace

std::map<std::string, std::string> config_to_strings(const LayerConfig& cfg) {
  std::map<std::string, std::string> out;
  for_each_field(cfg, [&](const char* key, const auto& v) { out[key] = to_text(v); });
  return out;
}

LayerConfig config_from_strings(const std::map<std::string, std::string>& fields,
                                const std::string& source) {
  LayerConfig cfg;
  for_each_field(cfg, [&](const char* key, auto& v) {
    const auto it = fields.find(key);
    MOE_CHECK(it != fields.end(), source, ": metadata has no '", key, "'");
    from_text(it->second, v, source + ": metadata '" + key + "'");
  });
  try {
    cfg.validate();
  } catch (const ConfigError& e) {
    MOE_FAIL(source, ": stored configuration is invalid: ", e.what());
  }
  return cfg;
}

nlohmann::ordered_json config_to_json(const LayerConfig& cfg) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for_each_field(cfg, [&](const char* key, const auto& v) { out[key] = to_json_value(v); });
  return out;
}

nlohmann::ordered_json stats_to_json(const LoadStats& s) {
  return {{"tokens_per_expert", s.tokens_per_expert},
          {"cv", s.cv},
          {"max_violation", s.max_violation},
          {"drop_rate", s.drop_rate},
          {"router_entropy", s.router_entropy},
          {"mean_entropy", s.mean_entropy},
          {"tokens_without_expert", s.tokens_without_expert}};
}

}  // namespace moe::io
