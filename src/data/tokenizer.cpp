// defines: moe::data::encode, decode — the byte tokenizer (token id = byte value)
#include <string>
#include <string_view>
#include <vector>

#include "moe/check.hpp"
#include "moe/data.hpp"

namespace moe::data {

std::vector<int32_t> encode(std::string_view text) {
  std::vector<int32_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<uint8_t>(text[i]);
  return tokens;
}

std::string decode(const std::vector<int32_t>& tokens) {
  std::string text(tokens.size(), '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {
    MOE_CHECK(tokens[i] >= 0 && tokens[i] < kVocab, "token ", tokens[i], " at position ", i,
              " is not a byte (allowed: 0..", kVocab - 1, ")");
    text[i] = static_cast<char>(static_cast<uint8_t>(tokens[i]));
  }
  return text;
}

}  // namespace moe::data
