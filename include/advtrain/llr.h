// LLR: local linearity regularization. The loss's deviation from its own
// first-order Taylor expansion, maximized over the ε-ball, is added to the
// loss, with the gradient of the loss kept in the graph.
#pragma once

#include <advtrain/strategy.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of LLR (Qin et al., NeurIPS 2019, "Adversarial Robustness through
/// Local Linearization").
struct LLROptions {
  static constexpr const char* kind = "LLR";
  static constexpr Traits traits = Traits().untracked_writes(true);
  /// Radius ε of the ball δ ranges over.
  TORCH_ARG(double, epsilon) = 0.1;
  /// Size α of each ascent step on γ.
  TORCH_ARG(double, alpha) = 0.05;
  /// Ascent steps on γ from the random start.
  TORCH_ARG(int64_t, steps) = 1;
  /// Weight λ of γ(δ*) in the loss.
  TORCH_ARG(double, weight) = 4.0;
  /// Weight μ of |δ*ᵀ∇ₓℓ(x)| in the loss.
  TORCH_ARG(double, grad_weight) = 3.0;
  /// Whether the passes of a step draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const LLROptions& o, const Attacker& /*attacker*/) {
  const char* kind = LLROptions::kind;
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.steps() >= 0, kind, "steps", o.steps(), ">= 0");
  check_option(o.weight() >= 0, kind, "weight", o.weight(), ">= 0");
  check_option(
      o.grad_weight() >= 0, kind, "grad_weight", o.grad_weight(), ">= 0");
}

/// LLR, local linearity regularization, under the norm policy `Norm`: `LLR`
/// (`LInf`, as the paper) and `LLRL2` (`L2`), the aliases below.
///
/// Paper: Qin, Martens, Gowal, Krishnan, Dvijotham, Fawzi, De, Stanforth and
/// Kohli, "Adversarial Robustness through Local Linearization", NeurIPS
/// 2019.
///
/// Rule: with ℓ the loss function's value (the batch's) and x the target
/// (each example's embedded tokens, or the table),
/// `γ(δ) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)|`. δ starts at `U(−ε, ε)` (masked per
/// example), projected into the `Norm` ball, and takes K projected ascent
/// steps of size α along ∇_δ γ (`LLR`: `α·sign`, clamp to [−ε, ε]; `LLRL2`:
/// `α·g/‖g‖`, projection onto `‖δ‖ ≤ ε`); then
/// `loss = ℓ(x) + weight · γ(δ*) + grad_weight · |δ*ᵀ∇ₓℓ(x)|`, with `∇ₓℓ(x)`
/// in the graph. On the table the search covers the whole table, so a
/// sparse table gradient is refused.
///
/// Options (`LLROptions`, each field documented there): `epsilon` ε = 0.1,
/// `alpha` α = 0.05, `steps` K = 1 (0: the random start alone), `weight`
/// λ = 4.0, `grad_weight` μ = 3.0 (the paper's λ, μ), `share_dropout_mask`
/// = false.
///
/// One `Trainer::step` (K + 2 forward passes, one double backward, one
/// optimizer step): a clean pass gives ℓ(x) and `∇ₓℓ(x)` (by
/// `torch::autograd::grad` with `create_graph`, so the parameters get the
/// gradient of the terms that use it); K search passes, each differentiated
/// in δ (ℓ(x) and ∇ₓℓ(x) fixed); a pass at δ*; restore; one backward; the
/// optimizer step. As SMART, the clean graph stays alive while the target is
/// perturbed (untracked writes; restored before the backward).
///
/// Official code: none (DeepMind did not release LLR); the paper's formulas,
/// covered by the plain-math tests. Difference: the paper defines γ per
/// example and averages; the library takes it on the loss function's value
/// (the batch mean the closure returns), since the `LossFunction` gives no
/// per-example losses.
///
/// Example:
///   advtrain::LLR llr(*model, "embedding",
///                     advtrain::LLROptions().epsilon(0.1).steps(1));
///   advtrain::Trainer trainer(optimizer, llr);
///   trainer.step([&] { return model->forward(x); }, loss_fn);
template <typename Norm>
class BasicLLR : public Strategy<LLROptions> {
 public:
  using Strategy::Strategy;

