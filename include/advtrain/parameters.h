// Choosing what to perturb: the named parameters of a LibTorch or
// TorchScript module, `select_parameters` by a substring of their names (the
// Python `emb_name`), and the optimizer's parameters.
#pragma once

#include <fmt/format.h>
#include <torch/torch.h>

#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace advtrain {

/// The named parameters of a LibTorch module or of a TorchScript module (a
/// model scripted in Python and loaded with `torch::jit::load`): what the
/// attackers' "module + name" constructors and `select_parameters` read.
/// Converts implicitly from either.
class NamedParameters {
 public:
  NamedParameters(const torch::nn::Module& module) { // NOLINT: implicit
    for (const auto& item : module.named_parameters(/*recurse=*/true)) {
      items_.emplace_back(item.key(), item.value());
    }
  }
  NamedParameters(const torch::jit::Module& module) { // NOLINT: implicit
    for (const auto& item : module.named_parameters(/*recurse=*/true)) {
      items_.emplace_back(item.name, item.value);
    }
  }
  const std::vector<std::pair<std::string, torch::Tensor>>& items()
      const noexcept {
    return items_;
  }
  /// Those that require grad (a frozen layer is no target).
  NamedParameters trainable() const {
    NamedParameters out;
    for (const auto& item : items_) {
      if (item.second.requires_grad()) {
        out.items_.push_back(item);
      }
    }
    return out;
  }
  /// Every parameter, in order.
  std::vector<torch::Tensor> tensors() const {
    std::vector<torch::Tensor> out;
    for (const auto& item : items_) {
      out.push_back(item.second);
    }
    return out;
  }

 private:
  NamedParameters() = default;
  std::vector<std::pair<std::string, torch::Tensor>> items_;
};

namespace detail {

/// Names and tensors of the parameters of `module` that contain `pattern`.
inline std::pair<std::vector<std::string>, std::vector<torch::Tensor>>
select_named(const NamedParameters& module, const std::string& pattern) {
  std::vector<std::string> names;
  std::vector<torch::Tensor> tensors;
  std::vector<std::string> all;
  for (const auto& item : module.items()) {
    all.push_back(item.first);
    if (item.first.find(pattern) == std::string::npos) {
      continue;
    }
    bool tied = false; // the same tensor under a second name: select it once
    for (const auto& t : tensors) {
      tied = tied || t.is_same(item.second);
    }
    if (!tied) {
      names.push_back(item.first);
      tensors.push_back(item.second);
    }
  }
  if (tensors.empty()) {
    throw std::invalid_argument(fmt::format(
        "advtrain: no parameter name contains \"{}\"; available: [{}]",
        pattern,
        fmt::join(all, ", ")));
  }
  return {std::move(names), std::move(tensors)};
}

/// Every tensor of `a`, then those of `b` that are not already in it.
inline std::vector<torch::Tensor> union_of(
    std::vector<torch::Tensor> a, const std::vector<torch::Tensor>& b) {
  std::unordered_set<const void*> seen;
  for (const auto& t : a) {
    seen.insert(t.unsafeGetTensorImpl());
  }
  for (const auto& t : b) {
    if (seen.insert(t.unsafeGetTensorImpl()).second) {
      a.push_back(t);
    }
  }
  return a;
}

/// The parameters of every param group of `optimizer`.
inline std::vector<torch::Tensor> optimizer_parameters(
    const torch::optim::Optimizer& optimizer) {
  std::vector<torch::Tensor> params;
  for (const auto& group : optimizer.param_groups()) {
    params = union_of(std::move(params), group.params());
  }
  return params;
}

} // namespace detail

/// Picks the parameters of `module` whose names contain `name_contains`, like
/// the `emb_name` of the Python implementations. Throws std::invalid_argument,
/// listing the available names, when nothing matches.
inline std::vector<torch::Tensor> select_parameters(
    const NamedParameters& module, const std::string& name_contains) {
  return detail::select_named(module, name_contains).second;
}

} // namespace advtrain
