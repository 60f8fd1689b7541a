// defines: moe::Error, moe::ConfigError, MOE_CHECK, MOE_FAIL
// Every invalid input becomes one exception with a one-line message naming the field and what is
// allowed; the CLI turns ConfigError into exit code 2. Internal invariants use MOE_ASSERT (file:line).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

// Bad input from the user: a configuration, a file, an argument.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Broken invariant or failed runtime call inside the library.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace moe

#define MOE_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) throw ::moe::ConfigError(::moe::detail::concat(__VA_ARGS__));   \
  } while (0)

#define MOE_FAIL(...) throw ::moe::ConfigError(::moe::detail::concat(__VA_ARGS__))

#define MOE_ASSERT(cond)                                                              \
  do {                                                                                \
    if (!(cond))                                                                      \
      throw ::moe::Error(::moe::detail::concat(__FILE__, ":", __LINE__,               \
                                               ": internal check failed: ", #cond));  \
  } while (0)
