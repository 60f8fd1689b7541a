// ClockSampler (the SM clock under bench --layer's timed loops) and the ClockSamples summary.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "cuda_test_util.hpp"
#include "moe/cuda/clock_sampler.hpp"

namespace {

using moe::cuda::ClockSampler;
using moe::cuda::ClockSamples;

TEST(ClockSamples, MedianAndPowerCappedShareOfTheSamples) {
  ClockSamples c;
  EXPECT_TRUE(std::isnan(c.median_mhz()));
  EXPECT_TRUE(std::isnan(c.power_capped_share()));
  c.sm_mhz = {1980, 1395, 1410};
  c.power_capped = {false, true, true};
  EXPECT_EQ(c.median_mhz(), 1410);
  EXPECT_DOUBLE_EQ(c.power_capped_share(), 2.0 / 3.0);
  c.sm_mhz.push_back(1500);
  c.power_capped.push_back(false);
  EXPECT_EQ(c.median_mhz(), 0.5 * (1410 + 1500));
  EXPECT_DOUBLE_EQ(c.power_capped_share(), 0.5);
  EXPECT_TRUE(std::isnan(c.energy_per_run_j()));  // no time, no runs yet
  EXPECT_TRUE(std::isnan(c.mean_power_w()));
  c.energy_j = 6.3;
  c.seconds = 0.009;
  c.runs = 1;
  EXPECT_DOUBLE_EQ(c.energy_per_run_j(), 6.3);
  EXPECT_DOUBLE_EQ(c.mean_power_w(), 700);
  c.runs = 0;
  EXPECT_TRUE(std::isnan(c.energy_per_run_j()));
  c.runs = 3;
  EXPECT_DOUBLE_EQ(c.energy_per_run_j(), 2.1);
  EXPECT_DOUBLE_EQ(c.ms_per_run(), 3.0);
  c.energy_known = false;  // one section without a power reading: no energy figures at all
  EXPECT_TRUE(std::isnan(c.energy_per_run_j()));
  EXPECT_TRUE(std::isnan(c.mean_power_w()));
}

TEST(ClockSampler, WithoutADeviceOrNvmlItSamplesNothing) {
  ClockSampler sampler(/*device=*/1 << 20);  // no such device
  EXPECT_FALSE(sampler.available());
  ClockSamples c;
  sampler.start(&c);
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  sampler.stop();
  EXPECT_EQ(c.size(), 0u);
  EXPECT_TRUE(std::isnan(c.ms_per_run()));
  int launched = 0;  // nothing to sample with: the energy loop does not run the step at all
  moe::cuda::energy_loop(sampler, c, nullptr, [&] { ++launched; });
  EXPECT_EQ(launched, 0);
  EXPECT_EQ(c.runs, 0);
  // With a device, the failed lookup leaves no error behind for the next CUDA call (without a
  // driver every call reports that, whatever the sampler does).
  if (moe::cuda::has_device()) {
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  }
}

TEST(ClockSampler, SamplesTheClockWhileASectionRunsAndAppends) {
  MOE_REQUIRE_GPU();
  ClockSampler sampler(0);
  if (!sampler.available()) GTEST_SKIP() << "libnvidia-ml.so.1 not loadable";
  ClockSamples c;
  sampler.start(&c);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  sampler.stop();
  const size_t first = c.size();
  EXPECT_GE(first, 5u);  // one sample every 2 ms, allowing for a slow host
  EXPECT_EQ(c.power_capped.size(), first);
  EXPECT_GT(c.median_mhz(), 100);
  EXPECT_LT(c.median_mhz(), 5000);
  const double share = c.power_capped_share();
  EXPECT_GE(share, 0.0);
  EXPECT_LE(share, 1.0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(c.size(), first);  // stopped: nothing more
  sampler.start(&c);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  sampler.stop();
  EXPECT_GT(c.size(), first);  // a second section appends
  // The board's power over a longer section: joules, not millijoules (an idle or busy H100 draws
  // tens to hundreds of watts), and the section's wall time.
  ClockSamples idle;
  sampler.start(&idle);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  sampler.stop();
  if (!idle.energy_known) GTEST_SKIP() << "no instantaneous power reading on this board";
  EXPECT_GE(idle.seconds, 0.3);
  EXPECT_LT(idle.seconds, 2.0);
  EXPECT_GT(idle.energy_j, 0.0);
  EXPECT_GT(idle.mean_power_w(), 10.0);
  EXPECT_LT(idle.mean_power_w(), 1500.0);
  // The reading follows the load: half a second of memsets streaming through HBM draws more than
  // the idle card (a constant or a stale reading would not).
  const size_t bytes = size_t(1) << 30;
  void* buffer = nullptr;
  ASSERT_EQ(cudaMalloc(&buffer, bytes), cudaSuccess);
  ClockSamples busy;
  sampler.start(&busy);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  for (int i = 0; std::chrono::steady_clock::now() < until; ++i) {
    ASSERT_EQ(cudaMemsetAsync(buffer, i & 0xff, bytes), cudaSuccess);
    if (i % 64 == 63) {  // keep the queue short
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  sampler.stop();
  ASSERT_EQ(cudaFree(buffer), cudaSuccess);
  ASSERT_TRUE(busy.energy_known);
  EXPECT_GT(busy.mean_power_w(), idle.mean_power_w() + 20.0);
  EXPECT_LT(busy.mean_power_w(), 1500.0);
}

TEST(ClockSampler, EnergyLoopCountsWholeRunsOverItsSampledSecond) {
  MOE_REQUIRE_GPU();
  ClockSampler sampler(0);
  if (!sampler.available()) GTEST_SKIP() << "libnvidia-ml.so.1 not loadable";
  const size_t bytes = size_t(256) << 20;
  void* buffer = nullptr;
  ASSERT_EQ(cudaMalloc(&buffer, bytes), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  int64_t launched = 0;
  ClockSamples e;
  moe::cuda::energy_loop(sampler, e, stream, [&] {
    ASSERT_EQ(cudaMemsetAsync(buffer, int(launched++ & 0xff), bytes, stream), cudaSuccess);
  });
  EXPECT_EQ(cudaStreamQuery(stream), cudaSuccess);  // drained before it returned
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  ASSERT_EQ(cudaFree(buffer), cudaSuccess);
  if (!e.energy_known) GTEST_SKIP() << "no instantaneous power reading on this board";
  // The settling runs are launched but not counted; the sampled ones fill at least a second.
  EXPECT_GT(e.runs, 0);
  EXPECT_LT(e.runs, launched);
  EXPECT_GE(e.seconds, moe::cuda::kEnergySampledS);
  EXPECT_LT(e.seconds, moe::cuda::kEnergySampledS + 0.5);
  EXPECT_GT(e.size(), 100u);  // clock samples every 2 ms over the second
  // A 256 MiB memset takes about 0.1-0.2 ms on an H100 (read nothing, write 256 MiB).
  EXPECT_GT(e.ms_per_run(), 0.02);
  EXPECT_LT(e.ms_per_run(), 5.0);
  EXPECT_GT(e.mean_power_w(), 10.0);
  EXPECT_LT(e.mean_power_w(), 1500.0);
  EXPECT_NEAR(e.energy_per_run_j(), e.mean_power_w() * e.ms_per_run() * 1e-3,
              1e-9 * e.energy_per_run_j() + 1e-12);
}

}  // namespace
