// The example's word-substitution attacks (PWWS, and A2T's greedy attack for
// adversarial augmentation) on a tiny linear model with hand-made synonym
// sets, WordNet's synonyms, and the reader of pretrained word vectors. Expected
// values were worked out by hand from the formulas of Ren et al. (ACL 2019),
// not read off the code.

#include "augment.h"
#include "glove.h"
#include "pwws.h"
#include "wordnet.h"

#include "catch.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

using example::pwws::Text;
using fixture::matchers::Contains;

namespace {

/// Two classes; P(class 1) = sigmoid(sum of the words' weights - 0.5).
/// Words without a weight (the unknown token among them) weigh 0.
std::vector<std::vector<double>> linear_model(const std::vector<Text>& texts) {
  static const std::map<std::string, double> kWeight = {
      {"good", 1.0},
      {"great", 2.0},
      {"fine", 0.2},
      {"big", 0.1},
      {"bad", -2.0},
      {"awful", -3.0},
      {"poor", -1.0}};
  std::vector<std::vector<double>> out;
  for (const auto& t : texts) {
    double s = -0.5;
    for (const auto& w : t) {
      const auto it = kWeight.find(w);
      s += it == kWeight.end() ? 0.0 : it->second;
    }
    const double p1 = 1 / (1 + std::exp(-s));
    out.push_back({1 - p1, p1});
  }
  return out;
}

const std::map<std::string, std::vector<std::string>> kSynonyms = {
    {"good", {"fine", "decent"}},
    {"great", {"large", "big"}},
    {"movie", {"film"}},
    {"bad", {"poor", "big"}},
    {"awful", {"terrible"}},
    {"plot", {"story", "scheme"}}};

std::vector<std::string> synonyms(const std::string& w) {
  const auto it = kSynonyms.find(w);
  return it == kSynonyms.end() ? std::vector<std::string>{} : it->second;
}

bool not_the(const std::string& w) {
  return w != "the";
}

int64_t predicted(const Text& t) {
  return example::pwws::argmax(linear_model({t})[0]);
}

} // namespace

TEST_CASE(
    "PWWS follows the paper's order on a hand-worked text", "[example][pwws]") {
  // "the good movie great", class 1, score s = 1 + 2 - 0.5 = 2.5.
  // Saliencies (word -> unknown): the 0, good sig(2.5)-sig(1.5), movie 0,
  // great sig(2.5)-sig(0.5) = 0.2993. Best substitutes: good -> decent
  // (weight 0 < fine's 0.2), movie -> film (drop 0), great -> large (0 <
  // big's 0.1). H = softmax(S) * drop: great, good, movie; "the" is a stop
  // word. great -> large gives s = 0.5 (still class 1); good -> decent
  // gives s = -0.5: the flip comes after 2 substitutions.
  const Text text = {"the", "good", "movie", "great"};
  REQUIRE(predicted(text) == 1);
  example::pwws::Options o;
  o.budget = 0.5; // max(1, floor(0.5 * 4)) = 2 words
  o.follow_to = 0.5;
  const auto r =
      example::pwws::attack(text, 1, linear_model, synonyms, not_the, o);
  CHECK(r.correct);
  CHECK(r.success);
  CHECK(r.changed == 2);
  CHECK(r.flip_after == 2);
  CHECK(r.positions == std::vector<int64_t>{3, 1});
  CHECK(r.substitutes == std::vector<std::string>{"large", "decent"});
  CHECK(r.adversarial == Text{"the", "decent", "movie", "large"});
  // 1 clean + 4 unknown-token texts + 2 + 1 + 2 candidates + 2 checks.
  CHECK(r.queries == 1 + 4 + 5 + 2);

  SECTION("a budget of one word stops before the flip") {
    o.budget = 0.25; // max(1, floor(1)) = 1
    const auto one =
        example::pwws::attack(text, 1, linear_model, synonyms, not_the, o);
    CHECK_FALSE(one.success);
    CHECK(one.changed == 1);
    CHECK(one.adversarial == Text{"the", "good", "movie", "large"});
    CHECK(one.flip_after == 2); // followed to 0.5
    CHECK(one.queries == 1 + 4 + 5 + 1);
  }
}

