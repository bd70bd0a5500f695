// What a strategy supports and needs, declared once as data: each options
// struct holds `static constexpr Traits traits`, which the base reads (to
// back up, move and refuse) and which error messages and tests read instead
// of a list of strategy names.
#pragma once

namespace advtrain {

/// The declared traits of a strategy, read by `Attacker`; each options
/// struct states its own (`static constexpr Traits traits = Traits()...`),
/// the defaults describing a strategy that searches along the whole
/// gradient on a labeled batch.
class Traits {
 public:
#define ADVTRAIN_TRAIT(name)                         \
  constexpr bool name() const noexcept {             \
    return name##_;                                  \
  }                                                  \
  constexpr Traits name(bool value) const noexcept { \
    Traits t = *this;                                \
    t.name##_ = value;                               \
    return t;                                        \
  }

  /// Whether `attack()` moves the target by a rule (`perturb`); false where
  /// there is no search (e.g. R3F's drawn noise, ASCC's combinations):
  /// the strategy then derives from `Attacker`, not `SearchAttacker`, and
  /// has no `attack()`.
  ADVTRAIN_TRAIT(searches)
  /// Whether the rule moves along the gradient (and so `attack()` needs
  /// one); false for FreeAT, whose δ comes from the previous replay.
  ADVTRAIN_TRAIT(uses_gradient)
  /// Whether the rule moves only the rows where the gradient is nonzero;
  /// then a table backs up and moves those rows alone.
  ADVTRAIN_TRAIT(moves_gradient_rows)
  /// Whether the rule, given a row-sparse gradient, moves only its rows
  /// (then the table backs up and moves those rows alone); the others
  /// refuse sparse gradients. Implied by `moves_gradient_rows`.
  ADVTRAIN_TRAIT(moves_sparse_rows)
  /// Whether writes to the target leave its autograd version alone (a
  /// regularizer: its clean graph stays usable while the target is
  /// perturbed; see `Target::data`).
  ADVTRAIN_TRAIT(untracked_writes)
  /// Whether the loss needs no label beyond the task loss's, so a step may
  /// take it on an unlabeled batch (the regularizers).
  ADVTRAIN_TRAIT(label_free)
#undef ADVTRAIN_TRAIT

  /// Whether a sparse gradient is accepted.
  constexpr bool accepts_sparse() const noexcept {
    return moves_gradient_rows_ || moves_sparse_rows_;
  }

 private:
  bool searches_ = true;
  bool uses_gradient_ = true;
  bool moves_gradient_rows_ = false;
  bool moves_sparse_rows_ = false;
  bool untracked_writes_ = false;
  bool label_free_ = false;
};

} // namespace advtrain
