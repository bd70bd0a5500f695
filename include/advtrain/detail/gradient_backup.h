// The gradients an own PGD-style loop sets aside: a copy of the `.grad` of
// every watched parameter, handed back exactly (undefined ones included).
#pragma once

#include <advtrain/detail/tensor_math.h>

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// The watched parameters and the copy of their gradients, if one is held.
class GradientBackup {
 public:
  explicit GradientBackup(std::vector<torch::Tensor> watched = {})
      : watched_(std::move(watched)) {}

  /// Sets the watched parameters; drops a held copy.
  void watch(std::vector<torch::Tensor> params) {
    copies_.clear();
    held_ = false;
    watched_ = std::move(params);
  }
  const std::vector<torch::Tensor>& watched() const noexcept {
    return watched_;
  }

  /// Copies the `.grad` of every watched parameter (undefined stays
  /// undefined).
  void save() {
    TORCH_CHECK(
        !watched_.empty(),
        "advtrain: backup_grad() has no parameters to watch; build the "
        "attacker from a module or call watch_grads(parameters) first");
    copies_.clear();
    copies_.reserve(watched_.size());
    for (const auto& p : watched_) {
      const auto& g = p.grad();
      copies_.push_back(g.defined() ? g.detach().clone() : g);
    }
    held_ = true;
  }

  /// Hands the copy back in place of the current gradients; refused,
  /// changing nothing, without a `save()` since the last one (`kind` names
  /// the strategy).
  void put_back(const char* kind) {
    TORCH_CHECK(
        held_,
        "advtrain: ",
        kind,
        ": restore_grad() without backup_grad() (or a second time since "
        "it); call backup_grad() after the clean backward");
    held_ = false;
    for (size_t i = 0; i < copies_.size(); ++i) {
      watched_[i].mutable_grad() = std::move(copies_[i]);
    }
    copies_.clear();
  }

  /// Bytes the copy holds.
  int64_t bytes() const {
    int64_t n = 0;
    for (const auto& t : copies_) {
      n += bytes_of(t);
    }
    return n;
  }

 private:
  std::vector<torch::Tensor> watched_;
  std::vector<torch::Tensor> copies_;
  bool held_ = false;
};

} // namespace detail
} // namespace advtrain
