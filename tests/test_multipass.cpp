// FreeAT, FreeLB and SMART against the same methods written plainly with
// tensor ops; shared dropout masks; attacker state saved and resumed.

#include "common.h"
#include "strategies.h"

#include "catch.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

/// A second batch, different tokens and labels.
torch::Tensor other_ids() {
  return torch::tensor(
      {{6, 5, 1, 1, 0}, {2, 3, 3, 6, 6}, {5, 5, 4, 1, 2}}, torch::kLong);
}
torch::Tensor other_labels() {
  return torch::tensor({1, 1, 0}, torch::kLong);
}

advtrain::StepResult step_on(
    advtrain::Trainer& trainer,
    TinyNet& model,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  return trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
}

/// Plain KL(a ‖ b) between rows of probabilities, summed.
torch::Tensor kl_rows(const torch::Tensor& a, const torch::Tensor& b) {
  return (a * (a.log() - b.log())).sum();
}

/// The stable KL written out, summed over the rows as SMART's ascent takes it
/// (mt-dnn calls it with reduce=False): 2 Σ p (r(p) − r(q)), with
/// r(x) = −log(1/(x + e) − 1 + e) put over one denominator:
/// 1/(x + e) − 1 + e = (1 − x − e + e (x + e)) / (x + e).
torch::Tensor plain_stable_kl(
    const torch::Tensor& p_logits, const torch::Tensor& q_logits) {
  const auto p = torch::softmax(p_logits, 1);
  const auto q = torch::softmax(q_logits, 1).detach();
  const double e = 1e-6;
  auto r = [e](const torch::Tensor& v) {
    return torch::log(v + e) - torch::log(1.0 - v - e + e * (v + e));
  };
  return 2.0 * (p * (r(p.detach()) - r(q))).sum();
}

torch::Tensor plain_sym_kl(
    const torch::Tensor& p_logits, const torch::Tensor& q_logits) {
  const auto p = torch::softmax(p_logits, 1);
  const auto q = torch::softmax(q_logits, 1);
  return (kl_rows(p.detach(), q) + kl_rows(q.detach(), p)) / p_logits.size(0);
}

torch::Tensor plain_logits(const Plain& p, const torch::Tensor& x) {
  const auto e = p.W.index_select(0, x.reshape(-1))
                     .reshape({x.size(0), x.size(1), p.W.size(1)})
                     .mean(1);
  return e.matmul(p.A.t()) + p.b;
}

/// Plain SMART on the table: returns the parameters after one SGD step.
/// `noise` is the N(0, 1) draw, `finite_ascent` false to model the skip.
Plain plain_smart(
    const Plain& p0,
    const torch::Tensor& noise,
    const advtrain::SMARTOptions& o) {
  const auto x = batch_ids();
  const auto y = batch_labels();
  const auto clean = plain_logits(p0, x).detach();
  auto delta = noise * o.noise_var();
  for (int64_t k = 0; k < o.steps(); ++k) {
    auto d = delta.clone().requires_grad_();
    const auto adv =
        plain_stable_kl(plain_logits(p0.with_W(p0.W + d), x), clean);
    const auto g = torch::autograd::grad({adv}, {d})[0];
    const auto moved = delta + o.alpha() * g;
    delta = moved / (std::get<0>(moved.abs().max(1, true)) + o.norm_eps());
  }
  auto W = p0.W.clone().requires_grad_();
  auto A = p0.A.clone().requires_grad_();
  auto b = p0.b.clone().requires_grad_();
  const Plain leaves{W, A, b};
  const auto logits = plain_logits(leaves, x);
  const auto adv_logits = plain_logits(leaves.with_W(W + delta), x);
  const auto loss =
      plain_loss(leaves, x, y) + o.weight() * plain_sym_kl(adv_logits, logits);
  const auto g = torch::autograd::grad({loss}, {W, A, b});
  return sgd(p0, {g[0], g[1], g[2]});
}

} // namespace

