#pragma once

#include <torch/torch.h>

#include <cmath>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// Norms are taken in float64 for float64 tensors and in float32 otherwise,
/// so half-precision tables neither overflow nor lose the sum.
inline torch::ScalarType norm_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

/// ‖t‖₂ over the whole tensor, as a double (one host synchronization).
inline double l2_norm(const torch::Tensor& t) {
  return at::linalg_vector_norm(t, 2, c10::nullopt, false, norm_dtype(t))
      .item<double>();
}

/// Per-example L2 norms of `t` ([B, ...]) over all but the first dimension,
/// in float32 (float64 stays float64), shaped [B, 1, ...] to broadcast.
inline torch::Tensor example_norms(const torch::Tensor& t) {
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = t.size(0);
  return at::linalg_vector_norm(
             t.reshape({t.size(0), -1}), 2, {1}, false, norm_dtype(t))
      .view(shape);
}

/// `g * mask`, with the examples whose norm is not finite set to zero; also
/// returns the per-example norms of the result.
inline std::pair<torch::Tensor, torch::Tensor> masked_finite(
    const torch::Tensor& g, const torch::Tensor& mask) {
  torch::Tensor gm = mask.defined() ? g * mask : g;
  const torch::Tensor n = example_norms(gm);
  const torch::Tensor ok = torch::isfinite(n);
  gm = torch::where(ok, gm, torch::zeros_like(gm));
  return {gm, torch::where(ok, n, torch::zeros_like(n))};
}

} // namespace detail

/// What a norm policy's `project` did.
struct Projection {
  /// ‖δ‖₂ after the projection.
  double norm = 0.0;
  /// Whether δ may have changed (false when it was inside the ball).
  bool changed = false;
};

/// Norm policy: L2 (Frobenius over the whole tensor). The steepest-ascent step
/// of size `alpha` is `alpha * g / ‖g‖`; projection rescales onto the ball.
struct L2 {
  static constexpr const char* name = "L2";

  /// Adds `alpha * g / gnorm` to `w` in place, `gnorm` = ‖g‖ (positive and
  /// finite: callers check it). Returns the step's norm, `alpha`.
  static double step(
      torch::Tensor& w, const torch::Tensor& g, double alpha, double gnorm) {
    w.add_(g, alpha / gnorm);
    return alpha;
  }

  /// Per example i (first dimension): `w_i += alpha * g_i / max(‖g_i‖,
  /// 1e-8)`, `g` masked first; examples with a non-finite ‖g_i‖ do not move.
  static void step_examples(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      const torch::Tensor& mask) {
    const auto gn = detail::masked_finite(g, mask);
    w.add_((gn.first * (alpha / gn.second.clamp_min(1e-8))).to(w.dtype()));
  }

  /// Per example: rescales the examples with ‖delta_i‖ > eps onto eps.
  static void project_examples(torch::Tensor& delta, double eps) {
    const auto n = detail::example_norms(delta);
    delta.mul_((eps / n.clamp_min(eps)).to(delta.dtype()));
  }

  /// Projects `delta` in place onto ‖delta‖ ≤ eps (`eps * delta / ‖delta‖`
  /// when it lies outside).
  static Projection project(torch::Tensor& delta, double eps) {
    const double n = detail::l2_norm(delta);
    if (n > eps) {
      delta.mul_(eps / n);
      return {eps, true};
    }
    return {n, false};
  }
};

/// Norm policy: L∞ (element-wise). The steepest-ascent step of size `alpha`
/// is `alpha * sign(g)`; projection clamps each element to [-eps, eps].
struct LInf {
  static constexpr const char* name = "LInf";

  /// Adds `alpha * sign(g)` to `w` in place (`gnorm` = ‖g‖ is positive and
  /// finite: callers check it). Returns the step's L2 norm.
  static double step(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      double /*gnorm*/) {
    w.add_(g.sign(), alpha);
    return alpha * std::sqrt(g.count_nonzero().item<double>());
  }

  /// Per example: `w_i += alpha * sign(g_i)` over the unmasked positions;
  /// examples with a non-finite ‖g_i‖ do not move.
  static void step_examples(
      torch::Tensor& w,
      const torch::Tensor& g,
      double alpha,
      const torch::Tensor& mask) {
    w.add_(detail::masked_finite(g, mask).first.sign(), alpha);
  }

  /// Element-wise clamp, as `project`.
  static void project_examples(torch::Tensor& delta, double eps) {
    project(delta, eps);
  }

  /// Clamps `delta` in place to [-eps, eps].
  static Projection project(torch::Tensor& delta, double eps) {
    if (delta.scalar_type() == torch::kHalf && delta.device().is_cpu()) {
      // LibTorch has no float16 clamp kernel on CPU.
      delta.copy_(delta.to(torch::kFloat).clamp_(-eps, eps));
    } else {
      delta.clamp_(-eps, eps);
    }
    return {detail::l2_norm(delta), true};
  }
};

} // namespace advtrain
