#include "moe/cuda/clock_sampler.hpp"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "moe/cuda/check.cuh"

namespace moe::cuda {

namespace {
// NVML's C interface as far as it is used here (nvml.h is not part of the toolkit's headers on
// every install; these signatures are stable since NVML 2).
using nvmlDevice_t = struct nvmlDevice_st*;
constexpr int kNvmlSuccess = 0;
constexpr int kNvmlClockSm = 1;
constexpr unsigned long long kReasonSwPowerCap = 0x4ULL;
constexpr unsigned kFieldPowerInstant = 186;  // NVML_FI_DEV_POWER_INSTANT, mW
// nvmlFieldValue_t and the nvmlValueType_t tags its union is read by.
struct FieldValue {
  uint32_t field_id;
  uint32_t scope_id;
  int64_t timestamp_us;
  int64_t latency_us;
  int value_type;
  int nvml_return;
  union {
    double d;
    unsigned ui;
    unsigned long ul;
    unsigned long long ull;
    long long sll;
    int si;
    unsigned short us;
  } value;
};
static_assert(sizeof(FieldValue) == 40, "nvmlFieldValue_t layout");
enum ValueType { kDouble = 0, kUInt, kULong, kULongLong, kSLongLong, kSInt, kUShort };
}  // namespace

struct ClockSampler::Nvml {
  void* lib = nullptr;
  int (*init)() = nullptr;
  int (*shutdown)() = nullptr;
  int (*clock_info)(nvmlDevice_t, int, unsigned*) = nullptr;
  int (*reasons)(nvmlDevice_t, unsigned long long*) = nullptr;
  int (*field_values)(nvmlDevice_t, int, FieldValue*) = nullptr;  // optional: for the power
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

double ClockSamples::ms_per_run() const {
  if (runs <= 0 || seconds <= 0) return std::numeric_limits<double>::quiet_NaN();
  return seconds * 1e3 / double(runs);
}

bool ClockSampler::read_power_w(double* watts) const {
  if (!nvml_->field_values) return false;
  FieldValue f{};
  f.field_id = kFieldPowerInstant;
  if (nvml_->field_values(nvml_->device, 1, &f) != kNvmlSuccess || f.nvml_return != kNvmlSuccess)
    return false;
  double mw;
  switch (f.value_type) {
    case kDouble: mw = f.value.d; break;
    case kUInt: mw = f.value.ui; break;
    case kULong: mw = double(f.value.ul); break;
    case kULongLong: mw = double(f.value.ull); break;
    case kSLongLong: mw = double(f.value.sll); break;
    case kSInt: mw = f.value.si; break;
    case kUShort: mw = f.value.us; break;
    default: return false;
  }
  *watts = mw * 1e-3;
  return true;
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
  nvml->field_values = reinterpret_cast<int (*)(nvmlDevice_t, int, FieldValue*)>(
      sym("nvmlDeviceGetFieldValues"));
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
  section_power_w_.clear();
  start_time_ = std::chrono::steady_clock::now();
  running_ = true;
  thread_ = std::thread([this] { run(); });
}

void ClockSampler::stop() {
  running_ = false;
  if (thread_.joinable()) thread_.join();
  if (into_) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_).count();
    if (section_power_w_.empty()) {
      into_->energy_known = false;
    } else {
      double sum = 0;
      for (double w : section_power_w_) sum += w;
      // The samples are evenly spaced in time, so their mean is the section's mean power.
      into_->energy_j += sum / double(section_power_w_.size()) * seconds;
      into_->seconds += seconds;
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
    double watts = 0;
    if (read_power_w(&watts)) section_power_w_.push_back(watts);
    std::this_thread::sleep_for(std::chrono::microseconds(kIntervalUs));
  }
}

void energy_loop(ClockSampler& sampler, ClockSamples& into, cudaStream_t stream,
                 const std::function<void()>& run) {
  if (!sampler.available()) return;
  auto loop = [&](double seconds) {
    const auto t0 = std::chrono::steady_clock::now();
    int64_t n = 0;
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() <
           seconds) {
      run();
      if (++n % kEnergyQueued == 0) MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return n;
  };
  loop(kEnergySettleS);
  sampler.start(&into);
  const int64_t runs = loop(kEnergySampledS);
  sampler.stop();
  into.runs += runs;
}

}  // namespace moe::cuda
