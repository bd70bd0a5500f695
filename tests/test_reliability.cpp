// Property tests over generated cases (random dtypes, shapes, targets,
// options and call sequences), and the known pitfalls of the Python world:
// non-finite gradients, tied embeddings, gradient accumulation.
//
// ADVTRAIN_PROPERTY_CASES sets the number of generated cases (default 1000).

#include "common.h"
#include "strategies.h"

#include "catch.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

int64_t case_count() {
  const char* env = std::getenv("ADVTRAIN_PROPERTY_CASES");
  return env != nullptr ? std::stoll(env) : 1000;
}

struct Rng {
  std::mt19937_64 gen;
  int64_t integer(int64_t lo, int64_t hi) { // [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen);
  }
  double real(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(gen);
  }
  /// 10^u, u uniform in [lo, hi].
  double log_real(double lo, double hi) {
    return std::pow(10.0, real(lo, hi));
  }
  bool coin(double p = 0.5) {
    return real(0, 1) < p;
  }
};

/// Machine epsilon of a floating dtype.
double dtype_eps(torch::ScalarType t) {
  switch (t) {
    case torch::kDouble:
      return 2.2e-16;
    case torch::kFloat:
      return 1.2e-7;
    case torch::kHalf:
      return 9.8e-4;
    default:
      return 7.9e-3; // bfloat16
  }
}

/// What the attacker promises about W − W0 while perturbed.
struct Bound {
  enum Kind { kNone, kL2, kLInf } kind = kNone;
  double eps = 0;
};

struct Made {
  std::unique_ptr<advtrain::SearchAttacker> attacker;
  Bound bound;
  std::string what;
  bool freeat = false;
};

/// A random strategy with random valid options.
Made make_attacker(Rng& r, std::vector<torch::Tensor> targets) {
  using namespace advtrain;
  Made m;
  switch (r.integer(0, 7)) {
    case 0: {
      const double eps = r.log_real(-4, 0);
      m.attacker = std::make_unique<FGSM>(targets, FGSMOptions().epsilon(eps));
      m.what = "FGSM";
      break;
    }
    case 1: {
      const double eps = r.log_real(-3, 1);
      m.attacker = std::make_unique<FGM>(targets, FGMOptions().epsilon(eps));
      m.what = "FGM";
      break;
    }
    case 2:
    case 3: {
      const auto o = PGDOptions()
                         .epsilon(r.log_real(-3, 0.7))
                         .alpha(r.coin(0.1) ? 0.0 : r.log_real(-3, 0.3))
                         .steps(r.integer(1, 4));
      const bool l2 = r.integer(0, 1) == 0;
      if (l2) {
        m.attacker = std::make_unique<PGD>(targets, o);
      } else {
        m.attacker = std::make_unique<PGDLInf>(targets, o);
      }
      m.bound = {l2 ? Bound::kL2 : Bound::kLInf, o.epsilon()};
      m.what = l2 ? "PGD" : "PGDLInf";
      break;
    }
    case 4: {
      const auto o = FreeATOptions()
                         .epsilon(r.log_real(-3, 0))
                         .alpha(r.log_real(-3, -0.3))
                         .replays(r.integer(1, 4));
      const bool l2 = r.coin();
      if (l2) {
        m.attacker = std::make_unique<FreeATL2>(targets, o);
      } else {
        m.attacker = std::make_unique<FreeAT>(targets, o);
      }
      m.bound = {l2 ? Bound::kL2 : Bound::kLInf, o.epsilon()};
      m.what = l2 ? "FreeATL2" : "FreeAT";
      m.freeat = true;
      break;
    }
    case 5:
    case 6: {
      const bool bounded = r.coin();
      const auto o = FreeLBOptions()
                         .alpha(r.log_real(-3, 0))
                         .steps(r.integer(1, 4))
                         .epsilon(bounded ? r.log_real(-3, 0.7) : 0.0);
      const bool l2 = !bounded || r.coin();
      if (l2) {
        m.attacker = std::make_unique<FreeLB>(targets, o);
      } else {
        m.attacker = std::make_unique<FreeLBLInf>(targets, o);
      }
      if (bounded) {
        m.bound = {l2 ? Bound::kL2 : Bound::kLInf, o.epsilon()};
      }
      m.what = l2 ? "FreeLB" : "FreeLBLInf";
      break;
    }
    default: {
      const auto o = SMARTOptions()
                         .steps(r.integer(1, 3))
                         .alpha(r.log_real(-4, 0))
                         .noise_var(r.coin(0.2) ? 0.0 : r.log_real(-6, -2))
                         .norm_eps(r.log_real(-8, -3))
                         .weight(r.real(0, 2));
      m.attacker = std::make_unique<SMART>(targets, o);
      // Each row of δ is divided by its max-abs value (+ norm_eps).
      m.bound = {Bound::kLInf, 1.0};
      m.what = "SMART";
      break;
    }
  }
  return m;
}

/// Whether `w − w0` respects the bound, up to the rounding of `w0 + δ` in
/// the tensor's dtype.
bool within(const torch::Tensor& w, const torch::Tensor& w0, const Bound& b) {
  if (b.kind == Bound::kNone) {
    return true;
  }
  const auto d = (w.to(torch::kDouble) - w0.to(torch::kDouble));
  const double scale = w0.to(torch::kDouble).abs().max().item<double>() + b.eps;
  const double eps = dtype_eps(w.scalar_type());
  if (b.kind == Bound::kLInf) {
    return d.abs().max().item<double>() <= b.eps * (1 + 1e-9) + 2 * eps * scale;
  }
  const double slack = 2 * eps * scale * std::sqrt(double(w.numel()));
  return d.norm().item<double>() <= b.eps * (1 + 1e-9) + slack;
}

const torch::ScalarType kDtypes[] = {
    torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf};

