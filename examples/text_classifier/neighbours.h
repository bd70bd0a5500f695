#pragma once

// The counter-fitted neighbours (substitutes/README.md): each word's
// substitutes from the file of Jia et al. (2019), the synonym source the
// word-substitution defenses train with, kept apart from WordNet. No
// LibTorch here.

#include "dataset.h"

#include <nlohmann/json.hpp>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#ifndef TEXT_CLASSIFIER_NEIGHBOURS
#define TEXT_CLASSIFIER_NEIGHBOURS \
  "examples/text_classifier/substitutes/counterfitted_neighbors.json"
#endif

namespace example {

/// Word -> its substitutes.
using NeighbourMap = std::unordered_map<std::string, std::vector<std::string>>;

/// Reads a JSON object {"word": ["substitute", ...]}. Throws
/// std::runtime_error naming the file and the problem.
inline NeighbourMap read_neighbours(const std::string& path) {
  const nlohmann::json doc = read_json_document(
      path,
      "cannot open the neighbours file '" + path +
          "' (the counter-fitted neighbours ship in "
          "examples/text_classifier/substitutes/; see --neighbours)");
  if (!doc.is_object()) {
    throw std::runtime_error(
        "'" + path + "' must hold a JSON object {\"word\": [substitutes]}");
  }
  NeighbourMap out;
  out.reserve(doc.size());
  for (const auto& [word, subs] : doc.items()) {
    if (!subs.is_array()) {
      throw std::runtime_error(
          "'" + path + "', word '" + word + "': expected a list of words");
    }
    std::vector<std::string> list;
    for (const auto& s : subs) {
      if (!s.is_string()) {
        throw std::runtime_error(
            "'" + path + "', word '" + word +
            "': a substitute is not a string");
      }
      list.push_back(s.get<std::string>());
    }
    out.emplace(word, std::move(list));
  }
  return out;
}

/// The neighbours at `path`, read once per process and path.
inline const NeighbourMap& shared_neighbours(const std::string& path) {
  static std::mutex lock;
  static std::map<std::string, NeighbourMap> cache;
  const std::lock_guard<std::mutex> guard(lock);
  auto it = cache.find(path);
  if (it == cache.end()) {
    it = cache.emplace(path, read_neighbours(path)).first;
  }
  return it->second;
}

} // namespace example
