#pragma once

// The list of strategies the general tests loop over (as LibTorch's
// optimizer tests loop over optimizers): one entry per strategy, with a
// factory per target it supports. A new strategy is one entry here; the
// restore, exception, shared-mask (table and per example), bfloat16,
// before-optimizer-step hook, save/load and CUDA tests then cover it.

#include "common.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>
#include "catch.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace fixture {

/// One strategy, with small options the general tests can run quickly.
struct StrategyCase {
  using OnTable = std::function<std::unique_ptr<advtrain::Attacker>(
      const advtrain::NamedParameters& module,
      const std::string& name,
      bool share_dropout_mask)>;
  using PerExample = std::function<std::unique_ptr<advtrain::Attacker>(
      const advtrain::PerturbedEmbedding& embedding, bool share_dropout_mask)>;

  /// What the general tests expect of a strategy beyond its passes, declared
  /// with its entry (flags, or-ed).
  enum Expect : unsigned {
    kNothing = 0,
    /// A step draws random numbers (then CPU and CUDA runs differ).
    kDrawsRandom = 1,
    /// Trains on a sparse table gradient as on the dense one (else refuses
    /// it); its traits must say `accepts_sparse()` exactly then.
    kSparseTable = 2,
    /// Per example (it needs `per_example`), a non-finite task-loss
    /// gradient is counted by its search and skips the optimizer step (the
    /// searches along the task loss's gradient that the reliability test
    /// runs).
    kTaskGradient = 4,
  };

  std::string name;
  /// Forward passes through the whole model per `Trainer::step`.
  int64_t passes = 2;
  /// Optimizer steps per `Trainer::step` (FreeAT: one per replay).
  int64_t optimizer_steps = 1;
  unsigned expect = kNothing;
  /// Whether a step draws random numbers (then CPU and CUDA runs differ).
  bool draws_random() const {
    return (expect & kDrawsRandom) != 0;
  }
  /// Whether it trains on a sparse table gradient (else refuses it).
  bool takes_sparse_table() const {
    return (expect & kSparseTable) != 0;
  }
  /// Whether its search follows the task loss's gradient.
  bool follows_task_gradient() const {
    return (expect & kTaskGradient) != 0;
  }
  /// On a weight table (module + parameter name); null: not supported.
  OnTable on_table;
  /// On each example's embedded tokens; null: not supported (YOPO, which
  /// needs the model split at its first layer, has its own tests).
  PerExample per_example;
  /// Whether, per example, the strategy replaces the lookup's output (ASCC's
  /// combination of candidates) rather than adding a δ to it.
  bool substitutes_lookup = false;
};

namespace detail {

/// Both factories of a strategy `A` whose options are built by `options`.
template <typename A, typename Options>
StrategyCase both(
    std::string name,
    int64_t passes,
    int64_t optimizer_steps,
    unsigned expect,
    std::function<Options(bool)> options) {
  StrategyCase c;
  c.name = std::move(name);
  c.passes = passes;
  c.optimizer_steps = optimizer_steps;
  c.expect = expect;
  c.on_table = [options](
                   const advtrain::NamedParameters& module,
                   const std::string& target,
                   bool share) {
    return std::make_unique<A>(module, target, options(share));
  };
  c.per_example = [options](const advtrain::PerturbedEmbedding& e, bool share) {
    return std::make_unique<A>(e, options(share));
  };
  return c;
}

} // namespace detail