/// A gradient for `t`: random, zero, NaN, Inf, huge, or none.
torch::Tensor random_grad(Rng& r, const torch::Tensor& t) {
  const auto kind = r.integer(0, 9);
  const auto opts = t.options().requires_grad(false);
  if (kind <= 4) {
    return torch::randn(t.sizes(), opts) * r.log_real(-3, 3);
  }
  switch (kind) {
    case 5:
      return torch::zeros(t.sizes(), opts);
    case 6:
      return torch::full(
          t.sizes(), std::numeric_limits<double>::quiet_NaN(), opts);
    case 7: {
      auto g = torch::randn(t.sizes(), opts);
      g.view(-1)[0] = std::numeric_limits<double>::infinity();
      return g;
    }
    case 8: // overflows float16's sum of squares, not its elements
      return torch::full(t.sizes(), 3e4, opts);
    default:
      return torch::Tensor();
  }
}

} // namespace

TEST_CASE(
    "Property: random call sequences keep every invariant", "[property]") {
  const int64_t cases = case_count();
  Rng r{std::mt19937_64(20261124)};
  WarningCapture quiet; // expected warnings (missing restore, NaN grads)
  int64_t attacks = 0, throws = 0, restores = 0, grad_restores = 0;
  for (int64_t c = 0; c < cases; ++c) {
    torch::manual_seed(static_cast<uint64_t>(c));
    const auto dtype = kDtypes[r.integer(0, 3)];
    std::vector<torch::Tensor> targets;
    const auto n_targets = r.integer(1, 3);
    for (int64_t i = 0; i < n_targets; ++i) {
      std::vector<int64_t> shape = {r.integer(1, 9)};
      if (r.coin(0.8)) {
        shape.push_back(r.integer(1, 6));
      }
      targets.push_back(
          torch::randn(shape, torch::dtype(dtype)).requires_grad_());
    }
    const auto originals = clone_all(targets);
    Made m = make_attacker(r, targets);
    auto& a = *m.attacker;
    a.watch_grads(targets);
    INFO(
        "case " << c << ": " << m.what << ", " << dtype << ", " << n_targets
                << " targets");
    std::vector<torch::Tensor> saved_grads;
    bool has_grad_backup = false;
    const auto length = r.integer(1, 10);
    for (int64_t s = 0; s < length; ++s) {
      const auto op = r.integer(0, 8);
      INFO("op " << s << ": " << op);
      const auto before = clone_all(targets);
      const bool was_perturbed = a.is_perturbed();
      switch (op) {
        case 0:
        case 1:
          for (auto& t : targets) {
            t.mutable_grad() = random_grad(r, t);
          }
          break;
        case 2:
        case 3:
        case 4:
          try {
            ++attacks;
            if (op == 2) {
              a.attack();
            } else {
              a.attack(op == 3);
            }
          } catch (const c10::Error& e) {
            // Only "no gradient yet" may throw, and it changes nothing.
            ++throws;
            CHECK_THAT(e.what(), Contains("no gradient"));
            CHECK(a.is_perturbed() == was_perturbed);
            CHECK(equal_all(clone_all(targets), before));
          }
          break;
        case 5:
          a.restore();
          ++restores;
          CHECK_FALSE(a.is_perturbed());
          CHECK(equal_all(clone_all(targets), originals));
          break;
        case 6:
          a.backup_grad();
          saved_grads = clone_all(grads_of(targets));
          has_grad_backup = true;
          break;
        case 7:
          if (has_grad_backup) {
            a.restore_grad();
            ++grad_restores;
            CHECK(equal_all(clone_all(grads_of(targets)), saved_grads));
          } else { // refused, nothing changed
            const auto grads = clone_all(grads_of(targets));
            CHECK_THROWS_WITH(
                a.restore_grad(), Contains("without backup_grad"));
            CHECK(equal_all(clone_all(grads_of(targets)), grads));
          }
          has_grad_backup = false;
          break;
        default:
          if (m.freeat) {
            auto* f = dynamic_cast<advtrain::FreeAT*>(&a);
            if (f != nullptr) {
              f->update_delta();
            } else {
              dynamic_cast<advtrain::FreeATL2&>(a).update_delta();
            }
          }
          break;
      }
      for (size_t i = 0; i < targets.size(); ++i) {
        CHECK(torch::isfinite(targets[i]).all().item<bool>());
        if (a.is_perturbed()) {
          CHECK(within(targets[i], originals[i], m.bound));
        } else {
          CHECK(torch::equal(targets[i], originals[i]));
        }
      }
      CHECK(std::isfinite(a.perturbation_norm()));
    }
    a.restore();
    CHECK(equal_all(clone_all(targets), originals));
  }
  // The generator reached every branch that matters.
  CHECK(attacks > cases / 2);
  CHECK(throws > 0);
  CHECK(restores > cases / 4);
  CHECK(grad_restores > cases / 20);
  CHECK(quiet.count("non-finite") > 0);
}

TEST_CASE(
    "Property: Trainer::step with lr 0 leaves the weights as they were",
    "[property]") {
  const int64_t cases = std::max<int64_t>(1, case_count() / 4);
  Rng r{std::mt19937_64(42)};
  WarningCapture quiet;
  const torch::ScalarType model_dtypes[] = {
      torch::kDouble, torch::kFloat, torch::kBFloat16};
  for (int64_t c = 0; c < cases; ++c) {
    torch::manual_seed(static_cast<uint64_t>(c));
    const auto dtype = model_dtypes[r.integer(0, 2)];
    const auto vocab = r.integer(2, 12), hidden = r.integer(1, 8);
    const auto classes = r.integer(2, 4);
    torch::nn::Embedding emb(vocab, hidden);
    torch::nn::Linear fc(hidden, classes);
    emb->to(dtype);
    fc->to(dtype);
    std::vector<torch::Tensor> params = {emb->weight, fc->weight, fc->bias};
    const auto targets =
        r.coin(0.2) ? std::vector<torch::Tensor>{emb->weight, fc->weight}
                    : std::vector<torch::Tensor>{emb->weight};
    Made m = make_attacker(r, targets);
    INFO("case " << c << ": " << m.what << ", " << dtype);
    const auto batch = r.integer(1, 4), len = r.integer(1, 6);
    const auto x = torch::randint(vocab, {batch, len}, torch::kLong);
    const auto y = torch::randint(classes, {batch}, torch::kLong);
    const auto before = clone_all(params);
    torch::optim::SGD opt(params, torch::optim::SGDOptions(0.0));
    advtrain::Trainer trainer(opt, *m.attacker);
    const auto result = trainer.step(
        [&] { return fc(emb(x).mean(1)).to(torch::kFloat); },
        [&](const torch::Tensor& out) { return cross_entropy(out, y); });
    CHECK_FALSE(m.attacker->is_perturbed());
    CHECK(equal_all(clone_all(params), before));
    CHECK(result.passes >= 1);
    CHECK(std::isfinite(result.loss));
    for (const auto& p : params) {
      CHECK((
          !p.grad().defined() || torch::isfinite(p.grad()).all().item<bool>()));
    }
  }
}

