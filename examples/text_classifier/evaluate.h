#pragma once

// How a trained model is scored: accuracy (of its predictor: DNE's is an
// ensemble), and accuracy under the PGD attack on the embedded sentences (the
// same attack on the single model whatever the training method), at the
// evaluation radius and along --eval-epsilons.

#include "config.h"
#include "data.h"
#include "model.h"

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace example {

/// Accuracy on `batch` after `steps` steps of L2 PGD of radius `eps` on each
/// example's embedded tokens (padding excluded), step 2.5 * eps / steps.
inline double robust_accuracy(
    Classifier& model, const Batch& batch, double eps, int64_t steps) {
  model->eval();
  torch::Tensor e;
  {
    torch::NoGradGuard no_grad;
    e = model->embed(batch.ids);
  }
  const auto mask = batch.ids.ne(Vocabulary::kPad).unsqueeze(-1).to(e.dtype());
  auto delta = torch::zeros_like(e);
  const double alpha = 2.5 * eps / static_cast<double>(steps);
  for (int64_t s = 0; eps > 0 && s < steps; ++s) {
    delta.requires_grad_(true);
    const auto loss = torch::nn::functional::cross_entropy(
        model->head(e + delta, batch.ids),
        batch.labels,
        torch::nn::functional::CrossEntropyFuncOptions().reduction(
            torch::kSum));
    auto g = torch::autograd::grad({loss}, {delta})[0] * mask;
    torch::NoGradGuard no_grad;
    const auto gn = g.flatten(1).norm(2, 1).clamp_min(1e-12).view({-1, 1, 1});
    delta = delta.detach() + alpha * g / gn;
    const auto dn = delta.flatten(1).norm(2, 1).view({-1, 1, 1});
    delta = delta * (eps / dn.clamp_min(eps));
  }
  torch::NoGradGuard no_grad;
  const auto pred = model->head(e + delta, batch.ids).argmax(1);
  return pred.eq(batch.labels).to(torch::kDouble).mean().item<double>();
}

inline double accuracy(Classifier& model, const Batch& batch) {
  return robust_accuracy(model, batch, 0.0, 1);
}

/// How a trained model predicts: class probabilities [B, C] of a batch of
/// ids [B, L], the model in eval mode; empty: the softmax of its output.
using Predictor = std::function<torch::Tensor(const torch::Tensor& ids)>;

/// The share of `batch` that `predict` (or the plain model) gets right.
inline double accuracy(
    Classifier& model, const Batch& batch, const Predictor& predict) {
  if (!predict) {
    return accuracy(model, batch);
  }
  model->eval();
  torch::NoGradGuard no_grad;
  return predict(batch.ids)
      .argmax(1)
      .eq(batch.labels)
      .to(torch::kDouble)
      .mean()
      .item<double>();
}

/// A trained model's scores on the test (or validation) split.
struct Evaluation {
  double clean = 0;  // accuracy of the predictor
  double robust = 0; // accuracy under PGD of radius --attack-epsilon
  std::vector<double> robust_at; // accuracy at each of --eval-epsilons
};

/// Scores `model` on `test` with --attack-steps steps of PGD (on the single
/// model; `predict` gives the clean accuracy).
inline Evaluation evaluate(
    Classifier& model,
    const Batch& test,
    const Config& c,
    const Predictor& predict = {}) {
  Evaluation ev;
  const double plain = accuracy(model, test);
  ev.clean = predict ? accuracy(model, test, predict) : plain;
  ev.robust = robust_accuracy(model, test, c.attack_epsilon, c.attack_steps);
  for (const double eps : c.eval_epsilons) {
    // The attack is deterministic: the radii already measured are reused.
    ev.robust_at.push_back(
        eps == 0 ? plain
        : eps == c.attack_epsilon
            ? ev.robust
            : robust_accuracy(model, test, eps, c.attack_steps));
  }
  return ev;
}

} // namespace example
