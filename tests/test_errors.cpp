// Bad input is rejected with a message naming the problem; degenerate
// gradients never perturb; a throwing closure leaves the model as it was.

#include "common.h"
#include "strategies.h"

#include "catch.h"

#include <advtrain/version.h>

#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

using namespace fixture;
using fixture::matchers::Contains;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

std::vector<torch::Tensor> table() {
  return {torch::randn({4, 3}, torch::kDouble).requires_grad_()};
}

} // namespace

TEST_CASE("Invalid options are rejected, naming the field", "[options]") {
  using namespace advtrain;
  for (double eps : {0.0, -1.0, kNaN}) {
    CHECK_THROWS_WITH(
        FGM(table(), FGMOptions().epsilon(eps)), Contains("Invalid epsilon"));
    CHECK_THROWS_WITH(
        FGSM(table(), FGSMOptions().epsilon(eps)), Contains("Invalid epsilon"));
    CHECK_THROWS_WITH(
        PGD(table(), PGDOptions().epsilon(eps)), Contains("Invalid epsilon"));
  }
  CHECK_THROWS_WITH(
      PGD(table(), PGDOptions().alpha(-0.1)), Contains("Invalid alpha: -0.1"));
  CHECK_THROWS_WITH(
      PGD(table(), PGDOptions().alpha(kNaN)), Contains("Invalid alpha"));
  CHECK_THROWS_WITH(
      PGD(table(), PGDOptions().steps(0)), Contains("Invalid steps: 0"));
  CHECK_THROWS_WITH(
      FGM(table(), FGMOptions().epsilon(-2)),
      Contains("-2") && Contains("FGM"));
  CHECK_THROWS_WITH(
      FreeAT(table(), FreeATOptions().epsilon(0)),
      Contains("Invalid epsilon: 0"));
  CHECK_THROWS_WITH(
      FreeAT(table(), FreeATOptions().alpha(-1)),
      Contains("Invalid alpha: -1"));
  CHECK_THROWS_WITH(
      FreeATL2(table(), FreeATOptions().replays(0)),
      Contains("Invalid replays: 0"));
  CHECK_THROWS_WITH(
      FreeLB(table(), FreeLBOptions().alpha(-1)),
      Contains("Invalid alpha: -1"));
  CHECK_THROWS_WITH(
      FreeLB(table(), FreeLBOptions().steps(0)), Contains("Invalid steps: 0"));
  CHECK_THROWS_WITH(
      FreeLB(table(), FreeLBOptions().epsilon(-1)),
      Contains("Invalid epsilon: -1"));
  CHECK_THROWS_WITH(
      FreeLB(table(), FreeLBOptions().init_mag(0.5)),
      Contains("Invalid init_mag: 0.5"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().steps(0)), Contains("Invalid steps: 0"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().alpha(-1)), Contains("Invalid alpha: -1"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().noise_var(-1)),
      Contains("Invalid noise_var: -1"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().norm_eps(0)),
      Contains("Invalid norm_eps: 0"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().weight(-1)),
      Contains("Invalid weight: -1"));
  CHECK_THROWS_WITH(
      SMART(table(), SMARTOptions().weight(kNaN)), Contains("Invalid weight"));
  PerturbedEmbedding emb(5, 3);
  auto first = [](const torch::Tensor& e) { return e; };
  CHECK_THROWS_WITH(
      YOPO(emb, first, YOPOOptions().steps(0)), Contains("Invalid steps: 0"));
  CHECK_THROWS_WITH(
      YOPO(emb, first, YOPOOptions().inner_steps(0)),
      Contains("Invalid inner_steps: 0"));
  CHECK_THROWS_WITH(
      YOPO(emb, first, YOPOOptions().alpha(-1)), Contains("Invalid alpha: -1"));
  CHECK_THROWS_WITH(
      YOPO(emb, first, YOPOOptions().epsilon(0)),
      Contains("Invalid epsilon: 0"));
  CHECK_THROWS_WITH(
      YOPO(emb, first, YOPOOptions().init_mag(-1)),
      Contains("Invalid init_mag: -1"));
  CHECK_THROWS_WITH(YOPO(emb, nullptr), Contains("first layer"));
  // The arguments are checked in their order: the callable first.
  CHECK_THROWS_WITH(
      YOPO(emb, nullptr, YOPOOptions().steps(0)), Contains("first layer"));
  // Valid options construct.
  CHECK_NOTHROW(FreeLB(table(), FreeLBOptions().epsilon(0).steps(1)));
  CHECK_NOTHROW(SMART(table(), SMARTOptions().noise_var(0).weight(0)));
  CHECK_NOTHROW(PGD(table(), PGDOptions().alpha(0).steps(1)));
}

