// Norm policies (`L2`, `LInf`, `LInfScaled`): each one's step, projection
// and random start, in the `Geometry` a target gives (a whole tensor, or per
// example with its mask); norms in float32 for half-precision tensors.
#pragma once

#include <advtrain/detail/device.h>
#include <advtrain/detail/tensor_math.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

namespace advtrain {

/// Where a perturbation's norms are taken, as its target lays it out: per
/// example over all dimensions but the first, masked positions left out
/// (`mask`, broadcast against δ: the activation target; zero and non-finite
/// norms are handled per example by the step itself), or over the whole
/// tensor (no mask: a parameter target). On a whole tensor the target has
/// measured the gradient's norm, on the device: `usable` (0-dim bool) says
/// whether it is positive and finite, and where it is not, the gradient the
/// rule gets is zero and `gnorm` is 1, so a rule that steps along g moves
/// by 0 (one whose step from a zero gradient is not zero keeps δ with
/// `detail::add_if_usable`). For a step that reads no norm (a sign step:
/// `SearchAttacker::step_geometry` with `norm_read` false), `usable` says
/// only whether g is finite (a zero g is usable and steps by 0) and `gnorm`
/// is not measured: only such a step may take that geometry. In a
/// regularizer's search (`GradientCheck::all_finite`), on either target,
/// `usable` says whether every gradient of the step so far was finite (a
/// zero g is a step), and `gnorm` is not measured: its rules read neither.
struct Geometry {
  torch::Tensor mask;
  /// ‖g‖ (0-dim; 1 where not `usable`); whole tensors only.
  torch::Tensor gnorm;
  /// Whether ‖g‖ is positive and finite (0-dim bool; where g is zero
  /// otherwise); whole tensors, and a regularizer's search (see above).
  torch::Tensor usable;
  /// ‖g‖ read to the host, where the tensor lives in host memory (a read
  /// waits for no device): then it is positive and finite, and `usable` is
  /// not set (0: not read).
  double host_gnorm = 0.0;
  /// Whether the rule's figures are wanted (the norm a whole tensor's L∞
  /// step or projection returns, a pass over the tensor each): not where
  /// they would be dropped (FreeAT's δ kept apart from its target).
  bool measure = true;
  bool per_example() const noexcept {
    return mask.defined();
  }
};

namespace detail {

/// The geometry of a whole tensor whose gradient `g` has the norm `gnorm`,
/// `usable` (0-dim bool) or not: where not, `g` is replaced by zeros and the
/// norm by 1, so any rule moves by 0, decided on the device.
inline Geometry whole_tensor(
    torch::Tensor& g, const torch::Tensor& gnorm, const torch::Tensor& usable) {
  g = zero_unless(usable, g);
  return Geometry{torch::Tensor(), at::where(usable, gnorm, 1), usable};
}

/// The geometry of a whole tensor in host memory whose gradient has the
/// norm `gnorm`: ‖g‖ is read (a read there waits for no device), and a
/// zero or non-finite one gives none (the step skips the tensor).
inline std::optional<Geometry> read_geometry(const torch::Tensor& gnorm) {
  const double n = gnorm.item<double>();
  if (!usable_norm(n)) {
    return std::nullopt;
  }
  Geometry geo{torch::Tensor(), gnorm, torch::Tensor()};
  geo.host_gnorm = n;
  return geo;
}

/// ‖g‖ of a whole tensor: the geometry's, or measured here when the caller
/// gave none (a rule called outside a target's move).
inline torch::Tensor whole_norm(const torch::Tensor& g, const Geometry& geo) {
  return geo.gnorm.defined() ? geo.gnorm : l2_norm(g);
}

/// `geo.usable`, or (none given) whether `gnorm` is positive and finite.
inline torch::Tensor usable_or_true(
    const Geometry& geo, const torch::Tensor& gnorm) {
  return geo.usable.defined() ? geo.usable : usable_norm(gnorm);
}

} // namespace detail

/// What a norm policy's `project` did, on the device.
struct Projection {
  /// ‖δ‖₂ after the projection (0-dim; per example not measured:
  /// undefined).
  torch::Tensor norm;
  /// Whether δ changed (0-dim bool: false when it was inside the ball);
  /// undefined: it may have.
  torch::Tensor changed;
  /// δ is known to be unchanged (read on the host, where δ lives in host
  /// memory): nothing needs writing back.
  bool kept = false;
};

/// Norm policy: L2 (Frobenius over the whole tensor). The steepest-ascent step
/// of size `alpha` is `alpha * g / ‖g‖`; projection rescales onto the ball.
struct L2 {
  static constexpr const char* name = "L2";
  /// Whether a whole tensor's step reads ‖g‖ (`geo.gnorm`).
  static constexpr bool reads_gradient_norm = true;

