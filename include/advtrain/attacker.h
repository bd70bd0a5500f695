// The base of every strategy: `Attacker` backs up its targets, moves them by
// the strategy's rule (`attack`), puts them back bit for bit (`restore`),
// saves and restores gradients, and runs the strategy's protocol for one
// batch (`run_step`) when a `Trainer` drives it.
#pragma once

#include <advtrain/detail/registry.h>
#include <advtrain/parameters.h>
#include <advtrain/step.h>

#include <advtrain/norm.h>
#include <advtrain/perturbed_embedding.h>

#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

class Trainer;

/// Base of every strategy: it backs up the target tensors (embedding tables)
/// before the first perturbation, moves them by the strategy's rule, and puts
/// them back bit for bit. It also saves and restores the gradients of the
/// parameters it watches, for PGD-style loops, and saves the state that
/// outlives a batch (`save`/`load`, or `torch::save(attacker, path)`).
///
/// No call leaves the targets perturbed when it throws.
class Attacker {
 public:
  /// Restores the targets if they are still perturbed.
  virtual ~Attacker() {
    try {
      restore();
    } catch (...) { // NOLINT: a destructor does not throw
    }
    for (auto& slot : slots_) {
      slot->disarm();
    }
  }
  Attacker(const Attacker&) = delete;
  Attacker& operator=(const Attacker&) = delete;

  /// Backs the targets up if they are not perturbed yet, then moves them by
  /// the strategy's rule (along their current gradient, for all but FreeAT).
  void attack() {
    attack(/*is_first_attack=*/!is_perturbed());
  }

  /// PGD-style: the first attack of a sequence backs the targets up. The backup
  /// is taken whenever the targets are not perturbed and never overwritten
  /// while they are (that case warns: a `restore()` is missing), so `restore()`
  /// always returns to the weights of before the first attack.
  void attack(bool is_first_attack) {
    sync_targets();
    std::vector<torch::Tensor> grads = target_grads();
    torch::NoGradGuard no_grad;
    if (is_perturbed() && is_first_attack) {
      TORCH_WARN(
          "advtrain: attack(is_first_attack=true) while the targets are still "
          "perturbed (restore() was not called after the last attack); the "
          "original backup is kept");
    }
    backup();
    last_rows_.assign(targets_.size(), torch::Tensor());
    try {
      double sq = 0.0;
      // Whether every target's gradient is exactly zero: on the table, the
      // sign of a zero_grad() between the backward and attack(). (Per
      // example, δ is no optimizer or module parameter, so zero_grad() does
      // not touch its gradient; no check, no extra host synchronization.)
      bool all_zero = !per_example();
      for (size_t i = 0; i < targets_.size(); ++i) {
        torch::Tensor w = data(i);
        if (row_wise(i)) {
          // Only the rows with a nonzero gradient move: back up, perturb and
          // restore those alone (a batch touches few rows of a vocabulary).
          if (!grads[i].defined()) {
            continue;
          }
          const auto row_norms = at::linalg_vector_norm(
              grads[i].reshape({grads[i].size(0), -1}),
              2,
              {1},
              false,
              detail::norm_dtype(grads[i]));
          const double gnorm = row_norms.norm().item<double>();
          all_zero = all_zero && gnorm == 0.0;
          if (!usable_norm(i, gnorm)) {
            continue;
          }
          const torch::Tensor& rows = add_rows(i, row_norms.nonzero().view(-1));
          torch::Tensor w_rows = w.index_select(0, rows);
          const double n = perturb(
              i, w_rows, grads[i].index_select(0, rows), gnorm, backup_[i]);
          w.index_copy_(0, rows, w_rows);
          last_rows_[i] = rows;
          sq += n * n;
          continue;
        }
        double gnorm = 0.0;
        if (uses_gradient()) {
          const bool usable = step_geometry(i, grads[i], &gnorm).has_value();
          all_zero = all_zero && gnorm == 0.0;
          if (!usable) {
            continue; // no move along a missing, zero or non-finite gradient
          }
        }
        const double n = perturb(i, w, grads[i], gnorm, backup_[i]);
        sq += n * n;
      }
      if (uses_gradient() && all_zero) {
        note_zero_gradients();
      }
      perturbation_norm_ = std::sqrt(sq);
      peak_bytes_ = std::max(peak_bytes_, held_bytes());
      if (per_example()) {
        // δ's gradient is the attacker's own: used up by this step, so that
        // the next attack sees only the passes run after it.
        for (auto& t : targets_) {
          t.mutable_grad() = torch::Tensor();
        }
      }
    } catch (...) {
      restore();
      throw;
    }
  }

