// defines: LoadStats, load_stats
// Load statistics reported on every call (section 9 of the routing digest).
#pragma once
#include <cstdint>
#include <vector>

namespace moe {

struct LoadStats {
  std::vector<double> tokens_per_expert;  // (E) choices routed to each expert (before drops);
                                          // soft_moe: combine mass per expert
  double cv = 0;             // std/mean over experts (population std); 0 when empty
  double max_violation = 0;  // MaxVio = max load / mean load - 1
  double drop_rate = 0;      // (capacity drops + policy skips) / choices
  double router_entropy = 0; // mean over tokens of -sum_e p log p (nats)
  double mean_entropy = 0;   // entropy of the mean routing distribution (balance; max log E)
  double tokens_without_expert = 0;  // fraction of tokens with no kept row (expert choice, drops)
};

// CV and MaxVio from per-expert loads (others are filled by the layer).
void fill_balance(LoadStats& s);

}  // namespace moe
