#pragma once

// Shared fixtures: a tiny float64 text classifier built from LibTorch modules,
// and the same math written plainly with tensor ops (no nn modules, no
// advtrain code) to check the library against.

#include <advtrain/advtrain.h>

#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fixture {

/// Whether `T` has an own-loop `attack()` (a `SearchAttacker`), detected
/// at compile time.
template <typename T, typename = void>
constexpr bool has_attack = false;
template <typename T>
constexpr bool
    has_attack<T, std::void_t<decltype(std::declval<T&>().attack())>> = true;

constexpr int64_t kVocab = 7;
constexpr int64_t kHidden = 4;
constexpr int64_t kClasses = 3;
constexpr int64_t kBatch = 3;
constexpr int64_t kLength = 5;

/// embedding -> mean over the sequence -> linear.
struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl()
      : embedding(register_module(
            "embedding", torch::nn::Embedding(kVocab, kHidden))),
        fc(register_module("fc", torch::nn::Linear(kHidden, kClasses))) {
    to(torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return fc(embedding(x).mean(1));
  }
  torch::nn::Embedding embedding;
  torch::nn::Linear fc;
};
TORCH_MODULE(TinyNet);

/// A batch whose tokens leave rows 5 and 6 of the table unused.
inline torch::Tensor batch_ids() {
  return torch::tensor(
      {{0, 1, 2, 3, 1}, {4, 4, 0, 2, 2}, {3, 1, 0, 0, 4}}, torch::kLong);
}
inline torch::Tensor batch_labels() {
  return torch::tensor({0, 2, 1}, torch::kLong);
}

/// A model with a fixed initialization.
inline TinyNet make_model(uint64_t seed = 7) {
  torch::manual_seed(seed);
  return TinyNet();
}

/// The per-example target's model: PerturbedEmbedding (token 0 pads) ->
/// masked mean -> linear, float64. Counts its forward passes.
struct ActNetImpl : torch::nn::Module {
  explicit ActNetImpl(int64_t vocab = kVocab)
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(vocab, kHidden).padding_idx(0)))),
        fc(register_module("fc", torch::nn::Linear(kHidden, kClasses))) {
    to(torch::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto m = x.ne(0).unsqueeze(-1).to(torch::kDouble);
    const auto e = embedding(x);
    ++forwards;
    return fc((e * m).sum(1) / m.sum(1).clamp_min(1));
  }
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear fc;
  int forwards = 0;
};
TORCH_MODULE(ActNet);

/// Token 0 is padding: the masked positions.
inline torch::Tensor padded_ids() {
  return torch::tensor(
      {{3, 1, 2, 0, 0}, {4, 4, 6, 2, 5}, {1, 0, 0, 0, 0}}, torch::kLong);
}

/// The mask [B, L, 1] of real (1) and padded (0) positions, float64.
inline torch::Tensor mask_of(const torch::Tensor& x) {
  return x.ne(0).unsqueeze(-1).to(torch::kDouble);
}

/// A model split for YOPO at its first layer: PerturbedEmbedding (token 0
/// pads) -> first = tanh(linear) per token -> rest = masked mean -> linear,
/// float64.
struct SplitNetImpl : torch::nn::Module {
  SplitNetImpl()
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(kVocab, kHidden).padding_idx(0)))),
        layer(register_module("layer", torch::nn::Linear(kHidden, kHidden))),
        fc(register_module("fc", torch::nn::Linear(kHidden, kClasses))) {
    to(torch::kDouble);
  }
  torch::Tensor first(const torch::Tensor& e) {
    return torch::tanh(layer(e));
  }
  torch::Tensor rest(const torch::Tensor& z, const torch::Tensor& x) {
    const auto m = mask_of(x);
    return fc((z * m).sum(1) / m.sum(1).clamp_min(1));
  }
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear layer, fc;
};
TORCH_MODULE(SplitNet);

inline ActNet make_act(uint64_t seed = 7, int64_t vocab = kVocab) {
  torch::manual_seed(seed);
  return ActNet(vocab);
}

inline torch::Tensor cross_entropy(
    const torch::Tensor& logits, const torch::Tensor& y) {
  return torch::nn::functional::cross_entropy(logits, y);
}

/// Parameters of the plain computation: table W, weight A, bias b.
struct Plain {
  torch::Tensor W, A, b;

  /// From any model with an `embedding` table and an `fc` linear layer.
  template <typename Net>
  static Plain of(const Net& m) {
    return {
        m->embedding->weight.detach().clone(),
        m->fc->weight.detach().clone(),
        m->fc->bias.detach().clone()};
  }
  Plain operator+(const Plain& o) const {
    return {W + o.W, A + o.A, b + o.b};
  }
  Plain operator*(double s) const {
    return {W * s, A * s, b * s};
  }
  Plain with_W(const torch::Tensor& w) const {
    return {w, A, b};
  }
};

/// The loss written out: gather rows, mean, affine, log-softmax, NLL.
inline torch::Tensor plain_loss(
    const Plain& p, const torch::Tensor& x, const torch::Tensor& y) {
  const auto e = p.W.index_select(0, x.reshape(-1))
                     .reshape({x.size(0), x.size(1), p.W.size(1)})
                     .mean(1);
  const auto logits = e.matmul(p.A.t()) + p.b;
  const auto logp = logits - logits.logsumexp(1, /*keepdim=*/true);
  return -logp.gather(1, y.unsqueeze(1)).mean();
}

