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
class FastGradient : public Strategy<Options> {
 public:
  using Strategy<Options>::Strategy;

 protected:
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& /*origin*/) override {
    return detail::first_step<Norm>(w, g, this->options_.epsilon(), geo);
  }

  void run_step(StepContext& ctx) override {
    this->run_single_attack(ctx);
  }

  bool moves_gradient_rows_only() const override {
    return true;
  }
};

} // namespace detail

/// Options of FGM (Miyato et al., ICLR 2017).
struct FGMOptions {
  static constexpr const char* kind = "FGM";
  /// Radius ε: the perturbation is `ε * g / ‖g‖`.
  TORCH_ARG(double, epsilon) = 1.0;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const FGMOptions& o, const Attacker& /*target*/) {
  check_option(
      o.epsilon() > 0, FGMOptions::kind, "epsilon", o.epsilon(), "> 0");
}

/// Fast Gradient Method: `δ = ε * g / ‖g‖` (L2), one adversarial pass.
class FGM : public detail::FastGradient<L2, FGMOptions> {
 public:
  using FastGradient::FastGradient;
};

/// Options of FGSM (Goodfellow et al., ICLR 2015).
struct FGSMOptions {
  static constexpr const char* kind = "FGSM";
  /// Per-element size ε: the perturbation is `ε * sign(g)`.
  TORCH_ARG(double, epsilon) = 0.01;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const FGSMOptions& o, const Attacker& /*target*/) {
  check_option(
      o.epsilon() > 0, FGSMOptions::kind, "epsilon", o.epsilon(), "> 0");
}

/// Fast Gradient Sign Method: `δ = ε * sign(g)` (L∞), one adversarial pass.
class FGSM : public detail::FastGradient<LInf, FGSMOptions> {
 public:
  using FastGradient::FastGradient;
};

} // namespace advtrain
