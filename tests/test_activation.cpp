// The per-example (activation) target: PerturbedEmbedding, every strategy on
// it against the same per-example math written plainly, and YOPO.

#include "common.h"

#include "catch.h"

#include <cmath>
#include <set>
#include <sstream>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

torch::Tensor plain_loss_at(
    const Plain& p,
    const torch::Tensor& x,
    const torch::Tensor& y,
    const torch::Tensor& delta) {
  const auto m = mask_of(x);
  const auto e =
      p.W.index_select(0, x.reshape(-1)).reshape({x.size(0), x.size(1), -1});
  const auto pooled = ((e + delta) * m).sum(1) / m.sum(1).clamp_min(1);
  const auto logits = pooled.matmul(p.A.t()) + p.b;
  return -(logits - logits.logsumexp(1, true)).gather(1, y.unsqueeze(1)).mean();
}

/// Gradients at δ: {W, A, b, δ}.
std::vector<torch::Tensor> grads_at(
    const Plain& p,
    const torch::Tensor& x,
    const torch::Tensor& y,
    const torch::Tensor& delta) {
  auto W = p.W.clone().requires_grad_(), A = p.A.clone().requires_grad_(),
       b = p.b.clone().requires_grad_(), d = delta.clone().requires_grad_();
  return torch::autograd::grad(
      {plain_loss_at({W, A, b}, x, y, d)}, {W, A, b, d});
}

/// SGD with the parameter gradients of `grads_at` ({W, A, b, ...}).
Plain sgd(const Plain& p, const std::vector<torch::Tensor>& g) {
  return fixture::sgd(p, Plain{g[0], g[1], g[2]});
}

advtrain::StepResult step(
    ActNet& model,
    advtrain::Attacker& attacker,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, attacker);
  return trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
}

std::vector<torch::Tensor> add(
    const std::vector<torch::Tensor>& a,
    const std::vector<torch::Tensor>& b,
    double s = 1.0) {
  return {a[0] + s * b[0], a[1] + s * b[1], a[2] + s * b[2]};
}

} // namespace

TEST_CASE(
    "PerturbedEmbedding without an attacker is nn::Embedding", "[activation]") {
  torch::manual_seed(1);
  advtrain::PerturbedEmbedding pe(10, 4);
  torch::manual_seed(1);
  torch::nn::Embedding plain(10, 4);
  const auto ids = torch::tensor({{1, 2, 3}, {9, 0, 0}}, torch::kLong);
  CHECK(torch::equal(pe(ids), plain(ids)));
  CHECK(pe->named_parameters().keys() == plain->named_parameters().keys());
  // A trained table loads into a plain nn::Embedding.
  std::stringstream buffer;
  torch::save(pe, buffer);
  torch::nn::Embedding loaded(10, 4);
  torch::load(loaded, buffer);
  CHECK(torch::equal(loaded->weight, pe->weight));
  // Armed, but without autograd (evaluation), it adds nothing either.
  advtrain::FGM fgm(pe);
  torch::NoGradGuard no_grad;
  CHECK(torch::equal(pe(ids), plain(ids)));
}

TEST_CASE(
    "Per-example FGM: each example's norm, masked positions zero",
    "[activation]") {
  auto model = make_act();
  const auto x = padded_ids();
  const double eps = 0.7;
  advtrain::FGM fgm(model->embedding, advtrain::FGMOptions().epsilon(eps));
  // A mean over all positions, padding included: padded positions get a
  // gradient, and only the mask keeps δ off them.
  auto unmasked = [&] { return model->fc(model->embedding(x).mean(1)); };
  cross_entropy(unmasked(), batch_labels()).backward();
  const auto g = model->embedding->perturbation()->delta().grad().clone();
  REQUIRE(g.mul(1 - mask_of(x)).abs().max().item<double>() > 0);
  fgm.attack();
  const auto delta = fgm.targets()[0].detach();
  const auto m = mask_of(x);
  for (int64_t i = 0; i < x.size(0); ++i) {
    CHECK(delta[i].norm().item<double>() == Approx(eps).epsilon(1e-12));
  }
  CHECK(delta.mul(1 - m).abs().max().item<double>() == 0.0);
  CHECK(max_abs_diff(delta, eps * unit(g, m)) < 1e-12);
  // One L2 norm over all examples: sqrt(B) * eps.
  CHECK(
      fgm.perturbation_norm() ==
      Approx(eps * std::sqrt(static_cast<double>(x.size(0)))));
  fgm.restore();
  CHECK(delta.abs().max().item<double>() == 0.0);
}