TEST_CASE("FreeAT over two batches equals the plain computation", "[freeat]") {
  const bool l2 = GENERATE(false, true);
  const int64_t m = 3;
  const double eps = l2 ? 0.05 : 0.03, alpha = l2 ? 0.04 : 0.02;
  auto model = make_model();
  Plain p = Plain::of(model);
  auto delta = torch::zeros_like(p.W);
  bool bound_hit = false;
  std::vector<double> last_applied; // ‖δ‖ applied in each batch's last replay
  for (const auto& batch :
       {std::make_pair(batch_ids(), batch_labels()),
        std::make_pair(other_ids(), other_labels())}) {
    for (int64_t j = 0; j < m; ++j) {
      if (j == m - 1) {
        last_applied.push_back(delta.norm().item<double>());
      }
      const Plain g =
          plain_grads(p.with_W(p.W + delta), batch.first, batch.second);
      p = sgd(p, g);
      if (l2) {
        delta = delta + alpha * g.W / g.W.norm();
        const double n = delta.norm().item<double>();
        if (n > eps) {
          delta = delta * (eps / n);
          bound_hit = true;
        }
      } else {
        delta = delta + alpha * g.W.sign();
        bound_hit = bound_hit || delta.abs().max().item<double>() > eps;
        delta = delta.clamp(-eps, eps);
      }
    }
  }
  REQUIRE(bound_hit);

  const auto opts =
      advtrain::FreeATOptions().epsilon(eps).alpha(alpha).replays(m);
  std::unique_ptr<advtrain::Attacker> freeat;
  if (l2) {
    freeat = std::make_unique<advtrain::FreeATL2>(*model, "embedding", opts);
  } else {
    freeat = std::make_unique<advtrain::FreeAT>(*model, "embedding", opts);
  }
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, *freeat);
  const auto r1 = step_on(trainer, model, batch_ids(), batch_labels());
  const auto r2 = step_on(trainer, model, other_ids(), other_labels());
  CHECK(max_diff(model, p) < kTol);
  CHECK(r1.passes == m);
  CHECK(r1.perturbation_norm == Approx(last_applied[0]).epsilon(1e-9));
  CHECK(r2.perturbation_norm == Approx(last_applied[1]).epsilon(1e-9));
  CHECK(r2.perturbation_norm > 0.0);
  CHECK(freeat->steps_done() == 2);
  CHECK_FALSE(freeat->is_perturbed());
}

TEST_CASE("FreeLB step equals the plain computation", "[freelb]") {
  struct Case {
    double alpha, eps;
    int64_t k;
    bool projects;
  };
  const Case c = GENERATE(
      Case{0.1, 0.0, 3, false},
      Case{0.3, 1.0, 3, false},
      Case{0.4, 0.5, 4, true},
      Case{0.2, 0.0, 1, false});
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto delta = torch::zeros_like(p0.W);
  Plain sum = p0 * 0.0;
  bool projected = false;
  for (int64_t t = 1; t <= c.k; ++t) {
    const Plain g = plain_grads(p0.with_W(p0.W + delta), x, y);
    sum = sum + g * (1.0 / c.k);
    if (t < c.k) {
      delta = delta + c.alpha * g.W / g.W.norm();
      const double n = delta.norm().item<double>();
      if (c.eps > 0 && n > c.eps) {
        delta = delta * (c.eps / n);
        projected = true;
      }
    }
  }
  REQUIRE(projected == c.projects);

  advtrain::FreeLB freelb(
      *model,
      "embedding",
      advtrain::FreeLBOptions().alpha(c.alpha).epsilon(c.eps).steps(c.k));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  const auto r = step_on(trainer, model, x, y);
  CHECK(max_diff(model, sgd(p0, sum)) < kTol);
  CHECK(r.passes == c.k);
  CHECK(r.loss == Approx(plain_loss(p0, x, y).item<double>()));
  if (c.eps > 0) {
    CHECK(r.perturbation_norm <= c.eps * (1 + 1e-12));
  }
}

