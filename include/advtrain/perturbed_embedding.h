// The per-example target: `PerturbedEmbedding`, a drop-in `nn::Embedding`
// whose output gets the attacker's δ, and its `Perturbation` slot.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace advtrain {

/// A per-example perturbation of embedding lookups (docs/design.md,
/// "Targets"): the δ of shape [B, L, H] added to a lookup's output, and the
/// mask [B, L] of real (1) and padded (0) positions. An attacker built on it
/// arms it; unarmed, it adds nothing. `PerturbedEmbedding` owns one; a model
/// that takes embeddings (`inputs_embeds`) uses one directly:
///
///   auto slot = std::make_shared<advtrain::Perturbation>();
///   advtrain::FreeLB freelb(slot, advtrain::FreeLBOptions());
///   ... model.forward({(*slot)(lookup(ids), mask)}) ...
///
/// Each lookup of a pass gets its own δ, in call order (a sentence pair
/// embedded by two calls has two; docs/design.md, "Lookups"). A pass starts
/// with each `Trainer` pass, after `attack()` and after `restore()`; in an
/// own loop, a lookup made after a backward that reached the pass's first δ
/// starts one too. δ is a leaf tensor that requires grad, created zero (or
/// by the running step's initializer: a random start, FreeAT's persistent
/// δ) at its lookup's first call in a step, so after a backward its `.grad`
/// is ∂L/∂E. It is re-created when the batch's shape changes. Outside an
/// attacker's step the slot has no initializer, so a forward run with
/// autograd on (validation without NoGradGuard, another attacker's clean
/// pass) sees δ = 0 or the δ of an own-loop attack() not yet restored, never
/// a random start.
class Perturbation {
 public:
  /// Fills a new δ (given the mask, expanded to δ's shape) in place;
  /// `lookup` is its index among the pass's lookups.
  using Initializer =
      std::function<void(size_t lookup, torch::Tensor&, const torch::Tensor&)>;
  /// Called at the end of every lookup that adds δ.
  using LookupHook = std::function<void()>;
  /// The embedding's own lookup of any shape of ids (`[B, L, S]` gives
  /// `[B, L, S, H]`), with its options (padding_idx and the rest).
  using LookupFunction = std::function<torch::Tensor(const torch::Tensor& ids)>;
  /// Replaces a `PerturbedEmbedding`'s output: given the batch's ids and the
  /// module's lookup, returns the embeddings the model gets (ASCC's convex
  /// combination of each token's candidates).
  using Substitution = std::function<torch::Tensor(
      const torch::Tensor& ids, const LookupFunction&)>;

  /// E + δ when armed, training and with autograd on; E unchanged otherwise.
  torch::Tensor apply(
      const torch::Tensor& e, const torch::Tensor& mask, bool training = true) {
    if (armers_ == 0 || !training || !torch::GradMode::is_enabled()) {
      return e;
    }
    TORCH_CHECK(
        e.dim() >= 2,
        "advtrain: a perturbed embedding needs a batch of sequences ([B, L] "
        "ids), got output of shape ",
        e.sizes());
    TORCH_CHECK(
        e.numel() > 0,
        "advtrain: a perturbed embedding needs a non-empty batch (at least "
        "one example of at least one token), got output of shape ",
        e.sizes());
    if (mask.defined()) {
      TORCH_CHECK(
          mask.sizes() == e.sizes().slice(0, e.dim() - 1),
          "advtrain: the mask has shape ",
          mask.sizes(),
          ", the ids ",
          e.sizes().slice(0, e.dim() - 1));
    }
    if (next_ > 0 && next_ == lookups_.size() &&
        lookups_.front().delta.grad().defined()) {
      next_ = 0; // an own loop's backward ran: a new pass
    }
    if (next_ == lookups_.size()) {
      lookups_.emplace_back();
    }
    const size_t k = next_;
    Lookup& l = lookups_[k];
    const bool fits = l.delta.defined() && l.delta.sizes() == e.sizes() &&
                      l.delta.scalar_type() == e.scalar_type() &&
                      l.delta.device() == e.device();
    TORCH_CHECK(
        fits || !l.delta.defined() || !held_,
        "advtrain: lookup ",
        k,
        " gives shape ",
        e.sizes(),
        " while its δ of shape ",
        l.delta.sizes(),
        " is perturbed (an attack() not restored before a new batch?); a new "
        "δ would run this pass unperturbed: call restore() first");
    ++next_;
    if (!fits) {
      torch::NoGradGuard no_grad;
      l.mask = mask.defined()
                   ? mask.to(e.scalar_type())
                   : torch::ones(e.sizes().slice(0, e.dim() - 1), e.options());
      l.delta = torch::zeros_like(e);
      if (initializer_) {
        const torch::Tensor m = l.mask.unsqueeze(-1);
        initializer_(k, l.delta, m);
        l.delta.mul_(m);
      }
      l.delta.requires_grad_(true);
    } else if (mask.defined()) {
      // The same shape, another batch (a regularizer's unlabeled one): δ's
      // geometry follows this lookup's mask.
      torch::NoGradGuard no_grad;
      l.mask = mask.to(e.scalar_type());
    }
    l.embedded = e.detach();
    if (lookup_hook_) {
      lookup_hook_();
    }
    return (detached_ ? l.embedded : e) + l.delta;
  }

