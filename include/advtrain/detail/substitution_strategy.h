// The base of the strategies that replace each token's embedding by a
// combination of its candidates' (ASCC, DNE): the `PerturbedEmbedding` and
// its `SubstitutionTable`, the lookups of a step and their candidates, the
// passes with a substitution set, and the random replay's jumps.
#pragma once

#include <advtrain/perturbed_embedding.h>
#include <advtrain/step.h>
#include <advtrain/strategy.h>
#include <advtrain/substitutions.h>

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// A strategy with options `Options` on a `PerturbedEmbedding`'s lookups and
/// the candidates of a `SubstitutionTable` (one row per id of the
/// embedding's vocabulary). A step's first pass gathers each lookup's
/// candidates (`first_lookup`); its later passes find them again, in the
/// same order (`same_lookup`).
template <typename Options>
class SubstitutionStrategy : public Strategy<Options> {
 public:
  SubstitutionStrategy(
      const PerturbedEmbedding& embedding,
      SubstitutionTable table,
      Options options)
      : Strategy<Options>(embedding, std::move(options)),
        slot_(embedding->perturbation()),
        table_(std::move(table)) {
    TORCH_CHECK(
        table_.vocabulary_size() == embedding->options.num_embeddings(),
        Options::kind,
        ": the substitution table has ",
        table_.vocabulary_size(),
        " ids, the embedding ",
        embedding->options.num_embeddings(),
        "; build the table from the embedding's vocabulary");
  }

  const SubstitutionTable& table() const noexcept {
    return table_;
  }

 protected:
  /// Sets the slot's substitution until the scope ends (no pass outlives
  /// the step with one).
  class Substituting {
   public:
    Substituting(Perturbation& slot, Perturbation::Substitution s)
        : slot_(slot) {
      slot_.set_substitution(std::move(s));
    }
    ~Substituting() {
      slot_.set_substitution(nullptr);
    }
    Substituting(const Substituting&) = delete;
    Substituting& operator=(const Substituting&) = delete;

   private:
    Perturbation& slot_;
  };

  /// `forward()` with the substitution `s` in place of the lookups.
  torch::Tensor substituted(
      const std::function<torch::Tensor()>& forward,
      Perturbation::Substitution s) {
    Substituting scope(*slot_, std::move(s));
    next_ = 0;
    return forward();
  }

  /// One pass of the step with the substitution `s`.
  torch::Tensor pass(StepContext& ctx, Perturbation::Substitution s) {
    ++ctx.passes;
    return substituted([&ctx] { return ctx.run_forward(); }, std::move(s));
  }

  /// In a step's first pass: a new lookup of `ids` ([B, L]), its candidates
  /// gathered; returns its index.
  size_t first_lookup(const torch::Tensor& ids) {
    TORCH_CHECK(
        ids.dim() == 2 && ids.numel() > 0,
        Options::kind,
        ": needs a non-empty batch of sequences ([B, L] ids), got ids of "
        "shape ",
        ids.sizes());
    if (table_.ids().device() != ids.device()) {
      table_ = table_.to(ids.device());
    }
    candidates_.push_back(table_.gather_unchecked(ids));
    return next_++;
  }

  /// In a later pass: the index of the lookup of `ids`, which must be the
  /// first pass's lookup at the same place.
  size_t same_lookup(const torch::Tensor& ids) {
    TORCH_CHECK(
        next_ < candidates_.size() &&
            candidates_[next_].ids.sizes().slice(0, ids.dim()) == ids.sizes(),
        Options::kind,
        ": the passes of a step must look up the same batches in the same "
        "order (lookup ",
        next_,
        " differs from the first pass's)");
    return next_++;
  }

  /// Checks the first pass of a step: it looked up through the slot, and its
  /// output is logits [B, C].
  void check_first_pass(const torch::Tensor& out) const {
    TORCH_CHECK(
        !candidates_.empty(),
        Options::kind,
        ": the forward did not look its ids up in the PerturbedEmbedding ",
        Options::kind,
        " was built on");
    TORCH_CHECK(
        out.dim() == 2 && out.size(1) >= 2,
        Options::kind,
        ": the model's output must be logits [B, C] with C >= 2 classes, "
        "got shape ",
        out.sizes());
  }

  /// At the end of each lookup: with shared dropout masks, later passes
  /// jump over the numbers a lookup of the first pass drew (`drew`), as over
  /// a random start (no number used twice).
  static void after_lookup(StepContext& ctx, bool drew) {
    if (ctx.replay) {
      if (drew) {
        ctx.replay->start_drawn();
      }
      ctx.replay->at_lookup();
    }
  }

  std::shared_ptr<Perturbation> slot_;
  SubstitutionTable table_;
  /// The candidates of each lookup of the running step, in call order.
  std::vector<Candidates> candidates_;

 private:
  size_t next_ = 0; // the next lookup's index in the pass
};

} // namespace detail
} // namespace advtrain
