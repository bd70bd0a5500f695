// The activation target: each example's δ on a `PerturbedEmbedding`'s
// output (or a `Perturbation` slot's, for a model that takes embeddings),
// one per lookup of a pass, made by the forward (from the step's start,
// random or not) and forgotten when the step ends. Norms are taken per example
// over the real positions (the slot's mask), on the device; the step's random
// stream jumps over a random start when passes replay their dropout masks.
#pragma once

#include <advtrain/perturbed_embedding.h>
#include <advtrain/target.h>

#include <fmt/format.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// The per-example δ of one or more perturbation slots.
class ActivationTarget : public Target {
 public:
  ActivationTarget(
      std::vector<std::shared_ptr<Perturbation>> slots, const char* kind)
      : slots_(std::move(slots)) {
    TORCH_CHECK(
        !slots_.empty(), "advtrain: ", kind, " needs at least one target");
    for (size_t i = 0; i < slots_.size(); ++i) {
      TORCH_CHECK(
          slots_[i] != nullptr, "advtrain: ", kind, ": slot ", i, " is null");
      names_.push_back(fmt::format("perturbation[{}]", i));
    }
    for (auto& slot : slots_) {
      slot->arm();
    }
  }
  ~ActivationTarget() override {
    for (auto& slot : slots_) {
      slot->disarm();
    }
  }

  bool per_example() const noexcept override {
    return true;
  }
  bool measures_gradient_norm() const noexcept override {
    return false;
  }

  /// Takes every lookup's δ, slot by slot and in call order within a slot
  /// (tensor i is slot s's lookup k); the next forward starts a new pass.
  void sync(const char* kind) override {
    std::vector<torch::Tensor> tensors;
    std::vector<std::string> names;
    std::vector<std::pair<size_t, size_t>> lookups;
    for (size_t s = 0; s < slots_.size(); ++s) {
      const Perturbation& slot = *slots_[s];
      bool graded = false; // a later δ of this slot that a backward reached
      for (size_t k = slot.lookups(); k-- > 0;) {
        const bool has = slot.delta(k).grad().defined();
        TORCH_CHECK(
            !graded || has,
            "advtrain: ",
            kind,
            ": lookup ",
            k,
            " of perturbation[",
            s,
            "] ran in training mode since the last step but no backward "
            "reached it, while a later lookup's did; run forwards that are "
            "not part of the step (validation) under eval() or NoGradGuard");
        graded = graded || has;
      }
      for (size_t k = 0; k < slot.lookups(); ++k) {
        tensors.push_back(slot.delta(k));
        names.push_back(
            k == 0 ? fmt::format("perturbation[{}]", s)
                   : fmt::format("perturbation[{}].lookup[{}]", s, k));
        lookups.emplace_back(s, k);
      }
    }
    TORCH_CHECK(
        !is_perturbed() || tensors.size() == backup_.size(),
        "advtrain: ",
        kind,
        ": the forward made ",
        tensors.size(),
        " lookups while perturbed, the attack started with ",
        backup_.size(),
        "; every pass of a step must make the same lookups");
    TORCH_CHECK(
        !tensors.empty(),
        "advtrain: ",
        kind,
        ": no perturbation yet; run the model's forward through the "
        "PerturbedEmbedding (or the Perturbation slot) first, in training mode "
        "(not eval()) and with autograd on");
    tensors_ = std::move(tensors);
    names_ = std::move(names);
    lookups_ = std::move(lookups);
    for (auto& slot : slots_) { // the next forward is a new pass
      slot->begin_pass();
    }
  }

  Geometry geometry(size_t i) const override {
    const auto [s, k] = lookups_[i];
    return Geometry{slots_[s]->expanded_mask(k), {}, {}};
  }

  Move move(
      size_t i,
      const torch::Tensor& g,
      bool uses_gradient,
      bool /*rows_only*/,
      bool untracked,
      const NormCheck& /*usable*/,
      const Rule& rule) override {
    if (uses_gradient && !g.defined()) {
      return Move{};
    }
    torch::Tensor w = data(i, untracked);
    return Move{rule(i, w, g, geometry(i), backup_[i])};
  }

