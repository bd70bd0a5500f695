// advtrain_bench: the cost of each method against a plain step and against
// its floor (the same forward+backward passes written by hand, no library),
// the attacker's memory, and (--sweep) how both grow with the vocabulary.
// Timings are medians over interleaved repeats after warm-up; read the
// ratios, not the absolute times.

#include <advtrain/advtrain.h>

#include <fmt/core.h>
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <sys/resource.h>

// Cachegrind's client requests (valgrind >= 3.22) let one process count its
// steps alone: --count-from turns the counting on after the warm-up steps.
#if __has_include(<valgrind/cachegrind.h>)
#include <valgrind/cachegrind.h>
#if defined(CACHEGRIND_START_INSTRUMENTATION)
#define ADVTRAIN_BENCH_CACHEGRIND 1
#endif
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace F = torch::nn::functional;
using torch::Tensor;

struct Shape {
  int64_t vocab = 30000, hidden = 256, batch = 32, length = 64;
  bool encoder = true; // a transformer encoder layer between lookup and pool
  bool sparse = false; // the table's gradient is sparse
  std::string optimizer = "adam"; // adam, sgd or adagrad
};

/// Embedding -> (transformer encoder layer) -> mean over tokens -> tanh ->
/// linear. The lookup is a `PerturbedEmbedding` (a plain `nn::Embedding`
/// until an attacker attaches to it), so the per-example strategies run on
/// the same model as the table ones.
struct BenchNetImpl : torch::nn::Module {
  explicit BenchNetImpl(const Shape& s)
      : emb(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(s.vocab, s.hidden)
                    .sparse(s.sparse)))),
        out(register_module("out", torch::nn::Linear(s.hidden, 2))) {
    if (s.encoder) {
      enc = register_module(
          "encoder",
          torch::nn::TransformerEncoderLayer(
              torch::nn::TransformerEncoderLayerOptions(s.hidden, 4)
                  .dim_feedforward(4 * s.hidden)
                  .dropout(0.1)));
    }
  }
  /// Everything between the lookup and the output layer (YOPO's first
  /// layer).
  Tensor body(const Tensor& e) {
    Tensor h = e;
    if (!enc.is_empty()) {
      h = enc(h.transpose(0, 1)).transpose(0, 1);
    }
    return torch::tanh(h.mean(1));
  }
  /// The output at embedded tokens `e` [B, L, H].
  Tensor head(const Tensor& e) {
    return out(first ? first(e) : body(e));
  }
  Tensor forward(const Tensor& ids) {
    return head(emb(ids));
  }
  advtrain::PerturbedEmbedding emb;
  torch::nn::TransformerEncoderLayer enc{nullptr};
  torch::nn::Linear out;
  /// Replaces `body` in the forward when set (YOPO's `first`).
  std::function<Tensor(const Tensor&)> first;
};
TORCH_MODULE(BenchNet);

