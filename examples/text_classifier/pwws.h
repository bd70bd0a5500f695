#pragma once

// PWWS, the word-substitution attack of Ren et al., "Generating Natural
// Language Adversarial Examples through Probability Weighted Word Saliency"
// (ACL 2019), on any classifier that gives class probabilities for texts.
// No LibTorch here: the model and the synonyms come in as functions.
//
// For a text x = w_1..w_n of true class y:
//   saliency   S_i = P(y|x) - P(y|x with w_i replaced by the unknown token)
//   substitute w_i* = argmax over synonyms w' of P(y|x) - P(y|x, w_i -> w'),
//              with drop dP_i* = P(y|x) - P(y|x, w_i -> w_i*)
//   score      H_i = softmax(S)_i * dP_i*
// The words are replaced by their w_i*, in the order of decreasing H_i, one
// after the other, until the predicted class is no longer y or the budget of
// changed words is spent.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace example::pwws {

using Text = std::vector<std::string>;
/// Class probabilities [texts][classes] of a batch of texts.
using Classifier =
    std::function<std::vector<std::vector<double>>(const std::vector<Text>&)>;
/// The candidate substitutes of a word (already filtered: no stop words, not
/// the word itself, only words the model can read).
using Synonyms = std::function<std::vector<std::string>(const std::string&)>;
/// Whether the word at a position may be replaced (stop words may not).
using Replaceable = std::function<bool(const std::string&)>;

struct Options {
  /// Largest share of the text's words that may be changed: at most
  /// max(1, floor(budget * n)) words.
  double budget = 0.25;
  /// Also follow the substitutions up to this share (>= budget) to learn how
  /// many words a flip needs (for accuracy against the budget).
  double follow_to = 0.25;
  /// What a word is replaced by to measure its saliency.
  std::string unknown = "<unk>";
};

/// Words that may change for a text of `n` words under `budget`.
inline int64_t max_changes(int64_t n, double budget) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::floor(budget * n)));
}

struct Result {
  int64_t words = 0;    // n
  bool correct = false; // the clean text is classified as its class
  bool success = false; // correct, and flipped within the budget
  int64_t changed = 0;  // words replaced (within the budget)
  int64_t queries = 0;  // texts the classifier scored, within the budget
  /// Substitutions in order that first flip the prediction (followed up to
  /// `follow_to`); 0 when none did.
  int64_t flip_after = 0;
  Text adversarial;               // the text after the attack
  std::vector<int64_t> positions; // the positions replaced, in order
  std::vector<std::string> originals, substitutes; // at those positions
};

/// The index of the largest probability (the first on ties).
inline int64_t argmax(const std::vector<double>& p) {
  return static_cast<int64_t>(std::max_element(p.begin(), p.end()) - p.begin());
}

/// Attacks `text` of class `label`.
inline Result attack(
    const Text& text,
    int64_t label,
    const Classifier& classify,
    const Synonyms& synonyms,
    const Replaceable& replaceable,
    const Options& o = {}) {
  if (!(o.budget > 0 && o.budget <= 1 && o.follow_to >= o.budget &&
        o.follow_to <= 1)) {
    throw std::invalid_argument(
        "PWWS: need 0 < budget <= follow_to <= 1, got budget " +
        std::to_string(o.budget) + ", follow_to " +
        std::to_string(o.follow_to));
  }
  Result r;
  r.words = static_cast<int64_t>(text.size());
  r.adversarial = text;
  int64_t queries = 0;
  auto score = [&](const std::vector<Text>& texts) {
    queries += static_cast<int64_t>(texts.size());
    auto p = classify(texts);
    if (p.size() != texts.size()) {
      throw std::runtime_error(
          "PWWS: the classifier answered for " + std::to_string(p.size()) +
          " of " + std::to_string(texts.size()) + " texts");
    }
    for (const auto& row : p) {
      if (label < 0 || label >= static_cast<int64_t>(row.size())) {
        throw std::invalid_argument("PWWS: label out of the classes' range");
      }
    }
    return p;
  };
  const auto clean = score({text})[0];
  r.correct = argmax(clean) == label;
  r.queries = queries;
  if (!r.correct || text.empty()) {
    return r;
  }
  const double p0 = clean[static_cast<size_t>(label)];

  // One batch: each word replaced by the unknown token, then each word by
  // each of its candidates.
  std::vector<Text> batch;
  std::vector<std::vector<std::string>> cands(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    Text t = text;
    t[i] = o.unknown;
    batch.push_back(std::move(t));
  }
  for (size_t i = 0; i < text.size(); ++i) {
    if (!replaceable(text[i])) {
      continue;
    }
    cands[i] = synonyms(text[i]);
    for (const auto& c : cands[i]) {
      Text t = text;
      t[i] = c;
      batch.push_back(std::move(t));
    }
  }
  const auto p = score(batch);
  r.queries = queries;
  std::vector<double> saliency(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    saliency[i] = p0 - p[i][static_cast<size_t>(label)];
  }
  // softmax(S) over all the words, stop words included (the paper's phi).
  const double top = *std::max_element(saliency.begin(), saliency.end());
  double z = 0;
  for (const double s : saliency) {
    z += std::exp(s - top);
  }
  struct Choice {
    size_t position;
    std::string substitute;
    double h;
  };
  std::vector<Choice> choices;
  size_t row = text.size();
  for (size_t i = 0; i < text.size(); ++i) {
    double best_drop = 0;
    std::string best;
    for (const auto& c : cands[i]) {
      const double drop = p0 - p[row++][static_cast<size_t>(label)];
      if (best.empty() || drop > best_drop) {
        best_drop = drop;
        best = c;
      }
    }
    if (!best.empty()) {
      choices.push_back({i, best, std::exp(saliency[i] - top) / z * best_drop});
    }
  }
  std::stable_sort(
      choices.begin(), choices.end(), [](const Choice& a, const Choice& b) {
        return a.h > b.h;
      });

  const int64_t limit = max_changes(r.words, o.budget);
  const int64_t follow = max_changes(r.words, o.follow_to);
  Text x = text;
  for (size_t k = 0;
       k < choices.size() && static_cast<int64_t>(k) < std::max(limit, follow);
       ++k) {
    x[choices[k].position] = choices[k].substitute;
    const auto q = score({x})[0];
    const bool flipped = argmax(q) != label;
    if (static_cast<int64_t>(k) < limit) {
      r.adversarial = x;
      r.changed = static_cast<int64_t>(k) + 1;
      r.positions.push_back(static_cast<int64_t>(choices[k].position));
      r.originals.push_back(text[choices[k].position]);
      r.substitutes.push_back(choices[k].substitute);
      r.queries = queries;
      r.success = flipped;
    }
    if (flipped) {
      r.flip_after = static_cast<int64_t>(k) + 1;
      break;
    }
  }
  return r;
}

} // namespace example::pwws
