// What an attacker perturbs: the `Target` interface. A target alone knows
// how its tensors are laid out (rows of a table, examples of an activation),
// how they are backed up and put back, where norms are taken (`Geometry`) and
// where a step's perturbation starts. Two kinds: `ParameterTarget`
// (parameter_target.h: embedding tables, moved in place with row-wise
// backups) and `ActivationTarget` (activation_target.h: each example's δ on
// a `PerturbedEmbedding`'s output).
#pragma once

#include <advtrain/detail/registry.h>
#include <advtrain/norm.h>
#include <advtrain/step.h>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// What one `Target::move` did to one tensor, on the device.
struct Move {
  /// ‖δᵢ‖ after the move (0-dim); undefined when the tensor did not move.
  torch::Tensor norm;
};

/// The tensors an attacker perturbs, and everything that depends on their
/// kind. Strategies reach it through `Attacker::target()` and never ask
/// which kind it is: they write their rule against `Geometry` and their
/// protocol against `StepContext`.
class Target {
 public:
  /// A strategy's rule for one tensor: moves `w` (the tensor's data, written
  /// in place) along `g` as `geo` says, from the backed-up `origin`; returns
  /// ‖δᵢ‖ (0-dim, on the device; undefined: not measured). Runs under
  /// NoGradGuard.
  using Rule = std::function<torch::Tensor(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin)>;
  /// Keeps a gradient norm measured on a whole tensor (the attacker's: it
  /// counts non-finite ones when the step is read) and, `on_device`,
  /// returns whether it gives a step as a 0-dim bool (else undefined).
  using NormCheck = std::function<torch::Tensor(
      size_t i, const torch::Tensor& gnorm, bool on_device)>;
  /// Writes the start of tensor i's perturbation into `d`, overwriting it
  /// (per example `d` is δ, zero before; on a parameter it is the tensor
  /// itself, to which the target then adds its backed-up value); `mask`
  /// broadcast against it per example, undefined on a parameter.
  using Start =
      std::function<void(size_t i, torch::Tensor& d, const torch::Tensor& m)>;

  virtual ~Target() = default;
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  /// Names: parameter names, "target[i]", or "perturbation[i]".
  const std::vector<std::string>& names() const noexcept {
    return names_;
  }
  /// How many tensors (known before any forward).
  size_t size() const noexcept {
    return names_.size();
  }
  /// The tensors perturbed now (per example: each slot's δ of the step's
  /// last forward, taken by `sync()`; empty between steps).
  const std::vector<torch::Tensor>& tensors() const noexcept {
    return tensors_;
  }
  /// Whether δ is taken per example on an activation.
  virtual bool per_example() const noexcept = 0;

  /// Takes the tensors a move works on (per example: the δ the last forward
  /// made; refused when there is none).
  virtual void sync(const char* /*kind*/) {}

  /// Whether the tensors are backed up and not yet restored.
  bool is_perturbed() const noexcept {
    return !backup_.empty();
  }

  /// Backs the tensors up unless they already are, claiming them for
  /// `owner` (refused when another attacker holds one). `rows_only`: the
  /// rule moves only rows with a gradient, so rows are backed up as they
  /// first move (where the target has rows). `untracked`: the
  /// perturbation is written without bumping the autograd version (see
  /// `data`), and so is the restore.
  void backup(
      const void* owner, const char* kind, bool rows_only, bool untracked) {
    if (is_perturbed()) {
      check_unchanged(kind, "attack()");
      return;
    }
    untracked_ = untracked;
    sync(kind);
    const auto other =
        detail::PerturbedTensors::instance().try_claim(tensors_, owner, kind);
    TORCH_CHECK(
        other.first < 0,
        "advtrain: ",
        kind,
        ": ",
        other.first < 0 ? "" : names_[other.first],
        " is already perturbed by another attacker (",
        other.second == nullptr ? "" : other.second,
        "); call that attacker's restore() first, since restores in another "
        "order would leave it perturbed");
    for (const auto& t : tensors_) {
      claimed_.push_back(t.unsafeGetTensorImpl());
    }
    torch::NoGradGuard no_grad;
    backup_.reserve(tensors_.size());
    try {
      take_backup(rows_only);
    } catch (...) { // e.g. out of memory: nothing is backed up, nothing held
      backup_.clear();
      restore(owner);
      throw;
    }
  }