/// One way of running a training step.
struct Runner {
  std::string name;
  std::function<void()> step;
  std::vector<double> ms;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// A model, its optimizer and one batch.
struct Setup {
  BenchNet model{nullptr};
  std::unique_ptr<torch::optim::Optimizer> opt;
  Tensor x, y;
  Setup(const Shape& s, torch::Device device, uint64_t seed) {
    torch::manual_seed(seed); // every runner starts from the same weights
    model = BenchNet(s);
    model->to(device);
    if (s.optimizer == "sgd") {
      opt = std::make_unique<torch::optim::SGD>(
          model->parameters(), torch::optim::SGDOptions(1e-2));
    } else if (s.optimizer == "adagrad") {
      opt = std::make_unique<torch::optim::Adagrad>(
          model->parameters(), torch::optim::AdagradOptions(1e-2));
    } else {
      opt = std::make_unique<torch::optim::Adam>(
          model->parameters(), torch::optim::AdamOptions(1e-4));
    }
    x = torch::randint(
        s.vocab,
        {s.batch, s.length},
        torch::dtype(torch::kLong).device(device));
    y = torch::randint(2, {s.batch}, torch::dtype(torch::kLong).device(device));
  }
  Tensor loss() {
    return F::cross_entropy(model->forward(x), y);
  }
  /// The plain lookup (no perturbation slot involved).
  Tensor lookup() {
    return model->emb->torch::nn::EmbeddingImpl::forward(x);
  }
  Tensor& table() {
    return model->emb->weight;
  }
  /// Drops every gradient (as `Trainer` does: the next backward writes a
  /// fresh one instead of adding to zeros; LibTorch 1.13's `zero_grad()`
  /// fills them with zeros).
  void clear() {
    for (auto& p : model->parameters()) {
      p.mutable_grad() = Tensor();
    }
  }
  /// `passes` forward+backward passes of loss * scale, then one optimizer
  /// step; nothing else.
  void passes(int passes, double scale = 1.0) {
    clear();
    for (int p = 0; p < passes; ++p) {
      (loss() * scale).backward();
    }
    opt->step();
  }
};

// The methods written by hand, densely, as a user writes them without the
// library: the whole table cloned for its backup, norms over whole tensors,
// the same passes and options (each strategy's defaults) as the library.
namespace hand {

/// ‖g‖ on the host, 0 when not finite (the classes' `norm != 0 and not
/// isnan` guard).
double usable_norm(const Tensor& g) {
  const double n = g.norm().item<double>();
  return std::isfinite(n) ? n : 0.0;
}

/// Per example: g / ‖g‖ over each example's [L, H].
Tensor per_example_unit(const Tensor& g, double floor = 1e-12) {
  return g / (g.flatten(1).norm(2, {1}, true).unsqueeze(-1) + floor);
}

/// FGSM (ε = 0.01) and FGM (ε = 1): clean pass, move, adversarial pass,
/// restore, step.
void single(Setup& s, bool sign) {
  s.clear();
  s.loss().backward();
  Tensor w = s.table().detach();
  const Tensor backup = w.clone();
  {
    torch::NoGradGuard no_grad;
    const Tensor& g = s.table().grad();
    if (sign) {
      w.add_(g.sign(), 0.01);
    } else if (const double n = usable_norm(g); n > 0) {
      w.add_(g, 1.0 / n);
    }
  }
  s.loss().backward();
  w.copy_(backup);
  s.opt->step();
}

/// PGD, K = 3, α = 0.3, ε = 1, as the widely copied class and its loop.
void pgd(Setup& s) {
  s.clear();
  s.loss().backward();
  const auto params = s.model->parameters();
  std::vector<Tensor> grads;
  for (const auto& p : params) {
    grads.push_back(p.grad().clone());
  }
  Tensor w = s.table().detach();
  const Tensor backup = w.clone();
  for (int t = 0; t < 3; ++t) {
    {
      torch::NoGradGuard no_grad;
      if (const double n = usable_norm(s.table().grad()); n > 0) {
        w.add_(s.table().grad(), 0.3 / n);
        const Tensor r = w - backup;
        const double rn = r.norm().item<double>();
        if (rn > 1.0) { // onto the ball of radius ε = 1
          w.copy_(backup + r * (1.0 / rn));
        }
      }
    }
    if (t != 2) {
      s.clear();
    } else {
      for (size_t k = 0; k < params.size(); ++k) {
        params[k].mutable_grad() = grads[k];
      }
    }
    s.loss().backward();
  }
  w.copy_(backup);
  s.opt->step();
}

/// FreeAT, m = 4 replays, ε = α = 0.01 (L∞), δ kept across batches.
void freeat(Setup& s, Tensor& delta) {
  Tensor w = s.table().detach();
  if (!delta.defined()) {
    delta = torch::zeros_like(w);
  }
  for (int j = 0; j < 4; ++j) {
    const Tensor backup = w.clone();
    w.add_(delta);
    s.clear();
    s.loss().backward();
    {
      torch::NoGradGuard no_grad;
      delta.add_(s.table().grad().sign(), 0.01).clamp_(-0.01, 0.01);
    }
    w.copy_(backup);
    s.opt->step();
  }
}

/// FreeLB on the table, K = 3, α = 0.1, unbounded: each ascent step moves
/// along that pass's table gradient; the parameter gradients add up.
void freelb(Setup& s) {
  s.clear();
  Tensor w = s.table().detach();
  const Tensor backup = w.clone();
  for (int t = 1; t <= 3; ++t) {
    Tensor earlier;
    if (t < 3) {
      earlier = s.table().grad();
      s.table().mutable_grad() = Tensor();
    }
    (s.loss() * (1.0 / 3)).backward();
    if (t < 3) {
      torch::NoGradGuard no_grad;
      const Tensor g = s.table().grad();
      if (const double n = usable_norm(g); n > 0) {
        w.add_(g, 0.1 / n);
      }
      if (earlier.defined()) {
        s.table().mutable_grad() = earlier + g;
      }
    }
  }
  w.copy_(backup);
  s.opt->step();
}

/// AWP on every parameter named "weight", α = 1, ε = 1e-4, one step, as the
/// widely copied class and its loop.
void awp(Setup& s) {
  s.clear();
  s.loss().backward();
  std::vector<Tensor> ws, backups;
  for (const auto& item : s.model->named_parameters()) {
    if (item.key().find("weight") != std::string::npos) {
      ws.push_back(item.value());
      backups.push_back(item.value().detach().clone());
    }
  }
  {
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < ws.size(); ++k) {
      Tensor w = ws[k].detach();
      const double gn = usable_norm(ws[k].grad());
      if (gn > 0) {
        const double wn = w.norm().item<double>();
        w.add_(ws[k].grad(), (wn + 1e-6) / (gn + 1e-6));
        const Tensor box = backups[k].abs() * 1e-4;
        w.copy_(torch::min(torch::max(w, backups[k] - box), backups[k] + box));
      }
    }
  }
  s.clear();
  s.loss().backward();
  for (size_t k = 0; k < ws.size(); ++k) {
    ws[k].detach().copy_(backups[k]);
  }
  s.opt->step();
}

/// SMART per example, K = 1, α = 1e-3, noise N(0, 1)·1e-5, weight 1 (as
/// mt-dnn's `SmartPerturbation`: δ ← δ + α·g, each token's vector divided by
/// its max-abs value + 1e-6).
void smart(Setup& s) {
  s.clear();
  const Tensor e = s.lookup();
  const Tensor logits = s.model->head(e);
  Tensor noise = (torch::randn_like(e) * 1e-5).requires_grad_();
  const Tensor adv = advtrain::stable_kl(
      s.model->head(e.detach() + noise), logits.detach(), false);
  const Tensor g = torch::autograd::grad({adv}, {noise})[0];
  {
    torch::NoGradGuard no_grad;
    noise = noise.detach() + g * 1e-3;
    noise = noise / (noise.abs().amax(-1, true) + 1e-6);
  }
  const Tensor loss = F::cross_entropy(logits, s.y) +
                      advtrain::sym_kl(s.model->head(e + noise), logits);
  loss.backward();
  s.opt->step();
}

/// VAT per example, ε = 5, ξ = 0.1, one power iteration, weight 1.
void vat(Setup& s) {
  s.clear();
  const Tensor e = s.lookup();
  const Tensor logits = s.model->head(e);
  Tensor d = (per_example_unit(torch::randn_like(e)) * 0.1).requires_grad_();
  const Tensor kl =
      advtrain::kl(logits.detach(), s.model->head(e.detach() + d));
  const Tensor g = torch::autograd::grad({kl}, {d})[0];
  const Tensor r = per_example_unit(g.detach()) * 5.0;
  const Tensor loss = F::cross_entropy(logits, s.y) +
                      advtrain::kl(logits.detach(), s.model->head(e + r));
  loss.backward();
  s.opt->step();
}

/// R3F per example, uniform noise σ = 1e-5, weight 1.
void r3f(Setup& s) {
  s.clear();
  const Tensor e = s.lookup();
  const Tensor logits = s.model->head(e);
  const Tensor noise = torch::empty_like(e).uniform_(-1e-5, 1e-5);
  const Tensor loss =
      F::cross_entropy(logits, s.y) +
      advtrain::symmetric_kl(s.model->head(e.detach() + noise), logits);
  loss.backward();
  s.opt->step();
}

} // namespace hand

