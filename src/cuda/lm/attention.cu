// defines: AttentionState::bytes, AttentionState::bind, attention_forward, attention_backward,
//          attention_scratch_bytes (moe::cuda::lm)
// Causal multi-head attention as permute -> batched GEMM -> causal softmax -> batched GEMM ->
// unpermute, one cuBLAS strided-batched GEMM over the B*NH heads per product (the upper triangle
// is computed and ignored: at S <= 1024 the wasted half costs less than a masked kernel of ours).
//
// Buffers (bf16 unless marked):
//   state    q | k | v (3, B,NH,S,hs) head-major, contiguous;  att (B,NH,S,S) probabilities
//   scratch  scores (B,NH,S,S) fp32 — forward: q k^T * scale; backward: datt = dout v^T, then
//            overwritten row by row with dscores in bf16 at a row stride of 2S elements (the
//            first half of each fp32 row), so backward needs no second S x S buffer;
//            tmp (B,NH,S,hs) — forward: out head-major; backward: dout head-major;
//            dqkv_h (3, B,NH,S,hs) — backward: dq | dk | dv head-major.
// Scores stay fp32 until the softmax: rounding them to bf16 would put an absolute error of
// 2^-9 |score| into each exponent. Probabilities and dscores are bf16 (GEMM operands).
#include <cuda_bf16.h>

#include <cmath>

#include "../warp.cuh"
#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr int kRowWarps = 8;  // softmax rows per block (one warp each)

struct Dims {
  int64_t B, S, D, NH, hs, N, BH;
};
Dims dims(int64_t B, int64_t S, int64_t D, int64_t NH) {
  MOE_CHECK(B >= 0 && S >= 0, "attention: B and S must be >= 0, got ", B, ", ", S);
  MOE_CHECK(NH >= 1 && D >= 1 && D % NH == 0, "attention: NH (", NH, ") must divide D (", D,
            ")");
  return {B, S, D, NH, D / NH, B * S, B * NH};
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// Between token-major (B,S,P,NH,hs) — the (N, P*D) activations — and head-major P x (B,NH,S,hs).
// One thread per kVec elements in token-major order (kVec divides hs, so a vector stays inside
// one head); kToHeads picks the direction.
template <int kVec, bool kToHeads>
__global__ void permute_heads_kernel(bf16* dst, const bf16* src, int64_t B, int64_t S,
                                     int64_t NH, int64_t hs, int64_t P) {
  const int64_t D = NH * hs, N = B * S, row = P * D;
  const int64_t total = N * row / kVec;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t flat = i * kVec;  // token-major element index
    const int64_t n = flat / row, within = flat % row;
    const int64_t p = within / D, h = (within % D) / hs, e = within % hs;
    const int64_t b = n / S, s = n % S;
    const int64_t head = p * N * D + ((b * NH + h) * S + s) * hs + e;
    const int64_t from = kToHeads ? flat : head, to = kToHeads ? head : flat;
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint4*>(dst + to) = *reinterpret_cast<const uint4*>(src + from);
    } else {
      dst[to] = src[from];
    }
  }
}

// att (rows,S) bf16 = causal softmax of the fp32 scores, row = (b*NH + h)*S + t keeps t2 <= t
// and writes zeros above the diagonal (the att*v GEMM reads whole rows). One warp per row.
__global__ void __launch_bounds__(kRowWarps * 32)
    causal_softmax_forward_kernel(bf16* att, const float* scores, int64_t rows, int64_t S) {
  const int64_t row = int64_t{blockIdx.x} * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = row % S;
  const float* x = scores + row * S;  // (S)
  float mx = -INFINITY;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) mx = fmaxf(mx, x[t2]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) sum += expf(x[t2] - mx);
  const float inv = 1.f / warp_sum(sum);
  bf16* a = att + row * S;  // (S)
  for (int64_t t2 = lane; t2 < S; t2 += 32)
    a[t2] = __float2bfloat16_rn(t2 <= t ? expf(x[t2] - mx) * inv : 0.f);
}

