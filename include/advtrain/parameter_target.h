// The parameter target: tensors of the model perturbed in place (embedding
// tables). A rule that moves only rows with a gradient (its traits say
// `moves_gradient_rows`) backs up and moves those rows alone, so a step
// costs the rows a batch touches, not the vocabulary; norms are taken over
// whole tensors.
#pragma once

#include <advtrain/parameters.h>
#include <advtrain/target.h>

#include <fmt/format.h>
#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace advtrain {
namespace detail {

/// The rows of `g` ([V, ...]) with a nonzero entry, ascending: those whose
/// magnitudes sum to nonzero (a sum of magnitudes is zero only when each
/// is; a NaN row is kept). One pass over `g` and a matrix-vector product,
/// in blocks of 2^16 rows, so the magnitudes held at once stay small.
inline torch::Tensor nonzero_rows(const torch::Tensor& g) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  const torch::Tensor flat = g.reshape({g.size(0), -1});
  const bool blas = flat.scalar_type() == torch::kFloat ||
                    flat.scalar_type() == torch::kDouble;
  const torch::Tensor ones = at::ones({flat.size(1)}, flat.options());
  torch::Tensor sums = at::empty({flat.size(0)}, flat.options());
  for (int64_t r = 0; r < flat.size(0); r += kBlock) {
    const int64_t len = std::min(kBlock, flat.size(0) - r);
    torch::Tensor out = sums.narrow(0, r, len);
    const torch::Tensor mag = flat.narrow(0, r, len).abs();
    if (blas) {
      at::mv_out(out, mag, ones);
    } else {
      at::sum_out(out, mag, {1});
    }
  }
  return sums.nonzero().view(-1);
}

} // namespace detail

/// Parameters perturbed in place, with whole-tensor or row-wise backups.
class ParameterTarget : public Target {
 public:
  /// `params`, named "target[i]".
  ParameterTarget(std::vector<torch::Tensor> params, const char* kind) {
    tensors_ = std::move(params);
    for (size_t i = 0; i < tensors_.size(); ++i) {
      names_.push_back(fmt::format("target[{}]", i));
    }
    check(kind);
  }
  /// The parameters of `module` whose names contain `name_contains`.
  ParameterTarget(
      const NamedParameters& module,
      const std::string& name_contains,
      const char* kind) {
    auto selected = detail::select_named(module, name_contains);
    names_ = std::move(selected.first);
    tensors_ = std::move(selected.second);
    check(kind);
    warn_tied(module, kind);
  }

  bool per_example() const noexcept override {
    return false;
  }
  bool measures_gradient_norm() const noexcept override {
    return true;
  }

