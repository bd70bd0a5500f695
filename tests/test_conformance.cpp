// Conformance with the official implementations: each golden file in
// tests/conformance/ was written by a Python replay of one official code's
// protocol (see tests/conformance/README.md); here the same initial
// parameters, batches and seed go through advtrain::Trainer::step, and every
// parameter after every step must agree with the golden to 1e-9.

#include "common.h"

#include <nlohmann/json.hpp>
#include "catch.h"

#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

using json = nlohmann::json;
using namespace fixture;

namespace {

constexpr int64_t kConfVocab = 7;
constexpr int64_t kConfHidden = 4;

/// tests/conformance/common.py's Model: lookup (+ δ), dropout, first layer
/// tanh(l1(·)), masked mean, head l2 ([B] when it has one output).
struct ConfNetImpl : torch::nn::Module {
  ConfNetImpl(int64_t classes, double dropout)
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(kConfVocab, kConfHidden)
                    .padding_idx(0)))),
        l1(register_module("l1", torch::nn::Linear(kConfHidden, kConfHidden))),
        l2(register_module("l2", torch::nn::Linear(kConfHidden, classes))),
        classes(classes),
        dropout(dropout) {
    to(torch::kDouble);
  }
  torch::Tensor first(const torch::Tensor& x) {
    return torch::tanh(l1(torch::dropout(x, dropout, is_training())));
  }
  torch::Tensor rest(const torch::Tensor& z, const torch::Tensor& ids) {
    const auto m = ids.ne(0).unsqueeze(-1).to(z.dtype());
    const auto out = l2((z * m).sum(1) / m.sum(1));
    return classes == 1 ? out.squeeze(-1) : out;
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    const auto e = embedding(ids);
    return rest(yopo != nullptr ? yopo->first(e) : first(e), ids);
  }
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear l1, l2;
  int64_t classes;
  double dropout;
  advtrain::YOPO* yopo = nullptr;
};
TORCH_MODULE(ConfNet);

/// A nested JSON list of numbers as a tensor of `dtype`.
torch::Tensor to_tensor(const json& j, torch::Dtype dtype) {
  std::vector<int64_t> shape;
  for (const json* level = &j; level->is_array(); level = &(*level)[0]) {
    shape.push_back(static_cast<int64_t>(level->size()));
    if (level->empty()) {
      break;
    }
  }
  std::vector<double> flat;
  // Depth-first, left to right: row-major order.
  std::function<void(const json&)> walk = [&](const json& v) {
    if (v.is_array()) {
      for (const auto& e : v) {
        walk(e);
      }
    } else {
      flat.push_back(v.get<double>());
    }
  };
  walk(j);
  return torch::tensor(flat, torch::kDouble).reshape(shape).to(dtype);
}

json load(const std::string& file) {
  std::ifstream in(std::string(ADVTRAIN_CONFORMANCE_DIR) + "/" + file);
  REQUIRE(in.good());
  return json::parse(in);
}

template <typename Options>
Options with_share(Options o, const json& options) {
  return o.share_dropout_mask(options.at("share_dropout_mask").get<bool>());
}

/// Attacker `A` on the table (by name, as the Python classes' `emb_name`) or
/// per example.
template <typename A, typename Options>
std::unique_ptr<advtrain::Attacker> build(
    bool table, ConfNet& model, Options options) {
  if (table) {
    return std::make_unique<A>(*model, "embedding.weight", options);
  }
  return std::make_unique<A>(model->embedding, options);
}

