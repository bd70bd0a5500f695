// Strategies that move the model's weights rather than its inputs, against
// plain computations: AWP (alone, and composed with FGM on the embedding
// output in a hand-written loop).

#include "common.h"

#include "catch.h"

#include <cmath>
#include <string>
#include <vector>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

/// AWP's move of one weight, written out: `t + α·g/(‖g‖ + 1e-6)·(‖t‖ +
/// 1e-6)`, clamped to `t0 ± ε·|t0|`.
torch::Tensor awp_move(
    const torch::Tensor& t,
    const torch::Tensor& g,
    const torch::Tensor& t0,
    double alpha,
    double eps) {
  const auto moved = t + alpha * g / (g.norm() + 1e-6) * (t.norm() + 1e-6);
  const auto box = eps * t0.abs();
  return torch::min(torch::max(moved, t0 - box), t0 + box);
}

} // namespace

TEST_CASE("AWP step equals the plain computation", "[awp]") {
  const double alpha = 0.5, eps = 0.05;
  auto model = make_model();
  const auto x = batch_ids(), y = batch_labels();
  const Plain p0 = Plain::of(model);
  advtrain::AWP awp(
      *model,
      "weight",
      advtrain::AWPOptions().alpha(alpha).epsilon(eps).steps(2));
  REQUIRE(
      awp.target_names() ==
      std::vector<std::string>{"embedding.weight", "fc.weight"});
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, awp);
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });

  // Written out: two moves of W and A (the bias is no "weight"), each along
  // the gradient of the pass before it; the step takes the last gradient.
  const Plain g0 = plain_grads(p0, x, y);
  const Plain p1{
      awp_move(p0.W, g0.W, p0.W, alpha, eps),
      awp_move(p0.A, g0.A, p0.A, alpha, eps),
      p0.b};
  const Plain g1 = plain_grads(p1, x, y);
  const Plain p2{
      awp_move(p1.W, g1.W, p0.W, alpha, eps),
      awp_move(p1.A, g1.A, p0.A, alpha, eps),
      p0.b};
  const Plain g2 = plain_grads(p2, x, y);
  CHECK(max_diff(model, sgd(p0, g2)) < kTol);
  // The box binds: some elements sit on it.
  CHECK(
      ((p2.A - p0.A).abs() - eps * p0.A.abs()).abs().min().item<double>() <
      1e-15);
  CHECK(r.passes == 3);
  CHECK(r.loss == Approx(plain_loss(p0, x, y).item<double>()));
  CHECK(r.adv_loss == Approx(plain_loss(p2, x, y).item<double>()));
  CHECK(
      r.perturbation_norm == Approx(std::sqrt(
                                 (p2.W - p0.W).pow(2).sum().item<double>() +
                                 (p2.A - p0.A).pow(2).sum().item<double>())));
  CHECK_FALSE(awp.is_perturbed());
}

TEST_CASE(
    "AWP composes with FGM on the embedding output in a hand-written loop",
    "[awp]") {
  const double alpha = 0.3, eps = 0.1, fgm_eps = 0.5;
  auto model = make_act();
  const auto x = padded_ids(), y = batch_labels();
  const auto W0 = model->embedding->weight.detach().clone();
  const auto A0 = model->fc->weight.detach().clone();
  const auto b0 = model->fc->bias.detach().clone();
  // Two attackers on different tensors: FGM on each example's δ, AWP on the
  // classifier's weight.
  advtrain::FGM fgm(model->embedding, advtrain::FGMOptions().epsilon(fgm_eps));
  advtrain::AWP awp(
      *model, "fc.weight", advtrain::AWPOptions().alpha(alpha).epsilon(eps));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  auto loss = [&] { return cross_entropy(model->forward(x), y); };
  loss().backward(); // clean
  fgm.attack();      // δ along the clean gradient
  loss().backward(); // + the adversarial gradient
  fgm.restore();
  awp.attack(); // fc.weight along the summed gradient
  opt.zero_grad();
  loss().backward(); // the gradient at the perturbed weights alone
  awp.restore();
  opt.step();

  // Written out.
  const auto m = mask_of(x);
  auto plain = [&](const torch::Tensor& W,
                   const torch::Tensor& A,
                   const torch::Tensor& b,
                   const torch::Tensor& d) {
    const auto e = torch::nn::functional::embedding(
        x, W, torch::nn::functional::EmbeddingFuncOptions().padding_idx(0));
    const auto h = ((e + d) * m).sum(1) / m.sum(1).clamp_min(1);
    return cross_entropy(torch::nn::functional::linear(h, A, b), y);
  };
  auto leaves = [](const torch::Tensor& t) {
    return t.clone().requires_grad_();
  };
  auto W = leaves(W0), A = leaves(A0), b = leaves(b0);
  auto d0 =
      leaves(torch::zeros({x.size(0), x.size(1), kHidden}, torch::kDouble));
  const auto gc = torch::autograd::grad({plain(W, A, b, d0)}, {W, A, b, d0});
  // FGM per example: δ_i = ε·g_i/‖g_i‖ over the real tokens.
  const auto gd = gc[3] * m;
  const auto norms = gd.reshape({x.size(0), -1}).norm(2, 1).view({-1, 1, 1});
  const auto delta = fgm_eps * gd / norms.clamp_min(1e-8);
  const auto ga = torch::autograd::grad({plain(W, A, b, delta)}, {A})[0];
  const auto A1 = awp_move(A0, gc[1] + ga, A0, alpha, eps);
  auto W2 = leaves(W0), A2 = leaves(A1), b2 = leaves(b0);
  const auto zero = torch::zeros_like(delta);
  const auto g = torch::autograd::grad({plain(W2, A2, b2, zero)}, {W2, A2, b2});
  CHECK(max_abs_diff(model->embedding->weight, W0 - kLr * g[0]) < kTol);
  CHECK(max_abs_diff(model->fc->weight, A0 - kLr * g[1]) < kTol);
  CHECK(max_abs_diff(model->fc->bias, b0 - kLr * g[2]) < kTol);
  CHECK_FALSE(fgm.is_perturbed());
  CHECK_FALSE(awp.is_perturbed());
}

TEST_CASE("AWP refuses invalid options", "[awp][errors]") {
  auto model = make_model();
  CHECK_THROWS_WITH(
      advtrain::AWP(*model, "weight", advtrain::AWPOptions().steps(0)),
      Contains("AWP: Invalid steps: 0"));
  CHECK_THROWS_WITH(
      advtrain::AWP(*model, "weight", advtrain::AWPOptions().epsilon(-1)),
      Contains("AWP: Invalid epsilon: -1"));
  CHECK_THROWS_WITH(
      advtrain::AWP(*model, "no-such-name"), Contains("no-such-name"));
}

TEST_CASE("AWP skips frozen parameters, as the class does", "[awp]") {
  auto model = make_model();
  model->embedding->weight.requires_grad_(false);
  advtrain::AWP awp(*model);
  CHECK(awp.target_names() == std::vector<std::string>{"fc.weight"});
  model->fc->weight.requires_grad_(false);
  CHECK_THROWS_WITH(advtrain::AWP(*model), Contains("no parameter name"));
}
