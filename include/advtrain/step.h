// One training step as a strategy's protocol sees it: the closures it runs
// (`ForwardFunction`, `LossFunction`), what it reports (`StepFigures` on the
// device, `StepResult` once read), and `StepContext`, the passes, gradients,
// optimizer step and the one host read of one batch.
#pragma once

#include <advtrain/detail/rng_replay.h>

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace advtrain {

/// Runs the model on the current batch and returns its output (logits).
using ForwardFunction = std::function<torch::Tensor()>;
/// Turns the model's output into a scalar loss.
using LossFunction = std::function<torch::Tensor(const torch::Tensor&)>;

/// What one `Trainer::step` did. Each field means the same for every
/// strategy and both targets; which pass each figure comes from in a
/// strategy's protocol is in its header's documentation (e.g. FreeAT: its
/// last replay).
struct StepResult {
  /// Task loss of the step's first pass, run at the step's starting point δ₀:
  /// δ₀ = 0 (a clean pass) unless the strategy starts elsewhere (a random
  /// start, or a δ kept across batches); `start_norm` is ‖δ₀‖.
  double loss = 0.0;
  /// ‖δ₀‖ at the first pass (0: `loss` is the clean loss).
  double start_norm = 0.0;
  /// Task loss of the step's last pass at a perturbation (a regularizer: the
  /// task loss at its final perturbed output). With a single pass, that
  /// pass.
  double adv_loss = 0.0;
  /// ‖δ‖₂ at the pass of `adv_loss`: the L2 norm over everything perturbed
  /// (all targets; on the per-example target, all examples together:
  /// sqrt(Σᵢ ‖δᵢ‖²)). 0 when no perturbation was applied.
  double perturbation_norm = 0.0;
  /// The penalty a regularizer adds to the task loss, before its weight; 0
  /// for strategies without one, or when the regularizer left it out
  /// (non-finite search gradient).
  double regularizer = 0.0;
  /// A proximal term added after the target is restored (SMART's Bregman
  /// term `sym_kl(f(x; θ), f(x; θ̃))`), before its weight (0: none).
  double proximal = 0.0;
  /// Forward passes through the whole model (each followed by a backward,
  /// except a regularizer's search passes, which use autograd::grad).
  int64_t passes = 0;
  /// Whether every loss of the step was finite (the passes' task losses and
  /// the regularizer's terms); where the protocol steps the optimizer more
  /// than once, those of its last optimizer step.
  bool finite = true;
  /// Optimizer steps skipped because a loss was not finite (NaN or ±Inf):
  /// the weights and the optimizer's state stay as before them, and the
  /// step's gradients are dropped. At most one per optimizer step of the
  /// protocol.
  int64_t skipped = 0;
};

/// `StepResult`'s figures as a protocol produces them: 0-dim tensors on the
/// device (undefined: 0), read to the host once, when the step ends
/// (`StepContext::read_figures`), so no pass waits for the device.
struct StepFigures {
  torch::Tensor loss;
  torch::Tensor start_norm;
  torch::Tensor adv_loss;
  torch::Tensor perturbation_norm;
  torch::Tensor regularizer;
  torch::Tensor proximal;
};

namespace detail {

/// Host reads the library has made on this thread (`to_host`).
inline int64_t& host_reads() {
  thread_local int64_t n = 0;
  return n;
}

/// The values of 0-dim tensors, read to the host in one copy (none when
/// `values` is empty); every value the library reads to the host during a
/// step goes through here, and is counted in `host_reads()`.
inline std::vector<double> to_host(const std::vector<torch::Tensor>& values) {
  if (values.empty()) {
    return {};
  }
  const torch::Tensor& first = values.front();
  bool alike = true;
  for (const auto& v : values) {
    alike = alike && v.scalar_type() == first.scalar_type() &&
            v.device() == first.device();
  }
  torch::Tensor all;
  if (alike) {
    all = at::stack(values);
  } else {
    std::vector<torch::Tensor> flat;
    flat.reserve(values.size());
    for (const auto& v : values) {
      flat.push_back(v.reshape({1}).to(first.device(), torch::kDouble));
    }
    all = at::cat(flat);
  }
  const torch::Tensor host =
      all.detach().to(torch::kCPU, torch::kDouble).contiguous();
  ++host_reads();
  const double* p = host.data_ptr<double>();
  return {p, p + host.numel()};
}

/// Moves the gradients of `params` out (leaving them undefined) and returns
/// them.
inline std::vector<torch::Tensor> take_grads(
    const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) {
    grads.push_back(std::move(p.mutable_grad()));
    p.mutable_grad() = torch::Tensor();
  }
  return grads;
}

/// Puts gradients taken by `take_grads` back, replacing the current ones.
inline void put_grads(
    const std::vector<torch::Tensor>& params,
    std::vector<torch::Tensor> grads) {
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = std::move(grads[i]);
  }
}

/// Adds gradients taken by `take_grads` to the current ones.
inline void add_grads(
    const std::vector<torch::Tensor>& params,
    std::vector<torch::Tensor> grads) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (!grads[i].defined()) {
      continue;
    }
    torch::Tensor& g = params[i].mutable_grad();
    g = g.defined() ? grads[i].add_(g) : std::move(grads[i]);
  }
}

} // namespace detail

