// Tensor arithmetic that is safe in every floating-point dtype: norms in
// float32 for half-precision tensors (float64 stays float64), in-place
// scaling in float32 for 16-bit tensors, per-example reductions, the bytes a
// tensor holds.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// Norms are taken in float64 for float64 tensors and in float32 otherwise,
/// so half-precision tables neither overflow nor lose the sum.
inline torch::ScalarType norm_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

/// Bytes `t` holds (a sparse tensor: its indices and values; 0 when
/// undefined).
inline int64_t bytes_of(const torch::Tensor& t) {
  if (!t.defined()) {
    return 0;
  }
  if (t.is_sparse()) {
    return static_cast<int64_t>(t._indices().nbytes() + t._values().nbytes());
  }
  return static_cast<int64_t>(t.nbytes());
}

/// ‖t‖₂ over the whole tensor, as a 0-dim tensor on t's device (float64
/// for float64 tensors, float32 otherwise): nothing is read to the host.
inline torch::Tensor l2_norm(const torch::Tensor& t) {
  return at::linalg_vector_norm(t, 2, c10::nullopt, false, norm_dtype(t));
}

/// sqrt(Σ nᵢ²) of 0-dim norms (undefined ones count as 0), on the device;
/// undefined when there is none.
inline torch::Tensor combined_norm(const std::vector<torch::Tensor>& norms) {
  std::vector<torch::Tensor> defined;
  for (const auto& n : norms) {
    if (n.defined()) {
      defined.push_back(n);
    }
  }
  if (defined.size() <= 1) {
    return defined.empty() ? torch::Tensor() : defined.front(); // (>= 0)
  }
  const auto device = defined.front().device();
  for (auto& n : defined) {
    n = n.to(device, torch::kDouble);
  }
  return at::linalg_vector_norm(at::stack(defined), 2);
}

/// `w += g * scale` in place, `scale` a 0-dim tensor; in float32 for 16-bit
/// `w` (as an `add_` with a scalar computes), so neither the scale nor the
/// product is rounded to 16 bits first.
inline void add_scaled(
    torch::Tensor& w, const torch::Tensor& g, const torch::Tensor& scale) {
  if (w.scalar_type() == torch::kHalf || w.scalar_type() == torch::kBFloat16) {
    w.copy_(w.to(torch::kFloat).addcmul_(g.to(torch::kFloat), scale));
  } else {
    w.addcmul_(g, scale);
  }
}

/// `t *= factor` in place, `factor` a 0-dim tensor; in float32 for 16-bit
/// `t`, like `add_scaled`.
inline void scale_by(torch::Tensor& t, const torch::Tensor& factor) {
  if (t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kBFloat16) {
    t.copy_(t.to(torch::kFloat).mul_(factor));
  } else {
    t.mul_(factor);
  }
}

/// A 0-dim value that is finite exactly when every element of `g` is, on
/// its device. `exact`: Σ g·0 in float32 (0, or NaN where an element is
/// ±inf or NaN; zeros cannot overflow), two vectorized passes and a
/// temporary the size of g (about 1 M instructions fewer than `isfinite`
/// and `all` on a 16 × 32 × 64 gradient). Otherwise Σ g in the norms' dtype:
/// one pass and no temporary, for gradients as large as a table, which reads
/// as not finite also where huge finite elements overflow the sum (as
/// their norm's squares would first).
inline torch::Tensor finite_probe(const torch::Tensor& g, bool exact) {
  return exact ? g.detach().mul(0).sum(torch::kFloat) : g.sum(norm_dtype(g));
}

/// `t` where `keep` (a 0-dim bool tensor) holds, else 0; on the device.
inline torch::Tensor zero_unless(
    const torch::Tensor& keep, const torch::Tensor& t) {
  return at::where(keep, t, 0);
}

/// `t` ([B, ...]) as rows [B, n], one per example, to reduce with `dim` 1.
inline torch::Tensor example_rows(const torch::Tensor& t) {
  return t.reshape({t.size(0), -1});
}

/// One value per example, [B], shaped [B, 1, ...] to broadcast against
/// `like`.
inline torch::Tensor per_example(
    const torch::Tensor& values, const torch::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = like.size(0);
  return values.view(shape);
}

/// Per-example L2 norms of `t` ([B, ...]) over all but the first dimension,
/// in float32 (float64 stays float64), shaped [B, 1, ...] to broadcast.
inline torch::Tensor example_norms(const torch::Tensor& t) {
  return per_example(
      at::linalg_vector_norm(example_rows(t), 2, {1}, false, norm_dtype(t)), t);
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

/// Whether a gradient norm gives a step: positive and finite (0-dim bool,
/// on the device; NaN compares false both ways). The one test of it on the
/// device; a norm read to the host is tested with `usable_norm(double)`.
inline torch::Tensor usable_norm(const torch::Tensor& gnorm) {
  return gnorm.gt(0).logical_and_(
      gnorm.lt(std::numeric_limits<double>::infinity()));
}
/// `usable_norm` of a norm read to the host.
inline bool usable_norm(double gnorm) {
  return gnorm > 0.0 && std::isfinite(gnorm);
}

} // namespace detail
} // namespace advtrain
