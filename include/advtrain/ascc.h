// ASCC: adversarial training in the convex hull of each word's substitutes
// (a `SubstitutionTable`), the weights of the combination found by a few
// Adam steps, per example on a `PerturbedEmbedding`.
#pragma once

#include <advtrain/perturbed_embedding.h>
#include <advtrain/strategy.h>
#include <advtrain/substitutions.h>

#include <torch/torch.h>

#include <cstdint>
#include <memory>
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

inline void check_options(const ASCCOptions& o, const Attacker& /*target*/) {
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
class ASCC : public Strategy<ASCCOptions> {
 public:
  /// ASCC on `embedding`'s lookups, with the candidates of `table` (one row
  /// per id of the embedding's vocabulary).
  ASCC(
      const PerturbedEmbedding& embedding,
      SubstitutionTable table,
      ASCCOptions options = {})
      : Strategy(embedding, std::move(options)),
        slot_(embedding->perturbation()),
        table_(std::move(table)) {
    TORCH_CHECK(
        table_.vocabulary_size() == embedding->options.num_embeddings(),
        "ASCC: the substitution table has ",
        table_.vocabulary_size(),
        " ids, the embedding ",
        embedding->options.num_embeddings(),
        "; build the table from the embedding's vocabulary");
  }

  const SubstitutionTable& table() const noexcept {
    return table_;
  }

 protected:
  void run_step(StepContext& ctx) override {
    StepFigures& r = ctx.figures;
    // Each lookup of a pass (a sentence pair has two), in call order: its
    // candidates and their weights w [B, L, S, 1], drawn at the lookup.
    struct Lookup {
      Candidates cands;
      torch::Tensor valid, w, p;
    };
    std::vector<Lookup> lookups;
    size_t next = 0; // the next lookup's index in the pass
    const auto forward = [&ctx, &next] {
      next = 0;
      ++ctx.passes;
      return ctx.run_forward();
    };
    // With shared masks, later passes jump over the draws of w at the same
    // lookup, as over a random start (no number used twice).
    const auto at_lookup = [&ctx](bool drew) {
      if (ctx.replay) {
        if (drew) {
          ctx.replay->start_drawn();
        }
        ctx.replay->at_lookup();
      }
    };
    const auto masked = [](const torch::Tensor& w, const torch::Tensor& v) {
      return w * v + (v - 1) * 500.0;
    };
    const auto looked_up = [&](const torch::Tensor& ids) -> Lookup& {
      TORCH_CHECK(
          next < lookups.size() && lookups[next].cands.ids.sizes().slice(
                                       0, ids.dim()) == ids.sizes(),
          "ASCC: the passes of a step must look up the same batches in the "
          "same order (lookup ",
          next,
          " differs from the first pass's)");
      return lookups[next++];
    };
    struct Unset { // no pass outlives the step with a substitution
      Perturbation& slot;
      ~Unset() {
        slot.set_substitution(nullptr);
      }
    } unset{*slot_};

    // The search's clean output, without grad; each lookup draws its w.
    torch::Tensor clean_search;
    {
      torch::NoGradGuard no_grad;
      slot_->set_substitution([&](const torch::Tensor& ids,
                                  const Perturbation::LookupFunction& lookup) {
        TORCH_CHECK(
            ids.dim() == 2 && ids.numel() > 0,
            "ASCC: needs a non-empty batch of sequences ([B, L] ids), got "
            "ids of shape ",
            ids.sizes());
        Lookup& l = lookups.emplace_back();
        l.cands = gather(ids);
        const torch::Tensor e = lookup(ids);
        // (16-bit tables: the weights and their softmax in float32.)
        const auto dtype = detail::norm_dtype(e);
        l.valid = l.cands.mask.unsqueeze(-1).to(dtype);
        l.w = torch::empty(l.valid.sizes(), e.options().dtype(dtype));
        torch::nn::init::kaiming_normal_(l.w);
        at_lookup(/*drew=*/true);
        return e;
      });
      clean_search = forward();
    }
    TORCH_CHECK(
        !lookups.empty(),
        "ASCC: the forward did not look its ids up in the PerturbedEmbedding "
        "ASCC was built on");
    TORCH_CHECK(
        clean_search.dim() == 2 && clean_search.size(1) >= 2,
        "ASCC: the model's output must be logits [B, C] with C >= 2 "
        "classes, got shape ",
        clean_search.sizes());
    const torch::Tensor p_clean = torch::softmax(clean_search.detach(), 1);
    std::vector<torch::Tensor> weights;
    for (auto& l : lookups) {
      weights.push_back(l.w.requires_grad_(true));
    }
    torch::optim::Adam adam(
        weights,
        torch::optim::AdamOptions(options_.search_lr())
            .weight_decay(options_.search_weight_decay()));
    slot_->set_substitution([&](const torch::Tensor& ids,
                                const Perturbation::LookupFunction& lookup) {
      const Lookup& l = looked_up(ids);
      const torch::Tensor e = lookup(l.cands.ids).detach();
      at_lookup(/*drew=*/false);
      return (torch::softmax(masked(l.w, l.valid), -2) * e.to(l.w.dtype()))
          .sum(-2)
          .to(e.scalar_type());
    });
    for (int64_t k = 0; k < options_.steps(); ++k) {
      const torch::Tensor out = forward();
      torch::Tensor entropy;
      for (const auto& l : lookups) {
        const torch::Tensor ww = masked(l.w, l.valid);
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
    for (auto& l : lookups) {
      l.p = torch::softmax(masked(l.w.detach(), l.valid), -2);
    }

    // The training passes: clean (the plain lookup), then at the final
    // combination.
    slot_->set_substitution([&](const torch::Tensor& ids,
                                const Perturbation::LookupFunction& lookup) {
      const torch::Tensor e = lookup(ids);
      at_lookup(/*drew=*/false);
      return e;
    });
    const torch::Tensor clean = forward();
    const torch::Tensor clean_loss = ctx.loss_of(clean);
    std::vector<torch::Tensor> moved; // ‖Σ p·E[c] − E[x]‖ per lookup
    slot_->set_substitution([&](const torch::Tensor& ids,
                                const Perturbation::LookupFunction& lookup) {
      const Lookup& l = looked_up(ids);
      const torch::Tensor e = lookup(l.cands.ids);
      const torch::Tensor mix =
          (l.p * e.to(l.p.dtype())).sum(-2).to(e.scalar_type());
      moved.push_back(detail::l2_norm((mix - lookup(ids)).detach()));
      at_lookup(/*drew=*/false);
      return mix;
    });
    const torch::Tensor adv = forward();
    slot_->set_substitution(nullptr);
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

 private:
  /// The candidates of a batch of ids, on their device.
  Candidates gather(const torch::Tensor& ids) {
    if (table_.ids().device() != ids.device()) {
      table_ = table_.to(ids.device());
    }
    const torch::Tensor flat = ids.reshape({-1}).to(torch::kLong);
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(table_.max_candidates());
    return {
        table_.ids().index_select(0, flat).reshape(shape),
        table_.mask().index_select(0, flat).reshape(shape)};
  }

  std::shared_ptr<Perturbation> slot_;
  SubstitutionTable table_;
};

} // namespace advtrain
