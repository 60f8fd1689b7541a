// defines: moe::cuda::grouped_gemm::{RegisterEpilogue, EpilogueActivation, EpilogueAct,
//          swiglu_grad_pair, EpilogueActivationGrad, EpilogueActGrad}
// The activation fused into a grouped GEMM's epilogue, forward and backward, both written from the
// fp32 accumulators straight to global memory (no smem, no TMA).
//
// Forward (EpilogueActivation), the up-projection: from a (BLK_M, BLK_N) tile of
// pre = xp · w_up[e] it writes
//   pre  (m_e, N)  bf16, unless params.pre is null (forward without backward)
//   act  SwiGLU: (m_e, N/2) act[r, j] = silu(pre[r, 2j]) * pre[r, 2j+1]   (gate/up interleaved)
//        GELU:   (m_e, N)   act[r, j] = gelu(pre[r, j])
// so the unfused pair's extra pass -- write pre, read it back, write act: 3 * M * I * 2 bytes more
// for SwiGLU -- disappears.
//
// Backward (EpilogueActivationGrad), the da GEMM: from a tile of da = dyp · w_down[e]^T (N = I
// units) it reads the stored pre of the same units and writes dpre = da * act'(pre) (SwiGLU:
// d gate and d up in pre's pair order; GELU: da * gelu'(pre)), so da is never stored and the
// separate activation-backward pass -- read da and pre, write dpre -- disappears. da is rounded to
// bf16 first, as the unfused GEMM stores it, so dpre is the unfused pair's bit for bit.
//
// Stores: a thread's values of one row are 2 columns out of every 8, so storing them as they lie
// means 4-byte (pre) and 2-byte (act) stores, 8 rows x 16 bytes per warp instruction. Measured on
// an H100 at OLMoE's shape that cost 1.5 ms on top of the 1.6 ms GEMM. So the four lanes of a quad
// first exchange their words (a 4 x 4 transpose by three xor-shuffles), after which every lane
// holds 8 consecutive columns and writes them with one 16-byte store (64 contiguous bytes per row
// per warp instruction): +0.43 ms. What remains is the epilogue itself running after each tile's
// mainloop, not under it (bench/lab/experts_lab.md).
//
// With w_up's pairs in GateUpLayout::blocked order the act exchange goes too: lane q's groups
// 8c .. 8c+7 are then units 32c + 8q .. 32c + 8q + 7, one 16-byte word as they lie. pre (when
// written) is in w_up's column order either way and keeps its exchange.
//
// Each value is rounded to bf16 before the activation sees it: act is then the same function of
// the stored pre as in the unfused pair (elementwise kernel after a plain GEMM), and the backward,
// which differentiates at the stored pre, is consistent with it.
//
// Why pairs: in the wgmma accumulator layout every thread holds columns (2q, 2q+1) of a row as two
// consecutive fragment values (checked below on the MMA atom's layout), so with w_up's gate and up
// columns interleaved each thread owns whole (gate, up) pairs and needs nothing from its
// neighbours. The [gate | up] layout would put a pair 256+ columns apart, in another CTA's tile.
//
// Plugged into CUTLASS's ptr-array kernel through Sm90TmaWarpSpecializedAdapter, the wrapper CUTLASS
// itself uses for register-to-global epilogues (PtrArrayNoSmemWarpSpecialized); the segment start
// of group l is read from the plan's offsets, so no per-expert pointer arrays are needed here.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>

#include "experts_activation.cuh"
#include "grouped_gemm_mainloop_sm90.hpp"

