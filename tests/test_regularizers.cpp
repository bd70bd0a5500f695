// The regularizers added to SMART (VAT, R3F, LLR, SMART's proximal point)
// and the unlabeled step against plain computations: their divergences and
// VAT's scaling against loops and finite differences, each protocol written
// out with tensor ops, the regularizer taken on an unlabeled batch, and
// their refusals.

#include "common.h"

#include "catch.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

/// TinyNet's logits at table W, written out.
torch::Tensor tiny_logits(const Plain& p, const torch::Tensor& x) {
  const auto e = p.W.index_select(0, x.reshape(-1))
                     .reshape({x.size(0), x.size(1), p.W.size(1)})
                     .mean(1);
  return e.matmul(p.A.t()) + p.b;
}

/// Σ over rows of Σ_c q_c (log q_c − log p_c), by loops, / rows.
double kl_by_loops(
    const torch::Tensor& q_logits, const torch::Tensor& p_logits) {
  double total = 0.0;
  const auto q = q_logits.softmax(-1), p = p_logits.softmax(-1);
  for (int64_t r = 0; r < q.size(0); ++r) {
    for (int64_t c = 0; c < q.size(1); ++c) {
      const double qc = q[r][c].item<double>(), pc = p[r][c].item<double>();
      total += qc * (std::log(qc) - std::log(pc));
    }
  }
  return total / static_cast<double>(q.size(0));
}

} // namespace

TEST_CASE("kl and symmetric_kl against loops and finite differences", "[vat]") {
  const auto a =
      torch::tensor({{0.3, -1.2, 2.0}, {1.0, 1.0, 0.0}}, torch::kDouble);
  const auto b =
      torch::tensor({{1.0, 0.0, -1.0}, {0.5, 2.0, 0.0}}, torch::kDouble);
  CHECK(
      advtrain::kl(a, b).item<double>() ==
      Approx(kl_by_loops(a, b)).epsilon(1e-12));
  CHECK(
      advtrain::symmetric_kl(a, b).item<double>() ==
      Approx(kl_by_loops(a, b) + kl_by_loops(b, a)).epsilon(1e-12));
  CHECK(advtrain::kl(a, a).item<double>() == Approx(0).margin(1e-15));
  // No stop-gradient on either side (fairseq's _get_symm_kl): autograd
  // against central differences of the loop version, for both arguments.
  auto la = a.clone().requires_grad_(), lb = b.clone().requires_grad_();
  const auto grads =
      torch::autograd::grad({advtrain::symmetric_kl(la, lb)}, {la, lb});
  const double h = 1e-6;
  for (int which = 0; which < 2; ++which) {
    for (int64_t r = 0; r < 2; ++r) {
      for (int64_t c = 0; c < 3; ++c) {
        auto up_a = a.clone(), up_b = b.clone();
        auto dn_a = a.clone(), dn_b = b.clone();
        (which == 0 ? up_a : up_b)[r][c] += h;
        (which == 0 ? dn_a : dn_b)[r][c] -= h;
        const double numeric =
            (kl_by_loops(up_a, up_b) + kl_by_loops(up_b, up_a) -
             kl_by_loops(dn_a, dn_b) - kl_by_loops(dn_b, dn_a)) /
            (2 * h);
        CHECK(
            grads[which][r][c].item<double>() == Approx(numeric).margin(1e-7));
      }
    }
  }
}

