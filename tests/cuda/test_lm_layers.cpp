// CUDA layer kinds of the byte-level LM (moe::cuda::lm) vs the CPU reference of
// include/moe/model/layers.hpp and the CPU AdamW of src/model/train.cpp: fresh seeded inputs
// (never zeros), OVERWRITTEN outputs poisoned with 0xff bytes (NaN), += outputs started from
// random values (the accumulate convention), every GPU call run twice and compared byte for byte.
//
// Tolerances (relative Frobenius error, ||got - want|| / ||want - start||):
//   kBf16Tol = 1e-2 where the GPU result passes through bf16 (an output, att or dscores): one
//     bf16 rounding has unit roundoff 2^-9 ~ 2e-3, a chain of two or three roundings stays under
//     ~6e-3, so 1e-2 passes rounding and fails any indexing or formula error (those are O(1)).
//   kFp32Tol = 1e-4 where both sides compute in fp32 from the same (bf16-exact) inputs and only
//     the summation order differs (GEMM split, warp trees): ~K * 2^-24 for K <= 1024.
// The CPU reference runs on the inputs rounded to bf16 where the GPU reads bf16, so the
// tolerances measure the GPU's arithmetic, not the input rounding.
// Encoder, elementwise and AdamW are exact: they must match the CPU bit for bit.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "lm_test_util.hpp"
#include "moe/cuda/lm/layers.hpp"
#include "moe/model/layers.hpp"
#include "moe/model/train.hpp"
#include "moe/model/transformer.hpp"

namespace moe::test {
namespace {

using bf16 = __nv_bfloat16;
namespace lm = cuda::lm;

constexpr double kBf16Tol = 1e-2;
constexpr double kFp32Tol = 1e-4;

// ---------------------------------------------------------------------------------------------
// helpers

struct Shape {
  int64_t B, S, D, NH;
  int64_t N() const { return B * S; }
  std::string name() const {
    return "B" + std::to_string(B) + "_S" + std::to_string(S) + "_D" + std::to_string(D) +
           "_NH" + std::to_string(NH);
  }
};

// N = 1; D = 12, 20, 30 (not multiples of 8; 30 not of 4: scalar paths); S = 1, 257; NH = 1;
// hs = 64 and 32 (the 16-byte permute path); hs = 4, 6, 10 (the element path).
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> v = {{1, 1, 8, 1},   {2, 5, 12, 3},  {3, 7, 20, 2},
                                       {1, 33, 30, 5}, {2, 257, 64, 4}, {4, 64, 128, 2},
                                       {2, 40, 64, 1}};
  return v;
}

std::vector<float> rounded(const std::vector<float>& v) { return round_to<bf16>(v); }

std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i)
    t[i] = static_cast<int32_t>(counter_bits(seed, RngStream::init, uint64_t(i)) % uint64_t(V));
  return t;
}

class LmLayers : public CublasTest {};

// ---------------------------------------------------------------------------------------------
// encoder

TEST_F(LmLayers, EncoderMatchesTheCpuBitForBitAndAccumulatesInTokenOrder) {
  for (const Shape& sh : shapes())
    for (int64_t V : {256, 5}) {  // V = 5: most tokens repeat, the order of the sums matters
      SCOPED_TRACE(sh.name() + "_V" + std::to_string(V));
      const int64_t B = sh.B, S = sh.S, D = sh.D, N = sh.N();
      const std::vector<int32_t> tokens = random_tokens(N, V, 11);
      const std::vector<float> wte = random_vector<float>(V * D, 12);
      const std::vector<float> wpe = random_vector<float>(S * D, 13);
      const std::vector<float> dout = random_vector<float>(N * D, 14);
      const std::vector<float> dwte0 = random_vector<float>(V * D, 15);
      const std::vector<float> dwpe0 = random_vector<float>(S * D, 16);

      std::vector<float> out_ref(N * D), dwte_ref = dwte0, dwpe_ref = dwpe0;
      model::encoder_forward(out_ref.data(), tokens.data(), wte.data(), wpe.data(), B, S, D);
      model::encoder_backward(dwte_ref.data(), dwpe_ref.data(), dout.data(), tokens.data(), B, S,
                              D);

      DeviceArray<int32_t> d_tokens(tokens);
      DeviceArray<float> d_wte(wte), d_wpe(wpe), d_dout(dout), d_out(N * D);
      DeviceArray<float> d_dwte(V * D), d_dwpe(S * D);
      std::vector<float> first_out, first_dwte;
      for (int run = 0; run < 2; ++run) {
        d_out.poison();
        d_dwte.upload(dwte0);
        d_dwpe.upload(dwpe0);
        lm::encoder_forward(d_out.get(), d_tokens.get(), d_wte.get(), d_wpe.get(), B, S, D,
                            stream_);
        lm::encoder_backward(d_dwte.get(), d_dwpe.get(), d_dout.get(), d_tokens.get(), B, S, D, V,
                             stream_);
        const std::vector<float> out = d_out.download(), dwte = d_dwte.download();
        EXPECT_TRUE(same_bytes(out, out_ref)) << "encoder out";
        EXPECT_TRUE(same_bytes(dwte, dwte_ref)) << "dwte";
        EXPECT_TRUE(same_bytes(d_dwpe.download(), dwpe_ref)) << "dwpe";
        if (run == 1) {
          EXPECT_TRUE(same_bytes(out, first_out) && same_bytes(dwte, first_dwte))
              << "two runs differ";
        }
        first_out = out, first_dwte = dwte;
      }
    }
}

