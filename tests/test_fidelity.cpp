// The random stream of a step (random starts, shared dropout masks, no
// number used twice), SMART on regression outputs, and the pitfalls a new
// user meets: a perturbation outliving its step, attack() after zero_grad(),
// two attackers on one table. Each case is checked against a plain program
// that draws the same numbers in the same order, or against plain math.

#include "common.h"
#include "strategies.h"

#include "catch.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

constexpr double kDrop = 0.3;

/// PerturbedEmbedding -> dropout -> tanh(linear) -> masked mean -> linear:
/// dropout comes after the lookup, as in real models. Records each pass's
/// dropout mask (drawn as `dropout(ones)`, the same numbers as dropout of
/// the input) and the δ each forward sees.
struct DropNetImpl : SplitNetImpl {
  torch::Tensor first(const torch::Tensor& e) {
    const auto keep = torch::dropout(torch::ones_like(e), kDrop, is_training());
    masks.push_back(keep.detach().clone());
    return SplitNetImpl::first(e * keep);
  }
  torch::Tensor lookup(const torch::Tensor& x) {
    torch::Tensor e;
    if (word_drop) { // randomness before the lookup, e.g. word dropout
      const auto keep = torch::dropout(
          torch::ones({x.size(0), x.size(1)}, torch::kDouble),
          kDrop,
          is_training());
      word_masks.push_back(keep);
      e = embedding(x) * keep.unsqueeze(-1);
    } else {
      e = embedding(x);
    }
    const auto& d = embedding->perturbation()->delta();
    deltas.push_back(d.defined() ? d.detach().clone() : torch::Tensor());
    return e;
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return rest(first(lookup(x)), x);
  }
  std::vector<torch::Tensor> masks, deltas, word_masks;
  bool word_drop = false;
};
TORCH_MODULE(DropNet);

DropNet make_drop(uint64_t seed = 5) {
  torch::manual_seed(seed);
  return DropNet();
}

std::vector<int64_t> delta_shape(const torch::Tensor& x) {
  return {x.size(0), x.size(1), kHidden};
}

/// The plain program's draws: FreeLB's (and YOPO's) L2 random start.
torch::Tensor draw_start(const torch::Tensor& x, double mag) {
  const auto u = torch::empty(delta_shape(x), torch::kDouble).uniform_(-1, 1);
  const auto m = mask_of(x);
  const auto dims = m.sum({1, 2}, true) * kHidden;
  return u * m * mag / dims.sqrt();
}
/// The plain program's draws: one word-dropout mask ([B, L]).
torch::Tensor draw_word_mask(const torch::Tensor& x) {
  return torch::dropout(
      torch::ones({x.size(0), x.size(1)}, torch::kDouble), kDrop, true);
}
/// The plain program's draws: one dropout mask.
torch::Tensor draw_mask(const torch::Tensor& x) {
  return torch::dropout(
      torch::ones(delta_shape(x), torch::kDouble), kDrop, true);
}

advtrain::StepResult step_drop(
    advtrain::Trainer& trainer, DropNet& model, const torch::Tensor& x) {
  return trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) {
        return cross_entropy(out, batch_labels());
      });
}

} // namespace