  /// `apply`: the spelling for a model that takes embeddings.
  torch::Tensor operator()(
      const torch::Tensor& e,
      const torch::Tensor& mask = {},
      bool training = true) {
    return apply(e, mask, training);
  }

  /// How many lookups hold a δ (those of the step's passes so far).
  size_t lookups() const noexcept {
    return lookups_.size();
  }
  /// Lookup k's δ (undefined before its first forward in the step).
  const torch::Tensor& delta(size_t k = 0) const {
    return k < lookups_.size() ? lookups_[k].delta : undefined();
  }
  /// Lookup k's mask [B, L] in δ's dtype (all ones when none was given).
  const torch::Tensor& mask(size_t k = 0) const {
    return k < lookups_.size() ? lookups_[k].mask : undefined();
  }
  /// Lookup k's mask broadcast against δ: [B, L, 1].
  torch::Tensor expanded_mask(size_t k = 0) const {
    return mask(k).unsqueeze(-1);
  }
  /// Lookup k's last output E, detached (YOPO's inner steps reuse it).
  const torch::Tensor& embedded(size_t k = 0) const {
    return k < lookups_.size() ? lookups_[k].embedded : undefined();
  }

  /// The next lookup is the first of a pass.
  void begin_pass() noexcept {
    next_ = 0;
  }
  /// While held (an attack backed δ up), a lookup of another shape is
  /// refused rather than given a new, unperturbed δ.
  void set_held(bool held) noexcept {
    held_ = held;
  }
  /// Forgets every δ: the next forward creates new ones.
  void reset() {
    lookups_.clear();
    next_ = 0;
    held_ = false;
  }
  /// How a new δ is filled during the current step (a random start, FreeAT's
  /// persistent δ); none (the default, and after every step): zero.
  void set_initializer(Initializer init) {
    initializer_ = std::move(init);
  }
  /// Runs `hook` at the end of every lookup that adds δ during the current
  /// step (the step's random replay jumps over a random start there); none:
  /// nothing.
  void set_lookup_hook(LookupHook hook) {
    lookup_hook_ = std::move(hook);
  }
  /// While set, a `PerturbedEmbedding`'s forward returns `substitution(ids,
  /// lookup)` instead of its lookup, in any mode (ASCC's passes at the
  /// candidates' combination); none (the default, and after every pass that
  /// set it): the lookup. A model that takes embeddings has no ids here, so
  /// a substitution needs a `PerturbedEmbedding`.
  void set_substitution(Substitution substitution) {
    substitution_ = std::move(substitution);
  }
  bool substituting() const noexcept {
    return static_cast<bool>(substitution_);
  }
  torch::Tensor substitute(
      const torch::Tensor& ids, const LookupFunction& lookup) {
    return substitution_(ids, lookup);
  }

