// defines: flash_attention_supported, flash_attention_forward, flash_attention_backward,
//          flash_attention_scratch_bytes (moe::cuda::lm)
// Causal multi-head attention fused in the FlashAttention-2 manner: the (S,S) scores never leave
// the chip. Forward walks the key tiles of one query block with an online softmax in fp32
// registers and keeps only lse = log-sum-exp of each query row; backward recomputes the
// probabilities from q, k and lse. q, k, v are read straight from the (N,3D) qkv rows and the
// results are written straight into the (N,D) / (N,3D) rows: no permute, no S x S buffer.
//
// Layout: one block of 4 warps owns 64 rows (queries in forward and dq, keys in dk/dv); each warp
// owns 16 of them, the M of an mma.sync m16n8k16 (bf16 in, fp32 accumulate). The other side
// of the product streams through shared memory in tiles, double-buffered with cp.async so that
// the next tile's loads overlap this tile's math. Tiles wholly above the diagonal are
// never visited; the tiles crossing it (and the tail past S) are masked element by element.
//
// Backward is deterministic (no atomics): delta = rowsum(dO * O) first, then one kernel per key
// block accumulating dk, dv over the query tiles at or after it, and one per query block
// accumulating dq over the key tiles up to it. Each gradient is summed in registers in a fixed
// order and written once.
//
// Head sizes: 32, 64, 128 (one instantiation each); the pointers must be 16-byte aligned (the
// tile loads are 16-byte vectors, and hs % 8 == 0 keeps every head's row slice aligned).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace moe::cuda::lm {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tiles for one head size. kBlock rows per block (4 warps x 16, the mma M); kFwdKeys keys per
// forward tile; kBwdTile rows per streamed tile in backward, halved at hs = 128 so that the two
// fp32 gradient accumulators plus two score tiles stay within the 255 registers of a thread.
template <int HS>
struct FlashConfig {
  static constexpr int kHeadSize = HS;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlock = kWarps * 16;
  static constexpr int kFwdKeys = 64;
  static constexpr int kBwdTile = HS <= 64 ? 64 : 32;
  // +8 elements (16 bytes) per row: consecutive rows start 4 banks apart, so the 8 rows read by
  // one ldmatrix phase or one 32-bit fragment load (rows g = 0..7, words t = 0..3) hit 32
  // distinct banks.
  static constexpr int kStride = HS + 8;
  static constexpr int kVecs = HS / 8;  // 16-byte vectors per row

  static constexpr size_t tile_bytes(int rows) {
    return static_cast<size_t>(rows) * kStride * sizeof(bf16);
  }
  // The streamed tiles are double-buffered (kStages): tile j+1 is in flight while j is used.
  static constexpr int kStages = 2;
  static constexpr size_t forward_stage() { return 2 * tile_bytes(kFwdKeys); }  // k | v
  static constexpr size_t dkdv_stage() {  // q | dO | lse | delta
    return 2 * tile_bytes(kBwdTile) + 2 * kBwdTile * sizeof(float);
  }
  static constexpr size_t dq_stage() { return 2 * tile_bytes(kBwdTile); }  // k | v
  static constexpr size_t forward_smem() { return tile_bytes(kBlock) + kStages * forward_stage(); }
  static constexpr size_t dkdv_smem() { return 2 * tile_bytes(kBlock) + kStages * dkdv_stage(); }
  static constexpr size_t dq_smem() { return 2 * tile_bytes(kBlock) + kStages * dq_stage(); }

  static_assert(HS % 16 == 0, "the head size is the K of m16n8k16 steps (and the N of n16 pairs)");
  static_assert(kFwdKeys % 16 == 0 && kBwdTile % 16 == 0, "tiles are whole k16 steps");
  static_assert((kStride * sizeof(bf16)) % 16 == 0, "rows of the smem tiles stay 16-byte aligned");
  static_assert(dkdv_stage() % 16 == 0, "stages start 16-byte aligned");
};

