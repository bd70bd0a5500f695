// Per example beyond `PerturbedEmbedding`'s one call: a model that takes
// embeddings (a `Perturbation` slot applied to a TorchScript model's
// `inputs_embeds`), and a model that looks its table up twice in one forward
// (a sentence pair), where each lookup gets its own δ.

#include "common.h"
#include "strategies.h"

#include "catch.h"

#include <torch/script.h>

#include <sstream>
#include <string>
#include <vector>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

/// The model of tests/data/make_embeds_model.py: forward(inputs_embeds,
/// mask), its lookup exported as embed(ids).
torch::jit::Module load_embeds_model() {
  return torch::jit::load(
      std::string(ADVTRAIN_TEST_DATA_DIR) + "/embeds_classifier.pt");
}

torch::Tensor param(const torch::jit::Module& m, const std::string& name) {
  for (const auto& p : m.named_parameters()) {
    if (p.name == name) {
      return p.value;
    }
  }
  throw std::runtime_error("no parameter " + name);
}

/// {embedding.weight, fc.weight, fc.bias}, copied.
Plain plain_of(const torch::jit::Module& m) {
  return Plain{
      param(m, "embedding.weight").detach().clone(),
      param(m, "fc.weight").detach().clone(),
      param(m, "fc.bias").detach().clone()};
}

double max_diff(const torch::jit::Module& m, const Plain& p) {
  return max_diff_all(
      {param(m, "embedding.weight"),
       param(m, "fc.weight"),
       param(m, "fc.bias")},
      {p.W, p.A, p.b});
}

/// Ids over the scripted model's 12 words; 0 pads here only through the
/// mask (the model has no padding index).
torch::Tensor embeds_ids() {
  return torch::tensor(
      {{1, 2, 3, 4, 0}, {5, 6, 0, 0, 0}, {7, 8, 9, 10, 11}}, torch::kLong);
}

/// The scripted model's math without dropout (eval), at lookup + δ.
torch::Tensor embeds_logits(
    const Plain& p, const torch::Tensor& ids, const torch::Tensor& delta) {
  const auto e = p.W.index_select(0, ids.reshape(-1))
                     .reshape({ids.size(0), ids.size(1), -1});
  const auto m = ids.ne(0).unsqueeze(-1).to(torch::kDouble);
  const auto h = torch::tanh(e + delta);
  return ((h * m).sum(1) / m.sum(1)).matmul(p.A.t()) + p.b;
}

/// The step through the slot: `(*slot)(embed(ids), mask)` into forward.
torch::Tensor embeds_forward(
    torch::jit::Module& model,
    advtrain::Perturbation& slot,
    const torch::Tensor& ids) {
  const torch::Tensor mask = ids.ne(0);
  const torch::Tensor e = model.run_method("embed", ids).toTensor();
  return model.forward({slot(e, mask), mask}).toTensor();
}

std::vector<torch::Tensor> parameters_of(const torch::jit::Module& m) {
  std::vector<torch::Tensor> ps;
  for (const auto& p : m.parameters()) {
    ps.push_back(p);
  }
  return ps;
}

/// A pair classifier: one PerturbedEmbedding (0 pads) looked up for the
/// premise and for the hypothesis, masked means, concatenated, linear.
struct PairNetImpl : torch::nn::Module {
  PairNetImpl()
      : embedding(register_module(
            "embedding",
            advtrain::PerturbedEmbedding(
                torch::nn::EmbeddingOptions(kVocab, kHidden).padding_idx(0)))),
        fc(register_module("fc", torch::nn::Linear(2 * kHidden, kClasses))) {
    to(torch::kDouble);
  }
  torch::Tensor pooled(const torch::Tensor& x) {
    const auto m = x.ne(0).unsqueeze(-1).to(torch::kDouble);
    return (embedding(x) * m).sum(1) / m.sum(1).clamp_min(1);
  }
  torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b) {
    const auto pa = pooled(a);
    const auto pb = pooled(b);
    return fc(torch::cat({pa, pb}, 1));
  }
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear fc;
};
TORCH_MODULE(PairNet);

torch::Tensor premises() {
  return padded_ids(); // [3, 5]
}
torch::Tensor hypotheses() {
  return torch::tensor({{2, 3, 0}, {6, 0, 0}, {1, 1, 4}}, torch::kLong);
}

