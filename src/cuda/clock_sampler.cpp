#include "moe/cuda/clock_sampler.hpp"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

namespace moe::cuda {

namespace {
// NVML's C interface as far as it is used here (nvml.h is not part of the toolkit's headers on
// every install; these signatures are stable since NVML 2).
using nvmlDevice_t = struct nvmlDevice_st*;
constexpr int kNvmlSuccess = 0;
constexpr int kNvmlClockSm = 1;
constexpr unsigned long long kReasonSwPowerCap = 0x4ULL;
}  // namespace

struct ClockSampler::Nvml {
  void* lib = nullptr;
  int (*init)() = nullptr;
  int (*shutdown)() = nullptr;
  int (*clock_info)(nvmlDevice_t, int, unsigned*) = nullptr;
  int (*reasons)(nvmlDevice_t, unsigned long long*) = nullptr;
  int (*energy)(nvmlDevice_t, unsigned long long*) = nullptr;  // optional: mJ since driver load
  nvmlDevice_t device = nullptr;
  ~Nvml() {
    if (shutdown) shutdown();
    if (lib) dlclose(lib);
  }
};

double ClockSamples::median_mhz() const {
  if (sm_mhz.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::vector<double> v = sm_mhz;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double ClockSamples::power_capped_share() const {
  if (power_capped.empty()) return std::numeric_limits<double>::quiet_NaN();
  return double(std::count(power_capped.begin(), power_capped.end(), true)) /
         double(power_capped.size());
}

double ClockSamples::energy_per_run_j() const {
  if (!energy_known || runs <= 0 || seconds <= 0) return std::numeric_limits<double>::quiet_NaN();
  return energy_j / double(runs);
}

double ClockSamples::mean_power_w() const {
  if (!energy_known || seconds <= 0) return std::numeric_limits<double>::quiet_NaN();
  return energy_j / seconds;
}

bool ClockSampler::read_energy_mj(unsigned long long* mj) const {
  return nvml_ && nvml_->energy && nvml_->energy(nvml_->device, mj) == kNvmlSuccess;
}

ClockSampler::ClockSampler(int device) {
  char bus_id[32] = {};
  if (cudaDeviceGetPCIBusId(bus_id, sizeof bus_id, device) != cudaSuccess) {
    cudaGetLastError();  // no device: leave no sticky error behind for the caller
    return;
  }
  auto nvml = std::make_unique<Nvml>();
  nvml->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!nvml->lib) return;
  auto sym = [&](const char* name) { return dlsym(nvml->lib, name); };
  nvml->init = reinterpret_cast<int (*)()>(sym("nvmlInit_v2"));
  auto by_bus = reinterpret_cast<int (*)(const char*, nvmlDevice_t*)>(
      sym("nvmlDeviceGetHandleByPciBusId_v2"));
  nvml->clock_info = reinterpret_cast<int (*)(nvmlDevice_t, int, unsigned*)>(
      sym("nvmlDeviceGetClockInfo"));
  nvml->reasons = reinterpret_cast<int (*)(nvmlDevice_t, unsigned long long*)>(
      sym("nvmlDeviceGetCurrentClocksThrottleReasons"));
  nvml->energy = reinterpret_cast<int (*)(nvmlDevice_t, unsigned long long*)>(
      sym("nvmlDeviceGetTotalEnergyConsumption"));
  auto shutdown = reinterpret_cast<int (*)()>(sym("nvmlShutdown"));
  if (!nvml->init || !by_bus || !nvml->clock_info || !nvml->reasons || !shutdown) return;
  if (nvml->init() != kNvmlSuccess) return;
  nvml->shutdown = shutdown;  // from here on the destructor balances the init
  if (by_bus(bus_id, &nvml->device) != kNvmlSuccess) return;
  unsigned mhz = 0;
  if (nvml->clock_info(nvml->device, kNvmlClockSm, &mhz) != kNvmlSuccess) return;
  nvml_ = std::move(nvml);
}

ClockSampler::~ClockSampler() { stop(); }

void ClockSampler::start(ClockSamples* into) {
  stop();
  if (!nvml_ || !into) return;
  into_ = into;
  start_mj_ok_ = read_energy_mj(&start_mj_);
  start_time_ = std::chrono::steady_clock::now();
  running_ = true;
  thread_ = std::thread([this] { run(); });
}

void ClockSampler::stop() {
  running_ = false;
  if (thread_.joinable()) thread_.join();
  if (into_) {
    unsigned long long mj = 0;
    if (start_mj_ok_ && read_energy_mj(&mj) && mj >= start_mj_) {
      into_->energy_j += double(mj - start_mj_) * 1e-3;
      into_->seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_).count();
    } else {
      into_->energy_known = false;
    }
  }
  into_ = nullptr;
}

void ClockSampler::run() {
  while (running_) {
    unsigned mhz = 0;
    unsigned long long reasons = 0;
    if (nvml_->clock_info(nvml_->device, kNvmlClockSm, &mhz) == kNvmlSuccess &&
        nvml_->reasons(nvml_->device, &reasons) == kNvmlSuccess) {
      into_->sm_mhz.push_back(mhz);
      into_->power_capped.push_back((reasons & kReasonSwPowerCap) != 0);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(kIntervalUs));
  }
}

}  // namespace moe::cuda