// ---------------------------------------------------------------------------------------------
// layernorm

TEST_F(LmLayers, LayerNormForwardMatchesTheCpu) {
  for (const Shape& sh : shapes()) {
    SCOPED_TRACE(sh.name());
    const int64_t N = sh.N(), D = sh.D;
    std::vector<float> inp = random_vector<float>(N * D, 21);
    for (float& x : inp) x += 0.75f;  // a non-zero mean to subtract
    const std::vector<float> w = random_vector<float>(D, 22), b = random_vector<float>(D, 23);
    std::vector<float> out_ref(N * D), mean_ref(N), rstd_ref(N);
    model::layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), inp.data(),
                             w.data(), b.data(), N, D);

    DeviceArray<float> d_inp(inp), d_w(w), d_b(b), d_mean(N), d_rstd(N);
    DeviceArray<bf16> d_out(N * D);
    std::vector<bf16> first;
    for (int run = 0; run < 2; ++run) {
      d_out.poison();
      d_mean.poison();
      d_rstd.poison();
      lm::layernorm_forward(d_out.get(), d_mean.get(), d_rstd.get(), d_inp.get(), d_w.get(),
                            d_b.get(), N, D, stream_);
      const std::vector<bf16> out = d_out.download();
      EXPECT_LE(rel_error(from_device_type<bf16>(out), out_ref), kBf16Tol) << "ln out";
      EXPECT_LE(rel_error(d_mean.download(), mean_ref), kFp32Tol) << "mean";
      EXPECT_LE(rel_error(d_rstd.download(), rstd_ref), kFp32Tol) << "rstd";
      if (run == 1) {
        EXPECT_TRUE(same_bytes(out, first)) << "two runs differ";
      }
      first = out;
    }
  }
}

template <class Dout>
void check_layernorm_backward(const Shape& sh, cudaStream_t stream) {
  SCOPED_TRACE(sh.name() + " dout " + dtype_name<Dout>());
  const int64_t N = sh.N(), D = sh.D;
  std::vector<float> inp = random_vector<float>(N * D, 31);
  for (float& x : inp) x -= 0.5f;
  const std::vector<float> w = random_vector<float>(D, 32), b = random_vector<float>(D, 33);
  const std::vector<float> dout = round_to<Dout>(random_vector<float>(N * D, 34));
  const std::vector<float> dinp0 = random_vector<float>(N * D, 35);
  const std::vector<float> dw0 = random_vector<float>(D, 36), db0 = random_vector<float>(D, 37);
  std::vector<float> ln(N * D), mean(N), rstd(N);
  model::layernorm_forward(ln.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(),
                           N, D);
  std::vector<float> dinp_ref = dinp0, dw_ref = dw0, db_ref = db0;
  model::layernorm_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(),
                            inp.data(), w.data(), mean.data(), rstd.data(), N, D);

  DeviceArray<float> d_inp(inp), d_w(w), d_mean(mean), d_rstd(rstd);
  DeviceArray<Dout> d_dout(to_device_type<Dout>(dout));
  DeviceArray<float> d_dinp(N * D), d_dw(D), d_db(D);
  DeviceArray<uint8_t> scratch(lm::layernorm_scratch_bytes(N, D));
  std::vector<float> first_dinp, first_dw, first_db;
  for (int run = 0; run < 2; ++run) {
    d_dinp.upload(dinp0);
    d_dw.upload(dw0);
    d_db.upload(db0);
    scratch.poison();
    lm::layernorm_backward<Dout>(d_dinp.get(), d_dw.get(), d_db.get(), d_dout.get(), d_inp.get(),
                                 d_w.get(), d_mean.get(), d_rstd.get(), N, D, scratch.get(),
                                 stream);
    const std::vector<float> dinp = d_dinp.download(), dw = d_dw.download(), db = d_db.download();
    EXPECT_LE(rel_error(dinp, dinp_ref, &dinp0), kFp32Tol) << "ln dinp";
    EXPECT_LE(rel_error(dw, dw_ref, &dw0), kFp32Tol) << "ln dw";
    EXPECT_LE(rel_error(db, db_ref, &db0), kFp32Tol) << "ln db";
    if (run == 1) {
      EXPECT_TRUE(same_bytes(dinp, first_dinp) && same_bytes(dw, first_dw) &&
                  same_bytes(db, first_db))
          << "two runs differ";
    }
    first_dinp = dinp, first_dw = dw, first_db = db;
  }
}

TEST_F(LmLayers, LayerNormBackwardAddsTheCpuGradientsForBf16AndFp32Dout) {
  for (const Shape& sh : shapes()) {
    check_layernorm_backward<bf16>(sh, stream_);
    check_layernorm_backward<float>(sh, stream_);
  }
  // Many rows: many row groups of partial sums; D = 1000 runs 250 columns x 4 on 256 threads.
  check_layernorm_backward<bf16>({16, 256, 1000, 8}, stream_);
  check_layernorm_backward<float>({1, 3, 4096, 1}, stream_);  // the widest row allowed
}

// The shape checks run on the host before any launch, so these need no GPU.
TEST(LmLayersConfig, LayerNormBackwardRejectsRowsWiderThan4096) {
  EXPECT_THROW(lm::layernorm_backward<bf16>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                            nullptr, nullptr, 2, 4097, nullptr, nullptr),
               ConfigError);
}

// ---------------------------------------------------------------------------------------------
// matmul