TEST_CASE(
    "FreeLB's random start: masks shared across passes, a new start every "
    "step, the plain program's numbers",
    "[random][freelb]") {
  const auto x = padded_ids();
  const double mag = 0.5;
  const int64_t k = 3;
  const bool share = GENERATE(true, false);
  auto model = make_drop();
  advtrain::FreeLB freelb(
      model->embedding,
      advtrain::FreeLBOptions()
          .init_mag(mag)
          .steps(k)
          .alpha(0.2)
          .share_dropout_mask(share));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  torch::manual_seed(77);
  std::vector<advtrain::StepResult> results;
  results.push_back(step_drop(trainer, model, x));
  results.push_back(step_drop(trainer, model, x));
  const auto after = torch::rand({1}, torch::kDouble);

  // The plain program: the start, then pass 1's mask (and, without sharing,
  // one mask per pass), step after step.
  torch::manual_seed(77);
  std::vector<torch::Tensor> starts, masks;
  for (int step = 0; step < 2; ++step) {
    starts.push_back(draw_start(x, mag));
    masks.push_back(draw_mask(x));
    for (int64_t t = 1; t < k && !share; ++t) {
      masks.push_back(draw_mask(x));
    }
  }
  const auto plain_after = torch::rand({1}, torch::kDouble);

  REQUIRE(model->masks.size() == static_cast<size_t>(2 * k));
  REQUIRE(model->deltas.size() == static_cast<size_t>(2 * k));
  for (int step = 0; step < 2; ++step) {
    const auto& start = model->deltas[step * k];
    CHECK(max_abs_diff(start, starts[step]) < 1e-15);
    CHECK(
        results[step].start_norm ==
        Approx(start.norm().item<double>()).epsilon(1e-12));
    for (int64_t t = 0; t < k; ++t) {
      const auto& plain = masks[share ? step : step * k + t];
      CHECK(bit_equal(model->masks[step * k + t], plain));
    }
  }
  // Two steps, two different starts; and the generator ends where the plain
  // program's does (no number used twice, none skipped).
  CHECK(max_abs_diff(starts[0], starts[1]) > 1e-3);
  CHECK(bit_equal(after, plain_after));
  if (share) {
    CHECK_FALSE(bit_equal(model->masks[0], model->masks[k]));
  } else {
    CHECK_FALSE(bit_equal(model->masks[0], model->masks[1]));
  }
}

TEST_CASE(
    "YOPO's full and inner passes share the first pass's masks, a new start "
    "every step",
    "[random][yopo]") {
  const auto x = padded_ids();
  const int64_t m = 3, n = 2;
  const double mag = 0.64;
  auto model = make_drop();
  advtrain::YOPO yopo(
      model->embedding,
      [&](const torch::Tensor& e) { return model->first(e); },
      advtrain::YOPOOptions().steps(m).inner_steps(n).init_mag(mag).alpha(0.1));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, yopo);
  torch::manual_seed(78);
  for (int step = 0; step < 2; ++step) {
    trainer.step(
        [&] { return model->rest(yopo.first(model->lookup(x)), x); },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  const auto after = torch::rand({1}, torch::kDouble);

  torch::manual_seed(78);
  std::vector<torch::Tensor> starts, masks;
  for (int step = 0; step < 2; ++step) {
    starts.push_back(draw_start(x, mag));
    masks.push_back(draw_mask(x));
  }
  const auto plain_after = torch::rand({1}, torch::kDouble);

  // m full passes and (m - 1) * n inner passes per step, all with the mask.
  const size_t per_step = m + (m - 1) * n;
  REQUIRE(model->masks.size() == 2 * per_step);
  for (size_t i = 0; i < model->masks.size(); ++i) {
    CHECK(bit_equal(model->masks[i], masks[i / per_step]));
  }
  REQUIRE(model->deltas.size() == static_cast<size_t>(2 * m));
  CHECK(max_abs_diff(model->deltas[0], starts[0]) < 1e-15);
  CHECK(max_abs_diff(model->deltas[m], starts[1]) < 1e-15);
  CHECK(bit_equal(after, plain_after));
}

TEST_CASE(
    "Without shared masks nothing is replayed: every pass draws on",
    "[random]") {
  const auto x = padded_ids();
  auto model = make_drop();
  advtrain::PGD pgd(
      model->embedding, advtrain::PGDOptions().steps(2).epsilon(0.5));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, pgd);
  torch::manual_seed(79);
  step_drop(trainer, model, x);
  torch::manual_seed(79);
  REQUIRE(model->masks.size() == 3);
  for (const auto& mask : model->masks) {
    CHECK(bit_equal(mask, draw_mask(x)));
  }
}

