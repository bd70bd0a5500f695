// The protocol of the strategies that add a penalty on the model's output at
// a perturbation to the task loss, written once: each strategy derived from
// `Regularizer<Options>` supplies the start, the search and the penalty.
#pragma once

#include <advtrain/strategy.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace advtrain {

/// The base of a regularizer with options `Options`. One `Trainer::step`:
///  1. a clean pass gives the task loss; its output is `clean`, or, when the
///     step has an unlabeled batch (`Trainer::step(forward, loss_fn,
///     unlabeled)`), a clean pass on that batch gives `clean` and every
///     later pass runs on it;
///  2. `start()` puts the search's first δ on the (backed-up) target;
///  3. `search_steps()` times (`search_step()` counts from 0): a pass at the
///     perturbation, the gradient `g` of `search_objective(adv, clean)` with
///     respect to δ by `torch::autograd::grad` (nothing accumulates into
///     `.grad`), and `perturb(i, w, g, geometry, origin(i))` moves each
///     tensor along it, its geometry from `step_geometry` (with
///     `GradientCheck::all_finite`). A gradient with a non-finite norm is
///     counted and warned about (once), δ stays where it is, and the batch
///     is trained on the task loss alone: the remaining passes still run
///     (no pass waits for the device), and the decision is taken at the
///     step's one host read;
///  4. a pass at the final δ: `loss = task + weight() * penalty(adv, clean)`;
///  5. `restore()`, the step's figures read to the host (once), one
///     backward, the optimizer step.
/// The clean pass's graph stays alive while the target is perturbed, so it
/// is written without bumping its autograd version and is restored before
/// the backward. Per example, the passes up to the final one share the
/// first's lookup of the same ids (`Perturbation::set_shared_lookups`).
/// `StepResult`: `regularizer` is the penalty, `adv_loss` the task loss at the
/// final perturbed output (0 on an unlabeled batch).
template <typename Options>
class Regularizer : public Strategy<Options> {
 public:
  using Strategy<Options>::Strategy;
  static_assert(
      Options::traits.label_free() && Options::traits.untracked_writes(),
      "a regularizer's penalty needs no label, and its clean graph must "
      "survive the perturbation: declare label_free and untracked_writes");

 protected:
  /// Puts the search's first δ on the target (each tensor through `data(i)`,
  /// from `origin(i)`; per example δ = 0 before). Runs under NoGradGuard.
  virtual void start() = 0;
  /// Steps of the search; a strategy that does not search
  /// (`traits.searches()` false: the start is the perturbation) has none.
  virtual int64_t search_steps() const {
    return 0;
  }
  /// What the search climbs, at the perturbed output `adv` (`clean`
  /// detached); only strategies that search define it.
  virtual torch::Tensor search_objective(
      const torch::Tensor& /*adv*/, const torch::Tensor& /*clean*/) const {
    TORCH_INTERNAL_ASSERT(false, Options::kind, " declares no search");
    return {};
  }
  /// The penalty added to the task loss.
  virtual torch::Tensor penalty(
      const torch::Tensor& adv, const torch::Tensor& clean) const = 0;
  /// Its weight.
  virtual double weight() const = 0;
  /// Whether the perturbed passes add δ to a lookup output detached from
  /// the table (R3F), so that only the clean pass reaches it.
  virtual bool detached_perturbed_passes() const {
    return false;
  }

  /// The search step running now (0-based; during `perturb`).
  int64_t search_step() const noexcept {
    return search_step_;
  }