template <class Out>
void check_matmul_forward(cublasHandle_t handle, int64_t N, int64_t C, int64_t OC, bool with_bias,
                          bool accumulate, cudaStream_t stream) {
  SCOPED_TRACE("N" + std::to_string(N) + "_C" + std::to_string(C) + "_OC" + std::to_string(OC) +
               " out " + dtype_name<Out>() + (with_bias ? " bias" : "") +
               (accumulate ? " accumulate" : ""));
  const std::vector<float> inp = rounded(random_vector<float>(N * C, 41));
  const std::vector<float> weight = rounded(random_vector<float>(C * OC, 42, 0.2));
  const std::vector<float> bias = random_vector<float>(OC, 43);
  const std::vector<float> out0 = random_vector<float>(N * OC, 44);
  std::vector<float> ref(N * OC);
  model::matmul_forward(ref.data(), inp.data(), weight.data(), with_bias ? bias.data() : nullptr,
                        N, C, OC);
  if (accumulate)
    for (int64_t i = 0; i < N * OC; ++i) ref[i] += out0[i];

  DeviceArray<bf16> d_inp(to_device_type<bf16>(inp)), d_w(to_device_type<bf16>(weight));
  DeviceArray<float> d_bias(bias);
  DeviceArray<Out> d_out(N * OC);
  std::vector<Out> first;
  for (int run = 0; run < 2; ++run) {
    if (accumulate) d_out.upload(to_device_type<Out>(out0));
    else d_out.poison();
    lm::matmul_forward<Out>(handle, d_out.get(), d_inp.get(), d_w.get(),
                            with_bias ? d_bias.get() : nullptr, N, C, OC, accumulate, stream);
    const std::vector<Out> out = d_out.download();
    const double tol = std::is_same_v<Out, float> ? kFp32Tol : kBf16Tol;
    EXPECT_LE(rel_error(from_device_type<Out>(out), ref, accumulate ? &out0 : nullptr), tol);
    if (run == 1) {
      EXPECT_TRUE(same_bytes(out, first)) << "two runs differ";
    }
    first = out;
  }
}

template <class Dinp>
void check_matmul_backward(cublasHandle_t handle, int64_t N, int64_t C, int64_t OC,
                           bool with_dinp, bool with_dbias, cudaStream_t stream) {
  SCOPED_TRACE("N" + std::to_string(N) + "_C" + std::to_string(C) + "_OC" + std::to_string(OC) +
               " dinp " + dtype_name<Dinp>());
  const std::vector<float> dout = rounded(random_vector<float>(N * OC, 51));
  const std::vector<float> inp = rounded(random_vector<float>(N * C, 52));
  const std::vector<float> weight = rounded(random_vector<float>(C * OC, 53, 0.2));
  const std::vector<float> dw0 = random_vector<float>(C * OC, 54);
  const std::vector<float> db0 = random_vector<float>(OC, 55);
  std::vector<float> dinp_ref(N * C, 0.f), dw_ref = dw0, db_ref = db0;
  model::matmul_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(),
                         weight.data(), N, C, OC);

  DeviceArray<bf16> d_dout(to_device_type<bf16>(dout)), d_inp(to_device_type<bf16>(inp));
  DeviceArray<bf16> d_w(to_device_type<bf16>(weight));
  DeviceArray<Dinp> d_dinp(N * C);
  DeviceArray<float> d_dw(C * OC), d_db(OC);
  DeviceArray<uint8_t> scratch(lm::matmul_scratch_bytes(N, OC));
  std::vector<float> first_dw, first_db;
  std::vector<Dinp> first_dinp;
  for (int run = 0; run < 2; ++run) {
    d_dinp.poison();
    d_dw.upload(dw0);
    d_db.upload(db0);
    scratch.poison();
    lm::matmul_backward<Dinp>(handle, with_dinp ? d_dinp.get() : nullptr, d_dw.get(),
                              with_dbias ? d_db.get() : nullptr, d_dout.get(), d_inp.get(),
                              d_w.get(), N, C, OC, scratch.get(), stream);
    const std::vector<Dinp> dinp = d_dinp.download();
    const std::vector<float> dw = d_dw.download(), db = d_db.download();
    if (with_dinp) {
      const double tol = std::is_same_v<Dinp, float> ? kFp32Tol : kBf16Tol;
      EXPECT_LE(rel_error(from_device_type<Dinp>(dinp), dinp_ref), tol) << "dinp";
    }
    EXPECT_LE(rel_error(dw, dw_ref, &dw0), kFp32Tol) << "dweight";
    if (with_dbias) {
      EXPECT_LE(rel_error(db, db_ref, &db0), kFp32Tol) << "dbias";
    } else {
      EXPECT_TRUE(same_bytes(db, db0)) << "dbias written although null";
    }
    if (run == 1) {
      EXPECT_TRUE(!with_dinp || same_bytes(dinp, first_dinp)) << "two runs differ (dinp)";
      EXPECT_TRUE(same_bytes(dw, first_dw) && same_bytes(db, first_db)) << "two runs differ";
    }
    first_dinp = dinp, first_dw = dw, first_db = db;
  }
}

TEST_F(LmLayers, MatmulForwardMatchesTheCpuWithAndWithoutBias) {
  for (const Shape& sh : shapes()) {
    const int64_t N = sh.N(), D = sh.D;
    check_matmul_forward<bf16>(handle_, N, D, 3 * D, true, false, stream_);   // qkv
    check_matmul_forward<bf16>(handle_, N, D, D, false, false, stream_);
    check_matmul_forward<float>(handle_, N, D, D, true, false, stream_);
    check_matmul_forward<float>(handle_, N, D, D, true, true, stream_);      // proj into residual
    check_matmul_forward<float>(handle_, N, D, 7, false, true, stream_);
  }
}