  /// Adds the step `alpha * g / ‖g‖` to `w` in place. On a whole tensor
  /// ‖g‖ is `geo.gnorm` and the step's norm, `alpha` (0 where not
  /// `geo.usable`), is returned. Per example i (first dimension):
  /// `w_i += alpha * g_i / max(‖g_i‖, floor)`, `g` masked first, examples
  /// with a non-finite ‖g_i‖ left in place (returns undefined: not
  /// measured). The floor is FreeLB's 1e-8 (its fairseq YOPO uses 1e-10).
  /// Everything stays on the device.
  static torch::Tensor step(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      const Geometry& geo,
      double floor = 1e-8) {
    if (!geo.per_example()) {
      if (geo.host_gnorm > 0) {
        w.add_(g, alpha / geo.host_gnorm);
        return at::scalar_tensor(alpha, g.options().dtype(torch::kDouble));
      }
      const torch::Tensor gnorm = detail::whole_norm(g, geo);
      detail::add_scaled(w, g, gnorm.reciprocal().mul_(alpha));
      return detail::usable_or_true(geo, gnorm).mul(alpha);
    }
    const auto gn = detail::masked_finite(g, geo.mask);
    w.add_((gn.first * (alpha / gn.second.clamp_min(floor))).to(w.dtype()));
    return {};
  }

  /// FreeLB's L2 random start of a per-example δ ([B, L, H], zero):
  /// `U(-1, 1) * mask * mag / sqrt(L_i * H)`, L_i the example's unpadded
  /// length (`mask` is [B, L, 1]).
  static void random_start(
      torch::Tensor& d, const torch::Tensor& mask, double mag) {
    d.uniform_(-1, 1);
    // (In float32 at least: LibTorch's CPU has no float16 clamp or sqrt.)
    const auto dims =
        mask.sum(
            {1, 2},
            /*keepdim=*/true,
            at::promote_types(mask.scalar_type(), torch::kFloat)) *
        d.size(-1);
    d.mul_(mask * mag / dims.clamp_min(1).sqrt());
  }

  /// Projects `delta` in place onto ‖delta‖ ≤ eps (`eps * delta / ‖delta‖`
  /// when it lies outside; left bit for bit when inside), on the device. Per
  /// example: each example with ‖delta_i‖ > eps is rescaled onto eps.
  static Projection project(
      torch::Tensor& delta, double eps, const Geometry& geo = {}) {
    if (geo.per_example()) {
      const auto n = detail::example_norms(delta);
      delta.mul_((eps / n.clamp_min(eps)).to(delta.dtype()));
      return {};
    }
    const torch::Tensor n = detail::l2_norm(delta);
    const torch::Tensor outside = n > eps;
    if (!detail::sync_free(delta)) { // host memory: a read waits for nothing
      if (!outside.item<bool>()) {
        return {n, outside, /*kept=*/true};
      }
      detail::scale_by(delta, n.reciprocal().mul_(eps));
      return {n.clamp_max(eps), torch::Tensor()}; // written whole, no `where`
    }
    // (eps / n is not used where n <= eps, n = 0 included.)
    detail::scale_by(delta, at::where(outside, n.reciprocal().mul_(eps), 1));
    return {n.clamp_max(eps), outside};
  }
};

/// Norm policy: L∞ (element-wise). The steepest-ascent step of size `alpha`
/// is `alpha * sign(g)`; projection clamps each element to [-eps, eps].
struct LInf {
  static constexpr const char* name = "LInf";
  /// A sign step reads no norm of g, only whether it is usable.
  static constexpr bool reads_gradient_norm = false;

