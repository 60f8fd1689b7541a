// The fused causal attention (moe::cuda::lm::flash_attention_*) vs the CPU reference of
// include/moe/model/layers.hpp, a CPU log-sum-exp, and the cuBLAS attention of the same library:
// fresh seeded inputs, outputs poisoned with 0xff bytes (NaN) before each run, every call run
// twice and compared byte for byte (the backward is deterministic by construction).
//
// Tolerances:
//   out, dqkv: relative Frobenius error ||got - want|| / ||want|| < 1e-2. The kernels compute in
//     fp32 from bf16 inputs but round three things to bf16: the probabilities p (operand of p v),
//     the score gradients ds (operand of ds k and ds^T q), and the outputs. Each rounding has unit
//     roundoff 2^-9 ~ 2e-3 and the chain stays under ~5e-3; an indexing, masking or formula error
//     is O(1). Against the cuBLAS path (its own bf16 roundings of att and dscores) the two
//     errors add, still well under 1e-2.
//   lse: |got - want| <= 1e-3 + 1e-4 |want|. lse is fp32 all the way (scores from exact bf16
//     products, fp32 sums): ~hs * 2^-24 relative on the scores, far below 1e-3 absolute.
// The CPU reference runs on the inputs rounded to bf16, so the tolerances measure the GPU's
// arithmetic, not the input rounding.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "lm_test_util.hpp"
#include "moe/check.hpp"
#include "moe/cuda/lm/layers.hpp"
#include "moe/model/layers.hpp"

namespace moe::test {
namespace {

using bf16 = __nv_bfloat16;
namespace lm = cuda::lm;

constexpr double kBf16Tol = 1e-2;

struct FlashShape {
  int64_t B, S, NH, hs;
  int64_t D() const { return NH * hs; }
  int64_t N() const { return B * S; }
  std::string name() const {
    std::string s = "B";  // appended, not operator+ chains: gcc 12 -Wrestrict false positive
    s += std::to_string(B) + "_S" + std::to_string(S) + "_NH" + std::to_string(NH) + "_hs";
    s += std::to_string(hs);
    return s;
  }
};

// Every supported hs with S = 1 (one key), 7 (under one tile), 64 (one whole tile), 65 (one key
// past it), 200 (tails in both tile sizes), 512 (the trainer's length); B and NH cycle through
// {1, 3} x {1, 4, 8} so each hs meets several head counts and both batch sizes.
std::vector<FlashShape> flash_shapes() {
  const int64_t bnh[6][2] = {{1, 1}, {3, 4}, {1, 8}, {3, 1}, {1, 4}, {3, 8}};
  std::vector<FlashShape> v;
  int i = 0;
  for (int64_t hs : {32, 64, 128})
    for (int64_t S : {1, 7, 64, 65, 200, 512}) {
      const int64_t* p = bnh[i++ % 6];
      if (S > 256 && small_only()) continue;
      v.push_back({p[0], S, p[1], hs});
    }
  return v;
}

// lse (B,NH,S) of the scaled causal scores, in double.
std::vector<double> cpu_lse(const std::vector<float>& qkv, const FlashShape& sh) {
  const int64_t B = sh.B, S = sh.S, NH = sh.NH, hs = sh.hs, D = sh.D(), C3 = 3 * D;
  const double scale = 1.0 / std::sqrt(double(hs));
  std::vector<double> lse(B * NH * S), x(S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < S; ++t) {
        const float* q = &qkv[(b * S + t) * C3 + h * hs];
        double mx = -INFINITY;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const float* k = &qkv[(b * S + t2) * C3 + D + h * hs];
          double dot = 0;
          for (int64_t i = 0; i < hs; ++i) dot += double(q[i]) * double(k[i]);
          x[t2] = dot * scale;
          mx = std::max(mx, x[t2]);
        }
        double sum = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) sum += std::exp(x[t2] - mx);
        lse[(b * NH + h) * S + t] = mx + std::log(sum);
      }
  return lse;
}

class LmLayersFlash : public CublasTest {};

// ---------------------------------------------------------------------------------------------

