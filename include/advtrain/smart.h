// SMART: a smoothness-inducing regularizer, the divergence between the
// outputs at x and x + δ, δ found by a normalized ascent from noise.
#pragma once

#include <advtrain/divergence.h>
#include <advtrain/parameters.h>
#include <advtrain/regularizer.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of SMART (Jiang et al., ACL 2020).
struct SMARTOptions {
  static constexpr const char* kind = "SMART";
  static constexpr Traits traits =
      Traits().untracked_writes(true).label_free(true);
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
  /// Weight μ of the Bregman proximal point term `μ · sym_kl(f(x; θ),
  /// f(x; θ̃))` (the paper's Algorithm 1; mt-dnn leaves it out); 0: off.
  TORCH_ARG(double, proximal_weight) = 0.0;
  /// Momentum β of the teacher θ̃ ← (1 − β)·θ + β·θ̃, updated after every
  /// optimizer step.
  TORCH_ARG(double, proximal_beta) = 0.99;
};

inline void check_options(const SMARTOptions& o, const Attacker& /*attacker*/) {
  const char* kind = SMARTOptions::kind;
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.noise_var() >= 0, kind, "noise_var", o.noise_var(), ">= 0");
  check_option(o.norm_eps() > 0, kind, "norm_eps", o.norm_eps(), "> 0");
  check_option(o.weight() >= 0, kind, "weight", o.weight(), ">= 0");
  check_option(
      o.proximal_weight() >= 0,
      kind,
      "proximal_weight",
      o.proximal_weight(),
      ">= 0");
  check_option(
      o.proximal_beta() >= 0 && o.proximal_beta() < 1,
      kind,
      "proximal_beta",
      o.proximal_beta(),
      "in [0, 1)");
}

/// SMART's smoothness-inducing adversarial regularizer, with its optional
/// Bregman proximal point.
///
/// Paper: Jiang, He, Chen, Liu, Gao and Zhao, "SMART: Robust and Efficient
/// Fine-Tuning for Pre-trained Natural Language Models through Principled
/// Regularized Optimization", ACL 2020.
///
/// Rule: the task loss plus `weight * sym_kl(f(W + δ), f(W))` (a batch mean,
/// gradients through both outputs); δ from `N(0, 1) * noise_var` by K steps
/// `δ ← N(δ + α·g)`, g the gradient of `stable_kl(f(W + δ), f(W))` summed
/// over the batch (not its mean, as mt-dnn's K-step `SmartPerturbation`),
/// `N` dividing each row (per example: each token's vector) by its max-abs
/// value + norm_eps. A regression output uses squared error: summed in the
/// ascent, mean in the regularizer. If an ascent gradient is not finite, the
/// batch is trained on the task loss alone. With `proximal_weight(μ)` > 0
/// (the paper's Algorithm 1, one inner step): `+ μ · sym_kl(f(x; θ),
/// f(x; θ̃))`, `f(x; θ̃)` a pass without grad at the teacher θ̃ (swapped into
/// the optimizer's parameters and back, bit for bit), and after each
/// optimizer step `θ̃ ← (1 − β)·θ + β·θ̃`, θ̃ starting at the parameters of
/// the first step (with `Trainer::accumulate`, call `update_teacher` after
/// your optimizer step); the teacher is state: `save`/`load` keep it.
///
/// Options (`SMARTOptions`, each field documented there): `steps` K = 1,
/// `alpha` α = 1e-3, `noise_var` = 1e-5, `norm_eps` = 1e-6, `weight` = 1.0,
/// `share_dropout_mask` = false, `regression` = false, `proximal_weight` μ =
/// 0 (off), `proximal_beta` β = 0.99.
///
/// One `Trainer::step` (`Regularizer`'s protocol; label-free: it may take
/// the regularizer on an unlabeled batch): clean pass; K ascent passes by
/// `torch::autograd::grad` (nothing accumulates into `.grad`); a pass at the
/// final δ; restore; the one backward; the optimizer step.
/// `StepResult::passes` counts K + 2 (+ 1 at the teacher, + 1 unlabeled).
/// The clean pass's graph stays alive while the table is perturbed, so the
/// table is written without bumping its autograd version and is restored
/// before the backward: with a table tied to an output layer, that layer's
/// part of the regularizer's gradient is taken at W, not at W + δ.
///
/// Official code: namisan/mt-dnn `mt_dnn/perturbation.py`
/// (`SmartPerturbation`), `mt_dnn/loss.py` (`stable_kl`, `SymKlCriterion`,
/// `MseCriterion`), `mt_dnn/model.py`; none for the proximal point.
/// Differences: mt-dnn perturbs the output of BERT's whole embeddings
/// module, the library the lookup it is given; only mt-dnn's default
/// normalization (`norm_p = inf`, per token); δ is masked on padded
/// positions; a non-finite ascent gradient skips the regularizer (mt-dnn
/// returns 0); a regression output is compared element by element; `alpha`
/// is mt-dnn's older default (its newer `train.py` uses 1e-5).
///
/// Example:
///   advtrain::SMART smart(model->embedding,  // or (*model, "embedding")
///                         advtrain::SMARTOptions().weight(1.0));
///   advtrain::Trainer trainer(optimizer, smart);
///   trainer.step([&] { return model->forward(ids); }, loss_fn);
class SMART : public Regularizer<SMARTOptions> {
 public:
  /// On a `PerturbedEmbedding`, as in the official code: N normalizes each
  /// token's vector.
  using Regularizer::Regularizer;