// ---------------------------------------------------------------------------------------------
// tensor-core and warp primitives
//
// m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16, row):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B (16x8,  col):  b0 = (k 2t..2t+1, n g)  b1 = (k 2t+8..2t+9, n g)
//   C (16x8):        c0,c1 = (g, 2t..2t+1)   c2,c3 = (g+8, 2t..2t+1)
// A register holds two bf16, the lower column (or k) in the low half.

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices, transposed: lanes 8i..8i+7 give the row addresses of matrix i, and lane
// l receives M_i[2t][g], M_i[2t+1][g] in r[i].
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Asynchronous global -> smem copies (sm_80+): with valid false nothing is read and the
// destination is zero-filled (src must still be a mapped address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most kPending of this thread's newest groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ uint32_t ld_shared_u32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The four lanes of a quad hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// fragment loads from the smem tiles (row-major, kStride elements per row)

// A fragment: rows r0..r0+15, columns c0..c0+15 of the tile.
template <int kStride>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* s, int r0, int c0,
                                       int lane) {
  const bf16* p = s + (r0 + lane / 4) * kStride + c0 + 2 * (lane % 4);
  a[0] = ld_shared_u32(p);
  a[1] = ld_shared_u32(p + 8 * kStride);
  a[2] = ld_shared_u32(p + 8);
  a[3] = ld_shared_u32(p + 8 * kStride + 8);
}

// B fragment with B[k][n] = tile[n0 + n][k0 + k] (the tile's rows are the n index: k of q k^T).
template <int kStride>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const bf16* s, int n0, int k0,
                                       int lane) {
  const bf16* p = s + (n0 + lane / 4) * kStride + k0 + 2 * (lane % 4);
  b[0] = ld_shared_u32(p);
  b[1] = ld_shared_u32(p + 8);
}

// Two B fragments (n0..n0+7 and n0+8..n0+15) with B[k][n] = tile[k0 + k][n0 + n] (the tile's rows
// are the k index: v of p v). Matrix i = lane / 8 covers rows k0 + 8 (i % 2) and columns
// n0 + 8 (i / 2).
template <int kStride>
__device__ __forceinline__ void load_b_trans(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* s,
                                             int k0, int n0, int lane) {
  const int i = lane / 8;
  uint32_t r[4];
  ldmatrix_x4_trans(r, s + (k0 + lane % 8 + 8 * (i % 2)) * kStride + n0 + 8 * (i / 2));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// A fragment for k-step kk of a second product from the fp32 accumulators of the first: the C
// tiles 2kk and 2kk+1 (columns 16kk..16kk+15) are exactly the A layout, rounded to bf16.
template <int kTiles>
__device__ __forceinline__ void accum_to_a(uint32_t (&a)[4], const float (&c)[kTiles][4],
                                           int kk) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// ---------------------------------------------------------------------------------------------
// global <-> smem tiles

// Issues the copies of rows [0, kRows) of a tile from src (row stride ld elements; valid >= 1);
// rows >= valid are zero-filled, so a masked probability (0) never meets a NaN of memory past
// the end. The caller commits and waits.
template <class Cfg, int kRows>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* src, int64_t ld, int valid,
                                                int tid) {
  for (int i = tid; i < kRows * Cfg::kVecs; i += Cfg::kThreads) {
    const int r = i / Cfg::kVecs, c = (i % Cfg::kVecs) * 8;
    const bool in = r < valid;
    cp_async_16(s + r * Cfg::kStride + c, src + (in ? r : 0) * ld + c, in);
  }
}

// kRows floats src[0, valid) -> s, zero past valid (valid >= 1).
template <class Cfg, int kRows>
__device__ __forceinline__ void load_row_values_async(float* s, const float* src, int valid,
                                                      int tid) {
  for (int i = tid; i < kRows; i += Cfg::kThreads) {
    const bool in = i < valid;
    cp_async_4(s + i, src + (in ? i : 0), in);
  }
}

