#pragma once

// What the example reports and how: the records of an epoch and of a
// method's run, the lines printed about them, the summary table and the CSV
// rows (tests and sweep.sh parse both: keep their format).

#include "config.h"
#include "data.h"
#include "evaluate.h"
#include "robustness.h"

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace example {

/// One epoch of training, summed over its batches.
struct EpochStats {
  double loss = 0, adv_loss = 0, perturbation_norm = 0, seconds = 0;
  int64_t batches = 0, passes = 0;
};

/// One method's run.
struct Outcome {
  std::string method;
  std::string target;  // what the method perturbed
  std::string options; // Config::options(); empty without an attacker
  int64_t epochs = 0;
  double seconds = 0, passes_per_step = 0; // over all epochs
  Evaluation scores;
  PWWSScores pwws;    // with WordNet's synonyms; texts == 0: not run
  PWWSScores pwws_cf; // with the counter-fitted neighbours
  // Training texts used with their labels, and without (--labeled).
  int64_t labeled = 0, unlabeled = 0;
};

inline void print_data(const Config& c, const Data& d) {
  fmt::print(
      "data: {}, {} texts ({} repeats dropped), {} classes, {} train / {} "
      "{}, vocabulary {}\n",
      c.dataset,
      d.sentences.size(),
      d.repeats,
      d.classes,
      d.train.size(),
      d.test.size(),
      c.split_name(),
      d.vocab->size());
  if (!d.unlabeled.empty()) {
    fmt::print(
        "labels: {} of the {} training texts are labeled; the label-free "
        "methods (whose attacker's traits are label_free) also train on the "
        "other {}, the others on the labeled ones alone\n",
        d.train.size(),
        d.train.size() + d.unlabeled.size(),
        d.unlabeled.size());
  }
  if (c.embeddings == "glove") {
    fmt::print(
        "embeddings: {}-d pretrained vectors for {} of {} words ({} added as "
        "WordNet synonyms, {} as counter-fitted neighbours){}\n",
        d.pretrained_dim,
        d.pretrained.size(),
        d.vocab->size(),
        d.synonyms_added,
        d.neighbours_added,
        c.freeze_embeddings ? ", frozen" : "");
  }
}

/// The line before a method's epochs.
inline void print_method(const Outcome& o, const Config& c) {
  fmt::print(
      "method: {} ({}{}), {} epochs, batch {}{}, Adam lr {}\n",
      o.method,
      o.target,
      o.options.empty() ? "" : "; " + o.options,
      o.epochs,
      c.batch_size,
      c.world_size > 1 ? fmt::format(" over {} processes", c.world_size) : "",
      c.lr);
}

/// The line of epoch `epoch` of `epochs`; `attacked`: with an attacker (its
/// losses and perturbation norms are shown).
inline void print_epoch(
    int64_t epoch,
    int64_t epochs,
    const EpochStats& s,
    bool attacked,
    double test_accuracy) {
  fmt::print("epoch {:>3}/{}  loss {:.4f}", epoch, epochs, s.loss / s.batches);
  if (attacked) {
    fmt::print(
        "  adv loss {:.4f}  |delta| {:.3f}",
        s.adv_loss / s.batches,
        s.perturbation_norm / s.batches);
  }
  fmt::print(
      "  passes/step {:.1f}  test acc {:5.1f}%  ({:.2f} s)\n",
      static_cast<double>(s.passes) / s.batches,
      100 * test_accuracy,
      s.seconds);
  std::fflush(stdout); // progress, also when the output goes to a file
}

/// The two "result:" lines of a method's run.
inline void print_results(const Outcome& o, const Config& c) {
  fmt::print(
      "result: method {}  clean {} accuracy {:.1f}%  accuracy under "
      "PGD (L2 eps {} per sentence, {} steps) {:.1f}%\n",
      o.method,
      c.split_name(),
      100 * o.scores.clean,
      c.attack_epsilon,
      c.attack_steps,
      100 * o.scores.robust);
  std::vector<std::string> curve;
  for (size_t i = 0; i < c.eval_epsilons.size(); ++i) {
    curve.push_back(fmt::format(
        "{}: {:.1f}%", c.eval_epsilons[i], 100 * o.scores.robust_at[i]));
  }
  fmt::print(
      "result: method {}  {} accuracy by PGD radius  {}\n",
      o.method,
      c.split_name(),
      fmt::join(curve, "  "));
  const auto print_pwws =
      [&](const PWWSScores& s, const char* source, const char* label) {
        if (s.texts == 0) {
          return;
        }
        std::vector<std::string> budget;
        for (size_t i = 0; i < c.pwws_budgets.size(); ++i) {
          budget.push_back(fmt::format(
              "{:g}: {:.1f}%", c.pwws_budgets[i], 100 * s.at_budget[i]));
        }
        fmt::print(
            "result: method {}  PWWS ({}, budget {:g} of the words) on {} "
            "{} texts: clean {:.1f}%  under attack {:.1f}%  success {:.1f}%  "
            "words changed {:.1f}%  queries/text {:.0f}\n",
            o.method,
            source,
            c.pwws_budget,
            s.texts,
            c.split_name(),
            100 * s.clean,
            100 * s.accuracy,
            100 * s.success,
            100 * s.changed,
            s.queries);
        fmt::print(
            "result: method {}  {} accuracy by budget  {}\n",
            o.method,
            label,
            fmt::join(budget, "  "));
      };
  print_pwws(o.pwws, "WordNet", "PWWS");
  print_pwws(o.pwws_cf, "counter-fitted neighbours", "PWWS (counter-fitted)");
  std::fflush(stdout);
}

/// The table of several methods' runs.
inline void print_summary(
    const std::vector<Outcome>& outcomes, const Config& c) {
  fmt::print(
      "\n{:<8} {:>10} {:>14} {:>14} {:>14} {:>12} {:>10}\n",
      "method",
      "clean acc",
      "acc under PGD",
      "PWWS WordNet",
      "PWWS c-fitted",
      "passes/step",
      "train s");
  const auto acc = [](const PWWSScores& s) {
    return s.texts > 0 ? fmt::format("{:.1f}%", 100 * s.accuracy) : "-";
  };
  for (const auto& o : outcomes) {
    fmt::print(
        "{:<8} {:>9.1f}% {:>13.1f}% {:>14} {:>14} {:>12.1f} {:>10.2f}\n",
        o.method,
        100 * o.scores.clean,
        100 * o.scores.robust,
        acc(o.pwws),
        acc(o.pwws_cf),
        o.passes_per_step,
        o.seconds);
  }
  fmt::print(
      "(PGD attack: L2 radius {} per embedded sentence, {} steps)\n",
      c.attack_epsilon,
      c.attack_steps);
}

/// Appends one row per outcome to `path` (with a header line if the file is
/// new or empty).
inline void write_csv(
    const std::string& path,
    const Config& c,
    const std::vector<Outcome>& outcomes) {
  const bool fresh =
      !std::filesystem::exists(path) || std::filesystem::file_size(path) == 0;
  std::ofstream out(path, std::ios::app);
  if (!out) {
    throw std::runtime_error("cannot write '" + path + "'");
  }
  if (fresh) {
    out << "dataset,split,method,target,options,seed,epochs,clean_acc";
    for (const double eps : c.eval_epsilons) {
      out << ",acc_eps_" << eps;
    }
    out << ",epoch_seconds,passes_per_step,pwws_texts,pwws_clean_acc,pwws_acc,"
           "pwws_success,pwws_changed,pwws_queries";
    for (const double b : c.pwws_budgets) {
      out << ",pwws_acc_budget_" << b;
    }
    out << ",model,embeddings,labeled,unlabeled,cf_texts,cf_clean_acc,"
           "cf_acc,cf_success,cf_changed,cf_queries";
    for (const double b : c.pwws_budgets) {
      out << ",cf_acc_budget_" << b;
    }
    out << '\n';
  }
  for (const auto& o : outcomes) {
    out << c.dataset << ',' << c.split_name() << ',' << o.method << ','
        << o.target << ",\"" << o.options << "\"," << c.seed << ',' << o.epochs
        << ',' << fmt::format("{:.4f}", o.scores.clean);
    for (const double a : o.scores.robust_at) {
      out << ',' << fmt::format("{:.4f}", a);
    }
    out << ','
        << fmt::format("{:.3f}", o.seconds / std::max<int64_t>(1, o.epochs))
        << ',' << fmt::format("{:.2f}", o.passes_per_step) << ','
        << o.pwws.texts
        << fmt::format(
               ",{:.4f},{:.4f},{:.4f},{:.4f},{:.1f}",
               o.pwws.clean,
               o.pwws.accuracy,
               o.pwws.success,
               o.pwws.changed,
               o.pwws.queries);
    for (size_t k = 0; k < c.pwws_budgets.size(); ++k) {
      out << ','
          << fmt::format(
                 "{:.4f}",
                 k < o.pwws.at_budget.size() ? o.pwws.at_budget[k] : 0.0);
    }
    out << ',' << c.model << ',' << c.embeddings << ',' << o.labeled << ','
        << o.unlabeled << ',' << o.pwws_cf.texts
        << fmt::format(
               ",{:.4f},{:.4f},{:.4f},{:.4f},{:.1f}",
               o.pwws_cf.clean,
               o.pwws_cf.accuracy,
               o.pwws_cf.success,
               o.pwws_cf.changed,
               o.pwws_cf.queries);
    for (size_t k = 0; k < c.pwws_budgets.size(); ++k) {
      out << ','
          << fmt::format(
                 "{:.4f}",
                 k < o.pwws_cf.at_budget.size() ? o.pwws_cf.at_budget[k] : 0.0);
    }
    out << '\n';
  }
  if (!out) {
    throw std::runtime_error("cannot write '" + path + "'");
  }
}

} // namespace example