/// Gradients of plain_loss at p, by autograd on fresh leaves.
inline Plain plain_grads(
    const Plain& p, const torch::Tensor& x, const torch::Tensor& y) {
  auto W = p.W.detach().clone().requires_grad_();
  auto A = p.A.detach().clone().requires_grad_();
  auto b = p.b.detach().clone().requires_grad_();
  const auto loss = plain_loss({W, A, b}, x, y);
  const auto g = torch::autograd::grad({loss}, {W, A, b});
  return {g[0], g[1], g[2]};
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

/// Largest max_abs_diff over two lists of tensors (b's moved to a's device).
inline double max_diff_all(
    const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  TORCH_CHECK(a.size() == b.size(), "max_diff_all: lists of unequal length");
  double d = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, max_abs_diff(a[i], b[i].to(a[i].device())));
  }
  return d;
}

/// Largest difference between the model's parameters and p.
template <typename Net>
double max_diff(const Net& m, const Plain& p) {
  return std::max(
      {max_abs_diff(m->embedding->weight, p.W),
       max_abs_diff(m->fc->weight, p.A),
       max_abs_diff(m->fc->bias, p.b)});
}

/// The learning rate of the tests' SGD steps, and their tolerance.
constexpr double kLr = 0.1;
constexpr double kTol = 1e-9;

/// One SGD step from p with the gradient g.
inline Plain sgd(const Plain& p, const Plain& g) {
  return p + g * (-kLr);
}

inline std::vector<torch::Tensor> clone_all(
    const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(t.defined() ? t.detach().clone() : t);
  }
  return out;
}

/// Per example: g masked, over max(‖g_i‖, 1e-8).
inline torch::Tensor unit(const torch::Tensor& g, const torch::Tensor& m) {
  const auto gm = g * m;
  return gm / gm.flatten(1).norm(2, 1).clamp_min(1e-8).view({-1, 1, 1});
}

/// Per example: onto ‖δ_i‖ ≤ eps.
inline torch::Tensor proj(const torch::Tensor& d, double eps) {
  const auto n = d.flatten(1).norm(2, 1).view({-1, 1, 1});
  return d * (eps / n.clamp_min(eps));
}

/// SMART's gradient on {W, A, b} written plainly, per example: from the
/// start `delta` (masked by `m`), `o.steps()` ascent steps on the KL to the
/// clean output (summed over the batch, as mt-dnn's ascent, reduce=False),
/// each normalizing every token's vector; then the loss
/// `cross_entropy(clean) + weight * sym_kl(adv, clean)`. `logits_at(p, d)`
/// is the model's output with parameters p at lookup + d.
template <typename Logits>
std::vector<torch::Tensor> smart_grads(
    const Logits& logits_at,
    const Plain& p0,
    torch::Tensor delta,
    const torch::Tensor& m,
    const torch::Tensor& y,
    const advtrain::SMARTOptions& o) {
  const auto zero = torch::zeros_like(delta);
  const auto clean = logits_at(p0, zero);
  for (int64_t k = 0; k < o.steps(); ++k) {
    auto d = delta.clone().requires_grad_();
    const auto adv =
        advtrain::stable_kl(logits_at(p0, d), clean.detach(), false);
    const auto g = torch::autograd::grad({adv}, {d})[0];
    const auto moved = delta + o.alpha() * g;
    delta = moved / (std::get<0>(moved.abs().max(-1, true)) + o.norm_eps()) * m;
  }
  auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
       b = p0.b.clone().requires_grad_();
  const Plain leaves{W, A, b};
  const auto lc = logits_at(leaves, zero);
  const auto la = logits_at(leaves, delta);
  const auto loss =
      cross_entropy(lc, y) + o.weight() * advtrain::sym_kl(la, lc);
  return torch::autograd::grad({loss}, {W, A, b});
}

/// Same dtype, shape and bytes (NaN payloads included).
inline bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) {
    return false;
  }
  const auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

/// Element by element, bit for bit; undefined tensors equal each other.
inline bool equal_all(
    const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].defined() != b[i].defined()) {
      return false;
    }
    if (a[i].defined() && !bit_equal(a[i], b[i])) {
      return false;
    }
  }
  return true;
}

/// Collects LibTorch warnings (TORCH_WARN) while it lives, instead of
/// printing them.
class WarningCapture : public c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
  // (LibTorch 2 moved the handler's setters from c10::Warning.)
  using Handlers = c10::WarningUtils::WarningHandlerGuard;
#else
  using Handlers = c10::Warning::WarningHandlerGuard;
#endif

 public:
  WarningCapture() : handlers_(this) {}
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& w) override {
    messages.push_back(w.msg());
  }
#else
  void process(
      const c10::SourceLocation& /*where*/,
      const std::string& msg,
      const bool /*verbatim*/) override {
    messages.push_back(msg);
  }
#endif
  /// How many messages contain `text`.
  size_t count(const std::string& text) const {
    size_t n = 0;
    for (const auto& m : messages) {
      n += m.find(text) != std::string::npos;
    }
    return n;
  }
  std::vector<std::string> messages;

 private:
  Handlers handlers_; // this handler while alive, the previous one after
};

inline std::vector<torch::Tensor> grads_of(
    const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) {
    out.push_back(p.grad());
  }
  return out;
}

} // namespace fixture
