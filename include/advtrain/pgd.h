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
class ProjectedAscent : public Attacker {
 public:
  const Options& options() const noexcept {
    return options_;
  }

 protected:
  ProjectedAscent(
      std::vector<torch::Tensor> params, Options o, const char* kind)
      : Attacker(std::move(params), kind), options_(std::move(o)) {}
  ProjectedAscent(
      const NamedParameters& module,
      const std::string& name_contains,
      Options o,
      const char* kind)
      : Attacker(module, name_contains, kind), options_(std::move(o)) {}
  ProjectedAscent(
      const PerturbedEmbedding& embedding, Options o, const char* kind)
      : Attacker({embedding->perturbation()}, kind), options_(std::move(o)) {}

  double perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      double gnorm,
      const torch::Tensor& origin) override {
    if (per_example()) {
      return projected_step_examples<Norm>(
          w, g, options_.alpha(), options_.epsilon(), mask(i));
    }
    return projected_step<Norm>(
        w, g, gnorm, options_.alpha(), options_.epsilon(), origin);
  }

  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

  bool moves_gradient_rows_only() const override {
    return true;
  }

  Options options_;
};

} // namespace detail

/// Projected Gradient Descent under the norm policy `Norm`: K steps
/// `δ ← δ + α * (steepest-ascent direction of g)`, each projected back into
/// the `Norm` ball of radius ε; only the last adversarial gradient is added
/// to the clean one. No random start.
template <typename Norm>
class BasicPGD : public detail::ProjectedAscent<Norm, PGDOptions> {
  using Base = detail::ProjectedAscent<Norm, PGDOptions>;

 public:
  explicit BasicPGD(std::vector<torch::Tensor> params, PGDOptions options = {})
      : Base(std::move(params), std::move(options), "PGD") {
    check();
  }
  BasicPGD(
      const NamedParameters& module,
      const std::string& name_contains,
      PGDOptions options = {})
      : Base(module, name_contains, std::move(options), "PGD") {
    check();
  }
  /// Per-example perturbation of `embedding`'s output (docs/design.md,
  /// "Targets").
  explicit BasicPGD(
      const PerturbedEmbedding& embedding, PGDOptions options = {})
      : Base(embedding, std::move(options), "PGD") {
    check();
  }

 protected:
  /// Clean pass; then K times: attack, clear the grads (the clean ones are
  /// set aside after the first attack and put back before the last pass),
  /// adversarial pass. Restore, step.
  StepResult run_step(StepContext& ctx) override {
    StepResult r;
    r.loss = ctx.pass().item<double>();
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
      r.adv_loss = ctx.pass().item<double>();
    }
    r.perturbation_norm = this->perturbation_norm();
    this->restore();
    ctx.step_optimizer();
    return r;
  }

 private:
  void check() const {
    TORCH_CHECK(
        this->options_.epsilon() > 0,
        "PGD: Invalid epsilon: ",
        this->options_.epsilon(),
        " (must be > 0)");
    TORCH_CHECK(
        this->options_.alpha() >= 0,
        "PGD: Invalid alpha: ",
        this->options_.alpha(),
        " (must be >= 0)");
    TORCH_CHECK(
        this->options_.steps() >= 1,
        "PGD: Invalid steps: ",
        this->options_.steps(),
        " (must be >= 1)");
  }
};

/// PGD with L2 steps `α * g / ‖g‖` and L2 projection (docs/design.md,
/// "Protocols").
using PGD = BasicPGD<L2>;
/// PGD with sign steps `α * sign(g)` and element-wise clamp to [-ε, ε].
using PGDLInf = BasicPGD<LInf>;

} // namespace advtrain
