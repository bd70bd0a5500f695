// DNE: adversarial training in the convex hull of each word's neighbourhood
// (itself, its substitutes and theirs; a `SubstitutionTable::second_order`),
// from a Dirichlet-sampled point up the gradient of the combination's
// logits, per example on a `PerturbedEmbedding`; and its prediction-time
// ensemble.
#pragma once

#include <advtrain/detail/substitution_strategy.h>
#include <advtrain/detail/tensor_math.h>
#include <advtrain/perturbed_embedding.h>
#include <advtrain/strategy.h>
#include <advtrain/substitutions.h>

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of DNE (Zhou et al., ACL 2021); the defaults are the official
/// README's run (`--adv_iter=3 --adv_policy=diy`) with its configuration's
/// `adv_step` 10 and the IMDB CNN configuration's `dir_alpha` 1,
/// `dir_decay` 0.5 (the repository has no single choice of the last two).
struct DNEOptions {
  static constexpr const char* kind = "DNE";
  static constexpr Traits traits = Traits().searches(false);
  /// Dirichlet concentration of a token and its own substitutes
  /// (`dir_alpha`).
  TORCH_ARG(double, alpha) = 1.0;
  /// Factor on `alpha` for the substitutes' substitutes (`dir_decay`; 1: the
  /// same concentration, as the official code takes any decay >= 1).
  TORCH_ARG(double, decay) = 0.5;
  /// Ascent passes on the combination's logits after the clean pass
  /// (`adv_iter`); each adds task loss / steps.
  TORCH_ARG(int64_t, steps) = 3;
  /// Length of each ascent step on the logits, along the gradient
  /// normalized per token (`adv_step`).
  TORCH_ARG(double, step_size) = 10.0;
  /// Whether the step's passes draw the same dropout masks (later passes
  /// jump over the Dirichlet draws).
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const DNEOptions& o, const Attacker& /*attacker*/) {
  const char* kind = DNEOptions::kind;
  check_option(o.alpha() > 0, kind, "alpha", o.alpha(), "> 0");
  check_option(
      o.decay() > 0 && o.decay() <= 1, kind, "decay", o.decay(), "in (0, 1]");
  check_option(o.steps() >= 0, kind, "steps", o.steps(), ">= 0");
  check_option(o.step_size() >= 0, kind, "step_size", o.step_size(), ">= 0");
}

