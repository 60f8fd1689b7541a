// defines: moe::cuda::lm — encoder_forward/backward, layernorm_forward/backward,
//          matmul_forward/backward, AttentionState, attention_forward/backward,
//          flash_attention_forward/backward/supported/scratch_bytes,
//          output_forward/backward, crossentropy_forward, sum_squares, clip_scale, adamw_update,
//          AdamWChunk, add_adamw_chunks, adamw_update_chunks,
//          residual_add, to_bf16, copy_fp32 (and the *_bytes helpers of their scratch)
// The transformer's own layer kinds on the GPU, for the bf16 trainer of the small byte-level LM.
// Same math and the same row-major shapes as the CPU reference (include/moe/model/layers.hpp):
// B batch rows, S positions, D model width, NH heads (hs = D/NH), N = B*S tokens, V vocabulary.
// A linear layer's weight is (C, OC): out = inp * W + b.
//
// Precision (fixed; the trainer relies on it):
//   - the residual stream is fp32 (N,D); LayerNorm outputs, qkv, attention probabilities and
//     outputs, and every GEMM operand are bf16; master weights are fp32 and the GEMMs read a bf16
//     copy of each matrix; LayerNorm gains/biases and linear biases are read as fp32;
//   - math inside kernels is fp32, cuBLAS runs with CUBLAS_COMPUTE_32F.
//
// Gradients: every WEIGHT gradient is fp32 and ACCUMULATED (+=; the caller zeroes once per step,
// so the tied embedding collects the encoder and the output head), except where a weight has one
// contributor per step and the function offers to write it (matmul_backward's
// accumulate_dweight = false), which saves the caller's zeroing. Activation gradients are
// OVERWRITTEN (=) except LayerNorm's dinp, which ADDS into the fp32 residual gradient stream —
// each function's comment says which.
//
// Determinism: no floating-point atomics; every sum over rows is per-block partials reduced in a
// fixed order, so two runs on one GPU give identical bits. No host synchronisation and no
// allocation inside: scratch comes from the caller, sized by the *_bytes helpers (each slice
// 256-byte aligned inside it), and everything runs on the given stream.
//
// Constraints: none on D, hs, S or N beyond D % NH == 0 and layernorm_backward's D <= 4096
// (moe::ConfigError otherwise). 16-byte vector paths are taken where the width and the pointers
// allow it (D % 4 for fp32 rows, hs % 8 for the head permutes) and scalar paths otherwise.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe::cuda::lm {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------------------
// encoder: byte embedding + learned position

// out (B,S,D) fp32 = wte[tokens[b,s]] + wpe[s];  tokens (B,S) in [0,V), wte (V,D), wpe (>=S,D)
void encoder_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                     int64_t B, int64_t S, int64_t D, cudaStream_t stream);
// dwte (V,D) += sum of the dout rows whose token is v, in token order; dwpe (S,D) += sum over b,
// in b order. Both start from the existing value, so the sums are the CPU reference's bits.
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                      int64_t B, int64_t S, int64_t D, int64_t V, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// layernorm (eps = moe::model::kLayerNormEps)

// out (N,D) bf16 = (inp - mean) * rstd * w + b;  mean, rstd (N) fp32 kept for backward.
void layernorm_forward(bf16* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t D, cudaStream_t stream);
// dinp (N,D) fp32 +=;  dw, db (D) fp32 +=.  Dout = bf16 or float.  D <= 4096.
// scratch: layernorm_scratch_bytes(N, D).
template <class Dout>
void layernorm_backward(float* dinp, float* dw, float* db, const Dout* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N,
                        int64_t D, void* scratch, cudaStream_t stream);
size_t layernorm_scratch_bytes(int64_t N, int64_t D);

// ---------------------------------------------------------------------------------------------
// matmul (linear layer), cuBLAS

// out (N,OC) = inp (N,C) bf16 * weight (C,OC) bf16 [+ bias (OC) fp32, may be null].
// Out = bf16 or float. accumulate (float only): out += inp * weight [+ bias].
// On the bf16 path the bias enters the GEMM's C operand rounded to bf16 (one rounding of b; the
// sum is rounded once more on output).
template <class Out>
void matmul_forward(cublasHandle_t handle, Out* out, const bf16* inp, const bf16* weight,
                    const float* bias, int64_t N, int64_t C, int64_t OC, bool accumulate,
                    cudaStream_t stream);