/// The attacker a golden case names, with its options, on its target.
std::unique_ptr<advtrain::Attacker> make_attacker(
    const json& c, ConfNet& model) {
  const std::string method = c.at("method");
  const json& o = c.at("options");
  const bool table = c.at("target") == "table";
  auto num = [&](const char* key) { return o.at(key).get<double>(); };
  auto count = [&](const char* key) { return o.at(key).get<int64_t>(); };
  if (method == "FGM") {
    return build<advtrain::FGM>(
        table,
        model,
        with_share(advtrain::FGMOptions().epsilon(num("epsilon")), o));
  }
  if (method == "PGD") {
    return build<advtrain::PGD>(
        table,
        model,
        with_share(
            advtrain::PGDOptions()
                .epsilon(num("epsilon"))
                .alpha(num("alpha"))
                .steps(count("steps")),
            o));
  }
  if (method == "FreeAT") {
    return build<advtrain::FreeAT>(
        table,
        model,
        with_share(
            advtrain::FreeATOptions()
                .epsilon(num("epsilon"))
                .alpha(num("alpha"))
                .replays(count("replays")),
            o));
  }
  const auto freelb = [&] {
    return with_share(
        advtrain::FreeLBOptions()
            .alpha(num("alpha"))
            .steps(count("steps"))
            .epsilon(num("epsilon"))
            .init_mag(num("init_mag")),
        o);
  };
  if (method == "FreeLB") {
    return build<advtrain::FreeLB>(table, model, freelb());
  }
  if (method == "FreeLBLInf") {
    return build<advtrain::FreeLBLInf>(table, model, freelb());
  }
  if (method == "SMART") {
    return build<advtrain::SMART>(
        table,
        model,
        with_share(
            advtrain::SMARTOptions()
                .steps(count("steps"))
                .alpha(num("alpha"))
                .noise_var(num("noise_var"))
                .norm_eps(num("norm_eps"))
                .weight(num("weight"))
                .regression(o.value("regression", false)),
            o));
  }
  if (method == "VAT") {
    return build<advtrain::VAT>(
        table,
        model,
        with_share(
            advtrain::VATOptions()
                .epsilon(num("epsilon"))
                .xi(num("xi"))
                .power_iterations(count("power_iterations"))
                .weight(num("weight")),
            o));
  }
  if (method == "R3F") {
    return build<advtrain::R3F>(
        table,
        model,
        with_share(
            advtrain::R3FOptions()
                .sigma(num("sigma"))
                .normal_noise(o.at("normal_noise").get<bool>())
                .weight(num("weight")),
            o));
  }
  if (method == "AWP") {
    REQUIRE(c.at("target") == "parameters");
    return std::make_unique<advtrain::AWP>(
        *model,
        o.at("name").get<std::string>(),
        with_share(
            advtrain::AWPOptions()
                .alpha(num("alpha"))
                .epsilon(num("epsilon"))
                .steps(count("steps")),
            o));
  }
  if (method == "YOPO") {
    REQUIRE_FALSE(table);
    auto yopo = std::make_unique<advtrain::YOPO>(
        model->embedding,
        [m = model.get()](const torch::Tensor& x) { return m->first(x); },
        with_share(
            advtrain::YOPOOptions()
                .steps(count("steps"))
                .inner_steps(count("inner_steps"))
                .alpha(num("alpha"))
                .epsilon(num("epsilon"))
                .init_mag(num("init_mag")),
            o));
    model->yopo = yopo.get();
    return yopo;
  }
  if (method == "ASCC") {
    REQUIRE_FALSE(table);
    const json& s = c.at("substitutes");
    advtrain::SubstitutionTable candidates(
        to_tensor(s.at("ids"), torch::kLong),
        to_tensor(s.at("mask"), torch::kBool));
    return std::make_unique<advtrain::ASCC>(
        model->embedding,
        std::move(candidates),
        with_share(
            advtrain::ASCCOptions()
                .steps(count("steps"))
                .search_lr(num("search_lr"))
                .search_weight_decay(num("search_weight_decay"))
                .entropy_weight(num("entropy_weight"))
                .clean_weight(num("clean_weight"))
                .adv_weight(num("adv_weight"))
                .kl_weight(num("kl_weight")),
            o));
  }
  if (method == "DNE") {
    REQUIRE_FALSE(table);
    const json& s = c.at("substitutes");
    advtrain::SubstitutionTable candidates(
        to_tensor(s.at("ids"), torch::kLong),
        to_tensor(s.at("mask"), torch::kBool),
        to_tensor(s.at("first_order"), torch::kLong));
    return std::make_unique<advtrain::DNE>(
        model->embedding,
        std::move(candidates),
        with_share(
            advtrain::DNEOptions()
                .alpha(num("alpha"))
                .decay(num("decay"))
                .steps(count("steps"))
                .step_size(num("step_size")),
            o));
  }
  FAIL("unknown method " << method);
  return nullptr;
}