 protected:
  /// `δ ← N(δ + α * g)` with δ = w − origin.
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    torch::Tensor delta = at::add(w - origin, g, options_.alpha());
    normalize(delta);
    if (!geo.per_example()) {
      return detail::add_if_usable(w, origin, delta, geo);
    }
    // (Per example the origin is 0: w is δ, kept where not usable.)
    return detail::place(
        w,
        origin,
        geo.usable.defined() ? at::where(geo.usable, delta, w) : delta,
        geo);
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

  /// The proximal term, at the teacher (none when off).
  torch::Tensor extra_term(
      StepContext& ctx, const torch::Tensor& labeled) override {
    if (options_.proximal_weight() == 0) {
      return {};
    }
    const auto params = detail::optimizer_parameters(ctx.optimizer);
    if (teacher_.empty()) {
      for (const auto& p : params) {
        teacher_.push_back(p.detach().clone());
      }
    }
    check_teacher(params);
    torch::Tensor teacher_out;
    {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> own;
      own.reserve(params.size());
      for (size_t k = 0; k < params.size(); ++k) {
        TORCH_CHECK(
            teacher_[k].sizes() == params[k].sizes(),
            "SMART: the proximal teacher's tensor ",
            k,
            " has shape ",
            teacher_[k].sizes(),
            ", the parameter ",
            params[k].sizes());
        if (teacher_[k].device() != params[k].device() ||
            teacher_[k].scalar_type() != params[k].scalar_type()) {
          teacher_[k] = teacher_[k].to(params[k].options()); // once loaded
        }
        own.push_back(params[k].detach().clone());
      }
      struct SwapBack { // the parameters come back however the pass ends
        const std::vector<torch::Tensor>& params;
        const std::vector<torch::Tensor>& own;
        ~SwapBack() {
          for (size_t k = 0; k < params.size(); ++k) {
            params[k].variable_data().copy_(own[k]);
          }
        }
      } swap_back{params, own};
      for (size_t k = 0; k < params.size(); ++k) {
        params[k].variable_data().copy_(teacher_[k]);
      }
      teacher_out = ctx.run_forward();
    }
    ++ctx.passes;
    const torch::Tensor term = penalty(labeled, teacher_out); // symmetric
    ctx.figures.proximal = term.detach();
    return options_.proximal_weight() * term;
  }

  /// The regularizer's step, then the teacher's moving average (when the
  /// step ran the optimizer).
  void run_step(StepContext& ctx) override {
    Regularizer::run_step(ctx);
    if (options_.proximal_weight() > 0 && !ctx.accumulating) {
      update_teacher(detail::optimizer_parameters(ctx.optimizer));
    }
  }

  void save_state(torch::serialize::OutputArchive& archive) const override {
    for (size_t k = 0; k < teacher_.size(); ++k) {
      archive.write("smart.teacher." + std::to_string(k), teacher_[k]);
    }
    archive.write("smart.checksum", c10::IValue(detail::checksum(teacher_)));
  }
  /// All or nothing: the teacher is checked (checksum, finite) first.
  void load_state(torch::serialize::InputArchive& archive) override {
    std::vector<torch::Tensor> loaded;
    torch::Tensor t;
    while (
        archive.try_read("smart.teacher." + std::to_string(loaded.size()), t)) {
      TORCH_CHECK(
          t.is_floating_point() && torch::isfinite(t).all().item<bool>(),
          "advtrain: SMART: the archive's teacher tensor ",
          loaded.size(),
          " is not finite; nothing was loaded");
      loaded.push_back(t);
      t = torch::Tensor();
    }
    detail::check_checksum(archive, "smart.checksum", loaded, kind());
    teacher_ = std::move(loaded);
  }

 public:
  /// The proximal teacher θ̃, one tensor per optimizer parameter (empty
  /// before the first step with `proximal_weight` > 0).
  const std::vector<torch::Tensor>& teacher() const noexcept {
    return teacher_;
  }

  /// `θ̃ ← (1 − β)·θ + β·θ̃` with `params` (the optimizer's) as θ. A
  /// `Trainer::step` calls it after its optimizer step; with
  /// `Trainer::accumulate`, call it after your own `optimizer.step()`.
  void update_teacher(const std::vector<torch::Tensor>& params) {
    if (teacher_.empty()) {
      return; // no proximal step yet
    }
    check_teacher(params);
    torch::NoGradGuard no_grad;
    const double beta = options_.proximal_beta();
    for (size_t k = 0; k < params.size(); ++k) {
      teacher_[k].mul_(beta).add_(params[k].detach(), 1.0 - beta);
    }
  }

 private:
  std::vector<torch::Tensor> teacher_;

  /// The teacher has one tensor per optimizer parameter.
  void check_teacher(const std::vector<torch::Tensor>& params) const {
    TORCH_CHECK(
        teacher_.size() == params.size(),
        "SMART: the proximal teacher holds ",
        teacher_.size(),
        " tensors, the optimizer ",
        params.size(),
        " parameters");
  }

  /// Divides each row (last dimension) by its max-abs value + norm_eps,
  /// the denominator in float32 at least and never below the smallest
  /// normal number: norm_eps may round to 0 in the lookup's dtype (1e-8 in
  /// float16, 1e-46 in float32), and a zero row (a padded position) would
  /// give 0/0. Only a row of zeros (it stays zero) sees the floor.
  void normalize(torch::Tensor& delta) const {
    const auto rows =
        delta.dim() == 0 ? delta.abs() : delta.abs().amax(-1, true);
    const auto type = at::promote_types(rows.scalar_type(), torch::kFloat);
    const double tiny = type == torch::kDouble
                            ? std::numeric_limits<double>::min()
                            : std::numeric_limits<float>::min();
    delta.div_(rows.to(type).add_(options_.norm_eps()).clamp_min_(tiny));
  }
};

} // namespace advtrain