TEST(LmLayersConfig, MatmulForwardRejectsAccumulateIntoBf16) {
  EXPECT_THROW(lm::matmul_forward<bf16>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, 1, true,
                                        nullptr),
               ConfigError);
}

TEST_F(LmLayers, MatmulBackwardOverwritesDinpAndAddsWeightGradients) {
  for (const Shape& sh : shapes()) {
    const int64_t N = sh.N(), D = sh.D;
    check_matmul_backward<bf16>(handle_, N, D, 3 * D, true, true, stream_);
    check_matmul_backward<float>(handle_, N, D, D, true, true, stream_);
    check_matmul_backward<bf16>(handle_, N, D, 5, false, false, stream_);
  }
  // Many rows: the bias column sum takes two passes (row groups, then their partials).
  check_matmul_backward<bf16>(handle_, 4096, 64, 200, true, true, stream_);
}

// ---------------------------------------------------------------------------------------------
// attention

TEST_F(LmLayers, AttentionMatchesTheCpuForwardAndBackward) {
  for (const Shape& sh : shapes()) {
    SCOPED_TRACE(sh.name());
    const int64_t B = sh.B, S = sh.S, D = sh.D, NH = sh.NH, N = sh.N(), hs = D / NH;
    const std::vector<float> qkv = rounded(random_vector<float>(N * 3 * D, 61));
    const std::vector<float> dout = rounded(random_vector<float>(N * D, 62));
    std::vector<float> out_ref(N * D), att_ref(B * NH * S * S), dqkv_ref(N * 3 * D, 0.f);
    std::vector<float> datt(B * NH * S * S);
    model::attention_forward(out_ref.data(), att_ref.data(), qkv.data(), B, S, D, NH);
    model::attention_backward(dqkv_ref.data(), datt.data(), dout.data(), qkv.data(),
                              att_ref.data(), B, S, D, NH);

    DeviceArray<bf16> d_qkv(to_device_type<bf16>(qkv)), d_dout(to_device_type<bf16>(dout));
    DeviceArray<bf16> d_out(N * D), d_dqkv(N * 3 * D);
    DeviceArray<uint8_t> state_mem(lm::AttentionState::bytes(B, S, D, NH));
    DeviceArray<uint8_t> scratch(lm::attention_scratch_bytes(B, S, D, NH));
    lm::AttentionState st;
    st.bind(state_mem.get(), B, S, D, NH);
    std::vector<bf16> first_out, first_dqkv;
    for (int run = 0; run < 2; ++run) {
      d_out.poison();
      d_dqkv.poison();
      state_mem.poison();
      scratch.poison();
      lm::attention_forward(handle_, d_out.get(), st, d_qkv.get(), B, S, D, NH, scratch.get(),
                            stream_);
      scratch.poison();  // backward must not rely on what forward left there
      lm::attention_backward(handle_, d_dqkv.get(), d_dout.get(), st, B, S, D, NH,
                             scratch.get(), stream_);
      const std::vector<bf16> out = d_out.download(), dqkv = d_dqkv.download();
      EXPECT_LE(rel_error(from_device_type<bf16>(out), out_ref), kBf16Tol) << "attention out";
      EXPECT_LE(rel_error(from_device_type<bf16>(dqkv), dqkv_ref), kBf16Tol) << "dqkv";

      // The kept state: att (zeros above the diagonal included) and the exact head-major q|k|v.
      std::vector<bf16> att(B * NH * S * S), qkv_h(3 * N * D);
      MOE_CUDA_CHECK(cudaMemcpy(att.data(), st.att, att.size() * sizeof(bf16),
                                cudaMemcpyDeviceToHost));
      MOE_CUDA_CHECK(cudaMemcpy(qkv_h.data(), st.q, qkv_h.size() * sizeof(bf16),
                                cudaMemcpyDeviceToHost));
      EXPECT_LE(rel_error(from_device_type<bf16>(att), att_ref), kBf16Tol) << "att";
      std::vector<float> qkv_h_ref(3 * N * D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t p = 0; p < 3; ++p)
            for (int64_t h = 0; h < NH; ++h)
              for (int64_t e = 0; e < hs; ++e)
                qkv_h_ref[p * N * D + ((b * NH + h) * S + s) * hs + e] =
                    qkv[(b * S + s) * 3 * D + p * D + h * hs + e];
      EXPECT_TRUE(same_bytes(from_device_type<bf16>(qkv_h), qkv_h_ref)) << "head-major q|k|v";

      if (run == 1) {
        EXPECT_TRUE(same_bytes(out, first_out) && same_bytes(dqkv, first_dqkv))
            << "two runs differ";
      }
      first_out = out, first_dqkv = dqkv;
    }
  }
}

TEST(LmLayersConfig, AttentionRejectsHeadsThatDoNotDivideTheWidth) {
  EXPECT_THROW(lm::AttentionState::bytes(1, 4, 10, 3), ConfigError);
  EXPECT_THROW(lm::attention_scratch_bytes(1, 4, 10, 3), ConfigError);
}

// ---------------------------------------------------------------------------------------------
// output head and cross-entropy