TEST_CASE(
    "A random start does not outlive its step, and eval() adds no δ",
    "[pitfalls]") {
  const auto x = padded_ids();
  auto model = make_drop();
  const auto plain = [&] {
    return torch::nn::functional::embedding(x, model->embedding->weight)
        .detach();
  };
  advtrain::FreeLB freelb(
      model->embedding, advtrain::FreeLBOptions().init_mag(0.5));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  const auto r = step_drop(trainer, model, x);
  REQUIRE(r.start_norm > 0.1);
  // Training mode, autograd on: the plain lookup (δ = 0).
  CHECK(max_abs_diff(model->embedding(x), plain()) == 0.0);
  CHECK(max_abs_diff(model->embedding(x), plain()) == 0.0);
  // Another attacker's step on the same embedding starts from a clean pass.
  advtrain::FGM fgm(model->embedding, advtrain::FGMOptions().epsilon(0.5));
  advtrain::Trainer fgm_trainer(opt, fgm);
  model->deltas.clear();
  const auto r2 = step_drop(fgm_trainer, model, x);
  CHECK(r2.start_norm == 0.0);
  REQUIRE(model->deltas.size() == 2);
  CHECK(model->deltas[0].abs().max().item<double>() == 0.0);
  CHECK(r2.perturbation_norm == Approx(0.5 * std::sqrt(3.0)));
  // An own-loop attack leaves δ in place until restore(), but eval() and
  // NoGradGuard see the plain lookup.
  cross_entropy(model->forward(x), batch_labels()).backward();
  fgm.attack();
  CHECK(max_abs_diff(model->embedding(x), plain()) > 0.1);
  model->eval();
  CHECK(max_abs_diff(model->embedding(x), plain()) == 0.0);
  model->train();
  {
    torch::NoGradGuard no_grad;
    CHECK(max_abs_diff(model->embedding(x), plain()) == 0.0);
  }
  fgm.restore();
  CHECK(max_abs_diff(model->embedding(x), plain()) == 0.0);
}

/// `optimizer.zero_grad()` as LibTorch 1.13 runs it: zero-filled gradients
/// (LibTorch 2's default drops them; both are tested).
void zero_fill(torch::optim::Optimizer& opt) {
#if TORCH_VERSION_MAJOR >= 2
  opt.zero_grad(/*set_to_none=*/false);
#else
  opt.zero_grad();
#endif
}

TEST_CASE("attack() after zero_grad() warns and counts", "[pitfalls]") {
  auto model = make_model();
  const auto w0 = model->embedding->weight.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  WarningCapture warnings;
  for (int i = 0; i < 2; ++i) {
    cross_entropy(model->forward(batch_ids()), batch_labels()).backward();
    zero_fill(opt);
    fgm.attack();
    CHECK(bit_equal(model->embedding->weight.detach(), w0));
    CHECK(fgm.perturbation_norm() == 0.0);
    fgm.restore();
  }
  CHECK(warnings.count("exactly zero") == 1);
  CHECK(fgm.zero_gradients() == 2);
  // A real gradient moves the table and is not counted.
  cross_entropy(model->forward(batch_ids()), batch_labels()).backward();
  fgm.attack();
  CHECK(fgm.perturbation_norm() == Approx(1.0));
  fgm.restore();
  CHECK(fgm.zero_gradients() == 2);
}

TEST_CASE(
    "attack() after a zero_grad() that drops the gradients refuses",
    "[pitfalls]") {
  // LibTorch 2's zero_grad() (and 1.13's with set_to_none) leaves no
  // gradient: attack() refuses, saying why, and moves nothing.
  auto model = make_model();
  const auto w0 = model->embedding->weight.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  cross_entropy(model->forward(batch_ids()), batch_labels()).backward();
  for (auto& p : model->parameters()) {
    p.mutable_grad() = torch::Tensor(); // what zero_grad(set_to_none) does
  }
  CHECK_THROWS_WITH(
      fgm.attack(),
      Contains("found no gradient on [embedding.weight]") &&
          Contains("zero_grad()"));
  CHECK_FALSE(fgm.is_perturbed());
  CHECK(bit_equal(model->embedding->weight.detach(), w0));
}

