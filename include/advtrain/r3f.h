// R3F: a label-free regularizer with noise in place of an adversarial
// search: the symmetric KL divergence between the outputs at x and at
// x + z, z uniform or Gaussian noise.
#pragma once

#include <advtrain/divergence.h>
#include <advtrain/regularizer.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of R3F (Aghajanyan et al., ICLR 2021); the defaults are fairseq's
/// (`--eps`, `--noise-type`, `--r3f-lambda`).
struct R3FOptions {
  static constexpr const char* kind = "R3F";
  static constexpr Traits traits =
      Traits().searches(false).untracked_writes(true).label_free(true);
  /// Scale σ of the noise: `U(−σ, σ)`, or `N(0, σ²)` with `normal_noise`.
  TORCH_ARG(double, sigma) = 1e-5;
  /// Gaussian noise instead of uniform.
  TORCH_ARG(bool, normal_noise) = false;
  /// Weight λ of the regularizer added to the task loss.
  TORCH_ARG(double, weight) = 1.0;
  /// Whether the clean and the noised pass draw the same dropout masks.
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const R3FOptions& o, const Attacker& /*attacker*/) {
  const char* kind = R3FOptions::kind;
  check_option(o.sigma() > 0, kind, "sigma", o.sigma(), "> 0");
  check_option(o.weight() >= 0, kind, "weight", o.weight(), ">= 0");
}

/// R3F: a label-free regularizer with noise in place of an adversarial
/// search.
///
/// Paper: Aghajanyan, Shrivastava, Gupta, Goyal, Zettlemoyer and Gupta,
/// "Better Fine-Tuning by Reducing Representational Collapse", ICLR 2021.
///
/// Rule: the task loss plus `weight · (KL(p ‖ p_z) + KL(p_z ‖ p))` (batch
/// mean, gradients through both outputs), p and p_z the softmaxes of the
/// clean and noised outputs, the noise z `U(−σ, σ)` or, with
/// `normal_noise`, `N(0, σ²)`. z is drawn after the clean pass, in float32
/// as `torch.distributions` draws it, then cast. Per example z is masked to
/// the real tokens, and the noised pass adds it to the lookup output
/// detached from the table, so only the clean pass reaches the table (on a
/// table target the noised pass runs at `W + z`, which it reaches).
/// Classification outputs only (logits `[B, C]`, C ≥ 2).
///
/// Options (`R3FOptions`, each field documented there; fairseq's defaults,
/// `--eps`, `--noise-type`, `--r3f-lambda`): `sigma` σ = 1e-5,
/// `normal_noise` = false, `weight` λ = 1.0, `share_dropout_mask` = false.
///
/// One `Trainer::step` (`Regularizer`'s protocol with no search; two
/// forwards, one backward, one optimizer step): clean pass; noised pass;
/// restore; the backward. Label-free: `Trainer::step(forward, loss_fn,
/// unlabeled)` takes the term on an unlabeled batch (one pass more). There
/// is no own-loop `attack()`: the noise is drawn, not found along a gradient.
///
/// Official code: facebookresearch/fairseq
/// `examples/rxf/rxf_src/sentence_prediction_r3f.py`
/// (`SentencePredictionR3F`, `_get_symm_kl`): clean pass first, noise drawn
/// after it in float32, the noised pass on the lookup output detached from
/// the table, `_get_symm_kl` without stop-gradient, fairseq's
/// sum-over-sample-size equal to the batch mean here. Differences: the noise
/// is masked on padded positions (fairseq's encoder zeroes padded positions
/// after the lookup, so no output changes); regression targets, to which
/// fairseq adds no R3F term, are refused.
///
/// Example:
///   advtrain::R3F r3f(model->embedding, advtrain::R3FOptions().sigma(1e-5));
///   advtrain::Trainer trainer(optimizer, r3f);
///   trainer.step([&] { return model->forward(ids); }, loss_fn);
class R3F : public Regularizer<R3FOptions> {
 public:
  using Regularizer::Regularizer;

 protected:
  /// z: `low + U[0, 1)·(high − low)` or `N(0, 1)·σ`, drawn and scaled in
  /// float32, then cast.
  void start() override {
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
    for (size_t i = 0; i < targets().size(); ++i) {
      torch::Tensor w = data(i);
      torch::Tensor z;
      if (options_.normal_noise()) {
        z = torch::randn(w.sizes(), f32.device(w.device()))
                .mul_(torch::scalar_tensor(options_.sigma(), f32));
      } else {
        const auto low = torch::scalar_tensor(-options_.sigma(), f32);
        const auto high = torch::scalar_tensor(options_.sigma(), f32);
        z = low + torch::rand(w.sizes(), f32.device(w.device())) * (high - low);
      }
      at::add_out(
          w, origin(i), detail::masked(z.to(w.dtype()), target().geometry(i)));
    }
  }

  double weight() const override {
    return options_.weight();
  }
  torch::Tensor penalty(
      const torch::Tensor& adv, const torch::Tensor& clean) const override {
    TORCH_CHECK(
        !detail::is_regression(clean),
        "R3F: the model's output has shape ",
        clean.sizes(),
        "; R3F compares class distributions, so it needs logits [B, C] with "
        "C >= 2 (fairseq adds no R3F term to regression targets)");
    return symmetric_kl(clean, adv);
  }
  bool detached_perturbed_passes() const override {
    return true;
  }
};

} // namespace advtrain
