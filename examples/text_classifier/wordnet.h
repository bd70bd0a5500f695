#pragma once

// Synonyms from WordNet (Princeton WordNet 3.0 through Debian's wordnet-dev
// C library, data from wordnet-base) and the English stop words the attack
// leaves alone. No LibTorch here.

#include "dataset.h"

#include <wn.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace example {

/// Function words that carry no content: PWWS neither replaces them nor
/// offers them as substitutes.
inline bool is_stop_word(const std::string& w) {
  static const std::unordered_set<std::string> kStopWords = {
      "a",       "about",    "above",   "after",   "again",   "against",
      "all",     "am",       "an",      "and",     "any",     "are",
      "as",      "at",       "be",      "because", "been",    "before",
      "being",   "below",    "between", "both",    "but",     "by",
      "can",     "could",    "did",     "do",      "does",    "doing",
      "down",    "during",   "each",    "few",     "for",     "from",
      "further", "had",      "has",     "have",    "having",  "he",
      "her",     "here",     "hers",    "herself", "him",     "himself",
      "his",     "how",      "i",       "if",      "in",      "into",
      "is",      "it",       "its",     "itself",  "just",    "me",
      "more",    "most",     "my",      "myself",  "no",      "nor",
      "not",     "now",      "of",      "off",     "on",      "once",
      "only",    "or",       "other",   "our",     "ours",    "out",
      "over",    "own",      "same",    "she",     "should",  "so",
      "some",    "such",     "than",    "that",    "the",     "their",
      "them",    "then",     "there",   "these",   "they",    "this",
      "those",   "through",  "to",      "too",     "under",   "until",
      "up",      "very",     "was",     "we",      "were",    "what",
      "when",    "where",    "which",   "while",   "who",     "whom",
      "why",     "will",     "with",    "would",   "you",     "your",
      "yours",   "yourself", "'s",      "'t",      "'re",     "'ve",
      "'ll",     "'d",       "'m",      "don't",   "isn't",   "it's",
      "i'm",     "can't",    "won't",   "didn't",  "doesn't", "wasn't",
      "aren't"};
  return kStopWords.count(w) > 0;
}

/// WordNet's synonyms of a word: the lemmas of every synset of the word (or
/// of its base forms, as WordNet's morphology finds them) in the four parts of
/// speech. Multi-word lemmas, lemmas that are not one token of `tokenize`,
/// stop words and the word itself are left out. Answers are cached; the
/// WordNet library is not thread-safe, so calls are serialized.
class WordNet {
 public:
  /// Opens the WordNet database; throws if it is not installed.
  WordNet() {
    std::lock_guard<std::mutex> lock(mutex());
    static const int status = wninit();
    if (status != 0) {
      throw std::runtime_error(
          "cannot open the WordNet database (apt-get install wordnet-base; "
          "or set WNHOME / WNSEARCHDIR)");
    }
  }

  const std::vector<std::string>& synonyms(const std::string& word) {
    const auto hit = cache_.find(word);
    if (hit != cache_.end()) {
      return hit->second;
    }
    std::vector<std::string> out;
    std::unordered_set<std::string> seen = {word};
    std::lock_guard<std::mutex> lock(mutex());
    for (const int pos : {NOUN, VERB, ADJ, ADV}) {
      for (const auto& base : base_forms(word, pos)) {
        std::vector<char> buf(base.begin(), base.end());
        buf.push_back('\0');
        SynsetPtr head = findtheinfo_ds(buf.data(), pos, SYNS, ALLSENSES);
        for (SynsetPtr s = head; s != nullptr; s = s->nextss) {
          for (int i = 0; i < s->wcount; ++i) {
            std::string lemma = s->words[i];
            const auto paren = lemma.find('('); // adjective markers: "well(p)"
            if (paren != std::string::npos) {
              lemma.resize(paren);
            }
            for (auto& ch : lemma) {
              ch = static_cast<char>(
                  std::tolower(static_cast<unsigned char>(ch)));
            }
            const auto tokens = tokenize(lemma);
            if (tokens.size() != 1 || tokens[0] != lemma ||
                is_stop_word(lemma) || !seen.insert(lemma).second) {
              continue;
            }
            out.push_back(lemma);
          }
        }
        if (head != nullptr) {
          free_syns(head);
        }
      }
    }
    return cache_.emplace(word, std::move(out)).first->second;
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  /// The word and its base forms in part of speech `pos` (morphstr's).
  static std::vector<std::string> base_forms(const std::string& w, int pos) {
    std::vector<std::string> forms = {w};
    std::vector<char> buf(w.begin(), w.end());
    buf.push_back('\0');
    for (char* b = morphstr(buf.data(), pos); b != nullptr;
         b = morphstr(nullptr, pos)) {
      if (b != w) {
        forms.emplace_back(b);
      }
    }
    return forms;
  }

  std::unordered_map<std::string, std::vector<std::string>> cache_;
};

/// The process's one WordNet (opened on first use; its answers cached).
inline WordNet& shared_wordnet() {
  static WordNet wordnet;
  return wordnet;
}

} // namespace example
