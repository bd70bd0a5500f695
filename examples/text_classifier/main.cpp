// Trains a small text classifier with one adversarial-training method of
// advtrain and reports clean test accuracy and test accuracy under a PGD
// attack on the embedded sentences (the same attack for every method), at
// several radii.
//
//   text_classifier --method fgm --epochs 8
//   text_classifier --data my.json --method pgd --steps 3 --epsilon 0.5
//   text_classifier --dataset spamassassin --method all --csv results.csv
//   text_classifier --method freelb --world-size 2   # two processes

#include "dataset.h"
#include "email.h"

#include <advtrain/advtrain.h>
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
#include <advtrain/distributed.h>
#endif

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <tuple>
#include <type_traits>

extern char** environ;

namespace {

using example::Sentence;
using example::Vocabulary;

struct Batch {
  torch::Tensor ids;    // [B, L], 0-padded
  torch::Tensor labels; // [B]
};

/// Token ids of sentences `idx` of `data`, cut to `max_len` tokens.
Batch encode(
    const std::vector<std::vector<std::string>>& tokens,
    const std::vector<Sentence>& data,
    const std::vector<size_t>& idx,
    const Vocabulary& vocab,
    int64_t max_len) {
  int64_t len = 1;
  for (const auto i : idx) {
    len = std::max<int64_t>(len, std::min<int64_t>(max_len, tokens[i].size()));
  }
  auto ids =
      torch::zeros({static_cast<int64_t>(idx.size()), len}, torch::kLong);
  auto labels = torch::empty({static_cast<int64_t>(idx.size())}, torch::kLong);
  auto a = ids.accessor<int64_t, 2>();
  for (size_t b = 0; b < idx.size(); ++b) {
    const auto& t = tokens[idx[b]];
    for (int64_t j = 0; j < std::min<int64_t>(len, t.size()); ++j) {
      a[b][j] = vocab.id(t[j]);
    }
    labels[b] = data[idx[b]].label;
  }
  return {ids, labels};
}

/// Embedding -> masked mean over the sentence -> tanh layer -> classes. The
/// embedding is advtrain's PerturbedEmbedding (a plain nn::Embedding unless a
/// per-example attacker is attached). For YOPO the head splits into `first`
/// (mean + tanh layer) and `rest` (dropout + output layer).
struct ClassifierImpl : torch::nn::Module {
  ClassifierImpl(int64_t vocab, int64_t dim, int64_t classes, double dropout)
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(vocab, dim)))),
        hidden(register_module("hidden", torch::nn::Linear(dim, dim))),
        out(register_module("out", torch::nn::Linear(dim, classes))),
        drop(register_module("drop", torch::nn::Dropout(dropout))) {}

  static torch::Tensor mask_of(const torch::Tensor& ids) {
    return ids.ne(Vocabulary::kPad);
  }
  /// The first layer after the lookup: masked mean and tanh layer.
  torch::Tensor first(const torch::Tensor& e, const torch::Tensor& ids) {
    const auto mask = mask_of(ids).unsqueeze(-1).to(e.dtype());
    const auto pooled = (e * mask).sum(1) / mask.sum(1).clamp_min(1.0);
    return torch::tanh(hidden(pooled));
  }
  torch::Tensor rest(const torch::Tensor& z) {
    return out(drop(z));
  }
  /// Logits for embedded tokens `e` [B, L, H] of `ids` [B, L].
  torch::Tensor head(const torch::Tensor& e, const torch::Tensor& ids) {
    return rest(first(e, ids));
  }
  torch::Tensor embed(const torch::Tensor& ids) {
    return embedding(ids, mask_of(ids));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    return head(embed(ids), ids);
  }

  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear hidden, out;
  torch::nn::Dropout drop;
};
TORCH_MODULE(Classifier);