/// One batch's worth of work for a strategy's protocol — the extension point
/// of every protocol: a strategy's `run_step(StepContext&)` runs its passes
/// through it (`pass`, `run_forward`, `loss_of`), sets gradients aside and
/// back (`take_grads`, `put_grads`, `add_grads`, `clear_grads`), and steps
/// the optimizer (`step_optimizer`, with the hooks around it). `Trainer`
/// builds it for each step with the closures, the optimizer and the
/// parameters whose gradients the step owns. Gradients are cleared by
/// dropping them (like `zero_grad(set_to_none=true)`) and moved, never
/// copied, when a protocol sets them aside.
struct StepContext {
  StepContext(
      torch::optim::Optimizer& optimizer,
      const ForwardFunction& forward,
      const LossFunction& loss_fn,
      const std::vector<torch::Tensor>& params)
      : optimizer(optimizer),
        forward(forward),
        loss_fn(loss_fn),
        params(params) {}

  torch::optim::Optimizer& optimizer;
  const ForwardFunction& forward;
  const LossFunction& loss_fn;
  const std::vector<torch::Tensor>& params;
  /// The model's output on an unlabeled batch, when the step has one
  /// (`Trainer::step(forward, loss_fn, unlabeled)`): a label-free
  /// regularizer is taken there instead of on the labeled batch.
  ForwardFunction unlabeled;
  /// Set when every pass must draw the same dropout masks.
  std::optional<detail::RngReplay> replay;
  /// Set by `Trainer::accumulate`: the protocol's optimizer step is skipped.
  bool accumulating = false;
  /// Run before every optimizer step, once the gradients are final (e.g. to
  /// all-reduce them across workers); none when empty.
  std::function<void()> before_optimizer_step;
  /// Run after every optimizer step, with the new parameters (e.g. to update
  /// a moving average of them); none when empty.
  std::function<void()> after_optimizer_step;
  /// Run before every pass's forward (per example: the pass's lookups start
  /// again at the first δ); none when empty.
  std::function<void()> before_pass;
  /// Forward passes run so far (`pass` counts them; protocols that run
  /// passes another way add theirs).
  int64_t passes = 0;
  /// Whether every loss since the last optimizer step was finite (0-dim
  /// bool, on the device; undefined: no loss yet). `loss_of` and
  /// `note_finite` keep it; the optimizer step reads it.
  torch::Tensor finite;
  /// The step's one host read, made by the attacker (figures, counts and
  /// `finite`) just before the last optimizer step, so that a non-finite
  /// loss skips it; none: `finite` is read on its own.
  std::function<void()> read_step;
  /// A non-finite loss throws (after the step is rolled back) instead of
  /// skipping the optimizer step.
  bool throw_on_nonfinite = false;
  /// The gradients are checked too: a non-finite one skips the optimizer
  /// step though every loss was finite.
  bool check_gradients = false;
  /// Optimizer steps skipped so far in this step.
  int64_t skipped = 0;
  /// Optimizer steps taken so far in this step.
  int64_t optimizer_steps = 0;
  /// What the protocol reports, on the device until `read_figures`.
  StepFigures figures;

  /// Reads `figures`, and the 0-dim tensors `extra`, to the host in one copy
  /// (the step's one host read) into `result()`; returns extra's values.
  /// Once per step: at its end, or where the protocol must decide on a value
  /// (a regularizer, before its backward).
  std::vector<double> read_figures(
      const std::vector<torch::Tensor>& extra = {}) {
    TORCH_CHECK(!read_, "advtrain: a step's figures are read once");
    double finite_value = 1.0;
    double* out[] = {
        &result_.loss,
        &result_.start_norm,
        &result_.adv_loss,
        &result_.perturbation_norm,
        &result_.regularizer,
        &result_.proximal,
        &finite_value};
    const torch::Tensor* in[] = {
        &figures.loss,
        &figures.start_norm,
        &figures.adv_loss,
        &figures.perturbation_norm,
        &figures.regularizer,
        &figures.proximal,
        &finite};
    std::vector<torch::Tensor> all = extra;
    for (const torch::Tensor* t : in) {
      if (t->defined()) {
        all.push_back(*t);
      }
    }
    const std::vector<double> values = detail::to_host(all);
    size_t k = extra.size();
    for (size_t f = 0; f < 7; ++f) {
      *out[f] = in[f]->defined() ? values[k++] : *out[f];
    }
    result_.finite = finite_value != 0.0;
    finite_read_ = finite.defined();
    read_ = true;
    return {values.begin(), values.begin() + extra.size()};
  }
  /// Whether `read_figures` has run.
  bool figures_read() const noexcept {
    return read_;
  }
  /// The figures as read (`passes` is set by `Trainer`).
  StepResult& result() noexcept {
    return result_;
  }