namespace moe::cuda::grouped_gemm {

// w[idx] for a run-time idx in [0, 4) without indexing a register array.
CUTLASS_DEVICE uint32_t pick(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, int idx) {
  const uint32_t lo = idx & 1 ? w1 : w0, hi = idx & 1 ? w3 : w2;
  return idx & 2 ? hi : lo;
}

// 4 x 4 transpose of 32-bit words within a quad of lanes: lane q passes in its words w[0..3]
// and gets back, in position s, word q of lane s. Lane q sends w[q ^ k] to lane q ^ k (k = 1,
// 2, 3), which receives exactly the word it needs from q. Every lane of the warp must call it.
CUTLASS_DEVICE uint4 quad_transpose(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, int q) {
  const uint32_t r0 = pick(w0, w1, w2, w3, q);  // from itself
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 1), 1);
  const uint32_t r2 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 2), 2);
  const uint32_t r3 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 3), 3);
  // r_k came from lane q ^ k: it belongs in position q ^ k.
  return make_uint4(pick(r0, r1, r2, r3, q), pick(r0, r1, r2, r3, q ^ 1),
                    pick(r0, r1, r2, r3, q ^ 2), pick(r0, r1, r2, r3, q ^ 3));
}

// What CUTLASS's kernel and adapter read off an epilogue that writes from registers with its own
// Params: C is never read, D is not CUTLASS's (the outputs are addressed from Params). Plus the
// bf16 word helpers both activation epilogues use.
template <class Args>
class RegisterEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ThreadEpilogueOp = void;
  using ElementC = Bf16;
  using ElementD = Bf16;
  using ElementAccumulator = Accum;
  using InternalStrideC = cute::Stride<int64_t, cute::_1, cute::_0>;
  using InternalStrideD = InternalStrideC;
  using StrideC = InternalStrideC*;
  using StrideD = InternalStrideD*;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;
  using Arguments = Args;
  using Params = Args;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE explicit RegisterEpilogue(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

 protected:
  // One wgmma's (thr, val) -> m + 64 n: lane % 4 = q picks column pair (2q, 2q+1), lane / 4 the
  // row; values are (v0: column 2q + v0, v1: row + 8 v1, j: column + 8 j), so value 2 v1 + 4 j + v0
  // is row half v1's column 8 j + 2q + v0. Both epilogues rely on exactly this; returns the number
  // of 8-column groups per thread row.
  template <class TiledMma, class FrgLayout, class BlockShapeMNK>
  CUTLASS_HOST_DEVICE static constexpr int groups_per_row() {
    using namespace cute;
    using AtomLayoutC = typename TiledMma::Atom::LayoutC_TV;
    static_assert(size<0, 0>(AtomLayoutC{}) == 4 && stride<0, 0>(AtomLayoutC{}) == 128,
                  "lane % 4 must select the column pair");
    static_assert(size<1, 0>(AtomLayoutC{}) == 2 && stride<1, 0>(AtomLayoutC{}) == 64 &&
                      size<1, 1>(AtomLayoutC{}) == 2 && stride<1, 1>(AtomLayoutC{}) == 8 &&
                      stride<1, 2>(AtomLayoutC{}) == 512,
                  "values must be (column pair, row + 8, column + 8 j)");
    constexpr int kGroups = size<1, 2>(AtomLayoutC{});  // 8-column groups per thread row (32)
    static_assert(kGroups % 8 == 0, "whole blocks of 8 groups");
    static_assert(is_static<FrgLayout>::value && size(FrgLayout{}) == 4 * kGroups,
                  "one wgmma atom per thread and tile (MMA_M = MMA_N = 1)");
    static_assert(is_static<BlockShapeMNK>::value, "static CTA tile");
    return kGroups;
  }

  // Where a thread's accumulators lie in group l's (m_e, N) output: its rows m[v1] (row half v1),
  // its quad lane q, the tile's first column, and the group's first row in the expert-ordered
  // buffers (or, without offsets, in a stack of (M, N) blocks).
  struct ThreadTile {
    int rows, cols;  // m_e, N
    int64_t row0;    // offsets[l]
    int m[2];
    int q, n_tile;
  };
  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class Accumulators,
            class TiledMma>
  CUTLASS_DEVICE ThreadTile locate(ProblemShapeMNKL problem_shape_mnkl,
                                   BlockShapeMNK blk_shape_mnk, BlockCoordMNKL blk_coord_mnkl,
                                   Accumulators const& accumulators, TiledMma tiled_mma,
                                   int thread_idx) const {
    using namespace cute;
    ThreadTile t;
    t.rows = get<0>(problem_shape_mnkl);
    t.cols = get<1>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    // Null offsets: group l's output is the l-th (M, N) block (the weight gradients' dW_e).
    t.row0 = params_.offsets != nullptr ? int64_t{params_.offsets[l_coord]}
                                        : int64_t{l_coord} * t.rows;
    Tensor cD = make_identity_tensor(make_shape(t.rows, t.cols));                  // (M,N)
    Tensor gcD = local_tile(cD, take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
                                                                                   // (BLK_M,BLK_N)
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(gcD);        // (MMA,MMA_M,MMA_N)
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators));
    t.q = thread_idx & 3;
    t.n_tile = get<1>(tCcD(0)) - 2 * t.q;
    t.m[0] = get<0>(tCcD(0));
    t.m[1] = get<0>(tCcD(2));
    return t;
  }

  CUTLASS_DEVICE static uint32_t pack(__nv_bfloat162 x) {
    return *reinterpret_cast<uint32_t*>(&x);
  }
  CUTLASS_DEVICE static __nv_bfloat162 unpack(uint32_t u) {
    return *reinterpret_cast<__nv_bfloat162*>(&u);
  }
  // The accumulator as the bf16 value a plain GEMM would store, back in fp32.
  CUTLASS_DEVICE static float rounded(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }

  Params params_;
};

