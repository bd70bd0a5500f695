// `Trainer`: runs a strategy's whole protocol for one batch with any module
// and any optimizer, restoring everything if a closure throws.
#pragma once

#include <advtrain/attacker.h>

#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

namespace advtrain {

/// What `Trainer::step` does when a loss of the step is not finite (NaN or
/// ±Inf), as AMP's `GradScaler` does with an overflow.
enum class NonFinite {
  /// Skip the optimizer step: weights and optimizer state stay as before
  /// it, the step's gradients are dropped, `StepResult::skipped` and
  /// `Trainer::skipped_steps()` count it, and the first one warns.
  kSkip,
  /// Throw, after the step is rolled back as for a throwing closure.
  kThrow,
};

/// Runs one strategy's whole protocol (docs/design.md, "Protocols") for one
/// batch, with any `torch::nn::Module` (through closures) and any
/// `torch::optim::Optimizer`.
///
/// The step starts from zero gradients and ends with the optimizer's update;
/// the targets are restored before every `optimizer.step()`. If a closure
/// throws, the weights and gradients are put back as they were before the
/// step and the exception reaches the caller (a protocol that steps the
/// optimizer more than once, as FreeAT once per replay, keeps the optimizer
/// steps that completed, its state included).
class Trainer {
 public:
  Trainer(torch::optim::Optimizer& optimizer, Attacker& attacker)
      : optimizer_(optimizer), attacker_(attacker) {
    if (attacker_.watched().empty()) {
      attacker_.watch_grads(detail::optimizer_parameters(optimizer_));
    }
  }

  /// One batch: `forward()` gives the model's output on it, `loss_fn(output)`
  /// a scalar loss.
  StepResult step(const ForwardFunction& forward, const LossFunction& loss_fn) {
    return run(forward, loss_fn, /*accumulating=*/false);
  }

  /// One labeled batch and one unlabeled batch, one optimizer step: the task
  /// loss on the labeled batch (`forward`, `loss_fn`) plus a label-free
  /// regularizer taken on the unlabeled one (`unlabeled()` gives the model's
  /// output there). Strategies whose traits are not `label_free` refuse it.
  StepResult step(
      const ForwardFunction& forward,
      const LossFunction& loss_fn,
      const ForwardFunction& unlabeled) {
    TORCH_CHECK(
        unlabeled, "advtrain: Trainer::step: the unlabeled forward is empty");
    TORCH_CHECK(
        attacker_.traits().label_free(),
        "advtrain: ",
        attacker_.kind(),
        " needs labels for its perturbed passes, so it cannot train on an "
        "unlabeled batch; use a label-free regularizer (a strategy whose "
        "traits() are label_free())");
    return run(forward, loss_fn, /*accumulating=*/false, unlabeled);
  }

  /// One micro-batch of a larger batch: runs the method's passes like `step`
  /// but adds the resulting gradient to the gradients already there and does
  /// not step the optimizer. Scale the loss by 1 / (number of micro-batches),
  /// then call `optimizer.step()` and `optimizer.zero_grad()` yourself.
  /// (Not for a protocol that steps the optimizer more than once a step, as
  /// FreeAT: it refuses.)
  StepResult accumulate(
      const ForwardFunction& forward, const LossFunction& loss_fn) {
    return run(forward, loss_fn, /*accumulating=*/true);
  }

  /// Runs `hook` before every `optimizer.step()` the protocol makes, after
  /// the method's passes and never between them: once per optimizer step of
  /// the protocol (FreeAT: m per step). It sees the final gradients and may
  /// change them, e.g. average them across workers (`advtrain::DataParallel`).
  /// It runs also where the step is then skipped: whether the gradients it
  /// leaves are finite decides the skip, so that every data-parallel worker
  /// joins the all-reduce and all decide alike. An empty function removes it.
  Trainer& before_optimizer_step(std::function<void()> hook) {
    before_optimizer_step_ = std::move(hook);
    return *this;
  }

  /// Runs `hook` after every `optimizer.step()` the protocol makes, with the
  /// updated parameters: once per optimizer step of the protocol, never
  /// while accumulating (e.g. a moving average of the parameters). An empty
  /// function removes it.
  Trainer& after_optimizer_step(std::function<void()> hook) {
    after_optimizer_step_ = std::move(hook);
    return *this;
  }

  /// The next `n` steps are plain steps (one clean pass, one optimizer
  /// step, no perturbation), as a warm-up before adversarial training; the
  /// count goes down with each `step` or `accumulate`. A resumed run sets
  /// what is left of it.
  Trainer& warmup_steps(int64_t n) {
    TORCH_CHECK(
        n >= 0, "advtrain: Invalid warmup_steps: ", n, " (must be >= 0)");
    warmup_left_ = n;
    return *this;
  }
  /// Warm-up steps still to run.
  int64_t warmup_steps() const noexcept {
    return warmup_left_;
  }