// dinp (N,C) = dout * weight^T, OVERWRITTEN (Dinp = bf16 or float; may be null);
// dweight (C,OC) fp32 += inp^T dout, or with accumulate_dweight = false OVERWRITTEN (beta = 0:
// never read, so it needs no zeroing); dbias (OC) fp32 += column sums of dout (may be null).
// scratch: matmul_scratch_bytes(N, OC).
template <class Dinp>
void matmul_backward(cublasHandle_t handle, Dinp* dinp, float* dweight, float* dbias,
                     const bf16* dout, const bf16* inp, const bf16* weight, int64_t N, int64_t C,
                     int64_t OC, void* scratch, cudaStream_t stream,
                     bool accumulate_dweight = true);
size_t matmul_scratch_bytes(int64_t N, int64_t OC);

// ---------------------------------------------------------------------------------------------
// causal multi-head attention: permute, batched GEMM, causal softmax, batched GEMM, unpermute

// What forward keeps for backward, carved from caller memory of AttentionState::bytes.
struct AttentionState {
  bf16* q = nullptr;    // (B,NH,S,hs) head-major copies of the q | k | v column blocks
  bf16* k = nullptr;    // (B,NH,S,hs)
  bf16* v = nullptr;    // (B,NH,S,hs)
  bf16* att = nullptr;  // (B,NH,S,S) softmax probabilities, zero above the diagonal
  static size_t bytes(int64_t B, int64_t S, int64_t D, int64_t NH);
  void bind(void* base, int64_t B, int64_t S, int64_t D, int64_t NH);
};

// qkv (N,3D) bf16 -> out (N,D) bf16, the math of moe::model::attention_forward (scale 1/sqrt(hs),
// head h = columns h*hs.. of each block). The scores are kept in fp32 until the softmax (in
// scratch: a bf16 score would carry an absolute error of 2^-9 |score| into the exponent), so
// this takes the scratch that backward uses too: attention_scratch_bytes(B, S, D, NH).
void attention_forward(cublasHandle_t handle, bf16* out, AttentionState& st, const bf16* qkv,
                       int64_t B, int64_t S, int64_t D, int64_t NH, void* scratch,
                       cudaStream_t stream);
// dqkv (N,3D) bf16 OVERWRITTEN from dout (N,D) bf16.
void attention_backward(cublasHandle_t handle, bf16* dqkv, const bf16* dout,
                        const AttentionState& st, int64_t B, int64_t S, int64_t D, int64_t NH,
                        void* scratch, cudaStream_t stream);
size_t attention_scratch_bytes(int64_t B, int64_t S, int64_t D, int64_t NH);

// ---------------------------------------------------------------------------------------------
// causal multi-head attention, fused (src/cuda/lm/flash_attention.cu)
// The same math as attention_forward/backward without the (B,NH,S,S) buffers: tiles of queries x
// keys on the chip, an online softmax in fp32, the probabilities recomputed in backward from q, k
// and lse. hs = D/NH in {32, 64, 128}; qkv, out, dout, dqkv 16-byte aligned (moe::ConfigError
// otherwise). Deterministic: no atomics, every gradient summed in a fixed order.

// true when the fused kernels handle this head size (hs = D/NH in {32, 64, 128})
bool flash_attention_supported(int64_t D, int64_t NH);
// out (N,D) bf16 from qkv (N,3D) bf16 (the same layout and math as attention_forward: causal,
// scale 1/sqrt(hs), head h = columns h*hs.. of the q|k|v blocks); lse (B,NH,S) fp32 = log-sum-exp
// of each query row's scaled scores, kept for backward.
void flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t S,
                             int64_t D, int64_t NH, cudaStream_t stream);
// dqkv (N,3D) bf16 OVERWRITTEN from dout (N,D) bf16, using out, lse and qkv of the forward;
// scratch: flash_attention_scratch_bytes.
void flash_attention_backward(bf16* dqkv, const bf16* dout, const bf16* out, const float* lse,
                              const bf16* qkv, int64_t B, int64_t S, int64_t D, int64_t NH,
                              void* scratch, cudaStream_t stream);
size_t flash_attention_scratch_bytes(int64_t B, int64_t S, int64_t D, int64_t NH);

// ---------------------------------------------------------------------------------------------
// tied output head and softmax cross-entropy