struct ActEpilogueArguments {
  const int32_t* offsets = nullptr;  // (E+1) segment starts: group l's rows begin at offsets[l]
  __nv_bfloat16* pre = nullptr;      // (max_rows, ld_pre) or nullptr
  __nv_bfloat16* act = nullptr;      // (max_rows, ld_act)
  int64_t ld_pre = 0;                // N
  int64_t ld_act = 0;                // N / 2 (SwiGLU) or N (GELU)
  int swiglu = 1;                    // 1: SwiGLU on interleaved pairs, 0: GELU
  int blocked = 0;                   // SwiGLU: pairs in GateUpLayout::blocked order (below)
  const int32_t* tile_count = nullptr;  // tiles over all groups (EpilogueActivationDeferred only)
};

class EpilogueActivation : public RegisterEpilogue<ActEpilogueArguments> {
 public:
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.offsets != nullptr && args.act != nullptr && args.ld_pre % 8 == 0 &&
           args.ld_act % 8 == 0;
  }

  CUTLASS_HOST_DEVICE explicit EpilogueActivation(Params const& params)
      : RegisterEpilogue(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();

    // Step 1: where this thread's values lie (N = A, a multiple of 8; 16 for SwiGLU).
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    const int M = t.rows, N = t.cols, q = t.q, n_tile = t.n_tile;
    const int64_t row0 = t.row0;
    __nv_bfloat16* const pre_out = params_.pre;
    __nv_bfloat16* const act_out = params_.act;
    const bool swiglu = params_.swiglu != 0;
    const bool blocked = params_.blocked != 0;

    // Step 2: per row half, blocks of 8 groups (64 pre columns): round to bf16, exchange within
    // the quad so that each lane holds 8 consecutive columns, store 16 bytes per lane. All lanes
    // take part in every exchange; only the stores are predicated.
    CUTLASS_PRAGMA_UNROLL
    for (int v1 = 0; v1 < 2; ++v1) {
      const int m = t.m[v1];
      const bool row_ok = m < M;
      const int64_t r = row0 + m;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kGroups / 8; ++c) {
        uint32_t h[8];  // (pre[2q], pre[2q+1]) of groups 8c .. 8c+7, bf16 pairs
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < 8; ++k) {
          const int j = 8 * c + k, i = 2 * v1 + 4 * j;
          h[k] = pack(__floats2bfloat162_rn(accumulators(i), accumulators(i + 1)));
        }
        // pre, and GELU's act (same columns): two blocks of 4 groups each.
        CUTLASS_PRAGMA_UNROLL
        for (int half = 0; half < 2; ++half) {
          const int col = n_tile + 8 * (8 * c + 4 * half + q);  // this lane's 8 columns
          const bool ok = row_ok && col < N;
          const uint32_t* w = h + 4 * half;
          if (pre_out) {
            const uint4 v = quad_transpose(w[0], w[1], w[2], w[3], q);
            if (ok) *reinterpret_cast<uint4*>(pre_out + r * params_.ld_pre + col) = v;
          }
          if (!swiglu) {
            uint32_t g[4];
            CUTLASS_PRAGMA_UNROLL
            for (int k = 0; k < 4; ++k) {
              const __nv_bfloat162 x = unpack(w[k]);
              g[k] = pack(__floats2bfloat162_rn(act::gelu(__low2float(x)),
                                                act::gelu(__high2float(x))));
            }
            const uint4 v = quad_transpose(g[0], g[1], g[2], g[3], q);
            if (ok) *reinterpret_cast<uint4*>(act_out + r * params_.ld_act + col) = v;
          }
        }
        if (swiglu) {
          // act column 4 j + q of group j; words (act of group 8c+2k, of group 8c+2k+1).
          uint32_t a[4];
          CUTLASS_PRAGMA_UNROLL
          for (int k = 0; k < 4; ++k) {
            const __nv_bfloat162 x0 = unpack(h[2 * k]), x1 = unpack(h[2 * k + 1]);
            a[k] = pack(__floats2bfloat162_rn(act::silu_mul(__low2float(x0), __high2float(x0)),
                                              act::silu_mul(__low2float(x1), __high2float(x1))));
          }
          // Blocked pairs: group 8c + i of lane q is unit 32c + 8q + i of the tile, so a[0..3]
          // already are act columns 32c + 8q .. + 7 in order. Interleaved: after the exchange
          // lane q holds, from each lane s, the acts of groups 8c+2q (low halves: act columns
          // 32c + 8q + s) and 8c+2q+1 (high halves: + 4).
          uint4 v;
          if (blocked) {
            v = make_uint4(a[0], a[1], a[2], a[3]);
          } else {
            const uint4 t = quad_transpose(a[0], a[1], a[2], a[3], q);
            v = make_uint4(__byte_perm(t.x, t.y, 0x5410), __byte_perm(t.z, t.w, 0x5410),
                           __byte_perm(t.x, t.y, 0x7632), __byte_perm(t.z, t.w, 0x7632));
          }
          const int col = n_tile / 2 + 32 * c + 8 * q;  // act column, a multiple of 8
          if (row_ok && 2 * col < N)
            *reinterpret_cast<uint4*>(act_out + r * params_.ld_act + col) = v;
        }
      }
    }
  }
};

