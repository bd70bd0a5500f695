#pragma once

// The data the model sees: the data set read, tokenized and split (`Data`,
// `load`), with the pretrained vectors and WordNet synonyms of its words when
// asked for, and batches of token ids (`Batch`, `encode`). Reading the files
// is dataset.h's, email.h's and glove.h's work.

#include "config.h"
#include "dataset.h"
#include "email.h"
#include "glove.h"
#include "wordnet.h"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace example {

struct Batch {
  torch::Tensor ids;    // [B, L], 0-padded
  torch::Tensor labels; // [B]
};

/// Token ids [n, L] of texts `text(0)` .. `text(n - 1)` (each a vector of
/// tokens), cut to `max_len` tokens and 0-padded to the longest.
template <typename TextAt>
torch::Tensor token_ids(
    size_t n, const TextAt& text, const Vocabulary& vocab, int64_t max_len) {
  int64_t len = 1;
  for (size_t b = 0; b < n; ++b) {
    len = std::max<int64_t>(len, std::min<int64_t>(max_len, text(b).size()));
  }
  auto ids = torch::zeros({static_cast<int64_t>(n), len}, torch::kLong);
  auto a = ids.accessor<int64_t, 2>();
  for (size_t b = 0; b < n; ++b) {
    const auto& t = text(b);
    for (int64_t j = 0; j < std::min<int64_t>(len, t.size()); ++j) {
      a[static_cast<int64_t>(b)][j] = vocab.id(t[static_cast<size_t>(j)]);
    }
  }
  return ids;
}

/// Token ids of sentences `idx` of `data`, cut to `max_len` tokens.
inline Batch encode(
    const std::vector<std::vector<std::string>>& tokens,
    const std::vector<Sentence>& data,
    const std::vector<size_t>& idx,
    const Vocabulary& vocab,
    int64_t max_len) {
  const auto ids = token_ids(
      idx.size(),
      [&](size_t b) -> const std::vector<std::string>& {
        return tokens[idx[b]];
      },
      vocab,
      max_len);
  auto labels = torch::empty({static_cast<int64_t>(idx.size())}, torch::kLong);
  for (size_t b = 0; b < idx.size(); ++b) {
    labels[static_cast<int64_t>(b)] = data[idx[b]].label;
  }
  return {ids, labels};
}

/// The data set, tokenized, with its split and vocabulary. `test` is the
/// validation split (taken from the training one) under `--validation`.
struct Data {
  std::vector<Sentence> sentences;
  std::vector<std::vector<std::string>> tokens;
  std::vector<size_t> train, test;
  /// The training split's texts whose labels are not used (--labeled): the
  /// label-free methods' unlabeled batches.
  std::vector<size_t> unlabeled;
  std::unique_ptr<Vocabulary> vocab;
  int64_t classes = 0;
  size_t repeats = 0; // repeated texts dropped
  /// --embeddings glove: the pretrained vector of each token id that has one
  /// (the table's other rows start random).
  std::unordered_map<int64_t, std::vector<float>> pretrained;
  int64_t pretrained_dim = 0;
  size_t synonyms_added = 0;   // vocabulary words that came in as synonyms
  size_t neighbours_added = 0; // ... as counter-fitted neighbours

  /// Sentences `idx` as a batch.
  Batch batch(const std::vector<size_t>& idx, int64_t max_len) const {
    return encode(tokens, sentences, idx, *vocab, max_len);
  }
};

/// The files read when `--data` is not given.
inline std::vector<std::string> default_files(const std::string& dataset) {
  if (dataset == "spamassassin") {
    return {"data/spamassassin"};
  }
  return {
      "data/sentiment/amazon.json",
      "data/sentiment/imdb.json",
      "data/sentiment/yelp.json"};
}

