// The base of every strategy, in the shape of LibTorch's `Optimizer`: the
// protocol for one batch (`run_step`, run by `run`) and the state that
// outlives it (`save`/`load`) are the strategy's; the base holds the
// `Target` and the strategy's `Traits`, puts the target back bit for bit
// (`restore`), saves and restores gradients and reads a step's figures once.
// Strategies that search derive from `SearchAttacker` (search.h), which adds
// `attack()` and the rule; `Strategy<Options>` (strategy.h) picks the base
// from the traits and adds the options and the ways to name a target.
#pragma once

#include <advtrain/detail/archive.h>
#include <advtrain/detail/gradient_backup.h>
#include <advtrain/detail/gradient_checks.h>
#include <advtrain/detail/gradient_counts.h>
#include <advtrain/parameters.h>
#include <advtrain/step.h>
#include <advtrain/target.h>
#include <advtrain/traits.h>

#include <c10/util/Type.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace advtrain {

/// Base of every strategy: it puts its target back bit for bit after a
/// perturbation, saves and restores the gradients of the parameters it
/// watches, for PGD-style loops, and saves the state that outlives a batch
/// (`save`/`load`, or `torch::save(attacker, path)`).
///
/// A strategy supplies its protocol for one batch (`run_step`),
/// `save_state`/`load_state` when it keeps state across batches and
/// `on_new_step` when a step starts from a δ of its own; what it supports
/// and needs is data, its `Traits` (`Options::traits`), which the base
/// reads. No call leaves the target perturbed when it throws.
class Attacker {
 public:
  /// Restores the target if it is still perturbed.
  virtual ~Attacker() {
    try {
      restore();
    } catch (...) {           // NOLINT: a destructor does not throw
      target_->release(this); // changed while perturbed: left as it is
    }
  }
  Attacker(const Attacker&) = delete;
  Attacker& operator=(const Attacker&) = delete;

  /// Puts the backed-up target back, bit for bit; a no-op when nothing is
  /// backed up. Refused, changing nothing, when a perturbed tensor changed
  /// since the last `attack()` (an optimizer step in between): writing the
  /// backup would discard that update.
  void restore() {
    if (is_perturbed()) {
      note_peak();
    }
    target_->restore(this, kind_);
  }

  /// Drops the backup without writing it back: the targets keep their
  /// current values, δ included (after `restore()` refused).
  void release() {
    target_->release(this);
  }

  /// Saves a copy of the `.grad` of every watched parameter (those whose grad
  /// is undefined are skipped).
  void backup_grad() {
    grad_backup_.save();
  }

  /// Puts the gradients saved by `backup_grad()` back, exactly (undefined
  /// stays undefined). The backup is handed over: a second call without a
  /// `backup_grad()` throws and changes nothing.
  void restore_grad() {
    grad_backup_.put_back(kind_);
  }

  /// Sets the parameters whose gradients `backup_grad()`/`restore_grad()`
  /// handle (a `Trainer` sets the optimizer's parameters when none are).
  void watch_grads(std::vector<torch::Tensor> params) {
    grad_backup_.watch(std::move(params));
  }

  /// Runs the strategy's protocol for one batch in `ctx` (what
  /// `Trainer::step` calls): the target's step begins, `run_step` runs, the
  /// step ends however it leaves, and a completed step is counted. Its
  /// figures, with the counts of zero and non-finite gradients, are read to
  /// the host once (`ctx.read_figures`), when `run_step` has not read them.
  StepResult run(StepContext& ctx) {
    ctx.read_step = [this, &ctx] { read_step(ctx); };
    target_->begin_step(ctx);
    struct EndStep { // however the step ends: no hook outlives `ctx`
      Target& target;
      ~EndStep() {
        target.end_step();
      }
    } end_step{*target_};
    on_new_step();
    try {
      run_step(ctx);
    } catch (...) {
      try {
        target_->forget_written(); // the step's writes are its own
        restore();                 // while the step's δ is still known
      } catch (...) { // NOLINT: the step's own exception is the one to report
      }
      throw;
    }
    ++steps_done_;
    if (!ctx.figures_read()) {
      read_step(ctx);
    }
    return ctx.result();
  }

