#pragma once

#include <advtrain/attacker.h>

#include <string>
#include <utility>
#include <vector>

namespace advtrain {

/// Options of FreeLB (Zhu et al., ICLR 2020).
struct FreeLBOptions {
  /// Ascent step α: `δ ← δ + α * g / ‖g‖`.
  TORCH_ARG(double, alpha) = 0.1;
  /// Passes K per batch, with an ascent step between two passes.
  TORCH_ARG(int64_t, steps) = 3;
  /// Bound: ‖δ‖ ≤ ε after each ascent step; 0 leaves δ unbounded.
  TORCH_ARG(double, epsilon) = 0.0;
  /// Magnitude of the random start on per-example targets,
  /// `U(-1, 1) * mask * init_mag / sqrt(L_i * H)`; the weight table starts
  /// from δ = 0, so it must be 0 there.
  TORCH_ARG(double, init_mag) = 0.0;
  /// Whether the K passes draw the same dropout masks (the FreeLB paper finds
  /// fresh masks hurt).
  TORCH_ARG(bool, share_dropout_mask) = true;
};

/// FreeLB under the norm policy `Norm`: K passes at `W + δ_t`, each backward
/// of `loss / K`, so the parameters get the mean of the K gradients (a K
/// times larger virtual batch). Between passes, δ ascends along the gradient
/// of that pass alone and is projected back into the ε-ball when ε > 0.
template <typename Norm>
class BasicFreeLB : public Attacker {
 public:
  explicit BasicFreeLB(
      std::vector<torch::Tensor> params, FreeLBOptions options = {})
      : Attacker(std::move(params), "FreeLB"), options_(std::move(options)) {
    check();
  }
  BasicFreeLB(
      const torch::nn::Module& module,
      const std::string& name_contains,
      FreeLBOptions options = {})
      : Attacker(module, name_contains, "FreeLB"),
        options_(std::move(options)) {
    check();
  }
  /// Per-example perturbation of `embedding`'s output (SPEC §4).
  explicit BasicFreeLB(
      const PerturbedEmbedding& embedding, FreeLBOptions options = {})
      : Attacker({embedding->perturbation()}, "FreeLB"),
        options_(std::move(options)) {
    check();
  }

  const FreeLBOptions& options() const noexcept {
    return options_;
  }

 protected:
  double perturb(
      size_t i,
      torch::Tensor& w,
      const torch::Tensor& g,
      double gnorm,
      const torch::Tensor& origin) override {
    if (per_example()) {
      return detail::projected_step_examples<Norm>(
          w, g, options_.alpha(), options_.epsilon(), mask(i));
    }
    return detail::projected_step<Norm>(
        w, g, gnorm, options_.alpha(), options_.epsilon(), origin);
  }

  bool share_dropout_mask() const override {
    return options_.share_dropout_mask();
  }

  bool moves_gradient_rows_only() const override {
    return true;
  }

  /// For t = 1..K: pass at W + δ with `loss / K`; if t < K, ascend along the
  /// targets' gradient of this pass alone (the sum of the earlier passes is
  /// set aside during the pass and added back after the ascent). Restore,
  /// step.
  StepResult run_step(detail::StepContext& ctx) override {
    StepResult r;
    const int64_t k = options_.steps();
    const double scale = 1.0 / static_cast<double>(k);
    const size_t n = targets().size();
    for (int64_t t = 1; t <= k; ++t) {
      std::vector<torch::Tensor> earlier(n);
      if (t < k) {
        for (size_t i = 0; i < n; ++i) {
          earlier[i] = std::move(targets()[i].mutable_grad());
          targets()[i].mutable_grad() = torch::Tensor();
        }
      }
      const double loss = ctx.pass(scale).item<double>();
      if (t == 1) {
        r.loss = loss;
      }
      r.adv_loss = loss;
      if (t < k) {
        attack();
        r.perturbation_norm = perturbation_norm_;
        for (size_t i = 0; i < n; ++i) {
          torch::Tensor& grad = targets()[i].mutable_grad();
          const torch::Tensor& rows = last_rows(i);
          if (earlier[i].defined() && grad.defined() && rows.defined()) {
            // This pass's gradient is zero outside the rows just moved.
            grad = earlier[i].index_add_(0, rows, grad.index_select(0, rows));
          } else if (earlier[i].defined() && grad.defined()) {
            grad = earlier[i].add_(grad);
          } else if (earlier[i].defined()) {
            grad = std::move(earlier[i]);
          }
        }
      }
    }
    restore();
    ctx.step_optimizer();
    return r;
  }

 private:
  void check() const {
    TORCH_CHECK(
        options_.alpha() >= 0,
        "FreeLB: Invalid alpha: ",
        options_.alpha(),
        " (must be >= 0)");
    TORCH_CHECK(
        options_.steps() >= 1,
        "FreeLB: Invalid steps: ",
        options_.steps(),
        " (must be >= 1)");
    TORCH_CHECK(
        options_.epsilon() >= 0,
        "FreeLB: Invalid epsilon: ",
        options_.epsilon(),
        " (must be >= 0; 0 means unbounded)");
    TORCH_CHECK(
        options_.init_mag() >= 0 && (per_example() || options_.init_mag() == 0),
        "FreeLB: Invalid init_mag: ",
        options_.init_mag(),
        per_example() ? " (must be >= 0)"
                      : " (the weight table starts from delta = 0; init_mag "
                        "applies to per-example targets)");
  }

  /// Per example, a random start `U(-1, 1) * mask * init_mag / sqrt(L_i * H)`,
  /// L_i the example's unpadded length.
  void on_new_step() override {
    if (!per_example() || options_.init_mag() <= 0) {
      return;
    }
    const double mag = options_.init_mag();
    for (const auto& slot : slots()) {
      slot->set_initializer([mag](torch::Tensor& d, const torch::Tensor& m) {
        d.uniform_(-1, 1);
        const auto dims = m.sum({1, 2}, /*keepdim=*/true) * d.size(-1);
        d.mul_(m * mag / dims.clamp_min(1).sqrt());
      });
    }
  }

  FreeLBOptions options_;
};

/// FreeLB with L2 steps `α * g / ‖g‖` and L2 projection (SPEC §2).
using FreeLB = BasicFreeLB<L2>;
/// FreeLB with sign steps and element-wise clamp to [-ε, ε].
using FreeLBLInf = BasicFreeLB<LInf>;

} // namespace advtrain