std::unique_ptr<advtrain::Attacker> make(const std::string& m, BenchNet& net) {
  using namespace advtrain;
  if (m == "fgsm")
    return std::make_unique<FGSM>(*net, "embedding");
  if (m == "fgm")
    return std::make_unique<FGM>(*net, "embedding");
  if (m == "pgd")
    return std::make_unique<PGD>(*net, "embedding");
  if (m == "freeat")
    return std::make_unique<FreeAT>(*net, "embedding");
  if (m == "freelb")
    return std::make_unique<FreeLB>(*net, "embedding");
  if (m == "awp")
    return std::make_unique<AWP>(*net, "weight");
  if (m == "smart")
    return std::make_unique<SMART>(net->emb);
  if (m == "vat")
    return std::make_unique<VAT>(net->emb);
  if (m == "r3f")
    return std::make_unique<R3F>(net->emb);
  if (m == "llr")
    return std::make_unique<LLR>(net->emb);
  if (m == "yopo") {
    BenchNetImpl* raw = net.get();
    auto y = std::make_unique<YOPO>(
        net->emb, [raw](const Tensor& e) { return raw->body(e); });
    YOPO* yp = y.get();
    net->first = [yp](const Tensor& e) { return yp->first(e); };
    return y;
  }
  throw std::invalid_argument("unknown method " + m);
}

