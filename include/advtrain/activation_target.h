// The activation target: each example's δ on a `PerturbedEmbedding`'s
// output, made by the forward (from the step's start, random or not) and
// forgotten when the step ends. Norms are taken per example over the real
// positions (the slot's mask), on the device; the step's random stream jumps
// over a random start when passes replay their dropout masks.
#pragma once

#include <advtrain/perturbed_embedding.h>
#include <advtrain/target.h>

#include <fmt/format.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
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

  void sync(const char* kind) override {
    tensors_.resize(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) {
      TORCH_CHECK(
          slots_[i]->delta().defined(),
          "advtrain: ",
          kind,
          ": no perturbation yet; run the model's forward through the "
          "PerturbedEmbedding first, in training mode (not eval()) and with "
          "autograd on");
      tensors_[i] = slots_[i]->delta();
    }
  }

  Geometry geometry(size_t i) const override {
    return Geometry{slots_[i]->expanded_mask(), {}, {}};
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
      if (slot->delta().defined()) {
        norms.push_back(detail::l2_norm(slot->delta().detach()));
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
  }
  void end_step() override {
    Target::end_step();
    for (auto& slot : slots_) {
      slot->reset();
      slot->set_initializer(nullptr);
      slot->set_lookup_hook(nullptr);
      slot->set_detached(false);
    }
    tensors_.clear();
  }

  /// A random start is drawn at the step's first lookup, before the first
  /// pass's dropout masks (as the official FreeLB and YOPO draw it before
  /// their first forward); with shared masks, later passes jump over its
  /// numbers at the same lookup.
  void set_start(Start start, bool random) override {
    for (size_t i = 0; i < slots_.size(); ++i) {
      slots_[i]->set_initializer(
          [this, start, random, i](torch::Tensor& d, const torch::Tensor& m) {
            start(i, d, m);
            if (random && step_context() != nullptr && step_context()->replay) {
              step_context()->replay->start_drawn();
            }
          });
      if (random) {
        slots_[i]->set_lookup_hook([this] {
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

  bool random_start() const noexcept override {
    return true;
  }

  /// Any shape: δ is refitted to each batch.
  torch::Tensor fit_saved(
      size_t /*i*/, torch::Tensor saved, const char* /*kind*/) const override {
    return saved;
  }

  torch::Tensor embedded(size_t i) const override {
    return slots_[i]->embedded();
  }

 protected:
  /// The origin is δ = 0, whatever δ started from.
  void take_backup(bool /*rows_only*/) override {
    for (const auto& t : tensors_) {
      backup_.push_back(torch::zeros_like(t));
    }
  }
  void put_back(bool untracked) override {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      data(i, untracked).copy_(backup_[i]);
      tensors_[i].mutable_grad() = torch::Tensor();
    }
  }

 private:
  std::vector<std::shared_ptr<Perturbation>> slots_;
};

} // namespace advtrain