  /// Puts the backed-up targets back, bit for bit; a no-op when nothing is
  /// backed up.
  void restore() {
    release_claims(); // also after a backup() that failed half-way
    if (!is_perturbed()) {
      return;
    }
    peak_bytes_ = std::max(peak_bytes_, held_bytes());
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < targets_.size(); ++i) {
      if (rows_[i].defined()) {
        data(i).index_copy_(0, rows_[i], backup_[i]);
      } else {
        data(i).copy_(backup_[i]);
      }
      if (per_example()) {
        targets_[i].mutable_grad() = torch::Tensor();
      }
    }
    backup_.clear();
    rows_.clear();
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
  }

  /// Puts the gradients saved by `backup_grad()` back in place of the current
  /// ones, exactly: a parameter whose grad was undefined then gets an
  /// undefined grad again. The backup is handed over, not copied: a second
  /// call without a new `backup_grad()` does nothing.
  void restore_grad() {
    for (size_t i = 0; i < grad_backup_.size(); ++i) {
      watched_[i].mutable_grad() = std::move(grad_backup_[i]);
    }
    grad_backup_.clear();
  }

  /// Sets the parameters whose gradients `backup_grad()`/`restore_grad()`
  /// handle (`Trainer` gives it the optimizer's parameters when none are set).
  void watch_grads(std::vector<torch::Tensor> params) {
    grad_backup_.clear();
    watched_ = std::move(params);
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
    archive.write("advtrain.steps_done", c10::IValue(steps_done_));
    save_state(archive);
  }

  /// Reads what `save` wrote; the archive must come from the same strategy.
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
    c10::IValue steps;
    archive.read("advtrain.steps_done", steps);
    load_state(archive);
    steps_done_ = steps.toInt();
  }

  /// The tensors this attacker perturbs.
  const std::vector<torch::Tensor>& targets() const noexcept {
    return targets_;
  }
  /// Their names (parameter names, or "target[i]" when built from tensors).
  const std::vector<std::string>& target_names() const noexcept {
    return names_;
  }
  /// The parameters whose gradients are watched.
  const std::vector<torch::Tensor>& watched() const noexcept {
    return watched_;
  }
  /// Whether the targets are perturbed (backed up and not yet restored).
  bool is_perturbed() const noexcept {
    return !backup_.empty();
  }
  /// ‖δ‖ of the last `attack()` (all targets together).
  double perturbation_norm() const noexcept {
    return perturbation_norm_;
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
    int64_t n = extra_bytes();
    for (const auto& t : backup_) {
      n += static_cast<int64_t>(t.nbytes());
    }
    for (const auto& t : grad_backup_) {
      n += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
    }
    return n;
  }
  /// The largest `held_bytes()` seen after an `attack()` or before a
  /// `restore()`.
  int64_t peak_held_bytes() const noexcept {
    return peak_bytes_;
  }

  /// Whether this attacker perturbs embedding outputs per example
  /// (`PerturbedEmbedding`) rather than weight tables.
  bool per_example() const noexcept {
    return !slots_.empty();
  }
  /// How many times a gradient with a non-finite norm was met (and skipped).
  int64_t nonfinite_gradients() const noexcept {
    return nonfinite_gradients_;
  }
  /// How many times `attack()` found every target's gradient exactly zero
  /// (nothing moved; typically `zero_grad()` ran between the backward and
  /// `attack()`).
  int64_t zero_gradients() const noexcept {
    return zero_gradients_;
  }

 protected:
  /// `kind` names the strategy in error messages and archives.
  Attacker(std::vector<torch::Tensor> targets, const char* kind)
      : targets_(std::move(targets)), kind_(kind) {
    for (size_t i = 0; i < targets_.size(); ++i) {
      names_.push_back(fmt::format("target[{}]", i));
    }
    check_targets();
  }

  /// Activation target: the δ of each slot, per example (docs/design.md,
  /// "Targets").
  Attacker(std::vector<std::shared_ptr<Perturbation>> slots, const char* kind)
      : kind_(kind), slots_(std::move(slots)) {
    TORCH_CHECK(
        !slots_.empty(), "advtrain: ", kind_, " needs at least one target");
    for (size_t i = 0; i < slots_.size(); ++i) {
      TORCH_CHECK(
          slots_[i] != nullptr, "advtrain: ", kind_, ": slot ", i, " is null");
      names_.push_back(fmt::format("perturbation[{}]", i));
      slots_[i]->arm();
    }
  }

  Attacker(
      const NamedParameters& module,
      const std::string& name_contains,
      const char* kind)
      : kind_(kind) {
    auto selected = detail::select_named(module, name_contains);
    names_ = std::move(selected.first);
    targets_ = std::move(selected.second);
    watched_ = module.tensors();
    check_targets();
    warn_tied(module);
  }

  /// Moves target `i` (`w`, its data) along its gradient `g`, whose norm
  /// `gnorm` is positive and finite; `origin` is its backed-up value. Returns
  /// ‖δᵢ‖ after the move. Runs under NoGradGuard. For strategies whose
  /// `uses_gradient()` is false, `g` may be undefined and `gnorm` is 0.
  virtual double perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      double gnorm,
      const torch::Tensor& origin) = 0;

  /// Whether target `i`'s gradient `g` can give a step: sets `gnorm` = ‖g‖
  /// and returns false when it is zero or not finite (the latter warns, once
  /// per attacker, and is counted).
  bool usable_gradient(size_t i, const torch::Tensor& g, double& gnorm) {
    gnorm = detail::l2_norm(g);
    return usable_norm(i, gnorm);
  }

  /// `usable_gradient` for a norm already taken.
  bool usable_norm(size_t i, double gnorm) {
    if (std::isfinite(gnorm)) {
      return gnorm > 0.0;
    }
    ++nonfinite_gradients_;
    if (!warned_nonfinite_) {
      warned_nonfinite_ = true;
      TORCH_WARN(
          "advtrain: ",
          kind_,
          ": the gradient of ",
          names_[i],
          " has a non-finite norm (",
          gnorm,
          "); no perturbation from it, training goes on (warned once per "
          "attacker; see nonfinite_gradients())");
    }
    return false;
  }

  /// Whether the rule moves only the rows where the gradient is nonzero
  /// (FGSM, FGM, PGD, FreeLB); then, on tables, `attack()` backs up and
  /// perturbs those rows alone and `perturb` sees only them.
  virtual bool moves_gradient_rows_only() const {
    return false;
  }

  /// State held beyond backups and saved gradients (FreeAT's δ).
  virtual int64_t extra_bytes() const {
    return 0;
  }

  /// Whether `attack()` moves along the gradient (and so needs one).
  virtual bool uses_gradient() const {
    return true;
  }

  /// Whether the passes of one `Trainer::step` share their dropout masks.
  virtual bool share_dropout_mask() const {
    return false;
  }

  /// Whether `data(i)` writes the targets without bumping their autograd
  /// version (SMART: its clean graph stays usable while they are perturbed).
  virtual bool untracked_writes() const {
    return false;
  }

  /// The strategy's protocol for one batch (docs/design.md, "Protocols");
  /// called by Trainer, which restores weights and gradients if it throws.
  virtual StepResult run_step(StepContext& ctx) = 0;

  /// State beyond the base's.
  virtual void save_state(torch::serialize::OutputArchive& /*archive*/) const {}
  virtual void load_state(torch::serialize::InputArchive& /*archive*/) {}

  /// Backs the targets up unless they already are. Per example, the origin
  /// is δ = 0, whatever δ started from. Refuses a target that another
  /// attacker has perturbed and not restored yet.
  void backup() {
    if (is_perturbed()) {
      return;
    }
    sync_targets();
    const auto other =
        detail::PerturbedTensors::instance().try_claim(targets_, this, kind_);
    TORCH_CHECK(
        other.first < 0,
        "advtrain: ",
        kind_,
        ": ",
        other.first < 0 ? "" : names_[other.first],
        " is already perturbed by another attacker (",
        other.second == nullptr ? "" : other.second,
        "); call that attacker's restore() first, since restores in another "
        "order would leave it perturbed");
    for (const auto& t : targets_) {
      claimed_.push_back(t.unsafeGetTensorImpl());
    }
    torch::NoGradGuard no_grad;
    backup_.reserve(targets_.size());
    rows_.assign(targets_.size(), torch::Tensor());
    for (size_t i = 0; i < targets_.size(); ++i) {
      if (row_wise(i)) { // rows are backed up as they first move
        rows_[i] = torch::empty(
            {0}, torch::dtype(torch::kLong).device(targets_[i].device()));
        backup_.push_back(data(i).index_select(0, rows_[i]));
      } else {
        backup_.push_back(
            per_example() ? torch::zeros_like(targets_[i]) : data(i).clone());
      }
    }
  }

  /// The rows of target i that hold every nonzero of the gradient the last
  /// `attack()` moved along (all rows it has moved since the backup);
  /// undefined when that attack did not go row by row.
  const torch::Tensor& last_rows(size_t i) const {
    static const torch::Tensor none;
    return i < last_rows_.size() ? last_rows_[i] : none;
  }

  /// Whether target i is perturbed row by row (see
  /// `moves_gradient_rows_only`).
  bool row_wise(size_t i) const {
    return !per_example() && moves_gradient_rows_only() &&
           targets_[i].dim() >= 2;
  }

  /// Backs up the rows of `rows` not backed up yet; returns all backed-up
  /// rows of target i (the rows `backup_[i]` holds, in its order).
  const torch::Tensor& add_rows(size_t i, const torch::Tensor& rows) {
    torch::Tensor extra =
        rows_[i].numel() == 0
            ? rows
            : rows.masked_select(torch::isin(rows, rows_[i]).logical_not());
    if (extra.numel() > 0) {
      backup_[i] = torch::cat({backup_[i], data(i).index_select(0, extra)});
      rows_[i] = torch::cat({rows_[i], extra});
    }
    return rows_[i];
  }

  /// Per example: takes the slots' current δ as the targets.
  void sync_targets() {
    if (!per_example()) {
      return;
    }
    targets_.resize(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) {
      TORCH_CHECK(
          slots_[i]->delta().defined(),
          "advtrain: ",
          kind_,
          ": no perturbation yet; run the model's forward through the "
          "PerturbedEmbedding first, in training mode (not eval()) and with "
          "autograd on");
      targets_[i] = slots_[i]->delta();
    }
  }

  /// Target `i`'s mask broadcast against it ([B, L, 1]); per example only.
  torch::Tensor mask(size_t i) const {
    return slots_[i]->expanded_mask();
  }

  /// How target `i`'s norms are taken (its mask per example); `gnorm`: its
  /// gradient's norm, measured on a whole tensor.
  Geometry geometry(size_t i, double gnorm = 0.0) const {
    return Geometry{per_example() ? mask(i) : torch::Tensor(), gnorm};
  }

  /// The geometry of a step of target `i` along its gradient `g`, or none
  /// when `g` cannot give one: undefined, or on a whole tensor a zero or
  /// non-finite ‖g‖ (the latter warned once and counted); per example, those
  /// examples are left in place by the step itself, on the device. On a whole
  /// tensor, `measured` receives ‖g‖.
  std::optional<Geometry> step_geometry(
      size_t i, const torch::Tensor& g, double* measured = nullptr) {
    if (!g.defined()) {
      return std::nullopt;
    }
    if (per_example()) {
      return geometry(i);
    }
    double gnorm = 0.0;
    const bool usable = usable_gradient(i, g, gnorm);
    if (measured != nullptr) {
      *measured = gnorm;
    }
    if (!usable) {
      return std::nullopt;
    }
    return geometry(i, gnorm);
  }

  /// The slots of the activation target (empty for weight tables).
  const std::vector<std::shared_ptr<Perturbation>>& slots() const noexcept {
    return slots_;
  }

  /// Called by Trainer before a step; per example, the slots forget δ so the
  /// step's first forward makes a new one (through the initializer
  /// `on_new_step` sets, if any; it is removed when the step ends).
  virtual void on_new_step() {}

  /// Per example: each new δ of the current step starts from `draw(d, mask)`
  /// (a random start, d zero, mask [B, L, 1]), masked afterwards. It is drawn
  /// at the step's first lookup, before the first pass's dropout masks (as
  /// the official FreeLB and YOPO draw it before their first forward); with
  /// shared masks, later passes jump over its numbers at the same lookup.
  void set_random_start(Perturbation::Initializer draw) {
    for (auto& slot : slots_) {
      slot->set_initializer(
          [this, draw](torch::Tensor& d, const torch::Tensor& m) {
            draw(d, m);
            if (step_ != nullptr && step_->replay) {
              step_->replay->start_drawn();
            }
          });
      slot->set_lookup_hook([this] {
        if (step_ != nullptr && step_->replay) {
          step_->replay->at_lookup();
        }
      });
    }
  }

  /// The `Trainer` step running now, if any.
  StepContext* running_step() const noexcept {
    return step_;
  }

  /// ‖δ‖ over the slots' current δ (per example); 0 when there is none.
  double slots_norm() const {
    double sq = 0.0;
    for (const auto& slot : slots_) {
      if (slot->delta().defined()) {
        const double n = detail::l2_norm(slot->delta().detach());
        sq += n * n;
      }
    }
    return std::sqrt(sq);
  }

  /// Target `i`'s backed-up value; only while perturbed.
  const torch::Tensor& origin(size_t i) const {
    return backup_[i];
  }

  /// Target `i` as a tensor to write into. When `untracked_writes()` holds,
  /// the writes do not bump the autograd version counter, so a graph built
  /// before the perturbation (SMART's clean pass) stays usable; such a graph
  /// must only be run backward after `restore()`.
  torch::Tensor data(size_t i) const {
    return untracked_writes() ? targets_[i].variable_data()
                              : targets_[i].detach();
  }

  /// The protocol of FGSM and FGM: clean pass, one attack, adversarial pass,
  /// restore, optimizer step.
  StepResult run_single_attack(StepContext& ctx) {
    StepResult r;
    r.loss = ctx.pass().item<double>();
    attack();
    r.perturbation_norm = perturbation_norm_;
    r.adv_loss = ctx.pass().item<double>();
    restore();
    ctx.step_optimizer();
    return r;
  }

  double perturbation_norm_ = 0.0;

  friend class Trainer;

 private:
  void begin_step(StepContext& ctx) {
    step_ = &ctx;
    for (auto& slot : slots_) {
      slot->reset();
    }
    on_new_step();
  }
  void end_step() {
    step_ = nullptr;
    for (auto& slot : slots_) {
      slot->reset();
      slot->set_initializer(nullptr);
      slot->set_lookup_hook(nullptr);
    }
    if (per_example()) {
      targets_.clear();
    }
  }

  void release_claims() {
    if (!claimed_.empty()) {
      detail::PerturbedTensors::instance().release(claimed_, this);
      claimed_.clear();
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

  void check_targets() {
    TORCH_CHECK(
        !targets_.empty(), "advtrain: ", kind_, " needs at least one target");
    for (size_t i = 0; i < targets_.size(); ++i) {
      const auto& t = targets_[i];
      TORCH_CHECK(
          t.defined(), "advtrain: ", kind_, ": ", names_[i], " is undefined");
      TORCH_CHECK(
          t.is_floating_point(),
          "advtrain: ",
          kind_,
          ": ",
          names_[i],
          " must be a floating-point tensor, got ",
          t.scalar_type());
      TORCH_CHECK(
          t.requires_grad(),
          "advtrain: ",
          kind_,
          ": ",
          names_[i],
          " does not require grad, so it never gets a gradient to attack "
          "along");
      for (size_t j = 0; j < i; ++j) {
        TORCH_CHECK(
            !targets_[j].is_same(t),
            "advtrain: ",
            kind_,
            ": ",
            names_[i],
            " is the same tensor as ",
            names_[j]);
      }
    }
  }

  /// Warns when a target is also registered under another name, or shares
  /// its storage with another parameter (tied input/output embeddings):
  /// perturbing it perturbs that layer too.
  void warn_tied(const NamedParameters& module) {
    for (const auto& item : module.items()) {
      const auto& p = item.second;
      for (size_t i = 0; i < targets_.size(); ++i) {
        const auto& t = targets_[i];
        const bool shared =
            p.is_same(t) || (p.has_storage() && t.has_storage() &&
                             p.storage().is_alias_of(t.storage()));
        if (shared && item.first != names_[i]) {
          TORCH_WARN(
              "advtrain: ",
              kind_,
              ": ",
              names_[i],
              " is tied to ",
              item.first,
              " (they share storage): perturbing it also perturbs that "
              "parameter's layer");
        }
      }
    }
  }

  /// The targets' gradients, checked; undefined where a target got none.
  std::vector<torch::Tensor> target_grads() const {
    std::vector<torch::Tensor> grads;
    bool any = false;
    for (size_t i = 0; i < targets_.size(); ++i) {
      const torch::Tensor& g = targets_[i].grad();
      if (g.defined()) {
        TORCH_CHECK(
            !g.is_sparse(),
            "advtrain: the gradient of ",
            names_[i],
            " is sparse (nn::EmbeddingOptions().sparse(true)); sparse "
            "gradients are not supported: use a dense embedding");
        TORCH_CHECK(
            g.sizes() == targets_[i].sizes() &&
                g.scalar_type() == targets_[i].scalar_type() &&
                g.device() == targets_[i].device(),
            "advtrain: the gradient of ",
            names_[i],
            " (",
            g.scalar_type(),
            g.sizes(),
            " on ",
            g.device(),
            ") does not match the tensor (",
            targets_[i].scalar_type(),
            targets_[i].sizes(),
            " on ",
            targets_[i].device(),
            ")");
        any = true;
      }
      grads.push_back(g);
    }
    TORCH_CHECK(
        any || !uses_gradient(),
        "advtrain: attack() found no gradient on [",
        fmt::format("{}", fmt::join(names_, ", ")),
        "]; run the loss's backward() first");
    return grads;
  }

  std::vector<torch::Tensor> targets_;
  std::vector<std::string> names_;
  const char* kind_;
  std::vector<torch::Tensor> backup_;
  std::vector<torch::Tensor> rows_;      // per target: backed-up rows, or none
  std::vector<torch::Tensor> last_rows_; // see last_rows()
  std::vector<torch::Tensor> watched_;
  std::vector<torch::Tensor> grad_backup_;
  std::vector<std::shared_ptr<Perturbation>> slots_;
  int64_t steps_done_ = 0;
  int64_t peak_bytes_ = 0;
  int64_t nonfinite_gradients_ = 0;
  bool warned_nonfinite_ = false;
  int64_t zero_gradients_ = 0;
  bool warned_zero_ = false;
  std::vector<const void*> claimed_; // registered in PerturbedTensors
  StepContext* step_ = nullptr;      // the running Trainer step, if any
};

/// Refuses an option of a strategy in its constructor, naming the field:
/// `Kind: Invalid field: value (must be rule)` (what `check_options`
/// overloads call).
template <typename T>
void check_option(
    bool ok,
    const char* kind,
    const char* field,
    const T& value,
    const char* rule) {
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
      : Attacker(std::move(params), Options::kind),
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
      : Attacker(module, name_contains, Options::kind),
        options_(std::move(options)) {
    check_options(options_, *this);
  }
  /// Perturbs each example's output of `embedding` (docs/design.md,
  /// "Targets").
  explicit Strategy(const PerturbedEmbedding& embedding, Options options = {})
      : Attacker({embedding->perturbation()}, Options::kind),
        options_(std::move(options)) {
    check_options(options_, *this);
  }

  const Options& options() const noexcept {
    return options_;
  }

 protected:
  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

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
