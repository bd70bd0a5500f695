// Trains a small text classifier with one adversarial-training method of
// advtrain and reports clean test accuracy and test accuracy under a PGD
// attack on the embedded sentences (the same attack for every method), at
// several radii, and under PWWS, a word-substitution attack, with WordNet's
// synonyms and with the counter-fitted neighbours (two sources kept apart).
// ASCC and DNE train with one of them (--train-synonyms).
//
//   text_classifier --method fgm --epochs 8
//   text_classifier --data my.json --method pgd --steps 3 --epsilon 0.5
//   text_classifier --dataset spamassassin --method all --csv results.csv
//   text_classifier --method freelb --world-size 2   # two processes
//   text_classifier --model lstm --embeddings glove --pwws-sample -1
//
// The program is one translation unit; its parts are headers, one room each:
//   config.h    the Config and the command line
//   dataset.h   labelled sentences from JSON, tokenizer, vocabulary, split
//   email.h     e-mails to text (the SpamAssassin corpus)
//   data.h      the data set loaded and split, and batches of token ids
//   glove.h     pretrained word vectors (wink-embeddings JSON)
//   wordnet.h   WordNet synonyms and stop words
//   neighbours.h  the counter-fitted neighbours (substitutes/)
//   model.h     the classifier: bag of words, LSTM or transformer
//   methods.h   the table of adversarial-training methods
//   evaluate.h  accuracy and accuracy under the PGD attack
//   pwws.h      the PWWS attack on any classifier of token strings
//   robustness.h  PWWS on the trained model, accuracy against the budget
//   report.h    the printed lines and the CSV rows
//   workers.h   data-parallel training over several processes
//   train.h     the training loop

#include "config.h"
#include "data.h"
#include "methods.h"
#include "report.h"
#include "train.h"
#include "workers.h"

#include <fmt/core.h>
#include <torch/torch.h>

#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace example;

int run(int argc, char** argv) {
  Config c;
  if (const auto exit_code =
          parse_command_line(argc, argv, c, method_names())) {
    return *exit_code;
  }
  if (c.world_size > 1 && c.rank < 0) { // the launcher: start the workers
    return launch_workers(argc, argv, c);
  }
  const Group group = join_group(c);
  torch::set_num_threads(static_cast<int>(c.threads));

  // Problems with the options' file, WordNet or the neighbours file show
  // before any training.
  const auto tuned = c.tuned.empty() ? std::map<std::string, std::string>{}
                                     : read_tuned(c.tuned, c.dataset);
  const bool attacks = c.pwws_sample != 0 && c.reports();
  if (attacks && c.attack_synonyms != "counterfitted") {
    shared_wordnet();
  }
  std::vector<std::string> methods = split_methods(c.method);
  if (c.method == "all") {
    methods = method_names();
  }
  // Each method's options, read (and checked) before any training.
  std::vector<Config> configs;
  bool counterfitted = false;
  for (const auto& m : methods) {
    const auto row = tuned.find(m);
    configs.push_back(row == tuned.end() ? c : with_options(c, row->second));
    counterfitted =
        counterfitted || (find_method(m).substitutes &&
                          configs.back().train_synonyms == "counterfitted");
  }
  if (c.embeddings == "glove" || (attacks && c.attack_synonyms != "wordnet") ||
      counterfitted) {
    shared_neighbours(c.neighbours);
  }
  const Data d = load(c);
  if (c.reports()) {
    print_data(c, d);
  }
  std::vector<Outcome> outcomes;
  for (size_t i = 0; i < methods.size(); ++i) {
    const std::string& m = methods[i];
    if (!d.unlabeled.empty() && find_method(m).augments) {
      if (c.method != "all") { // asked for by name: refused, not skipped
        throw std::invalid_argument(
            m +
            " attacks the whole training split, which --labeled leaves "
            "partly unlabeled: leave it out of --method");
      }
      if (c.reports()) {
        fmt::print(
            "note: {} skipped: its augmentation attacks the whole training "
            "split, which --labeled leaves partly unlabeled\n",
            m);
      }
      continue;
    }
    outcomes.push_back(train(m, configs[i], d, group));
  }

  if (!c.reports()) {
    return 0;
  }
  if (!c.csv.empty()) {
    write_csv(c.csv, c, outcomes);
  }
  if (outcomes.size() > 1) {
    print_summary(outcomes, c);
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
