// FreeAT ("free" adversarial training): a δ kept across batches, each
// batch replayed m times with an optimizer step per replay.
#pragma once

#include <advtrain/strategy.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of FreeAT ("free" adversarial training, Shafahi et al., NeurIPS
/// 2019).
struct FreeATOptions {
  static constexpr const char* kind = "FreeAT";
  static constexpr Traits traits = Traits().uses_gradient(false);
  /// Bound ε of the perturbation (per element for `FreeAT`, L2 for
  /// `FreeATL2`).
  TORCH_ARG(double, epsilon) = 0.01;
  /// Ascent step α.
  TORCH_ARG(double, alpha) = 0.01;
  /// Replays m of each batch: m passes and m optimizer steps per batch, so
  /// divide the number of epochs by m.
  TORCH_ARG(int64_t, replays) = 4;
  /// Whether the m replays of a batch draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(
    const FreeATOptions& o, const Attacker& /*attacker*/) {
  const char* kind = FreeATOptions::kind;
  check_option(o.epsilon() > 0, kind, "epsilon", o.epsilon(), "> 0");
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.replays() >= 1, kind, "replays", o.replays(), ">= 1");
}

/// FreeAT, "free" adversarial training, under the norm policy `Norm`:
/// `FreeAT` (`LInf`, the official sign step) and `FreeATL2` (`L2`), the
/// aliases below.
///
/// Paper: Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor and
/// Goldstein, "Adversarial Training for Free!", NeurIPS 2019.
///
/// Rule: one perturbation δ per target, created zero and kept across
/// batches. Each replay applies δ, runs forward and backward, takes the
/// optimizer step with that gradient and moves δ by the same gradient g
/// (taken at W + δ): `δ ← proj(δ + α * (steepest-ascent direction of g))`,
/// i.e. `FreeAT`, `δ ← clamp(δ + α·sign(g), ±ε)`; `FreeATL2`,
/// `δ ← Π(δ + α·g/‖g‖)` onto `‖δ‖ ≤ ε`. On the table δ has the table's shape
/// (one δ per vocabulary row, the whole table: sparse gradients refused);
/// on a `PerturbedEmbedding`, δ `[B, L, H]` per example by batch slot,
/// masked on padded positions (a batch of another shape keeps the overlap).
///
/// Options (`FreeATOptions`, each field documented there): `epsilon` ε =
/// 0.01, `alpha` α = 0.01, `replays` m = 4 (divide the number of epochs by
/// m), `share_dropout_mask` = false.
///
/// One `Trainer::step` (m passes, m optimizer steps): m times: a pass at
/// `W + δ`, δ updated from its gradient, restore, optimizer step, clear the
/// gradients. `Trainer::accumulate` refuses it; the hooks run once per
/// replay. `StepResult`: `loss` and `start_norm` from the first replay (at
/// the kept δ), `adv_loss`, `perturbation_norm` and `finite` from the last;
/// `skipped` counts each replay's skipped optimizer step. δ is state:
/// `torch::save`/`torch::load` keep it, checked (checksum, shape, finite,
/// within ε).
///
/// Official code: mahyarnajibi/FreeAdversarialTraining `main_free.py`
/// (`train`), `lib/utils.py` (`fgsm`), per example on the input, δ kept by
/// batch slot, as here per example. Differences: on the table δ is per
/// vocabulary row, not per example (the table has no examples); image-only
/// steps (clamping the image to [0, 1], normalization) do not apply; δ is
/// masked on padded positions. FreeLB's fairseq code has another FreeAT
/// (`--per-step-adv`); the library follows `main_free.py`.
///
/// Example, in your own loop, per replay (`Trainer::step` runs all m):
///   advtrain::FreeAT freeat(*model, "embedding",
///                           advtrain::FreeATOptions().epsilon(0.01));
///   freeat.attack();          // W = W0 + δ (no gradient needed)
///   loss_fn(model->forward(x), y).backward();
///   freeat.update_delta();    // δ from W's gradient (the gradient at W + δ)
///   freeat.restore();         // W = W0
///   optimizer.step(); optimizer.zero_grad();
template <typename Norm>
class BasicFreeAT : public Strategy<FreeATOptions> {
 public:
  /// On a `PerturbedEmbedding`, δ [B, L, H] persists across batches; a
  /// batch of another shape keeps the overlap.
  using Strategy::Strategy;

