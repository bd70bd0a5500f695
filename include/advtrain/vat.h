// VAT: virtual adversarial training, a label-free regularizer: the KL
// divergence between the outputs at x and at x + r, r found by power
// iteration from a random direction.
#pragma once

#include <advtrain/divergence.h>
#include <advtrain/regularizer.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of VAT (Miyato et al., ICLR 2017); the defaults are the official
/// code's (tensorflow/models, research/adversarial_text).
struct VATOptions {
  static constexpr const char* kind = "VAT";
  static constexpr Traits traits =
      Traits().untracked_writes(true).label_free(true);
  /// Norm of the perturbation r (`perturb_norm_length`).
  TORCH_ARG(double, epsilon) = 5.0;
  /// Norm of the finite-difference probe of each power iteration
  /// (`small_constant_for_finite_diff`).
  TORCH_ARG(double, xi) = 0.1;
  /// Power iterations (`num_power_iteration`); 0 takes r along the random
  /// direction.
  TORCH_ARG(int64_t, power_iterations) = 1;
  /// Weight of the regularizer added to the task loss (`adv_reg_coeff`).
  TORCH_ARG(double, weight) = 1.0;
  /// Whether the clean and the perturbed passes draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const VATOptions& o, const Attacker& /*attacker*/) {
  const char* kind = VATOptions::kind;
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.xi() > 0, kind, "xi", o.xi(), "> 0");
  check_option(
      o.power_iterations() >= 0,
      kind,
      "power_iterations",
      o.power_iterations(),
      ">= 0");
  check_option(o.weight() >= 0, kind, "weight", o.weight(), ">= 0");
}

namespace detail {

/// The official `_scale_l2`: `n · x / ‖x‖`, the norm taken per example (over
/// all dimensions but the first) or over the whole tensor as `geo` says, as
/// `a · sqrt(Σ(x / a)² + 1e-6)` with `a = max|x| + 1e-12` (no overflow, and
/// a zero x stays zero).
inline torch::Tensor scale_l2(
    const torch::Tensor& in, double n, const Geometry& geo) {
  // In float32 at least (LibTorch's CPU has no float16 sqrt), returned in
  // the input's dtype.
  const torch::Tensor x =
      in.to(at::promote_types(in.scalar_type(), torch::kFloat));
  if (!geo.per_example()) {
    const auto a = x.abs().max() + 1e-12;
    return (n * (x / (a * ((x / a).pow(2).sum() + 1e-6).sqrt())))
        .to(in.scalar_type());
  }
  const auto a = per_example(example_rows(x.abs()).amax(1), x) + 1e-12;
  const auto sq = per_example(example_rows((x / a).pow(2)).sum(1), x);
  return (n * (x / (a * (sq + 1e-6).sqrt()))).to(in.scalar_type());
}

} // namespace detail

/// VAT, virtual adversarial training: a label-free regularizer, the KL
/// divergence between the outputs at x and at x + r, r found by power
/// iteration from a random direction.
///
/// Paper: Miyato, Dai and Goodfellow, "Adversarial Training Methods for
/// Semi-Supervised Text Classification", ICLR 2017.
///
/// Rule: the task loss plus `weight · KL(sg(q) ‖ p(x + r))` (batch mean), q
/// and p the softmaxes of the clean and perturbed outputs: `d ~ N(0, 1)`;
/// `power_iterations` (K) times `d ← scale(mask·d, ξ)` and
/// `d ← ∇_d KL(sg(q) ‖ p(x + d))`; then `r = scale(d, ε)`, `scale` being
/// `detail::scale_l2` (the official `_scale_l2`: per example on embedding
/// outputs, over the whole tensor on a table). Classification outputs only
/// (logits `[B, C]`, C ≥ 2).
///
/// Options (`VATOptions`, each field documented there with its official
/// flag; the official defaults): `epsilon` ε = 5.0, `xi` ξ = 0.1,
/// `power_iterations` K = 1, `weight` = 1.0, `share_dropout_mask` = false.
///
/// One `Trainer::step` (`Regularizer`'s protocol; K + 2 forward passes, one
/// backward, one optimizer step): clean pass; K power iterations, each a
/// pass and a gradient by `torch::autograd::grad`; a pass at r; restore; the
/// backward. Label-free: with `Trainer::step(forward, loss_fn, unlabeled)`
/// the KL is taken on the unlabeled batch after a clean pass there (one pass
/// more), as the official code takes it on its unlabeled batch; with
/// `Trainer::step(forward, loss_fn)`, on the labeled batch, reusing the
/// task pass's output as q.
///
/// Official code: tensorflow/models
/// `research/adversarial_text/adversarial_losses.py`
/// (`virtual_adversarial_loss`, `_scale_l2`, `_mask_by_length`,
/// `_kl_divergence_with_logits`), `graphs.py`. As there, d is masked inside
/// the power iteration only, so with `power_iterations(0)` the random
/// direction is not masked. Differences: the mask drops padded positions
/// only (the official `length − 1` also drops the eos token); the binary
/// branch (one logit, sigmoid) is not implemented: outputs `[B]` and
/// `[B, 1]` are refused; d is drawn in the target's dtype from LibTorch's
/// generator (TensorFlow: float32, its own stream).
///
/// Example, with an unlabeled batch:
///   advtrain::VAT vat(model->embedding, advtrain::VATOptions().epsilon(1.0));
///   advtrain::Trainer trainer(optimizer, vat);
///   trainer.step([&] { return model->forward(ids); }, loss_fn,
///                [&] { return model->forward(unlabeled_ids); });
class VAT : public Regularizer<VATOptions> {
 public:
  using Regularizer::Regularizer;

 protected:
  /// The random direction, scaled to ξ (or to ε without power iterations).
  void start() override {
    for (size_t i = 0; i < targets().size(); ++i) {
      torch::Tensor w = data(i);
      const Geometry geo = target().geometry(i);
      const torch::Tensor d = torch::randn_like(w);
      at::add_out(w, origin(i), next(d, geo, options_.power_iterations() == 0));
    }
  }

  /// `d ← g`, scaled: to ξ for the next power iteration, to ε after the
  /// last (and in an own-loop `attack()`, which is one such last step).
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    const bool last = running_step() == nullptr ||
                      search_step() + 1 == options_.power_iterations();
    return detail::add_if_usable(w, origin, next(g, geo, last), geo);
  }

  int64_t search_steps() const override {
    return options_.power_iterations();
  }
  double weight() const override {
    return options_.weight();
  }
  torch::Tensor search_objective(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    return kl(checked(clean).detach(), adv);
  }
  torch::Tensor penalty(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    return kl(checked(clean).detach(), adv);
  }

 private:
  /// The probe `scale(mask·d, ξ)`, or the final `scale(d, ε)` (the official
  /// code masks inside the power iteration only).
  torch::Tensor next(
      const torch::Tensor& d, const Geometry& geo, bool last) const {
    return last ? detail::scale_l2(d, options_.epsilon(), geo)
                : detail::scale_l2(detail::masked(d, geo), options_.xi(), geo);
  }

  static const torch::Tensor& checked(const torch::Tensor& out) {
    TORCH_CHECK(
        !detail::is_regression(out),
        "VAT: the model's output has shape ",
        out.sizes(),
        "; VAT compares class distributions, so it needs logits [B, C] with "
        "C >= 2 (give a binary task two logits)");
    return out;
  }
};

} // namespace advtrain