TEST_CASE(
    "An optimizer step between attack() and restore() is refused and loses "
    "nothing",
    "[pitfalls]") {
  auto model = make_model();
  const auto& W = model->embedding->weight;
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  const auto loss = [&] {
    return cross_entropy(model->forward(batch_ids()), batch_labels());
  };
  torch::Tensor stepped;
  {
    advtrain::FGM fgm(*model, "embedding");
    loss().backward();
    fgm.attack();
    loss().backward();
    opt.step(); // restore() forgotten
    stepped = W.detach().clone();
    opt.zero_grad();
    loss().backward();
    CHECK_THROWS_WITH(fgm.attack(), Contains("changed while perturbed"));
    CHECK(bit_equal(W.detach(), stepped));
    // Writing the backup would discard the optimizer's update.
    CHECK_THROWS_WITH(
        fgm.restore(),
        Contains("embedding.weight changed while perturbed") &&
            Contains("release()"));
    CHECK(bit_equal(W.detach(), stepped));
    CHECK(fgm.is_perturbed());
    fgm.release();
    CHECK_FALSE(fgm.is_perturbed());
    CHECK(bit_equal(W.detach(), stepped));
    // The attacker works again, from the values the optimizer left.
    fgm.attack();
    CHECK_FALSE(bit_equal(W.detach(), stepped));
    fgm.restore();
    CHECK(bit_equal(W.detach(), stepped));
    // Destroyed while perturbed, after a step: the update stays.
    opt.zero_grad();
    loss().backward();
    fgm.attack();
    loss().backward();
    opt.step();
    stepped = W.detach().clone();
  }
  CHECK(bit_equal(W.detach(), stepped));
  // ... and its claim on the table is gone.
  advtrain::PGD pgd(*model, "embedding");
  opt.zero_grad();
  loss().backward();
  CHECK_NOTHROW(pgd.attack(true));
  pgd.restore();
  CHECK(bit_equal(W.detach(), stepped));
}

TEST_CASE(
    "Trainer::step refuses a perturbed table and a step inside a step",
    "[pitfalls]") {
  auto model = make_model();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::FGM fgm(*model, "embedding");
  advtrain::Trainer trainer(opt, fgm);
  const auto forward = [&] { return model->forward(batch_ids()); };
  const auto loss_fn = [&](const torch::Tensor& out) {
    return cross_entropy(out, batch_labels());
  };
  const auto before = clone_all(model->parameters());
  // Left perturbed by an own-loop attack(): the clean pass would run at
  // W + δ.
  loss_fn(forward()).backward();
  fgm.attack();
  const auto perturbed = clone_all(model->parameters());
  CHECK_THROWS_WITH(
      trainer.step(forward, loss_fn),
      Contains("still perturbed by FGM") && Contains("restore()"));
  CHECK(equal_all(clone_all(model->parameters()), perturbed));
  fgm.restore();
  // By another attacker.
  advtrain::PGD other(*model, "embedding");
  other.attack(true);
  CHECK_THROWS_WITH(
      trainer.step(forward, loss_fn), Contains("still perturbed by PGD"));
  other.restore();
  CHECK(equal_all(clone_all(model->parameters()), before));
  // Re-entered from a closure: refused, and the outer step rolls back.
  model->zero_grad();
  CHECK_THROWS_WITH(
      trainer.step(
          [&] {
            trainer.step(forward, loss_fn);
            return forward();
          },
          loss_fn),
      Contains("inside a step"));
  CHECK(equal_all(clone_all(model->parameters()), before));
  CHECK_NOTHROW(trainer.step(forward, loss_fn)); // and steps after
  CHECK_FALSE(equal_all(clone_all(model->parameters()), before));
}

TEST_CASE(
    "A second attacker may not perturb a table another one holds",
    "[pitfalls]") {
  auto model = make_model();
  const auto w0 = model->embedding->weight.detach().clone();
  advtrain::FGM a(*model, "embedding");
  advtrain::FGSM b(*model, "embedding");
  cross_entropy(model->forward(batch_ids()), batch_labels()).backward();
  a.attack();
  const auto perturbed = model->embedding->weight.detach().clone();
  CHECK_THROWS_WITH(b.attack(), Contains("already perturbed by another"));
  CHECK(bit_equal(model->embedding->weight.detach(), perturbed));
  CHECK_FALSE(b.is_perturbed());
  a.restore();
  CHECK(bit_equal(model->embedding->weight.detach(), w0));
  // Once released, the other attacker may take it.
  b.attack();
  CHECK(b.is_perturbed());
  b.restore();
  CHECK(bit_equal(model->embedding->weight.detach(), w0));
  // An attacker destroyed while perturbing restores and releases.
  {
    advtrain::FGM c(*model, "embedding");
    c.attack();
  }
  CHECK(bit_equal(model->embedding->weight.detach(), w0));
  a.attack();
  a.restore();
}