  /// Writes the state that outlives a batch (FreeAT's δ, the step counter)
  /// into `archive`, tagged with the strategy's name.
  void save(torch::serialize::OutputArchive& archive) const {
    TORCH_CHECK(
        !is_perturbed(),
        "advtrain: ",
        kind_,
        ": save() while the targets are perturbed; call restore() first");
    detail::write_header(archive, kind_, type_name(), steps_done_);
    save_state(archive);
  }

  /// Reads what `save` wrote, from the same strategy and norm variant; all
  /// or nothing: the state is checked (checksum, shapes, finiteness,
  /// FreeAT's δ within ε) before anything changes.
  void load(torch::serialize::InputArchive& archive) {
    TORCH_CHECK(
        !is_perturbed(),
        "advtrain: ",
        kind_,
        ": load() while the targets are perturbed; call restore() first");
    const int64_t steps = detail::read_header(archive, kind_, type_name());
    load_state(archive); // checks everything before it changes anything
    steps_done_ = steps;
  }

  /// The strategy's C++ type, as archives name it
  /// ("advtrain::BasicFreeAT<advtrain::L2>").
  std::string type_name() const {
    return c10::demangle(typeid(*this).name());
  }

  /// What this attacker perturbs.
  const Target& target() const noexcept {
    return *target_;
  }
  /// The tensors this attacker perturbs (per example: the step's δ).
  const std::vector<torch::Tensor>& targets() const noexcept {
    return target_->tensors();
  }
  /// Their names (parameter names, "target[i]" when built from tensors, or
  /// "perturbation[i]", with ".lookup[k]" for a slot's later lookups).
  const std::vector<std::string>& target_names() const noexcept {
    return target_->names();
  }
  /// The parameters whose gradients are watched.
  const std::vector<torch::Tensor>& watched() const noexcept {
    return grad_backup_.watched();
  }
  /// Whether the target is perturbed (backed up and not yet restored).
  bool is_perturbed() const noexcept {
    return target_->is_perturbed();
  }
  /// ‖δ‖ of the last `attack()` (all tensors together), read to the host.
  double perturbation_norm() const {
    return perturbation_norm_.defined()
               ? detail::to_host({perturbation_norm_}).front()
               : 0.0;
  }
  /// Batches (or micro-batches) a `Trainer` completed with this attacker.
  int64_t steps_done() const noexcept {
    return steps_done_;
  }
  /// The strategy's name.
  const char* kind() const noexcept {
    return kind_;
  }
  /// Bytes the attacker holds now beyond the model: backups (whole tables,
  /// or only the rows a batch moved), saved gradients, persistent δ.
  int64_t held_bytes() const {
    int64_t n = target_->backup_bytes();
    for (const auto& t : persistent_) {
      n += detail::bytes_of(t);
    }
    return n + grad_backup_.bytes();
  }
  /// The largest `held_bytes()` seen after an `attack()` or at a restore.
  int64_t peak_held_bytes() const noexcept {
    return peak_bytes_;
  }
  /// Whether it perturbs embedding outputs per example, not parameters.
  bool per_example() const noexcept {
    return target_->per_example();
  }
  /// What the strategy supports and needs (`Options::traits`).
  const Traits& traits() const noexcept {
    return traits_;
  }
  /// Whether the passes of one `Trainer::step` share their dropout masks
  /// (the `share_dropout_mask` option).
  bool share_dropout_mask() const noexcept {
    return share_dropout_mask_;
  }
  /// How many times a gradient with a non-finite norm was met (and skipped),
  /// as of the last step's (or own-loop `attack()`'s) host read.
  int64_t nonfinite_gradients() const noexcept {
    return counts_.nonfinite();
  }
  /// How many times `attack()` found every target's gradient exactly zero
  /// (`zero_grad()` before `attack()`?), as of the last host read.
  int64_t zero_gradients() const noexcept {
    return counts_.zero();
  }

