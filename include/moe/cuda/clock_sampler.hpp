// defines: moe::cuda::ClockSamples, ClockSampler
// The SM clock a timed loop ran at, whether the driver held it down for the power cap, and the
// energy the board used. Hopper boards reach their power limit in long GEMM loops and the driver
// lowers the clock, so two loops timed on one card can run at different clocks; benchmarks record
// this beside the times, and the energy per run as a figure the clock does not move the same way.
// A thread reads NVML (loaded at run time from the driver's libnvidia-ml.so.1, so nothing links
// against it) every kIntervalUs while a section runs: the SM clock, the clock-event reasons and the
// board's instantaneous power (field NVML_FI_DEV_POWER_INSTANT, refreshed by the board about every
// 20 ms). A section's energy is its mean instantaneous power times its wall time. NVML's energy
// counter is not used: on H100 it moves in steps of about 100 ms and lags the load, so over the
// 60 ms to 2 s loops timed here it read 0 J for one loop and over 1000 W (above the 700 W cap)
// for another. Without NVML or a device nothing is sampled and the figures are NaN.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace moe::cuda {

// The samples of one or more sections: SM clock in MHz, and whether the driver named the power
// cap (software power capping, NVML's clock-event reason 0x4) as a reason at that moment.
struct ClockSamples {
  std::vector<double> sm_mhz;
  std::vector<bool> power_capped;
  // Summed over the sections: the board's energy and the wall time between start and stop, and
  // the runs of the loop in them (the caller counts those, as energy_loop below does).
  double energy_j = 0, seconds = 0;
  int64_t runs = 0;
  bool energy_known = true;  // false once a section had no power reading
  size_t size() const { return sm_mhz.size(); }
  double median_mhz() const;          // NaN without samples
  double power_capped_share() const;  // NaN without samples
  double energy_per_run_j() const;    // NaN without energy or runs
  double mean_power_w() const;        // NaN without energy or time
  double ms_per_run() const;          // the sections' wall time per run; NaN without runs
};

class ClockSampler {
 public:
  static constexpr int kIntervalUs = 2000;
  // For the CUDA device `device` (matched to NVML's by PCI bus id).
  explicit ClockSampler(int device);
  ~ClockSampler();
  ClockSampler(const ClockSampler&) = delete;
  ClockSampler& operator=(const ClockSampler&) = delete;

  bool available() const { return nvml_ != nullptr; }
  // Samples into `into` (appending) from start() until stop(); one section at a time.
  void start(ClockSamples* into);
  void stop();

 private:
  struct Nvml;
  void run();
  bool read_power_w(double* watts) const;
  std::unique_ptr<Nvml> nvml_;
  ClockSamples* into_ = nullptr;
  std::vector<double> section_power_w_;  // the running section's instantaneous power samples
  std::chrono::steady_clock::time_point start_time_;
  std::atomic<bool> running_{false};
  std::thread thread_;
};

// The board's energy per run of `run` (enqueued on `stream`) into `into`: kEnergySettleS of the
// loop unsampled, so that the power reading (refreshed about every 20 ms, trailing the load) has
// caught up with it, then at least kEnergySampledS sampled, whole runs only: the queue is kept
// kEnergyQueued runs deep and drained before the sampler stops. Timed loops of 60 ms to half a
// second are too short to read energy from. Does nothing where the sampler is not available.
inline constexpr double kEnergySettleS = 0.3, kEnergySampledS = 1.0;
inline constexpr int kEnergyQueued = 4;
void energy_loop(ClockSampler& sampler, ClockSamples& into, cudaStream_t stream,
                 const std::function<void()>& run);

}  // namespace moe::cuda
