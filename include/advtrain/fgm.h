// The fast-gradient strategies: `FGM` (ε·g/‖g‖) and `FGSM` (ε·sign(g)),
// one step under two norm policies, on the table or per example.
#pragma once

#include <advtrain/attacker.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// The fast-gradient step shared by FGSM and FGM: one step of size ε in the
/// steepest-ascent direction of `Norm`, no projection.
template <typename Norm, typename Options>
class FastGradient : public Attacker {
 public:
  const Options& options() const noexcept {
    return options_;
  }

 protected:
  FastGradient(std::vector<torch::Tensor> params, Options o, const char* what)
      : Attacker(std::move(params), what), options_(std::move(o)) {
    check(what);
  }
  FastGradient(
      const NamedParameters& module,
      const std::string& name_contains,
      Options o,
      const char* what)
      : Attacker(module, name_contains, what), options_(std::move(o)) {
    check(what);
  }
  FastGradient(const PerturbedEmbedding& embedding, Options o, const char* what)
      : Attacker({embedding->perturbation()}, what), options_(std::move(o)) {
    check(what);
  }

  double perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      double gnorm,
      const torch::Tensor& /*origin*/) override {
    if (per_example()) {
      return detail::projected_step_examples<Norm>(
          w, g, options_.epsilon(), /*eps=*/0.0, mask(i));
    }
    return Norm::step(w, g, options_.epsilon(), gnorm);
  }

  StepResult run_step(StepContext& ctx) override {
    return run_single_attack(ctx);
  }

  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

  bool moves_gradient_rows_only() const override {
    return true;
  }

 private:
  void check(const char* what) const {
    TORCH_CHECK(
        options_.epsilon() > 0,
        what,
        ": Invalid epsilon: ",
        options_.epsilon(),
        " (must be > 0)");
  }

  Options options_;
};

} // namespace detail

/// Options of FGM (Miyato et al., ICLR 2017).
struct FGMOptions {
  /// Radius ε: the perturbation is `ε * g / ‖g‖`.
  TORCH_ARG(double, epsilon) = 1.0;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

/// Fast Gradient Method: `δ = ε * g / ‖g‖` (L2), one adversarial pass.
class FGM : public detail::FastGradient<L2, FGMOptions> {
 public:
  explicit FGM(std::vector<torch::Tensor> params, FGMOptions options = {})
      : FastGradient(std::move(params), std::move(options), "FGM") {}
  FGM(const NamedParameters& module,
      const std::string& name_contains,
      FGMOptions options = {})
      : FastGradient(module, name_contains, std::move(options), "FGM") {}
  /// Per-example perturbation of `embedding`'s output (docs/design.md,
  /// "Targets").
  explicit FGM(const PerturbedEmbedding& embedding, FGMOptions options = {})
      : FastGradient(embedding, std::move(options), "FGM") {}
};

/// Options of FGSM (Goodfellow et al., ICLR 2015).
struct FGSMOptions {
  /// Per-element size ε: the perturbation is `ε * sign(g)`.
  TORCH_ARG(double, epsilon) = 0.01;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

/// Fast Gradient Sign Method: `δ = ε * sign(g)` (L∞), one adversarial pass.
class FGSM : public detail::FastGradient<LInf, FGSMOptions> {
 public:
  explicit FGSM(std::vector<torch::Tensor> params, FGSMOptions options = {})
      : FastGradient(std::move(params), std::move(options), "FGSM") {}
  FGSM(
      const NamedParameters& module,
      const std::string& name_contains,
      FGSMOptions options = {})
      : FastGradient(module, name_contains, std::move(options), "FGSM") {}
  /// Per-example perturbation of `embedding`'s output (docs/design.md,
  /// "Targets").
  explicit FGSM(const PerturbedEmbedding& embedding, FGSMOptions options = {})
      : FastGradient(embedding, std::move(options), "FGSM") {}
};

} // namespace advtrain
