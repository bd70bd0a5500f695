// YOPO ("You Only Propagate Once"): m full passes and cheap inner ascent
// steps through the model's first layer alone, per example.
#pragma once

#include <advtrain/strategy.h>

#include <functional>
#include <optional>
#include <utility>

namespace advtrain {

/// Options of YOPO ("You Only Propagate Once", Zhang et al., NeurIPS 2019).
struct YOPOOptions {
  static constexpr const char* kind = "YOPO";
  static constexpr Traits traits = Traits();
  /// Full forward+backward passes m per batch.
  TORCH_ARG(int64_t, steps) = 3;
  /// Cheap ascent steps n after each full pass, through the first layer only.
  TORCH_ARG(int64_t, inner_steps) = 2;
  /// Ascent step α (per example, L2: `α * ∇δH / ‖∇δH‖`).
  TORCH_ARG(double, alpha) = 1.33e-2;
  /// Radius ε of each example's perturbation (L2 over [L, H]).
  TORCH_ARG(double, epsilon) = 0.4;
  /// Random start `U(-1, 1) * mask * init_mag / sqrt(L_i * H)` (not
  /// projected, as in the official code); 0 starts from δ = 0.
  TORCH_ARG(double, init_mag) = 0.64;
  /// Whether the m full passes and the inner passes through the first layer
  /// draw the first full pass's dropout masks (the official code reuses
  /// them).
  TORCH_ARG(bool, share_dropout_mask) = true;
};

inline void check_options(const YOPOOptions& o, const Attacker& /*attacker*/) {
  const char* kind = YOPOOptions::kind;
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
  check_option(
      o.inner_steps() >= 1, kind, "inner_steps", o.inner_steps(), ">= 1");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.init_mag() >= 0, kind, "init_mag", o.init_mag(), ">= 0");
}

/// YOPO ("You Only Propagate Once") on the per-example target. The model is
/// split at its first layer after the embedding lookup: its forward must
/// compute `rest(yopo.first(embedding(ids)))`, where `first` is the callable
/// given here (e.g. positions + LayerNorm + first block) and `rest` the
/// remainder.
///
/// Paper: Zhang, Zhang, Lu, Zhu and Dong, "You Only Propagate Once:
/// Accelerating Adversarial Training via Maximal Principle", NeurIPS 2019.
///
/// Rule: each of the m full passes runs forward at E + δ and backward of
/// loss / m (parameter gradients average over the passes); between two full
/// passes, the co-state `p = ∂L/∂z0` at the first layer's output z0 is held
/// fixed and δ takes n steps on `H = Σ first(E + δ) ⊙ p` through `first`
/// alone, each `δ ← δ + α * ∇δH / max(‖∇δH‖, 1e-10)` per example (L2 over
/// its unpadded [L, H]), projected to ε. No inner steps follow the last full
/// pass (their δ would never be used). δ starts at
/// `U(−1, 1)·mask·init_mag/√(Lᵢ·H)`, not projected. `∇δH` comes from
/// `torch::autograd::grad`, so the first layer's parameters get no gradient
/// from the inner steps.
///
/// Options (`YOPOOptions`, each field documented there): `steps` m = 3,
/// `inner_steps` n = 2, `alpha` α = 1.33e-2, `epsilon` ε = 0.4, `init_mag` =
/// 0.64 (0: δ starts at 0), `share_dropout_mask` = true (the inner passes
/// draw the full passes' masks too).
///
/// One `Trainer::step`: m full passes, (m − 1)·n inner passes through
/// `first` alone (`StepResult::passes` counts the former, `inner_passes()`
/// the latter); restore; one optimizer step. `StepResult::adv_loss` is the
/// m-th full pass's loss.
///
/// Official code: FreeLB's fairseq YOPO, zhuchen03/FreeLB
/// `fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py`
/// (`yopo_train_step`, `yopo_inner_steps`), whose `--adv-steps K` is
/// `steps(K + 1)`. Differences: the gradient is masked before the
/// per-example norm and step; fairseq reseeds its generator every update,
/// the library draws on from the running stream; with `init_mag = 0`
/// fairseq fails, the library starts from δ = 0. The original YOPO code
/// (a1600012888, images) runs inner steps after every full pass and
/// backpropagates H into the first layer; the library follows the fairseq
/// NLP version.
///
/// Example:
///   advtrain::YOPO yopo(
///       model->embedding,  // a PerturbedEmbedding
///       [&](const torch::Tensor& e) { return model->first(e); },
///       advtrain::YOPOOptions().steps(3).inner_steps(2));
///   advtrain::Trainer trainer(optimizer, yopo);
///   trainer.step(
///       [&] { return model->rest(yopo.first(model->embedding(ids))); },
///       loss_fn);
class YOPO : public Strategy<YOPOOptions> {
 public:
  using FirstLayer = std::function<torch::Tensor(const torch::Tensor&)>;