// logits (N,V) fp32 = inp (N,D) bf16 * wte^T, wte (V,D) bf16.
void output_forward(cublasHandle_t handle, float* logits, const bf16* inp, const bf16* wte,
                    int64_t N, int64_t D, int64_t V, cudaStream_t stream);
// dinp (N,D) fp32 OVERWRITTEN = dlogits * wte;  dwte (V,D) fp32 += dlogits^T inp.
void output_backward(cublasHandle_t handle, float* dinp, float* dwte, const bf16* dlogits,
                     const bf16* inp, const bf16* wte, int64_t N, int64_t D, int64_t V,
                     cudaStream_t stream);
// losses (N) fp32 = -log softmax(logits)[target] (nats). If dlogits is not null, the fused
// backward: dlogits (N,V) bf16 = (softmax - onehot(target)) * dloss, OVERWRITTEN (dloss = 1/N
// for the mean loss). targets in [0,V) (device assert).
void crossentropy_forward(float* losses, bf16* dlogits, const float* logits,
                          const int32_t* targets, int64_t N, int64_t V, float dloss,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// optimizer: global-norm clipping and AdamW

// *sumsq (device double) = (or += when add) sum of g[i]^2 in double, in a fixed order.
// scratch: sumsq_scratch_bytes(n).
void sum_squares(double* sumsq, const float* g, int64_t n, bool add, void* scratch,
                 cudaStream_t stream);
size_t sumsq_scratch_bytes(int64_t n);
// *scale (device float) = float(max_norm / norm) if norm = sqrt(*sumsq) > max_norm > 0, else 1:
// the CPU trainer's rule (src/model/train.cpp), in double.
void clip_scale(float* scale, const double* sumsq, float max_norm, cudaStream_t stream);
// moe::model::AdamW::update on n elements, with g first multiplied by *scale in float (as the CPU
// trainer scales the gradient by the clip factor), operation for operation in float without
// fused multiply-adds, so the result is the CPU's bits. c1 = 1/(1-beta1^t), c2 = 1/(1-beta2^t)
// from the caller; scale may be null (no clipping). Then p_bf16[i] = bf16(p[i]) when p_bf16 is
// not null.
void adamw_update(float* p, bf16* p_bf16, const float* g, float* m, float* v, int64_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                  const float* scale, cudaStream_t stream);
// The same update for many tensors of flat buffers (p, g, m, v, p_bf16 indexed alike) in one
// launch: chunks (device) name [offset, offset + size) pieces of at most kAdamWChunk elements and
// each piece's weight decay; add_adamw_chunks splits a tensor into them (host). Bit for bit the
// per-tensor adamw_update.
struct AdamWChunk {
  int64_t offset, size;
  float weight_decay;
};
inline constexpr int64_t kAdamWChunk = 1 << 16;
void add_adamw_chunks(std::vector<AdamWChunk>& chunks, int64_t offset, int64_t size,
                      float weight_decay);
void adamw_update_chunks(float* p, bf16* p_bf16, const float* g, float* m, float* v,
                         const AdamWChunk* chunks, int64_t num_chunks, float lr, float beta1,
                         float beta2, float eps, float c1, float c2, const float* scale,
                         cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// dense FFN activation (the dense baselines: two cuBLAS GEMMs around it), the CPU experts' math

// swiglu: pre (N, 2I) = [gate | up] -> act (N, I) = silu(gate) * up;  else GELU (erf):
// pre (N, I) -> act (N, I).
void ffn_activation_forward(bf16* act, const bf16* pre, int64_t N, int64_t I, bool swiglu,
                            cudaStream_t stream);
// dpre (pre's shape) OVERWRITTEN from dact (N, I) and the forward's pre.
void ffn_activation_backward(bf16* dpre, const bf16* dact, const bf16* pre, int64_t N, int64_t I,
                             bool swiglu, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// elementwise

// out (n) fp32 = a (fp32) + b (bf16): residual + FFN output. out may alias a.
void residual_add(float* out, const float* a, const bf16* b, int64_t n, cudaStream_t stream);
// out (n) bf16 = round-to-nearest-even of in (n) fp32.
void to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream);
// out (n) = in (n), fp32, asynchronous device copy.
void copy_fp32(float* out, const float* in, int64_t n, cudaStream_t stream);

}  // namespace moe::cuda::lm
