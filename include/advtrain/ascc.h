// ASCC: adversarial training in the convex hull of each word's substitutes
// (a `SubstitutionTable`), the weights of the combination found by a few
// Adam steps, per example on a `PerturbedEmbedding`.
#pragma once

#include <advtrain/detail/substitution_strategy.h>
#include <advtrain/perturbed_embedding.h>
#include <advtrain/strategy.h>
#include <advtrain/substitutions.h>

#include <torch/torch.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of ASCC (Dong et al., ICLR 2021); the defaults are the official
/// IMDB run's (`opts.py` with `train_imdb.sh`'s `--weight_clean 1
/// --weight_kl 4`).
struct ASCCOptions {
  static constexpr const char* kind = "ASCC";
  static constexpr Traits traits = Traits().searches(false);
  /// Adam steps K of the search for the combination weights
  /// (`train_attack_iters`).
  TORCH_ARG(int64_t, steps) = 10;
  /// The search's Adam learning rate (`w_optm_lr`).
  TORCH_ARG(double, search_lr) = 10.0;
  /// The search's Adam weight decay (L2 added to the gradient, as
  /// `torch.optim.Adam`).
  TORCH_ARG(double, search_weight_decay) = 2e-5;
  /// Weight of the combination's entropy, which the search minimizes while
  /// it maximizes the divergence (`train_attack_sparse_weight`).
  TORCH_ARG(double, entropy_weight) = 15.0;
  /// Weight of the clean task loss (`weight_clean`).
  TORCH_ARG(double, clean_weight) = 1.0;
  /// Weight of the task loss at the combination (`weight_adv`).
  TORCH_ARG(double, adv_weight) = 0.0;
  /// Weight of `KL(p_clean ‖ p_adv)`, a batch mean (`weight_kl`).
  TORCH_ARG(double, kl_weight) = 4.0;
  /// Whether the step's passes draw the same dropout masks (later passes
  /// jump over the draws of w).
  TORCH_ARG(bool, share_dropout_mask) = false;
};

inline void check_options(const ASCCOptions& o, const Attacker& /*attacker*/) {
  const char* kind = ASCCOptions::kind;
  check_option(o.steps() >= 0, kind, "steps", o.steps(), ">= 0");
  check_option(o.search_lr() > 0, kind, "search_lr", o.search_lr(), "> 0");
  check_option(
      o.search_weight_decay() >= 0,
      kind,
      "search_weight_decay",
      o.search_weight_decay(),
      ">= 0");
  check_option(
      o.entropy_weight() >= 0,
      kind,
      "entropy_weight",
      o.entropy_weight(),
      ">= 0");
  check_option(
      o.clean_weight() >= 0, kind, "clean_weight", o.clean_weight(), ">= 0");
  check_option(o.adv_weight() >= 0, kind, "adv_weight", o.adv_weight(), ">= 0");
  check_option(o.kl_weight() >= 0, kind, "kl_weight", o.kl_weight(), ">= 0");
  check_option(
      o.adv_weight() + o.kl_weight() > 0,
      kind,
      "adv_weight + kl_weight",
      o.adv_weight() + o.kl_weight(),
      "> 0: some weight on the combination");
}