TEST_CASE("VAT's scale_l2 against a loop, per example and whole", "[vat]") {
  torch::manual_seed(3);
  const auto x = torch::randn({2, 3, 4}, torch::kDouble);
  x[1].mul_(1e-3);
  const auto mask = torch::ones({2, 3, 1}, torch::kDouble);
  const auto per =
      advtrain::detail::scale_l2(x, 2.5, advtrain::Geometry{mask, {}, {}});
  const auto whole = advtrain::detail::scale_l2(x, 2.5, {});
  // _scale_l2: a = max|x| + 1e-12, ‖x‖ = a·sqrt(Σ(x/a)² + 1e-6).
  auto expected = [](const torch::Tensor& v, double n) {
    double a = 0.0;
    const auto flat = v.reshape(-1);
    for (int64_t k = 0; k < flat.size(0); ++k) {
      a = std::max(a, std::abs(flat[k].item<double>()));
    }
    a += 1e-12;
    double sq = 0.0;
    for (int64_t k = 0; k < flat.size(0); ++k) {
      sq += std::pow(flat[k].item<double>() / a, 2);
    }
    return v * (n / (a * std::sqrt(sq + 1e-6)));
  };
  for (int64_t i = 0; i < 2; ++i) {
    CHECK(max_abs_diff(per[i], expected(x[i], 2.5)) < 1e-12);
  }
  CHECK(max_abs_diff(whole, expected(x, 2.5)) < 1e-12);
  // Per example, each has norm ≈ 2.5 (the 1e-6 term aside).
  CHECK(per[0].norm().item<double>() == Approx(2.5).epsilon(1e-6));
  CHECK(per[1].norm().item<double>() == Approx(2.5).epsilon(1e-6));
}

TEST_CASE("VAT step on the table equals the plain computation", "[vat]") {
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  const Plain p0 = Plain::of(model);
  const double eps = 0.7, xi = 0.05, weight = 0.5;
  advtrain::VAT vat(
      *model,
      "embedding.weight",
      advtrain::VATOptions().epsilon(eps).xi(xi).power_iterations(1).weight(
          weight));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, vat);
  torch::manual_seed(11);
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });

  // Written out: d ~ N(0, 1) over the whole table, scaled to ξ; its KL
  // gradient scaled to ε; the loss task + weight·KL(sg(q) ‖ p(W + r)).
  torch::manual_seed(11);
  const auto d0 = torch::randn_like(p0.W);
  auto scale = [](const torch::Tensor& v, double n) {
    const auto a = v.abs().max() + 1e-12;
    return n * v / (a * ((v / a).pow(2).sum() + 1e-6).sqrt());
  };
  const auto q = tiny_logits(p0, x).detach();
  auto d = scale(d0, xi).requires_grad_();
  const auto probe = advtrain::kl(q, tiny_logits(p0.with_W(p0.W + d), x));
  const auto g = torch::autograd::grad({probe}, {d})[0];
  const auto r_vat = scale(g, eps);
  auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
       b = p0.b.clone().requires_grad_();
  const Plain leaves{W, A, b};
  const auto reg = advtrain::kl(
      tiny_logits(leaves, x).detach(),
      tiny_logits(leaves.with_W(W + r_vat), x));
  const auto loss = plain_loss(leaves, x, y) + weight * reg;
  const auto gs = torch::autograd::grad({loss}, {W, A, b});
  CHECK(r.regularizer == Approx(reg.item<double>()).epsilon(1e-12));
  CHECK(r.perturbation_norm == Approx(r_vat.norm().item<double>()));
  CHECK(r.passes == 3);
  CHECK(max_diff(model, sgd(p0, {gs[0], gs[1], gs[2]})) < kTol);
  CHECK_FALSE(vat.is_perturbed());
}

