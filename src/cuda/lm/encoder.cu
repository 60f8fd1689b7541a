// defines: encoder_forward, encoder_backward (moe::cuda::lm)
// Byte embedding + learned position. Forward is elementwise (float4 when D % 4 == 0). Backward's
// dwte rows are sums over the tokens equal to v, which have no fixed place in the batch: one block
// per (vocabulary row, 1024-column slice) scans the tokens in order, compacts the matching token
// indices of each 256-token chunk into shared memory (ballot + per-warp prefix, order kept) and
// adds those dout rows, thread t owning columns t, t+256, t+512, t+768. The sum starts from the
// existing dwte value and follows token order, exactly the CPU reference's float operations.
#include <cuda_bf16.h>

#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColsPerThread = 4;                          // registers of the running sums
constexpr int kColsPerBlock = kThreads * kColsPerThread;  // 1024 columns per block

// ---------------------------------------------------------------------------------------------
// CUDA kernels

template <int kVec>
__global__ void encoder_forward_kernel(float* out, const int32_t* tokens, const float* wte,
                                       const float* wpe, int64_t N, int64_t S, int64_t D) {
  const int64_t dv = D / kVec;  // vectors per row
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < N * dv;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = i / dv, c = (i % dv) * kVec, s = n % S;
    const int64_t tok = tokens[n];
    if constexpr (kVec == 4) {
      const float4 e = *reinterpret_cast<const float4*>(wte + tok * D + c);
      const float4 p = *reinterpret_cast<const float4*>(wpe + s * D + c);
      *reinterpret_cast<float4*>(out + n * D + c) =
          make_float4(e.x + p.x, e.y + p.y, e.z + p.z, e.w + p.w);
    } else {
      out[n * D + c] = wte[tok * D + c] + wpe[s * D + c];
    }
  }
}

// dwpe (S,D) += sum over b of dout (B,S,D), b ascending: one thread per (s, column).
__global__ void encoder_backward_wpe_kernel(float* dwpe, const float* dout, int64_t B, int64_t S,
                                            int64_t D) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < S * D;
       i += int64_t{gridDim.x} * blockDim.x) {
    float acc = dwpe[i];
    for (int64_t b = 0; b < B; ++b) acc += dout[b * S * D + i];
    dwpe[i] = acc;
  }
}

// grid (V, ceil(D / 1024)), 256 threads.
__global__ void __launch_bounds__(kThreads)
    encoder_backward_wte_kernel(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                                int64_t D) {
  __shared__ int32_t s_rows[kThreads];  // matching token indices of this chunk, in order
  __shared__ int s_warp_count[kWarps];
  const int32_t v = static_cast<int32_t>(blockIdx.x);
  const int64_t col0 = int64_t{blockIdx.y} * kColsPerBlock + threadIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // Step 1: running sums start from the existing gradient (the CPU adds into it).
  float acc[kColsPerThread];
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t c = col0 + j * kThreads;
    acc[j] = c < D ? dwte[int64_t{v} * D + c] : 0.f;
  }

  for (int64_t base = 0; base < N; base += kThreads) {
    // Step 2: compact this chunk's tokens equal to v, keeping token order.
    const int64_t n = base + threadIdx.x;
    const bool match = n < N && tokens[n] == v;
    const unsigned ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) s_warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, count = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? s_warp_count[w] : 0;
      count += s_warp_count[w];
    }
    if (match) s_rows[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(n);
    __syncthreads();
    // Step 3: add the matching rows in order (each access is 256 contiguous floats).
    for (int r = 0; r < count; ++r) {
      const float* g = dout + int64_t{s_rows[r]} * D;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t c = col0 + j * kThreads;
        if (c < D) acc[j] += g[c];
      }
    }
    __syncthreads();  // s_rows and s_warp_count are rewritten by the next chunk
  }

#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t c = col0 + j * kThreads;
    if (c < D) dwte[int64_t{v} * D + c] = acc[j];
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

void encoder_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                     int64_t B, int64_t S, int64_t D, cudaStream_t stream) {
  const int64_t N = B * S;
  if (N == 0 || D == 0) return;
  using detail::is_aligned16;
  if (D % 4 == 0 && is_aligned16(out) && is_aligned16(wte) && is_aligned16(wpe)) {
    encoder_forward_kernel<4><<<detail::grid_for(N * D / 4), 256, 0, stream>>>(out, tokens, wte,
                                                                             wpe, N, S, D);
  } else {
    encoder_forward_kernel<1><<<detail::grid_for(N * D), 256, 0, stream>>>(out, tokens, wte, wpe,
                                                                         N, S, D);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void encoder_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                      int64_t B, int64_t S, int64_t D, int64_t V, cudaStream_t stream) {
  const int64_t N = B * S;
  if (N == 0 || D == 0) return;
  MOE_CHECK(V >= 1 && V <= INT32_MAX, "encoder_backward: V must be in [1, 2^31), got ", V);
  encoder_backward_wpe_kernel<<<detail::grid_for(S * D), 256, 0, stream>>>(dwpe, dout, B, S, D);
  MOE_CUDA_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(V),
                  static_cast<unsigned>((D + kColsPerBlock - 1) / kColsPerBlock));
  encoder_backward_wte_kernel<<<grid, kThreads, 0, stream>>>(dwte, dout, tokens, N, D);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda::lm