TEST_CASE(
    "Infinite options are rejected, for every floating-point field",
    "[options]") {
  using namespace advtrain;
  const double inf = std::numeric_limits<double>::infinity();
  PerturbedEmbedding emb(5, 3);
  auto first = [](const torch::Tensor& e) { return e; };
  // Each builds a strategy with one field infinite (either sign).
  const std::vector<std::pair<std::string, std::function<void(double)>>> all = {
      {"FGSM epsilon",
       [](double v) { FGSM(table(), FGSMOptions().epsilon(v)); }},
      {"FGM epsilon", [](double v) { FGM(table(), FGMOptions().epsilon(v)); }},
      {"PGD epsilon", [](double v) { PGD(table(), PGDOptions().epsilon(v)); }},
      {"PGD alpha", [](double v) { PGD(table(), PGDOptions().alpha(v)); }},
      {"PGDLInf epsilon",
       [](double v) { PGDLInf(table(), PGDOptions().epsilon(v)); }},
      {"FreeAT epsilon",
       [](double v) { FreeAT(table(), FreeATOptions().epsilon(v)); }},
      {"FreeAT alpha",
       [](double v) { FreeATL2(table(), FreeATOptions().alpha(v)); }},
      {"FreeLB alpha",
       [](double v) { FreeLB(table(), FreeLBOptions().alpha(v)); }},
      {"FreeLB epsilon",
       [](double v) { FreeLBLInf(table(), FreeLBOptions().epsilon(v)); }},
      {"FreeLB init_mag",
       [&](double v) { FreeLB(emb, FreeLBOptions().init_mag(v)); }},
      {"SMART alpha",
       [](double v) { SMART(table(), SMARTOptions().alpha(v)); }},
      {"SMART noise_var",
       [](double v) { SMART(table(), SMARTOptions().noise_var(v)); }},
      {"SMART norm_eps",
       [](double v) { SMART(table(), SMARTOptions().norm_eps(v)); }},
      {"SMART weight",
       [](double v) { SMART(table(), SMARTOptions().weight(v)); }},
      {"SMART proximal_weight",
       [](double v) { SMART(table(), SMARTOptions().proximal_weight(v)); }},
      {"SMART proximal_beta",
       [](double v) { SMART(table(), SMARTOptions().proximal_beta(v)); }},
      {"VAT epsilon", [](double v) { VAT(table(), VATOptions().epsilon(v)); }},
      {"VAT xi", [](double v) { VAT(table(), VATOptions().xi(v)); }},
      {"VAT weight", [](double v) { VAT(table(), VATOptions().weight(v)); }},
      {"R3F sigma", [](double v) { R3F(table(), R3FOptions().sigma(v)); }},
      {"R3F weight", [](double v) { R3F(table(), R3FOptions().weight(v)); }},
      {"LLR epsilon", [](double v) { LLR(table(), LLROptions().epsilon(v)); }},
      {"LLR alpha", [](double v) { LLR(table(), LLROptions().alpha(v)); }},
      {"LLR weight", [](double v) { LLR(table(), LLROptions().weight(v)); }},
      {"LLR grad_weight",
       [](double v) { LLR(table(), LLROptions().grad_weight(v)); }},
      {"AWP alpha", [](double v) { AWP(table(), AWPOptions().alpha(v)); }},
      {"AWP epsilon", [](double v) { AWP(table(), AWPOptions().epsilon(v)); }},
      {"YOPO alpha",
       [&](double v) { YOPO(emb, first, YOPOOptions().alpha(v)); }},
      {"YOPO epsilon",
       [&](double v) { YOPO(emb, first, YOPOOptions().epsilon(v)); }},
      {"YOPO init_mag",
       [&](double v) { YOPO(emb, first, YOPOOptions().init_mag(v)); }}};
  for (const auto& [what, make] : all) {
    INFO(what);
    const std::string field = what.substr(what.find(' ') + 1);
    for (double v : {inf, -inf}) {
      CHECK_THROWS_WITH(
          make(v), Contains("Invalid " + field) && Contains("must be finite"));
    }
  }
}