  /// What a non-finite loss does (default: `NonFinite::kSkip`).
  Trainer& nonfinite(NonFinite policy) {
    nonfinite_ = policy;
    return *this;
  }
  /// Whether the gradients are checked too before each optimizer step
  /// (default: no): a non-finite gradient of finite losses (the model's own
  /// arithmetic, e.g. a square root or a division at 0) then skips the step
  /// as a non-finite loss does. It costs one pass over the gradients per
  /// optimizer step, no host read. With a `before_optimizer_step` hook they
  /// are always checked.
  Trainer& check_gradients(bool check) {
    check_gradients_ = check;
    return *this;
  }
  /// Optimizer steps skipped so far because a loss (or, where checked, a
  /// gradient) was not finite.
  int64_t skipped_steps() const noexcept {
    return skipped_steps_;
  }

  torch::optim::Optimizer& optimizer() noexcept {
    return optimizer_;
  }
  Attacker& attacker() noexcept {
    return attacker_;
  }

 private:
  StepResult run(
      const ForwardFunction& forward,
      const LossFunction& loss_fn,
      bool accumulating,
      const ForwardFunction& unlabeled = {}) {
    TORCH_CHECK(
        forward && loss_fn, "advtrain: Trainer::step needs two closures");
    TORCH_CHECK(
        !in_step_,
        "advtrain: Trainer::step was called from inside a step (one of its "
        "closures or hooks); the closures run passes, the Trainer steps");
    // (A per-example target holds no tensors between steps.)
    const std::vector<torch::Tensor> params = detail::union_of(
        detail::optimizer_parameters(optimizer_), attacker_.targets());
    // Its clean pass would run at W + δ of an own-loop attack().
    const auto held = detail::PerturbedTensors::instance().held(params);
    if (held.first >= 0) {
      TORCH_CHECK(
          false,
          "advtrain: Trainer::step: a parameter of the step (shape ",
          params[held.first].sizes(),
          ") is still perturbed by ",
          held.second,
          " (an own-loop attack() not restored); call its restore() before "
          "the step");
    }
    struct InStep { // however the step ends
      bool& flag;
      explicit InStep(bool& f) : flag(f) {
        flag = true;
      }
      ~InStep() {
        flag = false;
      }
    } in_step{in_step_};
    // The attacker's module's other parameters (not the optimizer's): their
    // gradients gather as before, but a throwing step puts them back too.
    const std::vector<torch::Tensor> all =
        detail::union_of(params, attacker_.watched());
    const std::vector<torch::Tensor> others(
        all.begin() + static_cast<std::ptrdiff_t>(params.size()), all.end());
    std::vector<torch::Tensor> others_before = detail::take_grads(others);
    StepContext ctx(optimizer_, forward, loss_fn, params);
    ctx.accumulating = accumulating;
    ctx.throw_on_nonfinite = nonfinite_ == NonFinite::kThrow;
    ctx.check_gradients = check_gradients_;
    ctx.unlabeled = unlabeled;
    ctx.before_optimizer_step = before_optimizer_step_;
    ctx.after_optimizer_step = after_optimizer_step_;
    if (attacker_.share_dropout_mask()) {
      ctx.replay.emplace(params);
    }
    // The step starts from zero gradients; those there before are kept aside
    // to be put back if anything throws (or added back when accumulating).
    std::vector<torch::Tensor> before = ctx.take_grads();
    try {
      StepResult r;
      if (warmup_left_ > 0) { // a plain step
        ctx.figures.loss = ctx.pass();
        ctx.read_step = [&ctx] { ctx.read_figures(); };
        ctx.step_optimizer();
        --warmup_left_;
        if (!ctx.figures_read()) {
          ctx.read_figures();
        }
        r = ctx.result();
      } else {
        r = attacker_.run(ctx);
      }
      r.passes = ctx.passes;
      r.skipped = ctx.skipped;
      skipped_steps_ += ctx.skipped;
      if (ctx.skipped > 0 && !warned_nonfinite_) {
        warned_nonfinite_ = true;
        TORCH_WARN(
            "advtrain: a loss or gradient of the step was not finite (NaN or "
            "Inf), so the optimizer step was skipped and the weights left as "
            "they were (counted in Trainer::skipped_steps(); this warning is "
            "given once)");
      }
      if (accumulating) {
        ctx.add_grads(std::move(before));
      }
      detail::add_grads(others, std::move(others_before));
      return r;
    } catch (...) {
      try {
        attacker_.restore();
      } catch (...) { // NOLINT: the step's own exception is the one to report
      }
      ctx.put_grads(std::move(before));
      detail::put_grads(others, std::move(others_before));
      throw;
    }
  }

  torch::optim::Optimizer& optimizer_;
  Attacker& attacker_;
  std::function<void()> before_optimizer_step_;
  std::function<void()> after_optimizer_step_;
  int64_t warmup_left_ = 0;
  bool in_step_ = false;
  NonFinite nonfinite_ = NonFinite::kSkip;
  bool check_gradients_ = false;
  int64_t skipped_steps_ = 0;
  bool warned_nonfinite_ = false;
};

} // namespace advtrain