 protected:
  /// A projected step along ∇_δ γ.
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    return detail::projected_step<Norm>(
        w, g, options_.alpha(), options_.epsilon(), origin, geo);
  }

  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    // Every pass ends in the one backward: they share their lookups (per
    // example, one embedding backward).
    std::optional<detail::SharedLookups> shared(std::in_place, target());
    const torch::Tensor clean = ctx.loss_of(ctx.run_forward());
    ++ctx.passes;
    r.loss = clean.detach();
    target().sync(kind());
    const std::vector<torch::Tensor> xs = targets();
    const size_t n = xs.size();
    auto grad_x = torch::autograd::grad(
        {clean},
        xs,
        /*grad_outputs=*/{},
        /*retain_graph=*/true,
        /*create_graph=*/true,
        /*allow_unused=*/true);
    for (size_t i = 0; i < n; ++i) {
      check_sparse(i, grad_x[i], /*accepted=*/false);
      if (!grad_x[i].defined()) {
        grad_x[i] = torch::zeros_like(xs[i]);
      }
    }
    backup();
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < n; ++i) { // the random start, δ from the origin
        const Geometry geo = target().geometry(i);
        const double eps = options_.epsilon();
        torch::Tensor d = detail::masked(
            torch::empty_like(origin(i)).uniform_(-eps, eps), geo);
        Norm::project(d, eps, geo);
        torch::Tensor w = data(i);
        at::add_out(w, origin(i), d);
      }
    }
    // γ at the perturbation now. The search differentiates it in δ (ℓ(x)
    // and ∇ₓℓ(x) fixed); the loss in the parameters (δ* fixed, ∇ₓℓ(x) in
    // the graph).
    const auto gamma = [&](const torch::Tensor& adv, bool search) {
      torch::Tensor linear = torch::zeros({}, clean.options());
      for (size_t i = 0; i < n; ++i) {
        const torch::Tensor d =
            search ? targets()[i] - origin(i) : (data(i) - origin(i)).detach();
        const torch::Tensor gx = search ? grad_x[i].detach() : grad_x[i];
        linear = linear + (d * gx).sum();
      }
      const torch::Tensor c = search ? clean.detach() : clean;
      return std::make_pair((adv - c - linear).abs(), linear.abs());
    };
    for (int64_t k = 0; k < options_.steps(); ++k) {
      const torch::Tensor adv = ctx.loss_of(ctx.run_forward());
      ++ctx.passes;
      const auto grads = torch::autograd::grad(
          {gamma(adv, /*search=*/true).first},
          targets(),
          /*grad_outputs=*/{},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> moved(n);
      for (size_t i = 0; i < n; ++i) {
        torch::Tensor g = grads[i];
        if (const auto geo = step_geometry(i, g)) {
          torch::Tensor w = data(i);
          moved[i] = perturb(i, w, g, *geo, origin(i));
        }
      }
      set_perturbation_norm(detail::combined_norm(moved));
    }
    const torch::Tensor adv = ctx.loss_of(ctx.run_forward());
    shared.reset();
    ++ctx.passes;
    r.adv_loss = adv.detach();
    const auto terms = gamma(adv, /*search=*/false);
    r.regularizer = terms.first.detach();
    r.perturbation_norm = target().norm();
    const torch::Tensor loss = clean + options_.weight() * terms.first +
                               options_.grad_weight() * terms.second;
    ctx.note_finite(loss);
    restore();
    loss.backward();
    ctx.step_optimizer();
  }
};

/// LLR in the L∞ ball, as the paper.
using LLR = BasicLLR<LInf>;
/// LLR in the L2 ball.
using LLRL2 = BasicLLR<L2>;

} // namespace advtrain
