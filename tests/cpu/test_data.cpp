// Tests of the training data: byte tokenizer, md5, document split into train/validation per
// domain, corpus verification against recorded checksums, and batches as pure functions of
// (seed, step). The fixture under tests/data/corpus/ is a few KB: KJV verses and Devil's
// Dictionary entries (public domain) and a file of short sayings in fortune format.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moe/check.hpp"
#include "moe/data.hpp"

namespace moe::data {
namespace {

namespace fs = std::filesystem;

fs::path fixture_dir() { return fs::path(__FILE__).parent_path().parent_path() / "data" / "corpus"; }

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The fixture's manifest, with the sums of the committed files.
std::vector<SourceFile> fixture_manifest() {
  return {{"kjv", "kjv.txt", "2ddae3e6ffc250c1ef65d102ec9badb4", DocumentRule::line},
          {"devil", "devil.txt", "6fe6ebad06a20b052cfcc0e2a217a6d9", DocumentRule::paragraph},
          {"sayings", "sayings.txt", "6b7be2974be24e681c522e736774c58b", DocumentRule::record}};
}

// A scratch copy of the fixture that a test may damage.
struct ScratchCorpus {
  fs::path dir;
  ScratchCorpus() {
    dir = fs::temp_directory_path() /
          ("moe_test_corpus_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
           "_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    for (const auto& f : fixture_manifest()) fs::copy_file(fixture_dir() / f.file, dir / f.file);
  }
  ~ScratchCorpus() { fs::remove_all(dir); }
};

std::string as_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

// ---------------------------------------------------------------------------------------------

TEST(Tokenizer, EveryByteStringRoundTrips) {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  all += "In the beginning God created the heaven and the earth.\n\t\xe9\x07";
  const std::vector<int32_t> tokens = encode(all);
  ASSERT_EQ(tokens.size(), all.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    EXPECT_GE(tokens[i], 0);
    EXPECT_LT(tokens[i], kVocab);
  }
  EXPECT_EQ(decode(tokens), all);
}

TEST(Tokenizer, DecodeRefusesIdsOutsideTheByteRange) {
  EXPECT_THROW(decode({65, 256}), ConfigError);
  EXPECT_THROW(decode({-1}), ConfigError);
}

TEST(Md5, MatchesTheRfc1321TestSuite) {
  const std::pair<std::string, std::string> cases[] = {
      {"", "d41d8cd98f00b204e9800998ecf8427e"},
      {"a", "0cc175b9c0f1b6a831c399e269772661"},
      {"abc", "900150983cd24fb0d6963f7d28e17f72"},
      {"message digest", "f96b697d7cb7938d525a2f31aaf161d0"},
      {"abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"},
      {"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
       "d174ab98d277d9f5a5611c2c9f419d9f"},
      {"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
       "57edf4a22be3c955ac49da2e2107b67a"}};
  for (const auto& [text, sum] : cases) EXPECT_EQ(md5_hex(text.data(), text.size()), sum) << text;
}

TEST(Split, EveryTwentiethLineGoesToValidation) {
  std::string text;
  for (int i = 0; i < 45; ++i) text += "line " + std::to_string(i) + "\n";
  Domain d;
  split_documents(text, DocumentRule::line, d);
  EXPECT_EQ(d.train_documents, 43);
  EXPECT_EQ(d.val_documents, 2);
  EXPECT_EQ(as_string(d.val), "line 19\nline 39\n");
}

TEST(Split, IsDeterministicAndReassemblesTheFile) {
  for (const SourceFile& f : fixture_manifest()) {
    const std::string text = read_text(fixture_dir() / f.file);
    Domain a, b;
    split_documents(text, f.rule, a);
    split_documents(text, f.rule, b);
    EXPECT_EQ(a.train, b.train) << f.file;
    EXPECT_EQ(a.val, b.val) << f.file;
    EXPECT_EQ(a.train.size() + a.val.size(), text.size()) << f.file;  // no byte lost or added
  }
}

TEST(Split, RecordsEndAtPercentLinesAndParagraphsAtBlankLines) {
  std::string records;
  for (int i = 0; i < 20; ++i) records += "saying " + std::to_string(i) + "\nsecond line\n%\n";
  Domain r;
  split_documents(records, DocumentRule::record, r);
  EXPECT_EQ(r.train_documents, 19);
  EXPECT_EQ(as_string(r.val), "saying 19\nsecond line\n%\n");

  std::string paragraphs;
  for (int i = 0; i < 20; ++i) paragraphs += "ENTRY" + std::to_string(i) + ", n. text\nmore\n\n";
  Domain p;
  split_documents(paragraphs, DocumentRule::paragraph, p);
  EXPECT_EQ(p.train_documents, 19);
  EXPECT_EQ(as_string(p.val), "ENTRY19, n. text\nmore\n\n");
}

TEST(Corpus, FixtureLoadsWithOneDomainPerFile) {
  const Corpus c = load_corpus(fixture_dir().string(), fixture_manifest());
  ASSERT_EQ(c.domains.size(), 3u);
  EXPECT_EQ(c.domains[0].name, "kjv");
  EXPECT_EQ(c.domains[0].val_documents, 1);  // 24 verses: verse 20 is validation
  EXPECT_GT(c.domains[1].train_documents, 5);
  EXPECT_EQ(c.train_bytes() + c.val_bytes(), 2799 + 2504 + 1601);
}

TEST(Corpus, ChecksumVerificationDetectsACorruptedFile) {
  ScratchCorpus scratch;
  EXPECT_NO_THROW(verify_corpus(scratch.dir.string(), fixture_manifest()));
  {  // flip one byte in the middle of the KJV file
    std::fstream f(scratch.dir / "kjv.txt", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('#');
  }
  try {
    verify_corpus(scratch.dir.string(), fixture_manifest());
    FAIL() << "a corrupted corpus file was accepted";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("kjv.txt is corrupt"), std::string::npos) << msg;
    EXPECT_NE(msg.find("scripts/build_corpus.sh"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(Corpus, MissingFileNamesTheRebuildCommand) {
  ScratchCorpus scratch;
  fs::remove(scratch.dir / "devil.txt");
  try {
    load_corpus(scratch.dir.string(), fixture_manifest());
    FAIL() << "a missing corpus file was accepted";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("devil.txt is missing"), std::string::npos) << msg;
    EXPECT_NE(msg.find("scripts/build_corpus.sh " + scratch.dir.string()), std::string::npos)
        << msg;
  }
}

TEST(Corpus, TheRealManifestListsFiveDomainsWithSums) {
  const auto& m = corpus_manifest();
  ASSERT_EQ(m.size(), 5u);
  for (const SourceFile& f : m) EXPECT_EQ(f.md5.size(), 32u) << f.file;
}

// ---------------------------------------------------------------------------------------------

Corpus two_domains() {
  std::string a, b;
  for (int i = 0; i < 200; ++i) {
    a += "alpha line number " + std::to_string(i) + " of the first domain\n";
    b += "BETA " + std::to_string(i * 7) + "\n";
  }
  return make_corpus({{"alpha", a}, {"beta", b}});
}

TEST(Batches, TrainBatchIsAPureFunctionOfSeedAndStep) {
  const Corpus c = two_domains();
  const Batch x = train_batch(c, 7, 12, 8, 16);
  const Batch y = train_batch(c, 7, 12, 8, 16);
  EXPECT_EQ(x.inputs, y.inputs);
  EXPECT_EQ(x.domain, y.domain);
  EXPECT_NE(train_batch(c, 7, 13, 8, 16).inputs, x.inputs);
  EXPECT_NE(train_batch(c, 8, 12, 8, 16).inputs, x.inputs);
}

TEST(Batches, TargetsAreTheNextByteOfTheRowsDomain) {
  const Corpus c = two_domains();
  const Batch b = train_batch(c, 1, 3, 16, 10);
  for (int64_t r = 0; r < b.batch; ++r) {
    const std::string text = as_string(c.domains[b.domain[r]].train);
    std::string in, tg;
    for (int64_t s = 0; s < b.seq; ++s) {
      in.push_back(char(b.inputs[r * b.seq + s]));
      tg.push_back(char(b.targets[r * b.seq + s]));
    }
    const size_t at = text.find(in + tg.back());
    ASSERT_NE(at, std::string::npos) << "row " << r << " is not a window of its domain";
    EXPECT_EQ(text.substr(at + 1, b.seq), tg);
  }
}

TEST(Batches, DomainsAreDrawnInProportionToTheirSize) {
  const Corpus c = two_domains();
  const double share_alpha =
      double(c.domains[0].train.size()) / double(c.train_bytes());
  int64_t alpha = 0, rows = 0;
  for (int64_t step = 0; step < 200; ++step) {
    const Batch b = train_batch(c, 3, step, 16, 8);
    for (int32_t d : b.domain) alpha += d == 0;
    rows += b.batch;
  }
  EXPECT_NEAR(double(alpha) / double(rows), share_alpha, 0.03);
}

TEST(Batches, ValidationInterleavesDomainsAndCoversEachEqually) {
  const Corpus c = two_domains();
  const std::vector<Batch> val = validation_batches(c, 5, 4, 12);
  int64_t rows = 0, per_domain[2] = {0, 0};
  for (const Batch& b : val) {
    EXPECT_LE(b.batch, 4);
    for (int64_t r = 0; r < b.batch; ++r) {
      EXPECT_EQ(b.domain[r], (rows + r) % 2);  // alpha, beta, alpha, ...
      per_domain[b.domain[r]]++;
    }
    rows += b.batch;
  }
  EXPECT_EQ(rows, 10);
  EXPECT_EQ(per_domain[0], 5);
  EXPECT_EQ(per_domain[1], 5);
  // Deterministic: the same call gives the same windows.
  EXPECT_EQ(validation_batches(c, 5, 4, 12)[1].inputs, val[1].inputs);
}

TEST(Batches, ValidationRefusesADomainShorterThanOneWindow) {
  const Corpus c = make_corpus({{"tiny", "a\nb\n"}});
  EXPECT_THROW(validation_batches(c, 1, 1, 8), ConfigError);
}

}  // namespace
}  // namespace moe::data
