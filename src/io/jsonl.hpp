// defines: moe::io::git_revision, iso_timestamp, host_cpu, result_record, append_jsonl
// Results are JSON lines: one object per line, each carrying the command that made it, the git
// revision of the build and a UTC timestamp, so a line can be traced back without its neighbours.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace moe::io {

// Short git revision of the source tree at configure time ("unknown" outside a git checkout).
std::string git_revision();
// Current UTC time as ISO 8601, e.g. "2026-11-26T14:03:07Z".
std::string iso_timestamp();
// The host CPU's model name from /proc/cpuinfo ("unknown cpu" when unreadable).
std::string host_cpu();
// {"command": command, "git": git_revision(), "timestamp": iso_timestamp()}
nlohmann::ordered_json result_record(std::string_view command);
// Appends `record` as one line (compact JSON + '\n') to `path`, creating the file when missing.
// The line goes out in one write, so a failed append never leaves half a line behind; errors are
// ConfigError("PATH: ...").
void append_jsonl(const std::string& path, const nlohmann::ordered_json& record);

}  // namespace moe::io