namespace {

/// Embedding -> mean -> linear to one output, returned as [B] or [B, 1].
struct RegNetImpl : torch::nn::Module {
  explicit RegNetImpl(bool column)
      : embedding(register_module(
            "embedding", torch::nn::Embedding(kVocab, kHidden))),
        fc(register_module("fc", torch::nn::Linear(kHidden, 1))),
        column(column) {
    to(torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto out = fc(torch::tanh(embedding(x)).mean(1));
    return column ? out : out.squeeze(-1);
  }
  torch::nn::Embedding embedding;
  torch::nn::Linear fc;
  bool column;
};
TORCH_MODULE(RegNet);

} // namespace

TEST_CASE(
    "SMART on a regression output [B] or [B, 1]: squared error, summed in "
    "the ascent",
    "[smart]") {
  const bool column = GENERATE(false, true);
  const auto o =
      advtrain::SMARTOptions().steps(2).alpha(3.0).noise_var(0.1).weight(0.7);
  const auto x = batch_ids();
  const auto y = torch::tensor({0.5, -1.0, 2.0}, torch::kDouble);
  torch::manual_seed(11);
  RegNet model(column);
  std::vector<torch::Tensor> p0;
  for (const auto& p : model->parameters()) {
    p0.push_back(p.detach().clone());
  }
  // Plain: f(W, A, b) written out; noise is the step's only draw.
  auto f = [&](const torch::Tensor& W,
               const torch::Tensor& A,
               const torch::Tensor& b) {
    const auto e = W.index_select(0, x.reshape(-1)).reshape({3, 5, kHidden});
    return (torch::tanh(e).mean(1).matmul(A.t()) + b).reshape({-1});
  };
  torch::manual_seed(12);
  auto delta = torch::randn_like(p0[0]) * o.noise_var();
  const auto clean = f(p0[0], p0[1], p0[2]).detach();
  for (int64_t k = 0; k < o.steps(); ++k) {
    auto d = delta.clone().requires_grad_();
    const auto adv = (f(p0[0] + d, p0[1], p0[2]) - clean).pow(2).sum();
    const auto g = torch::autograd::grad({adv}, {d})[0];
    const auto moved = delta + o.alpha() * g;
    delta = moved / (std::get<0>(moved.abs().max(-1, true)) + o.norm_eps());
  }
  std::vector<torch::Tensor> leaves;
  for (const auto& p : p0) {
    leaves.push_back(p.clone().requires_grad_());
  }
  const auto out = f(leaves[0], leaves[1], leaves[2]);
  const auto out_adv = f(leaves[0] + delta, leaves[1], leaves[2]);
  const auto loss =
      (out - y).pow(2).mean() + o.weight() * (out_adv - out).pow(2).mean();
  const auto g = torch::autograd::grad({loss}, leaves);

  advtrain::SMART smart(*model, "embedding", o);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  torch::manual_seed(12);
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& o) {
        return torch::mse_loss(o.reshape({-1}), y);
      });
  const auto now = model->parameters();
  for (size_t i = 0; i < now.size(); ++i) {
    CHECK(max_abs_diff(now[i], p0[i] - kLr * g[i]) < kTol);
  }
  CHECK(r.regularizer > 0.0);
  CHECK(r.adv_loss != r.loss);
}