// One warp's accumulator tile (16 x HS, C layout) times `mul`, rounded to bf16 into its 16 rows
// of an smem tile, then written to dst rows [0, valid) (row stride ld) as 16-byte vectors.
template <class Cfg>
__device__ __forceinline__ void store_warp_rows(bf16* dst, int64_t ld, int valid, bf16* s,
                                                const float (&acc)[Cfg::kHeadSize / 8][4],
                                                float mul0, float mul1, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < Cfg::kHeadSize / 8; ++nt) {
    bf16* p = s + g * Cfg::kStride + 8 * nt + 2 * t;
    *reinterpret_cast<uint32_t*>(p) = pack_bf16(acc[nt][0] * mul0, acc[nt][1] * mul0);
    *reinterpret_cast<uint32_t*>(p + 8 * Cfg::kStride) =
        pack_bf16(acc[nt][2] * mul1, acc[nt][3] * mul1);
  }
  __syncwarp();
  for (int i = lane; i < 16 * Cfg::kVecs; i += 32) {
    const int r = i / Cfg::kVecs, c = (i % Cfg::kVecs) * 8;
    if (r < valid)
      *reinterpret_cast<uint4*>(dst + r * ld + c) =
          *reinterpret_cast<const uint4*>(s + r * Cfg::kStride + c);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// grid (B*NH, ceil(S/64)), the last query blocks (the most key tiles) first.
// out (N,D) bf16, lse (B,NH,S) fp32; scale_log2 = log2(e) / sqrt(hs).
template <int HS>
__global__ void __launch_bounds__(FlashConfig<HS>::kThreads)
    flash_forward_kernel(bf16* out, float* lse, const bf16* qkv, int S, int NH,
                         float scale_log2) {
  using Cfg = FlashConfig<HS>;
  constexpr int kStride = Cfg::kStride, kKeys = Cfg::kFwdKeys, kNT = kKeys / 8;
  extern __shared__ uint4 smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // (kBlock, kStride)
  bf16* sKV = sQ + Cfg::kBlock * kStride;    // kStages x (k (kKeys, kStride) | v (kKeys, kStride))

  const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * Cfg::kBlock;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, t = lane % 4;
  const int64_t D = int64_t{NH} * HS, ld = 3 * D;
  const bf16* q_rows = qkv + int64_t{b} * S * ld + h * HS;  // row s: q_rows + s*ld
  const bf16* k_rows = q_rows + D;
  const bf16* v_rows = q_rows + 2 * D;
  const int row0 = m0 + 16 * warp + lane / 4;  // this lane's query rows: row0, row0 + 8

  const int n_end = min(S, m0 + Cfg::kBlock);  // keys past the block's last query are masked
  const int n_tiles = (n_end + kKeys - 1) / kKeys;
  auto load_kv = [&](int j) {
    bf16* sK = sKV + (j % Cfg::kStages) * 2 * kKeys * kStride;
    load_tile_async<Cfg, kKeys>(sK, k_rows + j * kKeys * ld, ld, S - j * kKeys, tid);
    load_tile_async<Cfg, kKeys>(sK + kKeys * kStride, v_rows + j * kKeys * ld, ld,
                                S - j * kKeys, tid);
  };
  load_tile_async<Cfg, Cfg::kBlock>(sQ, q_rows + m0 * ld, ld, S - m0, tid);
  load_kv(0);
  cp_async_commit();

  float o[HS / 8][4] = {};                  // (16, HS) per warp
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running sum
  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) load_kv(j + 1);  // into the stage that tile j-1 left
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile j (and q) have landed ...
    __syncthreads();     // ... and every thread's
    const int n0 = j * kKeys;
    const bf16* sK = sKV + (j % Cfg::kStages) * 2 * kKeys * kStride;  // (kKeys, kStride)
    const bf16* sV = sK + kKeys * kStride;                              // (kKeys, kStride)

    // Step 1: s (16, kKeys) = q k^T, in log2 units
    float s[kNT][4] = {};
#pragma unroll
    for (int ks = 0; ks < HS / 16; ++ks) {
      uint32_t a[4];
      load_a<kStride>(a, sQ, 16 * warp, 16 * ks, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t bk[2];
        load_b<kStride>(bk, sK, 8 * nt, 16 * ks, lane);
        mma_bf16(s[nt], a, bk);
      }
    }
    const bool diagonal = n0 + kKeys - 1 > m0;  // some key of the tile is after some query
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] *= scale_log2;
        if (diagonal && n0 + 8 * nt + 2 * t + i % 2 > row0 + 8 * (i / 2)) s[nt][i] = -INFINITY;
      }

    // Step 2: online softmax; s becomes p = 2^(s - m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      const float m_new = fmaxf(m_run[r], quad_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet stays 0
      const float alpha = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < HS / 8; ++nt) o[nt][2 * r] *= alpha, o[nt][2 * r + 1] *= alpha;
    }

    // Step 3: o (16, HS) += p v
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
      accum_to_a(a, s, kk);
