// The base of every strategy: `Attacker` holds a `Target`, moves it by the
// strategy's rule (`attack`), puts it back bit for bit (`restore`), saves and
// restores gradients, and runs the strategy's protocol for one batch
// (`run`). `Strategy<Options>` adds the options and the three ways to name a
// target.
#pragma once

#include <advtrain/activation_target.h>
#include <advtrain/detail/archive.h>
#include <advtrain/parameter_target.h>
#include <advtrain/parameters.h>
#include <advtrain/step.h>
#include <advtrain/target.h>

#include <c10/util/Type.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
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
/// A strategy supplies two hooks: its rule (`perturb`) and its protocol for
/// one batch (`run_step`), plus `save_state`/`load_state` when it keeps state
/// across batches. No call leaves the target perturbed when it throws.
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
    check_attack();
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
      struct Group {
        int64_t& group;
        Group(int64_t& g, int64_t id) : group(g) {
          group = id;
        }
        ~Group() {
          group = -1;
        }
      } in_group{group_, uses_gradient() ? ++attacks_ : -1};
      for (size_t i = 0; i < grads.size(); ++i) {
        const Move m = target_->move(
            i,
            grads[i],
            uses_gradient(),
            moves_gradient_rows_only(),
            untracked_writes(),
            usable,
            rule);
        norms.push_back(std::move(m.norm));
        if (uses_gradient() && !target_->measures_gradient_norm()) {
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
    TORCH_CHECK(
        !watched_.empty(),
        "advtrain: backup_grad() has no parameters to watch; build the "
        "attacker from a module or call watch_grads(parameters) first");
    grad_backup_.clear();
    grad_backup_.reserve(watched_.size());
    for (const auto& p : watched_) {
      const auto& g = p.grad();
      grad_backup_.push_back(g.defined() ? g.detach().clone() : g);
    }
    has_grad_backup_ = true;
  }

  /// Puts the gradients saved by `backup_grad()` back in place of the current
  /// ones, exactly: a parameter whose grad was undefined then gets an
  /// undefined grad again. The backup is handed over, not copied: a call
  /// without a `backup_grad()` since the last one throws and changes nothing
  /// (the clean gradient would otherwise be missing from the step).
  void restore_grad() {
    TORCH_CHECK(
        has_grad_backup_,
        "advtrain: ",
        kind_,
        ": restore_grad() without backup_grad() (or a second time since "
        "it); call backup_grad() after the clean backward");
    has_grad_backup_ = false;
    for (size_t i = 0; i < grad_backup_.size(); ++i) {
      watched_[i].mutable_grad() = std::move(grad_backup_[i]);
    }
    grad_backup_.clear();
  }

  /// Sets the parameters whose gradients `backup_grad()`/`restore_grad()`
  /// handle (`Trainer` gives it the optimizer's parameters when none are set).
  void watch_grads(std::vector<torch::Tensor> params) {
    grad_backup_.clear();
    has_grad_backup_ = false;
    watched_ = std::move(params);
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
    archive.write("advtrain.kind", c10::IValue(std::string(kind_)));
    archive.write("advtrain.type", c10::IValue(type_name()));
    archive.write("advtrain.steps_done", c10::IValue(steps_done_));
    archive.write(
        "advtrain.steps_checksum",
        c10::IValue(detail::checksum({torch::tensor(steps_done_)})));
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
    c10::IValue kind;
    TORCH_CHECK(
        archive.try_read("advtrain.kind", kind) && kind.isString(),
        "advtrain: ",
        kind_,
        ": the archive holds no advtrain attacker state");
    TORCH_CHECK(
        kind.toStringRef() == kind_,
        "advtrain: the archive holds the state of ",
        kind.toStringRef(),
        ", not of ",
        kind_);
    c10::IValue type;
    if (archive.try_read("advtrain.type", type)) { // (older archives: none)
      TORCH_CHECK(
          type.isString() && type.toStringRef() == type_name(),
          "advtrain: the archive holds the state of ",
          type.isString() ? type.toStringRef() : std::string("?"),
          ", not of ",
          type_name());
    }
    c10::IValue steps;
    TORCH_CHECK(
        archive.try_read("advtrain.steps_done", steps) && steps.isInt() &&
            steps.toInt() >= 0,
        "advtrain: ",
        kind_,
        ": the archive's step count is missing or not a count; nothing was "
        "loaded");
    detail::check_checksum(
        archive,
        "advtrain.steps_checksum",
        {torch::tensor(steps.toInt())},
        kind_);
    load_state(archive); // checks everything before it changes anything
    steps_done_ = steps.toInt();
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
    return watched_;
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
    int64_t n = extra_bytes() + target_->backup_bytes();
    for (const auto& t : grad_backup_) {
      n += detail::bytes_of(t);
    }
    return n;
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
  /// Whether the strategy's loss needs no label beyond the task loss's, so a
  /// step may take it on an unlabeled batch (the regularizers).
  virtual bool label_free() const {
    return false;
  }
  /// Whether the passes of one `Trainer::step` share their dropout masks.
  virtual bool share_dropout_mask() const {
    return false;
  }
  /// How many times a gradient with a non-finite norm was met (and skipped),
  /// as of the last step's (or own-loop `attack()`'s) host read.
  int64_t nonfinite_gradients() const noexcept {
    return nonfinite_gradients_;
  }
  /// How many times `attack()` found every target's gradient exactly zero
  /// (nothing moved; typically `zero_grad()` ran between the backward and
  /// `attack()`), as of the last host read.
  int64_t zero_gradients() const noexcept {
    return zero_gradients_;
  }

 protected:
  /// `kind` names the strategy in error messages and archives.
  Attacker(std::unique_ptr<Target> target, const char* kind)
      : target_(std::move(target)), kind_(kind) {}
  /// Parameters of `module` (the module's parameters are watched).
  Attacker(
      std::unique_ptr<Target> target,
      const NamedParameters& module,
      const char* kind)
      : target_(std::move(target)), kind_(kind), watched_(module.tensors()) {}

  /// The rule: moves tensor `i` (`w`, its data, or the rows of it that
  /// moved) along its gradient `g`; `geo` says where norms are taken (on a
  /// parameter, `geo.gnorm` = ‖g‖, and where ‖g‖ is zero or not finite `g`
  /// is zero and `geo.gnorm` 1); `origin` is its backed-up value (per
  /// example δ = 0). Returns ‖δᵢ‖ after the move, a 0-dim tensor on the
  /// device (undefined: not measured); nothing in it may read the device to
  /// the host. Runs under NoGradGuard. Where `uses_gradient()` is false, `g`
  /// is undefined.
  virtual torch::Tensor perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) = 0;

  /// The protocol for one batch (docs/design.md, "Protocols"), reporting in
  /// `ctx.figures`; called by `run`, whose caller (`Trainer`) restores
  /// weights and gradients if it throws.
  virtual void run_step(StepContext& ctx) = 0;

  /// State beyond the base's.
  virtual void save_state(torch::serialize::OutputArchive& /*archive*/) const {}
  virtual void load_state(torch::serialize::InputArchive& /*archive*/) {}

  /// Whether the rule moves only the rows where the gradient is nonzero
  /// (FGSM, FGM, PGD, FreeLB); then a table backs up and moves those rows
  /// alone.
  virtual bool moves_gradient_rows_only() const {
    return false;
  }
  /// Whether the rule, given a sparse gradient, moves only its rows (then
  /// the table backs up and moves those rows alone); the others refuse
  /// sparse gradients.
  virtual bool moves_sparse_rows_only() const {
    return moves_gradient_rows_only();
  }
  /// Whether `attack()` moves along the gradient (and so needs one).
  virtual bool uses_gradient() const {
    return true;
  }
  /// Whether writes to the target leave its autograd version alone (a
  /// regularizer: its clean graph stays usable while the target is
  /// perturbed; see `Target::data`).
  virtual bool untracked_writes() const {
    return false;
  }
  /// State held beyond backups and saved gradients (FreeAT's δ).
  virtual int64_t extra_bytes() const {
    return 0;
  }
  /// Refuses `attack()` where the strategy has no move along a gradient
  /// (R3F); called before anything is backed up.
  virtual void check_attack() const {}

  /// Called when a `Trainer` step begins, before its first forward: set the
  /// step's start here (`target().set_start`).
  virtual void on_new_step() {}

  /// The target, to write into.
  Target& target() noexcept {
    return *target_;
  }
  /// Backs the target up unless it already is.
  void backup() {
    target_->backup(
        this, kind_, moves_gradient_rows_only(), untracked_writes());
  }
  /// Tensor `i` to write into (see `untracked_writes`).
  torch::Tensor data(size_t i) const {
    return target_->data(i, untracked_writes());
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
    pending_.push_back(Pending{i, group_, once});
    pending_norms_.push_back(gnorm);
  }

  /// Per example, where no norm of a whole tensor is taken: whether `g`
  /// (undefined: no gradient) is finite, kept to be read with the step like
  /// a norm (log 1 = 0 where finite, log 0 = -inf where not) and counted as
  /// a non-finite norm is; it belongs to no attack's group of norms.
  void note_finite_gradient(size_t i, const torch::Tensor& g) {
    if (!g.defined()) {
      return;
    }
    pending_.push_back(Pending{i, -1, false});
    pending_norms_.push_back(
        torch::isfinite(g.detach()).all().to(torch::kFloat).log());
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
    const size_t counts = append_counts(all);
    std::vector<double> values = ctx.read_figures(all);
    take_counts(values.data() + extra.size(), counts);
    values.resize(extra.size());
    return values;
  }

  /// Refuses a sparse gradient `g` of tensor `i` unless `accepted`.
  void check_sparse(size_t i, const torch::Tensor& g, bool accepted) const {
    if (!g.defined() || !g.is_sparse()) {
      return;
    }
    TORCH_CHECK(
        g.sparse_dim() == 1,
        "advtrain: ",
        kind_,
        ": the sparse gradient of ",
        target_names()[i],
        " has ",
        g.sparse_dim(),
        " sparse dimensions; only row-sparse gradients (one sparse "
        "dimension, as an embedding's) are supported");
    TORCH_CHECK(
        accepted,
        "advtrain: ",
        kind_,
        ": the gradient of ",
        target_names()[i],
        " is sparse (nn::EmbeddingOptions().sparse(true)); ",
        kind_,
        " moves the whole tensor, so it needs a dense gradient. Sparse "
        "gradients work with FGSM, FGM, PGD, FreeLB and AWP on the table; "
        "use a dense embedding here");
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
    const size_t n = append_counts(counts);
    if (n > 0) {
      take_counts(detail::to_host(counts).data(), n);
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
  /// Appends the gradient norms kept since the last read to `values`;
  /// returns how many.
  size_t append_counts(std::vector<torch::Tensor>& values) const {
    values.insert(values.end(), pending_norms_.begin(), pending_norms_.end());
    return pending_norms_.size();
  }

  /// Takes the `n` values `append_counts` appended: counts the non-finite
  /// norms and the attacks whose norms were all zero, warns, and forgets
  /// them.
  void take_counts(const double* values, size_t n) {
    TORCH_INTERNAL_ASSERT(n == pending_.size());
    bool once_counted = false;
    for (size_t k = 0; k < n; ++k) {
      const Pending& p = pending_[k];
      if (!std::isfinite(values[k]) && !(p.once && once_counted)) {
        once_counted = once_counted || p.once;
        note_nonfinite(p.target);
      }
      // A group is one attack's norms, in order: all zero?
      const bool last_of_group =
          p.group >= 0 && (k + 1 == n || pending_[k + 1].group != p.group);
      if (last_of_group) {
        bool zero = true;
        for (size_t j = k + 1; j-- > 0 && pending_[j].group == p.group;) {
          zero = zero && values[j] == 0.0;
        }
        if (zero) {
          note_zero_gradients();
        }
      }
    }
    pending_.clear();
    pending_norms_.clear();
  }

  void note_nonfinite(size_t i) {
    ++nonfinite_gradients_;
    if (!warned_nonfinite_) {
      warned_nonfinite_ = true;
      TORCH_WARN(
          "advtrain: ",
          kind_,
          ": the gradient of ",
          target_names()[i],
          " has a non-finite norm; no perturbation from it, training goes on "
          "(warned once per attacker; see nonfinite_gradients())");
    }
  }

  void note_zero_gradients() {
    ++zero_gradients_;
    if (!warned_zero_) {
      warned_zero_ = true;
      TORCH_WARN(
          "advtrain: ",
          kind_,
          ": attack() found every target gradient exactly zero, so nothing "
          "was perturbed; run the loss's backward() right before attack() "
          "(zero_grad() in between leaves zero-filled gradients) (warned "
          "once per attacker; see zero_gradients())");
    }
  }

  /// The target's gradients, checked; undefined where a tensor got none.
  std::vector<torch::Tensor> target_grads() const {
    std::vector<torch::Tensor> grads;
    bool any = false;
    const auto& ts = targets();
    const auto& names = target_names();
    for (size_t i = 0; i < ts.size(); ++i) {
      const torch::Tensor& g = ts[i].grad();
      if (g.defined()) {
        check_sparse(i, g, moves_sparse_rows_only());
        TORCH_CHECK(
            g.sizes() == ts[i].sizes() &&
                g.scalar_type() == ts[i].scalar_type() &&
                g.device() == ts[i].device(),
            "advtrain: the gradient of ",
            names[i],
            " (",
            g.scalar_type(),
            g.sizes(),
            " on ",
            g.device(),
            ") does not match the tensor (",
            ts[i].scalar_type(),
            ts[i].sizes(),
            " on ",
            ts[i].device(),
            ")");
        any = true;
      }
      grads.push_back(g);
    }
    TORCH_CHECK(
        any || !uses_gradient(),
        "advtrain: attack() found no gradient on [",
        fmt::format("{}", fmt::join(names, ", ")),
        "]; run the loss's backward() first, and zero_grad() only after "
        "restore() (LibTorch 2's zero_grad() drops the gradients)");
    return grads;
  }

  std::unique_ptr<Target> target_;
  const char* kind_;
  std::vector<torch::Tensor> watched_;
  std::vector<torch::Tensor> grad_backup_;
  bool has_grad_backup_ = false;
  torch::Tensor perturbation_norm_; // 0-dim; undefined: 0
  /// A gradient norm kept to be read with the step: its tensor, the attack
  /// that measured it (-1: none), and whether a non-finite one counts once.
  struct Pending {
    size_t target;
    int64_t group;
    bool once;
  };
  std::vector<Pending> pending_;
  std::vector<torch::Tensor> pending_norms_; // not yet read, as pending_
  int64_t group_ = -1;                       // the attack measuring now
  int64_t attacks_ = 0;
  int64_t steps_done_ = 0;
  int64_t peak_bytes_ = 0;
  int64_t nonfinite_gradients_ = 0;
  bool warned_nonfinite_ = false;
  int64_t zero_gradients_ = 0;
  bool warned_zero_ = false;
};

/// Refuses an option of a strategy in its constructor, naming the field:
/// `Kind: Invalid field: value (must be rule)` (what `check_options`
/// overloads call). A floating-point option must also be finite: no option
/// means "unbounded" by infinity (FreeLB's `epsilon(0)` does).
template <typename T>
void check_option(
    bool ok,
    const char* kind,
    const char* field,
    const T& value,
    const char* rule) {
  if constexpr (std::is_floating_point_v<T>) {
    TORCH_CHECK(
        std::isfinite(value),
        kind,
        ": Invalid ",
        field,
        ": ",
        value,
        " (must be finite and ",
        rule,
        ")");
  }
  TORCH_CHECK(
      ok, kind, ": Invalid ", field, ": ", value, " (must be ", rule, ")");
}

/// The base of a strategy with options `Options`: the three ways to name its
/// target — tensors, a module and a substring of parameter names, or a
/// `PerturbedEmbedding` (each example's embedded tokens) — which strategies
/// inherit (`using Strategy::Strategy`), and the options, validated once by
/// `check_options(options, attacker)` (an overload next to each options
/// struct, which names the strategy in `Options::kind`).
template <typename Options>
class Strategy : public Attacker {
 public:
  /// Perturbs `params` (e.g. embedding tables).
  explicit Strategy(std::vector<torch::Tensor> params, Options options = {})
      : Attacker(
            std::make_unique<ParameterTarget>(std::move(params), Options::kind),
            Options::kind),
        options_(std::move(options)) {
    check_options(options_, *this);
  }
  /// Perturbs the parameters of `module` whose names contain
  /// `name_contains`; the module's parameters are the ones whose gradients
  /// `backup_grad()`/`restore_grad()` handle.
  Strategy(
      const NamedParameters& module,
      const std::string& name_contains,
      Options options = {})
      : Attacker(
            std::make_unique<ParameterTarget>(
                module, name_contains, Options::kind),
            module,
            Options::kind),
        options_(std::move(options)) {
    check_options(options_, *this);
  }
  /// Perturbs the tensors of a braced list: `FGM({table})`.
  explicit Strategy(
      std::initializer_list<torch::Tensor> params, Options options = {})
      : Strategy(std::vector<torch::Tensor>(params), std::move(options)) {}
  /// Perturbs each example's output of `embedding` (docs/design.md,
  /// "Targets").
  explicit Strategy(const PerturbedEmbedding& embedding, Options options = {})
      : Strategy(embedding->perturbation(), std::move(options)) {}
  /// Perturbs each example's embeddings where the model applies `slot`
  /// (`(*slot)(embeds, mask)`), for a model that takes embeddings
  /// (`inputs_embeds`) rather than owning a `PerturbedEmbedding`.
  explicit Strategy(std::shared_ptr<Perturbation> slot, Options options = {})
      : Attacker(
            std::make_unique<ActivationTarget>(
                std::vector<std::shared_ptr<Perturbation>>{std::move(slot)},
                Options::kind),
            Options::kind),
        options_(std::move(options)) {
    check_options(options_, *this);
  }

  const Options& options() const noexcept {
    return options_;
  }
  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

 protected:
  Options options_;
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
