#pragma once

// Discrete adversarial augmentation, as A2T trains (Yoo and Qi, "Towards
// Improving Adversarial Training of NLP Models", Findings of EMNLP 2021;
// TextAttack's `A2TYoo2021` recipe with its attack-augmented training):
// each epoch after the first, a share of the training texts is attacked by
// a cheap greedy attack and the successful adversarial texts join that
// epoch's training data. The attack ranks the words by the gradient of the
// loss at the predicted class with respect to their embeddings (the L1 norm
// of each word's gradient), then, most important first, swaps a word for
// the substitute that most lowers the probability of the true class, if
// that lowers it at all, until the prediction flips or max(ceil(rate · n),
// 4) words changed. Differences from the recipe: no part-of-speech,
// embedding-cosine or sentence-encoder constraints (the substitutes are the
// --train-synonyms source's, which the counter-fitted set already keeps
// close); the gradient is taken in eval mode.

#include "pwws.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace example::augment {

using pwws::Text;

struct Options {
  /// Largest share of a text's words changed (A2T's `max_rate`)...
  double rate = 0.1;
  /// ... but at least this many words may change (its `min_threshold`).
  int64_t min_words = 4;
  /// Substitutes tried per word (its `max_candidates`).
  int64_t candidates = 20;
};

/// Words that may change in a text of `n` words.
inline int64_t max_changes(int64_t n, const Options& o) {
  return std::max<int64_t>(
      static_cast<int64_t>(std::ceil(static_cast<double>(n) * o.rate)),
      o.min_words);
}

struct Result {
  Text text;            // the adversarial text (the input where none)
  bool correct = false; // the input was classified as its label
  bool success = false; // correct, and flipped within the budget
  int64_t changed = 0;  // words swapped
  int64_t queries = 0;  // texts the classifier scored
};

/// A2T's greedy attack on `text` of class `label`, the words ranked by
/// `importance` (one value per word, higher first; ties in text order).
inline Result attack(
    const Text& text,
    int64_t label,
    const std::vector<double>& importance,
    const pwws::Classifier& classify,
    const pwws::Synonyms& synonyms,
    const pwws::Replaceable& replaceable,
    const Options& o = {}) {
  Result r;
  r.text = text;
  const auto first = classify({text});
  r.queries = 1;
  r.correct = pwws::argmax(first[0]) == label;
  if (!r.correct || text.empty()) {
    return r;
  }
  const auto n = static_cast<int64_t>(text.size());
  std::vector<size_t> order(text.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return importance[a] > importance[b];
  });
  // The goal's score: 1 - p(label); a swap is kept only if it raises it.
  double score = 1.0 - first[0][static_cast<size_t>(label)];
  const int64_t budget = max_changes(n, o);
  for (const size_t i : order) {
    if (r.changed >= budget) {
      break;
    }
    if (!replaceable(text[i])) {
      continue;
    }
    auto subs = synonyms(text[i]);
    if (subs.size() > static_cast<size_t>(o.candidates)) {
      subs.resize(static_cast<size_t>(o.candidates));
    }
    if (subs.empty()) {
      continue;
    }
    std::vector<Text> tries;
    for (const auto& s : subs) {
      tries.push_back(r.text);
      tries.back()[i] = s;
    }
    const auto probs = classify(tries);
    r.queries += static_cast<int64_t>(tries.size());
    size_t best = 0;
    for (size_t k = 1; k < probs.size(); ++k) {
      if (probs[k][static_cast<size_t>(label)] <
          probs[best][static_cast<size_t>(label)]) {
        best = k;
      }
    }
    const double best_score = 1.0 - probs[best][static_cast<size_t>(label)];
    if (best_score <= score) {
      continue;
    }
    score = best_score;
    r.text = tries[best];
    ++r.changed;
    if (pwws::argmax(probs[best]) != label) {
      r.success = true;
      break;
    }
  }
  return r;
}

} // namespace example::augment
