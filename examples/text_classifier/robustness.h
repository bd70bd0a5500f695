#pragma once

// Accuracy under word substitution: the PWWS attack (pwws.h) on a trained
// model, over a fixed sample of the test split, with accuracy against the
// budget of changed words; its substitutes come from one of two sources kept
// apart, WordNet's synonyms (wordnet.h) or the counter-fitted neighbours
// (neighbours.h), so that a defense trained on one can be attacked with the
// other.

#include "config.h"
#include "data.h"
#include "evaluate.h"
#include "model.h"
#include "neighbours.h"
#include "pwws.h"
#include "wordnet.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace example {

/// PWWS's scores on the attacked sample.
struct PWWSScores {
  int64_t texts = 0;   // the sample's size (0: no attack ran)
  double clean = 0;    // accuracy on the sample
  double accuracy = 0; // accuracy under the attack at --pwws-budget
  double success = 0;  // share of the correctly classified texts flipped
  double changed = 0;  // mean share of words changed in a successful attack
  double queries = 0;  // mean model queries per attacked text
  std::vector<double> at_budget; // accuracy at each of --pwws-budgets
};

/// The model as PWWS sees it: texts (token strings) to class probabilities
/// (of `predict`, or the softmax of the model's output), in eval mode, in
/// batches of `chunk` texts.
inline pwws::Classifier probabilities_of(
    Classifier& model,
    const Vocabulary& vocab,
    const Predictor& predict = {},
    int64_t chunk = 256) {
  return [&model, &vocab, predict, chunk](
             const std::vector<pwws::Text>& texts) {
    torch::NoGradGuard no_grad;
    model->eval();
    std::vector<std::vector<double>> out;
    for (size_t s = 0; s < texts.size(); s += static_cast<size_t>(chunk)) {
      const size_t e = std::min(texts.size(), s + static_cast<size_t>(chunk));
      // The texts come cut to the words the model reads: no limit here.
      const auto ids = token_ids(
          e - s,
          [&](size_t b) -> const pwws::Text& { return texts[s + b]; },
          vocab,
          std::numeric_limits<int64_t>::max());
      const auto p =
          (predict ? predict(ids) : torch::softmax(model->forward(ids), 1))
              .to(torch::kDouble)
              .contiguous();
      const auto pa = p.accessor<double, 2>();
      for (int64_t i = 0; i < p.size(0); ++i) {
        out.emplace_back(pa[i].data(), pa[i].data() + p.size(1));
      }
    }
    return out;
  };
}

/// The texts PWWS attacks: the first --pwws-sample texts of the test split
/// (all with -1), each cut to the words the model reads.
inline std::vector<size_t> pwws_sample(const Data& d, const Config& c) {
  std::vector<size_t> idx = d.test;
  if (c.pwws_sample >= 0 && static_cast<size_t>(c.pwws_sample) < idx.size()) {
    idx.resize(static_cast<size_t>(c.pwws_sample));
  }
  return idx;
}

/// A word's substitutes from `source` ("wordnet" or "counterfitted", the
/// neighbours file of `c`), whether in a vocabulary or not.
inline std::function<std::vector<std::string>(const std::string&)>
substitutes_from(const std::string& source, const Config& c) {
  if (source == "wordnet") {
    WordNet* wordnet = &shared_wordnet();
    return [wordnet](const std::string& w) { return wordnet->synonyms(w); };
  }
  if (source == "counterfitted") {
    const NeighbourMap* neighbours = &shared_neighbours(c.neighbours);
    return [neighbours](const std::string& w) {
      const auto it = neighbours->find(w);
      return it == neighbours->end() ? std::vector<std::string>{} : it->second;
    };
  }
  throw std::invalid_argument("unknown synonym source '" + source + "'");
}

/// The substitutes of a word from `source` that `vocab` holds (others would
/// read as the unknown token), the word itself left out.
inline pwws::Synonyms in_vocabulary(
    const std::string& source, const Config& c, const Vocabulary& vocab) {
  auto from_source = substitutes_from(source, c);
  return [&vocab, from_source](const std::string& w) {
    std::vector<std::string> in_vocab;
    for (const auto& x : from_source(w)) {
      if (x != w && vocab.contains(x)) {
        in_vocab.push_back(x);
      }
    }
    return in_vocab;
  };
}

/// Runs PWWS on the sample with the substitutes of `source` ("wordnet" or
/// "counterfitted") the vocabulary holds (others would read as the unknown
/// token); stop words stay. The attack queries `predict` (empty: the
/// model's softmax).
inline PWWSScores evaluate_pwws(
    Classifier& model,
    const Data& d,
    const Config& c,
    const std::string& source = "wordnet",
    const Predictor& predict = {}) {
  PWWSScores s;
  if (c.pwws_sample == 0) {
    return s;
  }
  const Vocabulary& vocab = *d.vocab;
  const auto classify = probabilities_of(model, vocab, predict);
  const auto synonyms = in_vocabulary(source, c, vocab);
  auto replaceable = [](const std::string& w) { return !is_stop_word(w); };
  pwws::Options o;
  o.budget = c.pwws_budget;
  o.follow_to = c.pwws_budget;
  for (const double b : c.pwws_budgets) {
    o.follow_to = std::max(o.follow_to, b);
  }
  s.at_budget.assign(c.pwws_budgets.size(), 0.0);
  int64_t correct = 0, flipped = 0, attacked_queries = 0;
  double changed_share = 0;
  for (const auto i : pwws_sample(d, c)) {
    const auto& t = d.tokens[i];
    const pwws::Text text(
        t.begin(), t.begin() + std::min<int64_t>(c.max_len, t.size()));
    const auto r = pwws::attack(
        text, d.sentences[i].label, classify, synonyms, replaceable, o);
    ++s.texts;
    if (!r.correct) {
      continue;
    }
    ++correct;
    attacked_queries += r.queries;
    if (r.success) {
      ++flipped;
      changed_share += static_cast<double>(r.changed) / r.words;
    }
    for (size_t k = 0; k < c.pwws_budgets.size(); ++k) {
      const bool falls =
          r.flip_after > 0 &&
          r.flip_after <= pwws::max_changes(r.words, c.pwws_budgets[k]);
      s.at_budget[k] += falls ? 0.0 : 1.0;
    }
  }
  const double n = std::max<int64_t>(1, s.texts);
  s.clean = correct / n;
  s.accuracy = (correct - flipped) / n;
  s.success = correct > 0 ? static_cast<double>(flipped) / correct : 0.0;
  s.changed = flipped > 0 ? changed_share / flipped : 0.0;
  s.queries = correct > 0 ? static_cast<double>(attacked_queries) / correct : 0;
  for (auto& a : s.at_budget) {
    a /= n;
  }
  return s;
}

} // namespace example