TEST_F(LmLayers, OutputHeadMatchesTheCpuForwardAndBackward) {
  for (const Shape& sh : shapes())
    for (int64_t V : {256, 7}) {
      SCOPED_TRACE(sh.name() + "_V" + std::to_string(V));
      const int64_t N = sh.N(), D = sh.D;
      const std::vector<float> inp = rounded(random_vector<float>(N * D, 71));
      const std::vector<float> wte = rounded(random_vector<float>(V * D, 72, 0.1));
      const std::vector<float> dlogits = rounded(random_vector<float>(N * V, 73));
      const std::vector<float> dwte0 = random_vector<float>(V * D, 74);
      std::vector<float> logits_ref(N * V), dinp_ref(N * D, 0.f), dwte_ref = dwte0;
      model::output_forward(logits_ref.data(), inp.data(), wte.data(), N, D, V);
      model::output_backward(dinp_ref.data(), dwte_ref.data(), dlogits.data(), inp.data(),
                             wte.data(), N, D, V);

      DeviceArray<bf16> d_inp(to_device_type<bf16>(inp)), d_wte(to_device_type<bf16>(wte));
      DeviceArray<bf16> d_dlogits(to_device_type<bf16>(dlogits));
      DeviceArray<float> d_logits(N * V), d_dinp(N * D), d_dwte(V * D);
      std::vector<float> first_logits, first_dinp, first_dwte;
      for (int run = 0; run < 2; ++run) {
        d_logits.poison();
        d_dinp.poison();
        d_dwte.upload(dwte0);
        lm::output_forward(handle_, d_logits.get(), d_inp.get(), d_wte.get(), N, D, V, stream_);
        lm::output_backward(handle_, d_dinp.get(), d_dwte.get(), d_dlogits.get(), d_inp.get(),
                            d_wte.get(), N, D, V, stream_);
        const std::vector<float> logits = d_logits.download(), dinp = d_dinp.download(),
                                 dwte = d_dwte.download();
        EXPECT_LE(rel_error(logits, logits_ref), kFp32Tol) << "logits";
        EXPECT_LE(rel_error(dinp, dinp_ref), kFp32Tol) << "output dinp";
        EXPECT_LE(rel_error(dwte, dwte_ref, &dwte0), kFp32Tol) << "dwte";
        if (run == 1) {
          EXPECT_TRUE(same_bytes(logits, first_logits) && same_bytes(dinp, first_dinp) &&
                      same_bytes(dwte, first_dwte))
              << "two runs differ";
        }
        first_logits = logits, first_dinp = dinp, first_dwte = dwte;
      }
    }
}

TEST_F(LmLayers, CrossEntropyMatchesTheCpuLossAndFusedGradient) {
  for (const Shape& sh : shapes())
    for (int64_t V : {256, 7}) {
      SCOPED_TRACE(sh.name() + "_V" + std::to_string(V));
      const int64_t N = sh.N();
      const std::vector<float> logits = random_vector<float>(N * V, 81, 3.0);
      const std::vector<int32_t> targets = random_tokens(N, V, 82);
      const float dloss = 1.f / static_cast<float>(N);
      std::vector<float> losses_ref(N), probs(N * V), dlogits_ref(N * V, 0.f);
      model::crossentropy_forward(losses_ref.data(), probs.data(), logits.data(), targets.data(),
                                  N, V);
      const std::vector<float> dlosses(N, dloss);
      model::crossentropy_backward(dlogits_ref.data(), dlosses.data(), probs.data(),
                                   targets.data(), N, V);

      DeviceArray<float> d_logits(logits), d_losses(N);
      DeviceArray<int32_t> d_targets(targets);
      DeviceArray<bf16> d_dlogits(N * V);
      std::vector<float> first_losses;
      std::vector<bf16> first_dlogits;
      for (int run = 0; run < 2; ++run) {
        d_losses.poison();
        d_dlogits.poison();
        lm::crossentropy_forward(d_losses.get(), d_dlogits.get(), d_logits.get(),
                                 d_targets.get(), N, V, dloss, stream_);
        const std::vector<float> losses = d_losses.download();
        const std::vector<bf16> dlogits = d_dlogits.download();
        EXPECT_LE(rel_error(losses, losses_ref), kFp32Tol) << "losses";
        EXPECT_LE(rel_error(from_device_type<bf16>(dlogits), dlogits_ref), kBf16Tol)
            << "dlogits";
        if (run == 1) {
          EXPECT_TRUE(same_bytes(losses, first_losses) && same_bytes(dlogits, first_dlogits))
              << "two runs differ";
        }
        first_losses = losses, first_dlogits = dlogits;
      }
      // Loss only (evaluation): the same losses, dlogits untouched.
      d_losses.poison();
      d_dlogits.poison();
      lm::crossentropy_forward(d_losses.get(), nullptr, d_logits.get(), d_targets.get(), N, V,
                               dloss, stream_);
      EXPECT_TRUE(same_bytes(d_losses.download(), first_losses)) << "loss-only path";
    }
}

// ---------------------------------------------------------------------------------------------
// gradient norm, clipping, AdamW

TEST_F(LmLayers, SumOfSquaresMatchesTheCpuInDoubleAndAddsAcrossTensors) {
  for (int64_t n : {1, 7, 1000, 4099, (1 << 20) + 3}) {
    SCOPED_TRACE("n " + std::to_string(n));
    const std::vector<float> g1 = random_vector<float>(n, 91), g2 = random_vector<float>(n, 92);
    double want1 = 0, want2 = 0;
    for (float x : g1) want1 += double(x) * double(x);
    for (float x : g2) want2 += double(x) * double(x);
    DeviceArray<float> d_g1(g1), d_g2(g2);
    DeviceArray<double> d_sum(1);
    DeviceArray<uint8_t> scratch(lm::sumsq_scratch_bytes(n));
    std::vector<double> first;
    for (int run = 0; run < 2; ++run) {
      d_sum.poison();
      lm::sum_squares(d_sum.get(), d_g1.get(), n, false, scratch.get(), stream_);
      EXPECT_NEAR(d_sum.download()[0], want1, 1e-12 * want1);
      lm::sum_squares(d_sum.get(), d_g2.get(), n, true, scratch.get(), stream_);
      const std::vector<double> got = d_sum.download();
      EXPECT_NEAR(got[0], want1 + want2, 1e-12 * (want1 + want2));
      if (run == 1) {
        EXPECT_TRUE(same_bytes(got, first)) << "two runs differ";
      }
      first = got;
    }
  }
}