TEST_CASE(
    "Saving the generator's state resumes a run with random starts bit for "
    "bit",
    "[random][state]") {
  const auto x = padded_ids();
  const auto options =
      advtrain::FreeLBOptions().init_mag(0.5).alpha(0.2).epsilon(0.4);
  const std::string model_file = "fidelity_model.pt",
                    rng_file = "fidelity_rng.pt";
  auto run = [&](int steps, DropNet& model) {
    advtrain::FreeLB freelb(model->embedding, options);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, freelb);
    for (int i = 0; i < steps; ++i) {
      step_drop(trainer, model, x);
    }
  };
  // Straight through: 4 steps.
  auto straight = make_drop();
  torch::manual_seed(80);
  run(4, straight);
  // 2 steps, save model and generator, scramble, load, 2 more.
  auto first = make_drop();
  torch::manual_seed(80);
  run(2, first);
  at::Generator gen = at::globalContext().defaultGenerator(torch::kCPU);
  torch::save(first, model_file);
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    torch::save(gen.get_state(), rng_file);
  }
  torch::manual_seed(999);
  auto resumed = make_drop(6);
  torch::load(resumed, model_file);
  torch::Tensor state;
  torch::load(state, rng_file);
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  run(2, resumed);
  CHECK(equal_all(resumed->parameters(), straight->parameters()));
  std::remove(model_file.c_str());
  std::remove(rng_file.c_str());
}