/// Every strategy that runs on both targets, with the options the general
/// tests use. SMART's and R3F's noise is 1e-2 so that it is not rounded away
/// in a bfloat16 table (see docs/guide.md).
inline const std::vector<StrategyCase>& strategies() {
  using namespace advtrain;
  using Case = StrategyCase;
  static const std::vector<StrategyCase> list = [] {
    std::vector<StrategyCase> l = {
        detail::both<FGSM, FGSMOptions>(
            "FGSM",
            2,
            1,
            Case::kSparseTable | Case::kTaskGradient,
            [](bool s) { return FGSMOptions().share_dropout_mask(s); }),
        detail::both<FGM, FGMOptions>(
            "FGM",
            2,
            1,
            Case::kSparseTable | Case::kTaskGradient,
            [](bool s) { return FGMOptions().share_dropout_mask(s); }),
        detail::both<PGD, PGDOptions>(
            "PGD",
            3,
            1,
            Case::kSparseTable | Case::kTaskGradient,
            [](bool s) {
              // ε below 2α: the projection binds.
              return PGDOptions().steps(2).epsilon(0.2).share_dropout_mask(s);
            }),
        detail::both<FreeAT, FreeATOptions>(
            "FreeAT",
            3,
            3,
            Case::kTaskGradient,
            [](bool s) {
              return FreeATOptions().replays(3).share_dropout_mask(s);
            }),
        detail::both<FreeLB, FreeLBOptions>(
            "FreeLB",
            3,
            1,
            Case::kSparseTable | Case::kTaskGradient,
            [](bool s) {
              return FreeLBOptions().steps(3).share_dropout_mask(s);
            }),
        detail::both<FreeLBLInf, FreeLBOptions>(
            "FreeLBLInf",
            3,
            1,
            Case::kSparseTable,
            [](bool s) {
              return FreeLBOptions().steps(3).epsilon(0.5).share_dropout_mask(
                  s);
            }),
        detail::both<SMART, SMARTOptions>(
            "SMART", // with the proximal teacher's pass
            5,
            1,
            Case::kDrawsRandom,
            [](bool s) {
              return SMARTOptions()
                  .steps(2)
                  .noise_var(1e-2)
                  .proximal_weight(0.5)
                  .share_dropout_mask(s);
            }),
        detail::both<VAT, VATOptions>(
            "VAT",
            3,
            1,
            Case::kDrawsRandom,
            [](bool s) {
              return VATOptions().epsilon(1.0).share_dropout_mask(s);
            }),
        detail::both<LLR, LLROptions>(
            "LLR",
            3,
            1,
            Case::kDrawsRandom,
            [](bool s) { return LLROptions().share_dropout_mask(s); }),
        detail::both<R3F, R3FOptions>(
            "R3F",
            2,
            1,
            Case::kDrawsRandom,
            [](bool s) {
              return R3FOptions().sigma(1e-2).share_dropout_mask(s);
            }),
    };
    StrategyCase awp; // weights only: no per-example target
    awp.name = "AWP";
    awp.expect = Case::kSparseTable;
    awp.on_table =
        [](const NamedParameters& module, const std::string& target, bool s) {
          return std::make_unique<AWP>(
              module, target, AWPOptions().epsilon(0.05).share_dropout_mask(s));
        };
    l.push_back(std::move(awp));
    // Each id's candidates: itself and the next two ids (padding: itself),
    // the last of the second order.
    const auto candidates = [](const PerturbedEmbedding& e) {
      const int64_t v = e->options.num_embeddings();
      const auto i = torch::arange(v).unsqueeze(1);
      const auto ids = (i + torch::arange(3)).remainder(v);
      auto mask = torch::ones({v, 3}, torch::kBool);
      mask[0].slice(0, 1).fill_(false);
      auto first = torch::full({v}, 2, torch::kLong);
      first[0] = 1;
      return SubstitutionTable(ids, mask, first);
    };
    StrategyCase ascc; // per example only: it needs the ids of a lookup
    ascc.name = "ASCC";
    ascc.expect = Case::kDrawsRandom;
    ascc.passes = 5;
    ascc.substitutes_lookup = true;
    ascc.per_example = [candidates](const PerturbedEmbedding& e, bool s) {
      return std::make_unique<ASCC>(
          e,
          candidates(e),
          ASCCOptions().steps(2).search_lr(0.5).share_dropout_mask(s));
    };
    l.push_back(std::move(ascc));
    StrategyCase dne; // per example only, as ASCC
    dne.name = "DNE";
    dne.expect = Case::kDrawsRandom;
    dne.passes = 3;
    dne.substitutes_lookup = true;
    dne.per_example = [candidates](const PerturbedEmbedding& e, bool s) {
      return std::make_unique<DNE>(
          e,
          candidates(e),
          DNEOptions().steps(2).step_size(1.0).share_dropout_mask(s));
    };
    l.push_back(std::move(dne));
    return l;
  }();
  return list;
}

/// The masks of two steps of `per_step` passes each: with `share`, every
/// pass of a step drew its first pass's mask; without, each drew its own;
/// and the two steps' masks differ.
inline void check_masks_per_step(
    const std::vector<torch::Tensor>& masks, size_t per_step, bool share) {
  REQUIRE(masks.size() == 2 * per_step);
  for (size_t step = 0; step < 2; ++step) {
    for (size_t j = 1; j < per_step; ++j) {
      CHECK(
          bit_equal(masks[step * per_step + j], masks[step * per_step]) ==
          share);
    }
  }
  CHECK_FALSE(bit_equal(masks[0], masks[per_step]));
}

} // namespace fixture