TEST_CASE("SMART step equals the plain computation", "[smart]") {
  const auto o = GENERATE(
      advtrain::SMARTOptions(),
      advtrain::SMARTOptions().steps(2).alpha(0.5).weight(0.7),
      advtrain::SMARTOptions().steps(3).alpha(2.0).noise_var(0.1));
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  torch::manual_seed(123);
  const auto noise = torch::randn_like(p0.W);
  const Plain expected = plain_smart(p0, noise, o);

  advtrain::SMART smart(*model, "embedding", o);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  torch::manual_seed(123);
  const auto r = step_on(trainer, model, batch_ids(), batch_labels());
  CHECK(max_diff(model, expected) < kTol);
  CHECK(r.passes == o.steps() + 2);
  CHECK(r.adv_loss > 0.0);
  CHECK_FALSE(smart.is_perturbed());
  // The regularizer matters: the result is not a plain SGD step. (Its
  // gradient on W cancels for this model, whose logits are linear in W + δ;
  // it shows on the linear layer.)
  CHECK(
      max_abs_diff(
          expected.A, sgd(p0, plain_grads(p0, batch_ids(), batch_labels())).A) >
      1e-6);
}

TEST_CASE(
    "SMART skips the regularizer when the ascent is not finite", "[smart]") {
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  advtrain::SMART smart(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  int calls = 0;
  const double inf = std::numeric_limits<double>::infinity();
  WarningCapture warnings;
  const auto r = trainer.step(
      [&] {
        // Every pass after the clean one blows up.
        const auto out = model->forward(x);
        return ++calls == 1 ? out : out * inf;
      },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  // Clean, the ascent pass and the perturbed pass (no pass waits for the
  // device to say the ascent failed); the regularizer is then left out.
  CHECK(calls == 3);
  CHECK(r.passes == 3);
  CHECK(warnings.count("non-finite") == 1);
  CHECK(smart.nonfinite_gradients() == 1);
  CHECK(r.regularizer == 0.0);
  CHECK(r.adv_loss == 0.0);
  CHECK(r.perturbation_norm == 0.0);
  for (const auto& p : model->parameters()) {
    CHECK(torch::isfinite(p).all().item<bool>());
  }
  // The step is the task loss's alone.
  CHECK(max_diff(model, sgd(p0, plain_grads(p0, x, y))) < kTol);
}

TEST_CASE(
    "After a non-finite search gradient SMART and VAT keep delta finite",
    "[smart][vat]") {
  const double inf = std::numeric_limits<double>::infinity();
  for (const std::string name : {"SMART", "VAT"}) {
    for (const bool per_example : {false, true}) {
      INFO(name << (per_example ? " per example" : " on the table"));
      auto table = make_model();
      auto act = make_act();
      const auto x = per_example ? padded_ids() : batch_ids();
      const auto y =
          per_example ? torch::tensor({0, 1, 2}, torch::kLong) : batch_labels();
      std::unique_ptr<advtrain::Attacker> a;
      if (name == "SMART") {
        const auto o = advtrain::SMARTOptions().steps(2);
        a = per_example
                ? std::make_unique<advtrain::SMART>(act->embedding, o)
                : std::make_unique<advtrain::SMART>(*table, "embedding", o);
      } else {
        const auto o = advtrain::VATOptions().power_iterations(2);
        a = per_example
                ? std::make_unique<advtrain::VAT>(act->embedding, o)
                : std::make_unique<advtrain::VAT>(*table, "embedding", o);
      }
      torch::optim::SGD opt(
          per_example ? act->parameters() : table->parameters(),
          torch::optim::SGDOptions(kLr));
      advtrain::Trainer trainer(opt, *a);
      int calls = 0;
      bool finite = true;
      WarningCapture warnings;
      const auto r = trainer.step(
          [&] {
            const auto out = per_example ? act->forward(x) : table->forward(x);
            finite = finite && torch::isfinite(out).all().item<bool>();
            // Every pass after the clean one blows up.
            return ++calls == 1 ? out : out * inf;
          },
          [&](const torch::Tensor& out) { return cross_entropy(out, y); });
      // Clean, two search passes (the second at the δ kept), the final one.
      CHECK(calls == 4);
      CHECK(finite);
      CHECK(a->nonfinite_gradients() == 1);
      CHECK(warnings.count("non-finite") == 1);
      CHECK(r.regularizer == 0.0);
      for (const auto& p :
           per_example ? act->parameters() : table->parameters()) {
        CHECK(torch::isfinite(p).all().item<bool>());
      }
    }
  }
}

TEST_CASE("stable_kl and sym_kl against hand-derived values", "[smart]") {
  // Equal distributions: both are zero.
  const auto a =
      torch::tensor({{0.3, -1.2, 2.0}, {1.0, 1.0, 0.0}}, torch::kDouble);
  CHECK(advtrain::stable_kl(a, a).item<double>() == Approx(0).margin(1e-9));
  CHECK(advtrain::sym_kl(a, a).item<double>() == Approx(0).margin(1e-12));
  // Two classes, p = (1/2, 1/2), q = (e/(1+e), 1/(1+e)) from logits (1, 0):
  // KL(p‖q) + KL(q‖p) = (1/2 − q1) * (log(1/2) − log(q1)) * 2 ... written
  // out: Σ (p − q)(log p − log q).
  const auto p_logits = torch::tensor({{0.0, 0.0}}, torch::kDouble);
  const auto q_logits = torch::tensor({{1.0, 0.0}}, torch::kDouble);
  const double q1 = std::exp(1.0) / (1 + std::exp(1.0)), q2 = 1 - q1;
  const double expected = (0.5 - q1) * (std::log(0.5) - std::log(q1)) +
                          (0.5 - q2) * (std::log(0.5) - std::log(q2));
  CHECK(
      advtrain::sym_kl(p_logits, q_logits).item<double>() ==
      Approx(expected).epsilon(1e-12));
  // One output column: mean squared error, ((1-0)² + (3-1)²) / 2 = 2.5.
  const auto r1 = torch::tensor({{1.0}, {3.0}}, torch::kDouble);
  const auto r2 = torch::tensor({{0.0}, {1.0}}, torch::kDouble);
  CHECK(advtrain::sym_kl(r1, r2).item<double>() == Approx(2.5));
  CHECK(advtrain::stable_kl(r1, r2).item<double>() == Approx(2.5));
  // reduce = false sums the rows: (1 + 4) for the regression, and the rows'
  // sum for the classes (rows * mean).
  CHECK(advtrain::stable_kl(r1, r2, false).item<double>() == Approx(5.0));
  const auto b =
      torch::tensor({{1.0, 0.0, -1.0}, {0.5, 2.0, 0.0}}, torch::kDouble);
  CHECK(
      advtrain::stable_kl(a, b, false).item<double>() ==
      Approx(2 * advtrain::stable_kl(a, b).item<double>()).epsilon(1e-12));
  // float16 logits: computed in float32.
  CHECK(
      advtrain::sym_kl(a.to(torch::kHalf), a.to(torch::kHalf)).scalar_type() ==
      torch::kFloat);
}

TEST_CASE("SMART works with a table tied to the output layer", "[smart]") {
  // logits = mean(E) · Wᵀ: the clean pass's graph saves W, which SMART then
  // perturbs; it must not trip the in-place version check.
  torch::manual_seed(3);
  torch::nn::Embedding emb(kVocab, kHidden);
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto forward = [&] { return emb(x).mean(1).matmul(emb->weight.t()); };
  auto loss = [&](const torch::Tensor& out) { return cross_entropy(out, y); };
  const auto before = emb->weight.detach().clone();
  advtrain::SMART smart(*emb, "weight", advtrain::SMARTOptions().alpha(0.1));
  torch::optim::SGD opt(emb->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  const auto r = trainer.step(forward, loss);
  CHECK(r.adv_loss > 0.0);
  CHECK(torch::isfinite(emb->weight).all().item<bool>());
  CHECK_FALSE(torch::equal(emb->weight, before));
}

namespace {

/// Embedding -> dropout -> mean -> linear; records each forward's mask.
struct DropNetImpl : torch::nn::Module {
  DropNetImpl()
      : embedding(
            register_module("embedding", torch::nn::Embedding(kVocab, 16))),
        drop(register_module("drop", torch::nn::Dropout(0.5))),
        fc(register_module("fc", torch::nn::Linear(16, kClasses))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const auto e = embedding(x);
    masks.push_back(drop(torch::ones_like(e)).detach().ne(0));
    return fc((e * masks.back()).mean(1));
  }
  torch::nn::Embedding embedding;
  torch::nn::Dropout drop;
  torch::nn::Linear fc;
  std::vector<torch::Tensor> masks;
};
TORCH_MODULE(DropNet);

/// Runs two Trainer steps and returns the masks drawn by each pass.
std::vector<torch::Tensor> masks_of(
    advtrain::Attacker& attacker, DropNet& model) {
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.01));
  advtrain::Trainer trainer(opt, attacker);
  for (int s = 0; s < 2; ++s) {
    trainer.step(
        [&] { return model->forward(batch_ids()); },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  return model->masks;
}

} // namespace

TEST_CASE(
    "Shared dropout masks: equal within a step with the option", "[dropout]") {
  const bool share = GENERATE(true, false);
  for (const auto& c : strategies()) {
    if (!c.on_table) {
      continue; // per example only (ASCC)
    }
    INFO(c.name << ", share_dropout_mask " << share);
    torch::manual_seed(5);
    DropNet model;
    const auto attacker = c.on_table(*model, "embedding", share);
    check_masks_per_step(
        masks_of(*attacker, model), static_cast<size_t>(c.passes), share);
  }
}

TEST_CASE("FreeLB shares dropout masks by default", "[dropout]") {
  CHECK(advtrain::FreeLBOptions().share_dropout_mask());
  CHECK_FALSE(advtrain::PGDOptions().share_dropout_mask());
}

namespace {

std::vector<std::pair<torch::Tensor, torch::Tensor>> random_batches(int n) {
  torch::manual_seed(99);
  std::vector<std::pair<torch::Tensor, torch::Tensor>> out;
  for (int i = 0; i < n; ++i) {
    out.emplace_back(
        torch::randint(kVocab, {kBatch, kLength}, torch::kLong),
        torch::randint(kClasses, {kBatch}, torch::kLong));
  }
  return out;
}

std::string temp_path(const std::string& name) {
  return (std::string(P_tmpdir) + "/advtrain_test_" + name);
}

} // namespace

TEST_CASE("FreeAT state saves and resumes bit for bit", "[state]") {
  const auto batches = random_batches(6);
  const auto opts = advtrain::FreeATOptions().epsilon(0.05).alpha(0.02);
  auto train = [&](TinyNet& model,
                   torch::optim::Optimizer& opt,
                   advtrain::Attacker& attacker,
                   int from,
                   int to) {
    advtrain::Trainer trainer(opt, attacker);
    for (int i = from; i < to; ++i) {
      step_on(trainer, model, batches[i].first, batches[i].second);
    }
  };

  auto a = make_model(1);
  torch::optim::Adam opt_a(a->parameters(), torch::optim::AdamOptions(0.01));
  advtrain::FreeAT freeat_a(*a, "embedding", opts);
  train(a, opt_a, freeat_a, 0, 3);
  REQUIRE(freeat_a.deltas().at(0).abs().max().item<double>() > 0);
  torch::save(a, temp_path("model.pt"));
  torch::save(opt_a, temp_path("optimizer.pt"));
  torch::save(freeat_a, temp_path("attacker.pt"));
  train(a, opt_a, freeat_a, 3, 6);

  auto b = make_model(2); // a different initialization, overwritten by load
  torch::optim::Adam opt_b(b->parameters(), torch::optim::AdamOptions(0.01));
  advtrain::FreeAT freeat_b(*b, "embedding", opts);
  torch::load(b, temp_path("model.pt"));
  torch::load(opt_b, temp_path("optimizer.pt"));
  torch::load(freeat_b, temp_path("attacker.pt"));
  CHECK(freeat_b.steps_done() == 3);
  train(b, opt_b, freeat_b, 3, 6);
  CHECK(equal_all(a->parameters(), b->parameters()));

  // Without the attacker's state the run diverges: the state matters.
  auto c = make_model(2);
  torch::optim::Adam opt_c(c->parameters(), torch::optim::AdamOptions(0.01));
  advtrain::FreeAT freeat_c(*c, "embedding", opts);
  torch::load(c, temp_path("model.pt"));
  torch::load(opt_c, temp_path("optimizer.pt"));
  train(c, opt_c, freeat_c, 3, 6);
  CHECK_FALSE(equal_all(a->parameters(), c->parameters()));

  // An archive of another strategy is refused.
  advtrain::PGD pgd(*c, "embedding");
  CHECK_THROWS_WITH(
      torch::load(pgd, temp_path("attacker.pt")), Contains("state of FreeAT"));
  for (const auto* f : {"model.pt", "optimizer.pt", "attacker.pt"}) {
    std::remove(temp_path(f).c_str());
  }
}

TEST_CASE(
    "A throwing closure in any pass of any strategy changes nothing",
    "[trainer]") {
  const int fail_at = GENERATE(1, 2, 3, 4);
  for (const auto& c : strategies()) {
    if (!c.on_table) {
      continue; // per example only (ASCC)
    }
    if (fail_at > c.passes || (c.optimizer_steps > 1 && fail_at > 1)) {
      continue; // later replays keep their completed optimizer steps
    }
    INFO(c.name << ", failing pass " << fail_at);
    auto model = make_model();
    auto params = model->parameters();
    for (auto& p : params) {
      p.mutable_grad() = torch::randn_like(p);
    }
    const auto weights_before = clone_all(params);
    const auto grads_before = clone_all(grads_of(params));
    const auto attacker = c.on_table(*model, "embedding", false);
    torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
    advtrain::Trainer trainer(opt, *attacker);
    int calls = 0;
    CHECK_THROWS_WITH(
        trainer.step(
            [&] {
              if (++calls == fail_at) {
                throw std::runtime_error("forward failed");
              }
              return model->forward(batch_ids());
            },
            [&](const torch::Tensor& out) {
              return cross_entropy(out, batch_labels());
            }),
        Contains("forward failed"));
    CHECK(equal_all(clone_all(params), weights_before));
    CHECK(equal_all(clone_all(grads_of(params)), grads_before));
    CHECK_FALSE(attacker->is_perturbed());
    CHECK(attacker->steps_done() == 0);
  }
}

namespace {

void check_before_optimizer_step(const StrategyCase& c) {
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  const auto attacker = c.on_table(*model, "embedding", false);
  const int64_t per_step = c.optimizer_steps;
  advtrain::Trainer trainer(opt, *attacker);
  int64_t calls = 0;
  bool restored = true;
  trainer.before_optimizer_step([&] {
    ++calls;
    // The targets are restored before it (and with zeroed gradients no
    // step moves them)...
    restored = restored && torch::equal(model->embedding->weight, p0.W);
    // ...and what the hook does to the gradients is what the step uses.
    for (auto& p : model->parameters()) {
      p.mutable_grad().zero_();
    }
  });
  step_on(trainer, model, batch_ids(), batch_labels());
  CHECK(calls == per_step);
  CHECK(restored);
  // Zeroed gradients: SGD without momentum leaves the parameters as they
  // were (FreeAT's replays included).
  CHECK(max_diff(model, p0) == 0.0);

  if (per_step == 1) { // accumulating: no optimizer step, no hook
    trainer.accumulate(
        [&] { return model->forward(batch_ids()); },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
    CHECK(calls == 1);
  }
  // An empty function removes the hook: the step moves the parameters.
  trainer.before_optimizer_step(nullptr);
  opt.zero_grad();
  step_on(trainer, model, batch_ids(), batch_labels());
  CHECK(calls == per_step);
  CHECK(max_diff(model, p0) > 1e-4);
}

} // namespace

TEST_CASE(
    "before_optimizer_step runs once per optimizer step, on final gradients",
    "[trainer]") {
  for (const auto& c : strategies()) {
    INFO(c.name);
    if (c.on_table) { // (per example only: ASCC)
      check_before_optimizer_step(c);
    }
  }
}

namespace {

// A throwaway strategy, to show what a new one costs: options with their
// traits (no search: the noise is the perturbation), a check, and the three
// hooks of the regularizer protocol. Gaussian noise of scale
// sigma on the table, and a symmetric KL with gradients through both outputs
// (R3F-like).
struct NoiseRegOptions {
  static constexpr const char* kind = "NoiseReg";
  static constexpr advtrain::Traits traits =
      advtrain::Traits().searches(false).untracked_writes(true).label_free(
          true);
  TORCH_ARG(double, sigma) = 0.1;
  TORCH_ARG(double, weight) = 1.0;
  TORCH_ARG(bool, share_dropout_mask) = false;
};

void check_options(const NoiseRegOptions& o, const advtrain::Attacker&) {
  advtrain::check_option(
      o.sigma() > 0, NoiseRegOptions::kind, "sigma", o.sigma(), "> 0");
}

class NoiseReg : public advtrain::Regularizer<NoiseRegOptions> {
 public:
  using Regularizer::Regularizer;

 protected:
  void start() override {
    for (size_t i = 0; i < targets().size(); ++i) {
      data(i).add_(torch::randn_like(data(i)), options_.sigma());
    }
  }
  torch::Tensor penalty(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    const auto la = torch::log_softmax(adv, -1);
    const auto lc = torch::log_softmax(clean, -1);
    return ((la.exp() * (la - lc)).sum() + (lc.exp() * (lc - la)).sum()) /
           static_cast<double>(adv.size(0));
  }
  double weight() const override {
    return options_.weight();
  }
};

} // namespace

TEST_CASE(
    "A new strategy on the regularizer protocol: one class, one list entry",
    "[extension]") {
  const auto o = NoiseRegOptions().sigma(0.3).weight(2.0);
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  // Plain: the noise is the step's only draw.
  torch::manual_seed(31);
  const auto z = torch::randn_like(p0.W) * o.sigma();
  auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
       b = p0.b.clone().requires_grad_();
  const Plain leaves{W, A, b};
  const auto clean = plain_logits(leaves, x);
  const auto noised = plain_logits(leaves.with_W(W + z), x);
  const auto p = torch::softmax(clean, 1), q = torch::softmax(noised, 1);
  const auto sym = (q * (q.log() - p.log())).sum() / 3.0 +
                   (p * (p.log() - q.log())).sum() / 3.0;
  const auto loss = plain_loss(leaves, x, y) + o.weight() * sym;
  const auto g = torch::autograd::grad({loss}, {W, A, b});

  NoiseReg reg(*model, "embedding", o);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, reg);
  torch::manual_seed(31);
  const auto r = step_on(trainer, model, x, y);
  CHECK(max_diff(model, sgd(p0, {g[0], g[1], g[2]})) < kTol);
  CHECK(r.passes == 2);
  CHECK(r.regularizer == Approx(sym.item<double>()).epsilon(1e-12));
  CHECK(r.perturbation_norm == Approx(z.norm().item<double>()));
  CHECK_THROWS_WITH(
      NoiseReg(*model, "embedding", NoiseRegOptions().sigma(0)),
      Contains("NoiseReg: Invalid sigma: 0"));
  // One entry makes it part of the general tests' list.
  const auto c = fixture::detail::both<NoiseReg, NoiseRegOptions>(
      "NoiseReg", 2, 1, fixture::StrategyCase::kDrawsRandom, [](bool s) {
        return NoiseRegOptions().share_dropout_mask(s);
      });
  check_before_optimizer_step(c);
}

TEST_CASE(
    "A SMART destroyed while perturbing restores without bumping the version",
    "[smart]") {
  // A table tied to the output layer: the clean graph saves W.
  torch::manual_seed(3);
  torch::nn::Embedding emb(kVocab, kHidden);
  const auto w0 = emb->weight.detach().clone();
  const auto logits = emb(batch_ids()).mean(1).matmul(emb->weight.t());
  const auto loss = cross_entropy(logits, batch_labels());
  loss.backward({}, /*retain_graph=*/true);
  {
    advtrain::SMART smart(
        std::vector<torch::Tensor>{emb->weight},
        advtrain::SMARTOptions().alpha(1.0));
    smart.attack();
    REQUIRE_FALSE(bit_equal(emb->weight.detach(), w0));
  } // destroyed while perturbing
  CHECK(bit_equal(emb->weight.detach(), w0));
  CHECK_NOTHROW(loss.backward()); // the clean graph is still usable
}

TEST_CASE(
    "Every strategy's state saves and loads, another's archive is refused",
    "[state]") {
  const auto& list = strategies();
  for (size_t k = 0; k < list.size(); ++k) {
    const auto& c = list[k];
    if (!c.on_table) {
      continue; // per example only (ASCC): its own test
    }
    INFO(c.name);
    auto model = make_model();
    auto attacker = c.on_table(*model, "embedding", false);
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, *attacker);
    step_on(trainer, model, batch_ids(), batch_labels());
    step_on(trainer, model, batch_ids(), other_labels());
    const std::string file = temp_path("state_" + c.name + ".pt");
    torch::save(*attacker, file);

    // A fresh attacker on a copy of the model, loaded, takes the same next
    // step as the one that saved (FreeAT: its persistent δ comes back).
    auto copy = make_model(11);
    {
      torch::NoGradGuard no_grad;
      const auto from = model->parameters();
      auto to = copy->parameters();
      for (size_t i = 0; i < to.size(); ++i) {
        to[i].copy_(from[i]);
      }
    }
    auto loaded = c.on_table(*copy, "embedding", false);
    torch::load(*loaded, file);
    CHECK(loaded->steps_done() == 2);
    CHECK_FALSE(loaded->is_perturbed());
    torch::optim::SGD opt_copy(
        copy->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer_copy(opt_copy, *loaded);
    torch::manual_seed(41);
    step_on(trainer, model, other_ids(), batch_labels());
    torch::manual_seed(41);
    step_on(trainer_copy, copy, other_ids(), batch_labels());
    CHECK(equal_all(copy->parameters(), model->parameters()));

    size_t next = (k + 1) % list.size();
    while (!list[next].on_table) {
      next = (next + 1) % list.size();
    }
    auto stranger = list[next].on_table(*model, "embedding", false);
    if (std::string(stranger->kind()) != attacker->kind()) {
      CHECK_THROWS_WITH(
          torch::load(*stranger, file),
          Contains(std::string("state of ") + attacker->kind()));
    }
    std::remove(file.c_str());
  }
}

TEST_CASE("Warm-up steps are plain steps, then the strategy's", "[trainer]") {
  auto model = make_model(), plain = make_model();
  advtrain::FGM fgm(*model, "embedding.weight");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD opt_plain(
      plain->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, fgm);
  CHECK(trainer.warmup_steps(2).warmup_steps() == 2);
  const auto x = batch_ids(), y = batch_labels();
  for (int s = 0; s < 2; ++s) {
    const auto r = step_on(trainer, model, x, y);
    CHECK(r.passes == 1);
    CHECK(r.perturbation_norm == 0.0);
    opt_plain.zero_grad();
    cross_entropy(plain->forward(x), y).backward();
    opt_plain.step();
    CHECK(equal_all(model->parameters(), plain->parameters()));
  }
  CHECK(trainer.warmup_steps() == 0);
  CHECK(fgm.steps_done() == 0);
  const auto r = step_on(trainer, model, x, y);
  CHECK(r.passes == 2);
  CHECK(r.perturbation_norm > 0.0);
  CHECK(fgm.steps_done() == 1);
  CHECK_THROWS_WITH(
      trainer.warmup_steps(-1), Contains("Invalid warmup_steps: -1"));
}
