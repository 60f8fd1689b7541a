// defines: RoutingBuffers, upload_routing, download_routing (host <-> device Routing)
#include "moe/cuda/routing.hpp"

#include <vector>

#include "moe/cuda/check.cuh"

namespace moe::cuda {

RoutingBuffers::RoutingBuffers(int64_t t, int64_t e, int64_t k, int64_t n)
    : tokens(t), experts(e), top_k(k), choices(n) {
  MOE_CHECK(n >= 0 && n < (int64_t{1} << 31), "choices must be in [0, 2^31), got ", n);
  const size_t b = static_cast<size_t>(n) * 4;
  arena = DeviceArena({{"choice_token", b, reinterpret_cast<void**>(&choice_token)},
                       {"choice_expert", b, reinterpret_cast<void**>(&choice_expert)},
                       {"choice_weight", b, reinterpret_cast<void**>(&choice_weight)}});
}

template <class Real>
void upload_routing(const Routing<Real>& host, RoutingBuffers& dev, cudaStream_t stream) {
  const int64_t n = host.size();
  if (dev.choices != n || dev.tokens != host.tokens || dev.experts != host.experts ||
      dev.top_k != host.top_k)
    dev = RoutingBuffers(host.tokens, host.experts, host.top_k, n);
  std::vector<float> w(host.choice_weight.begin(), host.choice_weight.end());
  if (n > 0) {
    MOE_CUDA_CHECK(cudaMemcpyAsync(dev.choice_token, host.choice_token.data(), n * 4,
                                   cudaMemcpyHostToDevice, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(dev.choice_expert, host.choice_expert.data(), n * 4,
                                   cudaMemcpyHostToDevice, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(dev.choice_weight, w.data(), n * 4, cudaMemcpyHostToDevice,
                                   stream));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));  // `w` dies at return
}

Routing<float> download_routing(const RoutingView& dev, cudaStream_t stream) {
  Routing<float> r;
  r.tokens = dev.tokens;
  r.experts = dev.experts;
  r.top_k = dev.top_k;
  const int64_t n = dev.choices;
  r.choice_token.resize(n);
  r.choice_expert.resize(n);
  r.choice_weight.resize(n);
  if (n > 0) {
    MOE_CUDA_CHECK(cudaMemcpyAsync(r.choice_token.data(), dev.choice_token, n * 4,
                                   cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(r.choice_expert.data(), dev.choice_expert, n * 4,
                                   cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(r.choice_weight.data(), dev.choice_weight, n * 4,
                                   cudaMemcpyDeviceToHost, stream));
  }
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return r;
}

template void upload_routing<float>(const Routing<float>&, RoutingBuffers&, cudaStream_t);
template void upload_routing<double>(const Routing<double>&, RoutingBuffers&, cudaStream_t);

}  // namespace moe::cuda