TEST_CASE("Per-example PGD projects example by example", "[activation]") {
  auto model = make_act();
  const auto x = padded_ids();
  const double eps = 0.3;
  advtrain::PGD pgd(
      model->embedding,
      advtrain::PGDOptions().epsilon(eps).alpha(0.25).steps(4));
  cross_entropy(model->forward(x), batch_labels()).backward();
  for (int t = 0; t < 4; ++t) {
    pgd.attack(t == 0);
    const auto d = pgd.targets()[0].detach();
    for (int64_t i = 0; i < x.size(0); ++i) {
      const double n = d[i].norm().item<double>();
      CHECK(n <= eps * (1 + 1e-12));
      CHECK(n == Approx(std::min(eps, 0.25 * (t + 1))).epsilon(0.2));
    }
    cross_entropy(model->forward(x), batch_labels()).backward();
  }
  pgd.restore();
}

TEST_CASE(
    "FGM, FGSM and PGD per example equal the plain computation",
    "[activation]") {
  auto model = make_act();
  const Plain p0 = Plain::of(model);
  const auto x = padded_ids();
  const auto y = batch_labels();
  const auto m = mask_of(x);
  const auto zero =
      torch::zeros({x.size(0), x.size(1), kHidden}, torch::kDouble);
  const auto g0 = grads_at(p0, x, y, zero);
  std::unique_ptr<advtrain::Attacker> attacker;
  Plain expected;
  int passes = 0;
  SECTION("FGM") {
    const auto g1 = grads_at(p0, x, y, 0.8 * unit(g0[3], m));
    expected = sgd(p0, add(g0, g1));
    attacker = std::make_unique<advtrain::FGM>(
        model->embedding, advtrain::FGMOptions().epsilon(0.8));
    passes = 2;
  }
  SECTION("FGSM") {
    const auto g1 = grads_at(p0, x, y, 0.05 * (g0[3] * m).sign());
    expected = sgd(p0, add(g0, g1));
    attacker = std::make_unique<advtrain::FGSM>(
        model->embedding, advtrain::FGSMOptions().epsilon(0.05));
    passes = 2;
  }
  SECTION("PGD") {
    const double eps = 0.5, alpha = 0.3;
    auto delta = zero;
    auto g = g0;
    bool projected = false;
    for (int t = 0; t < 3; ++t) {
      const auto moved = delta + alpha * unit(g[3], m);
      delta = proj(moved, eps);
      projected = projected || !torch::allclose(delta, moved);
      g = grads_at(p0, x, y, delta);
    }
    REQUIRE(projected);
    expected = sgd(p0, add(g0, g));
    attacker = std::make_unique<advtrain::PGD>(
        model->embedding,
        advtrain::PGDOptions().epsilon(eps).alpha(alpha).steps(3));
    passes = 4;
  }
  const auto r = step(model, *attacker, x, y);
  CHECK(max_diff(model, expected) < kTol);
  CHECK(r.passes == passes);
  CHECK_FALSE(attacker->is_perturbed());
  CHECK_FALSE(model->embedding->perturbation()->delta().defined());
}

TEST_CASE("FreeLB per example equals the plain computation", "[activation]") {
  auto model = make_act();
  const Plain p0 = Plain::of(model);
  const auto x = padded_ids();
  const auto y = batch_labels();
  const auto m = mask_of(x);
  const double alpha = 0.3, eps = GENERATE(0.0, 0.2);
  const int k = 3;
  auto delta = torch::zeros({x.size(0), x.size(1), kHidden}, torch::kDouble);
  std::vector<torch::Tensor> sum = {
      torch::zeros_like(p0.W),
      torch::zeros_like(p0.A),
      torch::zeros_like(p0.b)};
  for (int t = 1; t <= k; ++t) {
    const auto g = grads_at(p0, x, y, delta);
    sum = add(sum, g, 1.0 / k);
    if (t < k) {
      delta = delta + alpha * unit(g[3], m);
      if (eps > 0) {
        delta = proj(delta, eps);
      }
    }
  }
  advtrain::FreeLB freelb(
      model->embedding,
      advtrain::FreeLBOptions().alpha(alpha).epsilon(eps).steps(k));
  const auto r = step(model, freelb, x, y);
  CHECK(max_diff(model, sgd(p0, sum)) < kTol);
  CHECK(r.passes == k);
}