TEST_CASE("R3F step on the table equals the plain computation", "[r3f]") {
  for (const bool normal : {false, true}) {
    INFO("normal noise " << normal);
    auto model = make_model();
    const auto x = batch_ids(), y = batch_labels();
    const Plain p0 = Plain::of(model);
    const double sigma = 0.05, weight = 0.7;
    advtrain::R3F r3f(
        *model,
        "embedding.weight",
        advtrain::R3FOptions().sigma(sigma).normal_noise(normal).weight(
            weight));
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
    advtrain::Trainer trainer(opt, r3f);
    torch::manual_seed(12);
    const auto r = trainer.step(
        [&] { return model->forward(x); },
        [&](const torch::Tensor& out) { return cross_entropy(out, y); });

    // Written out: z drawn in float32 as torch.distributions draws it, then
    // task + weight·(KL(p ‖ p_z) + KL(p_z ‖ p)) with gradients through both
    // passes (on the table the noised pass reaches W through W + z).
    torch::manual_seed(12);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
    const auto u = normal ? torch::randn(p0.W.sizes(), f32)
                          : torch::rand(p0.W.sizes(), f32);
    const float s = static_cast<float>(sigma);
    const auto z = (normal ? u * s : u * (s - (-s)) + (-s)).to(torch::kDouble);
    auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
         b = p0.b.clone().requires_grad_();
    const Plain leaves{W, A, b};
    const auto clean = tiny_logits(leaves, x);
    const auto noised = tiny_logits(leaves.with_W(W + z), x);
    const auto reg = advtrain::symmetric_kl(clean, noised);
    const auto loss = plain_loss(leaves, x, y) + weight * reg;
    const auto gs = torch::autograd::grad({loss}, {W, A, b});
    CHECK(r.regularizer == Approx(reg.item<double>()).epsilon(1e-9));
    CHECK(r.perturbation_norm == Approx(z.norm().item<double>()));
    CHECK(r.passes == 2);
    CHECK(max_diff(model, sgd(p0, {gs[0], gs[1], gs[2]})) < kTol);
  }
}

