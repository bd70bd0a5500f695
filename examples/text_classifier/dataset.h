#pragma once

// Labelled sentences from JSON files, a tokenizer, a vocabulary and a seeded
// train/test split. No LibTorch here.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace example {

struct Sentence {
  std::string text;
  int64_t label = 0;
};

/// The JSON document in the file at `path`. Throws std::runtime_error naming
/// the file: `missing` (a hint on where the file comes from) when it cannot
/// be opened, the parser's message when it is not JSON.
inline nlohmann::json read_json_document(
    const std::string& path, const std::string& missing) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error(missing);
  }
  nlohmann::json doc;
  try {
    in >> doc;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(
        "'" + path + "' is not valid JSON: " + std::string(e.what()));
  }
  return doc;
}

/// Reads a JSON array of {"text": string, "class": integer} objects. Entries
/// with an empty text or a null class (the files' trailing placeholder) are
/// skipped. Throws std::runtime_error naming the file and the problem.
inline std::vector<Sentence> read_json_file(const std::string& path) {
  const nlohmann::json doc = read_json_document(
      path,
      "cannot open data file '" + path +
          "' (run scripts/fetch_data.sh to download the default data set)");
  if (!doc.is_array()) {
    throw std::runtime_error(
        "'" + path + "' must hold a JSON array of {\"text\", \"class\"}");
  }
  std::vector<Sentence> out;
  for (size_t i = 0; i < doc.size(); ++i) {
    const auto& item = doc[i];
    const auto where = "'" + path + "', entry " + std::to_string(i);
    if (!item.is_object() || !item.contains("text") ||
        !item.contains("class")) {
      throw std::runtime_error(
          where + ": expected an object with \"text\" and \"class\"");
    }
    const auto& text = item["text"];
    const auto& cls = item["class"];
    if (!text.is_string()) {
      throw std::runtime_error(where + ": \"text\" must be a string");
    }
    if (cls.is_null() && text.get<std::string>().empty()) {
      continue; // the placeholder entry that ends each file
    }
    if (!cls.is_number_integer() || cls.get<int64_t>() < 0) {
      throw std::runtime_error(
          where + ": \"class\" must be a non-negative integer");
    }
    if (text.get<std::string>().empty()) {
      continue;
    }
    out.push_back({text.get<std::string>(), cls.get<int64_t>()});
  }
  return out;
}

/// Lower-cased runs of letters, digits and inner apostrophes.
inline std::vector<std::string> tokenize(const std::string& text) {
  std::vector<std::string> tokens;
  std::string cur;
  auto flush = [&] {
    while (!cur.empty() && cur.back() == '\'') {
      cur.pop_back();
    }
    if (!cur.empty()) {
      tokens.push_back(cur);
    }
    cur.clear();
  };
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c)) {
      cur.push_back(static_cast<char>(std::tolower(c)));
    } else if (c == '\'' && !cur.empty()) {
      cur.push_back('\'');
    } else {
      flush();
    }
  }
  flush();
  return tokens;
}

/// Token ids: 0 is padding, 1 stands for tokens not in the vocabulary.
class Vocabulary {
 public:
  static constexpr int64_t kPad = 0;
  static constexpr int64_t kUnknown = 1;

  /// Every token seen at least `min_count` times in `texts`.
  Vocabulary(
      const std::vector<std::vector<std::string>>& texts, int64_t min_count) {
    std::unordered_map<std::string, int64_t> counts;
    std::vector<std::string> order;
    for (const auto& tokens : texts) {
      for (const auto& t : tokens) {
        if (counts[t]++ == 0) {
          order.push_back(t);
        }
      }
    }
    for (const auto& t : order) {
      if (counts[t] >= min_count) {
        ids_.emplace(t, static_cast<int64_t>(ids_.size()) + 2);
      }
    }
  }
  int64_t size() const {
    return static_cast<int64_t>(ids_.size()) + 2;
  }
  /// Adds `token` if it is new; returns its id.
  int64_t add(const std::string& token) {
    return ids_.emplace(token, size()).first->second;
  }
  bool contains(const std::string& token) const {
    return ids_.count(token) > 0;
  }
  int64_t id(const std::string& token) const {
    const auto it = ids_.find(token);
    return it == ids_.end() ? kUnknown : it->second;
  }
  /// The word of each id ("<pad>" and "<unk>" for the two reserved ones).
  std::vector<std::string> words() const {
    std::vector<std::string> out(static_cast<size_t>(size()));
    out[kPad] = "<pad>";
    out[kUnknown] = "<unk>";
    for (const auto& [token, i] : ids_) {
      out[static_cast<size_t>(i)] = token;
    }
    return out;
  }

 private:
  std::unordered_map<std::string, int64_t> ids_;
};

/// Drops exact repeats of a text (the first one is kept), so that no sentence
/// lands in both the train and the test split. Returns how many were dropped.
inline size_t drop_repeats(std::vector<Sentence>& data) {
  std::unordered_set<std::string> seen;
  const auto before = data.size();
  data.erase(
      std::remove_if(
          data.begin(),
          data.end(),
          [&](const Sentence& s) { return !seen.insert(s.text).second; }),
      data.end());
  return before - data.size();
}

/// A seeded shuffle of 0..n-1, the first `test_fraction` of which is the test
/// split.
inline std::pair<std::vector<size_t>, std::vector<size_t>> split(
    size_t n, double test_fraction, uint64_t seed) {
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::mt19937_64 rng(seed);
  for (size_t i = n; i > 1; --i) { // Fisher-Yates, portable across libstdc++s
    std::swap(idx[i - 1], idx[rng() % i]);
  }
  const auto n_test = static_cast<size_t>(test_fraction * n + 0.5);
  return {
      std::vector<size_t>(idx.begin() + n_test, idx.end()),
      std::vector<size_t>(idx.begin(), idx.begin() + n_test)};
}

} // namespace example
