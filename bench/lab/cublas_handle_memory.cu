// cublas_handle_memory: how much device memory a cuBLAS handle takes (at creation, at its first
// GEMM, with a workspace of its own), measured with cudaMemGetInfo. Lab-only, no project code.
//   nvcc -O2 -gencode arch=compute_90a,code=sm_90a bench/lab/cublas_handle_memory.cu -lcublas -o cublas_mem
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cstdio>
static size_t free_now() { size_t f, t; cudaDeviceSynchronize(); cudaMemGetInfo(&f, &t); return f; }
static void gemm(cublasHandle_t h, void* a, void* b, void* c) {
  const float one = 1.f, zero = 0.f;
  cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 16, 8192, 1024, &one, b, CUDA_R_16BF, 16, a, CUDA_R_16BF,
               1024, &zero, c, CUDA_R_32F, 16, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
int main() {
  void *a, *b, *c, *ws;
  cudaMalloc(&a, 8192 * 1024 * 2); cudaMalloc(&b, 1024 * 16 * 2); cudaMalloc(&c, 8192 * 16 * 4);
  cudaMalloc(&ws, 4 << 20);
  const double MiB = 1 << 20;
  size_t f0 = free_now();
  cublasHandle_t h1; cublasCreate(&h1);
  size_t f1 = free_now();
  gemm(h1, a, b, c);
  size_t f2 = free_now();
  cublasHandle_t h2; cublasCreate(&h2);
  size_t f3 = free_now();
  cublasSetWorkspace(h2, ws, 4 << 20);
  gemm(h2, a, b, c);
  size_t f4 = free_now();
  cublasHandle_t h3; cublasCreate(&h3);
  cublasSetWorkspace(h3, ws, 4 << 20);
  size_t f5 = free_now();
  gemm(h3, a, b, c);
  size_t f6 = free_now();
  std::printf("first handle: create %.1f MiB, first GEMM %.1f MiB\n", (f0 - f1) / MiB, (f1 - f2) / MiB);
  std::printf("second handle: create %.1f MiB, own 4 MiB workspace + GEMM %.1f MiB\n", (f2 - f3) / MiB, (f3 - f4) / MiB);
  std::printf("third handle: create + set workspace %.1f MiB, GEMM %.1f MiB\n", (f4 - f5) / MiB, (f5 - f6) / MiB);
  return 0;
}
