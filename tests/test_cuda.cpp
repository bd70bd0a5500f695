// The strategies on CUDA tensors against the same steps on the CPU. Exits
// with 77 (ctest: skipped) where no CUDA device is present.

// Catch's runner is compiled where catch.hpp is first included
// (strategies.h includes it too).
#define CATCH_CONFIG_RUNNER
#include "catch.h"

#include "common.h"
#include "distributed_case.h"
#include "strategies.h"

#include <iostream>
#include <memory>

#if defined(ADVTRAIN_SYNC_DEBUG)
#include <c10/cuda/CUDAFunctions.h>
#endif

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
    if (!c.on_table) {
      continue; // per example only (ASCC)
    }
    if (c.draws_random()) {
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

#if defined(ADVTRAIN_SYNC_DEBUG)
// CUDA's own count: with the sync debug mode set to warn, every operation
// that waits for the device (a copy to the host, `.item()`, `nonzero`)
// warns "called a synchronizing CUDA operation". Built where the LibTorch
// has c10_cuda (ADVTRAIN_SYNC_DEBUG).

namespace {

/// The sync debug mode set to warn while alive.
struct SyncWarnings {
  SyncWarnings() {
    c10::cuda::warning_state().set_sync_debug_mode(
        c10::cuda::SyncDebugMode::L_WARN);
  }
  ~SyncWarnings() {
    c10::cuda::warning_state().set_sync_debug_mode(
        c10::cuda::SyncDebugMode::L_DISABLED);
  }
};

/// Synchronizations with the device in each of `steps` Trainer steps after
/// a first one.
template <typename Forward>
std::vector<size_t> syncs_per_step(
    advtrain::Attacker& attacker,
    torch::optim::Optimizer& opt,
    const Forward& forward,
    const torch::Tensor& y,
    int steps) {
  advtrain::Trainer trainer(opt, attacker);
  const auto loss = [&](const torch::Tensor& out) {
    return cross_entropy(out, y);
  };
  trainer.step(forward, loss); // first use: allocations, kernels loaded
  std::vector<size_t> counts;
  for (int s = 0; s < steps; ++s) {
    WarningCapture warnings;
    const SyncWarnings on;
    trainer.step(forward, loss);
    counts.push_back(warnings.count("synchronizing"));
  }
  return counts;
}

} // namespace

TEST_CASE(
    "Each strategy's Trainer::step waits for the device once per optimizer "
    "step",
    "[cuda][sync]") {
  for (const auto& c : strategies()) {
    // (FreeAT steps the optimizer once per replay, each after a read.)
    const std::vector<size_t> once(3, static_cast<size_t>(c.optimizer_steps));
    for (const bool share : {false, true}) {
      CAPTURE(c.name, share);
      if (c.on_table) {
        auto model = make_model();
        model->to(torch::kCUDA);
        const auto attacker = c.on_table(*model, "embedding", share);
        torch::optim::Adam opt(model->parameters());
        const auto x = batch_ids().cuda();
        const auto counts = syncs_per_step(
            *attacker,
            opt,
            [&] { return model->forward(x); },
            batch_labels().cuda(),
            3);
        std::cout << c.name << " table share=" << share << " syncs/step "
                  << counts[0] << ' ' << counts[1] << ' ' << counts[2] << '\n';
        CHECK(counts == once);
      }
      if (c.per_example) {
        auto model = make_act();
        model->to(torch::kCUDA);
        const auto attacker = c.per_example(model->embedding, share);
        torch::optim::Adam opt(model->parameters());
        const auto x = padded_ids().cuda();
        const auto counts = syncs_per_step(
            *attacker,
            opt,
            [&] { return model->forward(x); },
            torch::tensor({0, 1, 2}, torch::kLong).cuda(),
            3);
        std::cout << c.name << " per example share=" << share << " syncs/step "
                  << counts[0] << ' ' << counts[1] << ' ' << counts[2] << '\n';
        CHECK(counts == once);
      }
    }
  }
}
#endif

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::cout << "no CUDA device: the CUDA tests are skipped\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