  YOPO(
      const PerturbedEmbedding& embedding,
      FirstLayer first,
      YOPOOptions options = {})
      : Strategy(with_first(embedding, first), std::move(options)),
        first_(std::move(first)) {}

  /// The first layer, as the model's forward calls it: keeps its output z0
  /// so that the co-state ∂L/∂z0 can be read after the backward pass.
  torch::Tensor first(const torch::Tensor& x) {
    StepContext* step = running_step();
    if (step != nullptr && step->replay && !first_mark_) {
      // The first full pass: the inner passes replay the stream from here,
      // so they draw the masks `first` drew then, whatever the model drew
      // before it.
      first_mark_ = step->replay->mark();
    }
    torch::Tensor z0 = first_(x);
    if (z0.requires_grad()) {
      z0.retain_grad();
    }
    z0_ = z0;
    return z0;
  }

  /// Inner passes through the first layer alone in the last step: (m - 1) * n.
  int64_t inner_passes() const noexcept {
    return inner_passes_;
  }

 protected:
  torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& /*origin*/) override {
    L2::step(w, g, options_.alpha(), geo, /*floor=*/1e-10);
    L2::project(w, options_.epsilon(), geo);
    return detail::l2_norm(w);
  }

  void on_new_step() override {
    const double mag = options_.init_mag();
    if (mag <= 0) {
      return;
    }
    target().set_start(
        [mag](size_t /*i*/, torch::Tensor& d, const torch::Tensor& m) {
          L2::random_start(d, m, mag);
        },
        /*random=*/true);
  }

  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    const int64_t m = options_.steps();
    inner_passes_ = 0;
    first_mark_.reset();
    for (int64_t j = 0; j < m; ++j) {
      z0_ = torch::Tensor();
      const torch::Tensor loss = ctx.pass(1.0 / static_cast<double>(m));
      if (j == 0) {
        r.loss = loss;
        r.start_norm = target().norm();
        r.perturbation_norm = r.start_norm;
      }
      r.adv_loss = loss;
      TORCH_CHECK(
          z0_.defined() && z0_.grad().defined(),
          "YOPO: the model's forward must call yopo.first(...) on the "
          "perturbed embedding output, and the loss must depend on it");
      if (j == m - 1) {
        break; // no inner steps after the last full pass
      }
      const torch::Tensor p = z0_.grad().detach();
      z0_ = torch::Tensor();
      backup(); // δ = 0 is the origin; takes this step's δ as the target
      torch::Tensor delta = targets()[0];
      const torch::Tensor e = target().embedded(0);
      for (int64_t s = 0; s < options_.inner_steps(); ++s) {
        auto inner = [&] { return first_(e + delta); };
        const torch::Tensor z =
            first_mark_ ? ctx.replay->replay_from(*first_mark_, inner)
                        : inner();
        const torch::Tensor h = (z * p).sum();
        torch::Tensor g = torch::autograd::grad({h}, {delta})[0];
        ++inner_passes_;
        torch::NoGradGuard no_grad;
        torch::Tensor w = data(0);
        const Geometry geo = *step_geometry(0, g); // counts a non-finite g
        set_perturbation_norm(perturb(0, w, g, geo, torch::Tensor()));
      }
      delta.mutable_grad() = torch::Tensor();
      r.perturbation_norm = last_perturbation_norm();
    }
    z0_ = torch::Tensor();
    first_mark_.reset();
    restore();
    ctx.step_optimizer();
  }

 private:
  FirstLayer first_;
  /// `embedding`, once `first` is checked (before the options, as the
  /// arguments come).
  static const PerturbedEmbedding& with_first(
      const PerturbedEmbedding& embedding, const FirstLayer& first) {
    TORCH_CHECK(first, "YOPO: the first layer callable is empty");
    return embedding;
  }

  torch::Tensor z0_;
  std::optional<detail::RngReplay::States> first_mark_; // this step's
  int64_t inner_passes_ = 0;
};

} // namespace advtrain
