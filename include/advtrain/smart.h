// SMART: a smoothness-inducing regularizer, the divergence between the
// outputs at x and x + δ, δ found by a normalized ascent from noise.
#pragma once

#include <advtrain/divergence.h>
#include <advtrain/regularizer.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of SMART (Jiang et al., ACL 2020).
struct SMARTOptions {
  static constexpr const char* kind = "SMART";
  /// Ascent steps K on the perturbation.
  TORCH_ARG(int64_t, steps) = 1;
  /// Ascent step α: `δ ← N(δ + α * g)`.
  TORCH_ARG(double, alpha) = 1e-3;
  /// Scale of the Gaussian start: `δ_0 = N(0, 1) * noise_var`.
  TORCH_ARG(double, noise_var) = 1e-5;
  /// Added to each row's max-abs value in the normalization `N`.
  TORCH_ARG(double, norm_eps) = 1e-6;
  /// Weight of the regularizer added to the task loss.
  TORCH_ARG(double, weight) = 1.0;
  /// Whether the clean and the perturbed passes draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
  /// Treat the model's output as a regression whatever its shape (squared
  /// error in the ascent and the regularizer). Outputs of shape `[B]` or
  /// `[B, 1]` are regressions anyway; set this for several regression
  /// outputs `[B, k]`, which would otherwise be read as k class logits.
  TORCH_ARG(bool, regression) = false;
};

inline void check_options(const SMARTOptions& o, const Attacker& /*target*/) {
  const char* kind = SMARTOptions::kind;
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.noise_var() >= 0, kind, "noise_var", o.noise_var(), ">= 0");
  check_option(o.norm_eps() > 0, kind, "norm_eps", o.norm_eps(), "> 0");
  check_option(o.weight() >= 0, kind, "weight", o.weight(), ">= 0");
}

/// SMART's smoothness-inducing adversarial regularizer: the task loss plus
/// `weight * sym_kl(f(W + δ), f(W))`, δ found by K ascent steps on
/// `stable_kl(f(W + δ), f(W))` summed over the batch (not its mean, as
/// mt-dnn's K-step `SmartPerturbation` in mt_dnn/perturbation.py) from
/// Gaussian noise, each step normalized row by row (`N`: divide by the row's
/// max-abs value + norm_eps). A regression output uses squared error: summed
/// in the ascent, mean in the regularizer. The ascent uses
/// `torch::autograd::grad`, so nothing accumulates into `.grad` until the one
/// final backward; `StepResult::passes` counts the K + 2 forward passes
/// (clean, K ascent steps, final). If an ascent gradient is not finite, the
/// batch is trained on the task loss alone.
///
/// The clean pass's graph stays alive while the table is perturbed, so the
/// table is written without bumping its autograd version and is restored
/// before the final backward. With a table tied to an output layer, that
/// layer's part of the regularizer's gradient is therefore taken at W, not at
/// W + δ.
class SMART : public Regularizer<SMARTOptions> {
 public:
  /// On a `PerturbedEmbedding`, as in the official code: N normalizes each
  /// token's vector.
  using Regularizer::Regularizer;

 protected:
  /// `δ ← N(δ + α * g)` with δ = w − origin.
  double perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    torch::Tensor delta = w - origin;
    delta.add_(g, options_.alpha());
    normalize(delta);
    return detail::place(w, origin, delta, geo);
  }

  /// The start: Gaussian noise `N(0, 1) * noise_var` (masked per example).
  void start() override {
    for (size_t i = 0; i < targets().size(); ++i) {
      torch::Tensor w = data(i);
      w.add_(
          detail::masked(torch::randn_like(w), target().geometry(i)),
          options_.noise_var());
    }
  }

  int64_t search_steps() const override {
    return options_.steps();
  }

  double weight() const override {
    return options_.weight();
  }

  /// The divergence the ascent climbs: summed over the batch.
  torch::Tensor search_objective(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    return options_.regression()
               ? detail::squared_error(adv, clean.detach(), /*reduce=*/false)
               : stable_kl(adv, clean.detach(), /*reduce=*/false);
  }

  /// The regularizer: a batch mean, with gradients through both outputs.
  torch::Tensor penalty(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    return options_.regression()
               ? detail::squared_error(adv, clean, /*reduce=*/true)
               : sym_kl(adv, clean);
  }

 private:
  /// Divides each row (last dimension) by its max-abs value + norm_eps.
  void normalize(torch::Tensor& delta) const {
    const auto rows =
        delta.dim() == 0 ? delta.abs() : delta.abs().amax(-1, true);
    delta.div_(rows + options_.norm_eps());
  }
};

} // namespace advtrain