  /// The protocol's optimizer step, between the two hooks (none while
  /// accumulating micro-batches), unless a loss since the last one was not
  /// finite (or a gradient, with `check_gradients`): then it is skipped (or
  /// throws, `throw_on_nonfinite`) and the gradients are dropped. With a
  /// `before_optimizer_step` hook, which runs either way, the gradients it
  /// leaves decide instead of the losses. `last`: the step's last optimizer
  /// step, where the step's one read decides (FreeAT's earlier replays read
  /// `finite` alone).
  void step_optimizer(bool last = true) {
    if (accumulating) {
      return;
    }
    if (before_optimizer_step) {
      // Before the decision, so that data-parallel workers all take part in
      // the all-reduce; the decision is then on the gradients it leaves,
      // the same on every worker (a worker's own loss is not).
      before_optimizer_step();
      finite = torch::Tensor();
    }
    if (before_optimizer_step || check_gradients) {
      for (const auto& p : params) {
        const torch::Tensor& g = p.grad();
        if (g.defined()) {
          note_finite(g.is_sparse() ? g._values() : g);
        }
      }
    }
    bool ok = true;
    if (finite.defined()) {
      if (!finite_read_ && last && !read_ && read_step) {
        read_step(); // figures, counts and `finite` in one read
      }
      if (finite_read_) {
        ok = result_.finite;
      } else {
        ok = detail::to_host({finite}).front() != 0.0;
        result_.finite = ok;
      }
    }
    finite = torch::Tensor();
    finite_read_ = false;
    if (!ok) {
      ++skipped;
      TORCH_CHECK(
          !throw_on_nonfinite,
          "advtrain: a loss or gradient of the step was not finite (NaN or "
          "Inf); the step was rolled back (NonFinite::kSkip skips the "
          "optimizer step instead)");
      clear_grads();
      return;
    }
    optimizer.step();
    ++optimizer_steps;
    if (after_optimizer_step) {
      after_optimizer_step();
    }
  }

  /// Adds whether `value` (a loss, a regularizer term) is finite to
  /// `finite`, on the device; `unless`, a 0-dim bool, excuses it where
  /// true (a term the protocol leaves out).
  void note_finite(
      const torch::Tensor& value, const torch::Tensor& unless = {}) {
    // (A gradient's check allocates booleans, a byte per element, where
    // Σ value·0 would take a copy of the gradient's size.)
    const torch::Tensor v = value.detach();
    torch::Tensor ok =
        v.dim() == 0 ? torch::isfinite(v) : torch::isfinite(v).all();
    if (unless.defined()) {
      ok = ok.logical_or(unless.to(ok.device()));
    }
    finite = finite.defined() ? finite.logical_and(ok) : ok;
    finite_read_ = false;
  }

  /// The model's output, with the random state of the step's first pass when
  /// `replay` is set.
  torch::Tensor run_forward() {
    return replayed(forward);
  }

  /// `f()`, run as a pass of the step: with the first pass's random state
  /// when `replay` is set.
  template <typename F>
  torch::Tensor replayed(const F& f) {
    if (before_pass) {
      before_pass();
    }
    if (!replay) {
      return f();
    }
    replay->before_pass();
    struct After { // back to the frontier even if f throws
      detail::RngReplay& r;
      ~After() {
        r.after_pass();
      }
    } after{*replay};
    return f();
  }

  /// The loss of `out`, checked to be a scalar that can be differentiated;
  /// its finiteness joins `finite`.
  torch::Tensor loss_of(const torch::Tensor& out) {
    const torch::Tensor loss = loss_fn(out);
    TORCH_CHECK(
        loss.defined() && loss.numel() == 1,
        "advtrain: the loss function must return a scalar, got a tensor of "
        "shape ",
        loss.defined() ? loss.sizes() : torch::IntArrayRef{});
    TORCH_CHECK(
        loss.requires_grad(),
        "advtrain: the loss does not require grad; is the model's forward run "
        "under NoGradGuard?");
    note_finite(loss);
    return loss;
  }

  /// Forward, loss and `backward(loss * scale)`; returns the loss, detached.
  torch::Tensor pass(double scale = 1.0) {
    const torch::Tensor loss = loss_of(run_forward());
    if (scale == 1.0) {
      loss.backward();
    } else {
      (loss * scale).backward();
    }
    ++passes;
    return loss.detach();
  }

  /// Moves every gradient out (leaving them undefined) and returns them.
  std::vector<torch::Tensor> take_grads() const {
    return detail::take_grads(params);
  }
  /// Puts gradients taken by `take_grads` back, replacing the current ones.
  void put_grads(std::vector<torch::Tensor> grads) const {
    detail::put_grads(params, std::move(grads));
  }
  /// Adds gradients taken by `take_grads` to the current ones.
  void add_grads(std::vector<torch::Tensor> grads) const {
    detail::add_grads(params, std::move(grads));
  }

  /// Drops every gradient (the next backward starts from zero).
  void clear_grads() const {
    for (const auto& p : params) {
      p.mutable_grad() = torch::Tensor();
    }
  }

 private:
  StepResult result_;
  bool read_ = false;
  bool finite_read_ = false; // `finite` as it is now was read into result_
};

} // namespace advtrain