TEST_F(LmLayersFlash, ForwardAndBackwardMatchTheCpuAndRepeatBitForBit) {
  for (const FlashShape& sh : flash_shapes()) {
    SCOPED_TRACE(sh.name());
    const int64_t B = sh.B, S = sh.S, NH = sh.NH, D = sh.D(), N = sh.N();
    ASSERT_TRUE(lm::flash_attention_supported(D, NH));
    const uint64_t seed = 100 + static_cast<uint64_t>(S * 7 + sh.hs);
    const std::vector<float> qkv = round_to<bf16>(random_vector<float>(N * 3 * D, seed));
    const std::vector<float> dout = round_to<bf16>(random_vector<float>(N * D, seed + 1));
    std::vector<float> out_ref(N * D), att(B * NH * S * S), datt(B * NH * S * S);
    std::vector<float> dqkv_ref(N * 3 * D, 0.f);
    model::attention_forward(out_ref.data(), att.data(), qkv.data(), B, S, D, NH);
    model::attention_backward(dqkv_ref.data(), datt.data(), dout.data(), qkv.data(), att.data(),
                              B, S, D, NH);
    const std::vector<double> lse_ref = cpu_lse(qkv, sh);

    DeviceArray<bf16> d_qkv(to_device_type<bf16>(qkv)), d_dout(to_device_type<bf16>(dout));
    DeviceArray<bf16> d_out(N * D), d_dqkv(N * 3 * D);
    DeviceArray<float> d_lse(B * NH * S);
    DeviceArray<uint8_t> scratch(lm::flash_attention_scratch_bytes(B, S, D, NH));
    std::vector<bf16> first_out, first_dqkv;
    std::vector<float> first_lse;
    for (int run = 0; run < 2; ++run) {
      d_out.poison();
      d_lse.poison();
      d_dqkv.poison();
      scratch.poison();
      lm::flash_attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), B, S, D, NH, stream_);
      lm::flash_attention_backward(d_dqkv.get(), d_dout.get(), d_out.get(), d_lse.get(),
                                   d_qkv.get(), B, S, D, NH, scratch.get(), stream_);
      MOE_CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<bf16> out = d_out.download(), dqkv = d_dqkv.download();
      const std::vector<float> lse = d_lse.download();
      EXPECT_LE(rel_error(from_device_type<bf16>(out), out_ref), kBf16Tol) << "flash out";
      EXPECT_LE(rel_error(from_device_type<bf16>(dqkv), dqkv_ref), kBf16Tol) << "flash dqkv";
      EXPECT_TRUE(close("lse", lse, lse_ref, 1e-3, 1e-4));
      if (run == 1) {
        EXPECT_TRUE(same_bytes(out, first_out)) << "two forward runs differ (out)";
        EXPECT_TRUE(same_bytes(lse, first_lse)) << "two forward runs differ (lse)";
        EXPECT_TRUE(same_bytes(dqkv, first_dqkv)) << "two backward runs differ (dqkv)";
      }
      first_out = out, first_lse = lse, first_dqkv = dqkv;
    }
  }
}

TEST_F(LmLayersFlash, AgreesWithTheCublasAttention) {
  for (const FlashShape& sh : flash_shapes()) {
    SCOPED_TRACE(sh.name());
    const int64_t B = sh.B, S = sh.S, NH = sh.NH, D = sh.D(), N = sh.N();
    const uint64_t seed = 300 + static_cast<uint64_t>(S * 7 + sh.hs);
    const std::vector<float> qkv = round_to<bf16>(random_vector<float>(N * 3 * D, seed));
    const std::vector<float> dout = round_to<bf16>(random_vector<float>(N * D, seed + 1));
    DeviceArray<bf16> d_qkv(to_device_type<bf16>(qkv)), d_dout(to_device_type<bf16>(dout));

    // the cuBLAS path
    DeviceArray<bf16> c_out(N * D), c_dqkv(N * 3 * D);
    DeviceArray<uint8_t> state_mem(lm::AttentionState::bytes(B, S, D, NH));
    DeviceArray<uint8_t> c_scratch(lm::attention_scratch_bytes(B, S, D, NH));
    lm::AttentionState st;
    st.bind(state_mem.get(), B, S, D, NH);
    lm::attention_forward(handle_, c_out.get(), st, d_qkv.get(), B, S, D, NH, c_scratch.get(),
                          stream_);
    lm::attention_backward(handle_, c_dqkv.get(), d_dout.get(), st, B, S, D, NH,
                           c_scratch.get(), stream_);

    // the fused path
    DeviceArray<bf16> f_out(N * D), f_dqkv(N * 3 * D);
    DeviceArray<float> f_lse(B * NH * S);
    DeviceArray<uint8_t> f_scratch(lm::flash_attention_scratch_bytes(B, S, D, NH));
    f_out.poison();
    f_dqkv.poison();
    lm::flash_attention_forward(f_out.get(), f_lse.get(), d_qkv.get(), B, S, D, NH, stream_);
    lm::flash_attention_backward(f_dqkv.get(), d_dout.get(), f_out.get(), f_lse.get(),
                                 d_qkv.get(), B, S, D, NH, f_scratch.get(), stream_);

    const std::vector<float> cublas_out = download_float(c_out);
    const std::vector<float> cublas_dqkv = download_float(c_dqkv);
    EXPECT_LE(rel_error(download_float(f_out), cublas_out), kBf16Tol) << "out vs cuBLAS";
    EXPECT_LE(rel_error(download_float(f_dqkv), cublas_dqkv), kBf16Tol) << "dqkv vs cuBLAS";
  }
}

TEST(LmLayersFlashConfig, OnlyHeadSizes32And64And128AreSupported) {
  EXPECT_TRUE(lm::flash_attention_supported(32, 1));
  EXPECT_TRUE(lm::flash_attention_supported(512, 8));    // hs = 64
  EXPECT_TRUE(lm::flash_attention_supported(1024, 8));   // hs = 128
  EXPECT_FALSE(lm::flash_attention_supported(16, 1));    // hs = 16
  EXPECT_FALSE(lm::flash_attention_supported(384, 8));   // hs = 48
  EXPECT_FALSE(lm::flash_attention_supported(768, 8));   // hs = 96
  EXPECT_FALSE(lm::flash_attention_supported(256, 1));   // hs = 256
  EXPECT_FALSE(lm::flash_attention_supported(100, 3));   // NH does not divide D
  EXPECT_FALSE(lm::flash_attention_supported(64, 0));
  EXPECT_THROW(lm::flash_attention_scratch_bytes(1, 4, 384, 8), ConfigError);
  EXPECT_THROW(lm::flash_attention_forward(nullptr, nullptr, nullptr, 1, 4, 384, 8, nullptr),
               ConfigError);
}

}  // namespace
}  // namespace moe::test