TEST_CASE(
    "R3F per example: the noised pass does not reach the table", "[r3f]") {
  auto model = make_act();
  const auto x = padded_ids(), y = batch_labels();
  const auto W0 = model->embedding->weight.detach().clone();
  advtrain::R3F r3f(model->embedding, advtrain::R3FOptions().sigma(0.1));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.0));
  advtrain::Trainer trainer(opt, r3f);
  torch::manual_seed(4);
  trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  const auto got = model->embedding->weight.grad().clone();

  // Written out: the table gets the task's gradient and the regularizer's
  // through the clean output only; z is masked to the real tokens.
  torch::manual_seed(4);
  const auto m = mask_of(x);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  const auto u = torch::rand({x.size(0), x.size(1), kHidden}, f32);
  const float s = 0.1F;
  const auto z = (u * (s - (-s)) + (-s)).to(torch::kDouble) * m;
  auto W = W0.clone().requires_grad_();
  const auto fc_w = model->fc->weight.detach(), fc_b = model->fc->bias.detach();
  auto head = [&](const torch::Tensor& e) {
    return torch::nn::functional::linear(
        (e * m).sum(1) / m.sum(1).clamp_min(1), fc_w, fc_b);
  };
  const auto e = torch::nn::functional::embedding(
      x, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
  const auto clean = head(e);
  const auto noised = head(e.detach() + z);
  const auto loss =
      cross_entropy(clean, y) + advtrain::symmetric_kl(clean, noised);
  const auto expected = torch::autograd::grad({loss}, {W})[0];
  CHECK(max_abs_diff(got, expected) < 1e-12);
  // The noised pass's gradient would reach the table without the detach.
  const auto e2 = torch::nn::functional::embedding(
      x, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
  const auto attached = cross_entropy(head(e2), y) +
                        advtrain::symmetric_kl(head(e2), head(e2 + z));
  const auto W_grad_attached = torch::autograd::grad({attached}, {W})[0];
  CHECK(max_abs_diff(W_grad_attached, expected) > 1e-6);
}

TEST_CASE(
    "VAT on an unlabeled batch: the task on the labeled one, KL on the other",
    "[vat][unlabeled]") {
  auto model = make_act();
  const auto x = padded_ids(), y = batch_labels();
  // Another shape: 2 examples of 4 tokens, one padded.
  const auto u = torch::tensor({{2, 5, 0, 0}, {6, 1, 3, 4}}, torch::kLong);
  const double eps = 1.5;
  advtrain::VAT vat(
      model->embedding,
      advtrain::VATOptions().epsilon(eps).power_iterations(0).weight(0.8));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, vat);
  const auto W = model->embedding->weight.detach().clone();
  const auto fc_w = model->fc->weight.detach().clone();
  const auto fc_b = model->fc->bias.detach().clone();
  torch::manual_seed(8);
  model->forwards = 0;
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); },
      [&] { return model->forward(u); });
  CHECK(model->forwards == 3); // labeled, unlabeled clean, unlabeled at r
  CHECK(r.passes == 3);
  CHECK(r.adv_loss == 0.0);

  // Written out on the unlabeled batch: r = scale(d, ε) per example, d the
  // unmasked draw (no power iteration, as the official code).
  torch::manual_seed(8);
  const auto d = torch::randn({2, 4, kHidden}, torch::kDouble);
  const auto rv = advtrain::detail::scale_l2(
      d,
      eps,
      advtrain::Geometry{torch::ones({2, 4, 1}, torch::kDouble), {}, {}});
  const auto m = mask_of(u);
  auto head = [&](const torch::Tensor& e) {
    return torch::nn::functional::linear(
        (e * m).sum(1) / m.sum(1).clamp_min(1), fc_w, fc_b);
  };
  const auto e = torch::nn::functional::embedding(
      u, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
  const auto reg = advtrain::kl(head(e), head(e + rv));
  CHECK(r.regularizer == Approx(reg.item<double>()).epsilon(1e-12));

  // With weight 0 the update is the labeled task's alone.
  auto m2 = make_act();
  auto m3 = make_act();
  advtrain::VAT vat0(m2->embedding, advtrain::VATOptions().weight(0.0));
  torch::optim::SGD opt2(m2->parameters(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD opt3(m3->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer(opt2, vat0)
      .step(
          [&] { return m2->forward(x); },
          [&](const torch::Tensor& out) { return cross_entropy(out, y); },
          [&] { return m2->forward(u); });
  cross_entropy(m3->forward(x), y).backward();
  opt3.step();
  CHECK(max_diff_all(m2->parameters(), m3->parameters()) < 1e-15);
}

TEST_CASE("Regularizers refuse what they cannot do", "[vat][r3f][errors]") {
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  const auto forward = [&] { return model->forward(x); };
  const auto loss = [&](const torch::Tensor& out) {
    return cross_entropy(out, y);
  };
  const auto W = model->embedding->weight.detach().clone();
  {
    advtrain::FGM fgm(*model, "embedding.weight");
    advtrain::Trainer trainer(opt, fgm);
    CHECK_THROWS_WITH(
        trainer.step(forward, loss, forward),
        Contains("FGM needs labels") && Contains("unlabeled batch"));
  }
  {
    advtrain::VAT vat(*model, "embedding.weight");
    advtrain::Trainer trainer(opt, vat);
    // A one-column output is a regression: no class distribution.
    CHECK_THROWS_WITH(
        trainer.step(
            [&] { return model->forward(x).narrow(1, 0, 1); },
            [&](const torch::Tensor& out) { return out.pow(2).mean(); }),
        Contains("VAT") && Contains("logits [B, C]"));
    CHECK_FALSE(vat.is_perturbed());
  }
  {
    advtrain::R3F r3f(*model, "embedding.weight");
    advtrain::Trainer trainer(opt, r3f);
    CHECK_THROWS_WITH(
        trainer.step(
            [&] { return model->forward(x).select(1, 0); },
            [&](const torch::Tensor& out) { return out.pow(2).mean(); }),
        Contains("R3F") && Contains("regression"));
    CHECK_FALSE(r3f.is_perturbed());
    // R3F draws its noise: no search, so its base has no own-loop attack().
    CHECK_FALSE(r3f.traits().searches());
    CHECK_FALSE(fixture::has_attack<advtrain::R3F>);
    CHECK(fixture::has_attack<advtrain::VAT>);
  }
  CHECK(bit_equal(model->embedding->weight.detach(), W));
  CHECK_THROWS_WITH(
      advtrain::VAT(*model, "embedding.weight", advtrain::VATOptions().xi(0)),
      Contains("VAT: Invalid xi: 0"));
  CHECK_THROWS_WITH(
      advtrain::VAT(
          *model,
          "embedding.weight",
          advtrain::VATOptions().power_iterations(-1)),
      Contains("Invalid power_iterations: -1"));
  CHECK_THROWS_WITH(
      advtrain::R3F(
          *model, "embedding.weight", advtrain::R3FOptions().sigma(0)),
      Contains("R3F: Invalid sigma: 0"));
}

TEST_CASE("LLR step on the table equals the plain computation", "[llr]") {
  const double eps = 0.3, alpha = 0.2, lambda = 4.0, mu = 3.0;
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  const Plain p0 = Plain::of(model);
  advtrain::LLR llr(
      *model,
      "embedding.weight",
      advtrain::LLROptions()
          .epsilon(eps)
          .alpha(alpha)
          .steps(2)
          .weight(lambda)
          .grad_weight(mu));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, llr);
  torch::manual_seed(21);
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });

  // Written out: γ(δ) = |ℓ(W + δ) − ℓ(W) − ⟨δ, ∇_W ℓ⟩|, δ from U(−ε, ε),
  // two sign steps of α clamped to [−ε, ε], then the loss with ∇_W ℓ in the
  // graph.
  torch::manual_seed(21);
  auto d = torch::empty_like(p0.W).uniform_(-eps, eps);
  auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
       b = p0.b.clone().requires_grad_();
  const Plain leaves{W, A, b};
  const auto l0 = plain_loss(leaves, x, y);
  const auto gx = torch::autograd::grad({l0}, {W}, {}, true, true)[0];
  for (int k = 0; k < 2; ++k) {
    auto dv = d.clone().requires_grad_();
    const auto gamma = (plain_loss(p0.with_W(p0.W + dv), x, y) - l0.detach() -
                        (dv * gx.detach()).sum())
                           .abs();
    const auto g = torch::autograd::grad({gamma}, {dv})[0];
    d = (d + alpha * g.sign()).clamp(-eps, eps);
  }
  const auto lin = (d * gx).sum();
  const auto l_star = plain_loss(leaves.with_W(W + d), x, y);
  const auto gamma_star = (l_star - l0 - lin).abs();
  const auto loss = l0 + lambda * gamma_star + mu * lin.abs();
  const auto gs = torch::autograd::grad({loss}, {W, A, b}, {}, true);
  // ∇_W ℓ is in the graph: without it the update would differ.
  const auto lin_fixed = (d * gx.detach()).sum();
  const auto fixed =
      l0 + lambda * (l_star - l0 - lin_fixed).abs() + mu * lin_fixed.abs();
  const auto gs_fixed = torch::autograd::grad({fixed}, {W, A, b});
  CHECK(max_abs_diff(gs[1], gs_fixed[1]) > 1e-6);
  CHECK(r.regularizer == Approx(gamma_star.item<double>()).epsilon(1e-12));
  CHECK(r.adv_loss == Approx(l_star.item<double>()).epsilon(1e-12));
  CHECK(r.passes == 4);
  CHECK(max_diff(model, sgd(p0, {gs[0], gs[1], gs[2]})) < kTol);
  CHECK_FALSE(llr.is_perturbed());
}