/// DNE, Dirichlet Neighbourhood Ensemble: each token is replaced by a
/// convex combination of the embeddings of its neighbourhood (itself, its
/// substitutes and their substitutes), drawn from a Dirichlet distribution,
/// then moved up the loss along the combination's logits; at prediction,
/// an ensemble over drawn combinations.
///
/// Paper: Zhou, Zheng, Hsieh, Chang and Huang, "Defense against Synonym
/// Substitution-based Adversarial Attacks via Dirichlet Neighborhood
/// Ensemble", ACL 2021.
///
/// Rule: per token, coefficients `c ~ Dir(α)` over its valid candidates (α
/// for the token and its own substitutes, α·decay for the others, 0 for the
/// invalid ones), logits `z₀ = log(c + 1e-6) − max`, the token's embedding
/// `Σₛ softmax(z)ₛ·E[cₛ]`. The clean pass takes the task loss at z₀; pass k
/// = 1..K at `zₖ = z̃ − max(z̃)`, `z̃ = zₖ₋₁ + step_size·g / (‖g‖ + 1e-6)`,
/// g the gradient of pass k − 1's loss with respect to its logits (norm over
/// the S candidates), each with task loss / K. The gradients of the K + 1
/// passes add up (the candidates' embeddings reach the table in each).
///
/// Options (`DNEOptions`, each field documented there): `alpha` = 1, `decay`
/// = 0.5, `steps` K = 3, `step_size` = 10, `share_dropout_mask` = false.
///
/// One `Trainer::step` (K + 1 forwards and backwards, one optimizer step):
/// the Dirichlet draws (float64, one `_standard_gamma` per candidate of each
/// token, invalid ones included and zeroed) at each lookup of the clean
/// pass, then its forward's own draws; the passes up the gradient. Each
/// lookup of a pass has its own combination. With shared dropout masks,
/// later passes jump over the Dirichlet draws. Classification outputs
/// (logits [B, C]). There is no own-loop `attack()`. `predict` gives the
/// ensemble's probabilities, drawn from the first-order hull (the token and
/// its substitutes, α for all) as the official code predicts; the
/// second-order columns take no weight there.
///
/// Official code: dugu9sword/dne `awesome_glue/weighted_embedding.py`
/// (`WeightedEmbedding.forward`), `weighted_util.py` (the Dirichlet
/// sampling, `build_neighbour_matrix`), `allennlpx/training/adv_trainer.py`
/// (`DoItYourselfPolicy`: losses 1, 1/K, …) and
/// `allennlpx/predictors/predictor.py` (the ensemble's weighting).
/// Differences: the Dirichlet points are independent draws (the official
/// code draws 10,000 rows per neighbourhood size once and walks them by a
/// random offset plus the token's index); the neighbourhood lists the token,
/// its substitutes, then theirs, and α·decay falls on exactly the latter
/// (the official list interleaves each substitute with its substitutes and
/// decays by column count, so a few substitutes get α·decay and a few of
/// theirs α); invalid candidates repeat the token (the official ones are id
/// 0, whose embedding an ascent can then move weight to) and the S columns
/// are the table's (the official code cuts a batch's to its largest
/// neighbourhood; the columns beyond hold weight ≈ 1e-6 each); the official
/// trainer also clamps each backward's gradients to ±1 per element (its
/// trainer's setting for every method: hooks on the parameters do it); the
/// ensemble's members run one after the other (the official predictor
/// repeats each text in one batch).
///
/// Example:
///   auto table = advtrain::SubstitutionTable::second_order(
///       vocabulary, neighbours, 64);
///   advtrain::DNE dne(model->embedding, table);
///   advtrain::Trainer trainer(optimizer, dne);
///   trainer.step([&] { return model->forward(ids); }, loss_fn);
///   model->eval();
///   auto probs = dne.predict([&] { return model->forward(ids); }, 16);
class DNE : public detail::SubstitutionStrategy<DNEOptions> {
 public:
  /// DNE on `embedding`'s lookups, with the neighbourhoods of `table` (one
  /// row per id of the embedding's vocabulary; `second_order` builds DNE's).
  DNE(const PerturbedEmbedding& embedding,
      SubstitutionTable table,
      DNEOptions options = {})
      : SubstitutionStrategy(embedding, std::move(table), std::move(options)) {}

  /// The ensemble's class probabilities [B, C] (in the output's dtype) over
  /// `members` forwards, each at a freshly drawn combination of the
  /// first-order hull — the token and its own substitutes, all with
  /// concentration α, as the official code predicts (`nbr_2nd = "21"`: the
  /// second order for training, the first for prediction) — the model in
  /// the mode the caller set (`eval()` for prediction), without grad: each
  /// member's softmax weighted by its confidence `Σ_c (max p − p_c)³`, as the
  /// official predictor (a plain mean where every member is exactly
  /// uniform, which the official code divides by zero).
  torch::Tensor predict(
      const std::function<torch::Tensor()>& forward, int64_t members = 16) {
    TORCH_CHECK(
        members >= 1, "DNE::predict: Invalid members: ", members, " (>= 1)");
    torch::NoGradGuard no_grad;
    torch::Tensor sum, weight_sum, mean;
    auto dtype = torch::kFloat;
    for (int64_t m = 0; m < members; ++m) {
      candidates_.clear();
      const torch::Tensor out = substituted(
          forward, [&](const torch::Tensor& ids, const auto& lookup) {
            const size_t i = first_lookup(ids);
            const torch::Tensor e = lookup(candidates_[i].ids);
            return mix(
                e,
                start_logits(i, detail::norm_dtype(e), /*first_order=*/true));
          });
      check_first_pass(out);
      dtype = out.scalar_type();
      const torch::Tensor probs = torch::softmax(out.to(torch::kDouble), 1);
      const torch::Tensor w =
          (std::get<0>(probs.max(1, true)) - probs).pow(3).sum(1, true);
      sum = sum.defined() ? sum + w * probs : w * probs;
      weight_sum = weight_sum.defined() ? weight_sum + w : w;
      mean = mean.defined() ? mean + probs : probs;
    }
    candidates_.clear();
    return torch::where(
               weight_sum.gt(0),
               sum / weight_sum.clamp_min(1e-300),
               mean / static_cast<double>(members))
        .to(dtype);
  }