TEST_CASE(
    "PWWS keeps to its budget and to synonyms, and stops at the flip",
    "[example][pwws]") {
  const std::vector<std::string> words = {
      "good", "great", "movie", "bad", "awful", "plot", "the", "fine"};
  std::mt19937 rng(7);
  int successes = 0, misclassified = 0;
  for (int trial = 0; trial < 300; ++trial) {
    Text text(1 + rng() % 9);
    for (auto& w : text) {
      w = words[rng() % words.size()];
    }
    const int64_t label = predicted(text);
    const double budget = 0.1 + 0.1 * (rng() % 9);
    example::pwws::Options o;
    o.budget = budget;
    o.follow_to = 1.0;
    const auto r =
        example::pwws::attack(text, label, linear_model, synonyms, not_the, o);
    REQUIRE(r.correct);
    // The budget.
    CHECK(r.changed <= example::pwws::max_changes(r.words, budget));
    CHECK(r.changed <= std::max<int64_t>(1, std::floor(budget * r.words)));
    // Every change is a synonym of the word it replaced, once per position.
    std::set<int64_t> seen;
    int64_t differing = 0;
    for (size_t i = 0; i < text.size(); ++i) {
      differing += text[i] != r.adversarial[i] ? 1 : 0;
    }
    CHECK(differing == r.changed);
    for (size_t k = 0; k < r.positions.size(); ++k) {
      const auto pos = static_cast<size_t>(r.positions[k]);
      CHECK(seen.insert(r.positions[k]).second);
      CHECK(r.originals[k] == text[pos]);
      CHECK(r.adversarial[pos] == r.substitutes[k]);
      const auto s = synonyms(text[pos]);
      CHECK(std::find(s.begin(), s.end(), r.substitutes[k]) != s.end());
      CHECK(text[pos] != "the");
    }
    // It stops at the first flip: every shorter prefix of its substitutions
    // keeps the class.
    Text x = text;
    for (size_t k = 0; k < r.positions.size(); ++k) {
      x[static_cast<size_t>(r.positions[k])] = r.substitutes[k];
      const bool last = k + 1 == r.positions.size();
      CHECK((predicted(x) != label) == (last && r.success));
    }
    CHECK(r.success == (predicted(r.adversarial) != label));
    successes += r.success ? 1 : 0;
    // Accuracy against the budget from one followed run agrees with runs
    // at each budget.
    for (const double b : {0.1, 0.25, 0.5}) {
      example::pwws::Options ob;
      ob.budget = b;
      ob.follow_to = b;
      const auto rb = example::pwws::attack(
          text, label, linear_model, synonyms, not_the, ob);
      CHECK(
          rb.success ==
          (r.flip_after > 0 &&
           r.flip_after <= example::pwws::max_changes(r.words, b)));
    }
    // A wrong label is not attacked.
    const auto wrong = example::pwws::attack(
        text, 1 - label, linear_model, synonyms, not_the, o);
    CHECK_FALSE(wrong.correct);
    CHECK_FALSE(wrong.success);
    CHECK(wrong.changed == 0);
    CHECK(wrong.queries == 1);
    misclassified += wrong.correct ? 0 : 1;
  }
  CHECK(successes > 30); // the checks above saw real flips
  CHECK(misclassified == 300);
}

TEST_CASE(
    "PWWS never fools a model that ignores its input", "[example][pwws]") {
  auto constant = [](const std::vector<Text>& texts) {
    return std::vector<std::vector<double>>(texts.size(), {0.3, 0.7});
  };
  for (const Text& t :
       {Text{"good", "movie"}, Text{"bad", "awful", "plot"}, Text{"great"}}) {
    example::pwws::Options o;
    o.budget = 1.0;
    o.follow_to = 1.0;
    const auto r = example::pwws::attack(t, 1, constant, synonyms, not_the, o);
    CHECK(r.correct);
    CHECK_FALSE(r.success);
    CHECK(r.flip_after == 0);
    CHECK(r.changed == static_cast<int64_t>(t.size())); // it tried them all
  }
}

TEST_CASE("PWWS refuses bad options and bad answers", "[example][pwws]") {
  example::pwws::Options o;
  o.budget = 0;
  CHECK_THROWS_WITH(
      example::pwws::attack({"good"}, 1, linear_model, synonyms, not_the, o),
      Contains("budget"));
  o.budget = 0.5;
  o.follow_to = 0.25;
  CHECK_THROWS_WITH(
      example::pwws::attack({"good"}, 1, linear_model, synonyms, not_the, o),
      Contains("follow_to"));
  auto short_answer = [](const std::vector<Text>&) {
    return std::vector<std::vector<double>>{};
  };
  CHECK_THROWS_WITH(
      example::pwws::attack({"good"}, 1, short_answer, synonyms, not_the),
      Contains("answered for 0 of 1"));
  CHECK_THROWS_WITH(
      example::pwws::attack({"good"}, 2, linear_model, synonyms, not_the),
      Contains("label"));
}

TEST_CASE(
    "WordNet gives one-word synonyms of a word's senses",
    "[example][wordnet]") {
  example::WordNet wn;
  const auto& movie = wn.synonyms("movie");
  auto has = [](const std::vector<std::string>& v, const std::string& w) {
    return std::find(v.begin(), v.end(), w) != v.end();
  };
  // WordNet 3.0: {movie, film, picture, moving_picture, ..., flick}.
  CHECK(has(movie, "film"));
  CHECK(has(movie, "flick"));
  CHECK_FALSE(has(movie, "movie"));
  CHECK_FALSE(has(movie, "motion_picture"));
  // The base form is found for inflected words.
  CHECK(has(wn.synonyms("movies"), "film"));
  // Adjective senses, markers such as "well(p)" cut.
  const auto& good = wn.synonyms("good");
  CHECK(has(good, "beneficial"));
  CHECK(has(good, "well"));
  for (const auto& w : good) {
    CHECK(example::tokenize(w) == std::vector<std::string>{w});
    CHECK_FALSE(example::is_stop_word(w));
  }
  CHECK(wn.synonyms("xqzzyv").empty());
}

