// defines: fill_balance
#include <algorithm>
#include <cmath>

#include "moe/stats.hpp"

namespace moe {

void fill_balance(LoadStats& s) {
  const auto& v = s.tokens_per_expert;
  s.cv = 0;
  s.max_violation = 0;
  if (v.empty()) return;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(v.size());
  if (mean <= 0) return;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= static_cast<double>(v.size());
  s.cv = std::sqrt(var) / mean;
  s.max_violation = *std::max_element(v.begin(), v.end()) / mean - 1;
}

}  // namespace moe
