// defines: combine_forward, combine_backward, combine_dweight_from_row_dots
// yp[M,H] --combine--> y[T,H]: per token, the weighted fp32 sum of its rows in choice order,
// written once (rows.cuh gather_sum_kernel). The backward scatters w * dy[t] to the token's rows
// (a weighted permute) and reduces <dy[t], yp[row]> for the router's weight gradient.
#include <cuda_bf16.h>

#include "moe/cuda/check.cuh"
#include "moe/cuda/combine.hpp"
#include "rows.cuh"

namespace moe::cuda {

using namespace rows;

// ------------------------------------------------------------------------------------------------
// CUDA kernels
// ------------------------------------------------------------------------------------------------

namespace {

// Warp t: for the token's choices (choice order), stream dy[t] and yp[row_j] in chunks, write
// dyp[row_j] = w_j * dy[t] and keep a per-lane partial of each choice's dot product; one
// butterfly reduction per choice gives dweight (a fixed order, so the same bits every run). Two
// choices' rows move per pass (kRows = 2): both rows' loads are in flight before either is
// stored -- in place (dyp = yp) the compiler may not hoist the next row's loads above this row's
// stores, and one row at a time left HBM at 2.4 TB/s. dy[t] is loaded once per chunk for both.
// Warps [T, T + pad_groups): zero the padding rows of dyp.
// dyp may be yp (in place): every element of yp[row_j] is read by the lane that then writes the
// same element of dyp[row_j], each row belongs to one choice, and padding rows are never read.
template <class T, int kVec, int kUnroll, int kRows>
__device__ __forceinline__ void combine_backward_rows(const int32_t (&row)[kRows],
                                                      const int32_t (&choice)[kRows],
                                                      const float* __restrict__ weight,
                                                      const T* g, const T* yp, T* dyp,
                                                      float* __restrict__ dweight,
                                                      int64_t hidden, int lane) {
  constexpr int64_t kStep = int64_t{kWarp} * kVec * kUnroll;
  float wj[kRows], dot[kRows];
#pragma unroll
  for (int q = 0; q < kRows; ++q) wj[q] = weight[choice[q]], dot[q] = 0.f;
  for (int64_t base = 0; base < hidden; base += kStep) {
    Pack<T, kVec> gv[kUnroll], yv[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
      if (i < hidden) {
        gv[u] = load_pack<Cache::kDefault, T, kVec>(g + i);
#pragma unroll
        for (int q = 0; q < kRows; ++q)
          yv[q][u] = load_pack<Cache::kDefault, T, kVec>(yp + int64_t{row[q]} * hidden + i);
      }
    }
#pragma unroll
    for (int q = 0; q < kRows; ++q)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + (int64_t{u} * kWarp + lane) * kVec;
        if (i >= hidden) continue;
        float o[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float gk = gv[u].get(k);
          dot[q] = fmaf(gk, yv[q][u].get(k), dot[q]);
          o[k] = wj[q] * gk;
        }
        Pack<T, kVec> op;
        op.set_all(o);
        store_pack<Cache::kDefault, T, kVec>(dyp + int64_t{row[q]} * hidden + i, op);
      }
  }
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
#pragma unroll
    for (int d = kWarp / 2; d > 0; d /= 2) dot[q] += __shfl_xor_sync(0xffffffffu, dot[q], d);
    if (lane == 0) dweight[choice[q]] = dot[q];
  }
}

template <class T, int kVec, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(PlanView plan, const float* __restrict__ weight,
                            const T* __restrict__ dy, const T* yp, T* dyp,
                            float* __restrict__ dweight, int64_t hidden,
                            RowGrid grid) {
  const int lane = threadIdx.x % kWarp;
  const int64_t w = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (w >= grid.warps()) return;
  if (w >= grid.token_warps) {
    zero_padding_rows<T, kVec>(plan, w - grid.token_warps, dyp, hidden);
    return;
  }
  const int64_t t = w;
  const int32_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
  const T* g = dy + t * hidden;
  int32_t pending_row = -1, pending_choice = -1;  // a choice with a row, waiting for a partner
  for (int32_t j = j0; j < j1; ++j) {
    const int32_t r = plan.token_rows[j], c = plan.token_choices[j];
    if (r < 0) {  // no row: the weight did not reach y
      if (lane == 0) dweight[c] = 0.f;
      continue;
    }
    if (pending_row < 0) {
      pending_row = r, pending_choice = c;
      continue;
    }
    const int32_t rows[2] = {pending_row, r}, choices[2] = {pending_choice, c};
    combine_backward_rows<T, kVec, kUnroll, 2>(rows, choices, weight, g, yp, dyp, dweight,
                                               hidden, lane);
    pending_row = -1;
  }
  if (pending_row >= 0) {
    const int32_t rows[1] = {pending_row}, choices[1] = {pending_choice};
    combine_backward_rows<T, kVec, kUnroll, 1>(rows, choices, weight, g, yp, dyp, dweight,
                                               hidden, lane);
  }
}

