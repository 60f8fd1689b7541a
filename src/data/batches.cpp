// defines: moe::data::train_batch, validation_batches
// Every random draw is a counter-based value of (seed, step, row), so the batch of step n is known
// without replaying steps 0..n-1 (a resumed run reads exactly the bytes it would have read).
#include <algorithm>
#include <string>
#include <vector>

#include "moe/check.hpp"
#include "moe/data.hpp"
#include "moe/rng.hpp"

namespace moe::data {

namespace {

// Uniform in [0, 1) from (seed, step, draw): a stream of the data sampler only.
double data_uniform(uint64_t seed, int64_t step, uint64_t draw) {
  constexpr uint64_t kDataStream = 0x64617461;  // "data"
  const uint64_t bits =
      splitmix64(splitmix64(seed ^ (kDataStream << 32)) ^ splitmix64(uint64_t(step)) ^ draw);
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}

void copy_window(const std::vector<uint8_t>& text, int64_t start, int64_t seq, int32_t* inputs,
                 int32_t* targets) {
  for (int64_t s = 0; s < seq; ++s) {
    inputs[s] = text[start + s];
    targets[s] = text[start + s + 1];
  }
}

}  // namespace

Batch train_batch(const Corpus& corpus, uint64_t seed, int64_t step, int64_t batch, int64_t seq) {
  MOE_CHECK(batch >= 1 && seq >= 1, "batch and seq must be >= 1, got ", batch, " and ", seq);
  MOE_CHECK(!corpus.domains.empty(), "the corpus has no domains");
  const int64_t D = static_cast<int64_t>(corpus.domains.size());
  std::vector<double> cumulative(D);
  double total = 0;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = static_cast<int64_t>(corpus.domains[d].train.size());
    // Domains too short for one window are never drawn.
    total += n >= seq + 1 ? static_cast<double>(n) : 0.0;
    cumulative[d] = total;
  }
  MOE_CHECK(total > 0, "no domain of the corpus has ", seq + 1,
            " training bytes (one window of --seq + 1)");
  Batch b;
  b.batch = batch;
  b.seq = seq;
  b.inputs.resize(batch * seq);
  b.targets.resize(batch * seq);
  b.domain.resize(batch);
  for (int64_t r = 0; r < batch; ++r) {
    const double u = data_uniform(seed, step, 2 * uint64_t(r)) * total;
    int64_t d = std::upper_bound(cumulative.begin(), cumulative.end(), u) - cumulative.begin();
    d = std::min(d, D - 1);  // upper_bound never lands on an empty domain: cumulative rises there
    const std::vector<uint8_t>& text = corpus.domains[d].train;
    const int64_t starts = static_cast<int64_t>(text.size()) - seq;  // valid starts [0, starts)
    const int64_t start = std::min<int64_t>(
        starts - 1, static_cast<int64_t>(data_uniform(seed, step, 2 * uint64_t(r) + 1) * starts));
    copy_window(text, start, seq, b.inputs.data() + r * seq, b.targets.data() + r * seq);
    b.domain[r] = static_cast<int32_t>(d);
  }
  return b;
}

std::vector<Batch> validation_batches(const Corpus& corpus, int64_t windows, int64_t batch,
                                      int64_t seq) {
  MOE_CHECK(windows >= 1, "validation windows per domain must be >= 1, got ", windows);
  MOE_CHECK(batch >= 1 && seq >= 1, "batch and seq must be >= 1, got ", batch, " and ", seq);
  const int64_t D = static_cast<int64_t>(corpus.domains.size());
  for (const Domain& d : corpus.domains)
    MOE_CHECK(static_cast<int64_t>(d.val.size()) >= seq + 1, "validation text of domain '", d.name,
              "' has ", d.val.size(), " bytes, fewer than --seq + 1 = ", seq + 1);
  // Rows in order: window 0 of every domain, window 1 of every domain, ...
  std::vector<std::pair<int64_t, int64_t>> rows;  // (domain, start)
  for (int64_t w = 0; w < windows; ++w)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t span = static_cast<int64_t>(corpus.domains[d].val.size()) - seq - 1;
      const int64_t start = windows > 1 ? span * w / (windows - 1) : 0;
      rows.emplace_back(d, start);
    }
  std::vector<Batch> out;
  for (size_t first = 0; first < rows.size(); first += batch) {
    const int64_t n = std::min<int64_t>(batch, static_cast<int64_t>(rows.size() - first));
    Batch b;
    b.batch = n;
    b.seq = seq;
    b.inputs.resize(n * seq);
    b.targets.resize(n * seq);
    b.domain.resize(n);
    for (int64_t r = 0; r < n; ++r) {
      const auto [d, start] = rows[first + r];
      copy_window(corpus.domains[d].val, start, seq, b.inputs.data() + r * seq,
                  b.targets.data() + r * seq);
      b.domain[r] = static_cast<int32_t>(d);
    }
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace moe::data