TEST_CASE(
    "Non-finite gradients warn once per attacker and training goes on",
    "[pitfalls]") {
  auto model = make_model();
  auto& W = model->embedding->weight;
  const auto before = W.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  WarningCapture warnings;
  for (int i = 0; i < 3; ++i) {
    W.mutable_grad() =
        torch::full_like(W, std::numeric_limits<double>::quiet_NaN());
    fgm.attack();
    CHECK(torch::equal(W, before));
    fgm.restore();
  }
  CHECK(warnings.count("non-finite") == 1);
  CHECK(warnings.count("embedding.weight") == 1);
  CHECK(fgm.nonfinite_gradients() == 3);
  // A finite gradient afterwards perturbs again.
  W.mutable_grad() = torch::ones_like(W);
  fgm.attack();
  CHECK_FALSE(torch::equal(W, before));
  fgm.restore();
}

TEST_CASE("A gradient of another dtype or device is rejected", "[pitfalls]") {
  auto W = torch::zeros({3, 2}, torch::kDouble).requires_grad_();
  advtrain::FGM fgm({W});
  W.mutable_grad() = torch::ones({3, 2}, torch::kFloat);
  CHECK_THROWS_WITH(fgm.attack(), Contains("does not match"));
  W.mutable_grad() =
      torch::ones({3, 2}, torch::dtype(torch::kDouble).device(torch::kMeta));
  CHECK_THROWS_WITH(fgm.attack(), Contains("meta"));
  CHECK(torch::equal(W, torch::zeros({3, 2}, torch::kDouble)));
}

namespace {

/// Input and output embeddings tied: the output projection is the table,
/// registered a second time under its own name.
struct TiedLMImpl : torch::nn::Module {
  TiedLMImpl()
      : embedding(register_module(
            "embedding", torch::nn::Embedding(kVocab, kHidden))) {
    out_weight = register_parameter("out_weight", embedding->weight);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return embedding(x).mean(1).matmul(out_weight.t());
  }
  torch::nn::Embedding embedding;
  torch::Tensor out_weight;
};
TORCH_MODULE(TiedLM);

} // namespace

TEST_CASE(
    "Tied input/output embeddings are detected and warned about",
    "[pitfalls]") {
  TiedLM model;
  REQUIRE(model->out_weight.is_same(model->embedding->weight));
  {
    WarningCapture warnings;
    advtrain::FGM fgm(*model, "embedding");
    CHECK(warnings.count("tied to out_weight") == 1);
  }
  {
    // A pattern matching both names selects the table once.
    WarningCapture warnings;
    advtrain::PGD pgd(*model, "weight");
    CHECK(pgd.targets().size() == 1);
    CHECK(warnings.count("tied") == 1);
  }
  {
    // An untied model gives no warning.
    auto plain = make_model();
    WarningCapture warnings;
    advtrain::FGM fgm(*plain, "embedding");
    CHECK(warnings.count("tied") == 0);
  }
  // Training through the tie works and restores the shared table.
  WarningCapture warnings;
  advtrain::FGM fgm(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, fgm);
  const auto y = torch::tensor({0, 6, 3}, torch::kLong);
  const auto r = trainer.step(
      [&] { return model->forward(batch_ids()); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(r.passes == 2);
  CHECK_FALSE(fgm.is_perturbed());
}

TEST_CASE(
    "Gradient accumulation over micro-batches with Trainer", "[pitfalls]") {
  // Two micro-batches (rows 0-1 and row 2 of the batch), each loss halved;
  // FGM perturbs each micro-batch by its own gradient.
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  const double eps = 0.9, lr = 0.1;
  const std::vector<std::pair<int64_t, int64_t>> parts = {{0, 2}, {2, 1}};
  Plain total = p0 * 0.0;
  for (const auto& part : parts) {
    const auto xm = x.narrow(0, part.first, part.second);
    const auto ym = y.narrow(0, part.first, part.second);
    const Plain g0 = plain_grads(p0, xm, ym);
    const auto moved = p0.with_W(p0.W + eps * g0.W / g0.W.norm());
    total = total + (g0 + plain_grads(moved, xm, ym)) * 0.5;
  }
  const Plain expected = p0 + total * (-lr);

  advtrain::FGM fgm(*model, "embedding", advtrain::FGMOptions().epsilon(eps));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(lr));
  advtrain::Trainer trainer(opt, fgm);
  opt.zero_grad();
  for (const auto& part : parts) {
    const auto xm = x.narrow(0, part.first, part.second);
    const auto ym = y.narrow(0, part.first, part.second);
    trainer.accumulate(
        [&] { return model->forward(xm); },
        [&](const torch::Tensor& out) { return cross_entropy(out, ym) * 0.5; });
  }
  opt.step();
  CHECK(max_diff(model, expected) < 1e-9);

  advtrain::FreeAT freeat(*model, "embedding");
  advtrain::Trainer free_trainer(opt, freeat);
  CHECK_THROWS_WITH(
      free_trainer.accumulate(
          [&] { return model->forward(x); },
          [&](const torch::Tensor& out) { return cross_entropy(out, y); }),
      Contains("micro-batches"));
}

TEST_CASE("Every strategy trains a bfloat16 model on CPU", "[bf16]") {
  const auto x = batch_ids();
  const auto y = batch_labels();
  for (const auto& c : strategies()) {
    if (!c.on_table) {
      continue; // per example only (ASCC)
    }
    auto model = make_model();
    model->to(torch::kBFloat16);
    // (The list's SMART noise, 1e-2, is above bfloat16's resolution for
    // weights near 1; the default 1e-5 would round away: see docs/guide.md.)
    const auto a = c.on_table(*model, "embedding", false);
    INFO(a->kind());
    const auto before = clone_all(model->parameters());
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.5));
    advtrain::Trainer trainer(opt, *a);
    const auto r = trainer.step(
        [&] { return model->forward(x).to(torch::kFloat); },
        [&](const torch::Tensor& out) { return cross_entropy(out, y); });
    CHECK(std::isfinite(r.loss));
    CHECK(std::isfinite(r.perturbation_norm));
    CHECK(r.perturbation_norm > 0.0);
    CHECK_FALSE(a->is_perturbed());
    for (const auto& p : model->parameters()) {
      CHECK(p.scalar_type() == torch::kBFloat16);
      CHECK(torch::isfinite(p).all().item<bool>());
    }
    CHECK_FALSE(equal_all(clone_all(model->parameters()), before));
  }
}