 protected:
  /// `kind` names the strategy in error messages and archives; `traits`
  /// says what it supports; `share_dropout_mask` whether a step's passes
  /// share their dropout masks. The parameters of `module`, when given, are
  /// the ones whose gradients are watched.
  Attacker(
      std::unique_ptr<Target> target,
      const char* kind,
      Traits traits,
      bool share_dropout_mask,
      const NamedParameters* module = nullptr)
      : target_(std::move(target)),
        kind_(kind),
        traits_(traits),
        share_dropout_mask_(share_dropout_mask),
        grad_backup_(
            module != nullptr ? module->tensors()
                              : std::vector<torch::Tensor>{}) {}

  /// The protocol for one batch (docs/design.md, "Protocols"), reporting in
  /// `ctx.figures`; called by `run`, whose caller (`Trainer`) restores
  /// weights and gradients if it throws.
  virtual void run_step(StepContext& ctx) = 0;

  /// State beyond the base's.
  virtual void save_state(torch::serialize::OutputArchive& /*archive*/) const {}
  virtual void load_state(torch::serialize::InputArchive& /*archive*/) {}

  /// Called when a `Trainer` step begins, before its first forward: set the
  /// step's start here (`target().set_start`).
  virtual void on_new_step() {}

  /// State that outlives a batch (FreeAT's δ), counted in `held_bytes()`;
  /// undefined entries hold nothing.
  std::vector<torch::Tensor> persistent_;

  /// The target, to write into.
  Target& target() noexcept {
    return *target_;
  }
  /// Backs the target up unless it already is.
  void backup() {
    target_->backup(
        this, kind_, traits_.moves_gradient_rows(), traits_.untracked_writes());
  }
  /// Tensor `i` to write into (see `untracked_writes`).
  torch::Tensor data(size_t i) const {
    return target_->data(i, traits_.untracked_writes());
  }
  /// Tensor `i`'s backed-up value; only while perturbed.
  const torch::Tensor& origin(size_t i) const {
    return target_->origin(i);
  }

  /// Reads the step's figures (`ctx.figures`), the 0-dim tensors `extra`
  /// and the attacker's counts of zero and non-finite gradients to the host
  /// in one copy; counts and warns; returns extra's values.
  std::vector<double> read_step(
      StepContext& ctx, const std::vector<torch::Tensor>& extra = {}) {
    const auto read = [&ctx](const std::vector<torch::Tensor>& all) {
      return ctx.read_figures(all);
    };
    return counts_.read(extra, read, kind_, target_names());
  }

  /// Refuses a sparse gradient `g` of tensor `i` unless `accepted`.
  void check_sparse(size_t i, const torch::Tensor& g, bool accepted) const {
    detail::check_sparse(kind_, target_names()[i], g, accepted);
  }

  /// The `Trainer` step running now, if any.
  StepContext* running_step() const noexcept {
    return target_->step_context();
  }

  /// Records ‖δ‖ (0-dim) of a move made outside `attack()`.
  void set_perturbation_norm(torch::Tensor norm) noexcept {
    perturbation_norm_ = std::move(norm);
  }
  /// ‖δ‖ of the last move (0-dim, on the device; undefined: 0).
  const torch::Tensor& last_perturbation_norm() const noexcept {
    return perturbation_norm_;
  }

  /// Keeps `held_bytes()` if it is the largest yet.
  void note_peak() {
    peak_bytes_ = std::max(peak_bytes_, held_bytes());
  }
  /// The gradient norms and checks kept for the step's host read.
  detail::GradientCounts& counts() noexcept {
    return counts_;
  }

 private:
  std::unique_ptr<Target> target_;
  const char* kind_;
  Traits traits_;
  bool share_dropout_mask_;
  detail::GradientBackup grad_backup_; // the watched parameters' gradients
  torch::Tensor perturbation_norm_;    // 0-dim; undefined: 0
  detail::GradientCounts counts_;
  int64_t steps_done_ = 0;
  int64_t peak_bytes_ = 0;
};

/// `archive << attacker`, so that `torch::save(attacker, path)` works.
inline torch::serialize::OutputArchive& operator<<(
    torch::serialize::OutputArchive& archive, const Attacker& attacker) {
  attacker.save(archive);
  return archive;
}

/// `archive >> attacker`, so that `torch::load(attacker, path)` works.
inline torch::serialize::InputArchive& operator>>(
    torch::serialize::InputArchive& archive, Attacker& attacker) {
  attacker.load(archive);
  return archive;
}

} // namespace advtrain
