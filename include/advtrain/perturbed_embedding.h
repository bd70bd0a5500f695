// The per-example target: `PerturbedEmbedding`, a drop-in `nn::Embedding`
// whose output gets the attacker's δ, and its `Perturbation` slot.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <utility>

namespace advtrain {

/// A per-example perturbation of an embedding lookup's output (docs/design.md,
/// "Targets"): the δ of shape [B, L, H] that `PerturbedEmbedding` adds to its
/// output, and the mask [B, L] of real (1) and padded (0) positions. An
/// attacker built on it arms it; unarmed, it adds nothing.
///
/// δ is a leaf tensor that requires grad, created zero (or by the running
/// step's initializer: a random start, FreeAT's persistent δ) at the first
/// forward of a step, so after a backward its `.grad` is ∂L/∂E. It is
/// re-created when the batch's shape changes. Outside an attacker's step the
/// slot has no initializer, so a forward run with autograd on (validation
/// without NoGradGuard, another attacker's clean pass) sees δ = 0 or the
/// δ of an own-loop attack() not yet restored, never a random start.
class Perturbation {
 public:
  /// Fills a new δ (given the mask, expanded to δ's shape) in place.
  using Initializer = std::function<void(torch::Tensor&, const torch::Tensor&)>;
  /// Called at the end of every lookup that adds δ.
  using LookupHook = std::function<void()>;

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
    if (mask.defined()) {
      TORCH_CHECK(
          mask.sizes() == e.sizes().slice(0, e.dim() - 1),
          "advtrain: the mask has shape ",
          mask.sizes(),
          ", the ids ",
          e.sizes().slice(0, e.dim() - 1));
    }
    if (!delta_.defined() || delta_.sizes() != e.sizes() ||
        delta_.scalar_type() != e.scalar_type() ||
        delta_.device() != e.device()) {
      torch::NoGradGuard no_grad;
      mask_ = mask.defined()
                  ? mask.to(e.scalar_type())
                  : torch::ones(e.sizes().slice(0, e.dim() - 1), e.options());
      delta_ = torch::zeros_like(e);
      if (initializer_) {
        const torch::Tensor m = expanded_mask();
        initializer_(delta_, m);
        delta_.mul_(m);
      }
      delta_.requires_grad_(true);
    } else if (mask.defined()) {
      // The same shape, another batch (a regularizer's unlabeled one): δ's
      // geometry follows this lookup's mask.
      torch::NoGradGuard no_grad;
      mask_ = mask.to(e.scalar_type());
    }
    embedded_ = e.detach();
    if (lookup_hook_) {
      lookup_hook_();
    }
    return (detached_ ? embedded_ : e) + delta_;
  }

  /// The current δ (undefined before the step's first forward).
  const torch::Tensor& delta() const noexcept {
    return delta_;
  }
  /// The current mask [B, L] in δ's dtype (all ones when none was given).
  const torch::Tensor& mask() const noexcept {
    return mask_;
  }
  /// The mask broadcast against δ: [B, L, 1].
  torch::Tensor expanded_mask() const {
    return mask_.unsqueeze(-1);
  }
  /// The last lookup output E, detached (YOPO's inner steps reuse it).
  const torch::Tensor& embedded() const noexcept {
    return embedded_;
  }

  /// Forgets δ: the next forward creates a new one.
  void reset() {
    delta_ = torch::Tensor();
    mask_ = torch::Tensor();
    embedded_ = torch::Tensor();
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
  /// While set, the lookup output added to δ is detached from the table
  /// (R3F's noised pass: no gradient reaches the table through it).
  void set_detached(bool detached) {
    detached_ = detached;
  }
  void arm() {
    ++armers_;
  }
  void disarm() {
    if (armers_ > 0 && --armers_ == 0) {
      reset();
      initializer_ = nullptr;
      lookup_hook_ = nullptr;
      detached_ = false;
    }
  }
  bool armed() const noexcept {
    return armers_ > 0;
  }

 private:
  torch::Tensor delta_, mask_, embedded_;
  Initializer initializer_;
  LookupHook lookup_hook_;
  int armers_ = 0;
  bool detached_ = false;
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
    const torch::Tensor e = torch::nn::EmbeddingImpl::forward(ids);
    if (!perturbation_->armed() || !is_training()) {
      return e;
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