 protected:
  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    candidates_.clear();
    logits_.clear();
    std::vector<torch::Tensor> moved; // ‖Σ p·E[c] − E[x]‖ per lookup

    // The clean pass at the drawn points; its loss has weight 1.
    const torch::Tensor clean =
        pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
          const size_t i = first_lookup(ids);
          const torch::Tensor e = lookup(candidates_[i].ids);
          logits_.push_back(
              start_logits(i, detail::norm_dtype(e), /*first_order=*/false)
                  .requires_grad_(true));
          after_lookup(ctx, /*drew=*/true);
          return mix(e, logits_[i]);
        });
    check_first_pass(clean);
    const torch::Tensor clean_loss = ctx.loss_of(clean);
    clean_loss.backward();
    r.loss = clean_loss.detach();

    // K passes up the gradient of the previous pass's logits.
    const double scale = 1.0 / static_cast<double>(options_.steps());
    for (int64_t k = 0; k < options_.steps(); ++k) {
      const bool last = k + 1 == options_.steps();
      const torch::Tensor out =
          pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
            const size_t i = same_lookup(ids);
            torch::Tensor z = logits_[i].detach();
            const torch::Tensor g = logits_[i].grad();
            if (g.defined()) { // (a lookup the loss did not reach: no move)
              z = z + g * options_.step_size() / (g.norm(2, -1, true) + 1e-6);
            }
            logits_[i] =
                (z - std::get<0>(z.max(-1, true))).requires_grad_(true);
            const torch::Tensor e = mix(lookup(candidates_[i].ids), logits_[i]);
            if (last) {
              moved.push_back(detail::l2_norm((e - lookup(ids)).detach()));
            }
            after_lookup(ctx, /*drew=*/false);
            return e;
          });
      const torch::Tensor loss = ctx.loss_of(out);
      (loss * scale).backward();
      if (last) {
        r.adv_loss = loss.detach();
        r.perturbation_norm = detail::combined_norm(moved);
      }
    }
    logits_.clear();
    ctx.step_optimizer();
  }

 private:
  /// Lookup i's starting logits log(c + 1e-6) − max [B, L, S] in `dtype`,
  /// c drawn from its Dirichlet in float64 (gamma draws are at least the
  /// smallest double, so every sum is positive). `first_order`: the
  /// prediction's hull, α everywhere and the second order's logits −∞.
  torch::Tensor start_logits(
      size_t i, torch::ScalarType dtype, bool first_order) const {
    const Candidates& c = candidates_[i];
    const auto options =
        torch::TensorOptions(torch::kDouble).device(c.ids.device());
    const torch::Tensor column =
        torch::arange(c.ids.size(-1), c.first_order.options())
            .expand(c.ids.sizes());
    const torch::Tensor second = column.ge(c.first_order.unsqueeze(-1));
    const torch::Tensor invalid = first_order
                                      ? c.mask.logical_not().logical_or(second)
                                      : c.mask.logical_not();
    const torch::Tensor alpha =
        torch::where(
            second,
            torch::full({}, options_.alpha() * options_.decay(), options),
            torch::full({}, options_.alpha(), options))
            .masked_fill(invalid, 1.0);
    const torch::Tensor gamma =
        at::_standard_gamma(alpha).masked_fill(invalid, 0.0);
    torch::Tensor z = (gamma / gamma.sum(-1, true) + 1e-6).log();
    z = z - std::get<0>(z.max(-1, true));
    if (first_order) {
      z = z.masked_fill(second, -std::numeric_limits<double>::infinity());
    }
    return z.to(dtype);
  }

  /// Σₛ softmax(z)ₛ · E[cₛ]: the candidates' embeddings `e` [B, L, S, H]
  /// combined by the logits z [B, L, S] (16-bit tables: in float32).
  static torch::Tensor mix(const torch::Tensor& e, const torch::Tensor& z) {
    const auto dtype = detail::norm_dtype(e);
    const torch::Tensor p = torch::softmax(z.to(dtype), -1).unsqueeze(-1);
    return (p * e.to(dtype)).sum(-2).to(e.scalar_type());
  }

  /// The logits of each lookup in the running step, leaves with grad.
  std::vector<torch::Tensor> logits_;
};

} // namespace advtrain
