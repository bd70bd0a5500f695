// The label-free regularizers (VAT, R3F) and the unlabeled step against
// plain computations: their divergences and VAT's scaling against loops and
// finite differences, each protocol on the table written out with tensor
// ops, the regularizer taken on an unlabeled batch, and their refusals.

#include "common.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

using namespace fixture;
using Catch::Matchers::Contains;

namespace {

/// TinyNet's logits at table W, written out.
torch::Tensor tiny_logits(const Plain& p, const torch::Tensor& x) {
  const auto e = p.W.index_select(0, x.reshape(-1))
                     .reshape({x.size(0), x.size(1), p.W.size(1)})
                     .mean(1);
  return e.matmul(p.A.t()) + p.b;
}

/// Σ over rows of Σ_c q_c (log q_c − log p_c), by loops, / rows.
double kl_by_loops(const torch::Tensor& q_logits, const torch::Tensor& p_logits) {
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
            grads[which][r][c].item<double>() ==
            Approx(numeric).margin(1e-7));
      }
    }
  }
}

TEST_CASE("VAT's scale_l2 against a loop, per example and whole", "[vat]") {
  torch::manual_seed(3);
  const auto x = torch::randn({2, 3, 4}, torch::kDouble);
  x[1].mul_(1e-3);
  const auto mask = torch::ones({2, 3, 1}, torch::kDouble);
  const auto per = advtrain::detail::scale_l2(x, 2.5, {mask, 0.0});
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
    const auto z =
        (normal ? u * s : u * (s - (-s)) + (-s)).to(torch::kDouble);
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
  const auto loss = cross_entropy(clean, y) +
                    advtrain::symmetric_kl(clean, noised);
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
      d, eps, {torch::ones({2, 4, 1}, torch::kDouble), 0.0});
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
  advtrain::Trainer(opt2, vat0).step(
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
    cross_entropy(model->forward(x), y).backward();
    CHECK_THROWS_WITH(r3f.attack(), Contains("no attack()"));
    CHECK_FALSE(r3f.is_perturbed());
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
      advtrain::R3F(*model, "embedding.weight", advtrain::R3FOptions().sigma(0)),
      Contains("R3F: Invalid sigma: 0"));
}
