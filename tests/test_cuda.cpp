// The strategies on CUDA tensors against the same steps on the CPU. Exits
// with 77 (ctest: skipped) where no CUDA device is present.

// Catch's runner is compiled where catch.hpp is first included
// (strategies.h includes it too).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "common.h"
#include "distributed_case.h"
#include "strategies.h"

#include <iostream>
#include <memory>

using namespace fixture;

namespace {

/// One Trainer step of `make(model)` with SGD on `device`; the parameters
/// afterwards, on the CPU.
template <typename Make>
std::vector<torch::Tensor> step_on(const torch::Device& device, Make make) {
  auto model = make_model();
  model->to(device);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  auto attacker = make(model);
  advtrain::Trainer trainer(opt, *attacker);
  const auto x = batch_ids().to(device);
  const auto y = batch_labels().to(device);
  for (int s = 0; s < 2; ++s) {
    trainer.step(
        [&] { return model->forward(x); },
        [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) {
    REQUIRE(p.device() == device);
    out.push_back(p.detach().cpu());
  }
  return out;
}

} // namespace

TEST_CASE("Each strategy on the weight table: CUDA equals CPU", "[cuda]") {
  for (const auto& c : strategies()) {
    if (c.draws_random) {
      continue; // the CUDA generator draws other numbers than the CPU's
    }
    CAPTURE(c.name);
    auto make = [&](TinyNet& m) { return c.on_table(*m, "embedding", false); };
    const auto cpu = step_on(torch::kCPU, make);
    const auto gpu = step_on(torch::kCUDA, make);
    CHECK(max_diff_all(cpu, gpu) < 1e-9);
  }
}

TEST_CASE("Each strategy per example: CUDA equals CPU", "[cuda]") {
  for (const std::string method : {"fgm", "freelb", "freeat"}) {
    CAPTURE(method);
    auto on_cpu = dp_case::make_net(3);
    const auto cpu = dp_case::train(
        on_cpu, method, dp_case::ids(), dp_case::labels(), [](auto&) {});
    auto on_gpu = dp_case::make_net(3);
    on_gpu->to(torch::kCUDA);
    const auto gpu = dp_case::train(
        on_gpu,
        method,
        dp_case::ids().cuda(),
        dp_case::labels().cuda(),
        [](auto&) {});
    for (const auto& p : gpu) {
      REQUIRE(p.is_cuda());
    }
    CHECK(max_diff_all(cpu, gpu) < 1e-9);
  }
}

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::cout << "no CUDA device: the CUDA tests are skipped\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
