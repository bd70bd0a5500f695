// FreeLB: K ascent passes whose parameter gradients average into one step;
// `FreeLB` (L2) and `FreeLBLInf` (the official L∞ rule).
#pragma once

#include <advtrain/pgd.h>
#include <advtrain/strategy.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of FreeLB (Zhu et al., ICLR 2020).
struct FreeLBOptions {
  static constexpr const char* kind = "FreeLB";
  static constexpr Traits traits = Traits().moves_gradient_rows(true);
  /// Ascent step α: `δ ← δ + α * g / ‖g‖` (L2; `FreeLBLInf`: over ‖g‖∞).
  TORCH_ARG(double, alpha) = 0.1;
  /// Passes K per batch, with an ascent step between two passes.
  TORCH_ARG(int64_t, steps) = 3;
  /// Bound: ‖δ‖ ≤ ε after each ascent step; 0 leaves δ unbounded.
  TORCH_ARG(double, epsilon) = 0.0;
  /// Magnitude of the random start on per-example targets: L2,
  /// `U(-1, 1) * mask * init_mag / sqrt(L_i * H)`; L∞,
  /// `U(-init_mag, init_mag) * mask`. The weight table starts from δ = 0, so
  /// it must be 0 there.
  TORCH_ARG(double, init_mag) = 0.0;
  /// Whether the K passes draw the same dropout masks (the FreeLB paper finds
  /// fresh masks hurt).
  TORCH_ARG(bool, share_dropout_mask) = true;
};

/// FreeLB++ (Li, Song, Zhou, Qiu, Huang: "Searching for an Effective
/// Defender: Benchmarking Defense against Adversarial Word Substitution",
/// EMNLP 2021): FreeLB per example with many more ascent steps and no bound,
/// the setting that paper found robust to word substitution. Values from its
/// code, RockyLzy/TextDefender `trainer/freelb.py` (`add_args`): step
/// `--adv-learning-rate` 0.03, random start `--adv-init-mag` 0.05,
/// `--adv-max-norm` 0 (unbounded), L2; 30 passes, the `--adv-steps 30` with
/// which FreeLB++ models are trained (its default of 5 is plain FreeLB's).
/// TextDefender's loop (K passes of `loss / K`, an ascent step after each
/// but the last, the random start `U(-1, 1)·mask·init_mag/√(Lᵢ·H)`) is
/// `FreeLB`'s. Per example only (`init_mag` > 0).
///
///   advtrain::FreeLB freelbpp(model->embedding, advtrain::freelb_plus_plus());
inline FreeLBOptions freelb_plus_plus() {
  return FreeLBOptions().alpha(0.03).steps(30).epsilon(0.0).init_mag(0.05);
}

/// Refuses invalid options; a weight table starts from δ = 0, so `init_mag`
/// must be 0 there.
inline void check_options(const FreeLBOptions& o, const Attacker& attacker) {
  const char* kind = FreeLBOptions::kind;
  check_option(o.alpha() >= 0, kind, "alpha", o.alpha(), ">= 0");
  check_option(o.steps() >= 1, kind, "steps", o.steps(), ">= 1");
  check_option(
      o.epsilon() >= 0,
      kind,
      "epsilon",
      o.epsilon(),
      ">= 0; 0 means unbounded");
  check_option(
      o.init_mag() >= 0 &&
          (attacker.target().random_start() || o.init_mag() == 0),
      kind,
      "init_mag",
      o.init_mag(),
      attacker.target().random_start()
          ? ">= 0"
          : "0 on a weight table, which starts from delta = 0; init_mag "
            "applies to per-example targets");
}