  /// While set, the lookup output added to δ is detached from the table
  /// (R3F's noised pass: no gradient reaches the table through it).
  void set_detached(bool detached) {
    detached_ = detached;
  }
  /// While set (a step whose passes all end in one backward: a
  /// regularizer's), a `PerturbedEmbedding`'s lookup of the ids tensor the
  /// same lookup of the last pass took (unchanged, as the table) returns
  /// that pass's output instead of looking up again: the passes share one
  /// lookup, as the official SMART and VAT add their noise to one embedding
  /// output, and the table's gradient is one embedding backward instead of
  /// one per pass. Unset: forgets the kept outputs.
  void set_shared_lookups(bool shared) {
    sharing_ = shared;
    if (!shared) {
      shared_.clear();
    }
  }
  /// The output the next lookup shares (see `set_shared_lookups`), or
  /// undefined: look up `ids` in `table` and `share_lookup` the result.
  torch::Tensor shared_lookup(
      const torch::Tensor& ids, const torch::Tensor& table) const {
    if (!sharing_ || next_ >= shared_.size()) {
      return {};
    }
    const Shared& s = shared_[next_];
    const bool same =
        s.ids.unsafeGetTensorImpl() == ids.unsafeGetTensorImpl() &&
        s.ids_version == ids._version() &&
        s.table_version == table._version() && torch::GradMode::is_enabled();
    return same ? s.output : torch::Tensor();
  }
  /// Keeps the output of the next lookup, of `ids` in `table`, for the
  /// passes after it to share (while `set_shared_lookups` is set and autograd
  /// is on).
  void share_lookup(
      const torch::Tensor& ids,
      const torch::Tensor& table,
      const torch::Tensor& output) {
    if (!sharing_ || !torch::GradMode::is_enabled()) {
      return;
    }
    if (next_ >= shared_.size()) {
      shared_.resize(next_ + 1);
    }
    shared_[next_] = Shared{ids, ids._version(), table._version(), output};
  }
  void arm() {
    ++armers_;
  }
  void disarm() {
    if (armers_ > 0 && --armers_ == 0) {
      reset();
      initializer_ = nullptr;
      lookup_hook_ = nullptr;
      substitution_ = nullptr;
      detached_ = false;
      set_shared_lookups(false);
    }
  }
  bool armed() const noexcept {
    return armers_ > 0;
  }

 private:
  struct Lookup {
    torch::Tensor delta, mask, embedded;
  };
  /// A lookup's output kept for the next passes, and what it was taken from.
  struct Shared {
    torch::Tensor ids;
    int64_t ids_version = 0;
    int64_t table_version = 0;
    torch::Tensor output;
  };
  static const torch::Tensor& undefined() {
    static const torch::Tensor none;
    return none;
  }

  std::vector<Lookup> lookups_;
  size_t next_ = 0; // the next lookup's index in the pass
  Initializer initializer_;
  LookupHook lookup_hook_;
  Substitution substitution_;
  int armers_ = 0;
  bool detached_ = false;
  bool held_ = false;
  bool sharing_ = false;
  std::vector<Shared> shared_; // by the lookup's index in the pass
};

/// An `nn::Embedding` whose output can carry a per-example perturbation.
/// Without an attacker built on it, it is exactly `nn::Embedding`: the same
/// parameter (`weight`), the same output, the same state_dict names, so a
/// trained model loads into a plain `nn::Embedding` and back. The perturbation
/// is added only while an attacker is attached, the module is in training
/// mode and autograd is on: `eval()` gives the plain lookup.
class PerturbedEmbeddingImpl : public torch::nn::EmbeddingImpl {
 public:
  using torch::nn::EmbeddingImpl::EmbeddingImpl;

  /// Lookup of `ids` [B, L]; positions where `mask` (same shape, 1 = real
  /// token) is 0 are never perturbed. Without a mask, positions equal to
  /// `padding_idx` (if set) are masked, others not.
  torch::Tensor forward(
      const torch::Tensor& ids, const torch::Tensor& mask = {}) {
    if (perturbation_->substituting()) {
      return perturbation_->substitute(ids, [this](const torch::Tensor& x) {
        return torch::nn::EmbeddingImpl::forward(x);
      });
    }
    const bool perturbing = perturbation_->armed() && is_training();
    torch::Tensor e = perturbing ? perturbation_->shared_lookup(ids, weight)
                                 : torch::Tensor();
    if (!e.defined()) {
      e = torch::nn::EmbeddingImpl::forward(ids);
      if (!perturbing) {
        return e;
      }
      perturbation_->share_lookup(ids, weight, e);
    }
    torch::Tensor m = mask;
    if (!m.defined() && options.padding_idx().has_value()) {
      m = ids.ne(*options.padding_idx());
    }
    return perturbation_->apply(e, m, is_training());
  }

  /// The slot an attacker attaches to.
  const std::shared_ptr<Perturbation>& perturbation() const noexcept {
    return perturbation_;
  }

 private:
  std::shared_ptr<Perturbation> perturbation_ =
      std::make_shared<Perturbation>();
};

/// `PerturbedEmbedding(vocab, dim)` or `PerturbedEmbedding(EmbeddingOptions)`.
TORCH_MODULE(PerturbedEmbedding);

} // namespace advtrain