TEST_CASE(
    "Word vectors are read for the wanted words only", "[example][glove]") {
  const std::string dir = std::string(ADVTRAIN_TEST_DATA_DIR);
  const auto v = example::read_word_vectors(
      dir + "/tiny_glove.json", {"movie", "film", "absent"});
  CHECK(v.dimensions == 3);
  REQUIRE(v.vectors.size() == 2);
  // The file's numbers, the norm and rank the package appends cut off.
  CHECK(v.vectors.at("movie") == std::vector<float>{1.0f, -2.0f, 0.5f});
  CHECK(v.vectors.at("film") == std::vector<float>{0.75f, -1.5f, 0.25f});
  CHECK_THROWS_WITH(
      example::read_word_vectors(dir + "/no_such.json", {"movie"}),
      Contains("fetch_data.sh glove"));
  const std::string bad =
      (std::filesystem::temp_directory_path() / "advtrain_tiny_glove_bad.json")
          .string();
  {
    std::ofstream out(bad);
    out << R"({"dimensions": 3, "vectors": {"movie": [1, 2]}})";
  }
  CHECK_THROWS_WITH(
      example::read_word_vectors(bad, {"movie"}),
      Contains("'movie' has 2 numbers"));
  {
    std::ofstream out(bad);
    out << R"({"dimensions": 3, "vectors": {"movie": [1, 2, )";
  }
  CHECK_THROWS_WITH(
      example::read_word_vectors(bad, {"movie"}), Contains("not valid JSON"));
  {
    std::ofstream out(bad);
    out << R"({"vectors": {"movie": [1, 2, 3]}})";
  }
  CHECK_THROWS_WITH(
      example::read_word_vectors(bad, {"movie"}), Contains("dimensions"));
  std::filesystem::remove(bad);
}

TEST_CASE(
    "A2T's greedy attack follows the importance, keeps only improving "
    "swaps, and stops at the flip or the budget",
    "[example][augment]") {
  using example::augment::attack;
  using example::augment::Options;
  const Text text = {"the", "good", "movie", "great"}; // s = 2.5, class 1
  const std::vector<double> importance = {0, 1, 0, 2}; // great, good, ...
  SECTION("great -> large, then good -> decent flips") {
    // great: large gives s = 0.5 (p1 0.622) below big's 0.6 (0.646); then
    // good: decent gives s = -0.5 (p1 0.378) below fine's -0.3: a flip.
    const auto r = attack(text, 1, importance, linear_model, synonyms, not_the);
    CHECK(r.correct);
    CHECK(r.success);
    CHECK(r.changed == 2);
    CHECK(r.queries == 5); // the text, then 2 candidates twice
    CHECK(r.text == Text{"the", "decent", "movie", "large"});
  }
  SECTION("the budget: max(ceil(rate * n), min_words) words") {
    Options o;
    o.min_words = 1; // ceil(0.1 * 4) = 1 word
    const auto r =
        attack(text, 1, importance, linear_model, synonyms, not_the, o);
    CHECK_FALSE(r.success);
    CHECK(r.changed == 1);
    CHECK(r.queries == 3);
    CHECK(r.text == Text{"the", "good", "movie", "large"});
    CHECK(example::augment::max_changes(4, Options()) == 4);
    CHECK(example::augment::max_changes(41, Options()) == 5);
    CHECK(example::augment::max_changes(45, Options()) == 5);
  }
  SECTION("candidates: only the first substitutes are tried") {
    Options o;
    o.candidates = 1; // great -> large, good -> fine (s = -0.3: a flip)
    const auto r =
        attack(text, 1, importance, linear_model, synonyms, not_the, o);
    CHECK(r.success);
    CHECK(r.queries == 3);
    CHECK(r.text == Text{"the", "fine", "movie", "large"});
  }
  SECTION("a swap that does not lower p(label) is skipped") {
    // "bad good", class 0 (s = -1.5, p0 0.818). good -> fine (s = -2.3) or
    // decent (-2.5) raise p0: skipped; bad -> big gives s = 0.6: a flip.
    const auto r =
        attack({"bad", "good"}, 0, {1, 2}, linear_model, synonyms, not_the);
    CHECK(r.success);
    CHECK(r.changed == 1);
    CHECK(r.queries == 5);
    CHECK(r.text == Text{"big", "good"});
  }
  SECTION("a text already misclassified is left alone") {
    const auto r = attack({"bad"}, 1, {1}, linear_model, synonyms, not_the);
    CHECK_FALSE(r.correct);
    CHECK_FALSE(r.success);
    CHECK(r.queries == 1);
    CHECK(r.text == Text{"bad"});
  }
}
