#pragma once

// Data-parallel training over several processes (--world-size): starting
// the workers, joining their c10d Gloo group, and averaging gradients over
// it. With LibTorch built without Gloo, one process only.

#include "config.h"

#include <advtrain/advtrain.h>
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
#include <advtrain/distributed.h>
#endif

#include <fmt/core.h>
#include <torch/torch.h>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace example {

#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
#else
using Group = std::nullptr_t;
#endif

/// Throws unless this build can run several processes.
inline void require_gloo() {
#if !defined(TEXT_CLASSIFIER_DISTRIBUTED)
  throw std::runtime_error(
      "--world-size needs a LibTorch built with c10d Gloo");
#endif
}

/// The group of the workers this one (--rank) belongs to; null with one
/// process.
inline Group join_group(const Config& c) {
  Group group;
  if (c.world_size > 1) {
    require_gloo();
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
    if (c.rank >= c.world_size || c.store.empty()) {
      throw std::runtime_error(
          "--rank must be below --world-size, with --store set");
    }
    group = advtrain::make_gloo_group(
        c10::make_intrusive<c10d::FileStore>(c.store, c.world_size),
        c.rank,
        c.world_size);
#endif
  }
  return group;
}

/// Starts this program once per rank (same arguments, plus --rank and
/// --store) and waits for all; non-zero if any worker failed.
inline int launch_workers(int argc, char** argv, const Config& c) {
  require_gloo();
  const std::string store =
      (std::filesystem::temp_directory_path() /
       fmt::format("text_classifier_store_{}", ::getpid()))
          .string();
  std::filesystem::remove(store);
  std::vector<pid_t> pids;
  for (int r = 0; r < c.world_size; ++r) {
    std::vector<std::string> args(argv, argv + argc);
    args.insert(args.end(), {"--rank", std::to_string(r), "--store", store});
    std::vector<char*> cargs;
    for (auto& a : args) {
      cargs.push_back(a.data());
    }
    cargs.push_back(nullptr);
    pid_t pid = 0;
    if (::posix_spawn(
            &pid, "/proc/self/exe", nullptr, nullptr, cargs.data(), environ) !=
        0) {
      throw std::runtime_error("cannot start worker " + std::to_string(r));
    }
    pids.push_back(pid);
  }
  int failed = 0;
  for (const pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::filesystem::remove(store);
  if (failed > 0) {
    fmt::print(
        stderr, "error: {} of {} workers failed\n", failed, c.world_size);
    return 1;
  }
  return 0;
}

/// Averages gradients over the workers of `group` before each optimizer step
/// (nothing with one process).
struct Reducer {
#if defined(TEXT_CLASSIFIER_DISTRIBUTED)
  std::optional<advtrain::DataParallel> dp;
  Reducer(const Group& group, const std::vector<torch::Tensor>& params) {
    if (group) {
      dp.emplace(group, params);
    }
  }
  void attach(advtrain::Trainer& trainer) {
    if (dp) {
      dp->attach(trainer);
    }
  }
  void all_reduce() {
    if (dp) {
      dp->all_reduce_gradients();
    }
  }
#else
  Reducer(const Group&, const std::vector<torch::Tensor>&) {}
  void attach(advtrain::Trainer&) {}
  void all_reduce() {}
#endif
};

} // namespace example
