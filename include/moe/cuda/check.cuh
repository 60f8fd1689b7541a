// defines: MOE_CUDA_CHECK, MOE_CUBLAS_CHECK, MOE_CUDA_LAUNCH_CHECK, MOE_DEVICE_ASSERT,
//          moe::cuda::has_device
// Every CUDA runtime and cuBLAS call is checked; a failure throws moe::Error with file:line and the
// failing expression, so the CLI can print one line and exit non-zero. A launch is checked right
// after it (cudaGetLastError catches bad configurations; faults inside kernels surface at the next
// synchronising call, which is checked too).
// The helpers live in moe::cuda::check_detail, not moe::cuda::detail: a nested `detail` would hide
// moe::detail (concat) from code inside moe::cuda.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "moe/check.hpp"

namespace moe::cuda::check_detail {
[[noreturn]] inline void throw_cuda(cudaError_t err, const char* expr, const char* file, int line) {
  throw ::moe::Error(::moe::detail::concat(file, ":", line, ": ", expr, " failed: ",
                                           cudaGetErrorName(err), " (", cudaGetErrorString(err),
                                           ")"));
}
[[noreturn]] inline void throw_cublas(cublasStatus_t st, const char* expr, const char* file,
                                      int line) {
  throw ::moe::Error(::moe::detail::concat(file, ":", line, ": ", expr, " failed: ",
                                           cublasGetStatusName(st), " (",
                                           cublasGetStatusString(st), ")"));
}
}  // namespace moe::cuda::check_detail

#define MOE_CUDA_CHECK(expr)                                                        \
  do {                                                                              \
    const cudaError_t moe_err_ = (expr);                                            \
    if (moe_err_ != cudaSuccess)                                                    \
      ::moe::cuda::check_detail::throw_cuda(moe_err_, #expr, __FILE__, __LINE__);         \
  } while (0)

#define MOE_CUBLAS_CHECK(expr)                                                      \
  do {                                                                              \
    const cublasStatus_t moe_st_ = (expr);                                          \
    if (moe_st_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::moe::cuda::check_detail::throw_cublas(moe_st_, #expr, __FILE__, __LINE__);        \
  } while (0)

// After every <<<...>>>: catches invalid launch configurations without synchronising.
#define MOE_CUDA_LAUNCH_CHECK() MOE_CUDA_CHECK(cudaGetLastError())

// Device-side invariant: print where, then trap (the host sees cudaErrorLaunchFailure).
#if defined(__CUDACC__)
#define MOE_DEVICE_ASSERT(cond)                                                     \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      printf("%s:%d: device check failed: %s\n", __FILE__, __LINE__, #cond);        \
      __trap();                                                                     \
    }                                                                               \
  } while (0)
#endif

namespace moe::cuda {
// True when at least one CUDA device is usable (tests skip, the CLI explains, otherwise).
inline bool has_device() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}
}  // namespace moe::cuda