TEST_CASE(
    "LLR per example: the gradient term reaches the parameters", "[llr]") {
  const double eps = 0.2, alpha = 0.1, lambda = 2.0, mu = 1.5;
  auto model = make_act();
  const auto x = padded_ids(), y = batch_labels();
  const auto W0 = model->embedding->weight.detach().clone();
  const auto A0 = model->fc->weight.detach().clone();
  const auto b0 = model->fc->bias.detach().clone();
  advtrain::LLRL2 llr(
      model->embedding,
      advtrain::LLROptions()
          .epsilon(eps)
          .alpha(alpha)
          .steps(1)
          .weight(lambda)
          .grad_weight(mu));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, llr);
  torch::manual_seed(22);
  trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });

  // Written out with δ on the lookup output E: an L2 step per example
  // (masked gradient over its norm), projected per example onto ε.
  torch::manual_seed(22);
  const auto m = mask_of(x);
  auto d = torch::empty({x.size(0), x.size(1), kHidden}, torch::kDouble)
               .uniform_(-eps, eps) *
           m;
  auto per_example_norm = [&](const torch::Tensor& t) {
    return t.reshape({x.size(0), -1}).norm(2, 1).view({-1, 1, 1});
  };
  d = d * (eps / per_example_norm(d).clamp_min(eps));
  auto W = W0.clone().requires_grad_(), A = A0.clone().requires_grad_(),
       b = b0.clone().requires_grad_();
  const auto e = torch::nn::functional::embedding(
      x, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
  auto loss_at = [&](const torch::Tensor& delta) {
    const auto h = ((e + delta) * m).sum(1) / m.sum(1).clamp_min(1);
    return cross_entropy(torch::nn::functional::linear(h, A, b), y);
  };
  auto zero = torch::zeros_like(d).requires_grad_();
  const auto l0 = loss_at(zero);
  const auto gx = torch::autograd::grad({l0}, {zero}, {}, true, true)[0];
  {
    auto dv = d.clone().requires_grad_();
    const auto gamma =
        (loss_at(dv) - l0.detach() - (dv * gx.detach()).sum()).abs();
    const auto g = torch::autograd::grad({gamma}, {dv}, {}, true)[0] * m;
    d = d + alpha * g / per_example_norm(g).clamp_min(1e-8);
    d = d * (eps / per_example_norm(d).clamp_min(eps));
  }
  const auto lin = (d * gx).sum();
  const auto loss =
      l0 + lambda * (loss_at(d) - l0 - lin).abs() + mu * lin.abs();
  const auto gs = torch::autograd::grad({loss}, {W, A, b});
  CHECK(max_abs_diff(model->embedding->weight, W0 - kLr * gs[0]) < kTol);
  CHECK(max_abs_diff(model->fc->weight, A0 - kLr * gs[1]) < kTol);
  CHECK(max_abs_diff(model->fc->bias, b0 - kLr * gs[2]) < kTol);
}