/// ASCC, Adversarial Sparse Convex Combination: each token is replaced by a
/// convex combination of the embeddings of its candidates (itself and its
/// substitutes), the combination that most changes the model's output.
///
/// Paper: Dong, Luu, Ji and Liu, "Towards Robustness Against Natural
/// Language Word Substitutions", ICLR 2021.
///
/// Rule: weights `w [B, L, S, 1]` drawn Kaiming-normal (fan-in L·S, gain
/// √2), masked to `ww = w·valid − 500·(1 − valid)`, `p = softmax(ww)` over
/// the S candidates, the token's embedding `Σₛ pₛ·E[cₛ]`. K Adam steps on w
/// (learning rate `search_lr`, weight decay `search_weight_decay`) minimize
/// `−KL_sum(p_clean ‖ p_adv) + entropy_weight · mean(H(p))`, the candidates'
/// embeddings detached and `p_clean` from a pass without grad; then with p
/// fixed (detached) and the candidates' embeddings reaching the table, the
/// loss is `kl_weight · KL(p_clean ‖ p_adv) / B + adv_weight · task(adv) +
/// clean_weight · task(clean)`, gradients through both outputs.
///
/// Options (`ASCCOptions`, each field documented there; the official IMDB
/// run's): `steps` K = 10, `search_lr` = 10, `search_weight_decay` = 2e-5,
/// `entropy_weight` = 15, `clean_weight` = 1, `adv_weight` = 0, `kl_weight`
/// = 4, `share_dropout_mask` = false.
///
/// One `Trainer::step` (K + 3 forwards, one backward, one optimizer step): w
/// drawn at its lookup in the search's clean pass (without grad), then K
/// passes at the combination, each with an Adam step on w; the clean pass;
/// the pass at the final combination; the backward. Each lookup of a pass
/// (a sentence pair's two) has its own w, and their entropy terms add up;
/// with shared dropout masks, later passes jump over the draws of w.
/// Classification outputs (logits `[B, C]`). There is no own-loop `attack()`:
/// the search moves w, not the target along its gradient.
///
/// Official code: dongxinshuai/ASCC `models/BaseModelAdv.py`
/// (`get_adv_by_convex_syn`, `text_syn_p_to_logit`) and `train_imdb_ascc.py`
/// (the loss). Differences: a token's candidates list the token first (the
/// official code lists it last: the draws of w fall on other candidates,
/// alike in distribution); an invalid candidate repeats the token (the
/// official one is id 0; either gets weight e⁻⁵⁰⁰); the combination is of
/// the lookup's output, before any layer the model applies next (the
/// official code combines after its linear 300→100, which is the same since
/// the weights sum to 1); the search runs in the model's mode (as the
/// official BiLSTM; the official CNN searches in `eval()`); the search takes
/// gradients of w alone (the official backward also fills the model's
/// gradients, which it then zeroes).
///
/// Example:
///   advtrain::SubstitutionTable table(vocabulary, neighbours, 9);
///   advtrain::ASCC ascc(model->embedding, table);
///   advtrain::Trainer trainer(optimizer, ascc);
///   trainer.step([&] { return model->forward(ids); }, loss_fn);
class ASCC : public detail::SubstitutionStrategy<ASCCOptions> {
 public:
  /// ASCC on `embedding`'s lookups, with the candidates of `table` (one row
  /// per id of the embedding's vocabulary).
  ASCC(
      const PerturbedEmbedding& embedding,
      SubstitutionTable table,
      ASCCOptions options = {})
      : SubstitutionStrategy(embedding, std::move(table), std::move(options)) {}

 protected:
  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    candidates_.clear();
    // Each lookup's validity [B, L, S, 1] and weights w, drawn at the
    // lookup, then their combination p.
    std::vector<torch::Tensor> valid, weights, p;
    const auto masked = [](const torch::Tensor& w, const torch::Tensor& v) {
      return w * v + (v - 1) * 500.0;
    };

