// The base of every strategy: `Attacker` holds a `Target` and the
// strategy's `Traits`, moves the target by the strategy's rule (`attack`),
// puts it back bit for bit (`restore`), saves and restores gradients, and
// runs the strategy's protocol for one batch (`run`). `Strategy<Options>`
// (strategy.h) adds the options and the three ways to name a target.
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
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace advtrain {

/// Base of every strategy: it backs up its target before the first
/// perturbation, moves it by the strategy's rule, and puts it back bit for
/// bit. It also saves and restores the gradients of the parameters it
/// watches, for PGD-style loops, and saves the state that outlives a batch
/// (`save`/`load`, or `torch::save(attacker, path)`).
///
/// A strategy supplies its protocol for one batch (`run_step`), its rule
/// (`perturb`) when it searches, `save_state`/`load_state` when it keeps
/// state across batches and `on_new_step` when a step starts from a δ of
/// its own; what it supports and needs is data, its `Traits`
/// (`Options::traits`), which the base reads. No call leaves the target
/// perturbed when it throws.
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

  /// Backs the target up if it is not perturbed yet, then moves it by the
  /// strategy's rule (along its current gradient, for all but FreeAT).
  void attack() {
    attack(/*is_first_attack=*/!is_perturbed());
  }

  /// PGD-style: the first attack of a sequence backs the target up. The
  /// backup is taken whenever the target is not perturbed and never
  /// overwritten while it is (that case warns: a `restore()` is missing), so
  /// `restore()` always returns to the values of before the first attack.
  void attack(bool is_first_attack) {
    TORCH_CHECK(
        traits_.searches(),
        "advtrain: ",
        kind_,
        ": its perturbation is not a move of the target along its gradient "
        "(drawn noise, or a search of its own), so there is no attack(); "
        "train with Trainer::step");
    target_->sync(kind_);
    const std::vector<torch::Tensor> grads = target_grads();
    torch::NoGradGuard no_grad;
    if (is_perturbed() && is_first_attack) {
      TORCH_WARN(
          "advtrain: attack(is_first_attack=true) while the targets are still "
          "perturbed (restore() was not called after the last attack); the "
          "original backup is kept");
    }
    backup();
    try {
      const auto usable =
          [this](size_t i, const torch::Tensor& gnorm, bool on_device) {
            if (!on_device) {
              note_norm(i, gnorm);
              return torch::Tensor();
            }
            return usable_norm(i, gnorm);
          };
      const auto rule = [this](
                            size_t i,
                            torch::Tensor& w,
                            const torch::Tensor& g,
                            const Geometry& geo,
                            const torch::Tensor& origin) {
        return perturb(i, w, g, geo, origin);
      };
      std::vector<torch::Tensor> norms;
      // The gradient norms this attack measures form one group: all zero is
      // the sign of a zero_grad() between the backward and attack(), counted
      // when the step is read. (Per example nothing is measured: δ is no
      // optimizer or module parameter, so zero_grad() does not touch its
      // gradient.)
      const auto in_group = counts_.group(traits_.uses_gradient());
      for (size_t i = 0; i < grads.size(); ++i) {
        const Move m = target_->move(
            i,
            grads[i],
            traits_.uses_gradient(),
            traits_.moves_gradient_rows(),
            traits_.untracked_writes(),
            usable,
            rule);
        norms.push_back(std::move(m.norm));
        if (traits_.uses_gradient() && !target_->measures_gradient_norm()) {
          note_finite_gradient(i, grads[i]);
        }
      }
      perturbation_norm_ = detail::combined_norm(norms);
      peak_bytes_ = std::max(peak_bytes_, held_bytes());
      target_->consume_gradients();
      if (running_step() == nullptr) { // a Trainer restores before it steps
        target_->note_written();
      }
    } catch (...) {
      target_->forget_written(); // the writes so far are this attack's own
      restore();
      throw;
    }
    if (running_step() == nullptr) {
      settle(); // an own loop: counted and warned at once
    }
  }

  /// Puts the backed-up target back, bit for bit; a no-op when nothing is
  /// backed up. Refused, changing nothing, when a perturbed tensor changed
  /// since the last `attack()` (an optimizer step in between): writing the
  /// backup would discard that update.
  void restore() {
    if (is_perturbed()) {
      peak_bytes_ = std::max(peak_bytes_, held_bytes());
    }
    target_->restore(this, kind_);
  }

  /// Drops the backup without writing it back: the targets keep their
  /// current values, the perturbation included (after `restore()` refused
  /// because an optimizer step came between `attack()` and `restore()`).
  void release() {
    target_->release(this);
  }

  /// Saves a copy of the `.grad` of every watched parameter (those whose grad
  /// is undefined are skipped).
  void backup_grad() {
    grad_backup_.save();
  }

  /// Puts the gradients saved by `backup_grad()` back in place of the current
  /// ones, exactly: a parameter whose grad was undefined then gets an
  /// undefined grad again. The backup is handed over, not copied: a call
  /// without a `backup_grad()` since the last one throws and changes nothing
  /// (the clean gradient would otherwise be missing from the step).
  void restore_grad() {
    grad_backup_.put_back(kind_);
  }

  /// Sets the parameters whose gradients `backup_grad()`/`restore_grad()`
  /// handle (`Trainer` gives it the optimizer's parameters when none are set).
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

  /// Reads what `save` wrote; the archive must come from the same strategy
  /// (its norm variant included: FreeAT's archive does not load into
  /// FreeATL2). All or nothing: the state is checked (its checksum, shapes,
  /// finiteness, FreeAT's δ within ε) before anything changes.
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
  /// The largest `held_bytes()` seen after an `attack()` or before a
  /// `restore()`.
  int64_t peak_held_bytes() const noexcept {
    return peak_bytes_;
  }
  /// Whether this attacker perturbs embedding outputs per example
  /// (`PerturbedEmbedding`) rather than parameters.
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
  /// (nothing moved; typically `zero_grad()` ran between the backward and
  /// `attack()`), as of the last host read.
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

  /// The rule: moves tensor `i` (`w`, its data, or the rows of it that
  /// moved) along its gradient `g`; `geo` says where norms are taken (on a
  /// parameter, `geo.gnorm` = ‖g‖, and where ‖g‖ is zero or not finite `g`
  /// is zero and `geo.gnorm` 1); `origin` is its backed-up value (per
  /// example δ = 0). Returns ‖δᵢ‖ after the move, a 0-dim tensor on the
  /// device (undefined: not measured); nothing in it may read the device to
  /// the host. Runs under NoGradGuard. Where `traits().uses_gradient()` is
  /// false, `g` is undefined. Only strategies whose traits say they search
  /// define it: `attack()` refuses the others before it gets here.
  virtual torch::Tensor perturb(
      size_t /*i*/,
      torch::Tensor& /*w*/,
      const torch::Tensor& /*g*/,
      const Geometry& /*geo*/,
      const torch::Tensor& /*origin*/) {
    TORCH_INTERNAL_ASSERT(false, kind_, " declares no search rule");
    return {};
  }

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

  /// Whether a gradient norm measured on a whole tensor gives a step (0-dim
  /// bool, on the device): not when it is zero or not finite. The norm is
  /// kept, and read with the step: non-finite ones are then counted and
  /// warned about (once per attacker).
  torch::Tensor usable_norm(size_t i, const torch::Tensor& gnorm) {
    note_norm(i, gnorm);
    return detail::usable_norm(gnorm);
  }

  /// Keeps tensor i's gradient norm `gnorm` (0-dim) to be read with the
  /// step: a non-finite one is counted, once per step where `once` (a
  /// regularizer's search, which stops moving at the first).
  void note_norm(size_t i, const torch::Tensor& gnorm, bool once = false) {
    counts_.note_norm(i, gnorm, once);
  }

  /// Per example, where no norm of a whole tensor is taken: whether `g` is
  /// finite, kept to be read and counted as a norm is.
  void note_finite_gradient(size_t i, const torch::Tensor& g) {
    counts_.note_finite(i, g);
  }

  /// The geometry of a step of tensor `i` along its gradient `g`, or none
  /// when `g` is undefined. Where the target measures norms on whole
  /// tensors, ‖g‖ is measured and checked (`usable_norm`): where it is zero
  /// or not finite, `g` is replaced by zeros, so the step moves by 0; per
  /// example, such examples are left in place by the step itself.
  std::optional<Geometry> step_geometry(size_t i, torch::Tensor& g) {
    if (!g.defined()) {
      return std::nullopt;
    }
    check_sparse(i, g, /*accepted=*/false);
    if (!target_->measures_gradient_norm()) {
      note_finite_gradient(i, g);
      return target_->geometry(i);
    }
    const torch::Tensor gnorm = detail::l2_norm(g);
    if (!detail::sync_free(g)) { // host memory: a read waits for nothing
      note_norm(i, gnorm);
      return detail::read_geometry(gnorm);
    }
    return detail::whole_tensor(g, gnorm, usable_norm(i, gnorm));
  }

  /// Reads the step's figures (`ctx.figures`), the 0-dim tensors `extra`
  /// and the attacker's counts of zero and non-finite gradients to the host
  /// in one copy; counts and warns; returns extra's values.
  std::vector<double> read_step(
      StepContext& ctx, const std::vector<torch::Tensor>& extra = {}) {
    std::vector<torch::Tensor> all = extra;
    const size_t counts = counts_.append(all);
    std::vector<double> values = ctx.read_figures(all);
    counts_.take(values.data() + extra.size(), counts, kind_, target_names());
    values.resize(extra.size());
    return values;
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

  /// Reads the pending counts now (outside a `Trainer` step): one host read,
  /// none when nothing is pending.
  void settle() {
    std::vector<torch::Tensor> counts;
    const size_t n = counts_.append(counts);
    if (n > 0) {
      counts_.take(detail::to_host(counts).data(), n, kind_, target_names());
    }
  }

  /// The protocol of FGSM and FGM: clean pass, one attack, adversarial pass,
  /// restore, optimizer step.
  void run_single_attack(StepContext& ctx) {
    ctx.figures.loss = ctx.pass();
    attack();
    ctx.figures.perturbation_norm = perturbation_norm_;
    ctx.figures.adv_loss = ctx.pass();
    restore();
    ctx.step_optimizer();
  }

 private:
  /// The target's gradients, checked; undefined where a tensor got none.
  std::vector<torch::Tensor> target_grads() const {
    return detail::checked_gradients(
        targets(),
        target_names(),
        kind_,
        traits_.accepts_sparse(),
        /*needs_one=*/traits_.uses_gradient());
  }

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
