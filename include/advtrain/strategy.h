// `Strategy<Options>`, the base a strategy derives from: the three ways to
// name its target (tensors, a module and a name, a `PerturbedEmbedding` or a
// perturbation slot), its options validated once, and its traits passed to
// the base they choose (`SearchAttacker` where the strategy searches, else
// `Attacker`); `check_option`, the refusal of an invalid option.
#pragma once

#include <advtrain/activation_target.h>
#include <advtrain/attacker.h>
#include <advtrain/parameter_target.h>
#include <advtrain/parameters.h>
#include <advtrain/perturbed_embedding.h>
#include <advtrain/search.h>

#include <torch/torch.h>

#include <cmath>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace advtrain {

/// Refuses an option of a strategy in its constructor, naming the field:
/// `Kind: Invalid field: value (must be rule)` (what `check_options`
/// overloads call). A floating-point option must also be finite: no option
/// means "unbounded" by infinity (FreeLB's `epsilon(0)` does).
template <typename T>
void check_option(
    bool ok,
    const char* kind,
    const char* field,
    const T& value,
    const char* rule) {
  if constexpr (std::is_floating_point_v<T>) {
    TORCH_CHECK(
        std::isfinite(value),
        kind,
        ": Invalid ",
        field,
        ": ",
        value,
        " (must be finite and ",
        rule,
        ")");
  }
  TORCH_CHECK(
      ok, kind, ": Invalid ", field, ": ", value, " (must be ", rule, ")");
}

namespace detail {
/// The base a strategy with options `Options` derives from: `SearchAttacker`
/// where its traits say it searches, else `Attacker`.
template <typename Options>
using StrategyBase =
    std::conditional_t<Options::traits.searches(), SearchAttacker, Attacker>;
} // namespace detail

/// The base of a strategy with options `Options`: the three ways to name its
/// target — tensors, a module and a substring of parameter names, or a
/// `PerturbedEmbedding` (each example's embedded tokens) — which strategies
/// inherit (`using Strategy::Strategy`), and the options, validated once by
/// `check_options(options, attacker)` (an overload next to each options
/// struct, which names the strategy in `Options::kind`). Its base is
/// `SearchAttacker` where `Options::traits.searches()`, else `Attacker`.
template <typename Options>
class Strategy : public detail::StrategyBase<Options> {
  using Base = detail::StrategyBase<Options>;

 public:
  /// Perturbs `params` (e.g. embedding tables).
  explicit Strategy(std::vector<torch::Tensor> params, Options options = {})
      : Base(
            std::make_unique<ParameterTarget>(std::move(params), Options::kind),
            Options::kind,
            Options::traits,
            options.share_dropout_mask()),
        options_(std::move(options)) {
    check_options(options_, *this);
  }
  /// Perturbs the parameters of `module` whose names contain
  /// `name_contains`; the module's parameters are the ones whose gradients
  /// `backup_grad()`/`restore_grad()` handle.
  Strategy(
      const NamedParameters& module,
      const std::string& name_contains,
      Options options = {})
      : Base(
            std::make_unique<ParameterTarget>(
                module, name_contains, Options::kind),
            Options::kind,
            Options::traits,
            options.share_dropout_mask(),
            &module),
        options_(std::move(options)) {
    check_options(options_, *this);
  }
  /// Perturbs the tensors of a braced list: `FGM({table})`.
  explicit Strategy(
      std::initializer_list<torch::Tensor> params, Options options = {})
      : Strategy(std::vector<torch::Tensor>(params), std::move(options)) {}
  /// Perturbs each example's output of `embedding` (docs/design.md,
  /// "Targets").
  explicit Strategy(const PerturbedEmbedding& embedding, Options options = {})
      : Strategy(embedding->perturbation(), std::move(options)) {}
  /// Perturbs each example's embeddings where the model applies `slot`
  /// (`(*slot)(embeds, mask)`), for a model that takes embeddings
  /// (`inputs_embeds`) rather than owning a `PerturbedEmbedding`.
  explicit Strategy(std::shared_ptr<Perturbation> slot, Options options = {})
      : Base(
            std::make_unique<ActivationTarget>(
                std::vector<std::shared_ptr<Perturbation>>{std::move(slot)},
                Options::kind),
            Options::kind,
            Options::traits,
            options.share_dropout_mask()),
        options_(std::move(options)) {
    check_options(options_, *this);
  }

  const Options& options() const noexcept {
    return options_;
  }

 protected:
  Options options_;
};

} // namespace advtrain
