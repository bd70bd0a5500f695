#pragma once

// The training loop: one method, a fresh model, the configured epochs, each
// worker on its share of every batch (with A2T, each epoch after the first
// also on the adversarial texts of a share of the training split); then the
// final evaluation.

#include "augment.h"
#include "config.h"
#include "data.h"
#include "evaluate.h"
#include "methods.h"
#include "model.h"
#include "report.h"
#include "workers.h"

#include <advtrain/advtrain.h>

#include <fmt/core.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
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
  // The candidates: each vocabulary word, then up to 8 of its substitutes
  // in the vocabulary (ASCC's; the counter-fitted file has at most 8), or
  // its neighbourhood of the second order cut at 32 (DNE's; the official
  // cut is 64, halved for the CPU's time); padding and the unknown word
  // keep themselves.
  const TableSource table = [&d, &c](bool second_order) {
    const int64_t size = second_order ? 32 : 9;
    const auto from = substitutes_from(c.train_synonyms, c);
    const auto words = d.vocab->words();
    advtrain::SubstitutionTable::Substitutes subs;
    for (const auto& w : words) {
      auto s = from(w);
      if (!s.empty()) {
        subs.emplace(w, std::move(s));
      }
    }
    const std::vector<int64_t> fixed = {Vocabulary::kPad, Vocabulary::kUnknown};
    return second_order ? advtrain::SubstitutionTable::second_order(
                              words, subs, size, fixed)
                        : advtrain::SubstitutionTable(words, subs, size, fixed);
  };
  auto attacker = make_attacker(method, model, c, current_ids, table);
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
  if (find_method(method).substitutes) {
    // The source it trained with, so that a row says which attack is the
    // cross-source one.
    o.options +=
        (o.options.empty() ? "" : ";") + ("train_synonyms=" + c.train_synonyms);
  }
  if (dynamic_cast<advtrain::DNE*>(attacker.get()) != nullptr) {
    o.options += ";ensemble=" + std::to_string(c.ensemble);
  }
  const bool augments = find_method(method).augments;
  if (augments) {
    if (!d.unlabeled.empty()) {
      throw std::invalid_argument(
          method + " trains on labeled texts only: drop --labeled");
    }
    o.options += fmt::format(
        ";augment_share={};augment_rate={}", c.augment_share, c.augment_rate);
  }
  o.epochs = epochs;
  o.labeled = static_cast<int64_t>(d.train.size());
  if (c.reports()) {
    print_method(o, c);
  }
  std::vector<size_t> order = d.train;
  std::mt19937_64 rng(c.seed + 1);
  // With unlabeled texts (--labeled), an epoch makes as many steps as one
  // over the whole training split, whatever the labeled share: the labeled
  // batches cycle through their share, reshuffled at each pass, and each
  // step of a label-free method takes the next unlabeled batch too.
  const bool semi = !d.unlabeled.empty();
  const bool unlabeled_batches =
      semi && attacker != nullptr && attacker->traits().label_free();
  std::vector<size_t> unlabeled = d.unlabeled;
  size_t next_labeled = 0, next_unlabeled = 0;
  const auto bs = static_cast<size_t>(c.batch_size);
  // The next batch of `items` from `next`, reshuffled when used up.
  const auto draw = [&](std::vector<size_t>& items, size_t& next) {
    std::vector<size_t> idx;
    while (idx.size() < std::min(bs, items.size())) {
      if (next == items.size()) {
        std::shuffle(items.begin(), items.end(), rng);
        next = 0;
      }
      idx.push_back(items[next++]);
    }
    return idx;
  };
  const size_t steps =
      semi ? (d.train.size() + d.unlabeled.size() + bs - 1) / bs : 0;
  if (semi) { // the first pass is shuffled too
    next_labeled = order.size();
    next_unlabeled = unlabeled.size();
  }
  // This worker's share of a batch; empty where too small to share.
  const auto share = [&](std::vector<size_t> idx) {
    if (world > 1) {
      if (idx.size() < world) {
        return std::vector<size_t>{};
      }
      const size_t per = idx.size() / world;
      idx = std::vector<size_t>(
          idx.begin() + rank * per,
          rank + 1 == world ? idx.end() : idx.begin() + (rank + 1) * per);
    }
    return idx;
  };
  // A2T: the adversarial texts of the running epoch (ids from N = the data
  // set's size on, in `order`'s numbering) and their labels.
  const size_t N = d.tokens.size();
  std::vector<pwws::Text> adv_texts;
  std::vector<int64_t> adv_labels;
  const auto text_of = [&](size_t i) -> const pwws::Text& {
    return i < N ? d.tokens[i] : adv_texts[i - N];
  };
  const auto make_batch = [&](const std::vector<size_t>& idx) {
    if (std::all_of(idx.begin(), idx.end(), [N](size_t i) { return i < N; })) {
      return d.batch(idx, c.max_len);
    }
    Batch b;
    b.ids = token_ids(
        idx.size(),
        [&](size_t k) -> const pwws::Text& { return text_of(idx[k]); },
        *d.vocab,
        c.max_len);
    b.labels = torch::empty({static_cast<int64_t>(idx.size())}, torch::kLong);
    for (size_t k = 0; k < idx.size(); ++k) {
      b.labels[static_cast<int64_t>(k)] =
          idx[k] < N ? d.sentences[idx[k]].label : adv_labels[idx[k] - N];
    }
    return b;
  };
  // Attacks the first --augment-share of `order` (shuffled) with the
  // current model; the successes become the epoch's adversarial texts.
  const auto augment_epoch = [&] {
    adv_texts.clear();
    adv_labels.clear();
    const auto n = static_cast<size_t>(
        std::llround(c.augment_share * static_cast<double>(order.size())));
    const auto synonyms = in_vocabulary(c.train_synonyms, c, *d.vocab);
    const auto classify = probabilities_of(model, *d.vocab);
    const auto replaceable = [](const std::string& w) {
      return !is_stop_word(w);
    };
    augment::Options ao;
    ao.rate = c.augment_rate;
    int64_t queries = 0;
    constexpr size_t kChunk = 64;
    for (size_t s = 0; s < n; s += kChunk) {
      std::vector<size_t> idx(
          order.begin() + static_cast<std::ptrdiff_t>(s),
          order.begin() + static_cast<std::ptrdiff_t>(std::min(n, s + kChunk)));
      const Batch b = d.batch(idx, c.max_len);
      // Each word's importance: the L1 norm of the gradient of the loss at
      // the predicted class with respect to its embedding.
      model->eval();
      const auto e = model->embed(b.ids).detach().requires_grad_(true);
      const auto logits = model->head(e, b.ids);
      const auto loss = torch::nn::functional::cross_entropy(
          logits,
          logits.argmax(1).detach(),
          torch::nn::functional::CrossEntropyFuncOptions().reduction(
              torch::kSum));
      const auto importance = torch::autograd::grad({loss}, {e})[0]
                                  .abs()
                                  .sum(-1)
                                  .to(torch::kDouble)
                                  .contiguous();
      const auto imp = importance.accessor<double, 2>();
      for (size_t k = 0; k < idx.size(); ++k) {
        const auto& t = d.tokens[idx[k]];
        const pwws::Text text(
            t.begin(), t.begin() + std::min<int64_t>(c.max_len, t.size()));
        std::vector<double> scores(text.size());
        for (size_t j = 0; j < text.size(); ++j) {
          scores[j] = imp[static_cast<int64_t>(k)][static_cast<int64_t>(j)];
        }
        const int64_t label = d.sentences[idx[k]].label;
        auto r = augment::attack(
            text, label, scores, classify, synonyms, replaceable, ao);
        queries += r.queries;
        if (r.success) {
          adv_texts.push_back(std::move(r.text));
          adv_labels.push_back(label);
        }
      }
    }
    model->train();
    return std::make_pair(n, queries);
  };
  int64_t all_batches = 0, all_passes = 0;
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    const auto start = std::chrono::steady_clock::now();
    if (!semi) {
      std::shuffle(order.begin(), order.end(), rng);
    }
    // The epoch's texts: `order`, and with A2T after the first epoch the
    // adversarial texts of a share of it, shuffled in.
    std::vector<size_t> items = order;
    if (augments && epoch > 1) {
      const auto [attacked, queries] = augment_epoch();
      for (size_t k = 0; k < adv_texts.size(); ++k) {
        items.push_back(N + k);
      }
      std::shuffle(items.begin(), items.end(), rng);
      if (c.reports()) {
        fmt::print(
            "augment: {} of {} attacked texts flipped ({} queries)\n",
            adv_texts.size(),
            attacked,
            queries);
      }
    }
    model->train();
    EpochStats s;
    const size_t batches = semi ? steps : (items.size() + bs - 1) / bs;
    for (size_t k = 0; k < batches; ++k) {
      std::vector<size_t> idx =
          semi ? draw(order, next_labeled)
               : std::vector<size_t>(
                     items.begin() + k * bs,
                     items.begin() + std::min(items.size(), (k + 1) * bs));
      std::vector<size_t> uidx;
      if (unlabeled_batches) {
        uidx = share(draw(unlabeled, next_unlabeled));
      }
      idx = share(std::move(idx));
      if (idx.empty() || (unlabeled_batches && uidx.empty())) {
        continue;
      }
      const Batch b = make_batch(idx);
      current_ids = b.ids;
      // The loss takes the labels of the batch the last forward ran on; an
      // unlabeled batch's are -1, no class, so a task loss taken on its
      // output would throw.
      torch::Tensor fed_labels;
      auto forward = [&] {
        fed_labels = b.labels;
        if (yopo != nullptr) { // YOPO sees the split model
          return model->rest(yopo->first(model->embed(b.ids)));
        }
        return model->forward(b.ids);
      };
      auto loss_fn = [&](const torch::Tensor& logits) {
        return torch::nn::functional::cross_entropy(logits, fed_labels);
      };
      if (trainer && unlabeled_batches) {
        Batch u = d.batch(uidx, c.max_len);
        u.labels.fill_(-1);
        const auto r = trainer->step(forward, loss_fn, [&] {
          fed_labels = u.labels;
          return model->forward(u.ids);
        });
        s.loss += r.loss;
        s.adv_loss += r.adv_loss;
        s.perturbation_norm += r.perturbation_norm;
        s.passes += r.passes;
      } else if (trainer) {
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
  o.unlabeled =
      unlabeled_batches ? static_cast<int64_t>(d.unlabeled.size()) : 0;
  o.passes_per_step =
      static_cast<double>(all_passes) / std::max<int64_t>(1, all_batches);
  if (c.reports()) {
    // DNE predicts by its ensemble, which the attacks query too.
    Predictor predict;
    if (auto* dne = dynamic_cast<advtrain::DNE*>(attacker.get())) {
      predict = [dne, &model, &c](const torch::Tensor& ids) {
        return dne->predict([&] { return model->forward(ids); }, c.ensemble);
      };
    }
    o.scores = evaluate(model, test, c, predict);
    if (c.attack_synonyms != "counterfitted") {
      o.pwws = evaluate_pwws(model, d, c, "wordnet", predict);
    }
    if (c.attack_synonyms != "wordnet") {
      o.pwws_cf = evaluate_pwws(model, d, c, "counterfitted", predict);
    }
    print_results(o, c);
  }
  return o;
}

} // namespace example