  /// `δ ← proj(δ + α * direction(g))` for each target, `g` its current
  /// gradient; targets without a gradient, or with a zero or non-finite one,
  /// keep their δ.
  void update_delta() {
    target().sync(kind());
    for (size_t i = 0; i < targets().size(); ++i) { // before δ changes
      check_sparse(i, targets()[i].grad(), /*accepted=*/false);
    }
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < targets().size(); ++i) {
      torch::Tensor g = targets()[i].grad();
      if (const auto geo = step_geometry(i, g, {Norm::reads_gradient_norm})) {
        detail::step_and_project<Norm>(
            delta(i, g), g, options_.alpha(), options_.epsilon(), *geo);
      }
    }
    if (running_step() == nullptr) {
      settle(); // an own loop: counted and warned at once
    }
  }

  /// The persistent perturbations (undefined until first used).
  const std::vector<torch::Tensor>& deltas() const noexcept {
    return persistent_;
  }

  /// Forgets δ (the next batch starts from zero).
  void reset_delta() {
    persistent_.clear();
  }

 protected:
  torch::Tensor perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& /*g*/,
      const Geometry& geo,
      const torch::Tensor& origin) override {
    return detail::place(w, origin, delta(i, w), geo);
  }

  /// Each replay starts from the persistent δ (masked per example).
  void on_new_step() override {
    target().set_start(
        [this](size_t i, torch::Tensor& d, const torch::Tensor& m) {
          d.copy_(m.defined() ? delta(i, d) * m : delta(i, d));
        },
        /*random=*/false);
  }

  /// m times: apply δ, forward+backward, update δ from that gradient,
  /// restore, optimizer step, clear the gradients (not after the last).
  void run_step(StepContext& ctx) override {
    TORCH_CHECK(
        !ctx.accumulating,
        "advtrain: FreeAT steps the optimizer once per replay, so it cannot "
        "accumulate gradients over micro-batches; use Trainer::step");
    StepFigures& r = ctx.figures;
    const int64_t m = options_.replays();
    for (int64_t j = 0; j < m; ++j) {
      target().restart(this, kind()); // δ from the persistent one
      const torch::Tensor loss = ctx.pass();
      if (j == 0) { // the figures report the first replay and the last
        r.loss = loss;
        r.start_norm = delta_norm();
      }
      if (j == m - 1) {
        r.perturbation_norm = j == 0 ? r.start_norm : delta_norm();
        r.adv_loss = loss;
      }
      // A replay whose optimizer step does not happen (a throwing hook, a
      // non-finite step that throws) leaves δ as it found it.
      std::vector<torch::Tensor> kept;
      if (ctx.before_optimizer_step || ctx.throw_on_nonfinite) {
        for (const auto& d : persistent_) {
          kept.push_back(d.defined() ? d.clone() : d);
        }
      }
      update_delta();
      restore();
      const int64_t steps = ctx.optimizer_steps;
      try {
        ctx.step_optimizer(/*last=*/j == m - 1);
      } catch (...) {
        if (ctx.optimizer_steps == steps &&
            (ctx.before_optimizer_step || ctx.throw_on_nonfinite)) {
          persistent_ = std::move(kept);
        }
        throw;
      }
      if (j < m - 1) {
        ctx.clear_grads();
      }
    }
  }

  void save_state(torch::serialize::OutputArchive& archive) const override {
    std::vector<torch::Tensor> saved;
    for (size_t i = 0; i < persistent_.size(); ++i) {
      if (persistent_[i].defined()) {
        archive.write("freeat.delta." + std::to_string(i), persistent_[i]);
        saved.push_back(persistent_[i]);
      }
    }
    archive.write("freeat.checksum", c10::IValue(detail::checksum(saved)));
  }

  /// All or nothing: δ is checked (checksum, shape, finite, within ε)
  /// before it replaces the current one.
  void load_state(torch::serialize::InputArchive& archive) override {
    // Per example, as many as the lookups of the step that saved them.
    std::vector<torch::Tensor> loaded(target().size());
    std::vector<torch::Tensor> read;
    for (size_t i = 0;; ++i) {
      torch::Tensor d;
      if (!archive.try_read("freeat.delta." + std::to_string(i), d)) {
        if (i >= loaded.size()) {
          break;
        }
        continue;
      }
      read.push_back(d);
      check_saved(i, d);
      if (i >= loaded.size()) {
        TORCH_CHECK(
            target().per_example(),
            "advtrain: ",
            kind(),
            ": the archive holds a delta for tensor ",
            i,
            ", the target has ",
            loaded.size());
        loaded.resize(i + 1);
      }
      loaded[i] = target().fit_saved(i, d, kind());
    }
    detail::check_checksum(archive, "freeat.checksum", read, kind());
    persistent_ = std::move(loaded);
  }

 private:
  /// ‖δ‖ in place, over all tensors: on a float32 or float64 parameter
  /// read from the kept δ itself (one pass, where ‖W − W0‖ takes a
  /// subtraction more; they differ by rounding). In a 16-bit table much of δ
  /// may round away in W0 + δ, so there ‖W − W0‖ is measured.
  torch::Tensor delta_norm() const {
    bool wide = !target().per_example();
    for (const auto& t : targets()) {
      wide = wide && (t.scalar_type() == torch::kFloat ||
                      t.scalar_type() == torch::kDouble);
    }
    if (!wide) {
      return target().norm();
    }
    std::vector<torch::Tensor> norms;
    for (const auto& d : persistent_) {
      norms.push_back(d.defined() ? detail::l2_norm(d) : torch::Tensor());
    }
    return detail::combined_norm(norms);
  }

  /// Refuses a saved δ that is not finite or lies outside the ball of ε
  /// (within rounding), as no FreeAT with these options makes one.
  void check_saved(size_t i, const torch::Tensor& d) const {
    TORCH_CHECK(
        d.is_floating_point() && torch::isfinite(d).all().item<bool>(),
        "advtrain: ",
        kind(),
        ": the archive's delta ",
        i,
        " is not finite; nothing was loaded");
    torch::NoGradGuard no_grad;
    const torch::Tensor x = d.to(torch::kDouble);
    double n = 0.0;
    if (x.numel() > 0) {
      if constexpr (std::is_same_v<Norm, LInf>) {
        n = x.abs().max().item<double>();
      } else if (target().per_example() && x.dim() > 1) {
        n = x.flatten(1).norm(2, 1).max().item<double>();
      } else {
        n = x.norm().item<double>();
      }
    }
    TORCH_CHECK(
        n <= options_.epsilon() * (1 + 1e-5),
        "advtrain: ",
        kind(),
        ": the archive's delta ",
        i,
        " has norm ",
        n,
        " (",
        Norm::name,
        "), outside the ball of epsilon = ",
        options_.epsilon(),
        " (saved with a larger epsilon?); nothing was loaded");
  }

  /// δ of target i, created zero with the shape, dtype and device of `t`;
  /// per example, refitted to each batch's shape (the overlap is kept).
  torch::Tensor& delta(size_t i, const torch::Tensor& t) {
    // (Per example a step's lookups are counted as the forward meets them.)
    const size_t n = std::max(target().size(), i + 1);
    if (persistent_.size() < n) {
      persistent_.resize(n);
    }
    torch::Tensor& d = persistent_[i];
    if (!d.defined() || d.sizes() != t.sizes()) {
      torch::NoGradGuard no_grad;
      torch::Tensor fresh = torch::zeros_like(t, torch::requires_grad(false));
      if (d.defined() && d.dim() == t.dim()) {
        torch::Tensor from = d, to = fresh;
        for (int64_t k = 0; k < t.dim(); ++k) {
          const int64_t n = std::min(d.size(k), t.size(k));
          from = from.narrow(k, 0, n);
          to = to.narrow(k, 0, n);
        }
        to.copy_(from);
      }
      d = fresh;
    }
    return d;
  }
};

/// FreeAT with sign steps and element-wise clamp to [-ε, ε] (`BasicFreeAT`
/// above).
using FreeAT = BasicFreeAT<LInf>;
/// FreeAT with L2 steps `α * g / ‖g‖` and projection onto ‖δ‖ ≤ ε.
using FreeATL2 = BasicFreeAT<L2>;

} // namespace advtrain