TEST_CASE(
    "Every strategy trains a float16 table on CPU, on both targets", "[f16]") {
  // The table in float16, the rest in float32: the reductions a rule needs
  // (norms, clamps, square roots) are taken in float32 where LibTorch's CPU
  // has no float16 kernel.
  const auto x = padded_ids();
  const auto y = batch_labels();
  for (const auto& c : strategies()) {
    for (const bool per_example : {false, true}) {
      if (per_example ? !c.per_example : !c.on_table) {
        continue;
      }
      INFO(c.name << (per_example ? " per example" : " on the table"));
      torch::manual_seed(3);
      auto model = make_act();
      model->to(torch::kFloat);
      model->embedding->to(torch::kHalf);
      const auto a = per_example ? c.per_example(model->embedding, false)
                                 : c.on_table(*model, "embedding", false);
      const auto before = clone_all(model->parameters());
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.5));
      advtrain::Trainer trainer(opt, *a);
      const auto m = x.ne(0).unsqueeze(-1).to(torch::kFloat);
      advtrain::StepResult r;
      CHECK_NOTHROW(
          r = trainer.step(
              [&] {
                const auto e = model->embedding(x).to(torch::kFloat);
                return model->fc((e * m).sum(1) / m.sum(1));
              },
              [&](const torch::Tensor& out) { return cross_entropy(out, y); }));
      CHECK(r.finite);
      CHECK(r.skipped == 0);
      CHECK(std::isfinite(r.perturbation_norm));
      CHECK_FALSE(a->is_perturbed());
      CHECK(model->embedding->weight.scalar_type() == torch::kHalf);
      for (const auto& p : model->parameters()) {
        CHECK(torch::isfinite(p).all().item<bool>());
      }
      CHECK_FALSE(equal_all(clone_all(model->parameters()), before));
    }
  }
}

namespace {

/// Counts the ATen ops run on this thread that read a tensor's values to
/// the host (on CUDA each waits for the device): `item` and
/// `_local_scalar_dense`, the ops whose output's size depends on values
/// (`nonzero`, `masked_select`, `unique`), and those answering with a host
/// bool (`is_nonzero`, `equal`, `allclose`). The library's own read of a
/// step's figures copies them to the CPU in `detail::to_host`, which counts
/// itself in `detail::host_reads()`.
class HostReadOps {
 public:
  HostReadOps()
      : handle_(at::addThreadLocalCallback(
            at::RecordFunctionCallback(&enter).scopes(
                {at::RecordScope::FUNCTION}))) {
    seen().clear();
  }
  ~HostReadOps() {
    at::removeCallback(handle_);
  }
  HostReadOps(const HostReadOps&) = delete;
  HostReadOps& operator=(const HostReadOps&) = delete;

  /// The reading ops seen since construction (or `clear`), by name.
  static std::vector<std::string>& seen() {
    thread_local std::vector<std::string> names;
    return names;
  }

 private:
  static std::unique_ptr<at::ObserverContext> enter(
      const at::RecordFunction& fn) {
    static const std::set<std::string> reads = {
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::nonzero_numpy",
        "aten::argwhere",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::is_nonzero",
        "aten::equal",
        "aten::allclose"};
    const std::string name = fn.name();
    if (reads.count(name) > 0) {
      seen().push_back(name);
    }
    return nullptr;
  }

  at::CallbackHandle handle_;
};

/// Sets `detail::force_sync_free()` while alive: the CPU takes the paths a
/// CUDA device takes.
struct SyncFree {
  SyncFree() {
    advtrain::detail::force_sync_free() = true;
  }
  ~SyncFree() {
    advtrain::detail::force_sync_free() = false;
  }
};

/// Runs `steps` Trainer steps with `attacker`, on the sync-free path (what a
/// device takes) or the CPU's own; on the sync-free path counts reading ops
/// and the library's host reads and checks one read per optimizer step
/// (`optimizer_steps` a step: FreeAT's replays) and no reading op. Returns
/// the parameters after the steps.
template <typename Forward>
std::vector<torch::Tensor> check_one_read(
    advtrain::Attacker& attacker,
    torch::optim::Optimizer& opt,
    const Forward& forward,
    const torch::Tensor& y,
    int steps,
    bool sync_free = true,
    int64_t optimizer_steps = 1) {
  advtrain::Trainer trainer(opt, attacker);
  advtrain::detail::force_sync_free() = sync_free;
  const HostReadOps ops;
  const int64_t before = advtrain::detail::host_reads();
  for (int s = 0; s < steps; ++s) {
    const auto r = trainer.step(forward, [&](const torch::Tensor& out) {
      return cross_entropy(out, y);
    });
    CHECK(std::isfinite(r.loss));
    CHECK(r.loss > 0.0);
  }
  advtrain::detail::force_sync_free() = false;
  if (sync_free) {
    CHECK(advtrain::detail::host_reads() - before == steps * optimizer_steps);
    CHECK(HostReadOps::seen() == std::vector<std::string>{});
  }
  std::vector<torch::Tensor> params;
  for (const auto& group : opt.param_groups()) {
    for (const auto& p : group.params()) {
      params.push_back(p.detach().clone());
    }
  }
  return params;
}

} // namespace

