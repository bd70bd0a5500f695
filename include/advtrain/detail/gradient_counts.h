// Deferred counting of gradient norms: the norms an attack or a search
// measures stay on the device until the step's one host read, which then
// counts the non-finite ones and the attacks whose norms were all zero, and
// warns once per attacker.
#pragma once

#include <advtrain/detail/tensor_math.h>

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace advtrain {
namespace detail {

/// The gradient norms an attacker measured since the last host read, and
/// what the reads found: non-finite norms and attacks whose norms were all
/// zero (the sign of a `zero_grad()` between the backward and `attack()`).
class GradientCounts {
 public:
  /// While alive, the norms noted form one attack's group (all zero: counted
  /// as a zero-gradient attack); a group that is not counted is none.
  class Group {
   public:
    Group(int64_t& current, int64_t id) : current_(current) {
      current_ = id;
    }
    ~Group() {
      current_ = -1;
    }
    Group(const Group&) = delete;
    Group& operator=(const Group&) = delete;

   private:
    int64_t& current_;
  };

  /// Opens the group of one attack's norms; `counted` false: no group.
  Group group(bool counted) {
    return Group(group_, counted ? ++attacks_ : -1);
  }

  /// Keeps tensor `i`'s gradient norm `gnorm` (0-dim) to be read with the
  /// step: a non-finite one is counted, once per read where `once` (a
  /// regularizer's search, which stops moving at the first).
  void note_norm(size_t i, const torch::Tensor& gnorm, bool once = false) {
    pending_.push_back(Pending{i, group_, once});
    norms_.push_back(gnorm);
  }

  /// Where no norm of a whole tensor is taken (per example): whether `g`
  /// (undefined: no gradient) is finite, kept like a norm (`finite_probe`,
  /// exact: it cannot overflow). It belongs to no attack's group.
  void note_finite(size_t i, const torch::Tensor& g) {
    if (!g.defined()) {
      return;
    }
    pending_.push_back(Pending{i, -1, false});
    norms_.push_back(finite_probe(g, /*exact=*/true));
  }

  /// Whether kept norms are waiting to be read.
  bool has_unread() const noexcept {
    return !norms_.empty();
  }

  /// Reads the 0-dim tensors `extra` and the kept norms to the host with
  /// `read` (one copy of a vector of tensors); counts the non-finite norms
  /// and the groups whose norms were all zero, warns (naming `kind` and the
  /// tensor from `names`), forgets the norms, and returns extra's values.
  template <typename Read>
  std::vector<double> read(
      std::vector<torch::Tensor> extra,
      const Read& read,
      const char* kind,
      const std::vector<std::string>& names) {
    const size_t n_extra = extra.size();
    extra.insert(extra.end(), norms_.begin(), norms_.end());
    std::vector<double> values = read(extra);
    take(values.data() + n_extra, kind, names);
    values.resize(n_extra);
    return values;
  }

  /// Non-finite norms met so far.
  int64_t nonfinite() const noexcept {
    return nonfinite_;
  }
  /// Attacks whose norms were all zero so far.
  int64_t zero() const noexcept {
    return zero_;
  }

 private:
  /// Takes the kept norms' `values`, read (see `read`).
  void take(
      const double* values,
      const char* kind,
      const std::vector<std::string>& names) {
    const size_t n = pending_.size();
    bool once_counted = false;
    for (size_t k = 0; k < n; ++k) {
      const Pending& p = pending_[k];
      if (!std::isfinite(values[k]) && !(p.once && once_counted)) {
        once_counted = once_counted || p.once;
        note_nonfinite(kind, names[p.tensor]);
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
          note_zero(kind);
        }
      }
    }
    pending_.clear();
    norms_.clear();
  }

  void note_nonfinite(const char* kind, const std::string& name) {
    ++nonfinite_;
    if (!warned_nonfinite_) {
      warned_nonfinite_ = true;
      TORCH_WARN(
          "advtrain: ",
          kind,
          ": the gradient of ",
          name,
          " has a non-finite norm; no perturbation from it, training goes on "
          "(warned once per attacker; see nonfinite_gradients())");
    }
  }

  void note_zero(const char* kind) {
    ++zero_;
    if (!warned_zero_) {
      warned_zero_ = true;
      TORCH_WARN(
          "advtrain: ",
          kind,
          ": attack() found every target gradient exactly zero, so nothing "
          "was perturbed; run the loss's backward() right before attack() "
          "(zero_grad() in between leaves zero-filled gradients) (warned "
          "once per attacker; see zero_gradients())");
    }
  }

  /// A kept norm: its tensor, the attack that measured it (-1: none), and
  /// whether a non-finite one counts once per read.
  struct Pending {
    size_t tensor;
    int64_t group;
    bool once;
  };
  std::vector<Pending> pending_;
  std::vector<torch::Tensor> norms_; // not yet read, as pending_
  int64_t group_ = -1;               // the attack measuring now
  int64_t attacks_ = 0;
  int64_t nonfinite_ = 0;
  bool warned_nonfinite_ = false;
  int64_t zero_ = 0;
  bool warned_zero_ = false;
};

} // namespace detail
} // namespace advtrain
