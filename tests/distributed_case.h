#pragma once

// The data-parallel case shared by the distributed test and its worker
// processes: fixture::ActNet (the per-example target), a batch of 8
// sentences, and one strategy by name. A worker trains on its shard of the
// batch; the test trains one process on the whole batch and compares.

#include "common.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace dp_case {

/// The batch's tokens run up to 8.
constexpr int64_t kVocab = 9;
constexpr int kSteps = 2;

using Net = fixture::ActNet;

inline Net make_net(uint64_t seed) {
  return fixture::make_act(seed, kVocab);
}

inline torch::Tensor ids() {
  return torch::tensor(
      {{3, 1, 2, 0, 0},
       {4, 4, 6, 2, 5},
       {1, 0, 0, 0, 0},
       {7, 8, 2, 3, 0},
       {5, 5, 5, 1, 2},
       {8, 6, 0, 0, 0},
       {2, 7, 1, 4, 6},
       {6, 3, 0, 0, 0}},
      torch::kLong);
}
inline torch::Tensor labels() {
  return torch::tensor({0, 2, 1, 1, 0, 2, 2, 1}, torch::kLong);
}

/// Rows [rank * n / world, (rank + 1) * n / world) of t.
inline torch::Tensor shard(const torch::Tensor& t, int rank, int world) {
  const int64_t n = t.size(0) / world;
  return t.narrow(0, rank * n, n);
}

/// "fgm", "freelb" or "freeat", with options under which a worker's
/// perturbation of an example does not depend on the other examples.
inline std::unique_ptr<advtrain::Attacker> make_attacker(
    const std::string& method, const Net& net) {
  if (method == "fgm") {
    return std::make_unique<advtrain::FGM>(
        net->embedding, advtrain::FGMOptions().epsilon(0.7));
  }
  if (method == "freelb") {
    return std::make_unique<advtrain::FreeLB>(
        net->embedding,
        advtrain::FreeLBOptions().alpha(0.3).epsilon(0.5).steps(3).init_mag(0));
  }
  if (method == "freeat") {
    return std::make_unique<advtrain::FreeAT>(
        net->embedding,
        advtrain::FreeATOptions().alpha(0.2).epsilon(0.3).replays(3));
  }
  TORCH_CHECK(false, "unknown method ", method);
}

/// The parameters after `kSteps` Trainer steps with SGD on (x, y);
/// `prepare(trainer, net)` runs first (e.g. attaches a DataParallel).
template <typename Prepare>
std::vector<torch::Tensor> train(
    Net& net,
    const std::string& method,
    const torch::Tensor& x,
    const torch::Tensor& y,
    Prepare prepare) {
  auto attacker = make_attacker(method, net);
  torch::optim::SGD opt(
      net->parameters(), torch::optim::SGDOptions(fixture::kLr));
  advtrain::Trainer trainer(opt, *attacker);
  prepare(trainer);
  for (int s = 0; s < kSteps; ++s) {
    trainer.step(
        [&] { return net->forward(x); },
        [&](const torch::Tensor& out) {
          return torch::nn::functional::cross_entropy(out, y);
        });
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : net->parameters()) {
    out.push_back(p.detach().clone());
  }
  return out;
}

} // namespace dp_case