TEST_CASE("The counter sees the reads it looks for", "[sync]") {
  // (So that the tests below can fail: each of these reads the device.)
  const auto t = torch::tensor({0.0, 2.0, 0.0}, torch::kDouble);
  const HostReadOps ops;
  const auto& seen = HostReadOps::seen();
  const auto saw = [&](const char* name) {
    const auto n = std::count(seen.begin(), seen.end(), name);
    HostReadOps::seen().clear();
    return n;
  };
  CHECK(t.sum().item<double>() == 2.0);
  CHECK(saw("aten::_local_scalar_dense") >= 1);
  CHECK(t.nonzero().numel() == 1);
  CHECK(saw("aten::nonzero") == 1);
  CHECK(t.masked_select(t > 1).numel() == 1);
  CHECK(saw("aten::masked_select") == 1);
  CHECK(torch::equal(t, t));
  CHECK(saw("aten::equal") == 1);
  CHECK(t.sum().to(torch::kDouble).numel() == 1); // no read
  CHECK(seen.empty());
  // On the CPU the table searches its gradient for rows (`nonzero`); the
  // sync-free path does not.
  auto model = make_model();
  advtrain::FGM fgm(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, fgm);
  trainer.step(
      [&] { return model->forward(batch_ids()); },
      [&](const torch::Tensor& out) {
        return cross_entropy(out, batch_labels());
      });
  CHECK(saw("aten::nonzero") == 1);
}

TEST_CASE(
    "Each strategy's Trainer::step reads the device once per optimizer step, "
    "on the table and per example",
    "[sync]") {
  // Each also against the CPU's own path (which reads gradient norms and
  // searches rows), from the same seed: the same steps.
  for (const auto& c : strategies()) {
    for (const bool share : {false, true}) {
      INFO(c.name << ", share_dropout_mask " << share);
      std::vector<torch::Tensor> on_path[2];
      for (const bool sync_free : {true, false}) {
        if (!c.on_table) {
          break; // per example only (ASCC)
        }
        torch::manual_seed(5);
        auto model = make_model();
        const auto attacker = c.on_table(*model, "embedding", share);
        torch::optim::Adam opt(model->parameters());
        const auto x = batch_ids();
        on_path[sync_free] = check_one_read(
            *attacker,
            opt,
            [&] { return model->forward(x); },
            batch_labels(),
            3,
            sync_free,
            c.optimizer_steps);
      }
      if (c.on_table) {
        CHECK(max_diff_all(on_path[0], on_path[1]) < 1e-12);
      }
      if (c.per_example) {
        for (const bool sync_free : {true, false}) {
          torch::manual_seed(5);
          auto model = make_act();
          const auto attacker = c.per_example(model->embedding, share);
          torch::optim::Adam opt(model->parameters());
          const auto x = padded_ids();
          on_path[sync_free] = check_one_read(
              *attacker,
              opt,
              [&] { return model->forward(x); },
              torch::tensor({0, 1, 2}, torch::kLong),
              3,
              sync_free,
              c.optimizer_steps);
        }
        CHECK(max_diff_all(on_path[0], on_path[1]) < 1e-12);
      }
    }
  }
  // YOPO, on its split model.
  SplitNet model;
  advtrain::YOPO yopo(model->embedding, [&](const torch::Tensor& e) {
    return model->first(e);
  });
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  const auto x = padded_ids();
  check_one_read(
      yopo,
      opt,
      [&] { return model->rest(yopo.first(model->embedding(x)), x); },
      torch::tensor({0, 1, 2}, torch::kLong),
      3);
}

TEST_CASE(
    "A non-finite gradient is still counted and warned about with one read "
    "per step",
    "[sync]") {
  auto model = make_model();
  auto& W = model->embedding->weight;
  advtrain::FGM fgm(*model, "embedding");
  // (The table is not stepped: its gradient is NaN.)
  torch::optim::SGD opt(model->fc->parameters(), torch::optim::SGDOptions(kLr));
  const auto before = W.detach().clone();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto hook =
      W.register_hook([nan](const torch::Tensor& g) { return g * nan; });
  advtrain::Trainer trainer(opt, fgm);
  WarningCapture warnings;
  {
    const SyncFree sync_free;
    const HostReadOps ops;
    const int64_t reads = advtrain::detail::host_reads();
    for (int s = 0; s < 2; ++s) {
      const auto r = trainer.step(
          [&] { return model->forward(batch_ids()); },
          [&](const torch::Tensor& out) {
            return cross_entropy(out, batch_labels());
          });
      CHECK(std::isfinite(r.loss));
      CHECK(r.perturbation_norm == 0.0);
      CHECK(r.adv_loss == Approx(r.loss).epsilon(1e-12)); // nothing moved
    }
    CHECK(advtrain::detail::host_reads() - reads == 2);
    CHECK(HostReadOps::seen() == std::vector<std::string>{});
  }
  W.remove_hook(hook);
  CHECK(fgm.nonfinite_gradients() == 2);
  CHECK(warnings.count("non-finite") == 1);
  CHECK(torch::equal(W, before));
}

namespace {

/// The bytes of `attacker`'s archive.
std::string archive_bytes(const advtrain::Attacker& attacker) {
  torch::serialize::OutputArchive out;
  attacker.save(out);
  std::ostringstream s;
  out.save_to(s);
  return s.str();
}

/// Loads `bytes` into `attacker`.
void load_bytes(advtrain::Attacker& attacker, const std::string& bytes) {
  std::istringstream s(bytes);
  torch::serialize::InputArchive in;
  in.load_from(s);
  attacker.load(in);
}

} // namespace

