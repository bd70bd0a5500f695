#pragma once

// The training loop: one method, a fresh model, the configured epochs, each
// worker on its share of every batch; then the final evaluation.

#include "config.h"
#include "data.h"
#include "evaluate.h"
#include "methods.h"
#include "model.h"
#include "report.h"
#include "workers.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace example {

/// Sets the embedding rows of the words with pretrained vectors to them and
/// draws the other rows (padding aside) from N(0, s^2), s the pretrained
/// entries' standard deviation, so that all rows share one scale.
inline void load_pretrained(Classifier& model, const Data& d, bool freeze) {
  torch::NoGradGuard no_grad;
  auto& w = model->embedding->weight;
  const int64_t dim = w.size(1);
  auto rows = torch::empty({static_cast<int64_t>(d.pretrained.size()), dim});
  auto ids = torch::empty({rows.size(0)}, torch::kLong);
  int64_t k = 0;
  for (const auto& [id, v] : d.pretrained) {
    rows[k] = torch::from_blob(const_cast<float*>(v.data()), {dim}).clone();
    ids[k++] = id;
  }
  w.normal_(0.0, rows.std().item<double>());
  w[Vocabulary::kPad].zero_();
  w.index_copy_(0, ids, rows.to(w.dtype()));
  w.requires_grad_(!freeze);
}

/// Trains a fresh model (initialized from the seed) with `method`. With
/// several workers each trains on its share of every batch. Only a process
/// that reports (Config::reports) evaluates the model and prints.
inline Outcome train(
    const std::string& method,
    const Config& c,
    const Data& d,
    const Group& group) {
  torch::manual_seed(c.seed);
  const int64_t dim = d.pretrained.empty() ? c.dim : d.pretrained_dim;
  Classifier model(
      d.vocab->size(),
      dim,
      d.classes,
      c.dropout,
      encoder_of(c.model),
      std::max<int64_t>(c.max_len, 1));
  if (!d.pretrained.empty()) {
    load_pretrained(model, d, c.freeze_embeddings);
  } else if (c.freeze_embeddings) {
    model->embedding->weight.requires_grad_(false);
  }
  torch::optim::Adam optimizer(
      model->parameters(), torch::optim::AdamOptions(c.lr));
  torch::Tensor current_ids; // the batch in training, for YOPO's first layer
  auto attacker = make_attacker(method, model, c, current_ids);
  auto* yopo = dynamic_cast<advtrain::YOPO*>(attacker.get());
  std::optional<advtrain::Trainer> trainer;
  Reducer reducer(group, model->parameters());
  if (attacker) {
    trainer.emplace(optimizer, *attacker);
    reducer.attach(*trainer);
  }
  const size_t world = static_cast<size_t>(c.world_size);
  const size_t rank = static_cast<size_t>(std::max(0, c.rank));
  // FreeAT takes m optimizer steps per batch: m times fewer epochs.
  int64_t epochs = c.epochs;
  std::optional<int64_t> replays;
  if (auto* f = dynamic_cast<advtrain::FreeAT*>(attacker.get())) {
    replays = f->options().replays();
  } else if (auto* f2 = dynamic_cast<advtrain::FreeATL2*>(attacker.get())) {
    replays = f2->options().replays();
  }
  if (replays) {
    epochs = std::max<int64_t>(1, (c.epochs + *replays / 2) / *replays);
  }
  const Batch test = d.batch(d.test, c.max_len);

  Outcome o;
  o.method = method;
  o.target = target_of(method, c);
  o.options = attacker ? c.options() : "";
  o.epochs = epochs;
  if (c.reports()) {
    print_method(o, c);
  }
  std::vector<size_t> order = d.train;
  std::mt19937_64 rng(c.seed + 1);
  int64_t all_batches = 0, all_passes = 0;
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    const auto start = std::chrono::steady_clock::now();
    std::shuffle(order.begin(), order.end(), rng);
    model->train();
    EpochStats s;
    const auto bs = static_cast<size_t>(c.batch_size);
    for (size_t i = 0; i < order.size(); i += bs) {
      std::vector<size_t> idx(
          order.begin() + i, order.begin() + std::min(order.size(), i + bs));
      if (world > 1) { // this worker's share; a batch too small is skipped
        if (idx.size() < world) {
          continue;
        }
        const size_t per = idx.size() / world;
        idx = std::vector<size_t>(
            idx.begin() + rank * per,
            rank + 1 == world ? idx.end() : idx.begin() + (rank + 1) * per);
      }
      const Batch b = d.batch(idx, c.max_len);
      current_ids = b.ids;
      auto forward = [&] {
        if (yopo != nullptr) { // YOPO sees the split model
          return model->rest(yopo->first(model->embed(b.ids)));
        }
        return model->forward(b.ids);
      };
      auto loss_fn = [&](const torch::Tensor& logits) {
        return torch::nn::functional::cross_entropy(logits, b.labels);
      };
      if (trainer) {
        const auto r = trainer->step(forward, loss_fn);
        s.loss += r.loss;
        s.adv_loss += r.adv_loss;
        s.perturbation_norm += r.perturbation_norm;
        s.passes += r.passes;
      } else {
        optimizer.zero_grad();
        const auto loss = loss_fn(forward());
        loss.backward();
        reducer.all_reduce();
        optimizer.step();
        s.loss += loss.item<double>();
        s.passes += 1;
      }
      ++s.batches;
    }
    s.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    o.seconds += s.seconds;
    all_batches += s.batches;
    all_passes += s.passes;
    if (c.reports()) {
      print_epoch(epoch, epochs, s, trainer.has_value(), accuracy(model, test));
    }
  }
  o.passes_per_step =
      static_cast<double>(all_passes) / std::max<int64_t>(1, all_batches);
  if (c.reports()) {
    o.scores = evaluate(model, test, c);
    o.pwws = evaluate_pwws(model, d, c);
    print_results(o, c);
  }
  return o;
}

} // namespace example