/// Accuracy on `batch` after `steps` steps of L2 PGD of radius `eps` on each
/// example's embedded tokens (padding excluded), step 2.5 * eps / steps.
double robust_accuracy(
    Classifier& model, const Batch& batch, double eps, int64_t steps) {
  model->eval();
  torch::Tensor e;
  {
    torch::NoGradGuard no_grad;
    e = model->embed(batch.ids);
  }
  const auto mask = batch.ids.ne(Vocabulary::kPad).unsqueeze(-1).to(e.dtype());
  auto delta = torch::zeros_like(e);
  const double alpha = 2.5 * eps / static_cast<double>(steps);
  for (int64_t s = 0; eps > 0 && s < steps; ++s) {
    delta.requires_grad_(true);
    const auto loss = torch::nn::functional::cross_entropy(
        model->head(e + delta, batch.ids),
        batch.labels,
        torch::nn::functional::CrossEntropyFuncOptions().reduction(
            torch::kSum));
    auto g = torch::autograd::grad({loss}, {delta})[0] * mask;
    torch::NoGradGuard no_grad;
    const auto gn = g.flatten(1).norm(2, 1).clamp_min(1e-12).view({-1, 1, 1});
    delta = delta.detach() + alpha * g / gn;
    const auto dn = delta.flatten(1).norm(2, 1).view({-1, 1, 1});
    delta = delta * (eps / dn.clamp_min(eps));
  }
  torch::NoGradGuard no_grad;
  const auto pred = model->head(e + delta, batch.ids).argmax(1);
  return pred.eq(batch.labels).to(torch::kDouble).mean().item<double>();
}

double accuracy(Classifier& model, const Batch& batch) {
  return robust_accuracy(model, batch, 0.0, 1);
}

/// Everything the command line sets.
struct Config {
  std::string dataset = "sentiment";
  std::vector<std::string> files; // empty: the data set's default files
  std::string method = "all";
  std::string target = "weights";
  std::string norm; // pgd, freelb, freeat: "l2" or "linf"; empty: default
  int64_t epochs = 10, batch_size = 32, dim = 64, max_len = 64;
  int64_t attack_steps = 10, threads = 2, min_count = 1, limit = 0;
  uint64_t seed = 1;
  double lr = 3e-3, dropout = 0.2, test_fraction = 0.2;
  double attack_epsilon = 1.0;
  std::vector<double> eval_epsilons = {0, 0.5, 1, 2, 4};
  bool validation = false;
  std::string csv;
  // Data-parallel training: world_size processes, this one `rank` (-1: the
  // launcher, which starts them), meeting through a FileStore at `store`.
  int world_size = 1, rank = -1;
  std::string store;
  // Strategy options; unset ones keep the library's defaults.
  std::optional<double> epsilon, alpha, weight, noise_var, init_mag;
  std::optional<int64_t> steps, replays, inner_steps;

  /// Rank 0 (or the only process) reports; other ranks stay quiet.
  bool reports() const {
    return rank <= 0;
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
    if (!norm.empty()) {
      o.push_back("norm=" + norm);
    }
    return fmt::format("{}", fmt::join(o, ";"));
  }
};

const std::vector<std::string> kMethods = {
    "plain", "fgsm", "fgm", "pgd", "freeat", "freelb", "smart", "yopo"};

/// The data set, tokenized, with its split and vocabulary. `test` is the
/// validation split (taken from the training one) under `--validation`.
struct Data {
  std::vector<Sentence> sentences;
  std::vector<std::vector<std::string>> tokens;
  std::vector<size_t> train, test;
  std::unique_ptr<Vocabulary> vocab;
  int64_t classes = 0;
};

/// The files read when `--data` is not given.
std::vector<std::string> default_files(const std::string& dataset) {
  if (dataset == "spamassassin") {
    return {"data/spamassassin"};
  }
  return {
      "data/sentiment/amazon.json",
      "data/sentiment/imdb.json",
      "data/sentiment/yelp.json"};
}

