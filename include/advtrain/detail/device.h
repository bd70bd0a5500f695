// The device switch: whether a step may read the device to the host (in
// host memory a read waits for no device) or must keep its decisions on the
// device, and the per-thread hook with which tests take the device's path
// on the CPU.
#pragma once

#include <torch/torch.h>

namespace advtrain {
namespace detail {

/// Set (per thread) to take the sync-free paths on every device, as a CUDA
/// device does; tests set it to count host reads on the CPU.
inline bool& force_sync_free() {
  thread_local bool on = false;
  return on;
}

/// Whether work on `t` avoids ops whose output's size depends on its values
/// (`nonzero`, `masked_select`: each waits for the device on CUDA) and
/// reads to the host (`item`). In host memory a read waits for no device,
/// and a branch on it skips work that `where` would do on every element.
inline bool sync_free(const torch::Tensor& t) {
  return !t.device().is_cpu() || force_sync_free();
}

} // namespace detail
} // namespace advtrain