  /// Puts the backed-up values back, bit for bit (written as the backup
  /// said: tracked or not), and releases the claims of `owner`; a no-op when
  /// nothing is backed up.
  void restore(const void* owner, const char* kind = "attacker") {
    check_unchanged(kind, "restore()");
    if (!claimed_.empty()) { // also after a backup() that failed half-way
      detail::PerturbedTensors::instance().release(claimed_, owner);
      claimed_.clear();
    }
    if (!is_perturbed()) {
      return;
    }
    torch::NoGradGuard no_grad;
    put_back(untracked_);
    backup_.clear();
    marks_.clear();
  }

  /// Drops the backup without writing it back, releasing the claims of
  /// `owner`: the tensors keep their current values.
  void release(const void* owner) {
    detail::PerturbedTensors::instance().release(claimed_, owner);
    claimed_.clear();
    if (is_perturbed()) {
      on_release();
    }
    backup_.clear();
    marks_.clear();
  }

  /// Records what the attacker wrote, so that a write by anyone else before
  /// the restore (an optimizer step in an own loop) is seen by the next
  /// `attack()` or `restore()`: the sum of the backed-up values, in float64
  /// (one pass over them; LibTorch's SGD writes without bumping the
  /// autograd version, so the version alone would miss it).
  void note_written() {
    marks_.clear();
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      marks_.push_back(written(i));
    }
  }
  /// Forgets the marks (a `Trainer` step, which restores before it steps
  /// the optimizer, keeps none).
  void forget_written() noexcept {
    marks_.clear();
  }

  /// Tensor i as a tensor to write into. `untracked`: the writes do not bump
  /// the autograd version counter, so a graph built before the perturbation
  /// (a regularizer's clean pass) stays usable; such a graph must only be run
  /// backward after `restore()`.
  torch::Tensor data(size_t i, bool untracked) const {
    return untracked ? tensors_[i].variable_data() : tensors_[i].detach();
  }
  /// Tensor i's backed-up value (per example δ = 0); only while perturbed.
  const torch::Tensor& origin(size_t i) const {
    return backup_[i];
  }
  /// Bytes the backups hold.
  int64_t backup_bytes() const {
    int64_t n = 0;
    for (const auto& t : backup_) {
      n += static_cast<int64_t>(t.nbytes());
    }
    return n;
  }

  /// Where tensor i's norms are taken (per example: its mask; on a whole
  /// tensor the gradient's norm is added by the move that measures it).
  virtual Geometry geometry(size_t i) const = 0;
  /// Whether gradient norms are measured on whole tensors (then zero and
  /// non-finite ones are counted) rather than per example (where such
  /// examples are left in place by the step itself).
  virtual bool measures_gradient_norm() const noexcept = 0;

  /// Moves tensor i (backed up) by `rule` along its gradient `g` (undefined
  /// for rules without one: `uses_gradient` false). `rows_only`: the rule
  /// moves only rows with a nonzero gradient.
  virtual Move move(
      size_t i,
      const torch::Tensor& g,
      bool uses_gradient,
      bool rows_only,
      bool untracked,
      const NormCheck& usable,
      const Rule& rule) = 0;

  /// After an attack: drops gradients that belong to the attack alone (per
  /// example δ's, so the next attack sees only the passes after it).
  virtual void consume_gradients() {}

  /// Tensor i's gradient summed over passes: `earlier` (set aside before the
  /// pass) plus `current` (this pass's alone, which the last move went
  /// along).
  virtual torch::Tensor merge_gradient(
      size_t /*i*/, torch::Tensor earlier, torch::Tensor current) const {
    if (earlier.defined() && current.defined()) {
      return earlier.add_(current);
    }
    return earlier.defined() ? std::move(earlier) : std::move(current);
  }

  /// ‖δ‖ in place now, over all tensors (0-dim, on the device; undefined
  /// when none).
  virtual torch::Tensor norm() const = 0;

  /// The step a `Trainer` runs now begins (`step`) or ends (null).
  virtual void begin_step(StepContext& step) {
    step_ = &step;
  }
  virtual void end_step() {
    step_ = nullptr;
  }
  /// Every perturbation of the current step starts from `start` (zero
  /// without one); `random`: it draws random numbers (then, with shared
  /// dropout masks, later passes jump over them). Per example it runs when
  /// the forward makes δ; on a parameter, at `restart()`.
  virtual void set_start(Start start, bool random) = 0;
  /// Starts a new perturbation: per example the next forward makes δ afresh
  /// (through the start); on a parameter the tensors are backed up and moved
  /// to their start now.
  virtual void restart(const void* owner, const char* kind) = 0;

  /// While set, the passes see the perturbation added to a lookup output
  /// detached from the table (per example; a parameter has no lookup, so its
  /// perturbed passes reach it as always).
  virtual void set_detached(bool /*detached*/) {}
  /// While set, the passes share the lookups of the ids they share (per
  /// example, on a `PerturbedEmbedding`: `Perturbation::set_shared_lookups`);
  /// only for passes that all end in one backward.
  virtual void set_shared_lookups(bool /*shared*/) {}

  /// A perturbation saved for tensor i (FreeAT's δ), checked against the
  /// tensor and moved to its device and dtype where the shape is fixed.
  virtual torch::Tensor fit_saved(
      size_t i, torch::Tensor saved, const char* kind) const = 0;

  /// Whether a step's start may draw random numbers (`set_start(start,
  /// true)`): per example; a parameter starts from its own value.
  virtual bool random_start() const noexcept {
    return false;
  }

  /// Per example: slot i's lookup output E (detached) of the last forward.
  virtual torch::Tensor embedded(size_t /*i*/) const {
    TORCH_CHECK(false, "advtrain: this target has no lookup output");
    return {};
  }

  /// The `Trainer` step running now, if any.
  StepContext* step_context() const noexcept {
    return step_;
  }

 protected:
  Target() = default;

  /// Appends one backup per tensor to `backup_`.
  virtual void take_backup(bool rows_only) = 0;
  /// Writes `backup_` back into the tensors.
  virtual void put_back(bool untracked) = 0;
  /// The backup was dropped without being written back (`release`).
  virtual void on_release() {}
  /// The float64 sum of what tensor i's backup would overwrite (0-dim);
  /// undefined where nothing else writes the tensor (per example).
  virtual torch::Tensor written(size_t i) const {
    return tensors_[i].detach().sum(torch::kDouble);
  }

  std::vector<torch::Tensor> tensors_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> backup_;

 private:
  /// Refuses `call` when a perturbed tensor changed since the attacker last
  /// wrote it: a restore would discard that change.
  void check_unchanged(const char* kind, const char* call) const {
    if (marks_.empty() || !is_perturbed()) {
      return;
    }
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < marks_.size() && i < tensors_.size(); ++i) {
      if (!marks_[i].defined()) {
        continue;
      }
      const double was = marks_[i].item<double>();
      const double now = written(i).item<double>();
      TORCH_CHECK(
          was == now || (std::isnan(was) && std::isnan(now)),
          "advtrain: ",
          kind,
          ": ",
          names_[i],
          " changed while perturbed (an optimizer.step() between attack() "
          "and restore()?); ",
          call,
          " would build on or discard that change, so it refuses and "
          "changes nothing. Call restore() before optimizer.step(); to keep "
          "the values as they are now (the perturbation included) and drop "
          "the backup, call release()");
    }
  }

  std::vector<const void*> claimed_; // registered in PerturbedTensors
  std::vector<torch::Tensor> marks_; // `written` after the last attack
  bool untracked_ = false;           // how the perturbation is written
  StepContext* step_ = nullptr;
};

namespace detail {

/// While alive, the target's passes share their lookups
/// (`Target::set_shared_lookups`): for a protocol whose passes, from its
/// first to the last it declares, all end in one backward.
class SharedLookups {
 public:
  explicit SharedLookups(Target& target) : target_(target) {
    target_.set_shared_lookups(true);
  }
  ~SharedLookups() {
    target_.set_shared_lookups(false);
  }
  SharedLookups(const SharedLookups&) = delete;
  SharedLookups& operator=(const SharedLookups&) = delete;

 private:
  Target& target_;
};

} // namespace detail
} // namespace advtrain