Data load(const Config& c) {
  Data d;
  for (const auto& f : c.files.empty() ? default_files(c.dataset) : c.files) {
    auto part = std::filesystem::is_directory(f) ||
                        (c.dataset == "spamassassin" && c.files.empty())
                    ? example::read_email_dir(f)
                    : example::read_json_file(f);
    d.sentences.insert(d.sentences.end(), part.begin(), part.end());
  }
  const size_t repeats = example::drop_repeats(d.sentences);
  if (d.sentences.size() < 4) {
    throw std::runtime_error(
        "need at least 4 labelled sentences, got " +
        std::to_string(d.sentences.size()));
  }
  for (const auto& s : d.sentences) {
    d.classes = std::max(d.classes, s.label + 1);
    d.tokens.push_back(example::tokenize(s.text));
  }
  std::tie(d.train, d.test) =
      example::split(d.sentences.size(), c.test_fraction, c.seed);
  if (c.validation) { // the test split is never looked at
    auto [fit, held] = example::split(d.train.size(), c.test_fraction, c.seed);
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
  std::vector<std::vector<std::string>> train_tokens;
  for (const auto i : d.train) {
    train_tokens.push_back(d.tokens[i]);
  }
  d.vocab = std::make_unique<Vocabulary>(train_tokens, c.min_count);
  if (c.reports()) {
    fmt::print(
        "data: {}, {} texts ({} repeats dropped), {} classes, {} train / {} "
        "{}, vocabulary {}\n",
        c.dataset,
        d.sentences.size(),
        repeats,
        d.classes,
        d.train.size(),
        d.test.size(),
        c.validation ? "validation" : "test",
        d.vocab->size());
  }
  return d;
}

/// `T` on the model's embedding: the weight table, or (`--target
/// activations`) each example's embedded tokens. One constructor argument
/// picks the target.
template <typename T, typename Options>
std::unique_ptr<advtrain::Attacker> on_target(
    Classifier& model, const Config& c, Options options) {
  if (c.target == "activations") {
    return std::make_unique<T>(model->embedding, std::move(options));
  }
  return std::make_unique<T>(*model, "embedding", std::move(options));
}

/// The attacker for `method`; options not given on the command line keep
/// the library's defaults. YOPO (per example only) runs the model's first
/// layer on the ids in `current_ids`.
std::unique_ptr<advtrain::Attacker> make_attacker(
    const std::string& method,
    Classifier& model,
    const Config& c,
    const torch::Tensor& current_ids) {
  using namespace advtrain;
  if (method == "fgsm") {
    FGSMOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    return on_target<FGSM>(model, c, o);
  }
  if (method == "fgm") {
    FGMOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    return on_target<FGM>(model, c, o);
  }
  if (method == "pgd") {
    PGDOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    if (c.alpha)
      o.alpha(*c.alpha);
    if (c.steps)
      o.steps(*c.steps);
    if (c.norm == "linf")
      return on_target<PGDLInf>(model, c, o);
    return on_target<PGD>(model, c, o);
  }
  if (method == "freeat") {
    FreeATOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    if (c.alpha)
      o.alpha(*c.alpha);
    if (c.replays)
      o.replays(*c.replays);
    if (c.norm == "l2")
      return on_target<FreeATL2>(model, c, o);
    return on_target<FreeAT>(model, c, o);
  }
  if (method == "freelb") {
    FreeLBOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    if (c.alpha)
      o.alpha(*c.alpha);
    if (c.steps)
      o.steps(*c.steps);
    if (c.init_mag)
      o.init_mag(*c.init_mag);
    if (c.norm == "linf")
      return on_target<FreeLBLInf>(model, c, o);
    return on_target<FreeLB>(model, c, o);
  }
  if (method == "smart") {
    SMARTOptions o;
    if (c.alpha)
      o.alpha(*c.alpha);
    if (c.steps)
      o.steps(*c.steps);
    if (c.weight)
      o.weight(*c.weight);
    if (c.noise_var)
      o.noise_var(*c.noise_var);
    return on_target<SMART>(model, c, o);
  }
  if (method == "yopo") {
    YOPOOptions o;
    if (c.epsilon)
      o.epsilon(*c.epsilon);
    if (c.alpha)
      o.alpha(*c.alpha);
    if (c.steps)
      o.steps(*c.steps);
    if (c.inner_steps)
      o.inner_steps(*c.inner_steps);
    if (c.init_mag)
      o.init_mag(*c.init_mag);
    auto first = [&model, &current_ids](const torch::Tensor& e) {
      return model->first(e, current_ids);
    };
    return std::make_unique<YOPO>(model->embedding, first, o);
  }
  return nullptr; // plain
}

struct Outcome {
  std::string method;
  double clean = 0, robust = 0, seconds = 0, passes_per_step = 0;
  int64_t epochs = 0;
  std::vector<double> robust_at; // accuracy at each of --eval-epsilons
};

#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
#else
using Group = std::nullptr_t;
#endif

/// Averages gradients over the workers of `group` before each optimizer step
/// (nothing with one process).
struct Reducer {
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
  std::optional<advtrain::DataParallel> dp;
  Reducer(const Group& group, const std::vector<torch::Tensor>& params) {
    if (group) {
      dp.emplace(group, params);
    }
  }
  void attach(advtrain::Trainer& trainer) {
    if (dp) {
      dp->attach(trainer);
    }
  }
  void all_reduce() {
    if (dp) {
      dp->all_reduce_gradients();
    }
  }
#else
  Reducer(const Group&, const std::vector<torch::Tensor>&) {}
  void attach(advtrain::Trainer&) {}
  void all_reduce() {}
#endif
};

/// Trains a fresh model (initialized from the seed) with `method`. With
/// several workers each trains on its share of every batch.
Outcome train(
    const std::string& method,
    const Config& c,
    const Data& d,
    const Group& group) {
  torch::manual_seed(c.seed);
  Classifier model(d.vocab->size(), c.dim, d.classes, c.dropout);
  torch::optim::Adam optimizer(
      model->parameters(), torch::optim::AdamOptions(c.lr));
  torch::Tensor current_ids; // the batch in training, for YOPO's first layer
  auto attacker = make_attacker(method, model, c, current_ids);
  auto* yopo = dynamic_cast<advtrain::YOPO*>(attacker.get());
  std::optional<advtrain::Trainer> trainer;
  Reducer reducer(group, model->parameters());
  if (attacker) {
    trainer.emplace(optimizer, *attacker);
    reducer.attach(*trainer);
  }
  const size_t world = static_cast<size_t>(c.world_size);
  const size_t rank = static_cast<size_t>(std::max(0, c.rank));
  // FreeAT takes m optimizer steps per batch: m times fewer epochs.
  int64_t epochs = c.epochs;
  std::optional<int64_t> replays;
  if (auto* f = dynamic_cast<advtrain::FreeAT*>(attacker.get())) {
    replays = f->options().replays();
  } else if (auto* f2 = dynamic_cast<advtrain::FreeATL2*>(attacker.get())) {
    replays = f2->options().replays();
  }
  if (replays) {
    epochs = std::max<int64_t>(1, (c.epochs + *replays / 2) / *replays);
  }
  const Batch test = encode(d.tokens, d.sentences, d.test, *d.vocab, c.max_len);
  if (c.reports()) {
    fmt::print(
        "method: {} ({}), {} epochs, batch {}{}, Adam lr {}\n",
        method,
        method == "yopo" ? "activations" : c.target,
        epochs,
        c.batch_size,
        world > 1 ? fmt::format(" over {} processes", world) : "",
        c.lr);
  }

  Outcome o;
  o.method = method;
  o.epochs = epochs;
  std::vector<size_t> order = d.train;
  std::mt19937_64 rng(c.seed + 1);
  int64_t all_batches = 0, all_passes = 0;
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    const auto start = std::chrono::steady_clock::now();
    std::shuffle(order.begin(), order.end(), rng);
    model->train();
    double loss_sum = 0, adv_sum = 0, norm_sum = 0;
    int64_t batches = 0, passes = 0;
    const auto bs = static_cast<size_t>(c.batch_size);
    for (size_t i = 0; i < order.size(); i += bs) {
      std::vector<size_t> idx(
          order.begin() + i, order.begin() + std::min(order.size(), i + bs));
      if (world > 1) { // this worker's share; a batch too small is skipped
        if (idx.size() < world) {
          continue;
        }
        const size_t per = idx.size() / world;
        idx = std::vector<size_t>(
            idx.begin() + rank * per,
            rank + 1 == world ? idx.end() : idx.begin() + (rank + 1) * per);
      }
      const Batch b = encode(d.tokens, d.sentences, idx, *d.vocab, c.max_len);
      current_ids = b.ids;
      auto forward = [&] {
        if (yopo != nullptr) { // YOPO sees the split model
          return model->rest(yopo->first(model->embed(b.ids)));
        }
        return model->forward(b.ids);
      };
      auto loss_fn = [&](const torch::Tensor& logits) {
        return torch::nn::functional::cross_entropy(logits, b.labels);
      };
      if (trainer) {
        const auto r = trainer->step(forward, loss_fn);
        loss_sum += r.loss;
        adv_sum += r.adv_loss;
        norm_sum += r.perturbation_norm;
        passes += r.passes;
      } else {
        optimizer.zero_grad();
        const auto loss = loss_fn(forward());
        loss.backward();
        reducer.all_reduce();
        optimizer.step();
        loss_sum += loss.item<double>();
        passes += 1;
      }
      ++batches;
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    o.seconds += secs;
    all_batches += batches;
    all_passes += passes;
    if (!c.reports()) {
      continue;
    }
    fmt::print(
        "epoch {:>3}/{}  loss {:.4f}", epoch, epochs, loss_sum / batches);
    if (trainer) {
      fmt::print(
          "  adv loss {:.4f}  |delta| {:.3f}",
          adv_sum / batches,
          norm_sum / batches);
    }
    fmt::print(
        "  passes/step {:.1f}  test acc {:5.1f}%  ({:.2f} s)\n",
        static_cast<double>(passes) / batches,
        100 * accuracy(model, test),
        secs);
  }
  o.passes_per_step =
      static_cast<double>(all_passes) / std::max<int64_t>(1, all_batches);
  if (!c.reports()) {
    return o;
  }
  const char* split = c.validation ? "validation" : "test";
  o.clean = accuracy(model, test);
  o.robust = robust_accuracy(model, test, c.attack_epsilon, c.attack_steps);
  fmt::print(
      "result: method {}  clean {} accuracy {:.1f}%  accuracy under "
      "PGD (L2 eps {} per sentence, {} steps) {:.1f}%\n",
      method,
      split,
      100 * o.clean,
      c.attack_epsilon,
      c.attack_steps,
      100 * o.robust);
  std::vector<std::string> curve;
  for (const double eps : c.eval_epsilons) {
    // The attack is deterministic: the radii already measured are reused.
    o.robust_at.push_back(
        eps == 0 ? o.clean
        : eps == c.attack_epsilon
            ? o.robust
            : robust_accuracy(model, test, eps, c.attack_steps));
    curve.push_back(fmt::format("{}: {:.1f}%", eps, 100 * o.robust_at.back()));
  }
  fmt::print(
      "result: method {}  {} accuracy by PGD radius  {}\n",
      method,
      split,
      fmt::join(curve, "  "));
  return o;
}

/// Appends one row per outcome to `path` (with a header line if the file is
/// new or empty).
void write_csv(
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
    out << ",epoch_seconds,passes_per_step\n";
  }
  for (const auto& o : outcomes) {
    out << c.dataset << ',' << (c.validation ? "validation" : "test") << ','
        << o.method << ',' << (o.method == "yopo" ? "activations" : c.target)
        << ",\"" << (o.method == "plain" ? "" : c.options()) << "\"," << c.seed
        << ',' << o.epochs << ',' << fmt::format("{:.4f}", o.clean);
    for (const double a : o.robust_at) {
      out << ',' << fmt::format("{:.4f}", a);
    }
    out << ','
        << fmt::format("{:.3f}", o.seconds / std::max<int64_t>(1, o.epochs))
        << ',' << fmt::format("{:.2f}", o.passes_per_step) << '\n';
  }
  if (!out) {
    throw std::runtime_error("cannot write '" + path + "'");
  }
}

