// advtrain_bench: the cost of each method against a plain step and against
// its floor (the same forward+backward passes written by hand, no library),
// the attacker's memory, and (--sweep) how both grow with the vocabulary.
// Timings are medians over interleaved repeats after warm-up; read the
// ratios, not the absolute times.

#include <advtrain/advtrain.h>

#include <fmt/core.h>
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace F = torch::nn::functional;

struct Shape {
  int64_t vocab = 30000, hidden = 256, batch = 32, length = 64;
  bool encoder = true; // a transformer encoder layer between lookup and head
};

/// Embedding -> (transformer encoder layer) -> mean over tokens -> linear.
struct BenchNetImpl : torch::nn::Module {
  explicit BenchNetImpl(const Shape& s)
      : emb(register_module(
            "embedding", torch::nn::Embedding(s.vocab, s.hidden))),
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
  torch::Tensor forward(const torch::Tensor& ids) {
    auto h = emb(ids); // [B, L, H]
    if (!enc.is_empty()) {
      h = enc(h.transpose(0, 1)).transpose(0, 1);
    }
    return out(h.mean(1));
  }
  torch::nn::Embedding emb;
  torch::nn::TransformerEncoderLayer enc{nullptr};
  torch::nn::Linear out;
};
TORCH_MODULE(BenchNet);

/// One way of running a training step, timed as a whole.
struct Runner {
  std::string name;
  std::function<void()> step;
  std::vector<double> ms;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Setup {
  BenchNet model;
  std::unique_ptr<torch::optim::Adam> opt;
  torch::Tensor x, y;
  Setup(const Shape& s, torch::Device device, uint64_t seed) : model(s) {
    torch::manual_seed(seed);
    model->to(device);
    opt = std::make_unique<torch::optim::Adam>(
        model->parameters(), torch::optim::AdamOptions(1e-4));
    x = torch::randint(
        s.vocab,
        {s.batch, s.length},
        torch::dtype(torch::kLong).device(device));
    y = torch::randint(2, {s.batch}, torch::dtype(torch::kLong).device(device));
  }
  torch::Tensor loss() {
    return F::cross_entropy(model->forward(x), y);
  }
  /// The hand-written floor: `passes` forward+backward passes of loss *
  /// scale, then one optimizer step; nothing else.
  void floor(int passes, double scale = 1.0) {
    opt->zero_grad();
    for (int p = 0; p < passes; ++p) {
      (loss() * scale).backward();
    }
    opt->step();
  }
  /// SMART's floor: its forwards and its ascent gradient, no perturbation.
  void smart_floor(int steps) {
    opt->zero_grad();
    const auto logits = model->forward(x);
    auto total = F::cross_entropy(logits, y);
    for (int k = 0; k < steps; ++k) {
      const auto adv =
          advtrain::stable_kl(model->forward(x), logits.detach(), false);
      torch::autograd::grad({adv}, {model->emb->weight});
    }
    total = total + advtrain::sym_kl(model->forward(x), logits);
    total.backward();
    opt->step();
  }
};

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
  if (m == "smart")
    return std::make_unique<SMART>(*net, "embedding");
  throw std::invalid_argument("unknown method " + m);
}

/// Passes of each method at its defaults, and its floor.
struct MethodFloor {
  int passes;
  std::function<void(Setup&)> run;
};
const std::map<std::string, MethodFloor>& floors() {
  static const std::map<std::string, MethodFloor> f = {
      {"fgsm", {2, [](Setup& s) { s.floor(2); }}},
      {"fgm", {2, [](Setup& s) { s.floor(2); }}},
      {"pgd", {4, [](Setup& s) { s.floor(4); }}},
      {"freeat",
       {4,
        [](Setup& s) {
          for (int j = 0; j < 4; ++j) {
            s.floor(1);
          }
        }}},
      {"freelb", {3, [](Setup& s) { s.floor(3, 1.0 / 3); }}},
      {"smart", {3, [](Setup& s) { s.smart_floor(1); }}},
  };
  return f;
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
  runners.push_back({"plain", [&] { plain.floor(1); }, {}});
  std::vector<std::unique_ptr<Setup>> setups;
  std::vector<std::unique_ptr<advtrain::Attacker>> attackers;
  std::vector<std::unique_ptr<advtrain::Trainer>> trainers;
  for (const auto& m : methods) {
    setups.push_back(std::make_unique<Setup>(shape, device, 1));
    Setup* fs = setups.back().get();
    const auto& fl = floors().at(m);
    runners.push_back({m + " floor", [fs, &fl] { fl.run(*fs); }, {}});
    setups.push_back(std::make_unique<Setup>(shape, device, 1));
    Setup* ls = setups.back().get();
    attackers.push_back(make(m, ls->model));
    trainers.push_back(
        std::make_unique<advtrain::Trainer>(*ls->opt, *attackers.back()));
    advtrain::Trainer* t = trainers.back().get();
    runners.push_back(
        {m,
         [ls, t] {
           t->step(
               [ls] { return ls->model->forward(ls->x); },
               [ls](const torch::Tensor& out) {
                 return F::cross_entropy(out, ls->y);
               });
         },
         {}});
  }
  time_round(runners, repeats, warmup, sync);

  // The library's own work, alone: attack() and restore() on a real
  // gradient of the model (PGD: its K attacks), repeated.
  std::vector<double> own_ms(methods.size());
  for (size_t k = 0; k < methods.size(); ++k) {
    Setup& s = *setups[2 * k + 1];
    auto& a = *attackers[k];
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
      "\nV = {}, H = {}, batch {} x {}, {}Adam, {} repeats (median), plain "
      "step {:.1f} ms\n",
      shape.vocab,
      shape.hidden,
      shape.batch,
      shape.length,
      shape.encoder ? "transformer encoder layer, " : "",
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
        100.0 * own_ms[k] / base,
        mib(attackers[k]->peak_held_bytes()),
        table);
  }
  fmt::print(
      "(floor: the same passes by hand, no library; lib-floor and "
      "attack+restore as % of a plain step)\n");
  if (raw) {
    for (const auto& run : runners) {
      fmt::print(
          "ms {} {:.3f}\n",
          run.name == "plain" ? run.name
          : run.name.find(' ') == std::string::npos
              ? run.name
              : run.name.substr(0, run.name.find(' ')) + "_floor",
          median(run.ms));
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
        {"plain", [&] { plain.floor(1); }, {}},
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
  std::vector<std::string> methods = {
      "fgsm", "fgm", "pgd", "freeat", "freelb", "smart"};
  int repeats = 15, warmup = 3, threads = 2;
  bool sweep = false, no_table = false, raw = false;
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
  CLI11_PARSE(app, argc, argv);

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