  /// δ's gradient is the attacker's own: used up by the attack.
  void consume_gradients() override {
    for (auto& t : tensors_) {
      t.mutable_grad() = torch::Tensor();
    }
  }

  /// ‖δ‖ over the slots' current δ.
  torch::Tensor norm() const override {
    std::vector<torch::Tensor> norms;
    for (const auto& slot : slots_) {
      for (size_t k = 0; k < slot->lookups(); ++k) {
        norms.push_back(detail::l2_norm(slot->delta(k).detach()));
      }
    }
    return detail::combined_norm(norms);
  }

  /// The slots forget δ, so the step's first forward makes a new one.
  void begin_step(StepContext& step) override {
    Target::begin_step(step);
    for (auto& slot : slots_) {
      slot->reset();
    }
    step.before_pass = [this] {
      for (auto& slot : slots_) {
        slot->begin_pass();
      }
    };
  }
  void end_step() override {
    Target::end_step();
    for (auto& slot : slots_) {
      slot->reset();
      slot->set_initializer(nullptr);
      slot->set_lookup_hook(nullptr);
      slot->set_detached(false);
      slot->set_shared_lookups(false);
    }
    tensors_.clear();
  }

  /// A random start is drawn at the step's first lookup, before the first
  /// pass's dropout masks (as the official FreeLB and YOPO draw it before
  /// their first forward); with shared masks, later passes jump over its
  /// numbers at the same lookup.
  void set_start(Start start, bool random) override {
    for (size_t s = 0; s < slots_.size(); ++s) {
      slots_[s]->set_initializer(
          [this, start, random, s](
              size_t k, torch::Tensor& d, const torch::Tensor& m) {
            start(index(s, k), d, m);
            if (random && step_context() != nullptr && step_context()->replay) {
              step_context()->replay->start_drawn();
            }
          });
      if (random) {
        slots_[s]->set_lookup_hook([this] {
          if (step_context() != nullptr && step_context()->replay) {
            step_context()->replay->at_lookup();
          }
        });
      }
    }
  }
  /// The next forward makes each δ afresh, from the start.
  void restart(const void* /*owner*/, const char* /*kind*/) override {
    for (auto& slot : slots_) {
      slot->reset();
    }
  }

  void set_detached(bool detached) override {
    for (auto& slot : slots_) {
      slot->set_detached(detached);
    }
  }

  void set_shared_lookups(bool shared) override {
    for (auto& slot : slots_) {
      slot->set_shared_lookups(shared);
    }
  }

  bool random_start() const noexcept override {
    return true;
  }

  /// Any shape: δ is refitted to each batch.
  torch::Tensor fit_saved(
      size_t /*i*/, torch::Tensor saved, const char* /*kind*/) const override {
    return saved;
  }

  torch::Tensor embedded(size_t i) const override {
    const auto [s, k] = lookups_[i];
    return slots_[s]->embedded(k);
  }

 protected:
  /// The origin is δ = 0, whatever δ started from.
  void take_backup(bool /*rows_only*/) override {
    for (const auto& t : tensors_) {
      backup_.push_back(torch::zeros_like(t));
    }
    for (auto& slot : slots_) {
      slot->set_held(true);
    }
  }
  /// δ belongs to the attacker alone: nothing to check.
  torch::Tensor written(size_t /*i*/) const override {
    return {};
  }

  /// δ keeps its values; the next batch may have another shape.
  void on_release() override {
    for (auto& slot : slots_) {
      slot->begin_pass();
      slot->set_held(false);
    }
  }

  void put_back(bool untracked) override {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      data(i, untracked).copy_(backup_[i]);
      tensors_[i].mutable_grad() = torch::Tensor();
    }
    for (auto& slot : slots_) {
      slot->begin_pass();
      slot->set_held(false);
    }
  }

 private:
  /// Tensor i of slot s's lookup k: the slots' earlier lookups come first.
  size_t index(size_t s, size_t k) const {
    for (size_t j = 0; j < s; ++j) {
      k += slots_[j]->lookups();
    }
    return k;
  }

  std::vector<std::shared_ptr<Perturbation>> slots_;
  std::vector<std::pair<size_t, size_t>> lookups_; // tensor i: (slot, lookup)
};

} // namespace advtrain
