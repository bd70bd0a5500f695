// PGD: K projected ascent steps, the clean gradient plus the last
// adversarial one; `PGD` (L2) and `PGDLInf`; the `ProjectedAscent` base
// that FreeLB shares.
#pragma once

#include <advtrain/attacker.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of PGD (Madry et al., ICLR 2018).
struct PGDOptions {
  static constexpr const char* kind = "PGD";
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

  bool moves_gradient_rows_only() const override {
    return true;
  }
};

} // namespace detail

inline void check_options(const PGDOptions& o, const Attacker& /*target*/) {
  const char* kind = PGDOptions::kind;
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
}

/// Projected Gradient Descent under the norm policy `Norm`: K steps
/// `δ ← δ + α * (steepest-ascent direction of g)`, each projected back into
/// the `Norm` ball of radius ε; only the last adversarial gradient is added
/// to the clean one. No random start.
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

/// PGD with L2 steps `α * g / ‖g‖` and L2 projection (docs/design.md,
/// "Protocols").
using PGD = BasicPGD<L2>;
/// PGD with sign steps `α * sign(g)` and element-wise clamp to [-ε, ε].
using PGDLInf = BasicPGD<LInf>;

} // namespace advtrain
