// The registry of perturbed tensors: which attacker holds each one, so that
// two attackers never perturb the same tensor at once.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// Which attacker has each perturbed tensor backed up, so that a second
/// attacker cannot perturb it on top: restores made in the wrong order would
/// leave it perturbed.
class PerturbedTensors {
 public:
  static PerturbedTensors& instance() {
    static PerturbedTensors registry;
    return registry;
  }
  /// Claims every tensor of `ts` for `owner` unless another attacker holds
  /// one of them; returns that one's index and kind, or (-1, null).
  std::pair<int64_t, const char*> try_claim(
      const std::vector<torch::Tensor>& ts,
      const void* owner,
      const char* kind) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < ts.size(); ++i) {
      const auto it = owners_.find(ts[i].unsafeGetTensorImpl());
      if (it != owners_.end() && it->second.first != owner) {
        return {static_cast<int64_t>(i), it->second.second};
      }
    }
    for (const auto& t : ts) {
      owners_[t.unsafeGetTensorImpl()] = {owner, kind};
    }
    return {-1, nullptr};
  }
  /// The first tensor of `ts` that an attacker holds: its index and that
  /// attacker's kind, or (-1, null).
  std::pair<int64_t, const char*> held(const std::vector<torch::Tensor>& ts) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < ts.size(); ++i) {
      const auto it = owners_.find(ts[i].unsafeGetTensorImpl());
      if (it != owners_.end()) {
        return {static_cast<int64_t>(i), it->second.second};
      }
    }
    return {-1, nullptr};
  }
  /// Releases what `owner` holds of `impls`.
  void release(const std::vector<const void*>& impls, const void* owner) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const void* impl : impls) {
      const auto it = owners_.find(impl);
      if (it != owners_.end() && it->second.first == owner) {
        owners_.erase(it);
      }
    }
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const void*, std::pair<const void*, const char*>> owners_;
};

} // namespace detail
} // namespace advtrain
