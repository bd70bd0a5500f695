#pragma once

#include <torch/torch.h>

#include <cmath>

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

/// A gradient norm that can scale a step: positive and finite.
inline bool usable_norm(double n) {
  return n > 0.0 && std::isfinite(n);
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

  /// Adds `alpha * g / ‖g‖` to `w` in place and returns the step's norm
  /// (`alpha`); returns 0 and leaves `w` alone when ‖g‖ is zero or not finite.
  static double step(torch::Tensor& w, const torch::Tensor& g, double alpha) {
    const double n = detail::l2_norm(g);
    if (!detail::usable_norm(n)) {
      return 0.0;
    }
    w.add_(g, alpha / n);
    return alpha;
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

  /// Adds `alpha * sign(g)` to `w` in place and returns the step's L2 norm;
  /// returns 0 and leaves `w` alone when ‖g‖ is zero or not finite.
  static double step(torch::Tensor& w, const torch::Tensor& g, double alpha) {
    const auto n = at::linalg_vector_norm(
        g, 2, c10::nullopt, false, detail::norm_dtype(g));
    const auto nonzero = g.count_nonzero();
    const auto both =
        torch::stack({n.to(torch::kDouble), nonzero.to(torch::kDouble)}).cpu();
    const double* v = both.data_ptr<double>();
    if (!detail::usable_norm(v[0])) {
      return 0.0;
    }
    w.add_(g.sign(), alpha);
    return alpha * std::sqrt(v[1]);
  }

  /// Clamps `delta` in place to [-eps, eps].
  static Projection project(torch::Tensor& delta, double eps) {
    delta.clamp_(-eps, eps);
    return {detail::l2_norm(delta), true};
  }
};

} // namespace advtrain
