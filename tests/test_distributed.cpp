// Data-parallel training on c10d: two worker processes on loopback against
// one process on the whole batch, and DataParallel's reduction rules checked
// with two ranks on threads.

#include "distributed_case.h"

#include <advtrain/distributed.h>

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "catch.h"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;

/// A fresh path in the temporary directory for a FileStore or an output.
std::string temp_path(const std::string& what) {
  static int counter = 0;
  const fs::path p = fs::temp_directory_path() /
                     ("advtrain_dp_" + std::to_string(::getpid()) + "_" +
                      std::to_string(counter++) + "_" + what);
  fs::remove(p);
  return p.string();
}

/// Runs the worker binary once per rank, in parallel; returns exit codes.
std::vector<int> run_workers(
    int world, const std::string& method, std::vector<std::string>& outs) {
  const std::string store = temp_path("store");
  std::vector<pid_t> pids;
  for (int rank = 0; rank < world; ++rank) {
    outs.push_back(temp_path("rank" + std::to_string(rank) + ".pt"));
    std::vector<std::string> args{
        ADVTRAIN_DISTRIBUTED_WORKER,
        std::to_string(rank),
        std::to_string(world),
        store,
        method,
        outs.back()};
    std::vector<char*> argv;
    for (auto& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    pid_t pid = 0;
    REQUIRE(
        ::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) ==
        0);
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (const pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  }
  fs::remove(store);
  return codes;
}

/// Runs fn(rank, group) on `world` threads of this process, each with its
/// own Gloo group, and returns what each rank's call returned; rethrows the
/// first exception. The threads make no assertions: Catch2 reports from one
/// thread only (v3's output redirection aborts when two threads report at
/// once), so the tests check the returned values after the join.
template <class Result>
std::vector<Result> on_threads(
    int world,
    const std::function<Result(int, c10::intrusive_ptr<c10d::ProcessGroup>)>&
        fn) {
  const std::string store = temp_path("store");
  std::vector<std::exception_ptr> errors(world);
  std::vector<Result> results(world);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        auto s = c10::make_intrusive<c10d::FileStore>(store, world);
        results[rank] = fn(rank, advtrain::make_gloo_group(s, rank, world));
      } catch (...) {
        errors[rank] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  fs::remove(store);
  for (auto& e : errors) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
  return results;
}

} // namespace

TEST_CASE(
    "Two workers on loopback equal one process on the whole batch",
    "[distributed]") {
  const std::string method = GENERATE("fgm", "freelb", "freeat");
  CAPTURE(method);
  std::vector<std::string> outs;
  const auto codes = run_workers(2, method, outs);
  REQUIRE(codes == std::vector<int>{0, 0});

  auto whole = dp_case::make_net(/*seed=*/100); // rank 0's initialization
  const auto expected = dp_case::train(
      whole, method, dp_case::ids(), dp_case::labels(), [](auto&) {});
  // One process on rank 0's shard alone: what a worker would reach without
  // the all-reduce. It must differ, or the comparison proves nothing.
  auto alone = dp_case::make_net(100);
  const auto local = dp_case::train(
      alone,
      method,
      dp_case::shard(dp_case::ids(), 0, 2),
      dp_case::shard(dp_case::labels(), 0, 2),
      [](auto&) {});
  REQUIRE(fixture::max_diff_all(local, expected) > 1e-3);

  // FreeAT steps the optimizer (so reduces) once per replay.
  const int64_t per_step = method == "freeat" ? 3 : 1;
  for (const auto& out : outs) {
    std::vector<torch::Tensor> got;
    torch::load(got, out);
    fs::remove(out);
    REQUIRE(got.size() == expected.size() + 1);
    CHECK(got.back().item<int64_t>() == per_step * dp_case::kSteps);
    got.pop_back();
    CHECK(fixture::max_diff_all(got, expected) < 1e-12);
  }
}

