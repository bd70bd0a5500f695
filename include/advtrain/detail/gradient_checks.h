// The checks of a target's gradients before a move: sparse layouts a rule
// cannot take, gradients that do not match their tensor, and no gradient at
// all where the rule needs one.
#pragma once

#include <fmt/format.h>
#include <torch/torch.h>

#include <cstddef>
#include <string>
#include <vector>

namespace advtrain {
namespace detail {

/// Refuses a sparse gradient `g` of the tensor `name` unless `accepted`
/// (and any sparse layout but row-sparse); `kind` names the strategy.
inline void check_sparse(
    const char* kind,
    const std::string& name,
    const torch::Tensor& g,
    bool accepted) {
  if (!g.defined() || !g.is_sparse()) {
    return;
  }
  TORCH_CHECK(
      g.sparse_dim() == 1,
      "advtrain: ",
      kind,
      ": the sparse gradient of ",
      name,
      " has ",
      g.sparse_dim(),
      " sparse dimensions; only row-sparse gradients (one sparse "
      "dimension, as an embedding's) are supported");
  TORCH_CHECK(
      accepted,
      "advtrain: ",
      kind,
      ": the gradient of ",
      name,
      " is sparse (nn::EmbeddingOptions().sparse(true)); ",
      kind,
      " moves the whole tensor, so it needs a dense gradient. Sparse "
      "gradients work with the strategies whose traits accept them "
      "(traits().accepts_sparse(), listed in docs/guide.md); use a dense "
      "embedding here");
}

/// The gradients of `tensors` (named `names`), checked: sparse only where
/// `accepts_sparse`, of the tensor's shape, dtype and device; undefined
/// where a tensor got none, and at least one where `needs_one`.
inline std::vector<torch::Tensor> checked_gradients(
    const std::vector<torch::Tensor>& tensors,
    const std::vector<std::string>& names,
    const char* kind,
    bool accepts_sparse,
    bool needs_one) {
  std::vector<torch::Tensor> grads;
  bool any = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const torch::Tensor& t = tensors[i];
    const torch::Tensor& g = t.grad();
    if (g.defined()) {
      check_sparse(kind, names[i], g, accepts_sparse);
      TORCH_CHECK(
          g.sizes() == t.sizes() && g.scalar_type() == t.scalar_type() &&
              g.device() == t.device(),
          "advtrain: the gradient of ",
          names[i],
          " (",
          g.scalar_type(),
          g.sizes(),
          " on ",
          g.device(),
          ") does not match the tensor (",
          t.scalar_type(),
          t.sizes(),
          " on ",
          t.device(),
          ")");
      any = true;
    }
    grads.push_back(g);
  }
  TORCH_CHECK(
      any || !needs_one,
      "advtrain: attack() found no gradient on [",
      fmt::format("{}", fmt::join(names, ", ")),
      "]; run the loss's backward() first, and zero_grad() only after "
      "restore() (LibTorch 2's zero_grad() drops the gradients)");
  return grads;
}

} // namespace detail
} // namespace advtrain