  /// Adds `alpha * sign(g)` to `w` in place. On a whole tensor returns the
  /// step's L2 norm (0 where not `geo.usable`, whose `g` is zero; undefined
  /// where not `geo.measure`). Per
  /// example: over the unmasked positions, examples with a non-finite
  /// ‖g_i‖ left in place (returns undefined).
  static torch::Tensor step(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      const Geometry& geo) {
    if (geo.per_example()) {
      w.add_(detail::masked_finite(g, geo.mask).first.sign(), alpha);
      return {};
    }
    w.add_(g.sign(), alpha);
    if (!geo.measure) {
      return {};
    }
    return g.count_nonzero().to(torch::kDouble).sqrt() * alpha;
  }

  /// The L∞ random start of a per-example δ: `U(-mag, mag) * mask`.
  static void random_start(
      torch::Tensor& d, const torch::Tensor& mask, double mag) {
    d.uniform_(-mag, mag);
    d.mul_(mask);
  }

  /// Clamps `delta` in place to [-eps, eps], element-wise (the same per
  /// example; there `norm` is not measured).
  static Projection project(
      torch::Tensor& delta, double eps, const Geometry& geo = {}) {
    if (delta.scalar_type() == torch::kHalf && delta.device().is_cpu()) {
      // LibTorch has no float16 clamp kernel on CPU.
      delta.copy_(delta.to(torch::kFloat).clamp_(-eps, eps));
    } else {
      delta.clamp_(-eps, eps);
    }
    if (geo.per_example() || !geo.measure) {
      return {};
    }
    return {detail::l2_norm(delta), torch::Tensor()};
  }
};

/// Norm policy: the L∞ ball with steps scaled by the gradient's largest
/// entry, `alpha * g / max(‖g‖∞, 1e-8)` (per example on embedding outputs),
/// and the element-wise clamp to [-eps, eps] of `LInf`: the official FreeLB's
/// `norm_type == "linf"` (zhuchen03/FreeLB,
/// huggingface-transformers/examples/run_glue_freelb.py). `LInf` steps along
/// sign(g) instead.
struct LInfScaled {
  static constexpr const char* name = "LInfScaled";
  static constexpr bool reads_gradient_norm = true;

  /// Adds `alpha * g / max(‖g‖∞, 1e-8)` to `w` in place. On a whole tensor
  /// returns the step's L2 norm (0 where not `geo.usable`). Per example:
  /// ‖g_i‖∞ per example, `g` masked first, examples with a non-finite
  /// ‖g_i‖ left in place (returns undefined).
  static torch::Tensor step(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      const Geometry& geo) {
    if (!geo.per_example()) {
      const torch::Tensor scale =
          g.abs().max().to(torch::kDouble).clamp_min(1e-8).reciprocal() * alpha;
      detail::add_scaled(w, g, scale);
      const torch::Tensor gnorm = detail::whole_norm(g, geo);
      return detail::zero_unless(
          detail::usable_or_true(geo, gnorm), gnorm.to(torch::kDouble) * scale);
    }
    const torch::Tensor gm = detail::masked_finite(g, geo.mask).first;
    // (‖g_i‖∞ in float32 at least: 1e-8 is 0 in float16, which LibTorch's
    // CPU cannot clamp.)
    const auto top = detail::per_example(
        detail::example_rows(gm.abs()).amax(1).to(
            at::promote_types(gm.scalar_type(), torch::kFloat)),
        gm);
    w.add_((gm * (alpha / top.clamp_min(1e-8))).to(w.dtype()));
    return {};
  }