  /// A term added to the loss once the target is restored, from the
  /// labeled batch's clean output (SMART's proximal point); undefined: none.
  /// It may run forward passes (counted in `ctx.passes`) and report in
  /// `ctx.figures`.
  virtual torch::Tensor extra_term(
      StepContext& /*ctx*/, const torch::Tensor& /*labeled*/) {
    return {};
  }

  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    // Every pass up to the final perturbed one ends in the one backward, so
    // they share their lookups (per example: one embedding backward, as the
    // official code's one embedding output); the extra term's passes (the
    // teacher's parameters) do not.
    std::optional<detail::SharedLookups> shared(std::in_place, this->target());
    const torch::Tensor labeled = ctx.run_forward();
    torch::Tensor clean = labeled;
    torch::Tensor loss = ctx.loss_of(clean);
    r.loss = loss.detach();
    ++ctx.passes;
    const bool unlabeled = static_cast<bool>(ctx.unlabeled);
    const auto forward = [&ctx, unlabeled] {
      return unlabeled ? ctx.replayed(ctx.unlabeled) : ctx.run_forward();
    };
    if (unlabeled) {
      clean = forward();
      ++ctx.passes;
    }
    this->backup(); // per example: takes the δ the clean forward made
    const size_t n = this->targets().size();
    torch::Tensor norm;
    search_step_ = 0;
    {
      torch::NoGradGuard no_grad;
      start();
      if (search_steps() == 0) { // the start is the perturbation
        norm = this->target().norm();
      }
    }
    // A pass at the perturbation (detached from the table where the
    // strategy says so, for that pass alone, however it ends).
    const auto perturbed = [this, &forward] {
      struct Detached {
        Target& target;
        Detached(Target& t, bool on) : target(t) {
          target.set_detached(on);
        }
        ~Detached() {
          target.set_detached(false);
        }
      } detached{this->target(), detached_perturbed_passes()};
      return forward();
    };
    // Whether every search gradient so far had a finite norm (0-dim bool,
    // on the device; undefined: no search step).
    torch::Tensor finite;
    if constexpr (Options::traits.searches()) { // (R3F has no rule to call)
      search(ctx, perturbed, clean.detach(), norm, finite);
    } else {
      TORCH_INTERNAL_ASSERT(
          search_steps() == 0,
          Options::kind,
          " declares no search but has search steps");
    }
    this->set_perturbation_norm(norm);
    const torch::Tensor adv = perturbed();
    shared.reset();
    const torch::Tensor reg = penalty(adv, clean);
    ++ctx.passes;
    r.regularizer = reg.detach();
    r.perturbation_norm = norm;
    if (!unlabeled) {
      torch::NoGradGuard no_grad;
      r.adv_loss = ctx.loss_fn(adv).detach();
    }
    this->restore();
    const torch::Tensor extra = extra_term(ctx, labeled);
    // The terms that join the loss must be finite: the regularizer unless
    // the search's failure leaves it out, the extra term.
    ctx.note_finite(
        reg, finite.defined() ? finite.logical_not() : torch::Tensor());
    if (extra.defined()) {
      ctx.note_finite(extra);
    }
    // The step's one host read (`finite` with it, for the optimizer step);
    // the search's finiteness decides whether the regularizer joins the
    // loss.
    bool keep = true;
    if (finite.defined()) {
      keep = this->read_step(ctx, {finite}).front() != 0.0;
    } else {
      this->read_step(ctx);
    }
    if (keep) {
      loss = loss + weight() * reg;
    } else {
      StepResult& result = ctx.result();
      result.regularizer = 0.0;
      result.adv_loss = 0.0;
      result.perturbation_norm = 0.0;
    }
    if (extra.defined()) {
      loss = loss + extra;
    }
    loss.backward();
    // Its noise covers the whole table: a sparse table gradient (R3F has no
    // search to meet it earlier) is refused before the update.
    for (size_t i = 0; i < n; ++i) {
      this->check_sparse(i, this->targets()[i].grad(), /*accepted=*/false);
    }
    ctx.step_optimizer();
  }

 private:
  /// Step 3, the search: `search_steps()` passes at the perturbation
  /// (`perturbed()`), each moving δ along the gradient of the objective;
  /// sets `norm` to ‖δ‖ after the last move. `finite` says whether every
  /// search gradient so far had a finite norm: once one has not, δ stays
  /// where it is, and the regularizer is left out of the loss, decided at
  /// the step's one host read, before the backward.
  template <typename Pass>
  void search(
      StepContext& ctx,
      const Pass& perturbed,
      const torch::Tensor& clean,
      torch::Tensor& norm,
      torch::Tensor& finite) {
    const size_t n = this->targets().size();
    for (; search_step_ < search_steps(); ++search_step_) {
      const torch::Tensor objective = search_objective(perturbed(), clean);
      const auto grads = torch::autograd::grad(
          {objective},
          this->targets(),
          /*grad_outputs=*/{},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      ++ctx.passes;
      torch::NoGradGuard no_grad;
      GradientCheck check;
      check.all_finite = &finite;
      std::vector<torch::Tensor> moved(n);
      for (size_t i = 0; i < n; ++i) {
        torch::Tensor w = this->data(i);
        torch::Tensor g = grads[i];
        const Geometry geo = *this->step_geometry(i, g, check);
        moved[i] = this->perturb(i, w, g, geo, this->origin(i));
      }
      norm = detail::combined_norm(moved);
    }
  }

  int64_t search_step_ = 0;
};

} // namespace advtrain