TEST_CASE(
    "DataParallel averages, broadcasts and keeps undefined gradients",
    "[distributed]") {
  struct Seen {
    torch::Tensor a, b;           // after the broadcast
    torch::Tensor ga, gb, gc, gd; // after the all-reduce
    int64_t reductions = 0, world = 0, rank = -1;
  };
  using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
  const auto seen = on_threads<Seen>(2, [](int rank, Group group) {
    const double r = rank;
    auto a = torch::full({2, 3}, 10.0 * (r + 1)).requires_grad_();
    auto b = torch::full({4}, -1.0 - r, torch::kHalf).requires_grad_();
    auto c = torch::zeros({5}).requires_grad_(); // no gradient anywhere
    auto d = torch::zeros({2}, torch::kDouble).requires_grad_();
    advtrain::DataParallel dp(group, {a, b, c, d});
    Seen s;
    s.a = a.detach().clone();
    s.b = b.detach().clone();
    a.mutable_grad() = torch::arange(6.0).view({2, 3}) * (r + 1);
    // float16 ends at 65504: summed in float16, 60000 + 60000 would be inf.
    b.mutable_grad() = torch::full({4}, 60000.0, torch::kHalf);
    if (rank == 1) { // defined on one worker only: zero on the other
      d.mutable_grad() = torch::tensor({4.0, -2.0}, torch::kDouble);
    }
    dp.all_reduce_gradients();
    s.ga = a.grad();
    s.gb = b.grad();
    s.gc = c.grad();
    s.gd = d.grad();
    s.reductions = dp.reductions();
    s.world = dp.world_size();
    s.rank = dp.rank();
    return s;
  });
  for (int rank = 0; rank < 2; ++rank) {
    CAPTURE(rank);
    const Seen& s = seen[rank];
    // Broadcast: rank 0's values everywhere.
    CHECK(torch::equal(s.a, torch::full({2, 3}, 10.0)));
    CHECK(torch::equal(s.b, torch::full({4}, -1.0, torch::kHalf)));
    CHECK(torch::allclose(s.ga, torch::arange(6.0).view({2, 3}) * 1.5));
    CHECK(s.gb.scalar_type() == torch::kHalf);
    CHECK(torch::equal(s.gb, torch::full({4}, 60000.0, torch::kHalf)));
    CHECK_FALSE(s.gc.defined());
    REQUIRE(s.gd.defined());
    CHECK(torch::equal(s.gd, torch::tensor({2.0, -1.0}, torch::kDouble)));
    CHECK(s.reductions == 1);
    CHECK(s.world == 2);
    CHECK(s.rank == rank);
  }
}

TEST_CASE("DataParallel refuses bad input", "[distributed][errors]") {
  // One rank: the group is made on this thread, where the checks run.
  const std::string store = temp_path("store");
  auto group = advtrain::make_gloo_group(
      c10::make_intrusive<c10d::FileStore>(store, 1), 0, 1);
  {
    auto w = torch::zeros({3, 3}).requires_grad_();
    CHECK_THROWS_WITH(
        advtrain::DataParallel(
            group, {w}, advtrain::DataParallelOptions().root(1)),
        fixture::matchers::Contains("Invalid root: 1"));
    CHECK_THROWS_WITH(
        advtrain::DataParallel(group, {torch::zeros({3})}),
        fixture::matchers::Contains("require grad"));
    advtrain::DataParallel dp(group, {w});
    w.mutable_grad() = torch::eye(3).to_sparse();
    CHECK_THROWS_WITH(
        dp.all_reduce_gradients(), fixture::matchers::Contains("sparse"));
    CHECK_THROWS_WITH(
        advtrain::make_gloo_group(c10::make_intrusive<c10d::HashStore>(), 2, 2),
        fixture::matchers::Contains("Invalid rank: 2"));
  }
  fs::remove(store);
}

TEST_CASE(
    "A non-finite loss on one worker skips the step on every worker",
    "[distributed][nonfinite]") {
  // The skip is decided on the all-reduced gradients, the same everywhere:
  // no worker waits alone in an all-reduce, and none steps.
  struct Seen {
    int64_t skipped = -1, reductions = -1;
    bool unchanged = false;
  };
  using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
  const auto seen = on_threads<Seen>(2, [](int rank, Group group) {
    auto model = fixture::make_model();
    advtrain::FGM fgm(*model, "embedding");
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
    advtrain::Trainer trainer(opt, fgm);
    advtrain::DataParallel dp(group, model->parameters());
    dp.attach(trainer);
    const auto before = fixture::clone_all(model->parameters());
    const auto r = trainer.step(
        [&] { return model->forward(fixture::batch_ids()); },
        [&](const torch::Tensor& out) {
          const auto l = fixture::cross_entropy(out, fixture::batch_labels());
          return rank == 1 ? l * std::numeric_limits<double>::quiet_NaN() : l;
        });
    Seen s;
    s.skipped = r.skipped;
    s.unchanged =
        fixture::equal_all(fixture::clone_all(model->parameters()), before);
    s.reductions = dp.reductions();
    return s;
  });
  for (int rank = 0; rank < 2; ++rank) {
    CAPTURE(rank);
    CHECK(seen[rank].skipped == 1);
    CHECK(seen[rank].unchanged);
    CHECK(seen[rank].reductions == 1);
  }
}