TEST_CASE("FreeLB's random start per example", "[activation]") {
  auto model = make_act();
  const auto x = padded_ids();
  const double mag = 0.6;
  advtrain::FreeLB freelb(
      model->embedding, advtrain::FreeLBOptions().init_mag(mag).steps(1));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.0));
  advtrain::Trainer trainer(opt, freelb);
  torch::Tensor seen;
  trainer.step(
      [&] {
        const auto out = model->forward(x);
        seen = model->embedding->perturbation()->delta().detach().clone();
        return out;
      },
      [&](const torch::Tensor& out) {
        return cross_entropy(out, batch_labels());
      });
  const auto m = mask_of(x);
  CHECK(seen.mul(1 - m).abs().max().item<double>() == 0.0);
  const auto lengths = m.sum({1, 2});
  for (int64_t i = 0; i < x.size(0); ++i) {
    const double bound = mag / std::sqrt(lengths[i].item<double>() * kHidden);
    CHECK(seen[i].abs().max().item<double>() <= bound);
    CHECK(seen[i].abs().max().item<double>() > 0.5 * bound);
  }
  CHECK_THROWS_WITH(
      advtrain::FreeLB(
          model->embedding, advtrain::FreeLBOptions().init_mag(-1)),
      Contains("Invalid init_mag"));
}

TEST_CASE("FreeLB++ is FreeLB with TextDefender's settings", "[activation]") {
  // RockyLzy/TextDefender trainer/freelb.py: --adv-learning-rate 0.03,
  // --adv-init-mag 0.05, --adv-max-norm 0 (unbounded); FreeLB++ models are
  // trained with --adv-steps 30.
  const auto o = advtrain::freelb_plus_plus();
  CHECK(o.alpha() == 0.03);
  CHECK(o.init_mag() == 0.05);
  CHECK(o.epsilon() == 0.0);
  CHECK(o.steps() == 30);
  auto model = make_act();
  advtrain::FreeLB freelb(model->embedding, o);
  const auto r = step(model, freelb, padded_ids(), batch_labels());
  CHECK(r.passes == 30);
  CHECK_FALSE(freelb.is_perturbed());
}

TEST_CASE(
    "FreeAT per example over two batches equals the plain computation",
    "[activation]") {
  auto model = make_act();
  Plain p = Plain::of(model);
  const auto x = padded_ids();
  const auto y = batch_labels();
  const auto y2 = torch::tensor({2, 0, 0}, torch::kLong);
  const auto m = mask_of(x);
  const double eps = 0.04, alpha = 0.03;
  const int64_t replays = 2;
  auto delta = torch::zeros({x.size(0), x.size(1), kHidden}, torch::kDouble);
  for (const auto& labels : {y, y2}) {
    for (int64_t j = 0; j < replays; ++j) {
      const auto g = grads_at(p, x, labels, delta * m);
      p = sgd(p, g);
      delta = (delta + alpha * (g[3] * m).sign()).clamp(-eps, eps);
    }
  }
  advtrain::FreeAT freeat(
      model->embedding,
      advtrain::FreeATOptions().epsilon(eps).alpha(alpha).replays(replays));
  step(model, freeat, x, y);
  step(model, freeat, x, y2);
  CHECK(max_diff(model, p) < kTol);
}

TEST_CASE("SMART per example equals the plain computation", "[activation]") {
  auto model = make_act();
  const Plain p0 = Plain::of(model);
  const auto x = padded_ids();
  const auto y = batch_labels();
  const auto m = mask_of(x);
  const auto o = advtrain::SMARTOptions().steps(2).alpha(0.5).noise_var(0.1);
  const auto shape = std::vector<int64_t>{x.size(0), x.size(1), kHidden};
  torch::manual_seed(321);
  auto delta = torch::randn(shape, torch::kDouble) * m * o.noise_var();
  auto logits_at = [&](const Plain& p, const torch::Tensor& d) {
    const auto e =
        p.W.index_select(0, x.reshape(-1)).reshape({x.size(0), x.size(1), -1});
    const auto pooled = ((e + d) * m).sum(1) / m.sum(1).clamp_min(1);
    return pooled.matmul(p.A.t()) + p.b;
  };
  const auto g = smart_grads(logits_at, p0, delta, m, y, o);

  advtrain::SMART smart(model->embedding, o);
  torch::manual_seed(321);
  const auto r = step(model, smart, x, y);
  CHECK(max_diff(model, sgd(p0, Plain{g[0], g[1], g[2]})) < kTol);
  CHECK(r.passes == o.steps() + 2);
}

