// Data-parallel training on c10d: `DataParallel` averages the gradients over
// a process group once per optimizer step (optional; needs USE_DISTRIBUTED).
#pragma once

/// Data-parallel training on LibTorch's distributed engine (c10d).
///
/// Optional: the umbrella header does not include it, so the core needs no
/// c10d. Each worker runs the method's passes on its own shard of the batch
/// (its perturbation comes from its own gradients, as with DDP's `no_sync`
/// in Python); `DataParallel` then averages the gradients across the group
/// once per optimizer step.

#include <advtrain/trainer.h>

#include <torch/torch.h>
#include <torch/version.h>

#if !defined(USE_DISTRIBUTED)
#error \
    "advtrain/distributed.h needs a LibTorch built with USE_DISTRIBUTED \
(link the `torch` CMake target, which defines it)"
#endif

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(USE_C10D_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace advtrain {

struct DataParallelOptions {
  /// Copy the root's parameters to every worker on construction, so that all
  /// start from the same model.
  TORCH_ARG(bool, broadcast_parameters) = true;
  /// The worker whose parameters are broadcast.
  TORCH_ARG(int64_t, root) = 0;
};

/// Averages the gradients of `params` across a c10d process group: one
/// all-reduce per (device, dtype) of the gradients, whatever their number.
///
/// Attach it to a Trainer (`attach`) so that it runs before every optimizer
/// step the protocol makes, or call `all_reduce_gradients()` yourself before
/// `optimizer.step()` (e.g. after `Trainer::accumulate` over micro-batches).
///
/// A gradient that is undefined on some workers counts as zero there; one
/// that is undefined on every worker stays undefined. Gradients in float16 or
/// bfloat16 are summed in float32. Each worker should scale its loss as a
/// mean over its own shard: the average over equal shards is then the
/// gradient of the mean over the whole batch.
class DataParallel {
 public:
  explicit DataParallel(
      c10::intrusive_ptr<c10d::ProcessGroup> group,
      std::vector<torch::Tensor> params,
      DataParallelOptions options = {})
      : group_(std::move(group)),
        params_(std::move(params)),
        options_(options) {
    TORCH_CHECK(group_, "advtrain: DataParallel needs a process group");
    TORCH_CHECK(
        options_.root() >= 0 && options_.root() < group_->getSize(),
        "Invalid root: ",
        options_.root(),
        " (the group has ",
        group_->getSize(),
        " workers)");
    for (const auto& p : params_) {
      TORCH_CHECK(
          p.defined() && p.requires_grad(),
          "advtrain: DataParallel's parameters must be defined tensors that "
          "require grad");
    }
    if (options_.broadcast_parameters()) {
      broadcast_parameters();
    }
  }

  /// Copies the root's parameter values to every worker.
  void broadcast_parameters() {
    torch::NoGradGuard no_grad;
    for (auto& group : by_kind(/*grads=*/false)) {
      auto& members = group.second;
      std::vector<torch::Tensor> flat{flatten(members, /*grads=*/false)};
      c10d::BroadcastOptions opts;
      opts.rootRank = options_.root();
      group_->broadcast(flat, opts)->wait();
      int64_t offset = 0;
      for (const size_t i : members) {
        const int64_t n = params_[i].numel();
        params_[i].copy_(flat[0].narrow(0, offset, n).view_as(params_[i]));
        offset += n;
      }
    }
  }

  /// Replaces every gradient by its average over the group.
  void all_reduce_gradients() {
    torch::NoGradGuard no_grad;
    const double world = static_cast<double>(group_->getSize());
    for (auto& group : by_kind(/*grads=*/true)) {
      auto& members = group.second;
      // One buffer: the gradients, then one count per parameter saying on
      // how many workers its gradient was defined.
      std::vector<torch::Tensor> flat{flatten(members, /*grads=*/true)};
      group_->allreduce(flat)->wait();
      const int64_t total = flat[0].numel() - members.size();
      // The counts are read on the host only when a gradient is undefined
      // here: one defined here is defined on at least one worker, so the
      // common case makes no device-to-host copy.
      bool all_defined = true;
      for (const size_t i : members) {
        all_defined = all_defined && params_[i].grad().defined();
      }
      const std::vector<double> defined_on =
          all_defined ? std::vector<double>(members.size(), 1.0)
                      : to_vector(flat[0].narrow(0, total, members.size()));
      int64_t offset = 0;
      for (size_t k = 0; k < members.size(); ++k) {
        const torch::Tensor& p = params_[members[k]];
        const int64_t n = p.numel();
        if (defined_on[k] > 0) {
          torch::Tensor mean =
              flat[0].narrow(0, offset, n).view(p.sizes()).div_(world);
          torch::Tensor& g = p.mutable_grad();
          if (g.defined()) {
            g.copy_(mean);
          } else {
            g = mean.to(p.scalar_type()).clone();
          }
        }
        offset += n;
      }
    }
    ++reductions_;
  }

  /// Makes `trainer` average the gradients before each optimizer step.
  void attach(Trainer& trainer) {
    trainer.before_optimizer_step([this] { all_reduce_gradients(); });
  }

  int64_t rank() const {
    return group_->getRank();
  }
  int64_t world_size() const {
    return group_->getSize();
  }
  /// How many times the gradients were averaged.
  int64_t reductions() const noexcept {
    return reductions_;
  }
  const c10::intrusive_ptr<c10d::ProcessGroup>& group() const noexcept {
    return group_;
  }

 private:
  /// The parameters' indices, grouped by device and by the dtype they are
  /// reduced in (float32 for the 16-bit floating types).
  std::map<std::tuple<std::string, int>, std::vector<size_t>> by_kind(
      bool grads) const {
    std::map<std::tuple<std::string, int>, std::vector<size_t>> kinds;
    for (size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      if (grads) {
        TORCH_CHECK(
            !p.grad().defined() || !p.grad().is_sparse(),
            "advtrain: DataParallel does not reduce sparse gradients");
      }
      const auto dtype =
          grads ? reduce_dtype(p.scalar_type()) : p.scalar_type();
      kinds[{p.device().str(), static_cast<int>(dtype)}].push_back(i);
    }
    return kinds;
  }

  static torch::ScalarType reduce_dtype(torch::ScalarType t) {
    return t == torch::kHalf || t == torch::kBFloat16 ? torch::kFloat : t;
  }

  torch::Tensor flatten(const std::vector<size_t>& members, bool grads) const {
    std::vector<torch::Tensor> parts;
    std::vector<double> defined;
    const auto& first = params_[members.front()];
    const auto dtype =
        grads ? reduce_dtype(first.scalar_type()) : first.scalar_type();
    for (const size_t i : members) {
      const auto& p = params_[i];
      const torch::Tensor& src = grads ? p.grad() : p;
      if (src.defined()) {
        parts.push_back(src.detach().reshape(-1).to(dtype));
      } else {
        parts.push_back(torch::zeros({p.numel()}, p.options().dtype(dtype)));
      }
      defined.push_back(src.defined() ? 1.0 : 0.0);
    }
    if (grads) {
      parts.push_back(
          torch::tensor(defined, torch::kDouble).to(first.device(), dtype));
    }
    return torch::cat(parts);
  }

  static std::vector<double> to_vector(const torch::Tensor& t) {
    const torch::Tensor c = t.to(torch::kCPU, torch::kDouble).contiguous();
    return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::vector<torch::Tensor> params_;
  DataParallelOptions options_;
  int64_t reductions_ = 0;
};

#if defined(USE_C10D_GLOO)
/// A Gloo process group of `world_size` workers that meet through `store`
/// (a `c10d::FileStore` on a shared file, or a `c10d::TCPStore`), talking
/// over the network interface of `hostname` (loopback by default).
inline c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(
    c10::intrusive_ptr<c10d::Store> store,
    int rank,
    int world_size,
    const std::string& hostname = "127.0.0.1") {
  TORCH_CHECK(
      world_size >= 1 && rank >= 0 && rank < world_size,
      "Invalid rank: ",
      rank,
      " (world size ",
      world_size,
      ")");
  auto options = c10d::ProcessGroupGloo::Options::create();
  options->devices.push_back(
      c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
#if TORCH_VERSION_MAJOR >= 2
  // LibTorch 2: Gloo is a backend that a process group dispatches to.
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
      store, rank, world_size, options);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(
      std::move(store), rank, world_size);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setBackend(
      c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  return group;
#else
  return c10::make_intrusive<c10d::ProcessGroupGloo>(
      std::move(store), rank, world_size, options);
#endif
}
#endif

} // namespace advtrain