    // The search's clean output, without grad; each lookup draws its w.
    torch::Tensor clean_search;
    {
      torch::NoGradGuard no_grad;
      clean_search =
          pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
            const size_t i = first_lookup(ids);
            const torch::Tensor e = lookup(ids);
            // (16-bit tables: the weights and their softmax in float32.)
            const auto dtype = detail::norm_dtype(e);
            valid.push_back(candidates_[i].mask.unsqueeze(-1).to(dtype));
            weights.push_back(
                torch::empty(valid[i].sizes(), e.options().dtype(dtype)));
            torch::nn::init::kaiming_normal_(weights[i]);
            after_lookup(ctx, /*drew=*/true);
            return e;
          });
    }
    check_first_pass(clean_search);
    const torch::Tensor p_clean = torch::softmax(clean_search.detach(), 1);
    for (auto& w : weights) {
      w.requires_grad_(true);
    }
    // Each lookup's candidates' embeddings, detached, for the search.
    std::vector<torch::Tensor> searched;
    torch::optim::Adam adam(
        weights,
        torch::optim::AdamOptions(options_.search_lr())
            .weight_decay(options_.search_weight_decay()));
    for (int64_t k = 0; k < options_.steps(); ++k) {
      const torch::Tensor out =
          pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
            const size_t i = same_lookup(ids);
            if (i == searched.size()) { // looked up once: the table is fixed
              searched.push_back(lookup(candidates_[i].ids).detach());
            }
            const torch::Tensor& e = searched[i];
            after_lookup(ctx, /*drew=*/false);
            return (torch::softmax(masked(weights[i], valid[i]), -2) *
                    e.to(weights[i].scalar_type()))
                .sum(-2)
                .to(e.scalar_type());
          });
      torch::Tensor entropy;
      for (size_t i = 0; i < weights.size(); ++i) {
        const torch::Tensor ww = masked(weights[i], valid[i]);
        const torch::Tensor h =
            (-torch::softmax(ww, -2) * torch::log_softmax(ww, -2))
                .sum(-2)
                .mean();
        entropy = entropy.defined() ? entropy + h : h;
      }
      const torch::Tensor objective =
          -torch::kl_div(
              torch::log_softmax(out, 1), p_clean, at::Reduction::Sum) +
          entropy * options_.entropy_weight();
      const auto grads = torch::autograd::grad({objective}, weights);
      for (size_t i = 0; i < weights.size(); ++i) {
        weights[i].mutable_grad() = grads[i];
      }
      adam.step();
    }
    for (size_t i = 0; i < weights.size(); ++i) {
      p.push_back(torch::softmax(masked(weights[i].detach(), valid[i]), -2));
    }

    // The training passes: clean (the plain lookup), then at the final
    // combination.
    const torch::Tensor clean =
        pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
          same_lookup(ids);
          const torch::Tensor e = lookup(ids);
          after_lookup(ctx, /*drew=*/false);
          return e;
        });
    const torch::Tensor clean_loss = ctx.loss_of(clean);
    std::vector<torch::Tensor> moved; // ‖Σ p·E[c] − E[x]‖ per lookup
    const torch::Tensor adv =
        pass(ctx, [&](const torch::Tensor& ids, const auto& lookup) {
          const size_t i = same_lookup(ids);
          const torch::Tensor e = lookup(candidates_[i].ids);
          const torch::Tensor mix =
              (p[i] * e.to(p[i].scalar_type())).sum(-2).to(e.scalar_type());
          moved.push_back(detail::l2_norm((mix - lookup(ids)).detach()));
          after_lookup(ctx, /*drew=*/false);
          return mix;
        });
    const torch::Tensor adv_loss = ctx.loss_fn(adv);
    // (1 / B) · KL_sum, as the official loss multiplies it.
    const torch::Tensor kl = torch::kl_div(
                                 torch::log_softmax(adv, 1),
                                 torch::softmax(clean, 1),
                                 at::Reduction::Sum) *
                             (1.0 / static_cast<double>(adv.size(0)));
    ctx.note_finite(kl);
    torch::Tensor loss = kl * options_.kl_weight();
    if (options_.adv_weight() != 0) {
      ctx.note_finite(adv_loss);
      loss = loss + adv_loss * options_.adv_weight();
    }
    loss = loss + clean_loss * options_.clean_weight();
    r.loss = clean_loss.detach();
    r.adv_loss = adv_loss.detach();
    r.regularizer = kl.detach();
    r.perturbation_norm = detail::combined_norm(moved);
    loss.backward();
    ctx.step_optimizer();
  }
};

} // namespace advtrain