TEST_CASE(
    "YOPO equals the plain computation, n = 1 is PGD-like",
    "[activation][yopo]") {
  const int64_t n = GENERATE(1, 2);
  const int64_t m_steps = 3;
  const double alpha = 0.2, eps = 0.3;
  torch::manual_seed(9);
  SplitNet model;
  const auto x = padded_ids();
  const auto y = batch_labels();
  const auto mask = mask_of(x);
  // Plain: parameters as leaves, δ updated from the co-state p = ∂L/∂z0.
  std::vector<torch::Tensor> params;
  for (const auto& p : model->parameters()) {
    params.push_back(p.detach().clone().requires_grad_());
  }
  // Order: embedding.weight, layer.weight, layer.bias, fc.weight, fc.bias.
  auto first = [&](const torch::Tensor& e) {
    return torch::tanh(e.matmul(params[1].t()) + params[2]);
  };
  auto rest_loss = [&](const torch::Tensor& z) {
    const auto logits =
        ((z * mask).sum(1) / mask.sum(1).clamp_min(1)).matmul(params[3].t()) +
        params[4];
    return cross_entropy(logits, y);
  };
  const auto e_of = [&] {
    return params[0].index_select(0, x.reshape(-1)).reshape({3, 5, -1});
  };
  auto delta = torch::zeros({3, 5, kHidden}, torch::kDouble);
  std::vector<torch::Tensor> sum(params.size());
  for (int64_t j = 0; j < m_steps; ++j) {
    const auto z0 = first(e_of() + delta);
    const auto loss = rest_loss(z0) / static_cast<double>(m_steps);
    auto gs = params;
    gs.push_back(z0);
    const auto g = torch::autograd::grad({loss}, gs);
    for (size_t i = 0; i < params.size(); ++i) {
      sum[i] = sum[i].defined() ? sum[i] + g[i] : g[i];
    }
    const auto p = g.back().detach();
    const auto e = e_of().detach();
    for (int64_t s = 0; s < n; ++s) {
      auto d = delta.clone().requires_grad_();
      const auto gd = torch::autograd::grad({(first(e + d) * p).sum()}, {d})[0];
      delta = proj(delta + alpha * unit(gd, mask), eps);
    }
  }
  if (n == 1) {
    // With one inner step, YOPO is PGD along ∂L/∂δ itself, by the chain rule
    // ∇δ Σ first(E + δ) ⊙ ∂L/∂z0 = ∂L/∂δ at the δ of the full pass. Check
    // that identity at δ = 0.
    auto d = torch::zeros({3, 5, kHidden}, torch::kDouble).requires_grad_();
    const auto z0 = first(e_of().detach() + d);
    const auto direct =
        torch::autograd::grad({rest_loss(z0)}, {d}, {}, true)[0];
    const auto p = torch::autograd::grad({rest_loss(z0)}, {z0})[0];
    const auto via_h =
        torch::autograd::grad({(first(e_of().detach() + d) * p).sum()}, {d})[0];
    CHECK(max_abs_diff(direct, via_h) < 1e-12);
  }

  int forwards = 0;
  advtrain::YOPO yopo(
      model->embedding,
      [&](const torch::Tensor& e) { return model->first(e); },
      advtrain::YOPOOptions()
          .steps(m_steps)
          .inner_steps(n)
          .alpha(alpha)
          .epsilon(eps)
          .init_mag(0));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, yopo);
  const auto r = trainer.step(
      [&] {
        ++forwards;
        return model->rest(yopo.first(model->embedding(x)), x);
      },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(forwards == m_steps);
  CHECK(r.passes == m_steps);
  CHECK(yopo.inner_passes() == (m_steps - 1) * n);
  const auto now = model->parameters();
  for (size_t i = 0; i < now.size(); ++i) {
    CHECK(max_abs_diff(now[i], params[i].detach() - kLr * sum[i]) < kTol);
  }
}