/// A method's floor: what it costs written by hand (`written`: the whole
/// method, densely; otherwise its forward and backward passes alone, a
/// lower bound).
struct MethodFloor {
  int passes;
  bool written;
  std::function<void(Setup&)> run;
};
const std::map<std::string, MethodFloor>& floors() {
  static const std::map<std::string, MethodFloor> f = {
      {"fgsm", {2, true, [](Setup& s) { hand::single(s, true); }}},
      {"fgm", {2, true, [](Setup& s) { hand::single(s, false); }}},
      {"pgd", {4, true, hand::pgd}},
      {"freeat",
       {4,
        true,
        [](Setup& s) {
          static Tensor delta; // kept across batches, as FreeAT's
          hand::freeat(s, delta);
        }}},
      {"freelb", {3, true, hand::freelb}},
      {"awp", {2, true, hand::awp}},
      {"smart", {3, true, hand::smart}},
      {"vat", {3, true, hand::vat}},
      {"r3f", {2, true, hand::r3f}},
      // LLR's search differentiates through a gradient, YOPO's inner steps
      // run the first layer alone: their passes by hand are a lower bound.
      {"llr", {3, false, [](Setup& s) { s.passes(3); }}},
      {"yopo", {3, false, [](Setup& s) { s.passes(3); }}},
  };
  return f;
}

/// The library in the user's own loop (the README's "In your own loop"),
/// for the methods the widely copied classes cover.
std::function<void()> own_loop(
    const std::string& m, Setup& s, advtrain::Attacker& attacker) {
  // The own loops are those of FGSM, FGM and PGD, which search.
  auto& a = dynamic_cast<advtrain::SearchAttacker&>(attacker);
  if (m == "fgm" || m == "fgsm") {
    return [&s, &a] {
      s.clear();
      s.loss().backward();
      a.attack();
      s.loss().backward();
      a.restore();
      s.opt->step();
    };
  }
  if (m == "pgd") {
    return [&s, &a] {
      s.clear();
      s.loss().backward();
      a.backup_grad();
      for (int t = 0; t < 3; ++t) {
        a.attack(t == 0);
        if (t != 2) {
          s.clear();
        } else {
          a.restore_grad();
        }
        s.loss().backward();
      }
      a.restore();
      s.opt->step();
    };
  }
  return {};
}

/// The library's `Trainer::step` on `s`.
std::function<void()> trainer_step(Setup& s, advtrain::Trainer& t) {
  return [&s, &t] {
    t.step(
        [&s] { return s.model->forward(s.x); },
        [&s](const Tensor& out) { return F::cross_entropy(out, s.y); });
  };
}

/// The methods the bench runs: those with a floor (every method has one).
const std::vector<std::string>& all_methods() {
  static const std::vector<std::string> m = [] {
    std::vector<std::string> names;
    for (const auto& entry : floors()) {
      names.push_back(entry.first);
    }
    return names;
  }();
  return m;
}