#pragma unroll
      for (int c = 0; c < HS / 16; ++c) {
        uint32_t b0[2], b1[2];
        load_b_trans<kStride>(b0, b1, sV, 16 * kk, 16 * c, lane);
        mma_bf16(o[2 * c], a, b0);
        mma_bf16(o[2 * c + 1], a, b1);
      }
    }
    __syncthreads();  // every warp is done with this stage before tile j+2 is loaded into it
  }

  // Epilogue: o / l into the warp's own rows of sQ (no other warp reads them), then out; lse.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = 1.f / l;
    const int q = row0 + 8 * r;
    if (t == 0 && q < S) lse[int64_t{bh} * S + q] = (m_run[r] + log2f(l)) * kLn2;
  }
  const int w0 = m0 + 16 * warp;
  store_warp_rows<Cfg>(out + (int64_t{b} * S + w0) * D + h * HS, D, S - w0,
                       sQ + 16 * warp * kStride, o, inv[0], inv[1], lane);
}

// delta (B,NH,S) fp32 = rowsum(dout * out) per head. One thread per 16-byte vector of the (N,D)
// rows; the hs/8 lanes of one head (aligned groups of 4, 8 or 16) add up by xor shuffles.
template <int HS>
__global__ void __launch_bounds__(256)
    flash_backward_delta_kernel(float* delta, const bf16* dout, const bf16* out, int64_t N,
                                int S, int NH) {
  constexpr int kLanes = HS / 8;
  static_assert(kLanes <= 32 && 256 % kLanes == 0, "a head's lanes stay in one warp");
  const int64_t vecs_per_row = int64_t{NH} * kLanes, total = N * vecs_per_row;
  const int64_t i = int64_t{blockIdx.x} * 256 + threadIdx.x;
  float acc = 0.f;
  if (i < total) {
    const uint4 a = *reinterpret_cast<const uint4*>(dout + i * 8);
    const uint4 c = *reinterpret_cast<const uint4*>(out + i * 8);
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* c2 = reinterpret_cast<const __nv_bfloat162*>(&c);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(a2[j]), y = __bfloat1622float2(c2[j]);
      acc += x.x * y.x + x.y * y.y;
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (i < total && i % kLanes == 0) {
    const int64_t n = i / vecs_per_row, h = (i % vecs_per_row) / kLanes;
    delta[(n / S * NH + h) * S + n % S] = acc;
  }
}

// grid (B*NH, ceil(S/64)): key block n0 = 64 * blockIdx.y (the first ones, most query tiles,
// first). dk, dv (64 keys, HS) accumulate over the query tiles m0 >= the block's diagonal:
//   st = k q^T, p^T = 2^(st*scale_log2 - lse*log2(e)), dpt = v dO^T, ds^T = p^T (dpt - delta),
//   dv += p^T dO, dk += ds^T q; dk *= scale at the end.
template <int HS>
__global__ void __launch_bounds__(FlashConfig<HS>::kThreads)
    flash_backward_dkdv_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                               const float* delta, int S, int NH, float scale, float scale_log2) {
  using Cfg = FlashConfig<HS>;
  constexpr int kStride = Cfg::kStride, kT = Cfg::kBwdTile, kNT = kT / 8;
  extern __shared__ uint4 smem[];
  bf16* sK = reinterpret_cast<bf16*>(smem);  // (kBlock, kStride)
  bf16* sV = sK + Cfg::kBlock * kStride;     // (kBlock, kStride)
  char* stages = reinterpret_cast<char*>(sV + Cfg::kBlock * kStride);
  // stage j % kStages: q (kT, kStride) | dO (kT, kStride) | lse (kT) | delta (kT)
  auto stage_q = [&](int j) {
    return reinterpret_cast<bf16*>(stages + (j % Cfg::kStages) * Cfg::dkdv_stage());
  };

  const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int n0 = blockIdx.y * Cfg::kBlock;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, t = lane % 4;
  const int64_t D = int64_t{NH} * HS, ld = 3 * D;
  const bf16* q_rows = qkv + int64_t{b} * S * ld + h * HS;  // row s: q_rows + s*ld
  const bf16* do_rows = dout + int64_t{b} * S * D + h * HS;  // row s: do_rows + s*D
  const float* lse_h = lse + int64_t{bh} * S;
  const float* delta_h = delta + int64_t{bh} * S;
  const int key0 = n0 + 16 * warp + lane / 4;  // this lane's key rows: key0, key0 + 8

  const int m_first = n0 / kT * kT;  // the first query tile reaching the block's first key
  const int m_tiles = (S - m_first + kT - 1) / kT;
  auto load_q = [&](int j) {
    const int m0 = m_first + j * kT;
    bf16* sQ = stage_q(j);
    bf16* sdO = sQ + kT * kStride;
    float* sLse = reinterpret_cast<float*>(sdO + kT * kStride);
    load_tile_async<Cfg, kT>(sQ, q_rows + m0 * ld, ld, S - m0, tid);
    load_tile_async<Cfg, kT>(sdO, do_rows + m0 * D, D, S - m0, tid);
    load_row_values_async<Cfg, kT>(sLse, lse_h + m0, S - m0, tid);
    load_row_values_async<Cfg, kT>(sLse + kT, delta_h + m0, S - m0, tid);
  };
  load_tile_async<Cfg, Cfg::kBlock>(sK, q_rows + D + n0 * ld, ld, S - n0, tid);
  load_tile_async<Cfg, Cfg::kBlock>(sV, q_rows + 2 * D + n0 * ld, ld, S - n0, tid);
  load_q(0);
  cp_async_commit();

  float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};  // (16, HS) per warp each
  for (int j = 0; j < m_tiles; ++j) {
    if (j + 1 < m_tiles) load_q(j + 1);  // into the stage that tile j-1 left
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile j (and k, v) have landed ...
    __syncthreads();     // ... and every thread's
    const int m0 = m_first + j * kT;
    const bf16* sQ = stage_q(j);                                          // (kT, kStride)
    const bf16* sdO = sQ + kT * kStride;                                  // (kT, kStride)
    const float* sLse = reinterpret_cast<const float*>(sdO + kT * kStride);  // (kT)
    const float* sDelta = sLse + kT;                                      // (kT)

    // Step 1: st = k q^T, dpt = v dO^T (16 keys x kT queries per warp)
    float st[kNT][4] = {}, dpt[kNT][4] = {};
#pragma unroll
    for (int ks = 0; ks < HS / 16; ++ks) {
      uint32_t ak[4], av[4];
      load_a<kStride>(ak, sK, 16 * warp, 16 * ks, lane);
      load_a<kStride>(av, sV, 16 * warp, 16 * ks, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t bq[2], bd[2];
        load_b<kStride>(bq, sQ, 8 * nt, 16 * ks, lane);
        load_b<kStride>(bd, sdO, 8 * nt, 16 * ks, lane);
        mma_bf16(st[nt], ak, bq);
        mma_bf16(dpt[nt], av, bd);
      }
    }

    // Step 2: st becomes p^T, dpt becomes ds^T (both 0 where the query is before the key or
    // past S)
    const bool masked = m0 < n0 + Cfg::kBlock - 1 || m0 + kT > S;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 8 * nt + 2 * t + i % 2, q = m0 + c;
        float p = exp2f(st[nt][i] * scale_log2 - sLse[c] * kLog2e);
        if (masked && (q < key0 + 8 * (i / 2) || q >= S)) p = 0.f;
        st[nt][i] = p;
        dpt[nt][i] = p * (dpt[nt][i] - sDelta[c]);
      }

    // Step 3: dv += p^T dO, dk += ds^T q
