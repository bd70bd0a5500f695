// Candidate sets for the defenses against word substitution (ASCC, DNE): a
// `SubstitutionTable` gives each vocabulary id up to S candidate ids — the
// word itself first, then its substitutes that are in the vocabulary (and,
// for DNE's neighbourhoods, their substitutes) — and a mask of the valid
// ones, and gathers them per batch into [B, L, S].
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace advtrain {

/// A batch's candidate sets: `ids` [B, L, S] (int64; position s = 0 is the
/// token itself; invalid positions repeat it) and `mask` [B, L, S] (bool;
/// true where the candidate is valid, always at s = 0); `first_order` [B, L]
/// (int64): how many leading candidates are the token and its own
/// substitutes (the rest are their substitutes).
struct Candidates {
  torch::Tensor ids;
  torch::Tensor mask;
  torch::Tensor first_order;
};

/// For each id of a vocabulary, up to S candidate ids and their mask (the
/// per-example side of the house: it needs the batch's ids and the model's
/// embedding table; docs/guide.md, "Substitution sets").
///
///   // vocabulary: id -> word; neighbours: word -> its substitutes
///   advtrain::SubstitutionTable table(vocabulary, neighbours, 9);
///   const advtrain::Candidates c = table.gather(ids);  // [B, L, 9]
///
/// Built from a mapping, each word keeps its substitutes in the mapping's
/// order, skipping those not in the vocabulary, the word itself and repeats,
/// up to S - 1 of them. Ids listed as `fixed` (padding, the unknown word)
/// keep themselves alone.
class SubstitutionTable {
 public:
  using Substitutes = std::unordered_map<std::string, std::vector<std::string>>;

  /// From `vocabulary` (the word of each id, distinct) and `substitutes`
  /// (word -> its substitutes); at most `max_candidates` S per id, itself
  /// included.
  SubstitutionTable(
      const std::vector<std::string>& vocabulary,
      const Substitutes& substitutes,
      int64_t max_candidates,
      const std::vector<int64_t>& fixed = {}) {
    build(vocabulary, substitutes, max_candidates, fixed, false);
  }

  /// Neighbourhoods of the second order (DNE's): each id's candidates are
  /// itself, its substitutes, then the substitutes of those in their order
  /// (a substitute's own list, one substitute after the other), skipping
  /// repeats, at most `max_candidates` in all; `first_order` counts the
  /// first two groups.
  static SubstitutionTable second_order(
      const std::vector<std::string>& vocabulary,
      const Substitutes& substitutes,
      int64_t max_candidates,
      const std::vector<int64_t>& fixed = {}) {
    SubstitutionTable t;
    t.build(vocabulary, substitutes, max_candidates, fixed, true);
    return t;
  }

  /// From tensors: `ids` [V, S] int64 with ids[i][0] == i and every id in
  /// [0, V); `mask` [V, S] bool, true at s = 0; `first_order` [V] int64 in
  /// [1, S] (undefined: every valid candidate is of the first order).
  SubstitutionTable(
      torch::Tensor ids, torch::Tensor mask, torch::Tensor first_order = {})
      : ids_(std::move(ids)),
        mask_(std::move(mask)),
        first_order_(std::move(first_order)) {
    TORCH_CHECK(
        ids_.dim() == 2 && ids_.size(0) > 0 && ids_.size(1) > 0 &&
            ids_.scalar_type() == torch::kLong,
        "SubstitutionTable: ids must be a non-empty int64 [V, S] tensor, got ",
        ids_.scalar_type(),
        ids_.sizes());
    TORCH_CHECK(
        mask_.sizes() == ids_.sizes() && mask_.scalar_type() == torch::kBool &&
            mask_.device() == ids_.device(),
        "SubstitutionTable: mask must be a bool tensor of ids' shape ",
        ids_.sizes(),
        " on ",
        ids_.device(),
        ", got ",
        mask_.scalar_type(),
        mask_.sizes(),
        " on ",
        mask_.device());
    const int64_t V = ids_.size(0);
    TORCH_CHECK(
        ids_.ge(0).logical_and(ids_.lt(V)).all().item<bool>(),
        "SubstitutionTable: every candidate id must lie in [0, ",
        V,
        ")");
    TORCH_CHECK(
        ids_.select(1, 0)
            .eq(torch::arange(V, ids_.options()))
            .logical_and(mask_.select(1, 0))
            .all()
            .item<bool>(),
        "SubstitutionTable: each id must be its own first candidate, valid "
        "(ids[i][0] == i, mask[i][0] true)");
    if (!first_order_.defined()) {
      first_order_ = mask_.sum(1);
      return;
    }
    TORCH_CHECK(
        first_order_.dim() == 1 && first_order_.size(0) == V &&
            first_order_.scalar_type() == torch::kLong &&
            first_order_.device() == ids_.device() &&
            first_order_.ge(1)
                .logical_and(first_order_.le(ids_.size(1)))
                .all()
                .item<bool>(),
        "SubstitutionTable: first_order must be an int64 [",
        V,
        "] tensor on the table's device with values in [1, ",
        ids_.size(1),
        "]");
  }

  /// The candidates of a batch of ids ([B, L], any integer type, on the
  /// table's device): ids and mask [B, L, S].
  Candidates gather(const torch::Tensor& batch) const {
    TORCH_CHECK(
        batch.dim() >= 1 && !at::isFloatingType(batch.scalar_type()) &&
            batch.scalar_type() != torch::kBool,
        "SubstitutionTable::gather: needs integer token ids, got ",
        batch.scalar_type(),
        batch.sizes());
    TORCH_CHECK(
        batch.device() == ids_.device(),
        "SubstitutionTable::gather: the ids are on ",
        batch.device(),
        ", the table on ",
        ids_.device(),
        "; move one (table.to(device))");
    const torch::Tensor flat = batch.reshape({-1}).to(torch::kLong);
    if (flat.numel() > 0) {
      TORCH_CHECK(
          flat.min().item<int64_t>() >= 0 &&
              flat.max().item<int64_t>() < vocabulary_size(),
          "SubstitutionTable::gather: a token id lies outside the table's "
          "vocabulary [0, ",
          vocabulary_size(),
          ")");
    }
    return gather_unchecked(batch);
  }

  /// `gather` without its checks (and their host reads), for the strategies'
  /// steps: the ids are integers in [0, V) on the table's device.
  Candidates gather_unchecked(const torch::Tensor& batch) const {
    const torch::Tensor flat = batch.reshape({-1}).to(torch::kLong);
    std::vector<int64_t> shape(batch.sizes().begin(), batch.sizes().end());
    const torch::Tensor first_order =
        first_order_.index_select(0, flat).reshape(shape);
    shape.push_back(max_candidates());
    return {
        ids_.index_select(0, flat).reshape(shape),
        mask_.index_select(0, flat).reshape(shape),
        first_order};
  }

  /// The table on `device`.
  SubstitutionTable to(const torch::Device& device) const {
    SubstitutionTable t;
    t.ids_ = ids_.to(device);
    t.mask_ = mask_.to(device);
    t.first_order_ = first_order_.to(device);
    return t;
  }

  /// [V, S] candidate ids and mask.
  const torch::Tensor& ids() const noexcept {
    return ids_;
  }
  const torch::Tensor& mask() const noexcept {
    return mask_;
  }
  /// [V] int64: how many leading candidates of each id are itself and its
  /// own substitutes.
  const torch::Tensor& first_order() const noexcept {
    return first_order_;
  }
  /// V.
  int64_t vocabulary_size() const {
    return ids_.size(0);
  }
  /// S.
  int64_t max_candidates() const {
    return ids_.size(1);
  }
  /// How many ids have at least one substitute.
  int64_t with_substitutes() const {
    return mask_.sum(1).gt(1).sum().item<int64_t>();
  }

 private:
  SubstitutionTable() = default;

  void build(
      const std::vector<std::string>& vocabulary,
      const Substitutes& substitutes,
      int64_t max_candidates,
      const std::vector<int64_t>& fixed,
      bool second_order) {
    TORCH_CHECK(
        max_candidates >= 1,
        "SubstitutionTable: Invalid max_candidates: ",
        max_candidates,
        " (must be >= 1: the word itself)");
    TORCH_CHECK(
        !vocabulary.empty(), "SubstitutionTable: the vocabulary is empty");
    const auto V = static_cast<int64_t>(vocabulary.size());
    std::unordered_map<std::string, int64_t> id_of;
    id_of.reserve(vocabulary.size());
    for (int64_t i = 0; i < V; ++i) {
      const bool fresh = id_of.emplace(vocabulary[i], i).second;
      TORCH_CHECK(
          fresh,
          "SubstitutionTable: the vocabulary holds '",
          vocabulary[i],
          "' twice (ids ",
          id_of.at(vocabulary[i]),
          " and ",
          i,
          "); each word needs one id");
    }
    std::vector<bool> is_fixed(vocabulary.size(), false);
    for (const int64_t f : fixed) {
      TORCH_CHECK(
          f >= 0 && f < V,
          "SubstitutionTable: the fixed id ",
          f,
          " is outside the vocabulary [0, ",
          V,
          ")");
      is_fixed[static_cast<size_t>(f)] = true;
    }
    ids_ =
        torch::arange(V, torch::kLong).unsqueeze(1).repeat({1, max_candidates});
    mask_ = torch::zeros({V, max_candidates}, torch::kBool);
    first_order_ = torch::ones({V}, torch::kLong);
    auto ids = ids_.accessor<int64_t, 2>();
    auto mask = mask_.accessor<bool, 2>();
    auto first = first_order_.accessor<int64_t, 1>();
    for (int64_t i = 0; i < V; ++i) {
      mask[i][0] = true;
      if (is_fixed[static_cast<size_t>(i)]) {
        continue;
      }
      std::unordered_set<int64_t> seen{i};
      int64_t s = 1;
      // Appends the substitutes of `word` that are new, while room is left.
      const auto add = [&](const std::string& word) {
        const auto found = substitutes.find(word);
        if (found == substitutes.end()) {
          return;
        }
        for (const auto& sub : found->second) {
          if (s == max_candidates) {
            return;
          }
          const auto id = id_of.find(sub);
          if (id == id_of.end() || !seen.insert(id->second).second) {
            continue;
          }
          ids[i][s] = id->second;
          mask[i][s] = true;
          ++s;
        }
      };
      add(vocabulary[i]);
      first[i] = s;
      if (second_order) {
        for (int64_t j = 1; j < first[i]; ++j) {
          add(vocabulary[static_cast<size_t>(ids[i][j])]);
        }
      }
    }
  }

  torch::Tensor ids_;         // [V, S] int64
  torch::Tensor mask_;        // [V, S] bool
  torch::Tensor first_order_; // [V] int64
};

} // namespace advtrain