TEST_CASE("Bad targets are rejected", "[options]") {
  using namespace advtrain;
  CHECK_THROWS_WITH(
      FGM(std::vector<torch::Tensor>{}), Contains("at least one target"));
  CHECK_THROWS_WITH(
      FGM({torch::zeros({3, 3})}), Contains("does not require grad"));
  CHECK_THROWS_WITH(
      PGD({torch::zeros({3}, torch::kLong)}), Contains("floating-point"));
  const auto t = torch::zeros({2, 2}).requires_grad_();
  CHECK_THROWS_WITH(FGM({t, t}), Contains("same tensor"));

  auto model = make_model();
  model->embedding->weight.set_requires_grad(false);
  CHECK_THROWS_WITH(
      FGM(*model, "embedding"),
      Contains("embedding.weight") && Contains("does not require grad"));
}

TEST_CASE(
    "select_parameters lists the names when nothing matches", "[select]") {
  auto model = make_model();
  const auto picked = advtrain::select_parameters(*model, "embedding");
  REQUIRE(picked.size() == 1);
  CHECK(picked[0].is_same(model->embedding->weight));
  CHECK(advtrain::select_parameters(*model, "fc.").size() == 2);
  CHECK_THROWS_AS(
      advtrain::select_parameters(*model, "word_embeddings"),
      std::invalid_argument);
  CHECK_THROWS_WITH(
      advtrain::select_parameters(*model, "word_embeddings"),
      Contains("word_embeddings") && Contains("embedding.weight") &&
          Contains("fc.weight") && Contains("fc.bias"));
  CHECK_THROWS_AS(advtrain::FGM(*model, "nothing"), std::invalid_argument);
}

TEST_CASE(
    "attack() before any backward is an error that changes nothing",
    "[attacker]") {
  auto model = make_model();
  const auto before = model->embedding->weight.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  CHECK_THROWS_WITH(fgm.attack(), Contains("backward"));
  CHECK_FALSE(fgm.is_perturbed());
  CHECK(torch::equal(model->embedding->weight, before));
}

TEST_CASE(
    "Sparse gradients are refused clearly where the whole table moves",
    "[attacker][sparse]") {
  torch::nn::Embedding emb(torch::nn::EmbeddingOptions(5, 3).sparse(true));
  emb(torch::tensor({0, 2}, torch::kLong)).sum().backward();
  REQUIRE(emb->weight.grad().is_sparse());
  const auto before = emb->weight.detach().clone();
  advtrain::FreeAT freeat(*emb, "weight");
  CHECK_THROWS_WITH(
      freeat.attack(),
      Contains("FreeAT: the gradient of weight is sparse") &&
          Contains("needs a dense gradient"));
  CHECK_THROWS_WITH(freeat.update_delta(), Contains("is sparse"));
  CHECK_FALSE(freeat.is_perturbed());
  CHECK(torch::equal(emb->weight, before));
  // FGM moves the gradient's rows alone: it takes it.
  advtrain::FGM fgm(*emb, "weight");
  fgm.attack();
  CHECK_FALSE(torch::equal(emb->weight, before));
  fgm.restore();
  CHECK(torch::equal(emb->weight, before));
}