TEST_CASE(
    "SMART's proximal point: the teacher's term and moving average",
    "[smart][proximal]") {
  const double mu = 0.7;
  constexpr double beta = 0.6;
  const auto x = batch_ids(), y = batch_labels();
  const auto smart = [=](double weight) {
    return advtrain::SMARTOptions()
        .noise_var(1e-2)
        .proximal_weight(weight)
        .proximal_beta(beta);
  };
  // The same run with and without the proximal term: they differ by the
  // term's gradient alone (no dropout, so the teacher's pass draws nothing).
  auto with = make_model(), without = make_model();
  advtrain::SMART a(*with, "embedding.weight", smart(mu));
  advtrain::SMART b(*without, "embedding.weight", smart(0.0));
  torch::optim::SGD opt_a(with->parameters(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD opt_b(without->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer ta(opt_a, a), tb(opt_b, b);
  const auto forward_a = [&] { return with->forward(x); };
  const auto forward_b = [&] { return without->forward(x); };
  const auto loss = [&](const torch::Tensor& out) {
    return cross_entropy(out, y);
  };
  const Plain theta0 = Plain::of(with);
  torch::manual_seed(31);
  const auto r1 = ta.step(forward_a, loss);
  torch::manual_seed(31);
  tb.step(forward_b, loss);
  // Step 1: the teacher is θ0 itself, so the term and its gradient are 0.
  CHECK(r1.proximal == 0.0);
  CHECK(r1.passes == 4);
  CHECK(equal_all(with->parameters(), without->parameters()));
  // θ̃1 = (1 − β)·θ1 + β·θ0.
  REQUIRE(a.teacher().size() == 3);
  const Plain theta1 = Plain::of(with);
  CHECK(
      max_abs_diff(a.teacher()[0], (1 - beta) * theta1.W + beta * theta0.W) <
      1e-15);
  const auto teacher1 = clone_all(a.teacher());

  torch::manual_seed(32);
  const auto r2 = ta.step(forward_a, loss);
  torch::manual_seed(32);
  tb.step(forward_b, loss);
  // Written out: μ·sym_kl(f(θ1), f(θ̃1)), the teacher's side without grad.
  const Plain teacher{teacher1[0], teacher1[1], teacher1[2]};
  auto W = theta1.W.clone().requires_grad_(),
       A = theta1.A.clone().requires_grad_(),
       B = theta1.b.clone().requires_grad_();
  const auto term = advtrain::sym_kl(
      tiny_logits({W, A, B}, x), tiny_logits(teacher, x).detach());
  const auto g = torch::autograd::grad({term}, {W, A, B});
  CHECK(r2.proximal == Approx(term.item<double>()).epsilon(1e-12));
  CHECK(r2.proximal > 1e-6);
  CHECK(
      max_abs_diff(
          with->embedding->weight,
          without->embedding->weight - kLr * mu * g[0]) < 1e-12);
  CHECK(
      max_abs_diff(with->fc->weight, without->fc->weight - kLr * mu * g[1]) <
      1e-12);
  CHECK(
      max_abs_diff(with->fc->bias, without->fc->bias - kLr * mu * g[2]) <
      1e-12);
  // θ̃2 = (1 − β)·θ2 + β·θ̃1.
  const auto params = with->parameters();
  for (size_t k = 0; k < params.size(); ++k) {
    CHECK(
        max_abs_diff(
            a.teacher()[k],
            (1 - beta) * params[k].detach() + beta * teacher1[k]) < 1e-15);
  }
}

TEST_CASE(
    "An unlabeled batch of the same shape brings its own mask",
    "[vat][unlabeled]") {
  auto model = make_act();
  const auto x = padded_ids(), y = batch_labels();
  // Same shape as x, padded elsewhere.
  const auto u = torch::tensor(
      {{5, 0, 0, 0, 0}, {2, 6, 1, 0, 0}, {4, 4, 3, 2, 1}}, torch::kLong);
  const double eps = 1.2, xi = 0.3;
  const auto W = model->embedding->weight.detach().clone();
  const auto fc_w = model->fc->weight.detach().clone();
  const auto fc_b = model->fc->bias.detach().clone();
  advtrain::VAT vat(
      model->embedding,
      advtrain::VATOptions().epsilon(eps).xi(xi).power_iterations(1));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, vat);
  torch::manual_seed(9);
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); },
      [&] { return model->forward(u); });

  // Written out on u with u's mask: the probe's norm counts u's real tokens.
  torch::manual_seed(9);
  const auto m = mask_of(u);
  auto scale = [](const torch::Tensor& v, double n) {
    const auto flat = v.reshape({v.size(0), -1});
    const auto a = std::get<0>(flat.abs().max(1)).view({-1, 1, 1}) + 1e-12;
    const auto sq =
        (v / a).pow(2).reshape({v.size(0), -1}).sum(1).view({-1, 1, 1});
    return n * v / (a * (sq + 1e-6).sqrt());
  };
  auto head = [&](const torch::Tensor& e) {
    return torch::nn::functional::linear(
        (e * m).sum(1) / m.sum(1).clamp_min(1), fc_w, fc_b);
  };
  const auto e = torch::nn::functional::embedding(
      u, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
  const auto q = head(e).detach();
  auto d = scale(torch::randn({3, 5, kHidden}, torch::kDouble) * m, xi)
               .requires_grad_();
  const auto g = torch::autograd::grad({advtrain::kl(q, head(e + d))}, {d})[0];
  const auto reg = advtrain::kl(q, head(e + scale(g, eps)));
  CHECK(r.regularizer == Approx(reg.item<double>()).epsilon(1e-12));
}