#pragma unroll
    for (int kk = 0; kk < kT / 16; ++kk) {
      uint32_t ap[4], ads[4];
      accum_to_a(ap, st, kk);
      accum_to_a(ads, dpt, kk);
#pragma unroll
      for (int c = 0; c < HS / 16; ++c) {
        uint32_t b0[2], b1[2];
        load_b_trans<kStride>(b0, b1, sdO, 16 * kk, 16 * c, lane);
        mma_bf16(dv[2 * c], ap, b0);
        mma_bf16(dv[2 * c + 1], ap, b1);
        load_b_trans<kStride>(b0, b1, sQ, 16 * kk, 16 * c, lane);
        mma_bf16(dk[2 * c], ads, b0);
        mma_bf16(dk[2 * c + 1], ads, b1);
      }
    }
    __syncthreads();  // every warp is done with this stage before tile j+2 is loaded into it
  }

  // Epilogue: through the warp's own rows of sK and sV (only this warp reads them) into dqkv.
  const int w0 = n0 + 16 * warp;
  bf16* dk_rows = dqkv + (int64_t{b} * S + w0) * ld + D + h * HS;
  store_warp_rows<Cfg>(dk_rows, ld, S - w0, sK + 16 * warp * kStride, dk, scale, scale, lane);
  store_warp_rows<Cfg>(dk_rows + D, ld, S - w0, sV + 16 * warp * kStride, dv, 1.f, 1.f, lane);
}