TEST_CASE(
    "Zero and NaN gradients leave the weights unperturbed", "[attacker]") {
  const double fill =
      GENERATE(0.0, kNaN, std::numeric_limits<double>::infinity());
  auto model = make_model();
  auto& W = model->embedding->weight;
  const auto before = W.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  advtrain::FGSM fgsm(*model, "embedding");
  advtrain::PGD pgd(*model, "embedding");
  WarningCapture warnings;
  for (advtrain::SearchAttacker* a :
       std::vector<advtrain::SearchAttacker*>{&fgm, &fgsm, &pgd}) {
    W.mutable_grad() = torch::full_like(W, fill);
    a->attack();
    CHECK(torch::equal(W, before));
    CHECK(a->perturbation_norm() == 0.0);
    a->restore();
    CHECK(torch::equal(W, before));
  }
}

TEST_CASE(
    "Trainer::step with a zero or NaN loss keeps the weights finite",
    "[trainer]") {
  const double scale = GENERATE(0.0, kNaN);
  auto model = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  advtrain::PGD pgd(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, pgd);
  const auto W0 = model->embedding->weight.detach().clone();
  WarningCapture warnings;
  const auto r = trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y) * scale; });
  CHECK(r.perturbation_norm == 0.0);
  CHECK_FALSE(pgd.is_perturbed());
  if (scale == 0.0) {
    // Zero gradients everywhere: SGD leaves the table exactly as it was.
    CHECK(torch::equal(model->embedding->weight, W0));
  }
}

TEST_CASE(
    "A throwing closure leaves weights and grads as before the step",
    "[trainer]") {
  // The closure throws on call number `fail_at` (1 = clean pass).
  const int fail_at = GENERATE(1, 2, 3, 4);
  const bool in_loss = GENERATE(false, true);
  auto model = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto params = model->parameters();
  // Gradients left by some earlier work, which the step must not lose.
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  const auto weights_before = clone_all(params);
  const auto grads_before = clone_all(grads_of(params));

  advtrain::PGD pgd(*model, "embedding", advtrain::PGDOptions().steps(3));
  advtrain::FGM fgm(*model, "embedding");
  advtrain::Attacker& attacker =
      fail_at <= 2 && in_loss ? static_cast<advtrain::Attacker&>(fgm) : pgd;
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, attacker);
  int calls = 0;
  auto forward = [&] {
    if (!in_loss && ++calls == fail_at) {
      throw std::runtime_error("forward failed");
    }
    return model->forward(x);
  };
  auto loss = [&](const torch::Tensor& out) {
    if (in_loss && ++calls == fail_at) {
      throw std::runtime_error("loss failed");
    }
    return cross_entropy(out, y);
  };
  CHECK_THROWS_WITH(trainer.step(forward, loss), Contains("failed"));
  CHECK(calls == fail_at);
  CHECK(equal_all(clone_all(params), weights_before));
  CHECK(equal_all(clone_all(grads_of(params)), grads_before));
  CHECK_FALSE(attacker.is_perturbed());
}

TEST_CASE(
    "A non-scalar loss is rejected and nothing is left perturbed",
    "[trainer]") {
  auto model = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  const auto weights_before = clone_all(model->parameters());
  advtrain::FGM fgm(*model, "embedding");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, fgm);
  CHECK_THROWS_WITH(
      trainer.step(
          [&] { return model->forward(x); },
          [&](const torch::Tensor& out) {
            return torch::nn::functional::cross_entropy(
                out,
                y,
                torch::nn::functional::CrossEntropyFuncOptions().reduction(
                    torch::kNone));
          }),
      Contains("scalar"));
  CHECK(equal_all(clone_all(model->parameters()), weights_before));
}

