#pragma once

#include <advtrain/attacker.h>

#include <utility>
#include <vector>

namespace advtrain {

/// Runs one strategy's whole protocol (SPEC §3) for one batch, with any
/// `torch::nn::Module` (through closures) and any `torch::optim::Optimizer`.
///
/// The step starts from zero gradients and ends with the optimizer's update;
/// the targets are restored before every `optimizer.step()`. If a closure
/// throws, the weights and gradients are put back as they were before the
/// step and the exception reaches the caller (FreeAT, which steps the
/// optimizer once per replay, keeps the replays that completed).
class Trainer {
 public:
  Trainer(torch::optim::Optimizer& optimizer, Attacker& attacker)
      : optimizer_(optimizer), attacker_(attacker) {
    if (attacker_.watched().empty()) {
      attacker_.watch_grads(detail::optimizer_parameters(optimizer_));
    }
  }

  /// One batch: `forward()` gives the model's output on it, `loss_fn(output)`
  /// a scalar loss.
  StepResult step(const ForwardFunction& forward, const LossFunction& loss_fn) {
    TORCH_CHECK(
        forward && loss_fn, "advtrain: Trainer::step needs two closures");
    const std::vector<torch::Tensor> params = detail::union_of(
        detail::optimizer_parameters(optimizer_), attacker_.targets());
    detail::StepContext ctx{optimizer_, forward, loss_fn, params};
    if (attacker_.share_dropout_mask()) {
      ctx.replay.emplace(attacker_.targets());
    }
    std::vector<torch::Tensor> before = ctx.take_grads(); // zero_grad
    try {
      StepResult r = attacker_.run_step(ctx);
      r.passes = ctx.passes;
      ++attacker_.steps_done_;
      return r;
    } catch (...) {
      attacker_.restore();
      ctx.put_grads(std::move(before));
      throw;
    }
  }

  torch::optim::Optimizer& optimizer() noexcept {
    return optimizer_;
  }
  Attacker& attacker() noexcept {
    return attacker_;
  }

 private:
  torch::optim::Optimizer& optimizer_;
  Attacker& attacker_;
};

} // namespace advtrain
