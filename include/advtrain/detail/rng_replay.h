// The random replay of a step's passes: every pass draws the first pass's
// random numbers (dropout masks), and no number is used twice.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace advtrain {
namespace detail {

/// Makes every forward pass of one step draw the same random numbers (hence
/// the same dropout masks, for any model): the default generators' states
/// (CPU, and each CUDA device of the targets) are saved when the first pass
/// begins and put back before each later one. No number is used twice:
/// - a random start drawn at a lookup of the first pass is jumped over at the
///   same lookup of later passes (`start_drawn`, `at_lookup`), so they draw
///   the first pass's masks on both sides of the lookup;
/// - after each later pass the generators go back to the frontier, the
///   furthest point the step's stream reached (past the first pass and
///   whatever was drawn between passes, e.g. SMART's noise).
/// So the step leaves the generators past every number it consumed, and the
/// next step draws new ones.
class RngReplay {
 public:
  using States = std::vector<torch::Tensor>;

  /// `tensors`: those the step works on (their devices' generators replay).
  explicit RngReplay(const std::vector<torch::Tensor>& tensors) {
    generators_.push_back(
        at::globalContext().defaultGenerator(torch::Device(torch::kCPU)));
    for (const auto& t : tensors) {
      if (!t.device().is_cpu()) {
        auto g = at::globalContext().defaultGenerator(t.device());
        bool seen = false;
        for (const auto& h : generators_) {
          seen = seen || h == g;
        }
        if (!seen) {
          generators_.push_back(g);
        }
      }
    }
  }

  /// Before a pass: the first call saves the states; later ones note the
  /// frontier and put the saved states back.
  void before_pass() {
    ++passes_;
    lookups_ = 0;
    if (passes_ == 1) {
      start_ = get();
      return;
    }
    frontier_ = get();
    set(start_);
  }

  /// After a pass: later passes return to the frontier.
  void after_pass() {
    if (passes_ > 1) {
      set(frontier_);
    }
  }

  /// A random start was just drawn inside the current lookup (first pass).
  void start_drawn() {
    drawn_ = true;
  }

  /// At the end of each lookup of a perturbed embedding: in the first pass,
  /// notes where the stream stands after a start drawn in it; in later passes,
  /// jumps to that point (over the start's numbers).
  void at_lookup() {
    const size_t i = lookups_++;
    if (passes_ == 1) {
      if (drawn_) {
        skips_.resize(std::max(skips_.size(), i + 1));
        skips_[i] = get();
        drawn_ = false;
      }
    } else if (passes_ > 1 && i < skips_.size() && !skips_[i].empty()) {
      set(skips_[i]);
    }
  }

  /// The stream's state now (YOPO marks where its first layer begins in the
  /// first pass).
  States mark() {
    return get();
  }

  /// Runs `f` from `mark` (taken in the first pass), then returns to the
  /// frontier, even if `f` throws.
  template <typename F>
  torch::Tensor replay_from(const States& mark, const F& f) {
    struct Back {
      RngReplay& r;
      States frontier;
      ~Back() {
        r.set(frontier);
      }
    } back{*this, get()};
    set(mark);
    return f();
  }

 private:
  States get() {
    States states;
    for (auto& g : generators_) {
      std::lock_guard<std::mutex> lock(g.mutex());
      states.push_back(g.get_state());
    }
    return states;
  }
  void set(const States& states) {
    for (size_t i = 0; i < generators_.size(); ++i) {
      std::lock_guard<std::mutex> lock(generators_[i].mutex());
      generators_[i].set_state(states[i]);
    }
  }

  std::vector<at::Generator> generators_;
  States start_, frontier_;
  std::vector<States> skips_; // per lookup index of the first pass
  int64_t passes_ = 0;
  size_t lookups_ = 0;
  bool drawn_ = false;
};

} // namespace detail
} // namespace advtrain
