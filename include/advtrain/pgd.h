// PGD: K projected ascent steps, the clean gradient plus the last
// adversarial one; `PGD` (L2) and `PGDLInf`; the `ProjectedAscent` base
// that FreeLB shares.
#pragma once

#include <advtrain/strategy.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of PGD (Madry et al., ICLR 2018).
struct PGDOptions {
  static constexpr const char* kind = "PGD";
  static constexpr Traits traits = Traits().moves_gradient_rows(true);
  /// Radius ε of the ball the perturbation is projected back into.
  TORCH_ARG(double, epsilon) = 1.0;
  /// Size α of each ascent step.
  TORCH_ARG(double, alpha) = 0.3;
  /// Number K of ascent steps (K + 1 forward+backward passes per batch).
  TORCH_ARG(int64_t, steps) = 3;
  /// Whether the K + 1 passes of a step draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

namespace detail {

/// The ascent PGD and FreeLB share: steps of size `alpha` along the gradient
/// under the norm policy `Norm`, projected back into the ball of radius
/// `epsilon` (unbounded when epsilon <= 0); row by row on tables, per
/// example on embedding outputs.
template <typename Norm, typename Options>
class ProjectedAscent : public Strategy<Options> {
 public:
  using Strategy<Options>::Strategy;

 protected:
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    return projected_step<Norm>(
        w, g, this->options_.alpha(), this->options_.epsilon(), origin, geo);
  }
};

} // namespace detail

inline void check_options(const PGDOptions& o, const Attacker& /*attacker*/) {
  const char* kind = PGDOptions::kind;
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
}

/// PGD, Projected Gradient Descent, under the norm policy `Norm`: `PGD`
/// (`L2`) and `PGDLInf` (`LInf`), the aliases below.
///
/// Paper: Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning
/// Models Resistant to Adversarial Attacks", ICLR 2018.
///
/// Rule: K steps `δ ← Π(δ + α * (steepest-ascent direction of g))`, g the
/// loss's gradient with respect to δ, Π the projection back into the `Norm`
/// ball of radius ε: `PGD`, `δ ← Π(δ + α·g/‖g‖)` onto `‖δ‖ ≤ ε`; `PGDLInf`,
/// `δ ← clamp(δ + α·sign(g), ±ε)`. The first step follows the clean
/// gradient, each later one the previous adversarial pass's gradient alone.
/// No random start. On the table ‖·‖ and Π are over the whole table (one δ
/// for the batch); on a `PerturbedEmbedding`, per example over its unpadded
/// tokens. A zero or non-finite ‖g‖ moves nothing.
///
/// Options (`PGDOptions`, each field documented there): `epsilon` ε = 1.0,
/// `alpha` α = 0.3, `steps` K = 3, `share_dropout_mask` = false.
///
/// One `Trainer::step` (K + 1 passes, one optimizer step): clean pass; then
/// K times: attack, clear the gradients (the clean ones are set aside after
/// the first attack and put back before the last pass), adversarial pass;
/// restore; the optimizer sees the clean gradient plus the last adversarial
/// one (the intermediate ones are dropped). Sparse table gradients are
/// accepted.
///
/// Official code: the widely copied `PGD` class (`attack`, `restore`,
/// `backup_grad`, `restore_grad`, `emb_name`), e.g.
/// yangyubuaa/Adversarial_Training `pgd.py` and its training loop: norm over
/// the whole table, projection onto the whole-table ball, clean gradient +
/// last adversarial gradient. Nothing differs but the guard against a zero
/// or non-finite ‖g‖; the per-example target is an extension, with no
/// official counterpart (docs/fidelity.md). The README shows the class's own
/// loop.
///
/// Example:
///   advtrain::PGD pgd(*model, "embedding",
///                     advtrain::PGDOptions().epsilon(1.0).steps(3));
///   advtrain::Trainer trainer(optimizer, pgd);
///   advtrain::StepResult r = trainer.step(
///       [&] { return model->forward(x); }, loss_fn);  // r.passes == 4
template <typename Norm>
class BasicPGD : public detail::ProjectedAscent<Norm, PGDOptions> {
  using Base = detail::ProjectedAscent<Norm, PGDOptions>;

 public:
  using Base::Base;

 protected:
  /// Clean pass; then K times: attack, clear the grads (the clean ones are
  /// set aside after the first attack and put back before the last pass),
  /// adversarial pass. Restore, step.
  void run_step(StepContext& ctx) override {
    ctx.figures.loss = ctx.pass();
    const int64_t k = this->options_.steps();
    std::vector<torch::Tensor> clean;
    for (int64_t t = 0; t < k; ++t) {
      this->attack(/*is_first_attack=*/t == 0);
      if (t == 0) {
        clean = ctx.take_grads();
      } else if (t < k - 1) {
        ctx.clear_grads();
      }
      if (t == k - 1) {
        ctx.put_grads(std::move(clean));
      }
      ctx.figures.adv_loss = ctx.pass();
    }
    ctx.figures.perturbation_norm = this->last_perturbation_norm();
    this->restore();
    ctx.step_optimizer();
  }
};

/// PGD with L2 steps `α * g / ‖g‖` and L2 projection (`BasicPGD` above).
using PGD = BasicPGD<L2>;
/// PGD with sign steps `α * sign(g)` and element-wise clamp to [-ε, ε].
using PGDLInf = BasicPGD<LInf>;

} // namespace advtrain
