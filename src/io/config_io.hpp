// defines: moe::io::config_to_strings, config_from_strings, config_to_json, stats_to_json
// LayerConfig and LoadStats as text (safetensors metadata) and as JSON (result lines). The field
// names are the struct's own (`top_k`, `capacity_factor`, ...); one table in config_io.cpp lists
// them, so export, replay and the JSONL results can never disagree about a field.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "moe/config.hpp"
#include "moe/stats.hpp"

namespace moe::io {

// Every field as a string; doubles in shortest round-trip form, enums by name.
std::map<std::string, std::string> config_to_strings(const LayerConfig& cfg);
// The inverse; every field must be present and parse. Errors: ConfigError("SOURCE: ...").
// The result is validated.
LayerConfig config_from_strings(const std::map<std::string, std::string>& fields,
                                const std::string& source);

nlohmann::ordered_json config_to_json(const LayerConfig& cfg);
nlohmann::ordered_json stats_to_json(const LoadStats& stats);

}  // namespace moe::io