/// Adds to `d`'s vocabulary every word of its texts (under `validation`,
/// of the training and validation splits only), every WordNet synonym of
/// those words, and (given `neighbours`) their counter-fitted neighbours,
/// that has a vector in the file at `path`, and keeps the vectors of the
/// vocabulary's words: substitutes of an attack are then real words with
/// real vectors rather than the unknown token.
inline void add_pretrained(
    Data& d,
    const std::string& path,
    bool validation,
    const NeighbourMap* neighbours = nullptr) {
  WordNet& wordnet = shared_wordnet();
  std::vector<std::string> order; // words in the order they are met
  std::unordered_set<std::string> wanted;
  auto want = [&](const std::string& w) {
    if (wanted.insert(w).second) {
      order.push_back(w);
    }
  };
  std::vector<size_t> texts(d.tokens.size());
  std::iota(texts.begin(), texts.end(), 0);
  if (validation) { // the test split is not looked at, its words included
    texts = d.train;
    texts.insert(texts.end(), d.unlabeled.begin(), d.unlabeled.end());
    texts.insert(texts.end(), d.test.begin(), d.test.end());
  }
  for (const auto i : texts) {
    for (const auto& t : d.tokens[i]) {
      want(t);
    }
  }
  const size_t text_words = order.size();
  for (size_t i = 0; i < text_words; ++i) {
    const std::string w = order[i]; // `want` may grow `order`
    if (is_stop_word(w) || w.size() > 24 ||
        std::any_of(w.begin(), w.end(), [](char ch) {
          return std::isdigit(static_cast<unsigned char>(ch));
        })) {
      continue; // no synonyms in WordNet; e-mails have many such tokens
    }
    for (const auto& s : wordnet.synonyms(w)) {
      want(s);
    }
  }
  // The neighbours after every synonym: WordNet's words keep their ids.
  const size_t before_neighbours = order.size();
  for (size_t i = 0; neighbours != nullptr && i < text_words; ++i) {
    const auto it = neighbours->find(order[i]);
    if (it != neighbours->end()) {
      for (const auto& s : it->second) {
        want(s);
      }
    }
  }
  const auto vectors = read_word_vectors(path, wanted);
  d.pretrained_dim = vectors.dimensions;
  for (size_t i = 0; i < order.size(); ++i) {
    const auto it = vectors.vectors.find(order[i]);
    if (it == vectors.vectors.end()) {
      continue;
    }
    const bool is_new = !d.vocab->contains(order[i]);
    d.pretrained.emplace(d.vocab->add(order[i]), it->second);
    d.synonyms_added +=
        is_new && i >= text_words && i < before_neighbours ? 1 : 0;
    d.neighbours_added += is_new && i >= before_neighbours ? 1 : 0;
  }
}

/// Reads, splits and tokenizes the data set `c` names, and builds the
/// vocabulary of its training split (with --embeddings glove, extended by
/// add_pretrained).
inline Data load(const Config& c) {
  Data d;
  for (const auto& f : c.files.empty() ? default_files(c.dataset) : c.files) {
    auto part = std::filesystem::is_directory(f) ||
                        (c.dataset == "spamassassin" && c.files.empty())
                    ? read_email_dir(f)
                    : read_json_file(f);
    d.sentences.insert(d.sentences.end(), part.begin(), part.end());
  }
  d.repeats = drop_repeats(d.sentences);
  if (d.sentences.size() < 4) {
    throw std::runtime_error(
        "need at least 4 labelled sentences, got " +
        std::to_string(d.sentences.size()));
  }
  for (const auto& s : d.sentences) {
    d.classes = std::max(d.classes, s.label + 1);
    d.tokens.push_back(tokenize(s.text));
  }
  std::tie(d.train, d.test) =
      split(d.sentences.size(), c.test_fraction, c.seed);
  if (c.validation) { // the test split is never looked at
    auto [fit, held] = split(d.train.size(), c.test_fraction, c.seed);
    std::vector<size_t> train, val;
    for (const auto i : fit) {
      train.push_back(d.train[i]);
    }
    for (const auto i : held) {
      val.push_back(d.train[i]);
    }
    d.train = std::move(train);
    d.test = std::move(val);
  }
  if (c.limit > 0) { // a small subset, for smoke runs
    d.train.resize(std::min<size_t>(d.train.size(), c.limit));
    d.test.resize(
        std::min<size_t>(d.test.size(), std::max<size_t>(4, c.limit / 4)));
  }
  if (c.labeled != 1) { // the first ones of the (shuffled) training split
    const size_t n =
        c.labeled < 1
            ? std::max<size_t>(
                  1, static_cast<size_t>(c.labeled * d.train.size() + 0.5))
            : static_cast<size_t>(c.labeled);
    if (n > d.train.size()) {
      throw std::runtime_error(
          "--labeled " + std::to_string(n) + ": the training split has " +
          std::to_string(d.train.size()) + " texts");
    }
    d.unlabeled.assign(
        d.train.begin() + static_cast<std::ptrdiff_t>(n), d.train.end());
    d.train.resize(n);
  }
  if (c.test_sample > 0 && static_cast<size_t>(c.test_sample) < d.test.size()) {
    d.test.resize(static_cast<size_t>(c.test_sample)); // the split's order
  }
  std::vector<std::vector<std::string>> train_tokens;
  for (const auto& part : {d.train, d.unlabeled}) { // the texts, not labels
    for (const auto i : part) {
      train_tokens.push_back(d.tokens[i]);
    }
  }
  d.vocab = std::make_unique<Vocabulary>(train_tokens, c.min_count);
  if (c.embeddings == "glove") {
    // The neighbours always join (not only when an attack or ASCC uses
    // them), so that the trained model does not depend on what is measured.
    add_pretrained(d, c.glove, c.validation, &shared_neighbours(c.neighbours));
  }
  return d;
}

} // namespace example
