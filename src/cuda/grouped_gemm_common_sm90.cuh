// defines: MOE_CUTLASS_CHECK, moe::cuda::grouped_gemm::{WorkspaceCarver, PtrArrayCarve,
//          hardware_info, set_uniform_alpha_beta, prepare_threads}
// What the three grouped-GEMM assemblies (grouped_gemm{,_wgrad,_act}_sm90.cuh) share: the CUTLASS
// status check, carving one workspace into per-expert arrays, and the argument details every
// ptr-array kernel needs. Included only from those .cuh files.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.h>

#include "moe/check.hpp"
#include "moe/cuda/check.cuh"

#ifndef MOE_CUTLASS_CHECK
#define MOE_CUTLASS_CHECK(expr)                                                            \
  do {                                                                                     \
    const cutlass::Status moe_cutlass_st_ = (expr);                                        \
    if (moe_cutlass_st_ != cutlass::Status::kSuccess)                                      \
      throw ::moe::Error(::moe::detail::concat(__FILE__, ":", __LINE__, ": ", #expr,       \
                                               " failed: ",                                \
                                               cutlassGetStatusString(moe_cutlass_st_)));  \
  } while (0)
#endif

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the grouped GEMMs need CUDA 12.3+ (device-modifiable TMA descriptors)"
#endif

namespace moe::cuda::grouped_gemm {

// Hands out consecutive pieces of one workspace, each on a 256-byte boundary (TMA descriptors built
// from the pointer arrays want 16 bytes; 256 keeps every array on its own cache lines). With a null
// base it only counts: carve once with nullptr for the size, once with the allocation.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    void* q = base_ ? base_ + at_ : nullptr;
    at_ += (count * sizeof(T) + 255) / 256 * 256;
    return static_cast<T*>(q);
  }
  void* take_bytes(size_t bytes) { return take<char>(bytes); }
  size_t bytes() const { return at_; }

 private:
  char* base_;
  size_t at_ = 0;
};

// The workspace of every ptr-array kernel here, carved in this order: the per-expert problems,
// pointers and strides the prepare kernel writes, the tile count (the deferred epilogues';
// unused otherwise), then CUTLASS's own. Only the TMA epilogues (Kernel, WgradKernel) read ptr_d
// and stride_d; the register epilogues find their rows themselves.
template <class ElementAB, class ElementD, class Problem, class StrideA, class StrideB,
          class StrideD>
struct PtrArrayCarve {
  Problem* problems;         // (E)
  const ElementAB** ptr_a;   // (E)
  const ElementAB** ptr_b;   // (E)
  ElementD** ptr_d;          // (E)
  StrideA* stride_a;         // (E)
  StrideB* stride_b;         // (E)
  StrideD* stride_d;         // (E)
  int32_t* tile_count;       // (1)
  void* cutlass;             // Gemm::get_workspace_size
  size_t bytes;              // total

  static PtrArrayCarve make(void* base, int64_t groups, size_t cutlass_bytes) {
    WorkspaceCarver w(base);
    const size_t g = static_cast<size_t>(groups);
    PtrArrayCarve c{};
    c.problems = w.take<Problem>(g);
    c.ptr_a = w.take<const ElementAB*>(g);
    c.ptr_b = w.take<const ElementAB*>(g);
    c.ptr_d = w.take<ElementD*>(g);
    c.stride_a = w.take<StrideA>(g);
    c.stride_b = w.take<StrideB>(g);
    c.stride_d = w.take<StrideD>(g);
    c.tile_count = w.take<int32_t>(1);
    c.cutlass = w.take_bytes(cutlass_bytes);
    c.bytes = w.bytes();
    return c;
  }
};

inline cutlass::KernelHardwareInfo hardware_info(int sm_count) {
  cutlass::KernelHardwareInfo hw;
  MOE_CUDA_CHECK(cudaGetDevice(&hw.device_id));
  hw.sm_count = sm_count;
  return hw;
}

// One alpha and one beta for every expert (no per-group scalars or pointers).
template <class Thread>
void set_uniform_alpha_beta(Thread& f, float alpha, float beta) {
  f.alpha = alpha;
  f.beta = beta;
  f.alpha_ptr = nullptr;
  f.beta_ptr = nullptr;
  f.alpha_ptr_array = nullptr;
  f.beta_ptr_array = nullptr;
  f.dAlpha = {cute::_0{}, cute::_0{}, 0};
  f.dBeta = {cute::_0{}, cute::_0{}, 0};
}

// Threads of the <<<1, threads>>> prepare kernel: one per expert up to 1024, whole warps.
inline int prepare_threads(int64_t groups) {
  return static_cast<int>(std::min<int64_t>(1024, (groups + 31) / 32 * 32));
}

}  // namespace moe::cuda::grouped_gemm