TEST_CASE(
    "Draws before the lookup: every pass replays them and jumps over the "
    "start",
    "[random]") {
  const auto x = padded_ids();
  const double mag = 0.5;
  const int64_t k = 3, m = 3, n = 2;
  const bool yopo_case = GENERATE(false, true);
  auto model = make_drop();
  model->word_drop = true;
  std::unique_ptr<advtrain::Attacker> attacker;
  advtrain::YOPO* yopo = nullptr;
  if (yopo_case) {
    auto y = std::make_unique<advtrain::YOPO>(
        model->embedding,
        [&](const torch::Tensor& e) { return model->first(e); },
        advtrain::YOPOOptions().steps(m).inner_steps(n).init_mag(mag));
    yopo = y.get();
    attacker = std::move(y);
  } else {
    attacker = std::make_unique<advtrain::FreeLB>(
        model->embedding, advtrain::FreeLBOptions().init_mag(mag).steps(k));
  }
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, *attacker);
  torch::manual_seed(81);
  for (int step = 0; step < 2; ++step) {
    trainer.step(
        [&] {
          return yopo != nullptr ? model->rest(yopo->first(model->lookup(x)), x)
                                 : model->forward(x);
        },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  const auto after = torch::rand({1}, torch::kDouble);

  // The plain program: word mask, start, mask; step after step.
  torch::manual_seed(81);
  std::vector<torch::Tensor> words, starts, masks;
  for (int step = 0; step < 2; ++step) {
    words.push_back(draw_word_mask(x));
    starts.push_back(draw_start(x, mag));
    masks.push_back(draw_mask(x));
  }
  const auto plain_after = torch::rand({1}, torch::kDouble);

  const size_t full = yopo_case ? m : k;
  const size_t per_step = yopo_case ? m + (m - 1) * n : k;
  REQUIRE(model->word_masks.size() == 2 * full);
  REQUIRE(model->masks.size() == 2 * per_step);
  for (size_t i = 0; i < model->word_masks.size(); ++i) {
    CHECK(bit_equal(model->word_masks[i], words[i / full]));
  }
  for (size_t i = 0; i < model->masks.size(); ++i) {
    CHECK(bit_equal(model->masks[i], masks[i / per_step]));
  }
  CHECK(max_abs_diff(model->deltas[0], starts[0]) < 1e-15);
  CHECK(max_abs_diff(model->deltas[full], starts[1]) < 1e-15);
  CHECK(bit_equal(after, plain_after));
}

TEST_CASE(
    "SMART with shared masks: every pass sees the clean pass's masks, the "
    "noise is drawn once",
    "[random][smart]") {
  const auto x = padded_ids();
  const auto o = advtrain::SMARTOptions()
                     .steps(2)
                     .noise_var(0.1)
                     .alpha(1.0)
                     .share_dropout_mask(true);
  auto model = make_drop();
  advtrain::SMART smart(model->embedding, o);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  torch::manual_seed(82);
  step_drop(trainer, model, x);
  step_drop(trainer, model, x);
  const auto after = torch::rand({1}, torch::kDouble);

  // The plain program: the clean pass's mask, then the noise; per step.
  torch::manual_seed(82);
  std::vector<torch::Tensor> masks, noises;
  for (int step = 0; step < 2; ++step) {
    masks.push_back(draw_mask(x));
    noises.push_back(torch::randn(delta_shape(x), torch::kDouble));
  }
  const auto plain_after = torch::rand({1}, torch::kDouble);

  const size_t per_step = o.steps() + 2; // clean, K ascent passes, final
  REQUIRE(model->masks.size() == 2 * per_step);
  for (size_t i = 0; i < model->masks.size(); ++i) {
    CHECK(bit_equal(model->masks[i], masks[i / per_step]));
  }
  // The first ascent pass sees the clean δ (zero) plus the masked noise.
  REQUIRE(model->deltas.size() == 2 * per_step);
  for (int step = 0; step < 2; ++step) {
    const auto expected = noises[step] * mask_of(x) * o.noise_var();
    CHECK(max_abs_diff(model->deltas[step * per_step + 1], expected) < 1e-15);
  }
  CHECK(bit_equal(after, plain_after));
}

TEST_CASE(
    "A pass that throws leaves the generator past the numbers drawn",
    "[random][exceptions]") {
  const auto x = padded_ids();
  auto model = make_drop();
  advtrain::FreeLB freelb(
      model->embedding, advtrain::FreeLBOptions().init_mag(0.5).steps(3));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  torch::manual_seed(83);
  int calls = 0;
  CHECK_THROWS_WITH(
      trainer.step(
          [&] {
            auto out = model->forward(x);
            if (++calls == 2) {
              throw std::runtime_error("pass 2 fails");
            }
            return out;
          },
          [&](const torch::Tensor& out) {
            return cross_entropy(out, batch_labels());
          }),
      Contains("pass 2 fails"));
  const auto after = torch::rand({1}, torch::kDouble);
  torch::manual_seed(83);
  draw_start(x, 0.5);
  draw_mask(x);
  CHECK(bit_equal(after, torch::rand({1}, torch::kDouble)));
  // The slot kept no hook of the failed step: a plain lookup follows.
  CHECK(
      max_abs_diff(
          model->embedding(x),
          torch::nn::functional::embedding(x, model->embedding->weight)) ==
      0.0);
}

TEST_CASE(
    "FreeLBLInf on the table: steps scaled by the max-abs gradient, clamp",
    "[freelb]") {
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  const double alpha = 0.3, eps = 0.2;
  const int64_t k = 3;
  // Plain: K passes of loss/K; δ ← clamp(δ + α·g/max|g|, ±ε) between them.
  auto delta = torch::zeros_like(p0.W);
  Plain sum{
      torch::zeros_like(p0.W),
      torch::zeros_like(p0.A),
      torch::zeros_like(p0.b)};
  bool clamped = false;
  for (int64_t t = 1; t <= k; ++t) {
    const Plain g = plain_grads(p0.with_W(p0.W + delta), x, y);
    sum = sum + g * (1.0 / k);
    if (t < k) {
      const auto moved = delta + alpha * g.W / g.W.abs().max();
      delta = moved.clamp(-eps, eps);
      clamped = clamped || !torch::equal(moved, delta);
    }
  }
  REQUIRE(clamped);
  advtrain::FreeLBLInf freelb(
      *model,
      "embedding",
      advtrain::FreeLBOptions().alpha(alpha).epsilon(eps).steps(k));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(max_diff(model, sgd(p0, sum)) < kTol);
}

TEST_CASE(
    "Every strategy per example: masks shared within a step, no δ after it",
    "[random]") {
  const auto x = padded_ids();
  const bool share = GENERATE(true, false);
  for (const auto& c : strategies()) {
    if (!c.per_example) {
      continue; // weights only (AWP)
    }
    INFO(c.name << ", share_dropout_mask " << share);
    auto model = make_drop();
    const auto attacker = c.per_example(model->embedding, share);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, *attacker);
    torch::manual_seed(84);
    step_drop(trainer, model, x);
    step_drop(trainer, model, x);
    check_masks_per_step(model->masks, static_cast<size_t>(c.passes), share);
    CHECK_FALSE(attacker->is_perturbed());
    CHECK(
        max_abs_diff(
            model->embedding(x),
            torch::nn::functional::embedding(x, model->embedding->weight)) ==
        0.0);
  }
}