// Thread c: dweight[c] from the row dots of its row (parts added in column-tile order), over the
// choice's weight, which dyp carried into da.
__global__ void __launch_bounds__(kThreads)
    dweight_from_row_dots_kernel(const int32_t* __restrict__ choice_row,
                                 const float* __restrict__ weight,
                                 const float* __restrict__ row_dot, int parts, int64_t ld,
                                 float* __restrict__ dweight, int64_t choices) {
  const int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (c >= choices) return;
  const int32_t r = choice_row[c];
  float sum = 0.f;
  if (r >= 0)
    for (int p = 0; p < parts; ++p) sum += row_dot[p * ld + r];
  const float w = weight[c];
  dweight[c] = r >= 0 && w != 0.f ? sum / w : 0.f;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kernel launchers
// ------------------------------------------------------------------------------------------------

template <class T>
void combine_forward(const PlanView& plan, const RoutingView& routing, const T* yp,
                     int64_t hidden, T* y, cudaStream_t stream) {
  launch_gather_sum<T, true>(plan, routing.choice_weight, yp, hidden, y, stream);
}

template <class T>
void combine_backward(const PlanView& plan, const RoutingView& routing, const T* yp, const T* dy,
                      int64_t hidden, T* dyp, float* dweight, cudaStream_t stream) {
  MOE_CHECK((yp == nullptr) == (dweight == nullptr),
            "combine_backward: yp and dweight go together (both null: dyp only)");
  const RowGrid grid = row_grid(plan.shape, true);
  if (grid.warps() == 0) return;
  constexpr int kWide = 16 / sizeof(T);
  if (yp == nullptr) {  // a weighted permute: 8 packs per lane in flight, as permute_forward
    if (vector_width<T>(hidden, {dy, dyp}) == kWide)
      permute_scatter_kernel<T, kWide, 8, Cache::kDefault, true>
          <<<grid.blocks(), kThreads, 0, stream>>>(plan, dy, dyp, hidden, grid,
                                                   routing.choice_weight);
    else
      permute_scatter_kernel<T, 1, 8, Cache::kDefault, true>
          <<<grid.blocks(), kThreads, 0, stream>>>(plan, dy, dyp, hidden, grid,
                                                   routing.choice_weight);
    MOE_CUDA_LAUNCH_CHECK();
    return;
  }
  if (vector_width<T>(hidden, {dy, yp, dyp}) == kWide)
    combine_backward_kernel<T, kWide, 4><<<grid.blocks(), kThreads, 0, stream>>>(
        plan, routing.choice_weight, dy, yp, dyp, dweight, hidden, grid);
  else
    combine_backward_kernel<T, 1, 4><<<grid.blocks(), kThreads, 0, stream>>>(
        plan, routing.choice_weight, dy, yp, dyp, dweight, hidden, grid);
  MOE_CUDA_LAUNCH_CHECK();
}

void combine_dweight_from_row_dots(const PlanView& plan, const RoutingView& routing,
                                   const float* row_dot, int64_t parts, int64_t ld,
                                   float* dweight, cudaStream_t stream) {
  const int64_t N = plan.shape.choices;
  MOE_CHECK(parts >= 1 && ld >= plan.shape.max_rows(),
            "combine_dweight_from_row_dots: parts (", parts, ") must be >= 1 and ld (", ld,
            ") >= max_rows (", plan.shape.max_rows(), ")");
  if (N == 0) return;
  dweight_from_row_dots_kernel<<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      plan.choice_row, routing.choice_weight, row_dot, static_cast<int>(parts), ld, dweight, N);
  MOE_CUDA_LAUNCH_CHECK();
}

#define MOE_INSTANTIATE(T)                                                                      \
  template void combine_forward<T>(const PlanView&, const RoutingView&, const T*, int64_t, T*, \
                                   cudaStream_t);                                              \
  template void combine_backward<T>(const PlanView&, const RoutingView&, const T*, const T*,   \
                                    int64_t, T*, float*, cudaStream_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(__nv_bfloat16)
#undef MOE_INSTANTIATE

}  // namespace moe::cuda