/// FreeLB under the norm policy `Norm`: `FreeLB` (`L2`) and `FreeLBLInf`
/// (`LInfScaled`, the official L∞ rule), the aliases below.
///
/// Paper: Zhu, Cheng, Gan, Sun, Goldstein and Liu, "FreeLB: Enhanced
/// Adversarial Training for Natural Language Understanding", ICLR 2020.
///
/// Rule: K passes at `W + δ_t`, each backward of `loss / K`, so the
/// parameters get the mean of the K gradients (a K times larger virtual
/// batch). Between passes, δ ascends along the gradient g of that pass alone,
/// `δ ← δ + α·g/‖g‖` (`FreeLBLInf`: `α·g/max(‖g‖∞, 1e-8)`), and is projected
/// back into the ε-ball when ε > 0 (`FreeLBLInf`: clamped to [−ε, ε]). On the
/// table norms are over the whole table and δ starts at 0; on a
/// `PerturbedEmbedding`, per example (denominators clamped at 1e-8), with an
/// optional random start, not projected: L2 `U(−1, 1)·mask·init_mag/√(Lᵢ·H)`,
/// L∞ `U(−init_mag, init_mag)·mask`.
///
/// Options (`FreeLBOptions`, each field documented there): `alpha` α = 0.1,
/// `steps` K = 3, `epsilon` ε = 0 (unbounded), `init_mag` = 0 (no random
/// start; must be 0 on a table), `share_dropout_mask` = true (the paper finds
/// fresh masks hurt).
///
/// One `Trainer::step` (K passes, one optimizer step): for t = 1..K, a pass
/// of `loss / K`, then (t < K) an ascent step; restore; step. The random
/// start is drawn before the first pass's dropout masks, and with
/// `share_dropout_mask` every pass draws the first pass's masks.
/// `StepResult`: `loss` is the first pass's (at the random start, if any),
/// `adv_loss` the K-th's.
///
/// Official code: zhuchen03/FreeLB
/// `huggingface-transformers/examples/run_glue_freelb.py` (`train`).
/// Differences: the gradient is masked before the per-example norm and step
/// (it matters only if padded positions get a gradient); the HF code reuses
/// some dropouts' masks across passes and draws fresh ones for others, the
/// library all or none; norms of float64 tensors stay float64; gradient
/// clipping, AdamW and the schedule are the user's optimizer's business. The
/// authors' fairseq FreeLB (`freelb_train_step`) runs K + 1 passes of
/// `loss/(1 + K)` with shared masks for `--adv-steps K`: `steps(K + 1)`.
///
/// Example:
///   advtrain::FreeLB freelb(model->embedding,  // a PerturbedEmbedding
///                           advtrain::FreeLBOptions().steps(3));
///   advtrain::Trainer trainer(optimizer, freelb);
///   trainer.step([&] { return model->forward(ids); }, loss_fn);
template <typename Norm>
class BasicFreeLB : public detail::ProjectedAscent<Norm, FreeLBOptions> {
  using Base = detail::ProjectedAscent<Norm, FreeLBOptions>;

 public:
  using Base::Base;

 protected:
  /// For t = 1..K: pass at W + δ with `loss / K`; if t < K, ascend along the
  /// targets' gradient of this pass alone (the sum of the earlier passes is
  /// set aside during the pass and added back after the ascent). Restore,
  /// step.
  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    const int64_t k = this->options_.steps();
    const double scale = 1.0 / static_cast<double>(k);
    const size_t n = this->targets().size();
    for (int64_t t = 1; t <= k; ++t) {
      std::vector<torch::Tensor> earlier(n);
      if (t < k) {
        for (size_t i = 0; i < n; ++i) {
          earlier[i] = std::move(this->targets()[i].mutable_grad());
          this->targets()[i].mutable_grad() = torch::Tensor();
        }
      }
      const torch::Tensor loss = ctx.pass(scale);
      if (t == 1) {
        r.loss = loss;
        r.start_norm = this->target().norm();
        r.perturbation_norm = r.start_norm;
      }
      r.adv_loss = loss;
      if (t < k) {
        this->attack();
        r.perturbation_norm = this->last_perturbation_norm();
        for (size_t i = 0; i < n; ++i) {
          torch::Tensor& grad = this->targets()[i].mutable_grad();
          grad = this->target().merge_gradient(
              i, std::move(earlier[i]), std::move(grad));
        }
      }
    }
    this->restore();
    ctx.step_optimizer();
  }

  /// Per example, `Norm`'s random start of magnitude init_mag.
  void on_new_step() override {
    if (this->options_.init_mag() <= 0) {
      return; // (a weight table has no random start: check_options)
    }
    const double mag = this->options_.init_mag();
    this->target().set_start(
        [mag](size_t /*i*/, torch::Tensor& d, const torch::Tensor& m) {
          Norm::random_start(d, m, mag);
        },
        /*random=*/true);
  }
};

/// FreeLB with L2 steps `α * g / ‖g‖` and L2 projection (`BasicFreeLB`
/// above).
using FreeLB = BasicFreeLB<L2>;
/// The official L∞ FreeLB: steps `α * g / ‖g‖∞` (per example on embedding
/// outputs), element-wise clamp to [-ε, ε] when ε > 0, random start
/// `U(-init_mag, init_mag) * mask`. (`BasicFreeLB<LInf>` steps along sign(g).)
using FreeLBLInf = BasicFreeLB<LInfScaled>;

} // namespace advtrain
