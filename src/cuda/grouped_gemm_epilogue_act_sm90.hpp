// defines: moe::cuda::grouped_gemm::{EpilogueActivation, EpilogueAct}
// The fused epilogue of the up-projection: from the fp32 accumulators of a (BLK_M, BLK_N) tile of
// pre = xp · w_up[e] it writes
//   pre  (m_e, N)  bf16, unless params.pre is null (forward without backward)
//   act  SwiGLU: (m_e, N/2) act[r, j] = silu(pre[r, 2j]) * pre[r, 2j+1]   (gate/up interleaved)
//        GELU:   (m_e, N)   act[r, j] = gelu(pre[r, j])
// straight from registers to global memory (no smem, no TMA), so the unfused pair's extra pass --
// write pre, read it back, write act: 3 * M * I * 2 bytes more for SwiGLU -- disappears.
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

class EpilogueActivation {
 public:
  // What CUTLASS's kernel and adapter read off an epilogue. C is never read; D is the pair of
  // outputs described above, addressed from params rather than through CUTLASS's D arguments.
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

  struct Arguments {
    const int32_t* offsets = nullptr;  // (E+1) segment starts: group l's rows begin at offsets[l]
    __nv_bfloat16* pre = nullptr;      // (max_rows, ld_pre) or nullptr
    __nv_bfloat16* act = nullptr;      // (max_rows, ld_act)
    int64_t ld_pre = 0;                // N
    int64_t ld_act = 0;                // N / 2 (SwiGLU) or N (GELU)
    int swiglu = 1;                    // 1: SwiGLU on interleaved pairs, 0: GELU
    int blocked = 0;                   // SwiGLU: pairs in GateUpLayout::blocked order (below)
  };
  using Params = Arguments;

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
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.offsets != nullptr && args.act != nullptr && args.ld_pre % 8 == 0 &&
           args.ld_act % 8 == 0;
  }

  CUTLASS_HOST_DEVICE explicit EpilogueActivation(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    // One wgmma's (thr, val) -> m + 64 n: lane % 4 = q picks column pair (2q, 2q+1), lane / 4 the
    // row; values are (v0: column 2q + v0, v1: row + 8 v1, j: column + 8 j). The quad exchange
    // below relies on exactly this, so check it.
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

    const int M = get<0>(problem_shape_mnkl);  // m_e
    const int N = get<1>(problem_shape_mnkl);  // A, a multiple of 8 (16 for SwiGLU)
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    const int64_t row0 = params_.offsets[l_coord];

    // Step 1: this thread's first row and the tile's first column, from the coordinate tensor.
    Tensor cD = make_identity_tensor(make_shape(M, N));                            // (M,N)
    Tensor gcD = local_tile(cD, take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
                                                                                   // (BLK_M,BLK_N)
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(gcD);        // (MMA,MMA_M,MMA_N)
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators));
    const int q = thread_idx & 3;                      // column pair within each 8-column group
    const int n_tile = get<1>(tCcD(0)) - 2 * q;        // first column of the tile
    __nv_bfloat16* const pre_out = params_.pre;
    __nv_bfloat16* const act_out = params_.act;
    const bool swiglu = params_.swiglu != 0;
    const bool blocked = params_.blocked != 0;

    // Step 2: per row half, blocks of 8 groups (64 pre columns): round to bf16, exchange within
    // the quad so that each lane holds 8 consecutive columns, store 16 bytes per lane. All lanes
    // take part in every exchange; only the stores are predicated.
    CUTLASS_PRAGMA_UNROLL
    for (int v1 = 0; v1 < 2; ++v1) {
      const int m = get<0>(tCcD(2 * v1));
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

 private:
  CUTLASS_DEVICE static uint32_t pack(__nv_bfloat162 x) {
    return *reinterpret_cast<uint32_t*>(&x);
  }
  CUTLASS_DEVICE static __nv_bfloat162 unpack(uint32_t u) {
    return *reinterpret_cast<__nv_bfloat162*>(&u);
  }
  // w[idx] for a run-time idx in [0, 4) without indexing a register array.
  CUTLASS_DEVICE static uint32_t pick(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                      int idx) {
    const uint32_t lo = idx & 1 ? w1 : w0, hi = idx & 1 ? w3 : w2;
    return idx & 2 ? hi : lo;
  }
  // 4 x 4 transpose of 32-bit words within a quad of lanes: lane q passes in its words w[0..3]
  // and gets back, in position s, word q of lane s. Lane q sends w[q ^ k] to lane q ^ k (k = 1,
  // 2, 3), which receives exactly the word it needs from q.
  CUTLASS_DEVICE static uint4 quad_transpose(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                             int q) {
    const uint32_t r0 = pick(w0, w1, w2, w3, q);  // from itself
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 1), 1);
    const uint32_t r2 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 2), 2);
    const uint32_t r3 = __shfl_xor_sync(0xffffffffu, pick(w0, w1, w2, w3, q ^ 3), 3);
    // r_k came from lane q ^ k: it belongs in position q ^ k.
    return make_uint4(pick(r0, r1, r2, r3, q), pick(r0, r1, r2, r3, q ^ 1),
                      pick(r0, r1, r2, r3, q ^ 2), pick(r0, r1, r2, r3, q ^ 3));
  }

  Params params_;
};

// What the kernel is assembled with: the adapter adds the (empty) TMA pipeline interface.
using EpilogueAct = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
    EpilogueActivation>;

}  // namespace moe::cuda::grouped_gemm
