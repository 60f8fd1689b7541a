// defines: moe::data — byte tokenizer (encode, decode, kVocab), md5_hex, SourceFile,
//          corpus_manifest, DocumentRule, Domain, Corpus, split_documents, verify_corpus,
//          load_corpus, make_corpus, Batch, train_batch, validation_batches
// The training text of `moe-bench train`: five English sources from Debian packages, each one a
// *domain* (gcide, kjv, wordnet, fortunes, devil). scripts/build_corpus.sh writes them to
// data/corpus/; this file checks them against the md5 sums recorded below, cuts each into
// documents, and sends every 20th document of a domain to validation. Tokens are bytes (vocabulary
// 256), so the loss is reported in bits per byte.
//
// Batches are pure functions of (seed, step): a training run needs no sampler state beyond the
// step number, which is what makes a resumed run bitwise identical to an uninterrupted one.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe::data {

// ---------------------------------------------------------------------------------------------
// Byte tokenizer: token = byte value. Every byte string round-trips.
inline constexpr int64_t kVocab = 256;
std::vector<int32_t> encode(std::string_view text);
// Throws ConfigError when a token is outside [0, 256).
std::string decode(const std::vector<int32_t>& tokens);

// ---------------------------------------------------------------------------------------------
// RFC 1321 MD5 as 32 lower-case hex digits (the sums the build script records).
std::string md5_hex(const void* data, size_t bytes);

// How a source file is cut into documents. A document keeps its separator, so concatenating a
// domain's documents in order gives back the file (up to a missing final newline).
enum class DocumentRule {
  line,        // every line is a document (gcide paragraphs, KJV verses, WordNet glosses)
  record,      // records end with a line "%" (fortune files)
  paragraph,   // blocks end with a blank line (Devil's Dictionary entries)
};

struct SourceFile {
  std::string domain;  // name used in logs and results
  std::string file;    // file name inside the corpus folder
  std::string md5;     // expected md5 of the whole file; empty: not checked
  DocumentRule rule = DocumentRule::line;
};

// The five files of scripts/build_corpus.sh with their md5 sums.
const std::vector<SourceFile>& corpus_manifest();
// The command that (re)builds the corpus, quoted in every error about a missing or bad file.
std::string rebuild_command(const std::string& dir);

// A document with index i (0-based, per domain) goes to validation when i % 20 == 19.
inline constexpr int64_t kValidationEvery = 20;

struct Domain {
  std::string name;
  std::vector<uint8_t> train;  // the domain's training documents, concatenated in order
  std::vector<uint8_t> val;    // its validation documents, concatenated in order
  int64_t train_documents = 0, val_documents = 0;
};

struct Corpus {
  std::vector<Domain> domains;
  std::string origin;  // folder it was read from, or "in-memory"
  int64_t train_bytes() const;
  int64_t val_bytes() const;
};

// Cuts `text` into documents by `rule` and appends them to `out.train` / `out.val`.
void split_documents(std::string_view text, DocumentRule rule, Domain& out);

// Checks that every file of `manifest` exists in `dir` with its md5; throws ConfigError naming the
// file, what is wrong, and the rebuild command.
void verify_corpus(const std::string& dir,
                   const std::vector<SourceFile>& manifest = corpus_manifest());
// Reads (and, when `verify`, first checks) every file of `manifest` from `dir`.
Corpus load_corpus(const std::string& dir,
                   const std::vector<SourceFile>& manifest = corpus_manifest(),
                   bool verify = true);
// A corpus from (domain, text) pairs, one document per line: for tests and examples.
Corpus make_corpus(const std::vector<std::pair<std::string, std::string>>& texts);

// ---------------------------------------------------------------------------------------------
// Batches: B windows of S+1 consecutive bytes of one domain each; inputs are the first S bytes,
// targets the last S (next-byte prediction).
struct Batch {
  int64_t batch = 0, seq = 0;     // B, S
  std::vector<int32_t> inputs;    // (B, S) token ids
  std::vector<int32_t> targets;   // (B, S) next token of each position
  std::vector<int32_t> domain;    // (B) domain index of each row
};

// Training batch of `step`: each row picks a domain with probability proportional to its training
// bytes, then a uniform window start in it. A pure function of (corpus, seed, step, B, S).
Batch train_batch(const Corpus& corpus, uint64_t seed, int64_t step, int64_t batch, int64_t seq);

// The fixed validation set: `windows` evenly spaced windows per domain, interleaved across domains
// (window 0 of every domain, then window 1, ...) and cut into batches of at most `batch` rows, so
// a batch mixes domains like a training batch does. Throws ConfigError when a domain's validation
// text is shorter than seq + 1 bytes.
std::vector<Batch> validation_batches(const Corpus& corpus, int64_t windows, int64_t batch,
                                      int64_t seq);

}  // namespace moe::data