/// Runs one runner alone for `steps` steps (under valgrind: the difference
/// of two step counts is the instructions of those steps; or, where
/// `count_from` >= 0, cachegrind started with --instr-at-start=no counts the
/// steps from `count_from` on alone). Names: "plain", METHOD
/// (`Trainer::step`), METHOD_floor, METHOD_own.
void run_alone(
    const Shape& shape,
    torch::Device device,
    const std::string& name,
    int steps,
    int count_from,
    const std::function<void()>& sync) {
  Setup s(shape, device, 1);
  std::unique_ptr<advtrain::Attacker> attacker;
  std::unique_ptr<advtrain::Trainer> trainer;
  std::function<void()> step;
  const auto cut = name.rfind('_');
  const std::string method =
      cut == std::string::npos ? name : name.substr(0, cut);
  const std::string kind = cut == std::string::npos ? "" : name.substr(cut + 1);
  if (name == "plain") {
    step = [&s] { s.passes(1); };
  } else if (kind == "floor" && floors().count(method) != 0) {
    const auto& fl = floors().at(method);
    step = [&s, &fl] { fl.run(s); };
  } else if (kind.empty() || kind == "own") {
    attacker = make(method, s.model);
    if (kind.empty()) {
      trainer = std::make_unique<advtrain::Trainer>(*s.opt, *attacker);
      step = trainer_step(s, *trainer);
    } else {
      step = own_loop(method, s, *attacker);
    }
  }
  if (!step) {
    throw std::invalid_argument("unknown runner " + name);
  }
  std::vector<double> ms;
  for (int k = 0; k < steps; ++k) {
#ifdef ADVTRAIN_BENCH_CACHEGRIND
    if (k == count_from) {
      CACHEGRIND_START_INSTRUMENTATION;
    }
#endif
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    step();
    sync();
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - t0)
                     .count());
  }
#ifdef ADVTRAIN_BENCH_CACHEGRIND
  if (count_from >= 0) {
    CACHEGRIND_STOP_INSTRUMENTATION;
  }
#else
  (void)count_from; // main() refuses --count-from without client requests
#endif
  // Steps after the first two (first touches of pages and optimizer state).
  const std::vector<double> warm(
      ms.begin() + std::min<size_t>(2, ms.size()), ms.end());
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  fmt::print(
      "ran {} x {}: median step {:.2f} ms (steps 3-), peak RSS {:.1f} MiB, "
      "attacker peak {:.2f} MiB\n",
      name,
      steps,
      median(warm),
      static_cast<double>(usage.ru_maxrss) / 1024.0,
      attacker
          ? static_cast<double>(attacker->peak_held_bytes()) / (1024.0 * 1024.0)
          : 0.0);
}