// What the kernel is assembled with: the adapter adds the (empty) TMA pipeline interface.
using EpilogueAct = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    EpilogueActivation>;


struct ActGradEpilogueArguments {
  const int32_t* offsets = nullptr;    // (E+1) segment starts
  const __nv_bfloat16* pre = nullptr;  // (max_rows, ld_pre): the forward's pre
  __nv_bfloat16* dpre = nullptr;       // (max_rows, ld_pre), may be pre itself (each element is
                                       // read, then written, by the same thread)
  int64_t ld_pre = 0;                  // 2N (SwiGLU) or N (GELU)
  int swiglu = 1;                      // 1: SwiGLU, pairs interleaved or blocked; 0: GELU
  int blocked = 0;                     // SwiGLU: pairs in GateUpLayout::blocked order
  // Or null: row_dot[p * ld_row_dot + r] = sum over the units of column tile p of da * act at
  // row r (da rounded to bf16 as for dpre, act in fp32), (ceil(N / BLK_N), ld >= max_rows).
  float* row_dot = nullptr;
  int64_t ld_row_dot = 0;
  const int32_t* tile_count = nullptr;  // tiles over all groups (EpilogueActivationGradDeferred)
};

// (d gate, d up) of one unit from its da and its stored (gate, up) pair, rounded as the
// elementwise backward rounds them; adds d_up * up = da * act to the row dot (one FMA, so it is
// not worth a branch when the dot is not wanted).
CUTLASS_DEVICE uint32_t swiglu_grad_pair(float da, uint32_t gate_up, float& dot) {
  const __nv_bfloat162 p = *reinterpret_cast<const __nv_bfloat162*>(&gate_up);
  float d_gate, d_up;
  act::silu_mul_grad(da, __low2float(p), __high2float(p), d_gate, d_up);
  dot = fmaf(d_up, __high2float(p), dot);
  __nv_bfloat162 d = __floats2bfloat162_rn(d_gate, d_up);
  return *reinterpret_cast<uint32_t*>(&d);
}