// grid (B*NH, ceil(S/64)), the last query blocks first. dq (64 queries, HS) accumulates over the
// key tiles up to the block's last query: s = q k^T, p = 2^(s*scale_log2 - lse*log2(e)),
// dp = dO v^T, ds = p (dp - delta), dq += ds k; dq *= scale at the end.
template <int HS>
__global__ void __launch_bounds__(FlashConfig<HS>::kThreads)
    flash_backward_dq_kernel(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                             const float* delta, int S, int NH, float scale, float scale_log2) {
  using Cfg = FlashConfig<HS>;
  constexpr int kStride = Cfg::kStride, kT = Cfg::kBwdTile, kNT = kT / 8;
  extern __shared__ uint4 smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // (kBlock, kStride)
  bf16* sdO = sQ + Cfg::kBlock * kStride;    // (kBlock, kStride)
  bf16* sKV = sdO + Cfg::kBlock * kStride;   // kStages x (k (kT, kStride) | v (kT, kStride))

  const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * Cfg::kBlock;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, t = lane % 4;
  const int64_t D = int64_t{NH} * HS, ld = 3 * D;
  const bf16* q_rows = qkv + int64_t{b} * S * ld + h * HS;  // row s: q_rows + s*ld
  const bf16* do_rows = dout + int64_t{b} * S * D + h * HS;  // row s: do_rows + s*D
  const int row0 = m0 + 16 * warp + lane / 4;                // this lane's rows: row0, row0 + 8

  const int n_end = min(S, m0 + Cfg::kBlock);
  const int n_tiles = (n_end + kT - 1) / kT;
  auto load_kv = [&](int j) {
    bf16* sK = sKV + (j % Cfg::kStages) * 2 * kT * kStride;
    load_tile_async<Cfg, kT>(sK, q_rows + D + j * kT * ld, ld, S - j * kT, tid);
    load_tile_async<Cfg, kT>(sK + kT * kStride, q_rows + 2 * D + j * kT * ld, ld, S - j * kT,
                             tid);
  };
  load_tile_async<Cfg, Cfg::kBlock>(sQ, q_rows + m0 * ld, ld, S - m0, tid);
  load_tile_async<Cfg, Cfg::kBlock>(sdO, do_rows + m0 * D, D, S - m0, tid);
  load_kv(0);
  cp_async_commit();
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = row0 + 8 * r;
    lse2[r] = q < S ? lse[int64_t{bh} * S + q] * kLog2e : 0.f;
    dlt[r] = q < S ? delta[int64_t{bh} * S + q] : 0.f;
  }

  float dq[HS / 8][4] = {};  // (16, HS) per warp
  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) load_kv(j + 1);  // into the stage that tile j-1 left
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile j (and q, dO) have landed ...
    __syncthreads();     // ... and every thread's
    const int n0 = j * kT;
    const bf16* sK = sKV + (j % Cfg::kStages) * 2 * kT * kStride;  // (kT, kStride)
    const bf16* sV = sK + kT * kStride;                           // (kT, kStride)

    // Step 1: s = q k^T, dp = dO v^T (16 queries x kT keys per warp)
    float s[kNT][4] = {}, dp[kNT][4] = {};
