// SMART: a smoothness-inducing regularizer, the divergence between the
// outputs at x and x + δ, δ found by a normalized ascent from noise.
#pragma once

#include <advtrain/attacker.h>
#include <advtrain/divergence.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of SMART (Jiang et al., ACL 2020).
struct SMARTOptions {
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
class SMART : public Attacker {
 public:
  explicit SMART(std::vector<torch::Tensor> params, SMARTOptions options = {})
      : Attacker(std::move(params), "SMART"), options_(std::move(options)) {
    untracked_writes_ = true;
    check();
  }
  SMART(
      const NamedParameters& module,
      const std::string& name_contains,
      SMARTOptions options = {})
      : Attacker(module, name_contains, "SMART"), options_(std::move(options)) {
    untracked_writes_ = true;
    check();
  }
  /// Per-example perturbation of `embedding`'s output (docs/design.md,
  /// "Targets"), as in the official code: N normalizes each token's vector.
  explicit SMART(const PerturbedEmbedding& embedding, SMARTOptions options = {})
      : Attacker({embedding->perturbation()}, "SMART"),
        options_(std::move(options)) {
    untracked_writes_ = true;
    check();
  }

  const SMARTOptions& options() const noexcept {
    return options_;
  }

 protected:
  /// `δ ← N(δ + α * g)` with δ = w − origin.
  double perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      double /*gnorm*/,
      const torch::Tensor& origin) override {
    torch::Tensor delta = w - origin;
    delta.add_(g, options_.alpha());
    normalize(delta);
    if (per_example()) {
      w.copy_(delta * mask(i));
      return detail::l2_norm(w);
    }
    at::add_out(w, origin, delta);
    return detail::l2_norm(delta);
  }

  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

  /// The divergence the ascent climbs: summed over the batch.
  torch::Tensor ascent_divergence(
      const torch::Tensor& adv, const torch::Tensor& clean) const {
    if (options_.regression() || detail::is_regression(adv)) {
      const auto dtype = detail::norm_dtype(adv);
      return torch::mse_loss(
          adv.to(dtype), clean.detach().to(dtype), at::Reduction::Sum);
    }
    return stable_kl(adv, clean.detach(), /*reduce=*/false);
  }

  /// The regularizer: a batch mean, with gradients through both outputs.
  torch::Tensor regularizer(
      const torch::Tensor& adv, const torch::Tensor& clean) const {
    if (options_.regression() || detail::is_regression(adv)) {
      const auto dtype = detail::norm_dtype(adv);
      return torch::mse_loss(adv.to(dtype), clean.to(dtype));
    }
    return sym_kl(adv, clean);
  }

  StepResult run_step(StepContext& ctx) override {
    StepResult r;
    const torch::Tensor logits = ctx.run_forward();
    torch::Tensor loss = ctx.loss_of(logits);
    r.loss = loss.item<double>();
    ++ctx.passes;
    backup(); // per example: takes the δ the clean forward made
    const size_t n = targets().size();
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < n; ++i) {
        torch::Tensor w = data(i);
        torch::Tensor noise = torch::randn_like(w);
        if (per_example()) {
          noise.mul_(mask(i));
        }
        w.add_(noise, options_.noise_var());
      }
    }
    bool finite = true;
    for (int64_t k = 0; k < options_.steps() && finite; ++k) {
      const torch::Tensor adv = ascent_divergence(ctx.run_forward(), logits);
      const auto grads = torch::autograd::grad(
          {adv},
          targets(),
          /*grad_outputs=*/{},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      ++ctx.passes;
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < n && finite; ++i) {
        double gnorm = 0.0;
        finite = !grads[i].defined() || usable_gradient(i, grads[i], gnorm) ||
                 gnorm == 0.0;
      }
      if (!finite) {
        break;
      }
      double sq = 0.0;
      for (size_t i = 0; i < n; ++i) {
        torch::Tensor w = data(i);
        const torch::Tensor g =
            grads[i].defined() ? grads[i] : torch::zeros_like(w);
        const double norm = perturb(i, w, g, 0.0, origin(i));
        sq += norm * norm;
      }
      perturbation_norm_ = std::sqrt(sq);
    }
    if (finite) {
      const torch::Tensor adv_logits = ctx.run_forward();
      const torch::Tensor reg = regularizer(adv_logits, logits);
      ++ctx.passes;
      r.regularizer = reg.item<double>();
      r.perturbation_norm = perturbation_norm_;
      {
        torch::NoGradGuard no_grad;
        r.adv_loss = ctx.loss_fn(adv_logits).item<double>();
      }
      loss = loss + options_.weight() * reg;
    }
    restore();
    loss.backward();
    ctx.step_optimizer();
    return r;
  }

 private:
  /// Divides each row (last dimension) by its max-abs value + norm_eps.
  void normalize(torch::Tensor& delta) const {
    const auto rows =
        delta.dim() == 0 ? delta.abs() : delta.abs().amax(-1, true);
    delta.div_(rows + options_.norm_eps());
  }

  void check() const {
    TORCH_CHECK(
        options_.steps() >= 1,
        "SMART: Invalid steps: ",
        options_.steps(),
        " (must be >= 1)");
    TORCH_CHECK(
        options_.alpha() >= 0,
        "SMART: Invalid alpha: ",
        options_.alpha(),
        " (must be >= 0)");
    TORCH_CHECK(
        options_.noise_var() >= 0,
        "SMART: Invalid noise_var: ",
        options_.noise_var(),
        " (must be >= 0)");
    TORCH_CHECK(
        options_.norm_eps() > 0,
        "SMART: Invalid norm_eps: ",
        options_.norm_eps(),
        " (must be > 0)");
    TORCH_CHECK(
        options_.weight() >= 0,
        "SMART: Invalid weight: ",
        options_.weight(),
        " (must be >= 0)");
  }

  SMARTOptions options_;
};

} // namespace advtrain
