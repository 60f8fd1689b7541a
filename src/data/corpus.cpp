// defines: moe::data::corpus_manifest, rebuild_command, split_documents, verify_corpus,
//          load_corpus, make_corpus, Corpus::train_bytes, Corpus::val_bytes
#include <sys/stat.h>

#include <string>
#include <string_view>
#include <vector>

#include "io/files.hpp"
#include "moe/check.hpp"
#include "moe/data.hpp"

namespace moe::data {

const std::vector<SourceFile>& corpus_manifest() {
  // md5 sums of scripts/build_corpus.sh's output with the pinned Debian 12 package versions.
  static const std::vector<SourceFile> files = {
      {"gcide", "gcide.txt", "08095e86ac84966845f4c51af97111a0", DocumentRule::line},
      {"kjv", "kjv.txt", "0442864d38d37131885626cd0cfa2a12", DocumentRule::line},
      {"wordnet", "wordnet.txt", "562fe6746284abb7202a1a5b8754834d", DocumentRule::line},
      {"fortunes", "fortunes.txt", "4f76c26646f7055c0a751e679800855b", DocumentRule::record},
      {"devil", "devil.txt", "32575e028933fa7d92a0b058c13cf133", DocumentRule::paragraph},
  };
  return files;
}

std::string rebuild_command(const std::string& dir) { return "scripts/build_corpus.sh " + dir; }

int64_t Corpus::train_bytes() const {
  int64_t n = 0;
  for (const Domain& d : domains) n += static_cast<int64_t>(d.train.size());
  return n;
}
int64_t Corpus::val_bytes() const {
  int64_t n = 0;
  for (const Domain& d : domains) n += static_cast<int64_t>(d.val.size());
  return n;
}

void split_documents(std::string_view text, DocumentRule rule, Domain& out) {
  // A document is a run of whole lines; it ends after a line that closes it under `rule`.
  auto blank = [](std::string_view line) {
    for (char c : line)
      if (c != ' ' && c != '\t' && c != '\r') return false;
    return true;
  };
  std::string doc;
  bool has_text = false;  // paragraph rule: the document has a non-blank line
  int64_t index = 0;
  auto emit = [&] {
    std::vector<uint8_t>& dst = index % kValidationEvery == kValidationEvery - 1 ? out.val : out.train;
    (index % kValidationEvery == kValidationEvery - 1 ? out.val_documents : out.train_documents)++;
    dst.insert(dst.end(), doc.begin(), doc.end());
    doc.clear();
    has_text = false;
    ++index;
  };
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    const std::string_view line = text.substr(pos, end == std::string_view::npos ? end : end - pos);
    pos = end == std::string_view::npos ? text.size() : end + 1;
    doc.append(line);
    doc.push_back('\n');  // a missing final newline is added
    bool closes = false;
    switch (rule) {
      case DocumentRule::line: closes = true; break;
      case DocumentRule::record: closes = line == "%"; break;
      case DocumentRule::paragraph:
        if (blank(line))
          closes = has_text;
        else
          has_text = true;
        break;
    }
    if (closes) emit();
  }
  if (!doc.empty()) emit();
}

namespace {

std::string join_path(const std::string& dir, const std::string& file) {
  return dir.empty() || dir.back() == '/' ? dir + file : dir + "/" + file;
}

// The file's bytes, checked against its recorded md5 when `verify`.
std::vector<uint8_t> read_source(const std::string& dir, const SourceFile& f, bool verify) {
  const std::string path = join_path(dir, f.file);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    MOE_FAIL("corpus file ", path, " is missing; build the corpus with: ", rebuild_command(dir));
  std::vector<uint8_t> bytes = io::read_file(path);
  if (verify && !f.md5.empty()) {
    const std::string sum = md5_hex(bytes.data(), bytes.size());
    if (sum != f.md5)
      MOE_FAIL("corpus file ", path, " is corrupt: md5 ", sum, " differs from the recorded ", f.md5,
               "; rebuild it with: ", rebuild_command(dir));
  }
  return bytes;
}

}  // namespace

void verify_corpus(const std::string& dir, const std::vector<SourceFile>& manifest) {
  MOE_CHECK(!manifest.empty(), "corpus manifest is empty");
  for (const SourceFile& f : manifest) read_source(dir, f, true);
}

Corpus load_corpus(const std::string& dir, const std::vector<SourceFile>& manifest, bool verify) {
  MOE_CHECK(!manifest.empty(), "corpus manifest is empty");
  Corpus corpus;
  corpus.origin = dir;
  for (const SourceFile& f : manifest) {
    const std::vector<uint8_t> bytes = read_source(dir, f, verify);
    Domain d;
    d.name = f.domain;
    split_documents(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                    f.rule, d);
    corpus.domains.push_back(std::move(d));
  }
  return corpus;
}

Corpus make_corpus(const std::vector<std::pair<std::string, std::string>>& texts) {
  Corpus corpus;
  corpus.origin = "in-memory";
  for (const auto& [name, text] : texts) {
    Domain d;
    d.name = name;
    split_documents(text, DocumentRule::line, d);
    corpus.domains.push_back(std::move(d));
  }
  return corpus;
}

}  // namespace moe::data