TEST_CASE(
    "Archives load all or nothing: variant, ball, finiteness, checksum",
    "[serialize]") {
  using namespace advtrain;
  auto model = make_model();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  const auto o = FreeATOptions().epsilon(0.05).alpha(0.03).replays(2);
  FreeAT freeat(*model, "embedding", o);
  Trainer trainer(opt, freeat);
  for (int s = 0; s < 2; ++s) {
    trainer.step(
        [&] { return model->forward(batch_ids()); },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  REQUIRE(freeat.deltas().size() == 1);
  REQUIRE(freeat.deltas()[0].abs().max().item<double>() > 0);
  const std::string bytes = archive_bytes(freeat);
  const auto untouched = [](const FreeAT& a) {
    return a.deltas().empty() && a.steps_done() == 0;
  };

  SECTION("the norm variant is part of the kind") {
    FreeATL2 l2(*model, "embedding", o);
    CHECK_THROWS_WITH(
        load_bytes(l2, bytes),
        Contains("BasicFreeAT<advtrain::LInf>") &&
            Contains("not of advtrain::BasicFreeAT<advtrain::L2>"));
    CHECK(l2.deltas().empty());
    PGD pgd(*model, "embedding");
    PGDLInf pgd_inf(*model, "embedding");
    CHECK_THROWS_WITH(
        load_bytes(pgd_inf, archive_bytes(pgd)), Contains("not of"));
  }
  SECTION("a smaller epsilon") {
    FreeAT small(*model, "embedding", FreeATOptions().epsilon(0.01));
    CHECK_THROWS_WITH(
        load_bytes(small, bytes),
        Contains("outside the ball of epsilon = 0.01"));
    CHECK(untouched(small));
  }
  SECTION("a NaN delta, or a step count that is not a count") {
    for (int bad = 0; bad < 2; ++bad) {
      torch::serialize::OutputArchive out;
      out.write("advtrain.kind", c10::IValue(std::string("FreeAT")));
      out.write("advtrain.type", c10::IValue(freeat.type_name()));
      if (bad == 0) {
        out.write("advtrain.steps_done", c10::IValue(int64_t{3}));
        out.write(
            "freeat.delta.0",
            freeat.deltas()[0].clone().index_put_(
                {0, 0}, std::numeric_limits<double>::quiet_NaN()));
      } else {
        out.write("advtrain.steps_done", c10::IValue(std::string("x")));
        out.write("freeat.delta.0", freeat.deltas()[0]);
      }
      std::ostringstream s;
      out.save_to(s);
      FreeAT fresh(*model, "embedding", o);
      CHECK_THROWS_WITH(
          load_bytes(fresh, s.str()),
          Contains(bad == 0 ? "is not finite" : "not a count"));
      CHECK(untouched(fresh));
    }
  }
  SECTION("flipped bytes: refused, or the very same state") {
    int refused = 0, same = 0;
    for (size_t k = 0; k < 60; ++k) {
      std::string corrupt = bytes;
      const size_t at = (k * 7919) % corrupt.size();
      corrupt[at] = static_cast<char>(corrupt[at] ^ 0x20);
      FreeAT fresh(*model, "embedding", o);
      INFO("byte " << at);
      try {
        load_bytes(fresh, corrupt);
      } catch (const std::exception&) {
        ++refused;
        CHECK(untouched(fresh));
        continue;
      }
      ++same;
      CHECK(fresh.steps_done() == freeat.steps_done());
      REQUIRE(fresh.deltas().size() == 1);
      CHECK(bit_equal(fresh.deltas()[0], freeat.deltas()[0]));
    }
    CHECK(refused > 0);
    CHECK(refused + same == 60);
  }
}

namespace {

/// The optimizer's state, serialized (equal bytes: the same state).
std::string optimizer_bytes(const torch::optim::Optimizer& opt) {
  torch::serialize::OutputArchive out;
  opt.save(out);
  std::ostringstream s;
  out.save_to(s);
  return s.str();
}

} // namespace

TEST_CASE(
    "A non-finite loss skips the optimizer step: weights and optimizer state "
    "as before",
    "[nonfinite]") {
  for (const auto& c : strategies()) {
    for (const bool per_example : {false, true}) {
      if (per_example ? !c.per_example : !c.on_table) {
        continue;
      }
      for (const double bad :
           {std::numeric_limits<double>::quiet_NaN(),
            std::numeric_limits<double>::infinity()}) {
        INFO(
            c.name << (per_example ? " per example" : " on the table")
                   << ", loss * " << bad);
        torch::manual_seed(5);
        auto model = make_act();
        const auto attacker = per_example
                                  ? c.per_example(model->embedding, false)
                                  : c.on_table(*model, "embedding", false);
        torch::optim::Adam opt(model->parameters());
        advtrain::Trainer trainer(opt, *attacker);
        const auto forward = [&] { return model->forward(padded_ids()); };
        bool poisoned = false;
        const auto loss_fn = [&](const torch::Tensor& out) {
          const auto l = cross_entropy(out, batch_labels());
          return poisoned ? l * bad : l;
        };
        trainer.step(forward, loss_fn); // Adam has state to keep
        const auto params = clone_all(model->parameters());
        const std::string state = optimizer_bytes(opt);
        poisoned = true;
        WarningCapture warnings;
        const auto r = trainer.step(forward, loss_fn);
        CHECK(r.skipped == c.optimizer_steps);
        CHECK_FALSE(r.finite);
        CHECK(trainer.skipped_steps() == c.optimizer_steps);
        CHECK(equal_all(clone_all(model->parameters()), params));
        CHECK(optimizer_bytes(opt) == state);
        CHECK(warnings.count("was not finite") == 1);
        for (const auto& p : model->parameters()) {
          CHECK_FALSE(p.grad().defined()); // the step's gradients dropped
        }
        // Thrown instead: rolled back, nothing changed either.
        trainer.nonfinite(advtrain::NonFinite::kThrow);
        CHECK_THROWS_WITH(
            trainer.step(forward, loss_fn), Contains("was not finite"));
        CHECK(equal_all(clone_all(model->parameters()), params));
        CHECK(optimizer_bytes(opt) == state);
        CHECK_FALSE(attacker->is_perturbed());
        // A finite loss steps again.
        poisoned = false;
        const auto ok = trainer.step(forward, loss_fn);
        CHECK(ok.skipped == 0);
        CHECK(ok.finite);
        CHECK_FALSE(equal_all(clone_all(model->parameters()), params));
      }
    }
  }
}

TEST_CASE(
    "A NaN loss at one pass of FGM, FreeLB or SMART skips the step",
    "[nonfinite]") {
  using namespace advtrain;
  for (int which = 0; which < 3; ++which) {
    for (int at = 0; at < 3; ++at) {
      torch::manual_seed(5);
      auto model = make_act();
      std::unique_ptr<Attacker> a;
      int losses = 2; // task losses that join the training loss
      if (which == 0) {
        a = std::make_unique<FGM>(model->embedding);
      } else if (which == 1) {
        a = std::make_unique<FreeLB>(
            *model, "embedding", FreeLBOptions().steps(3));
        losses = 3;
      } else {
        a = std::make_unique<SMART>(model->embedding);
        losses = 1; // the clean one (the adversarial term is a divergence)
      }
      if (at >= losses) {
        continue;
      }
      INFO(a->kind() << ", NaN at task loss " << at);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
      Trainer trainer(opt, *a);
      const auto params = clone_all(model->parameters());
      int call = 0;
      WarningCapture quiet;
      const auto r = trainer.step(
          [&] { return model->forward(padded_ids()); },
          [&](const torch::Tensor& out) {
            const auto l = cross_entropy(out, batch_labels());
            return call++ == at ? l * std::numeric_limits<double>::quiet_NaN()
                                : l;
          });
      CHECK(r.skipped == 1);
      CHECK(equal_all(clone_all(model->parameters()), params));
    }
  }
}

namespace {

/// `loss` with the same value but a NaN gradient into `out` (a square root
/// at 0, times 0): what a model's own arithmetic can do to a finite loss.
torch::Tensor nan_gradient(
    const torch::Tensor& loss, const torch::Tensor& out) {
  return loss + (out - out).sqrt().sum() * 0;
}

} // namespace

TEST_CASE(
    "Per example, a non-finite search gradient is counted and warned as on "
    "the table",
    "[nonfinite]") {
  {
    // An own loop: δ stays at 0, each attack counts, one warning.
    auto model = make_act();
    advtrain::FGM fgm(model->embedding);
    const auto x = padded_ids();
    WarningCapture warnings;
    for (int i = 0; i < 3; ++i) {
      const auto out = model->forward(x);
      nan_gradient(cross_entropy(out, batch_labels()), out).backward();
      fgm.attack();
      CHECK(torch::equal(model->forward(x), out.detach()));
      fgm.restore();
      model->zero_grad();
    }
    CHECK(fgm.nonfinite_gradients() == 3);
    CHECK(warnings.count("non-finite") == 1);
  }
  // Trainer steps of the strategies whose search follows the task loss's
  // gradient (SMART's, VAT's and LLR's follow their own objectives, whose
  // count has its own test), with the gradients checked: counted, and the
  // step skipped.
  for (const auto& c : strategies()) {
    if (!c.follows_task_gradient()) {
      continue;
    }
    INFO(c.name);
    auto model = make_act();
    const auto attacker = c.per_example(model->embedding, false);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, *attacker);
    trainer.check_gradients(true);
    const auto params = clone_all(model->parameters());
    WarningCapture warnings;
    const auto r = trainer.step(
        [&] { return model->forward(padded_ids()); },
        [&](const torch::Tensor& out) {
          return nan_gradient(cross_entropy(out, batch_labels()), out);
        });
    CHECK(std::isfinite(r.loss));
    CHECK(r.skipped == c.optimizer_steps);
    CHECK(equal_all(clone_all(model->parameters()), params));
    CHECK(attacker->nonfinite_gradients() >= 1);
    CHECK(warnings.count("non-finite norm") == 1);
    CHECK(warnings.count("was not finite") == 1);
  }
  // YOPO's inner steps likewise.
  SplitNet model;
  advtrain::YOPO yopo(model->embedding, [&](const torch::Tensor& e) {
    return model->first(e);
  });
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, yopo);
  trainer.check_gradients(true);
  const auto x = padded_ids();
  WarningCapture warnings;
  const auto r = trainer.step(
      [&] { return model->rest(yopo.first(model->embedding(x)), x); },
      [&](const torch::Tensor& out) {
        return nan_gradient(cross_entropy(out, batch_labels()), out);
      });
  CHECK(r.skipped == 1);
  CHECK(yopo.nonfinite_gradients() >= 1);
}

