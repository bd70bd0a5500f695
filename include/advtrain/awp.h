// AWP: adversarial weight perturbation. The model's weights (not its
// inputs) move along their gradient, each scaled by its own norm and kept
// within a relative box around its value; the optimizer steps with the
// gradient at the perturbed weights.
#pragma once

#include <advtrain/strategy.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of AWP (after Wu et al., NeurIPS 2020, as NLP fine-tuning uses it
/// through the widely copied `AWP` class: `adv_lr`, `adv_eps`, `adv_step`).
struct AWPOptions {
  static constexpr const char* kind = "AWP";
  static constexpr Traits traits = Traits().moves_sparse_rows(true);
  /// Step α, relative to each weight's norm (`adv_lr`).
  TORCH_ARG(double, alpha) = 1.0;
  /// Relative bound ε: each element stays within `w₀ ± ε·|w₀|` (`adv_eps`).
  TORCH_ARG(double, epsilon) = 1e-4;
  /// Perturbation steps, each followed by a pass at the perturbed weights
  /// (`adv_step`).
  TORCH_ARG(int64_t, steps) = 1;
  /// Whether the clean and the perturbed passes draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const AWPOptions& o, const Attacker& /*attacker*/) {
  const char* kind = AWPOptions::kind;
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.epsilon() >= 0, kind, "epsilon", o.epsilon(), ">= 0");
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
}

/// AWP, adversarial weight perturbation, on the parameters it is given (by
/// default those whose names contain "weight": `AWP(module, "weight",
/// options)`).
///
/// Paper: Wu, Xia and Wang, "Adversarial Weight Perturbation Helps Robust
/// Generalization", NeurIPS 2020; here as NLP fine-tuning uses it, through
/// the widely copied `AWP` class.
///
/// Rule: every target moves by `w ← w + α·g/(‖g‖ + 1e-6)·(‖w‖ + 1e-6)` (g
/// its current gradient, ‖w‖ its current norm, both over the whole tensor;
/// skipped where ‖g‖ is zero or not finite) and is clamped to
/// `[w₀ − ε·|w₀|, w₀ + ε·|w₀|]`, element by element. Only parameters can be
/// targets: an embedding output has no weight norm. On a sparse table
/// gradient only its rows move.
///
/// Options (`AWPOptions`, each field documented there with its name in the
/// class): `alpha` α = 1.0, `epsilon` ε = 1e-4, `steps` K = 1,
/// `share_dropout_mask` = false.
///
/// One `Trainer::step` (K + 1 passes, one optimizer step), as the class
/// with its training loop: a clean pass; then `steps` times: every target
/// moves, the gradients are dropped and a pass runs at the perturbed
/// weights; restore; the optimizer steps with the gradient of the last
/// perturbed pass only (the clean gradient only steers the first move). It
/// composes with an input attacker on other tensors (FGM on a
/// `PerturbedEmbedding`, say) in your own loop: see docs/guide.md.
///
/// Official code: the widely copied `AWP` class (`attack_backward`,
/// `_attack_step`, `_save`, `_restore`), e.g. jashdalvi/commonlit-nlp
/// `src/awp.py` with `src/train.py`, furu-kaggle/feedback_local
/// `src/awp.py`, with its usual loop (clean backward, `attack_backward`,
/// step). Differences: the class skips a parameter whose gradient norm is 0
/// or NaN, the library also an infinite one (warned); the class's own
/// default `adv_eps` is 0.2, the library's ε default 1e-4 (set it); mixed
/// precision (`GradScaler`, autocast) is the user's business. The paper's
/// own code (csdongxian/AWP, images) perturbs a proxy model by one SGD step
/// and keeps the perturbation during the update; NLP fine-tuning uses the
/// class.
///
/// Example:
///   advtrain::AWP awp(*model, "weight",
///                     advtrain::AWPOptions().alpha(1.0).epsilon(0.01));
///   advtrain::Trainer trainer(optimizer, awp);
///   trainer.step([&] { return model->forward(x); }, loss_fn);
class AWP : public Strategy<AWPOptions> {
 public:
  /// The trainable parameters of `module` whose names contain
  /// `name_contains` (frozen ones are skipped, as the class skips them).
  AWP(const NamedParameters& module,
      const std::string& name_contains = "weight",
      AWPOptions options = {})
      : Strategy(trainable(module), name_contains, std::move(options)) {}
  /// `params`.
  explicit AWP(std::vector<torch::Tensor> params, AWPOptions options = {})
      : Strategy(std::move(params), std::move(options)) {}

 private:
  /// The trainable parameters of `module`, refused when there are none.
  static NamedParameters trainable(const NamedParameters& module) {
    NamedParameters t = module.trainable();
    TORCH_CHECK(
        !t.items().empty(),
        "advtrain: AWP: every parameter of the module is frozen (",
        module.items().size(),
        " parameters, none requires grad); AWP perturbs trainable weights");
    return t;
  }

 protected:
  torch::Tensor perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    // ‖w‖ of the whole tensor, also where `w` holds some rows of it.
    const torch::Tensor wnorm = detail::l2_norm(data(i)).to(torch::kDouble);
    detail::add_scaled(
        w,
        g,
        (geo.gnorm.to(torch::kDouble) + 1e-6).reciprocal() * options_.alpha() *
            (wnorm + 1e-6));
    const torch::Tensor box = origin.abs() * options_.epsilon();
    if (w.scalar_type() == torch::kHalf && w.device().is_cpu()) {
      // LibTorch's CPU has no float16 clamp: in float32, written back.
      const auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat); };
      w.copy_(f(w).clamp(f(origin - box), f(origin + box)));
    } else {
      at::clamp_out(w, w, origin - box, origin + box);
    }
    return detail::l2_norm(w - origin);
  }

  void run_step(StepContext& ctx) override {
    ctx.figures.loss = ctx.pass();
    for (int64_t s = 0; s < options_.steps(); ++s) {
      attack();
      ctx.clear_grads();
      ctx.figures.adv_loss = ctx.pass();
    }
    ctx.figures.perturbation_norm = last_perturbation_norm();
    restore();
    ctx.step_optimizer();
  }
};

} // namespace advtrain