/// The pair model's loss written plainly, at δ_a and δ_b.
torch::Tensor pair_loss(
    const Plain& p, const torch::Tensor& da, const torch::Tensor& db) {
  const auto pooled = [&](const torch::Tensor& x, const torch::Tensor& d) {
    const auto m = mask_of(x);
    const auto e =
        p.W.index_select(0, x.reshape(-1)).reshape({x.size(0), x.size(1), -1});
    return ((e + d) * m).sum(1) / m.sum(1).clamp_min(1);
  };
  const auto logits =
      torch::cat({pooled(premises(), da), pooled(hypotheses(), db)}, 1)
          .matmul(p.A.t()) +
      p.b;
  return cross_entropy(logits, batch_labels());
}

torch::Tensor zeros_like_lookup(const torch::Tensor& x) {
  return torch::zeros({x.size(0), x.size(1), kHidden}, torch::kDouble);
}

} // namespace

TEST_CASE(
    "inputs_embeds: FreeLB through a slot on a TorchScript model equals the "
    "plain computation",
    "[lookups]") {
  auto model = load_embeds_model();
  model.eval(); // no dropout here: the masks have their own test
  const Plain p0 = plain_of(model);
  const auto ids = embeds_ids();
  const auto y = batch_labels();
  const auto m = ids.ne(0).unsqueeze(-1).to(torch::kDouble);
  const double alpha = 0.3, eps = 0.2;
  const int k = 3;

  auto delta = torch::zeros({ids.size(0), ids.size(1), 4}, torch::kDouble);
  Plain sum = p0 * 0.0;
  for (int t = 1; t <= k; ++t) {
    auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
         b = p0.b.clone().requires_grad_(), d = delta.clone().requires_grad_();
    const auto g = torch::autograd::grad(
        {cross_entropy(embeds_logits({W, A, b}, ids, d), y)}, {W, A, b, d});
    sum = sum + Plain{g[0], g[1], g[2]} * (1.0 / k);
    if (t < k) {
      delta = proj(delta + alpha * unit(g[3], m), eps);
    }
  }

  auto slot = std::make_shared<advtrain::Perturbation>();
  advtrain::FreeLB freelb(
      slot, advtrain::FreeLBOptions().alpha(alpha).epsilon(eps).steps(k));
  torch::optim::SGD opt(parameters_of(model), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, freelb);
  const auto r = trainer.step(
      [&] { return embeds_forward(model, *slot, ids); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(r.passes == k);
  // The gradients reached the scripted model's own weights, table included.
  CHECK(max_abs_diff(param(model, "embedding.weight"), p0.W) > 1e-3);
  CHECK(max_diff(model, fixture::sgd(p0, sum)) < kTol);
  // Nothing is left on the slot after the step.
  CHECK(slot->lookups() == 0);
}

TEST_CASE(
    "inputs_embeds: SMART through a slot on a TorchScript model equals the "
    "plain computation",
    "[lookups]") {
  auto model = load_embeds_model();
  model.eval();
  const Plain p0 = plain_of(model);
  const auto ids = embeds_ids();
  const auto y = batch_labels();
  const auto m = ids.ne(0).unsqueeze(-1).to(torch::kDouble);
  const auto o = advtrain::SMARTOptions().steps(2).alpha(0.5).noise_var(0.1);
  const std::vector<int64_t> shape = {ids.size(0), ids.size(1), 4};
  torch::manual_seed(321);
  auto delta = torch::randn(shape, torch::kDouble) * m * o.noise_var();
  const auto g = smart_grads(
      [&](const Plain& p, const torch::Tensor& d) {
        return embeds_logits(p, ids, d);
      },
      p0,
      delta,
      m,
      y,
      o);

  auto slot = std::make_shared<advtrain::Perturbation>();
  advtrain::SMART smart(slot, o);
  torch::optim::SGD opt(parameters_of(model), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, smart);
  torch::manual_seed(321);
  const auto r = trainer.step(
      [&] { return embeds_forward(model, *slot, ids); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(r.passes == o.steps() + 2);
  CHECK(max_diff(model, fixture::sgd(p0, Plain{g[0], g[1], g[2]})) < kTol);
}

TEST_CASE(
    "inputs_embeds: the trained TorchScript model saves and loads",
    "[lookups]") {
  auto model = load_embeds_model();
  const auto names_before = [&] {
    std::vector<std::string> n;
    for (const auto& p : model.named_parameters()) {
      n.push_back(p.name);
    }
    return n;
  }();
  auto slot = std::make_shared<advtrain::Perturbation>();
  advtrain::PGD pgd(slot, advtrain::PGDOptions().steps(2).epsilon(0.2));
  torch::optim::Adam opt(parameters_of(model), torch::optim::AdamOptions(0.1));
  advtrain::Trainer trainer(opt, pgd);
  const Plain p0 = plain_of(model);
  for (int s = 0; s < 3; ++s) {
    trainer.step(
        [&] { return embeds_forward(model, *slot, embeds_ids()); },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  REQUIRE(max_diff(model, p0) > 1e-3);
  std::stringstream buffer;
  model.save(buffer);
  auto loaded = torch::jit::load(buffer);
  std::vector<std::string> names;
  for (const auto& p : loaded.named_parameters()) {
    names.push_back(p.name);
    CHECK(bit_equal(p.value, param(model, p.name)));
  }
  CHECK(names == names_before); // no weight of advtrain's in the model
  model.eval();
  loaded.eval();
  const auto mask = embeds_ids().ne(0);
  const auto e = loaded.run_method("embed", embeds_ids()).toTensor();
  CHECK(bit_equal(
      loaded.forward({e, mask}).toTensor(),
      model.forward({e, mask}).toTensor()));
}

TEST_CASE(
    "inputs_embeds: the passes of a TorchScript model's first step share "
    "their dropout masks",
    "[lookups]") {
  // A probe forward on fixed inputs at the start of each pass, run as the
  // pass's own forward is (autograd on, an input that requires grad: the
  // same graph executor plan): it draws the pass's first dropout mask, so
  // equal probes mean equal masks.
  const bool share = GENERATE(true, false);
  auto model = load_embeds_model();
  model.train();
  auto slot = std::make_shared<advtrain::Perturbation>();
  advtrain::FGM fgm(slot, advtrain::FGMOptions().share_dropout_mask(share));
  torch::optim::SGD opt(parameters_of(model), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, fgm);
  const auto ids = embeds_ids();
  const auto mask = ids.ne(0);
  const auto ones = torch::ones({ids.size(0), ids.size(1), 4}, torch::kDouble)
                        .requires_grad_();
  std::vector<torch::Tensor> probes;
  for (int s = 0; s < 2; ++s) {
    trainer.step(
        [&] {
          probes.push_back(model.forward({ones, mask}).toTensor().detach());
          return embeds_forward(model, *slot, ids);
        },
        [&](const torch::Tensor& out) {
          return cross_entropy(out, batch_labels());
        });
  }
  check_masks_per_step(probes, 2, share);
}

TEST_CASE(
    "A pair model: FGM gives each lookup its own δ, in an own loop",
    "[lookups]") {
  torch::manual_seed(7);
  PairNet model;
  const Plain p0{
      model->embedding->weight.detach().clone(),
      model->fc->weight.detach().clone(),
      model->fc->bias.detach().clone()};
  const auto a = premises(), b = hypotheses();
  const double eps = 0.7;

  auto W = p0.W.clone().requires_grad_(), A = p0.A.clone().requires_grad_(),
       c = p0.b.clone().requires_grad_();
  auto da = zeros_like_lookup(a).requires_grad_(),
       db = zeros_like_lookup(b).requires_grad_();
  const auto g =
      torch::autograd::grad({pair_loss({W, A, c}, da, db)}, {W, A, c, da, db});
  const auto delta_a = eps * unit(g[3], mask_of(a));
  const auto delta_b = eps * unit(g[4], mask_of(b));
  auto W2 = p0.W.clone().requires_grad_(), A2 = p0.A.clone().requires_grad_(),
       c2 = p0.b.clone().requires_grad_();
  const auto adv_loss = pair_loss({W2, A2, c2}, delta_a, delta_b);
  const auto ga = torch::autograd::grad({adv_loss}, {W2, A2, c2});

  advtrain::FGM fgm(model->embedding, advtrain::FGMOptions().epsilon(eps));
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  for (int round = 0; round < 2; ++round) { // the second: a new batch's δ
    opt.zero_grad();
    cross_entropy(model->forward(a, b), batch_labels()).backward();
    fgm.attack();
    REQUIRE(fgm.targets().size() == 2);
    CHECK(fgm.target_names()[1] == "perturbation[0].lookup[1]");
    CHECK(max_abs_diff(fgm.targets()[0].detach(), delta_a) < 1e-12);
    CHECK(max_abs_diff(fgm.targets()[1].detach(), delta_b) < 1e-12);
    const auto adv = cross_entropy(model->forward(a, b), batch_labels());
    CHECK(adv.item<double>() == Approx(adv_loss.item<double>()).epsilon(1e-12));
    adv.backward();
    fgm.restore();
    if (round == 0) {
      // The clean gradient and the adversarial one, summed.
      CHECK(max_abs_diff(model->embedding->weight.grad(), g[0] + ga[0]) < kTol);
      CHECK(max_abs_diff(model->fc->weight.grad(), g[1] + ga[1]) < kTol);
    }
  }
}

TEST_CASE(
    "A pair model: every per-example strategy perturbs both lookups",
    "[lookups]") {
  for (const auto& c : strategies()) {
    if (!c.per_example) {
      continue;
    }
    DYNAMIC_SECTION(c.name) {
      torch::manual_seed(7);
      PairNet model;
      auto attacker = c.per_example(model->embedding, false);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
      advtrain::Trainer trainer(opt, *attacker);
      const auto slot = model->embedding->perturbation();
      // For each pass: ‖δ‖ of the premise's lookup and the hypothesis's;
      // where the strategy replaces the lookups (ASCC), how far each moved
      // from the plain lookup.
      std::vector<std::pair<double, double>> norms;
      const auto r = trainer.step(
          [&] {
            if (c.substitutes_lookup) { // PairNet's forward, spelled out
              const auto a = premises(), b = hypotheses();
              const auto ea = model->embedding(a), eb = model->embedding(b);
              const auto moved = [&](const torch::Tensor& e,
                                     const torch::Tensor& x) {
                return (e - torch::nn::functional::embedding(
                                x, model->embedding->weight))
                    .norm()
                    .item<double>();
              };
              norms.emplace_back(moved(ea, a), moved(eb, b));
              const auto pool = [](const torch::Tensor& e,
                                   const torch::Tensor& x) {
                const auto m = x.ne(0).unsqueeze(-1).to(torch::kDouble);
                return (e * m).sum(1) / m.sum(1).clamp_min(1);
              };
              return model->fc(torch::cat({pool(ea, a), pool(eb, b)}, 1));
            }
            const auto out = model->forward(premises(), hypotheses());
            REQUIRE(slot->lookups() == 2);
            CHECK(slot->delta(0).size(1) == premises().size(1));
            CHECK(slot->delta(1).size(1) == hypotheses().size(1));
            norms.emplace_back(
                slot->delta(0).norm().item<double>(),
                slot->delta(1).norm().item<double>());
            return out;
          },
          [&](const torch::Tensor& out) {
            return cross_entropy(out, batch_labels());
          });
      CHECK(r.passes == c.passes);
      bool both = false;
      for (const auto& [na, nb] : norms) {
        both = both || (na > 0 && nb > 0);
      }
      CHECK(both);
      CHECK(r.perturbation_norm > 0);
      CHECK(std::isfinite(r.loss));
      CHECK(slot->lookups() == 0); // forgotten when the step ends
    }
  }
}

TEST_CASE(
    "Lookups that do not line up with the step refuse with a clear error",
    "[lookups]") {
  torch::manual_seed(7);
  PairNet model;
  const auto a = premises(), b = hypotheses();
  SECTION("a training-mode forward that no backward reached") {
    advtrain::FGM fgm(model->embedding);
    model->forward(a, b); // validation, but in training mode with autograd
    cross_entropy(model->forward(a, b), batch_labels()).backward();
    CHECK_THROWS_WITH(fgm.attack(), Contains("no backward reached it"));
    CHECK_FALSE(fgm.is_perturbed());
  }
  SECTION("more lookups while perturbed") {
    advtrain::PGD pgd(model->embedding);
    cross_entropy(model->pooled(a), batch_labels()).backward();
    pgd.attack(true);
    cross_entropy(model->forward(a, b), batch_labels()).backward();
    CHECK_THROWS_WITH(pgd.attack(false), Contains("every pass of a step"));
    pgd.restore();
    CHECK_FALSE(pgd.is_perturbed());
  }
}