TEST_CASE(
    "FreeAT's sign step on a table checks that the gradient is finite, "
    "not its norm",
    "[nonfinite]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const bool sync_free : {false, true}) {
    INFO((sync_free ? "the device's path" : "the host's path"));
    std::optional<SyncFree> on_device;
    if (sync_free) {
      on_device.emplace();
    }
    auto table = torch::zeros({4, 3}).requires_grad_();
    advtrain::FreeAT freeat(
        {table}, advtrain::FreeATOptions().epsilon(0.25).alpha(0.1));
    const auto replay = [&](const torch::Tensor& g) {
      freeat.attack();
      table.mutable_grad() = g.clone();
      freeat.update_delta();
      freeat.restore();
      return freeat.deltas().at(0).clone();
    };
    WarningCapture warnings;
    // Elements of 1e20 are finite, though their float32 norm is not: the
    // sign step takes them, clamped to ε; written out: clamp(0.1·sign(g)).
    auto big = torch::full({4, 3}, 1e20);
    big[1] = -1e20;
    big[2][1] = 0;
    const auto d1 = replay(big);
    CHECK(torch::equal(d1, (0.1 * big.sign()).clamp(-0.25, 0.25)));
    CHECK(freeat.nonfinite_gradients() == 0);
    // One infinite or NaN element: counted, δ kept bit for bit.
    auto with_inf = torch::ones({4, 3});
    with_inf[3][2] = -inf;
    CHECK(torch::equal(replay(with_inf), d1));
    auto with_nan = torch::ones({4, 3});
    with_nan[0][0] = nan;
    CHECK(torch::equal(replay(with_nan), d1));
    CHECK(freeat.nonfinite_gradients() == 2);
    CHECK(warnings.count("non-finite") == 1);
    // A zero gradient moves nothing and is no failure.
    CHECK(torch::equal(replay(torch::zeros({4, 3})), d1));
    CHECK(freeat.nonfinite_gradients() == 2);
    // The next finite gradient steps from the kept δ.
    CHECK(torch::equal(
        replay(torch::ones({4, 3})), (d1 + 0.1).clamp(-0.25, 0.25)));
  }
}