#pragma unroll
    for (int ks = 0; ks < HS / 16; ++ks) {
      uint32_t aq[4], ad[4];
      load_a<kStride>(aq, sQ, 16 * warp, 16 * ks, lane);
      load_a<kStride>(ad, sdO, 16 * warp, 16 * ks, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint32_t bk[2], bv[2];
        load_b<kStride>(bk, sK, 8 * nt, 16 * ks, lane);
        load_b<kStride>(bv, sV, 8 * nt, 16 * ks, lane);
        mma_bf16(s[nt], aq, bk);
        mma_bf16(dp[nt], ad, bv);
      }
    }

    // Step 2: dp becomes ds (0 where the key is after the query; keys past S are after every
    // query below S, and rows past S are never stored)
    const bool diagonal = n0 + kT - 1 > m0;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i / 2;
        float p = exp2f(s[nt][i] * scale_log2 - lse2[r]);
        if (diagonal && n0 + 8 * nt + 2 * t + i % 2 > row0 + 8 * r) p = 0.f;
        dp[nt][i] = p * (dp[nt][i] - dlt[r]);
      }

    // Step 3: dq += ds k
#pragma unroll
    for (int kk = 0; kk < kT / 16; ++kk) {
      uint32_t a[4];
      accum_to_a(a, dp, kk);
#pragma unroll
      for (int c = 0; c < HS / 16; ++c) {
        uint32_t b0[2], b1[2];
        load_b_trans<kStride>(b0, b1, sK, 16 * kk, 16 * c, lane);
        mma_bf16(dq[2 * c], a, b0);
        mma_bf16(dq[2 * c + 1], a, b1);
      }
    }
    __syncthreads();  // every warp is done with this stage before tile j+2 is loaded into it
  }

  // Epilogue: through the warp's own rows of sQ (only this warp reads them) into dqkv.
  const int w0 = m0 + 16 * warp;
  store_warp_rows<Cfg>(dqkv + (int64_t{b} * S + w0) * ld + h * HS, ld, S - w0,
                       sQ + 16 * warp * kStride, dq, scale, scale, lane);
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

struct FlashDims {
  int64_t B, S, D, NH, hs, N;
};
FlashDims flash_dims(const char* who, int64_t B, int64_t S, int64_t D, int64_t NH) {
  MOE_CHECK(B >= 0 && S >= 0, who, ": B and S must be >= 0, got ", B, ", ", S);
  MOE_CHECK(flash_attention_supported(D, NH), who, ": head size D/NH = ", D, "/", NH,
            " not in {32, 64, 128}");
  // grid (B*NH, ceil(S/64)): gridDim.y is at most 65535
  MOE_CHECK(S <= int64_t{65535} * 64 && B * NH <= (int64_t{1} << 30), who,
            ": S <= 4194240 and B*NH <= 2^30 (the grid), got ", S, ", ", B * NH);
  return {B, S, D, NH, D / NH, B * S};
}

// Opts a kernel into more than 48 KiB of dynamic smem where it needs it (hs = 128).
template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

unsigned blocks_of(int64_t rows, int block) {
  return static_cast<unsigned>((rows + block - 1) / block);
}

template <int HS>
void forward_hs(bf16* out, float* lse, const bf16* qkv, const FlashDims& d, cudaStream_t stream) {
  using Cfg = FlashConfig<HS>;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(HS));
  const size_t smem = Cfg::forward_smem();
  set_smem(flash_forward_kernel<HS>, smem);
  const dim3 grid(static_cast<unsigned>(d.B * d.NH), blocks_of(d.S, Cfg::kBlock));
  flash_forward_kernel<HS><<<grid, Cfg::kThreads, smem, stream>>>(
      out, lse, qkv, static_cast<int>(d.S), static_cast<int>(d.NH), scale_log2);
  MOE_CUDA_LAUNCH_CHECK();
}