TEST_CASE(
    "A regularizer's passes share the lookup of the same ids, and the step "
    "is the same",
    "[activation][smart][vat][llr]") {
  const auto x = padded_ids();
  const auto y = batch_labels();
  for (const std::string name : {"SMART", "VAT", "LLR"}) {
    INFO(name);
    // Two steps of the strategy (SMART with its proximal term, whose pass
    // at the teacher's parameters must look up again), the forward taking
    // `ids()` each pass; returns the parameters after them and, for each
    // step, the node each pass's lookup output hangs from (e = lookup + δ:
    // the lookup is e's first input; passes without grad have none).
    using Nodes = std::vector<std::shared_ptr<torch::autograd::Node>>;
    const auto run = [&](const std::function<torch::Tensor()>& ids) {
      auto model = make_act();
      std::unique_ptr<advtrain::Attacker> a;
      if (name == "SMART") {
        a = std::make_unique<advtrain::SMART>(
            model->embedding,
            advtrain::SMARTOptions().steps(2).alpha(0.5).proximal_weight(0.7));
      } else if (name == "VAT") {
        a = std::make_unique<advtrain::VAT>(
            model->embedding, advtrain::VATOptions().power_iterations(2));
      } else {
        a = std::make_unique<advtrain::LLR>(
            model->embedding, advtrain::LLROptions().steps(2));
      }
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
      advtrain::Trainer trainer(opt, *a);
      std::vector<Nodes> steps;
      torch::manual_seed(5);
      for (int step = 0; step < 2; ++step) {
        steps.emplace_back();
        trainer.step(
            [&] {
              const torch::Tensor t = ids();
              const auto e = model->embedding(t);
              if (e.grad_fn()) {
                steps.back().push_back(e.grad_fn()->next_edges()[0].function);
              }
              const auto m = mask_of(t);
              return model->fc((e * m).sum(1) / m.sum(1).clamp_min(1));
            },
            [&](const torch::Tensor& out) { return cross_entropy(out, y); });
      }
      return std::make_pair(clone_all(model->parameters()), steps);
    };
    const auto [shared, shared_nodes] = run([&] { return x; });
    const auto [apart, apart_nodes] = run([&] { return x.clone(); });
    for (size_t step = 0; step < 2; ++step) {
      // Clean, two search passes, the final one.
      REQUIRE(shared_nodes[step].size() == 4);
      REQUIRE(apart_nodes[step].size() == 4);
      CHECK(
          std::string(shared_nodes[step][0]->name()).find("Embedding") !=
          std::string::npos);
      std::set<const torch::autograd::Node*> one, each;
      for (size_t k = 0; k < 4; ++k) {
        one.insert(shared_nodes[step][k].get());
        each.insert(apart_nodes[step][k].get());
      }
      CHECK(one.size() == 1);  // the same ids: one lookup
      CHECK(each.size() == 4); // new ids each pass: a lookup each
    }
    // One lookup or one per pass, the same steps (the teacher's term
    // included: it is not 0 at the second step).
    CHECK(max_diff_all(shared, apart) < 1e-12);
  }
}

TEST_CASE("YOPO rejects a forward that skips yopo.first", "[yopo]") {
  torch::manual_seed(9);
  SplitNet model;
  advtrain::YOPO yopo(model->embedding, [&](const torch::Tensor& e) {
    return model->first(e);
  });
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, yopo);
  const auto before = clone_all(model->parameters());
  CHECK_THROWS_WITH(
      trainer.step(
          [&] {
            const auto x = padded_ids();
            return model->rest(model->first(model->embedding(x)), x);
          },
          [&](const torch::Tensor& out) {
            return cross_entropy(out, batch_labels());
          }),
      Contains("yopo.first"));
  CHECK(equal_all(clone_all(model->parameters()), before));
  CHECK_THROWS_WITH(
      advtrain::YOPO(
          model->embedding,
          [](const torch::Tensor& e) { return e; },
          advtrain::YOPOOptions().inner_steps(0)),
      Contains("Invalid inner_steps: 0"));
}