void time_round(
    std::vector<Runner>& runners,
    int repeats,
    int warmup,
    const std::function<void()>& sync) {
  for (int r = -warmup; r < repeats; ++r) {
    for (auto& run : runners) {
      sync();
      const auto t0 = std::chrono::steady_clock::now();
      run.step();
      sync();
      const auto t1 = std::chrono::steady_clock::now();
      if (r >= 0) {
        run.ms.push_back(
            std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
    }
  }
}

double mib(int64_t bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

void methods_table(
    const Shape& shape,
    torch::Device device,
    const std::vector<std::string>& methods,
    int repeats,
    int warmup,
    const std::function<void()>& sync,
    bool raw) {
  // Each runner trains its own copy of the same model.
  Setup plain(shape, device, 1);
  std::vector<Runner> runners;
  runners.push_back({"plain", [&] { plain.passes(1); }, {}});
  std::vector<std::unique_ptr<Setup>> setups;
  std::vector<std::unique_ptr<advtrain::Attacker>> attackers;
  std::vector<std::unique_ptr<advtrain::Trainer>> trainers;
  for (const auto& m : methods) {
    setups.push_back(std::make_unique<Setup>(shape, device, 1));
    Setup* fs = setups.back().get();
    const auto& fl = floors().at(m);
    runners.push_back({m + "_floor", [fs, &fl] { fl.run(*fs); }, {}});
    setups.push_back(std::make_unique<Setup>(shape, device, 1));
    Setup* ls = setups.back().get();
    attackers.push_back(make(m, ls->model));
    trainers.push_back(
        std::make_unique<advtrain::Trainer>(*ls->opt, *attackers.back()));
    runners.push_back({m, trainer_step(*ls, *trainers.back()), {}});
  }
  time_round(runners, repeats, warmup, sync);

  // The library's own work, alone: attack() and restore() on a real
  // gradient of the model (PGD: its K attacks), repeated; on the table
  // (per example, δ exists only inside a step).
  std::vector<double> own_ms(methods.size(), -1.0);
  for (size_t k = 0; k < methods.size(); ++k) {
    auto* searching =
        dynamic_cast<advtrain::SearchAttacker*>(attackers[k].get());
    if (attackers[k]->per_example() || searching == nullptr) {
      continue;
    }
    Setup& s = *setups[2 * k + 1];
    auto& a = *searching;
    s.opt->zero_grad();
    s.loss().backward();
    const int attacks = methods[k] == "pgd" ? 3 : 1;
    std::vector<double> ms;
    for (int r = -warmup; r < repeats; ++r) {
      sync();
      const auto t0 = std::chrono::steady_clock::now();
      for (int t = 0; t < attacks; ++t) {
        a.attack();
      }
      a.restore();
      sync();
      const auto t1 = std::chrono::steady_clock::now();
      if (r >= 0) {
        ms.push_back(
            std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
    }
    own_ms[k] = median(ms);
  }

  const double base = median(runners[0].ms);
  const double table = mib(shape.vocab * shape.hidden * 4);
  fmt::print(
      "\nV = {}, H = {}, batch {} x {}, {}{}, {} repeats (median), plain "
      "step {:.1f} ms\n",
      shape.vocab,
      shape.hidden,
      shape.batch,
      shape.length,
      shape.encoder ? "transformer encoder layer, " : "",
      shape.optimizer,
      repeats,
      base);
  fmt::print(
      "{:<8} {:>6} {:>8} {:>8} {:>16} {:>15} {:>13} {:>10}\n",
      "method",
      "passes",
      "floor",
      "library",
      "lib-floor/plain",
      "attack+restore",
      "attacker MiB",
      "table MiB");
  for (size_t k = 0; k < methods.size(); ++k) {
    const double fl = median(runners[1 + 2 * k].ms) / base;
    const double lib = median(runners[2 + 2 * k].ms) / base;
    fmt::print(
        "{:<8} {:>6} {:>7.2f}x {:>7.2f}x {:>15.1f}% {:>14.1f}% "
        "{:>13.2f} {:>10.1f}\n",
        methods[k],
        floors().at(methods[k]).passes,
        fl,
        lib,
        100.0 * (lib - fl),
        own_ms[k] < 0 ? std::nan("") : 100.0 * own_ms[k] / base,
        mib(attackers[k]->peak_held_bytes()),
        table);
  }
  fmt::print(
      "(floor: the method written by hand, densely (LLR, YOPO: its passes "
      "alone); lib-floor and attack+restore as % of a plain step; "
      "attack+restore on the table only)\n");
  if (raw) {
    for (const auto& run : runners) {
      fmt::print("ms {} {:.3f}\n", run.name, median(run.ms));
    }
  }
}

void vocab_sweep(
    torch::Device device,
    int repeats,
    int warmup,
    const std::function<void()>& sync) {
  fmt::print(
      "\nVocabulary sweep (embedding -> mean -> linear, batch 32 x 64, "
      "Adam): FGM against a plain step\n");
  fmt::print(
      "{:>8} {:>5} {:>10} {:>10} {:>10} {:>14} {:>14} {:>8}\n",
      "V",
      "H",
      "plain ms",
      "FGM ms",
      "FGM/plain",
      "attacker MiB",
      "table MiB",
      "ratio");
  for (const auto& vh : std::vector<std::pair<int64_t, int64_t>>{
           {1000, 256}, {30000, 256}, {250000, 768}}) {
    Shape s;
    s.vocab = vh.first;
    s.hidden = vh.second;
    s.encoder = false;
    Setup plain(s, device, 2), lib(s, device, 2);
    advtrain::FGM fgm(*lib.model, "embedding");
    advtrain::Trainer trainer(*lib.opt, fgm);
    std::vector<Runner> runners = {
        {"plain", [&] { plain.passes(1); }, {}},
        {"fgm",
         [&] {
           trainer.step(
               [&] { return lib.model->forward(lib.x); },
               [&](const torch::Tensor& out) {
                 return F::cross_entropy(out, lib.y);
               });
         },
         {}}};
    time_round(runners, repeats, warmup, sync);
    const double p = median(runners[0].ms), f = median(runners[1].ms);
    const double table = mib(s.vocab * s.hidden * 4);
    const double held = mib(fgm.peak_held_bytes());
    fmt::print(
        "{:>8} {:>5} {:>10.1f} {:>10.1f} {:>9.2f}x {:>14.2f} {:>14.1f} "
        "{:>7.4f}\n",
        s.vocab,
        s.hidden,
        p,
        f,
        f / p,
        held,
        table,
        held / table);
  }
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "advtrain benchmark: each method against a plain step and "
      "against its floor"};
  Shape shape;
  std::string device_name = "cpu";
  std::vector<std::string> methods = all_methods();
  std::string runner;
  int repeats = 15, warmup = 3, threads = 2, steps = 0, count_from = -1;
  bool sweep = false, no_table = false, raw = false, bag = false;
  app.add_option("--vocab", shape.vocab)->capture_default_str();
  app.add_option("--hidden", shape.hidden)->capture_default_str();
  app.add_option("--batch", shape.batch)->capture_default_str();
  app.add_option("--length", shape.length)->capture_default_str();
  app.add_option("--methods", methods, "comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  app.add_option("--warmup", warmup)->capture_default_str();
  app.add_option("--threads", threads, "LibTorch intra-op threads")
      ->capture_default_str();
  app.add_option("--device", device_name, "cpu or cuda")->capture_default_str();
  app.add_flag("--sweep", sweep, "also the vocabulary sweep");
  app.add_flag("--no-table", no_table, "skip the per-method table");
  app.add_flag("--raw", raw, "also print 'ms NAME MEDIAN' per runner");
  bool list_methods = false;
  app.add_flag(
      "--list-methods", list_methods, "print the methods, comma-separated");
  app.add_flag(
      "--bag", bag, "no encoder layer: embedding -> mean -> tanh -> linear");
  app.add_option(
         "--runner",
         runner,
         "run this runner alone for --steps steps, untimed (for valgrind): "
         "plain, METHOD (Trainer::step), METHOD_floor (by hand), METHOD_own "
         "(own loop: fgsm, fgm, pgd)")
      ->needs(app.add_option("--steps", steps, "steps of --runner")
                  ->check(CLI::NonNegativeNumber));
  app.add_option(
         "--count-from",
         count_from,
         "under valgrind --tool=cachegrind --instr-at-start=no: count the "
         "steps of --runner from this one (0-based) on")
      ->check(CLI::NonNegativeNumber)
      ->needs("--runner");
  app.add_flag("--sparse", shape.sparse, "sparse table gradients");
  app.add_option("--optimizer", shape.optimizer)
      ->check(CLI::IsMember({"adam", "sgd", "adagrad"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  shape.encoder = !bag;
  if (list_methods) {
    std::string list;
    for (const auto& m : all_methods()) {
      list += (list.empty() ? "" : ",") + m;
    }
    fmt::print("{}\n", list);
    return 0;
  }
#ifndef ADVTRAIN_BENCH_CACHEGRIND
  if (count_from >= 0) {
    fmt::print(
        stderr,
        "error: --count-from needs a bench built with valgrind >= 3.22's "
        "<valgrind/cachegrind.h>\n");
    return 3;
  }
#endif
  if (count_from >= steps && count_from >= 0) {
    fmt::print(
        stderr,
        "error: --count-from {} counts nothing in {} steps\n",
        count_from,
        steps);
    return 1;
  }
  if (shape.sparse && shape.optimizer == "adam") {
    fmt::print(
        stderr,
        "error: --sparse needs --optimizer sgd or adagrad (Adam takes no "
        "sparse gradients)\n");
    return 1;
  }
  for (const auto& m : methods) {
    if (std::find(all_methods().begin(), all_methods().end(), m) ==
        all_methods().end()) {
      fmt::print(stderr, "error: unknown method {}\n", m);
      return 1;
    }
  }

  try {
    torch::set_num_threads(threads);
    const torch::Device device(device_name);
    std::function<void()> sync = [] {};
    if (device.is_cuda()) {
      // A cheap host read waits for the queued kernels.
      sync = [device] {
        torch::zeros({1}, torch::TensorOptions().device(device)).item<float>();
      };
    }
    if (!runner.empty()) {
      run_alone(shape, device, runner, steps, count_from, sync);
      return 0;
    }
    const char* tunables = std::getenv("GLIBC_TUNABLES");
    fmt::print(
        "advtrain {}.{}.{} bench: device {}, {} threads, "
        "GLIBC_TUNABLES={}\n",
        ADVTRAIN_VERSION_MAJOR,
        ADVTRAIN_VERSION_MINOR,
        ADVTRAIN_VERSION_PATCH,
        device.str(),
        threads,
        tunables != nullptr ? tunables : "(unset)");
    if (!no_table) {
      methods_table(shape, device, methods, repeats, warmup, sync, raw);
    }
    if (sweep) {
      vocab_sweep(device, std::max(3, repeats / 3), warmup, sync);
    }
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