// In place: datt (rows,S) fp32 -> dscores (rows, 2S-strided) bf16 in the same memory,
// dscores[t2] = att[t2] * (datt[t2] - sum_j att[j] datt[j]) * scale for t2 <= t, 0 above.
// Writing bf16 element t2 overwrites fp32 element t2/2: chunk [c, c+32) destroys fp32 elements
// below c/2 + 16 <= c + 32, i.e. its own chunk (read before the __syncwarp) or earlier ones.
__global__ void __launch_bounds__(kRowWarps * 32)
    causal_softmax_backward_kernel(float* datt, const bf16* att, int64_t rows, int64_t S,
                                   float scale) {
  const int64_t row = int64_t{blockIdx.x} * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = row % S;
  const float* da = datt + row * S;  // (S) fp32
  const bf16* a = att + row * S;     // (S)
  float inner = 0.f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) inner += __bfloat162float(a[t2]) * da[t2];
  inner = warp_sum(inner);
  bf16* ds = reinterpret_cast<bf16*>(datt + row * S);  // (S) bf16, same row start
  for (int64_t c = 0; c < S; c += 32) {
    const int64_t t2 = c + lane;
    const float g = t2 <= t ? __bfloat162float(a[t2]) * (da[t2] - inner) * scale : 0.f;
    __syncwarp();  // every lane has read its fp32 element of this chunk
    if (t2 < S) ds[t2] = __float2bfloat16_rn(g);
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

void permute_heads(bf16* dst, const bf16* src, const Dims& d, int64_t P, bool to_heads,
                   cudaStream_t stream) {
  const int64_t total = d.N * P * d.D;
  if (total == 0) return;
  const bool vec = d.hs % 8 == 0 && detail::is_aligned16(dst) && detail::is_aligned16(src);
  const int64_t work = vec ? total / 8 : total;
  const unsigned grid = detail::grid_for(work);
  if (vec && to_heads) {
    permute_heads_kernel<8, true><<<grid, 256, 0, stream>>>(dst, src, d.B, d.S, d.NH, d.hs, P);
  } else if (vec) {
    permute_heads_kernel<8, false><<<grid, 256, 0, stream>>>(dst, src, d.B, d.S, d.NH, d.hs, P);
  } else if (to_heads) {
    permute_heads_kernel<1, true><<<grid, 256, 0, stream>>>(dst, src, d.B, d.S, d.NH, d.hs, P);
  } else {
    permute_heads_kernel<1, false><<<grid, 256, 0, stream>>>(dst, src, d.B, d.S, d.NH, d.hs, P);
  }
  MOE_CUDA_LAUNCH_CHECK();
}

struct Scratch {
  float* scores;  // (B,NH,S,S) fp32; in backward later bf16 dscores at row stride 2S
  bf16* tmp;      // (B,NH,S,hs)
  bf16* dqkv_h;   // (3, B,NH,S,hs)
};
Scratch carve_scratch(void* base, const Dims& d) {
  char* cursor = static_cast<char*>(base);
  Scratch s;
  s.scores = detail::carve<float>(cursor, d.BH * d.S * d.S);
  s.tmp = detail::carve<bf16>(cursor, d.N * d.D);
  s.dqkv_h = detail::carve<bf16>(cursor, 3 * d.N * d.D);
  return s;
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps); }

}  // namespace

size_t AttentionState::bytes(int64_t B, int64_t S, int64_t D, int64_t NH) {
  const Dims d = dims(B, S, D, NH);
  return detail::align_up(static_cast<size_t>(3 * d.N * d.D) * sizeof(bf16)) +
         detail::align_up(static_cast<size_t>(d.BH * d.S * d.S) * sizeof(bf16));
}

void AttentionState::bind(void* base, int64_t B, int64_t S, int64_t D, int64_t NH) {
  const Dims d = dims(B, S, D, NH);
  char* cursor = static_cast<char*>(base);
  q = detail::carve<bf16>(cursor, 3 * d.N * d.D);  // q | k | v contiguous: one permute fills all
  k = q + d.N * d.D;
  v = k + d.N * d.D;
  att = detail::carve<bf16>(cursor, d.BH * d.S * d.S);
}

size_t attention_scratch_bytes(int64_t B, int64_t S, int64_t D, int64_t NH) {
  const Dims d = dims(B, S, D, NH);
  return detail::align_up(static_cast<size_t>(d.BH * d.S * d.S) * sizeof(float)) +
         detail::align_up(static_cast<size_t>(d.N * d.D) * sizeof(bf16)) +
         detail::align_up(static_cast<size_t>(3 * d.N * d.D) * sizeof(bf16));
}

