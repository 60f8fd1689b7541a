// defines: moe::io::check_output_path, write_file_atomically, read_file
#include "io/files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "moe/check.hpp"

namespace moe::io {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

std::string parent_dir(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// Closes the descriptor and removes the temporary file unless released.
struct TempFile {
  std::string path;
  int fd = -1;
  bool keep = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

}  // namespace

void check_output_path(const std::string& path) {
  MOE_CHECK(!path.empty(), "output path is empty");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) MOE_FAIL(path, ": is a directory, expected a file name");
    // Never rename over a device, pipe or socket.
    if (!S_ISREG(st.st_mode)) MOE_FAIL(path, ": exists and is not a regular file");
  }
  const std::string dir = parent_dir(path);
  if (::stat(dir.c_str(), &st) != 0)
    MOE_FAIL(path, ": directory '", dir, "' does not exist");
  if (!S_ISDIR(st.st_mode)) MOE_FAIL(path, ": '", dir, "' is not a directory");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    MOE_FAIL(path, ": directory '", dir, "' is not writable");
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  check_output_path(path);
  TempFile tmp;
  tmp.path = path + ".tmp." + std::to_string(::getpid());
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (tmp.fd < 0) {
    const int err = errno;
    tmp.keep = true;  // nothing was created
    MOE_FAIL(path, ": cannot create '", tmp.path, "': ", errno_text(err));
  }
  const char* data = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(tmp.fd, data, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      MOE_FAIL(path, ": write failed: ", errno_text(errno));
    }
    data += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(tmp.fd) != 0) MOE_FAIL(path, ": fsync failed: ", errno_text(errno));
  const int fd = tmp.fd;
  tmp.fd = -1;
  if (::close(fd) != 0) MOE_FAIL(path, ": close failed: ", errno_text(errno));
  if (::rename(tmp.path.c_str(), path.c_str()) != 0)
    MOE_FAIL(path, ": cannot rename '", tmp.path, "' into place: ", errno_text(errno));
  tmp.keep = true;
}

std::vector<uint8_t> read_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) MOE_FAIL(path, ": cannot open: ", errno_text(errno));
  if (S_ISDIR(st.st_mode)) MOE_FAIL(path, ": is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) MOE_FAIL(path, ": cannot open for reading");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) MOE_FAIL(path, ": cannot determine the file size");
  in.seekg(0, std::ios::beg);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    MOE_FAIL(path, ": read failed");
  return bytes;
}

}  // namespace moe::io
