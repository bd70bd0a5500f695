// What an attacker's archive carries besides its state: a checksum of the
// state's tensors, so that a corrupted archive is refused rather than
// loaded.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace advtrain {
namespace detail {

/// FNV-1a (64 bits) over the dtype, shape and bytes of each tensor, in
/// order (undefined tensors count as a marker), as an int64 for an archive.
inline int64_t checksum(const std::vector<torch::Tensor>& ts) {
  uint64_t h = 1469598103934665603ULL;
  const auto mix = [&h](const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t k = 0; k < n; ++k) {
      h = (h ^ p[k]) * 1099511628211ULL;
    }
  };
  for (const auto& t : ts) {
    if (!t.defined()) {
      mix("-", 1);
      continue;
    }
    const torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    const auto type = static_cast<int8_t>(c.scalar_type());
    mix(&type, sizeof type);
    for (const int64_t d : c.sizes()) {
      mix(&d, sizeof d);
    }
    mix(c.data_ptr(), c.nbytes());
  }
  int64_t out = 0;
  std::memcpy(&out, &h, sizeof out);
  return out;
}

/// Refuses an archive whose `key` checksum does not match `ts` (an archive
/// without one, written before checksums, is taken as it is).
inline void check_checksum(
    torch::serialize::InputArchive& archive,
    const std::string& key,
    const std::vector<torch::Tensor>& ts,
    const char* kind) {
  c10::IValue saved;
  if (!archive.try_read(key, saved)) {
    return;
  }
  TORCH_CHECK(
      saved.isInt() && saved.toInt() == checksum(ts),
      "advtrain: ",
      kind,
      ": the archive's state does not match its checksum (",
      key,
      "): the file is corrupted; nothing was loaded");
}

} // namespace detail
} // namespace advtrain
