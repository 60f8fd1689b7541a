// defines: moe::io::check_output_path, write_file_atomically, read_file
// Output files are written whole or not at all: the bytes go to `path.tmp.<pid>` beside the
// target, which is renamed over it only after a successful write and fsync. Any failure removes
// the temporary file and throws ConfigError naming the path.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe::io {

// Throws ConfigError("PATH: ...") unless `path` names a file that could be created or replaced:
// its directory exists and is writable, and the path is not itself a directory. Called before
// any long computation, so a bad --out fails in milliseconds.
void check_output_path(const std::string& path);

// Writes `bytes` to `path` atomically (temporary file + rename).
void write_file_atomically(const std::string& path, std::string_view bytes);

// Whole file as bytes; ConfigError("PATH: cannot open ...") when it cannot be read.
std::vector<uint8_t> read_file(const std::string& path);

}  // namespace moe::io