TEST_CASE(
    "With check_gradients, a NaN gradient of a finite loss skips the step",
    "[nonfinite]") {
  auto model = make_model();
  advtrain::FGM fgm(*model, "embedding");
  torch::optim::Adam opt(model->parameters());
  advtrain::Trainer trainer(opt, fgm);
  const auto forward = [&] { return model->forward(batch_ids()); };
  const auto poisoned = [&](const torch::Tensor& out) {
    return nan_gradient(cross_entropy(out, batch_labels()), out);
  };
  trainer.step(forward, [&](const torch::Tensor& out) {
    return cross_entropy(out, batch_labels());
  });
  const auto params = clone_all(model->parameters());
  const std::string state = optimizer_bytes(opt);
  trainer.check_gradients(true);
  WarningCapture warnings;
  auto r = trainer.step(forward, poisoned);
  CHECK(std::isfinite(r.loss));
  CHECK(r.skipped == 1);
  CHECK_FALSE(r.finite);
  CHECK(equal_all(clone_all(model->parameters()), params));
  CHECK(optimizer_bytes(opt) == state);
  // Unchecked, the loss alone decides: the NaN gradient is applied (what
  // docs/guarantees.md says).
  trainer.check_gradients(false);
  r = trainer.step(forward, poisoned);
  CHECK(r.skipped == 0);
  CHECK_FALSE(torch::isfinite(model->fc->weight).all().item<bool>());
}

TEST_CASE(
    "A throwing before_optimizer_step hook leaves FreeAT's delta as it was",
    "[nonfinite][errors]") {
  for (const bool per_example : {false, true}) {
    INFO((per_example ? "per example" : "on the table"));
    auto model = make_act();
    auto freeat = per_example
                      ? std::make_unique<advtrain::FreeAT>(model->embedding)
                      : std::make_unique<advtrain::FreeAT>(*model, "embedding");
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, *freeat);
    const auto forward = [&] { return model->forward(padded_ids()); };
    const auto loss_fn = [&](const torch::Tensor& out) {
      return cross_entropy(out, batch_labels());
    };
    trainer.step(forward, loss_fn);
    const auto deltas = clone_all(freeat->deltas());
    REQUIRE(!deltas.empty());
    const auto params = clone_all(model->parameters());
    trainer.before_optimizer_step([] { throw std::runtime_error("hook"); });
    CHECK_THROWS_WITH(trainer.step(forward, loss_fn), Contains("hook"));
    CHECK(equal_all(clone_all(freeat->deltas()), deltas));
    CHECK(equal_all(clone_all(model->parameters()), params));
    // The second replay's hook throws: the first replay is kept, δ with it.
    int calls = 0;
    trainer.before_optimizer_step([&] {
      if (calls++ == 1) {
        throw std::runtime_error("hook");
      }
    });
    CHECK_THROWS_WITH(trainer.step(forward, loss_fn), Contains("hook"));
    CHECK_FALSE(equal_all(clone_all(freeat->deltas()), deltas));
    CHECK_FALSE(equal_all(clone_all(model->parameters()), params));
  }
}

TEST_CASE(
    "A throwing closure puts back the gradients of the attacker's module's "
    "other parameters",
    "[errors]") {
  auto model = make_model();
  advtrain::FGM fgm(*model, "embedding");
  // The optimizer trains the table alone: fc's gradients gather.
  torch::optim::SGD opt(
      model->embedding->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, fgm);
  for (auto& p : model->fc->parameters()) {
    p.mutable_grad() = torch::ones_like(p);
  }
  int calls = 0;
  const auto forward = [&] { return model->forward(batch_ids()); };
  CHECK_THROWS_WITH(
      trainer.step(
          forward,
          [&](const torch::Tensor& out) {
            if (calls++ == 1) {
              throw std::runtime_error("adversarial pass");
            }
            return cross_entropy(out, batch_labels());
          }),
      Contains("adversarial pass"));
  for (auto& p : model->fc->parameters()) {
    CHECK(torch::equal(p.grad(), torch::ones_like(p)));
  }
  // A step that completes adds its gradients to theirs, as before.
  trainer.step(forward, [&](const torch::Tensor& out) {
    return cross_entropy(out, batch_labels());
  });
  for (auto& p : model->fc->parameters()) {
    CHECK_FALSE(torch::equal(p.grad(), torch::ones_like(p)));
  }
}

TEST_CASE(
    "release() per example lets the next batch have another shape",
    "[errors]") {
  auto model = make_act();
  advtrain::FGM fgm(model->embedding);
  const auto out = model->forward(padded_ids());
  cross_entropy(out, batch_labels()).backward();
  fgm.attack();
  fgm.release();
  CHECK_FALSE(fgm.is_perturbed());
  const auto other = torch::tensor({{1, 2, 0, 0}, {3, 4, 5, 0}}, torch::kLong);
  CHECK_NOTHROW(model->forward(other));
}
