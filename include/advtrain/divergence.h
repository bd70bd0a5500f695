// Divergences between two model outputs, as the official code of each
// regularizer computes them: `stable_kl` (SMART's ascent), `sym_kl` (SMART's
// regularizer), squared error for regression outputs, `kl` (VAT) and
// `symmetric_kl` (R3F).
#pragma once

#include <advtrain/norm.h>

#include <torch/torch.h>

namespace advtrain {
namespace detail {

/// `logits` as rows of classes, in float32 (float64 stays float64).
inline torch::Tensor class_rows(const torch::Tensor& logits) {
  return logits.reshape({-1, logits.size(-1)}).to(norm_dtype(logits));
}

/// Whether the model's output is a regression by its shape: `[B]` (or a
/// scalar) or one output column `[B, 1]`.
inline bool is_regression(const torch::Tensor& logits) {
  return logits.dim() <= 1 || logits.size(-1) == 1;
}

/// Squared error between two regression outputs, in float32 (float64 stays
/// float64), their mean (`reduce`) or sum; `b` is taken as it is given.
inline torch::Tensor squared_error(
    const torch::Tensor& a, const torch::Tensor& b, bool reduce) {
  const auto dtype = norm_dtype(a);
  return torch::mse_loss(
      a.to(dtype),
      b.to(dtype),
      reduce ? at::Reduction::Mean : at::Reduction::Sum);
}

} // namespace detail

/// mt-dnn's numerically stable KL (namisan/mt-dnn, mt_dnn/loss.py,
/// `stable_kl`): `2 * Σ p * (rp − rq)` over the rows, divided by the number
/// of rows when `reduce` (a batch mean) and summed otherwise (SMART's ascent
/// calls it with `reduce=False`); `p = exp(log_softmax(p_logits))`,
/// `rp = −log(1 / (p + 1e-6) − 1 + 1e-6)` (detached; likewise `rq` for
/// `q_logits`, detached). The gradient flows through `p` only. A regression
/// output (`[B]` or `[B, 1]`): squared error, mean or sum likewise.
inline torch::Tensor stable_kl(
    const torch::Tensor& p_logits,
    const torch::Tensor& q_logits,
    bool reduce = true) {
  if (detail::is_regression(p_logits)) {
    return detail::squared_error(p_logits, q_logits.detach(), reduce);
  }
  const auto p_rows = detail::class_rows(p_logits);
  const auto p = torch::log_softmax(p_rows, -1).exp();
  const auto q =
      torch::log_softmax(detail::class_rows(q_logits), -1).exp().detach();
  const double e = 1e-6;
  const auto rp = -(1.0 / (p.detach() + e) - 1 + e).log();
  const auto rq = -(1.0 / (q + e) - 1 + e).log();
  const auto sum = (p * (rp - rq) * 2).sum();
  return reduce ? sum / static_cast<double>(p_rows.size(0)) : sum;
}

/// Symmetric KL of SMART's regularizer, `KL(sg(p) ‖ q) + KL(sg(q) ‖ p)`
/// between the softmaxes of the two logits, averaged over the rows, in
/// float32 (float64 stays float64; `sg` stops the gradient), as mt-dnn's
/// `SymKlCriterion`. A regression output (`[B]` or `[B, 1]`): mean squared
/// error, as mt-dnn's `MseCriterion`.
inline torch::Tensor sym_kl(
    const torch::Tensor& p_logits, const torch::Tensor& q_logits) {
  if (detail::is_regression(p_logits)) {
    return detail::squared_error(p_logits, q_logits, /*reduce=*/true);
  }
  const auto lp = torch::log_softmax(detail::class_rows(p_logits), -1);
  const auto lq = torch::log_softmax(detail::class_rows(q_logits), -1);
  const auto p = lp.detach().exp();
  const auto q = lq.detach().exp();
  const auto kl_p_q = (p * (lp.detach() - lq)).sum();
  const auto kl_q_p = (q * (lq.detach() - lp)).sum();
  return (kl_p_q + kl_q_p) / static_cast<double>(lp.size(0));
}

/// `KL(q ‖ p)` between the softmaxes of `q_logits` and `p_logits`,
/// `Σ q·(log q − log p)` averaged over the rows, in float32 (float64 stays
/// float64); gradients flow through both sides (detach `q_logits` for a
/// fixed target, as VAT does: tensorflow/models,
/// research/adversarial_text/adversarial_losses.py,
/// `_kl_divergence_with_logits`).
inline torch::Tensor kl(
    const torch::Tensor& q_logits, const torch::Tensor& p_logits) {
  const auto lq = torch::log_softmax(detail::class_rows(q_logits), -1);
  const auto lp = torch::log_softmax(detail::class_rows(p_logits), -1);
  return (lq.exp() * (lq - lp)).sum() / static_cast<double>(lq.size(0));
}

/// `KL(p ‖ q) + KL(q ‖ p)` averaged over the rows, with gradients through
/// both sides and no stop-gradient anywhere (fairseq's R3F criterion,
/// `_get_symm_kl`; SMART's `sym_kl` stops the gradient of each target).
inline torch::Tensor symmetric_kl(
    const torch::Tensor& p_logits, const torch::Tensor& q_logits) {
  return kl(p_logits, q_logits) + kl(q_logits, p_logits);
}

} // namespace advtrain
