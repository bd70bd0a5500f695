// What an attacker's archive carries besides its state: the header (kind,
// C++ type, step count) checked on load, and a checksum of the state's
// tensors, so that a corrupted archive is refused rather than loaded.
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

/// Writes what every attacker's archive starts with: the strategy's `kind`,
/// its C++ type and its step count (with a checksum).
inline void write_header(
    torch::serialize::OutputArchive& archive,
    const char* kind,
    const std::string& type_name,
    int64_t steps_done) {
  archive.write("advtrain.kind", c10::IValue(std::string(kind)));
  archive.write("advtrain.type", c10::IValue(type_name));
  archive.write("advtrain.steps_done", c10::IValue(steps_done));
  archive.write(
      "advtrain.steps_checksum",
      c10::IValue(checksum({torch::tensor(steps_done)})));
}

/// Reads and checks what `write_header` wrote: the archive must hold the
/// state of `kind` and of the C++ type `type_name` (archives written before
/// types were recorded hold none), with a valid step count, returned.
inline int64_t read_header(
    torch::serialize::InputArchive& archive,
    const char* kind,
    const std::string& type_name) {
  c10::IValue saved_kind;
  TORCH_CHECK(
      archive.try_read("advtrain.kind", saved_kind) && saved_kind.isString(),
      "advtrain: ",
      kind,
      ": the archive holds no advtrain attacker state");
  TORCH_CHECK(
      saved_kind.toStringRef() == kind,
      "advtrain: the archive holds the state of ",
      saved_kind.toStringRef(),
      ", not of ",
      kind);
  c10::IValue type;
  if (archive.try_read("advtrain.type", type)) { // (older archives: none)
    TORCH_CHECK(
        type.isString() && type.toStringRef() == type_name,
        "advtrain: the archive holds the state of ",
        type.isString() ? type.toStringRef() : std::string("?"),
        ", not of ",
        type_name);
  }
  c10::IValue steps;
  TORCH_CHECK(
      archive.try_read("advtrain.steps_done", steps) && steps.isInt() &&
          steps.toInt() >= 0,
      "advtrain: ",
      kind,
      ": the archive's step count is missing or not a count; nothing was "
      "loaded");
  check_checksum(
      archive, "advtrain.steps_checksum", {torch::tensor(steps.toInt())}, kind);
  return steps.toInt();
}

} // namespace detail
} // namespace advtrain
