// The fast-gradient strategies: `FGM` (ε·g/‖g‖) and `FGSM` (ε·sign(g)),
// one step under two norm policies, on the table or per example.
#pragma once

#include <advtrain/strategy.h>

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
};

} // namespace detail

/// Options of FGM (Miyato et al., ICLR 2017).
struct FGMOptions {
  static constexpr const char* kind = "FGM";
  static constexpr Traits traits = Traits().moves_gradient_rows(true);
  /// Radius ε: the perturbation is `ε * g / ‖g‖`.
  TORCH_ARG(double, epsilon) = 1.0;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const FGMOptions& o, const Attacker& /*attacker*/) {
  check_option(
      o.epsilon() > 0, FGMOptions::kind, "epsilon", o.epsilon(), "> 0");
}

/// FGM, the Fast Gradient Method: one L2 step `δ = ε·g/‖g‖`, one
/// adversarial pass.
///
/// Paper: Miyato, Dai and Goodfellow, "Adversarial Training Methods for
/// Semi-Supervised Text Classification", ICLR 2017.
///
/// Rule: `δ = ε·g/‖g‖`, g the loss's gradient with respect to δ, no
/// projection. On the weight table ‖·‖ is taken over the whole table (one δ
/// for the batch, one norm per target tensor; rows of tokens not in the
/// batch have a zero gradient and stay put); on a `PerturbedEmbedding`, per
/// example over its unpadded tokens (masked positions keep δ = 0). A zero or
/// non-finite ‖g‖ moves nothing.
///
/// Options (`FGMOptions`, each field documented there): `epsilon` ε = 1.0,
/// `share_dropout_mask` = false.
///
/// One `Trainer::step` (2 passes, one optimizer step): clean pass; attack;
/// adversarial pass, its gradients added to the clean ones; restore; the
/// optimizer sees the sum of the two gradients. Sparse table gradients are
/// accepted (only the rows they name move).
///
/// Official code: the widely copied `FGM` class (`attack`, `restore`,
/// `emb_name`), e.g. yangyubuaa/Adversarial_Training `fgm.py` and its
/// training loop. Nothing differs but the guard above (the class checks only
/// `norm != 0` or NaN); the per-example target is an extension, with no
/// official counterpart (docs/fidelity.md).
///
/// Example, in your own loop (`Trainer::step` runs the same protocol):
///   advtrain::FGM fgm(*model, "embedding",
///                     advtrain::FGMOptions().epsilon(1.0));
///   loss_fn(model->forward(x), y).backward();  // clean
///   fgm.attack();                              // W += ε·g/‖g‖, backed up
///   loss_fn(model->forward(x), y).backward();  // adversarial, accumulated
///   fgm.restore();                             // W back, bit for bit
///   optimizer.step(); optimizer.zero_grad();
class FGM : public detail::FastGradient<L2, FGMOptions> {
 public:
  using FastGradient::FastGradient;
};

/// Options of FGSM (Goodfellow et al., ICLR 2015).
struct FGSMOptions {
  static constexpr const char* kind = "FGSM";
  static constexpr Traits traits = Traits().moves_gradient_rows(true);
  /// Per-element size ε: the perturbation is `ε * sign(g)`.
  TORCH_ARG(double, epsilon) = 0.01;
  /// Whether the clean and the adversarial pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const FGSMOptions& o, const Attacker& /*attacker*/) {
  check_option(
      o.epsilon() > 0, FGSMOptions::kind, "epsilon", o.epsilon(), "> 0");
}

/// FGSM, the Fast Gradient Sign Method: one L∞ step `δ = ε·sign(g)`, one
/// adversarial pass; FGM's step under the `LInf` norm policy (fgsm.h
/// includes this header).
///
/// Paper: Goodfellow, Shlens and Szegedy, "Explaining and Harnessing
/// Adversarial Examples", ICLR 2015.
///
/// Rule: `δ = ε·sign(g)`, g the loss's gradient with respect to δ, element by
/// element (ε is a per-element size), no projection; the same on the table
/// and per example, where masked positions keep δ = 0. Elements with a zero
/// gradient (rows of tokens not in the batch) stay put; a zero or
/// non-finite gradient norm moves nothing.
///
/// Options (`FGSMOptions`, each field documented there): `epsilon` ε = 0.01,
/// `share_dropout_mask` = false.
///
/// One `Trainer::step` (2 passes, one optimizer step), as FGM's: clean pass;
/// attack; adversarial pass, its gradients added to the clean ones; restore;
/// the optimizer sees the sum of the two gradients. Sparse table gradients
/// are accepted.
///
/// Official code: none for NLP; the FGM class with `ε·sign(g)`, covered by
/// the plain-math tests (docs/fidelity.md).
///
/// Example:
///   advtrain::FGSM fgsm(*model, "embedding",
///                       advtrain::FGSMOptions().epsilon(0.01));
///   advtrain::Trainer trainer(optimizer, fgsm);
///   trainer.step([&] { return model->forward(x); }, loss_fn);
class FGSM : public detail::FastGradient<LInf, FGSMOptions> {
 public:
  using FastGradient::FastGradient;
};

} // namespace advtrain