void attention_forward(cublasHandle_t handle, bf16* out, AttentionState& st, const bf16* qkv,
                       int64_t B, int64_t S, int64_t D, int64_t NH, void* scratch,
                       cudaStream_t stream) {
  const Dims d = dims(B, S, D, NH);
  if (d.N == 0) return;
  MOE_CHECK(scratch && st.q && st.att, "attention_forward: scratch or state not bound");
  const Scratch sc = carve_scratch(scratch, d);
  const int64_t S2 = d.S * d.S, Shs = d.S * d.hs;
  const float scale = 1.f / std::sqrt(static_cast<float>(d.hs));
  // Step 1: qkv (B,S,3,NH,hs) -> q | k | v (3, B,NH,S,hs)
  permute_heads(st.q, qkv, d, 3, true, stream);
  // Step 2: scores (S,S) fp32 = q (S,hs) k^T * scale, per head
  detail::gemm(handle, false, true, d.S, d.S, d.hs, scale, st.q, d.hs, Shs, st.k, d.hs, Shs, 0.f,
               sc.scores, d.S, S2, d.BH, stream);
  // Step 3: causal softmax -> att bf16
  causal_softmax_forward_kernel<<<row_grid(d.BH * d.S), kRowWarps * 32, 0, stream>>>(
      st.att, sc.scores, d.BH * d.S, d.S);
  MOE_CUDA_LAUNCH_CHECK();
  // Step 4: out_h (S,hs) = att (S,S) v (S,hs), per head
  detail::gemm(handle, false, false, d.S, d.hs, d.S, 1.f, st.att, d.S, S2, st.v, d.hs, Shs, 0.f,
               sc.tmp, d.hs, Shs, d.BH, stream);
  // Step 5: (B,NH,S,hs) -> out (B,S,NH,hs)
  permute_heads(out, sc.tmp, d, 1, false, stream);
}

void attention_backward(cublasHandle_t handle, bf16* dqkv, const bf16* dout,
                        const AttentionState& st, int64_t B, int64_t S, int64_t D, int64_t NH,
                        void* scratch, cudaStream_t stream) {
  const Dims d = dims(B, S, D, NH);
  if (d.N == 0) return;
  MOE_CHECK(scratch && st.q && st.att, "attention_backward: scratch or state not bound");
  const Scratch sc = carve_scratch(scratch, d);
  const int64_t S2 = d.S * d.S, Shs = d.S * d.hs, ND = d.N * d.D;
  const float scale = 1.f / std::sqrt(static_cast<float>(d.hs));
  bf16* dout_h = sc.tmp;
  bf16* dq = sc.dqkv_h;
  bf16* dk = dq + ND;
  bf16* dv = dk + ND;
  // Step 1: dout (B,S,NH,hs) -> dout_h (B,NH,S,hs)
  permute_heads(dout_h, dout, d, 1, true, stream);
  // Step 2: datt (S,S) fp32 = dout_h (S,hs) v^T
  detail::gemm(handle, false, true, d.S, d.S, d.hs, 1.f, dout_h, d.hs, Shs, st.v, d.hs, Shs, 0.f,
               sc.scores, d.S, S2, d.BH, stream);
  // Step 3: dv (S,hs) = att^T (S,S) dout_h (S,hs)
  detail::gemm(handle, true, false, d.S, d.hs, d.S, 1.f, st.att, d.S, S2, dout_h, d.hs, Shs, 0.f,
               dv, d.hs, Shs, d.BH, stream);
  // Step 4: softmax backward, in place: dscores bf16 (S, row stride 2S)
  causal_softmax_backward_kernel<<<row_grid(d.BH * d.S), kRowWarps * 32, 0, stream>>>(
      sc.scores, st.att, d.BH * d.S, d.S, scale);
  MOE_CUDA_LAUNCH_CHECK();
  const bf16* dscores = reinterpret_cast<const bf16*>(sc.scores);
  // Step 5: dq (S,hs) = dscores (S,S) k;  dk (S,hs) = dscores^T q
  detail::gemm(handle, false, false, d.S, d.hs, d.S, 1.f, dscores, 2 * d.S, 2 * S2, st.k, d.hs,
               Shs, 0.f, dq, d.hs, Shs, d.BH, stream);
  detail::gemm(handle, true, false, d.S, d.hs, d.S, 1.f, dscores, 2 * d.S, 2 * S2, st.q, d.hs,
               Shs, 0.f, dk, d.hs, Shs, d.BH, stream);
  // Step 6: dq | dk | dv (3, B,NH,S,hs) -> dqkv (B,S,3,NH,hs)
  permute_heads(dqkv, sc.dqkv_h, d, 3, false, stream);
}

}  // namespace moe::cuda::lm
