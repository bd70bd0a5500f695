// The protocol of the strategies that add a penalty on the model's output at
// a perturbation to the task loss, written once: SMART, VAT and R3F supply
// the start, the search and the penalty.
#pragma once

#include <advtrain/attacker.h>

#include <cmath>
#include <cstdint>
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
///     tensor along it. A non-finite gradient ends the search, warned once
///     and counted, and the batch is trained on the task loss alone;
///  4. a pass at the final δ: `loss = task + weight() * penalty(adv, clean)`;
///  5. `restore()`, one backward, the optimizer step.
/// The clean pass's graph stays alive while the target is perturbed, so it
/// is written without bumping its autograd version and is restored before
/// the backward. `StepResult`: `regularizer` is the penalty, `adv_loss` the
/// task loss at the final perturbed output (0 on an unlabeled batch).
template <typename Options>
class Regularizer : public Strategy<Options> {
 public:
  using Strategy<Options>::Strategy;

  /// The penalty needs no label, so the step may take it on an unlabeled
  /// batch.
  bool label_free() const override {
    return true;
  }

 protected:
  /// Puts the search's first δ on the target (each tensor through `data(i)`,
  /// from `origin(i)`; per example δ = 0 before). Runs under NoGradGuard.
  virtual void start() = 0;
  /// Steps of the search.
  virtual int64_t search_steps() const = 0;
  /// What the search climbs, at the perturbed output `adv` (`clean`
  /// detached).
  virtual torch::Tensor search_objective(
      const torch::Tensor& adv, const torch::Tensor& clean) const = 0;
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

  bool untracked_writes() const override {
    return true;
  }

  /// A term added to the loss once the target is restored, from the
  /// labeled batch's clean output (SMART's proximal point); undefined: none.
  /// It may run forward passes (counted in `ctx.passes`) and report in `r`.
  virtual torch::Tensor extra_term(
      StepContext& /*ctx*/,
      const torch::Tensor& /*labeled*/,
      StepResult& /*r*/) {
    return {};
  }

  StepResult run_step(StepContext& ctx) override {
    StepResult r;
    const torch::Tensor labeled = ctx.run_forward();
    torch::Tensor clean = labeled;
    torch::Tensor loss = ctx.loss_of(clean);
    r.loss = loss.item<double>();
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
    double norm = 0.0;
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
    bool finite = true;
    for (; search_step_ < search_steps() && finite; ++search_step_) {
      const torch::Tensor objective =
          search_objective(perturbed(), clean.detach());
      const auto grads = torch::autograd::grad(
          {objective},
          this->targets(),
          /*grad_outputs=*/{},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      ++ctx.passes;
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < n && finite; ++i) {
        this->check_sparse(i, grads[i], /*accepted=*/false);
        const double gnorm =
            grads[i].defined() ? detail::l2_norm(grads[i]) : 0.0;
        finite = this->usable_norm(i, gnorm) || gnorm == 0.0;
      }
      if (!finite) {
        break;
      }
      double sq = 0.0;
      for (size_t i = 0; i < n; ++i) {
        torch::Tensor w = this->data(i);
        const torch::Tensor g =
            grads[i].defined() ? grads[i] : torch::zeros_like(w);
        const double moved =
            this->perturb(i, w, g, this->target().geometry(i), this->origin(i));
        sq += moved * moved;
      }
      norm = std::sqrt(sq);
    }
    this->set_perturbation_norm(norm);
    if (finite) {
      const torch::Tensor adv = perturbed();
      const torch::Tensor reg = penalty(adv, clean);
      ++ctx.passes;
      r.regularizer = reg.item<double>();
      r.perturbation_norm = norm;
      if (!unlabeled) {
        torch::NoGradGuard no_grad;
        r.adv_loss = ctx.loss_fn(adv).item<double>();
      }
      loss = loss + weight() * reg;
    }
    this->restore();
    const torch::Tensor extra = extra_term(ctx, labeled, r);
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
    return r;
  }

 private:
  int64_t search_step_ = 0;
};

} // namespace advtrain
