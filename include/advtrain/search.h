// `SearchAttacker`, the base of the strategies whose perturbation is a move
// of the target by a rule (those whose traits say they search): the
// own-loop `attack()`, the rule each of them defines
// (`perturb`), and the one path every search takes to a step's geometry
// (`step_geometry`: the gradient checked, its norm kept for the step's one
// host read). Strategies without a search (e.g. R3F's drawn noise, ASCC's
// combinations) derive from `Attacker` and have no `attack()`.
#pragma once

#include <advtrain/attacker.h>

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace advtrain {

/// What `step_geometry` checks of a gradient, as the step reads it.
struct GradientCheck {
  /// Whether the step reads ‖g‖; false: a sign step, which reads only
  /// whether g is finite.
  bool norm_read = true;
  /// Set by a search whose every gradient must be finite (a regularizer's,
  /// whose penalty is left out otherwise): whether all of this step's so
  /// far were (0-dim bool, on the device; undefined before the first),
  /// updated here. A zero or missing g is then a step like any other (the
  /// rule's own: SMART normalizes δ), and once one g is not finite, no
  /// tensor moves for the rest of the step.
  torch::Tensor* all_finite = nullptr;
};

/// An `Attacker` whose perturbation is a search: `attack()` backs the target
/// up and moves it by the strategy's rule, `restore()` puts it back.
class SearchAttacker : public Attacker {
 public:
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
    target().sync(kind());
    const std::vector<torch::Tensor> grads = detail::checked_gradients(
        targets(),
        target_names(),
        kind(),
        traits().accepts_sparse(),
        /*needs_one=*/traits().uses_gradient());
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
      const auto in_group = counts().group(traits().uses_gradient());
      for (size_t i = 0; i < grads.size(); ++i) {
        const Move m = target().move(
            i,
            grads[i],
            traits().uses_gradient(),
            traits().moves_gradient_rows(),
            traits().untracked_writes(),
            usable,
            rule);
        norms.push_back(std::move(m.norm));
        if (traits().uses_gradient() && !target().measures_gradient_norm()) {
          counts().note_finite(i, grads[i]);
        }
      }
      set_perturbation_norm(detail::combined_norm(norms));
      note_peak();
      target().consume_gradients();
      if (running_step() == nullptr) { // a Trainer restores before it steps
        target().note_written();
      }
    } catch (...) {
      target().forget_written(); // the writes so far are this attack's own
      restore();
      throw;
    }
    if (running_step() == nullptr) {
      settle(); // an own loop: counted and warned at once
    }
  }

 protected:
  using Attacker::Attacker;

  /// The rule: moves tensor `i` (`w`, its data, or the rows of it that
  /// moved) along its gradient `g`; `geo` says where norms are taken (on a
  /// parameter, `geo.gnorm` = ‖g‖, and where ‖g‖ is zero or not finite `g`
  /// is zero and `geo.gnorm` 1); `origin` is its backed-up value (per
  /// example δ = 0). Returns ‖δᵢ‖ after the move, a 0-dim tensor on the
  /// device (undefined: not measured); nothing in it may read the device to
  /// the host. Runs under NoGradGuard. Where `traits().uses_gradient()` is
  /// false, `g` is undefined.
  virtual torch::Tensor perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      const Geometry& geo,
      const torch::Tensor& origin) = 0;

  /// The geometry of a step of tensor `i` along its gradient `g`, or none
  /// when `g` is undefined: the one path from a gradient to a step outside
  /// `attack()` (FreeAT's δ, LLR's, YOPO's and the regularizers' searches).
  /// Where the target measures norms on whole tensors, ‖g‖ is measured and
  /// checked (`usable_norm`): where it is zero or not finite, `g` is
  /// replaced by zeros, so the step moves by 0; per example, such examples
  /// are left in place by the step itself, and whether `g` is finite is
  /// kept. For a step that reads no norm of g (`check.norm_read` false: a
  /// sign step), only whether g is finite is measured, by its sum (one pass
  /// without a square: finite exactly when every element is, unless it
  /// overflows, which the norm's sum of squares would first); a zero g then
  /// steps by 0 itself. A search that sets `check.all_finite` gets the
  /// geometry of `search_geometry`, never none.
  std::optional<Geometry> step_geometry(
      size_t i, torch::Tensor& g, GradientCheck check = {}) {
    check_sparse(i, g, /*accepted=*/false);
    if (check.all_finite != nullptr) {
      return search_geometry(i, g, *check.all_finite);
    }
    if (!g.defined()) {
      return std::nullopt;
    }
    if (!target().measures_gradient_norm()) {
      counts().note_finite(i, g);
      return target().geometry(i);
    }
    if (!check.norm_read) {
      const torch::Tensor sum = detail::finite_probe(g, /*exact=*/false);
      note_norm(i, sum); // kept like a norm: a non-finite one is counted
      Geometry geo = target().geometry(i);
      if (!detail::sync_free(g)) { // host memory: a read waits for nothing
        return std::isfinite(sum.item<double>()) ? std::optional(geo)
                                                 : std::nullopt;
      }
      geo.usable = torch::isfinite(sum);
      g = detail::zero_unless(geo.usable, g);
      return geo;
    }
    const torch::Tensor gnorm = detail::l2_norm(g);
    if (!detail::sync_free(g)) { // host memory: a read waits for nothing
      note_norm(i, gnorm);
      return detail::read_geometry(gnorm);
    }
    return detail::whole_tensor(g, gnorm, usable_norm(i, gnorm));
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
    counts().note_norm(i, gnorm, once);
  }

  /// Reads the pending counts now (outside a `Trainer` step): one host read,
  /// none when nothing is pending.
  void settle() {
    if (counts().has_unread()) {
      counts().read({}, detail::to_host, kind(), target_names());
    }
  }

  /// The protocol of FGSM and FGM: clean pass, one attack, adversarial pass,
  /// restore, optimizer step.
  void run_single_attack(StepContext& ctx) {
    ctx.figures.loss = ctx.pass();
    attack();
    ctx.figures.perturbation_norm = last_perturbation_norm();
    ctx.figures.adv_loss = ctx.pass();
    restore();
    ctx.step_optimizer();
  }

 private:
  /// `step_geometry` for a search whose gradients must all be finite: ‖g‖
  /// is measured on the whole tensor (per example too: one non-finite
  /// example stops the search) and kept, a non-finite one counted once a
  /// step; `all_finite` takes it in, and where it is false g is zero and
  /// `usable` false, so the rule keeps δ (`detail::add_if_usable`). Nothing
  /// is read to the host, even in host memory: the search's verdict waits
  /// for the step's one read, which decides whether the penalty counts.
  Geometry search_geometry(
      size_t i, torch::Tensor& g, torch::Tensor& all_finite) {
    Geometry geo = target().geometry(i);
    if (g.defined()) {
      const torch::Tensor gnorm = detail::l2_norm(g);
      note_norm(i, gnorm, /*once=*/true);    // the search stops at the first
      torch::Tensor finite = gnorm.lt(kInf); // NaN: false
      all_finite = all_finite.defined()
                       ? all_finite.logical_and_(finite.to(all_finite.device()))
                       : std::move(finite);
    } else {
      g = torch::zeros_like(data(i));
    }
    if (all_finite.defined()) { // once not finite, δ stays where it is
      geo.usable = all_finite.to(g.device());
      g = detail::zero_unless(geo.usable, g);
    }
    return geo;
  }

  static constexpr double kInf = std::numeric_limits<double>::infinity();
};

} // namespace advtrain