TEST_F(LmLayers, ClipScaleFollowsTheCpuTrainerRule) {
  struct Case {
    double sumsq;
    float max_norm;
  };
  for (const Case& c : {Case{400.0, 1.0f}, Case{0.25, 1.0f}, Case{400.0, 0.0f},
                        Case{2.0, 0.7f}, Case{1e-3, 0.5f}}) {
    DeviceArray<double> d_sum(std::vector<double>{c.sumsq});
    DeviceArray<float> d_scale(1);
    d_scale.poison();
    lm::clip_scale(d_scale.get(), d_sum.get(), c.max_norm, stream_);
    const double norm = std::sqrt(c.sumsq), clip = c.max_norm;
    const float want = (clip > 0 && norm > clip) ? float(clip / norm) : 1.0f;
    EXPECT_TRUE(same_bytes(d_scale.download(), std::vector<float>{want}))
        << "sumsq " << c.sumsq << " max_norm " << c.max_norm;
  }
}

// The CPU AdamW rounds every operation (x86-64 has no FMA without -march, and the build sets
// none): bit for bit there. Where the host compiler may contract to FMA (aarch64), 1e-6 relative.
::testing::AssertionResult same_as_cpu_update(const std::vector<float>& got,
                                              const std::vector<float>& want) {
#if defined(__x86_64__)
  if (same_bytes(got, want)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "not bit for bit: relative error " << rel_error(got, want);
#else
  const double err = rel_error(got, want);
  if (err <= 1e-6) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "relative error " << err;
#endif
}

// Two tensors (one with weight decay, one without), five steps of the CPU trainer's sequence —
// global norm, clip when above grad_clip, AdamW::update — against sum_squares, clip_scale and
// adamw_update on the device: parameters and moments bit for bit, the bf16 copy their rounding.
TEST_F(LmLayers, AdamWMatchesTheCpuUpdateBitForBitWithClipping) {
  const int64_t n0 = 1000, n1 = 37;
  model::TrainConfig cfg;
  cfg.lr = 3e-3;
  cfg.weight_decay = 0.1;
  cfg.grad_clip = 20.0;
  std::vector<float> p0 = random_vector<float>(n0, 101, 0.5), p1 = random_vector<float>(n1, 102);
  std::vector<float> g0(n0), g1(n1);
  std::vector<model::TensorRef> params = {{"w", &p0, true, true}, {"b", &p1, false, true}};
  std::vector<model::TensorRef> grads = {{"w", &g0, true, true}, {"b", &g1, false, true}};
  model::AdamW opt;
  opt.init(params);

  DeviceArray<float> d_p0(p0), d_p1(p1), d_g0(n0), d_g1(n1);
  DeviceArray<float> d_m0(std::vector<float>(n0, 0.f)), d_v0(std::vector<float>(n0, 0.f));
  DeviceArray<float> d_m1(std::vector<float>(n1, 0.f)), d_v1(std::vector<float>(n1, 0.f));
  DeviceArray<bf16> d_pb0(n0), d_pb1(n1);
  DeviceArray<double> d_sum(1);
  DeviceArray<float> d_scale(1);
  DeviceArray<uint8_t> scratch(std::max(lm::sumsq_scratch_bytes(n0), lm::sumsq_scratch_bytes(n1)));
  bool clipped_once = false, unclipped_once = false;
  for (int64_t step = 0; step < 5; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const double gscale = step % 2 ? 0.1 : 1.5;  // norm ~ 4.7 (kept) or ~ 48 (clipped to 20)
    g0 = random_vector<float>(n0, 110 + uint64_t(step), gscale);
    g1 = random_vector<float>(n1, 120 + uint64_t(step), gscale);
    d_g0.upload(g0);
    d_g1.upload(g1);
    // CPU: the trainer's norm and clip, then AdamW::update
    double sq = 0;
    for (const model::TensorRef& g : grads)
      for (float x : *g.value) sq += double(x) * double(x);
    const double norm = std::sqrt(sq);
    if (cfg.grad_clip > 0 && norm > cfg.grad_clip) {
      clipped_once = true;
      const float s = float(cfg.grad_clip / norm);
      for (const model::TensorRef& g : grads)
        for (float& x : *g.value) x *= s;
    } else {
      unclipped_once = true;
    }
    const double lr = model::learning_rate(cfg, step);
    opt.update(params, grads, lr, cfg);
    // GPU
    lm::sum_squares(d_sum.get(), d_g0.get(), n0, false, scratch.get(), stream_);
    lm::sum_squares(d_sum.get(), d_g1.get(), n1, true, scratch.get(), stream_);
    lm::clip_scale(d_scale.get(), d_sum.get(), float(cfg.grad_clip), stream_);
    const int64_t t = step + 1;
    const float c1 = float(1.0 / (1.0 - std::pow(cfg.beta1, double(t))));
    const float c2 = float(1.0 / (1.0 - std::pow(cfg.beta2, double(t))));
    lm::adamw_update(d_p0.get(), d_pb0.get(), d_g0.get(), d_m0.get(), d_v0.get(), n0, float(lr),
                     float(cfg.beta1), float(cfg.beta2), float(cfg.eps),
                     float(cfg.weight_decay), c1, c2, d_scale.get(), stream_);
    lm::adamw_update(d_p1.get(), d_pb1.get(), d_g1.get(), d_m1.get(), d_v1.get(), n1, float(lr),
                     float(cfg.beta1), float(cfg.beta2), float(cfg.eps), 0.f, c1, c2,
                     d_scale.get(), stream_);
    const std::vector<float> gp0 = d_p0.download(), gp1 = d_p1.download();
    EXPECT_TRUE(same_as_cpu_update(gp0, p0)) << "p (decay)";
    EXPECT_TRUE(same_as_cpu_update(gp1, p1)) << "p (no decay)";
    EXPECT_TRUE(same_as_cpu_update(d_m0.download(), opt.m[0])) << "m (decay)";
    EXPECT_TRUE(same_as_cpu_update(d_v0.download(), opt.v[0])) << "v (decay)";
    EXPECT_TRUE(same_as_cpu_update(d_m1.download(), opt.m[1])) << "m (no decay)";
    EXPECT_TRUE(same_as_cpu_update(d_v1.download(), opt.v[1])) << "v (no decay)";
    // The bf16 copy is the rounding of the device's own fp32 parameters.
    EXPECT_TRUE(same_bytes(d_pb0.download(), to_device_type<bf16>(gp0))) << "bf16 copy";
    EXPECT_TRUE(same_bytes(d_pb1.download(), to_device_type<bf16>(gp1))) << "bf16 copy";
  }
  EXPECT_TRUE(clipped_once && unclipped_once) << "the steps must exercise both clip branches";
}

// One launch over chunks of flat buffers gives the per-tensor kernel's bits: tensors at aligned and
// unaligned offsets, one longer than a chunk, gaps between them left untouched.
TEST_F(LmLayers, AdamWChunksEqualThePerTensorUpdateBitForBit) {
  struct Tensor {
    int64_t offset, size;
    float decay;
  };
  const int64_t big = lm::kAdamWChunk + 1003;
  const std::vector<Tensor> tensors = {
      {0, 1000, 0.1f}, {1003, 37, 0.f}, {1040, big, 0.1f}, {1040 + big + 2, 5, 0.f}};
  const int64_t total = 1040 + big + 2 + 5 + 3;
  const std::vector<float> p0 = random_vector<float>(total, 151, 0.5);
  const std::vector<float> m0 = random_vector<float>(total, 152, 0.01);
  std::vector<float> v0 = random_vector<float>(total, 153, 0.01);
  for (float& x : v0) x = x * x;  // second moments are non-negative
  const std::vector<float> g = random_vector<float>(total, 154);
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, c1 = 10.f, c2 = 20.f;
  DeviceArray<float> d_g(g), d_scale(std::vector<float>{0.75f});
  // a: per tensor; b: chunks
  DeviceArray<float> pa(p0), ma(m0), va(v0), pb(p0), mb(m0), vb(v0);
  DeviceArray<bf16> qa(total), qb(total);
  qa.poison();
  qb.poison();
  std::vector<lm::AdamWChunk> chunks;
  for (const Tensor& t : tensors) {
    lm::adamw_update(pa.get() + t.offset, qa.get() + t.offset, d_g.get() + t.offset,
                     ma.get() + t.offset, va.get() + t.offset, t.size, lr, b1, b2, eps, t.decay, c1,
                     c2, d_scale.get(), stream_);
    lm::add_adamw_chunks(chunks, t.offset, t.size, t.decay);
  }
  EXPECT_EQ(chunks.size(), tensors.size() + 1) << "the long tensor takes two chunks";
  DeviceArray<lm::AdamWChunk> d_chunks(chunks);
  lm::adamw_update_chunks(pb.get(), qb.get(), d_g.get(), mb.get(), vb.get(), d_chunks.get(),
                          static_cast<int64_t>(chunks.size()), lr, b1, b2, eps, c1, c2,
                          d_scale.get(), stream_);
  EXPECT_TRUE(same_bytes(pb.download(), pa.download())) << "p";
  EXPECT_TRUE(same_bytes(mb.download(), ma.download())) << "m";
  EXPECT_TRUE(same_bytes(vb.download(), va.download())) << "v";
  EXPECT_TRUE(same_bytes(qb.download(), qa.download())) << "bf16 copy (gaps still poisoned)";
  const std::vector<float> p_after = pb.download();
  EXPECT_EQ(std::memcmp(p_after.data() + 1000, p0.data() + 1000, 3 * sizeof(float)), 0)
      << "the gap between tensors is untouched";
}

// ---------------------------------------------------------------------------------------------
// elementwise

TEST_F(LmLayers, ElementwiseKernelsAreExactOnAlignedAndUnalignedViews) {
  for (int64_t n : {1, 13, 4096, 100003}) {
    SCOPED_TRACE("n " + std::to_string(n));
    const std::vector<float> a = random_vector<float>(n + 1, 131);
    const std::vector<float> bsrc = rounded(random_vector<float>(n + 1, 132));
    DeviceArray<float> d_a(a), d_out(n + 1), d_copy(n + 1);
    DeviceArray<bf16> d_b(to_device_type<bf16>(bsrc)), d_bf(n + 1);
    for (int64_t off : {0, 1}) {  // off = 1: 4-byte / 2-byte aligned views, the element path
      const int64_t m = n + 1 - off;
      const std::vector<float> av(a.begin() + off, a.begin() + off + m);
      const std::vector<float> bv(bsrc.begin() + off, bsrc.begin() + off + m);
      std::vector<float> sum_ref(m);
      for (int64_t i = 0; i < m; ++i) sum_ref[i] = av[i] + bv[i];

      d_out.poison();
      lm::residual_add(d_out.get() + off, d_a.get() + off, d_b.get() + off, m, stream_);
      const std::vector<float> out = d_out.download();
      EXPECT_TRUE(same_bytes(std::vector<float>(out.begin() + off, out.end()), sum_ref))
          << "residual_add off " << off;

      d_bf.poison();
      lm::to_bf16(d_bf.get() + off, d_a.get() + off, m, stream_);
      const std::vector<bf16> bf = d_bf.download();
      EXPECT_TRUE(same_bytes(std::vector<bf16>(bf.begin() + off, bf.end()),
                             to_device_type<bf16>(av)))
          << "to_bf16 off " << off;

      d_copy.poison();
      lm::copy_fp32(d_copy.get() + off, d_a.get() + off, m, stream_);
      const std::vector<float> cp = d_copy.download();
      EXPECT_TRUE(same_bytes(std::vector<float>(cp.begin() + off, cp.end()), av))
          << "copy_fp32 off " << off;
    }
    // In place: out aliases a (the residual stream += FFN output).
    DeviceArray<float> d_r(a);
    lm::residual_add(d_r.get(), d_r.get(), d_b.get(), n + 1, stream_);
    std::vector<float> want(n + 1);
    for (int64_t i = 0; i <= n; ++i) want[i] = a[i] + bsrc[i];
    EXPECT_TRUE(same_bytes(d_r.download(), want)) << "residual_add in place";
  }
}

// The dense FFN's activation (SwiGLU on [gate | up] rows, or GELU) against the CPU experts' math
// in double, forward and backward, on the 16-byte row path (8 | I, aligned) and the element path
// (I = 20, or a view one element off alignment); the two paths compute the same expressions.
TEST_F(LmLayers, DenseActivationMatchesTheCpuOnTheRowAndElementPaths) {
  const int64_t N = 37;
  for (bool swiglu : {true, false})
    for (int64_t I : {24, 20, 2056}) {  // 2056: more 8-column groups than threads in a row
      SCOPED_TRACE(std::string(swiglu ? "swiglu" : "gelu") + " I " + std::to_string(I));
      const int64_t A = swiglu ? 2 * I : I;
      const std::vector<float> pre = rounded(random_vector<float>(N * A, 141, 2.0));
      const std::vector<float> dact = rounded(random_vector<float>(N * I, 142));
      std::vector<double> want_act(N * I), want_dpre(N * A);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < I; ++j) {
          const double v = pre[n * A + j], d = dact[n * I + j];
          const double erf_term = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
          if (swiglu) {
            const double u = pre[n * A + I + j], sg = 1 / (1 + std::exp(-v));
            want_act[n * I + j] = v * sg * u;
            want_dpre[n * A + j] = d * u * sg * (1 + v * (1 - sg));
            want_dpre[n * A + I + j] = d * v * sg;
          } else {
            want_act[n * I + j] = v * erf_term;
            const double density = std::exp(-0.5 * v * v) / std::sqrt(2 * 3.14159265358979323846);
            want_dpre[n * A + j] = d * (erf_term + v * density);
          }
        }
      const std::vector<float> wa(want_act.begin(), want_act.end());
      const std::vector<float> wd(want_dpre.begin(), want_dpre.end());
      // off = 1: the same values one element into the buffers (2-byte aligned views: the element
      // path); off = 0: aligned (the row path when 8 | I).
      std::vector<std::vector<float>> acts, dpres;
      for (int64_t off : {0, 1}) {
        auto shifted = [off](const std::vector<float>& v) {
          std::vector<float> out(v.size() + 1, 0.5f);
          std::copy(v.begin(), v.end(), out.begin() + off);
          return out;
        };
        DeviceArray<bf16> d_pre(to_device_type<bf16>(shifted(pre)));
        DeviceArray<bf16> d_dact(to_device_type<bf16>(shifted(dact)));
        DeviceArray<bf16> d_act(N * I + 1), d_dpre(N * A + 1);
        d_act.poison();
        d_dpre.poison();
        lm::ffn_activation_forward(d_act.get() + off, d_pre.get() + off, N, I, swiglu, stream_);
        lm::ffn_activation_backward(d_dpre.get() + off, d_dact.get() + off, d_pre.get() + off, N,
                                    I, swiglu, stream_);
        const std::vector<float> act = download_float(d_act), dpre = download_float(d_dpre);
        acts.emplace_back(act.begin() + off, act.begin() + off + N * I);
        dpres.emplace_back(dpre.begin() + off, dpre.begin() + off + N * A);
        EXPECT_LT(rel_error(acts.back(), wa), kBf16Tol) << "act off " << off;
        EXPECT_LT(rel_error(dpres.back(), wd), kBf16Tol) << "dpre off " << off;
      }
      // The same expressions on both paths: equal up to a rare last-place difference, if any.
      EXPECT_LT(rel_error(acts[0], acts[1]), 1e-3) << "row path vs element path, act";
      EXPECT_LT(rel_error(dpres[0], dpres[1]), 1e-3) << "row path vs element path, dpre";
    }
}

}  // namespace
}  // namespace moe::test