/// Runs every case of `file` and compares each step with the golden.
void check_file(const std::string& file) {
  const json golden = load(file);
  REQUIRE(golden.at("cases").size() >= 1);
  for (const auto& c : golden.at("cases")) {
    const std::string name = c.at("name");
    INFO(
        file << ": " << name << " (" << c.at("method").get<std::string>()
             << ", " << c.at("target").get<std::string>() << ")");
    const int64_t classes = c.at("classes");
    ConfNet model(classes, c.at("dropout").get<double>());
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->named_parameters()) {
        p.value().copy_(to_tensor(c.at("init").at(p.key()), torch::kDouble));
      }
    }
    const auto init = clone_all(model->parameters());
    auto attacker = make_attacker(c, model);
    if (c.contains("clamp_gradients")) {
      // The official trainer's per-backward clamp, as a user sets it.
      const double g = c.at("clamp_gradients");
      for (auto& p : model->parameters()) {
        p.register_hook([g](torch::Tensor grad) { return grad.clamp(-g, g); });
      }
    }
    torch::optim::SGD opt(
        model->parameters(),
        torch::optim::SGDOptions(c.at("lr").get<double>()));
    advtrain::Trainer trainer(opt, *attacker);
    torch::manual_seed(c.at("seed").get<uint64_t>());
    const auto& batches = c.at("batches");
    REQUIRE(batches.size() == c.at("after").size());
    REQUIRE(batches.size() >= 2);
    const json& data = golden.at("batches");
    for (size_t s = 0; s < batches.size(); ++s) {
      const json& b = data.at(batches[s].get<size_t>());
      const auto ids = to_tensor(b.at("ids"), torch::kLong);
      const auto y = classes == 1 ? to_tensor(b.at("targets"), torch::kDouble)
                                  : to_tensor(b.at("labels"), torch::kLong);
      const auto forward = [&] { return model->forward(ids); };
      const auto loss = [&](const torch::Tensor& out) {
        return classes == 1 ? torch::mse_loss(out, y) : cross_entropy(out, y);
      };
      if (c.at("options").value("unlabeled", false)) {
        // The regularizer's own clean pass, on the same batch unlabeled.
        trainer.step(forward, loss, forward);
      } else {
        trainer.step(forward, loss);
      }
      INFO("after step " << s + 1);
      double diff = 0.0;
      for (const auto& p : model->named_parameters()) {
        const auto expected =
            to_tensor(c.at("after")[s].at(p.key()), torch::kDouble);
        diff = std::max(diff, max_abs_diff(p.value(), expected));
      }
      CHECK(diff < kTol);
    }
    // The golden moved the parameters: a no-op would not pass.
    CHECK(max_diff_all(model->parameters(), init) > 1e-3);
    if (c.contains("ensemble")) {
      // DNE's prediction-time ensemble at the trained parameters.
      const json& e = c.at("ensemble");
      const json& b = data.at(e.at("batch").get<size_t>());
      const auto ids = to_tensor(b.at("ids"), torch::kLong);
      model->eval();
      torch::manual_seed(e.at("seed").get<uint64_t>());
      auto& dne = dynamic_cast<advtrain::DNE&>(*attacker);
      const torch::Tensor probs = dne.predict(
          [&] { return model->forward(ids); }, e.at("members").get<int64_t>());
      INFO("the ensemble's probabilities");
      CHECK(
          max_abs_diff(probs, to_tensor(e.at("probs"), torch::kDouble)) < kTol);
      model->train();
    }
    CHECK_FALSE(attacker->is_perturbed());
  }
}

} // namespace

TEST_CASE("Conformance: FGM and PGD classes (table)", "[conformance]") {
  check_file("fgm_pgd.json");
}

TEST_CASE("Conformance: FreeAT, main_free.py", "[conformance]") {
  check_file("freeat_main_free.json");
}

TEST_CASE("Conformance: FreeLB, run_glue_freelb.py", "[conformance]") {
  check_file("freelb_hf.json");
}

TEST_CASE("Conformance: SMART, mt-dnn", "[conformance]") {
  check_file("smart_mtdnn.json");
}

TEST_CASE("Conformance: YOPO, FreeLB's fairseq code", "[conformance]") {
  check_file("yopo_fairseq.json");
}

TEST_CASE(
    "Conformance: VAT, tensorflow/models adversarial_text", "[conformance]") {
  check_file("vat_tf.json");
}

TEST_CASE("Conformance: R3F, fairseq", "[conformance]") {
  check_file("r3f_fairseq.json");
}

TEST_CASE("Conformance: AWP, the widely copied class", "[conformance]") {
  check_file("awp_class.json");
}

TEST_CASE("Conformance: ASCC, the official code", "[conformance]") {
  check_file("ascc_official.json");
}

TEST_CASE("Conformance: DNE, the official code", "[conformance]") {
  check_file("dne_official.json");
}