  /// `LInf`'s clamp.
  static Projection project(
      torch::Tensor& delta, double eps, const Geometry& geo = {}) {
    return LInf::project(delta, eps, geo);
  }
  static void random_start(
      torch::Tensor& d, const torch::Tensor& mask, double mag) {
    LInf::random_start(d, mask, mag);
  }
};

namespace detail {

/// One step of `Norm` of size alpha along g from the origin (δ = 0 before:
/// FGSM, FGM). Returns ‖δ‖ (0-dim, on the device).
template <typename Norm>
torch::Tensor first_step(
    torch::Tensor& w,
    const torch::Tensor& g,
    double alpha,
    const Geometry& geo) {
  const torch::Tensor n = Norm::step(w, g, alpha, geo);
  return geo.per_example() ? l2_norm(w) : n;
}

/// A step of `Norm` of size alpha along g, then δ = w − origin back into
/// the ball of radius eps (skipped when eps <= 0); w is written only where
/// the projection changed δ. Per example the origin is δ = 0, so w is δ.
/// Returns ‖δ‖ (0-dim, on the device).
template <typename Norm>
torch::Tensor projected_step(
    torch::Tensor& w,
    const torch::Tensor& g,
    double alpha,
    double eps,
    const torch::Tensor& origin,
    const Geometry& geo) {
  Geometry moving = geo; // the step's own norm is not read here
  moving.measure = false;
  Norm::step(w, g, alpha, moving);
  if (geo.per_example()) {
    if (eps > 0) {
      Norm::project(w, eps, geo);
    }
    return l2_norm(w);
  }
  torch::Tensor delta = w - origin;
  if (eps <= 0) {
    return l2_norm(delta);
  }
  const Projection p = Norm::project(delta, eps);
  if (p.kept) { // w already holds origin + δ
    return p.norm;
  }
  // Written where the projection changed δ, and not at all where the
  // gradient gave no step (`geo.usable`).
  torch::Tensor write = p.changed;
  if (geo.usable.defined()) {
    write = write.defined() ? write.logical_and(geo.usable) : geo.usable;
  }
  if (write.defined()) {
    w.copy_(at::where(write, origin + delta, w));
  } else {
    at::add_out(w, origin, delta);
  }
  return p.norm;
}

/// A step of `Norm` of size alpha along g on a perturbation `d` kept apart
/// from its target (FreeAT's), then back into the ball of radius eps; the
/// rule's figures are not measured (nothing reads them).
template <typename Norm>
void step_and_project(
    torch::Tensor& d,
    const torch::Tensor& g,
    double alpha,
    double eps,
    Geometry geo) {
  geo.measure = false;
  Norm::step(d, g, alpha, geo);
  Norm::project(d, eps, geo);
}

/// Writes the perturbation `d` onto its target `w`: `origin + d` on a whole
/// tensor, `d * mask` per example (whose origin is 0). Returns ‖δ‖ (0-dim,
/// on the device).
inline torch::Tensor place(
    torch::Tensor& w,
    const torch::Tensor& origin,
    const torch::Tensor& d,
    const Geometry& geo) {
  if (geo.per_example()) {
    w.copy_(d * geo.mask);
    return l2_norm(w);
  }
  at::add_out(w, origin, d);
  return l2_norm(d);
}

/// `w = origin + d`, except where `geo.usable` is false (when set), where w
/// is kept bit for bit: for rules whose step from a zero gradient is not
/// zero (SMART normalizes δ, VAT rescales it). Returns ‖δ‖ (0-dim).
inline torch::Tensor add_if_usable(
    torch::Tensor& w,
    const torch::Tensor& origin,
    const torch::Tensor& d,
    const Geometry& geo) {
  if (!geo.usable.defined()) {
    at::add_out(w, origin, d);
    return l2_norm(d);
  }
  const torch::Tensor n =
      at::where(geo.usable, l2_norm(d), l2_norm(w - origin));
  w.copy_(at::where(geo.usable, origin + d, w));
  return n;
}

/// `t * mask` per example; `t` on a whole tensor.
inline torch::Tensor masked(const torch::Tensor& t, const Geometry& geo) {
  return geo.per_example() ? t * geo.mask : t;
}

} // namespace detail

} // namespace advtrain