TEST_CASE(
    "SMART's teacher pass throwing leaves parameters and teacher as they were",
    "[smart][proximal]") {
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  advtrain::SMART smart(
      *model,
      "embedding.weight",
      advtrain::SMARTOptions().noise_var(1e-2).proximal_weight(0.5));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  int calls = 0, throw_at = -1;
  const auto forward = [&] {
    if (++calls == throw_at) {
      throw std::runtime_error("teacher pass");
    }
    return model->forward(x);
  };
  const auto loss = [&](const torch::Tensor& out) {
    return cross_entropy(out, y);
  };
  trainer.step(forward, loss); // the teacher now differs from θ
  const auto before = clone_all(model->parameters());
  const auto grads = clone_all(grads_of(model->parameters()));
  const auto teacher = clone_all(smart.teacher());
  calls = 0;
  throw_at = 4; // clean, ascent, final, teacher
  CHECK_THROWS_WITH(trainer.step(forward, loss), Contains("teacher pass"));
  CHECK(equal_all(model->parameters(), before));
  CHECK(equal_all(smart.teacher(), teacher));
  CHECK_FALSE(smart.is_perturbed());
  CHECK(equal_all(grads_of(model->parameters()), grads));
}

TEST_CASE("VAT's own-loop attack() takes the step to epsilon", "[vat]") {
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  const auto W = model->embedding->weight.detach().clone();
  advtrain::VAT vat(
      *model, "embedding.weight", advtrain::VATOptions().epsilon(0.4));
  cross_entropy(model->forward(x), y).backward();
  const auto g = model->embedding->weight.grad().clone();
  vat.attack();
  const auto moved = model->embedding->weight.detach() - W;
  const auto a = g.abs().max() + 1e-12;
  const auto expected = 0.4 * g / (a * ((g / a).pow(2).sum() + 1e-6).sqrt());
  CHECK(max_abs_diff(moved, expected) < 1e-12);
  vat.restore();
  CHECK(bit_equal(model->embedding->weight.detach(), W));
}