  /// A tensor frozen after the attacker was built gets no gradient: refused
  /// before anything moves, saying so.
  void sync(const char* kind) override {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      TORCH_CHECK(
          tensors_[i].requires_grad(),
          "advtrain: ",
          kind,
          ": ",
          names_[i],
          " no longer requires grad (frozen after the attacker was built?), "
          "so it has no gradient to attack along; unfreeze it, or build the "
          "attacker on trainable tensors");
    }
  }
  Geometry geometry(size_t /*i*/) const override {
    return Geometry{};
  }

  Move move(
      size_t i,
      const torch::Tensor& g,
      bool uses_gradient,
      bool /*rows_only: decided at the backup*/,
      bool untracked,
      const NormCheck& usable,
      const Rule& rule) override {
    torch::Tensor w = data(i, untracked);
    if (!uses_gradient) {
      return Move{rule(i, w, g, geometry(i), backup_[i])};
    }
    if (!g.defined()) {
      return Move{};
    }
    if (!rows_[i].defined()) { // backed up whole
      // (A sparse gradient here met a tensor backed up before it had one.)
      torch::Tensor dense = g.is_sparse() ? g.to_dense() : g;
      const auto geo = checked(i, dense, detail::l2_norm(dense), usable);
      if (!geo) {
        return Move{};
      }
      return Move{rule(i, w, dense, *geo, backup_[i])};
    }
    // Only the rows with a gradient move: back up, perturb and restore those
    // alone (a batch touches few rows of a vocabulary). A sparse gradient
    // names its rows; a dense one is searched for them.
    const bool sparse = g.is_sparse();
    const torch::Tensor grad = sparse ? g.coalesce() : g; // duplicates summed
    const torch::Tensor moved =
        sparse ? grad.indices()[0] : detail::nonzero_rows(grad);
    // Zero rows add nothing to ‖g‖: it is taken on the moved rows alone.
    const torch::Tensor g_moved =
        sparse ? grad.values() : grad.index_select(0, moved);
    const torch::Tensor gnorm = detail::l2_norm(g_moved);
    const bool first = rows_[i].numel() == 0; // then the rows are `moved`
    const bool host = !detail::sync_free(w);
    // On the device the rows move by 0 where ‖g‖ is not usable; in host
    // memory such a gradient moves nothing.
    torch::Tensor g_rows;
    auto geo = checked(i, g_rows, gnorm, usable, /*defer=*/true);
    if (!geo) {
      return Move{};
    }
    const torch::Tensor& rows = add_rows(i, moved);
    if (rows.numel() == 0) { // no row has had a gradient: nothing moves
      return Move{};
    }
    torch::Tensor w_rows = w.index_select(0, rows);
    // The gradient on every backed-up row (zero where this one has none).
    g_rows = first    ? g_moved
             : sparse ? grad.index_select(0, rows).to_dense()
                      : grad.index_select(0, rows);
    if (!host) {
      *geo = detail::whole_tensor(g_rows, gnorm, geo->usable);
    }
    torch::Tensor n = rule(i, w_rows, g_rows, *geo, backup_[i]);
    w.index_copy_(0, rows, w_rows);
    last_rows_[i] = rows;
    return Move{std::move(n)};
  }

  /// The rows of the last move hold every nonzero of `current`: only they
  /// are added.
  torch::Tensor merge_gradient(
      size_t i, torch::Tensor earlier, torch::Tensor current) const override {
    const bool rows = i < last_rows_.size() && last_rows_[i].defined();
    if (rows && earlier.defined() && current.defined() &&
        !current.is_sparse() && !earlier.is_sparse()) {
      return earlier.index_add_(
          0, last_rows_[i], current.index_select(0, last_rows_[i]));
    }
    return Target::merge_gradient(i, std::move(earlier), std::move(current));
  }

  torch::Tensor norm() const override {
    if (!is_perturbed()) {
      return {};
    }
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> norms;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const torch::Tensor now =
          rows_[i].defined() ? tensors_[i].detach().index_select(0, rows_[i])
                             : tensors_[i].detach();
      norms.push_back(detail::l2_norm(now - backup_[i]));
    }
    return detail::combined_norm(norms);
  }

  void set_start(Start start, bool random) override {
    TORCH_CHECK(!random, "advtrain: a parameter target has no random start");
    start_ = std::move(start);
  }
  void end_step() override {
    Target::end_step();
    start_ = nullptr;
  }
  /// Backs the tensors up and writes origin + start on each: the start
  /// writes δ into the tensor, the backed-up origin is then added (no
  /// zero-filled δ in between).
  void restart(const void* owner, const char* kind) override {
    backup(owner, kind, /*rows_only=*/false, /*untracked=*/false);
    if (!start_) {
      return;
    }
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      torch::Tensor w = data(i, /*untracked=*/false);
      start_(i, w, torch::Tensor());
      w.add_(backup_[i]);
    }
  }

  torch::Tensor fit_saved(
      size_t i, torch::Tensor saved, const char* kind) const override {
    TORCH_CHECK(
        saved.sizes() == tensors_[i].sizes(),
        "advtrain: ",
        kind,
        ": the saved delta of ",
        names_[i],
        " has shape ",
        saved.sizes(),
        ", the tensor ",
        tensors_[i].sizes());
    return saved.to(tensors_[i].device(), tensors_[i].scalar_type());
  }

 protected:
  void take_backup(bool rows_only) override {
    rows_.assign(tensors_.size(), torch::Tensor());
    last_rows_.assign(tensors_.size(), torch::Tensor());
    for (size_t i = 0; i < tensors_.size(); ++i) {
      // Row-wise where the rule moves gradient rows alone, and on a sparse
      // gradient (the strategies that accept one move its rows alone).
      // Searching a dense gradient for its rows waits for the device
      // (`nonzero`): off the CPU the whole tensor is backed up and moved.
      const torch::Tensor& g = tensors_[i].grad();
      const bool sparse = g.defined() && g.is_sparse();
      if (tensors_[i].dim() >= 2 &&
          ((rows_only && !detail::sync_free(tensors_[i])) || sparse)) {
        // rows are backed up as they first move
        rows_[i] = torch::empty(
            {0}, torch::dtype(torch::kLong).device(tensors_[i].device()));
        backup_.push_back(tensors_[i].detach().index_select(0, rows_[i]));
      } else {
        backup_.push_back(tensors_[i].detach().clone());
      }
    }
  }

  /// The backed-up rows alone where rows are backed up.
  torch::Tensor written(size_t i) const override {
    const torch::Tensor t = tensors_[i].detach();
    return (rows_[i].defined() ? t.index_select(0, rows_[i]) : t)
        .sum(torch::kDouble);
  }

  void put_back(bool untracked) override {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (rows_[i].defined()) {
        data(i, untracked).index_copy_(0, rows_[i], backup_[i]);
      } else {
        data(i, untracked).copy_(backup_[i]);
      }
    }
    rows_.clear();
    last_rows_.clear();
  }

 private:
  /// The geometry of a step of tensor i along `g` with norm `gnorm`. In host
  /// memory ‖g‖ is read (a read waits for no device) and a zero or
  /// non-finite one gives none; on a device it is checked there
  /// (`whole_tensor`, at once unless `defer`: the caller applies it).
  std::optional<Geometry> checked(
      size_t i,
      torch::Tensor& g,
      const torch::Tensor& gnorm,
      const NormCheck& usable,
      bool defer = false) const {
    if (!detail::sync_free(tensors_[i])) {
      usable(i, gnorm, /*on_device=*/false);
      return detail::read_geometry(gnorm);
    }
    const torch::Tensor ok = usable(i, gnorm, /*on_device=*/true);
    if (defer) {
      return Geometry{torch::Tensor(), gnorm, ok};
    }
    return detail::whole_tensor(g, gnorm, ok);
  }

  /// Backs up the rows of `rows` not backed up yet; returns all backed-up
  /// rows of tensor i (the rows `backup_[i]` holds, in its order).
  const torch::Tensor& add_rows(size_t i, const torch::Tensor& rows) {
    torch::Tensor extra =
        rows_[i].numel() == 0
            ? rows
            : rows.masked_select(torch::isin(rows, rows_[i]).logical_not());
    if (extra.numel() > 0) {
      backup_[i] =
          torch::cat({backup_[i], tensors_[i].detach().index_select(0, extra)});
      rows_[i] = torch::cat({rows_[i], extra});
    }
    return rows_[i];
  }

  void check(const char* kind) const {
    TORCH_CHECK(
        !tensors_.empty(), "advtrain: ", kind, " needs at least one target");
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      TORCH_CHECK(
          t.defined(), "advtrain: ", kind, ": ", names_[i], " is undefined");
      TORCH_CHECK(
          t.is_floating_point(),
          "advtrain: ",
          kind,
          ": ",
          names_[i],
          " must be a floating-point tensor, got ",
          t.scalar_type());
      TORCH_CHECK(
          t.requires_grad(),
          "advtrain: ",
          kind,
          ": ",
          names_[i],
          " does not require grad, so it never gets a gradient to attack "
          "along");
      for (size_t j = 0; j < i; ++j) {
        TORCH_CHECK(
            !tensors_[j].is_same(t),
            "advtrain: ",
            kind,
            ": ",
            names_[i],
            " is the same tensor as ",
            names_[j]);
      }
    }
  }

  /// Warns when a tensor is also registered under another name, or shares
  /// its storage with another parameter (tied input/output embeddings):
  /// perturbing it perturbs that layer too.
  void warn_tied(const NamedParameters& module, const char* kind) const {
    for (const auto& item : module.items()) {
      const auto& p = item.second;
      for (size_t i = 0; i < tensors_.size(); ++i) {
        const auto& t = tensors_[i];
        const bool shared =
            p.is_same(t) || (p.has_storage() && t.has_storage() &&
                             p.storage().is_alias_of(t.storage()));
        if (shared && item.first != names_[i]) {
          TORCH_WARN(
              "advtrain: ",
              kind,
              ": ",
              names_[i],
              " is tied to ",
              item.first,
              " (they share storage): perturbing it also perturbs that "
              "parameter's layer");
        }
      }
    }
  }

  std::vector<torch::Tensor> rows_;      // per tensor: backed-up rows, or none
  std::vector<torch::Tensor> last_rows_; // rows the last move went along
  Start start_;
};

} // namespace advtrain