template <int HS>
void backward_hs(bf16* dqkv, const bf16* dout, const bf16* out, const float* lse,
                 const bf16* qkv, float* delta, const FlashDims& d, cudaStream_t stream) {
  using Cfg = FlashConfig<HS>;
  const float scale = 1.f / std::sqrt(static_cast<float>(HS)), scale_log2 = kLog2e * scale;
  const int S = static_cast<int>(d.S), NH = static_cast<int>(d.NH);
  // Step 1: delta = rowsum(dO * O)
  const int64_t vecs = d.N * d.D / 8;
  flash_backward_delta_kernel<HS><<<blocks_of(vecs, 256), 256, 0, stream>>>(delta, dout, out,
                                                                            d.N, S, NH);
  MOE_CUDA_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(d.B * d.NH), blocks_of(d.S, Cfg::kBlock));
  // Step 2: dk, dv per key block
  set_smem(flash_backward_dkdv_kernel<HS>, Cfg::dkdv_smem());
  flash_backward_dkdv_kernel<HS><<<grid, Cfg::kThreads, Cfg::dkdv_smem(), stream>>>(
      dqkv, dout, qkv, lse, delta, S, NH, scale, scale_log2);
  MOE_CUDA_LAUNCH_CHECK();
  // Step 3: dq per query block
  set_smem(flash_backward_dq_kernel<HS>, Cfg::dq_smem());
  flash_backward_dq_kernel<HS><<<grid, Cfg::kThreads, Cfg::dq_smem(), stream>>>(
      dqkv, dout, qkv, lse, delta, S, NH, scale, scale_log2);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool flash_attention_supported(int64_t D, int64_t NH) {
  if (NH < 1 || D < 1 || D % NH != 0) return false;
  const int64_t hs = D / NH;
  return hs == 32 || hs == 64 || hs == 128;
}

size_t flash_attention_scratch_bytes(int64_t B, int64_t S, int64_t D, int64_t NH) {
  const FlashDims d = flash_dims("flash_attention_scratch_bytes", B, S, D, NH);
  return detail::align_up(static_cast<size_t>(d.B * d.NH * d.S) * sizeof(float));  // delta
}

void flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t S,
                             int64_t D, int64_t NH, cudaStream_t stream) {
  const FlashDims d = flash_dims("flash_attention_forward", B, S, D, NH);
  if (d.N == 0) return;
  MOE_CHECK(detail::is_aligned16(out) && detail::is_aligned16(qkv) && lse,
            "flash_attention_forward: out and qkv must be 16-byte aligned, lse not null");
  switch (d.hs) {
    case 32: forward_hs<32>(out, lse, qkv, d, stream); break;
    case 64: forward_hs<64>(out, lse, qkv, d, stream); break;
    default: forward_hs<128>(out, lse, qkv, d, stream); break;
  }
}

void flash_attention_backward(bf16* dqkv, const bf16* dout, const bf16* out, const float* lse,
                              const bf16* qkv, int64_t B, int64_t S, int64_t D, int64_t NH,
                              void* scratch, cudaStream_t stream) {
  const FlashDims d = flash_dims("flash_attention_backward", B, S, D, NH);
  if (d.N == 0) return;
  MOE_CHECK(detail::is_aligned16(dqkv) && detail::is_aligned16(dout) &&
                detail::is_aligned16(out) && detail::is_aligned16(qkv) && lse && scratch,
            "flash_attention_backward: dqkv, dout, out and qkv must be 16-byte aligned, lse and "
            "scratch not null");
  float* delta = static_cast<float*>(scratch);  // (B,NH,S)
  switch (d.hs) {
    case 32: backward_hs<32>(dqkv, dout, out, lse, qkv, delta, d, stream); break;
    case 64: backward_hs<64>(dqkv, dout, out, lse, qkv, delta, d, stream); break;
    default: backward_hs<128>(dqkv, dout, out, lse, qkv, delta, d, stream); break;
  }
}

}  // namespace moe::cuda::lm