TEST_CASE(
    "SMART's norm_eps gives no NaN where it rounds to 0 in the lookup's dtype",
    "[smart]") {
  // float16 rounds 1e-8 to 0, float32 rounds 1e-46 to 0; padded positions
  // have zero rows, which 0 + norm_eps would divide by.
  const auto [dtype, eps] = GENERATE(
      std::make_pair(torch::kHalf, 1e-8), std::make_pair(torch::kFloat, 1e-46));
  INFO(dtype);
  REQUIRE(torch::scalar_tensor(eps, dtype).item<double>() == 0.0);
  torch::manual_seed(3);
  advtrain::PerturbedEmbedding emb(
      torch::nn::EmbeddingOptions(kVocab, kHidden).padding_idx(0));
  emb->to(dtype);
  torch::nn::Linear fc(kHidden, kClasses);
  const auto x = padded_ids();
  const auto m = x.ne(0).unsqueeze(-1).to(torch::kFloat);
  std::vector<torch::Tensor> params = emb->parameters();
  for (const auto& p : fc->parameters()) {
    params.push_back(p);
  }
  advtrain::SMART smart(
      emb, advtrain::SMARTOptions().norm_eps(eps).noise_var(1e-2).steps(2));
  torch::optim::SGD opt(params, torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  const auto r = trainer.step(
      [&] { return fc((emb(x).to(torch::kFloat) * m).sum(1) / m.sum(1)); },
      [&](const torch::Tensor& out) {
        return cross_entropy(out, batch_labels());
      });
  CHECK(std::isfinite(r.regularizer));
  CHECK(r.regularizer > 0);
  for (const auto& p : params) {
    CHECK(torch::isfinite(p).all().item<bool>());
  }
}
