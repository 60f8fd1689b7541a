// defines: moe::io::git_revision, iso_timestamp, host_cpu, result_record, append_jsonl
#include "io/jsonl.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>

#include "io/files.hpp"
#include "moe/check.hpp"
#include "moe_build_info.hpp"  // defines: MOE_GIT_REVISION (generated at configure time)

namespace moe::io {

std::string git_revision() { return MOE_GIT_REVISION; }

std::string iso_timestamp() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

std::string host_cpu() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) break;
    size_t start = line.find_first_not_of(" \t", colon + 1);
    if (start == std::string::npos) break;
    return line.substr(start);
  }
  return "unknown cpu";
}

nlohmann::ordered_json result_record(std::string_view command) {
  return {{"command", std::string(command)}, {"git", git_revision()}, {"timestamp", iso_timestamp()}};
}

void append_jsonl(const std::string& path, const nlohmann::ordered_json& record) {
  check_output_path(path);
  const std::string line =
      record.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) MOE_FAIL(path, ": cannot open for appending: ", std::strerror(errno));
  const off_t before = ::lseek(fd, 0, SEEK_END);
  ssize_t n;
  do {
    n = ::write(fd, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
  const int err = errno;
  if (n != static_cast<ssize_t>(line.size())) {
    // A short write (disk full) would leave half a line: cut it off again.
    // (If even that fails there is nothing better to do than report the first error.)
    if (before >= 0 && ::ftruncate(fd, before) != 0) {
    }
    ::close(fd);
    MOE_FAIL(path, ": append failed: ", n < 0 ? std::strerror(err) : "short write");
  }
  if (::close(fd) != 0) MOE_FAIL(path, ": close failed: ", std::strerror(errno));
}

}  // namespace moe::io