// The backward's activation in the da GEMM's epilogue. A thread holds da for units 8j + 2q and
// 8j + 2q + 1 of each 8-unit group j of its two rows. Their pre values lie
//   interleaved: pairs 8j + 2q, + 1 -- 8 contiguous bytes per group;
//   blocked:     unit 8q' + a of a 32-unit block is pair 4a + q', so lane q's units of the block's
//                four groups are its pairs 8q .. 8q + 7 -- 32 contiguous bytes, two 16-byte words;
//   GELU:        units 8j + 2q, + 1 -- 4 bytes per group,
// and dpre goes back to the same places. Every pre load of a row half is issued before the first
// is used, so the latency is paid once per row half, not once per group. Measured alternatives
// (experts_lab runs 11-13) were slower: prefetching pre into L2 from the producer warp (by rows
// or by lines), and loading both row halves at once (da packed to bf16 first to make room).
// The cost left is the epilogue's arithmetic after each tile's mainloop: about 30 % on top of the
// plain da GEMM, against the separate pass's 55 %.
// Router-weight gradient (row_dot): with dyp = w * dy, <dy, yp> = <dy, act w_down> = <da, act> / w,
// so the combine backward need not read yp (R*H bf16) to form it. Each thread sums da * act over
// its units of a row in a fixed order, the quad's four lanes add theirs by two xor-shuffles (a
// fixed order too), and lane 0 writes the tile's part; the parts are added in column-tile order
// later (combine_dweight_from_row_dots). For SwiGLU da * act = d_up * up: one FMA on values the
// gradient has already formed (da as rounded for dpre, act in fp32; each term within bf16's unit
// roundoff, 2^-8, of its exact value, as yp's rounding is in <dy, yp>). A first version recomputed
// act, rounded to bf16, and multiplied the fp32 da: the da step grew from 1.23x to 1.32x the
// dw_down step at OLMoE and from 1.06x to 1.13x at Qwen3 (layer calls bb76680, d260f4a).
class EpilogueActivationGrad : public RegisterEpilogue<ActGradEpilogueArguments> {
 public:
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.offsets != nullptr && args.pre != nullptr && args.dpre != nullptr &&
           args.ld_pre % 8 == 0 && (args.row_dot == nullptr || args.ld_row_dot > 0);
  }

  CUTLASS_HOST_DEVICE explicit EpilogueActivationGrad(Params const& params)
      : RegisterEpilogue(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    constexpr int kGroups = groups_per_row<TiledMma, FrgLayout, BlockShapeMNK>();
    const ThreadTile t = locate(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                                tiled_mma, thread_idx);
    constexpr int kTileN = cute::size<1>(BlockShapeMNK{});
    const int64_t ld = params_.ld_pre;
    const __nv_bfloat16* const pre = params_.pre;
    __nv_bfloat16* const dpre = params_.dpre;
    const bool with_dot = params_.row_dot != nullptr;

    CUTLASS_PRAGMA_UNROLL
    for (int v1 = 0; v1 < 2; ++v1) {
      const bool row_ok = t.m[v1] < t.rows;
      const int64_t r = t.row0 + t.m[v1];
      // da of group j, column 2q + v0: accumulator 2 v1 + 4 j + v0, as the plain GEMM stores it.
      auto da = [&](int j, int v0) { return rounded(accumulators(2 * v1 + 4 * j + v0)); };
      float dot = 0.f;
      if (params_.swiglu == 0) {
        uint32_t h[kGroups] = {};  // pre of units (u, u + 1), u = n_tile + 8 j + 2q
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kGroups; ++j) {
          const int u = t.n_tile + 8 * j + 2 * t.q;
          if (row_ok && u < t.cols) h[j] = *reinterpret_cast<const uint32_t*>(pre + r * ld + u);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kGroups; ++j) {
          const int u = t.n_tile + 8 * j + 2 * t.q;
          const __nv_bfloat162 g = unpack(h[j]);
          const __nv_bfloat162 d =
              __floats2bfloat162_rn(da(j, 0) * act::gelu_grad(__low2float(g)),
                                    da(j, 1) * act::gelu_grad(__high2float(g)));
          if (with_dot) {
            dot = fmaf(da(j, 0), act::gelu(__low2float(g)), dot);
            dot = fmaf(da(j, 1), act::gelu(__high2float(g)), dot);
          }
          if (row_ok && u < t.cols) *reinterpret_cast<__nv_bfloat162*>(dpre + r * ld + u) = d;
        }
      } else if (params_.blocked != 0) {
        // Block c (groups 4c .. 4c+3, units n_tile + 32c ..): lane q's pairs 8q + s, s = 0..7, are
        // the units of group 4c + s % 4, column 2q + s / 4.
        uint4 h[kGroups / 2] = {};
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kGroups / 4; ++c) {
          const int pair = t.n_tile + 32 * c + 8 * t.q;
          const uint4* src = reinterpret_cast<const uint4*>(pre + r * ld + 2 * int64_t{pair});
          if (row_ok && pair < t.cols) h[2 * c] = src[0], h[2 * c + 1] = src[1];
        }
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kGroups / 4; ++c) {
          const int pair = t.n_tile + 32 * c + 8 * t.q;
          const uint32_t w[8] = {h[2 * c].x,     h[2 * c].y,     h[2 * c].z,     h[2 * c].w,
                                 h[2 * c + 1].x, h[2 * c + 1].y, h[2 * c + 1].z, h[2 * c + 1].w};
          uint32_t o[8];
          CUTLASS_PRAGMA_UNROLL
          for (int s = 0; s < 8; ++s)
            o[s] = swiglu_grad_pair(da(4 * c + s % 4, s / 4), w[s], dot);
          uint4* dst = reinterpret_cast<uint4*>(dpre + r * ld + 2 * int64_t{pair});
          if (row_ok && pair < t.cols) {
            dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
            dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
          }
        }
      } else {
        uint2 h[kGroups] = {};  // (gate, up) of units u and u + 1, u = n_tile + 8 j + 2q
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kGroups; ++j) {
          const int u = t.n_tile + 8 * j + 2 * t.q;
          if (row_ok && u < t.cols)
            h[j] = *reinterpret_cast<const uint2*>(pre + r * ld + 2 * int64_t{u});
        }
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kGroups; ++j) {
          const int u = t.n_tile + 8 * j + 2 * t.q;
          const uint2 d = make_uint2(swiglu_grad_pair(da(j, 0), h[j].x, dot),
                                     swiglu_grad_pair(da(j, 1), h[j].y, dot));
          if (row_ok && u < t.cols)
            *reinterpret_cast<uint2*>(dpre + r * ld + 2 * int64_t{u}) = d;
        }
      }
      if (with_dot) {
        // Units past N read pre as zeros (act 0) and their accumulators are zero: they add 0.
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (row_ok && t.q == 0)
          params_.row_dot[(t.n_tile / kTileN) * params_.ld_row_dot + r] = dot;
      }
    }
  }
};

// What the da GEMM with the activation backward is assembled with.
using EpilogueActGrad = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    EpilogueActivationGrad>;

}  // namespace moe::cuda::grouped_gemm
