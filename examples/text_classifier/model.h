#pragma once

// The classifier: a bag of embedded tokens under one hidden layer, with its
// embedding open to advtrain's attackers.

#include "dataset.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>

#include <cstdint>

namespace example {

/// Embedding -> masked mean over the sentence -> tanh layer -> classes. The
/// embedding is advtrain's PerturbedEmbedding (a plain nn::Embedding unless a
/// per-example attacker is attached). For YOPO the head splits into `first`
/// (mean + tanh layer) and `rest` (dropout + output layer).
struct ClassifierImpl : torch::nn::Module {
  ClassifierImpl(int64_t vocab, int64_t dim, int64_t classes, double dropout)
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(vocab, dim)))),
        hidden(register_module("hidden", torch::nn::Linear(dim, dim))),
        out(register_module("out", torch::nn::Linear(dim, classes))),
        drop(register_module("drop", torch::nn::Dropout(dropout))) {}

  static torch::Tensor mask_of(const torch::Tensor& ids) {
    return ids.ne(Vocabulary::kPad);
  }
  /// The first layer after the lookup: masked mean and tanh layer.
  torch::Tensor first(const torch::Tensor& e, const torch::Tensor& ids) {
    const auto mask = mask_of(ids).unsqueeze(-1).to(e.dtype());
    const auto pooled = (e * mask).sum(1) / mask.sum(1).clamp_min(1.0);
    return torch::tanh(hidden(pooled));
  }
  torch::Tensor rest(const torch::Tensor& z) {
    return out(drop(z));
  }
  /// Logits for embedded tokens `e` [B, L, H] of `ids` [B, L].
  torch::Tensor head(const torch::Tensor& e, const torch::Tensor& ids) {
    return rest(first(e, ids));
  }
  torch::Tensor embed(const torch::Tensor& ids) {
    return embedding(ids, mask_of(ids));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    return head(embed(ids), ids);
  }

  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear hidden, out;
  torch::nn::Dropout drop;
};
TORCH_MODULE(Classifier);

} // namespace example
