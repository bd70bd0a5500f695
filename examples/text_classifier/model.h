#pragma once

// The classifier: embedded tokens under one of three encoders (a bag of
// words, a bidirectional LSTM, a small transformer), with its embedding open
// to advtrain's attackers.

#include "dataset.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace example {

/// What `--model` names: the encoder between the lookup and the head.
enum class Encoder { kBag, kLSTM, kTransformer };

inline Encoder encoder_of(const std::string& name) {
  if (name == "bag") {
    return Encoder::kBag;
  }
  if (name == "lstm") {
    return Encoder::kLSTM;
  }
  if (name == "transformer") {
    return Encoder::kTransformer;
  }
  throw std::invalid_argument("unknown model '" + name + "'");
}

/// Embedding -> encoder -> pooled vector -> tanh layer -> classes.
///   bag          masked mean of the embedded tokens
///   lstm         one bidirectional LSTM layer (hidden size = embedding size
///                per direction), masked mean of its outputs
///   transformer  sinusoidal positions, 2 encoder layers (4 heads, padding
///                masked), masked mean
/// The embedding is advtrain's PerturbedEmbedding (a plain nn::Embedding
/// unless a per-example attacker is attached). For YOPO the model splits into
/// `first` (encoder, pooling, tanh layer) and `rest` (dropout, output layer).
struct ClassifierImpl : torch::nn::Module {
  ClassifierImpl(
      int64_t vocab,
      int64_t dim,
      int64_t classes,
      double dropout,
      Encoder encoder = Encoder::kBag,
      int64_t max_len = 512)
      : encoder(encoder),
        embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(vocab, dim)))),
        hidden(register_module(
            "hidden",
            torch::nn::Linear(encoder == Encoder::kLSTM ? 2 * dim : dim, dim))),
        out(register_module("out", torch::nn::Linear(dim, classes))),
        drop(register_module("drop", torch::nn::Dropout(dropout))) {
    if (encoder == Encoder::kLSTM) {
      // Two one-way LSTMs rather than bidirectional(true): the backward one
      // reads each text reversed within its own length, so padding never
      // comes before a word (and no packed sequences are needed).
      forward_lstm = register_module(
          "forward_lstm",
          torch::nn::LSTM(torch::nn::LSTMOptions(dim, dim).batch_first(true)));
      backward_lstm = register_module(
          "backward_lstm",
          torch::nn::LSTM(torch::nn::LSTMOptions(dim, dim).batch_first(true)));
    } else if (encoder == Encoder::kTransformer) {
      TORCH_CHECK(
          dim % 4 == 0,
          "the transformer's 4 heads need an embedding size divisible by 4 "
          "(--dim, or the pretrained vectors' size), got ",
          dim);
      transformer = register_module(
          "transformer",
          torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(
              torch::nn::TransformerEncoderLayerOptions(dim, 4)
                  .dim_feedforward(2 * dim)
                  .dropout(dropout),
              2)));
      auto pos = torch::arange(max_len, torch::kDouble).unsqueeze(1);
      auto freq = torch::exp(
          torch::arange(0, dim, 2, torch::kDouble) * (-std::log(1e4) / dim));
      auto table = torch::zeros({max_len, dim}, torch::kDouble);
      table.index_put_(
          {torch::indexing::Slice(), torch::indexing::Slice(0, dim, 2)},
          torch::sin(pos * freq));
      table.index_put_(
          {torch::indexing::Slice(), torch::indexing::Slice(1, dim, 2)},
          torch::cos(pos * freq));
      positions = register_buffer("positions", table.to(torch::kFloat));
    }
  }

  static torch::Tensor mask_of(const torch::Tensor& ids) {
    return ids.ne(Vocabulary::kPad);
  }
  /// Mean over the positions of `ids` that are not padding.
  static torch::Tensor masked_mean(
      const torch::Tensor& h, const torch::Tensor& ids) {
    const auto mask = mask_of(ids).unsqueeze(-1).to(h.dtype());
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0);
  }
  /// The encoder's outputs [B, L, *] for embedded tokens `e` of `ids`.
  torch::Tensor encode(const torch::Tensor& e, const torch::Tensor& ids) {
    switch (encoder) {
      case Encoder::kBag:
        return e;
      case Encoder::kLSTM: {
        // reverse[b][t] = len_b - 1 - t within the text, t on the padding.
        const auto len = mask_of(ids).sum(1, true);
        const auto t = torch::arange(ids.size(1), ids.options()).unsqueeze(0);
        const auto reverse = torch::where(t < len, len - 1 - t, t);
        const auto index = reverse.unsqueeze(-1).expand_as(e);
        const auto f = std::get<0>(forward_lstm->forward(e));
        const auto b = std::get<0>(backward_lstm->forward(e.gather(1, index)));
        return torch::cat({f, b.gather(1, index)}, -1);
      }
      case Encoder::kTransformer: {
        const auto L = ids.size(1);
        TORCH_CHECK(
            L <= positions.size(0), "text longer than the position table");
        auto padding = ~mask_of(ids);
        // A text with no token would attend to nothing: let it see position 0.
        padding.index_put_({torch::indexing::Slice(), 0}, false);
        const auto x = e + positions.slice(0, 0, L).to(e.dtype()).unsqueeze(0);
        return transformer->forward(x.transpose(0, 1), {}, padding)
            .transpose(0, 1);
      }
    }
    throw std::logic_error("unknown encoder");
  }
  /// The first part for YOPO: encoder, pooling and tanh layer.
  torch::Tensor first(const torch::Tensor& e, const torch::Tensor& ids) {
    return torch::tanh(hidden(masked_mean(encode(e, ids), ids)));
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

  Encoder encoder;
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear hidden, out;
  torch::nn::Dropout drop;
  torch::nn::LSTM forward_lstm{nullptr}, backward_lstm{nullptr};
  torch::nn::TransformerEncoder transformer{nullptr};
  torch::Tensor positions;
};
TORCH_MODULE(Classifier);

} // namespace example