TEST_CASE("backup_grad and restore_grad", "[attacker]") {
  auto model = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  advtrain::PGD pgd(*model, "embedding");
  // An unused parameter with an undefined grad is skipped, not a crash.
  auto unused = model->register_parameter("unused", torch::zeros({2}));
  pgd.watch_grads(model->parameters());
  cross_entropy(model->forward(x), y).backward();
  const auto saved = clone_all(grads_of(model->parameters()));
  REQUIRE_FALSE(unused.grad().defined());
  pgd.backup_grad();
  model->zero_grad();
  cross_entropy(model->forward(x) * 2.0, y).backward();
  CHECK_FALSE(equal_all(clone_all(grads_of(model->parameters())), saved));
  pgd.restore_grad();
  CHECK(equal_all(clone_all(grads_of(model->parameters())), saved));
  // Handed over: a second restore_grad() (like one without backup_grad())
  // would leave the clean gradient out of the step, so it refuses.
  CHECK_THROWS_WITH(pgd.restore_grad(), Contains("without backup_grad()"));
  CHECK(equal_all(clone_all(grads_of(model->parameters())), saved));
  advtrain::PGD fresh(*model, "embedding");
  CHECK_THROWS_WITH(fresh.restore_grad(), Contains("without backup_grad()"));

  advtrain::FGM unwatched({model->embedding->weight});
  CHECK_THROWS_WITH(unwatched.backup_grad(), Contains("watch_grads"));
}

TEST_CASE("version.h matches the CMake project version", "[version]") {
  const std::string header = std::to_string(ADVTRAIN_VERSION_MAJOR) + "." +
                             std::to_string(ADVTRAIN_VERSION_MINOR) + "." +
                             std::to_string(ADVTRAIN_VERSION_PATCH);
  CHECK(header == ADVTRAIN_CMAKE_VERSION);
}

TEST_CASE(
    "Bad inputs refuse, saying what to do, and change nothing", "[errors]") {
  SECTION("a table frozen after the attacker was built") {
    for (const auto& c : fixture::strategies()) {
      if (!c.on_table) {
        continue;
      }
      INFO(c.name);
      auto model = make_model();
      auto attacker = c.on_table(*model, "embedding", false);
      model->embedding->weight.requires_grad_(false);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
      advtrain::Trainer trainer(opt, *attacker);
      const auto before = clone_all(model->parameters());
      CHECK_THROWS_WITH(
          trainer.step(
              [&] { return model->forward(batch_ids()); },
              [&](const torch::Tensor& out) {
                return cross_entropy(out, batch_labels());
              }),
          Contains("embedding.weight no longer requires grad"));
      CHECK(equal_all(clone_all(model->parameters()), before));
    }
  }
  SECTION("AWP on a module whose parameters are all frozen") {
    auto model = make_model();
    for (auto& p : model->parameters()) {
      p.requires_grad_(false);
    }
    CHECK_THROWS_WITH(
        advtrain::AWP(*model),
        Contains("every parameter of the module is frozen"));
  }
  SECTION("an empty batch per example") {
    auto model = make_act();
    advtrain::FGM fgm(model->embedding);
    for (const auto& ids :
         {torch::zeros({0, 5}, torch::kLong),
          torch::zeros({3, 0}, torch::kLong)}) {
      CHECK_THROWS_WITH(model->forward(ids), Contains("non-empty batch"));
    }
  }
  SECTION("a batch of another shape while perturbed") {
    auto model = make_act();
    advtrain::FGM fgm(model->embedding);
    const auto x = padded_ids(); // [3, 5]
    cross_entropy(model->forward(x), batch_labels()).backward();
    fgm.attack();
    const auto other = x.slice(0, 0, 2).slice(1, 0, 4);
    CHECK_THROWS_WITH(model->forward(other), Contains("call restore() first"));
    CHECK(fgm.is_perturbed());
    CHECK_NOTHROW(fgm.restore());
    CHECK_FALSE(fgm.is_perturbed());
    CHECK_NOTHROW(model->forward(other)); // a new batch after the restore
  }
}