/// Starts this program once per rank (same arguments, plus --rank and
/// --store) and waits for all; non-zero if any worker failed.
int launch_workers(int argc, char** argv, const Config& c) {
  const std::string store =
      (std::filesystem::temp_directory_path() /
       fmt::format("text_classifier_store_{}", ::getpid()))
          .string();
  std::filesystem::remove(store);
  std::vector<pid_t> pids;
  for (int r = 0; r < c.world_size; ++r) {
    std::vector<std::string> args(argv, argv + argc);
    args.insert(args.end(), {"--rank", std::to_string(r), "--store", store});
    std::vector<char*> cargs;
    for (auto& a : args) {
      cargs.push_back(a.data());
    }
    cargs.push_back(nullptr);
    pid_t pid = 0;
    if (::posix_spawn(
            &pid, "/proc/self/exe", nullptr, nullptr, cargs.data(), environ) !=
        0) {
      throw std::runtime_error("cannot start worker " + std::to_string(r));
    }
    pids.push_back(pid);
  }
  int failed = 0;
  for (const pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::filesystem::remove(store);
  if (failed > 0) {
    fmt::print(
        stderr, "error: {} of {} workers failed\n", failed, c.world_size);
    return 1;
  }
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{
      "Train a text classifier with advtrain and report clean accuracy and "
      "accuracy under a PGD attack on the embeddings."};
  Config c;
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
         "all, or one of: plain fgsm fgm pgd freeat freelb smart yopo")
      ->check(CLI::IsMember(std::vector<std::string>{
          "all",
          "plain",
          "fgsm",
          "fgm",
          "pgd",
          "freeat",
          "freelb",
          "smart",
          "yopo"}))
      ->capture_default_str();
  app.add_option(
         "--target",
         c.target,
         "weights: perturb the embedding table (any model); "
         "activations: each example's embedded tokens (YOPO: always)")
      ->check(CLI::IsMember({"weights", "activations"}))
      ->capture_default_str();
  app.add_option(
         "--epochs", c.epochs, "epochs (FreeAT: divided by its replays)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option(
      "--epsilon", c.epsilon, "radius: fgsm fgm pgd freeat freelb yopo");
  app.add_option(
      "--alpha", c.alpha, "ascent step: pgd freeat freelb smart yopo");
  app.add_option("--steps", c.steps, "steps: pgd freelb smart yopo (m)");
  app.add_option("--inner-steps", c.inner_steps, "YOPO's inner steps n");
  app.add_option(
      "--init-mag", c.init_mag, "random start: freelb yopo (activations)");
  app.add_option("--replays", c.replays, "FreeAT's replays m");
  app.add_option(
         "--norm",
         c.norm,
         "the ball of pgd and freelb (default l2) and freeat (default linf)")
      ->check(CLI::IsMember({"l2", "linf"}));
  app.add_option("--weight", c.weight, "SMART's regularizer weight");
  app.add_option("--noise-var", c.noise_var, "SMART's noise scale");
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
  CLI11_PARSE(app, argc, argv);

  Group group;
  if (c.world_size > 1) {
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
    if (c.rank < 0) {
      return launch_workers(argc, argv, c);
    }
    if (c.rank >= c.world_size || c.store.empty()) {
      throw std::runtime_error(
          "--rank must be below --world-size, with --store set");
    }
    group = advtrain::make_gloo_group(
        c10::make_intrusive<c10d::FileStore>(c.store, c.world_size),
        c.rank,
        c.world_size);
#else
    throw std::runtime_error(
        "--world-size needs a LibTorch built with c10d Gloo");
#endif
  }
  torch::set_num_threads(static_cast<int>(c.threads));
  const Data d = load(c);
  std::vector<std::string> methods = {c.method};
  if (c.method == "all") {
    methods = kMethods;
  }
  std::vector<Outcome> outcomes;
  for (const auto& m : methods) {
    outcomes.push_back(train(m, c, d, group));
  }
  if (!c.reports()) {
    return 0;
  }
  if (!c.csv.empty()) {
    write_csv(c.csv, c, outcomes);
  }
  if (outcomes.size() > 1) {
    fmt::print(
        "\n{:<8} {:>10} {:>14} {:>12} {:>10}\n",
        "method",
        "clean acc",
        "acc under PGD",
        "passes/step",
        "train s");
    for (const auto& o : outcomes) {
      fmt::print(
          "{:<8} {:>9.1f}% {:>13.1f}% {:>12.1f} {:>10.2f}\n",
          o.method,
          100 * o.clean,
          100 * o.robust,
          o.passes_per_step,
          o.seconds);
    }
    fmt::print(
        "(PGD attack: L2 radius {} per embedded sentence, {} steps)\n",
        c.attack_epsilon,
        c.attack_steps);
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
