// FGSM, FGM and PGD: one Trainer::step against the same method written plainly
// with tensor ops; the README's low-level loops against Trainer::step; restore
// and projection bounds.

#include "common.h"
#include "strategies.h"

#include <torch/script.h>
#include "catch.h"

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

using namespace fixture;

namespace {

advtrain::StepResult trainer_step(
    TinyNet& model, advtrain::Attacker& attacker) {
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, attacker);
  const auto x = batch_ids();
  const auto y = batch_labels();
  return trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
}

/// Plain PGD: returns the parameters after one SGD step and whether the
/// projection was ever active.
std::pair<Plain, bool> plain_pgd(
    const Plain& p0, double eps, double alpha, int k) {
  const auto x = batch_ids();
  const auto y = batch_labels();
  const Plain g0 = plain_grads(p0, x, y);
  auto delta = torch::zeros_like(p0.W);
  Plain g = g0;
  bool projected = false;
  for (int t = 0; t < k; ++t) {
    delta = delta + alpha * g.W / g.W.norm();
    const double n = delta.norm().item<double>();
    if (n > eps) {
      delta = eps * delta / n;
      projected = true;
    }
    g = plain_grads(p0.with_W(p0.W + delta), x, y);
  }
  return {sgd(p0, g0 + g), projected};
}

} // namespace

TEST_CASE("FGM step equals the plain computation", "[fgm]") {
  const double eps = GENERATE(0.05, 1.0, 3.0);
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  const Plain g0 = plain_grads(p0, x, y);
  const auto delta = eps * g0.W / g0.W.norm();
  const Plain g1 = plain_grads(p0.with_W(p0.W + delta), x, y);
  const Plain expected = sgd(p0, g0 + g1);

  advtrain::FGM fgm(*model, "embedding", advtrain::FGMOptions().epsilon(eps));
  const auto r = trainer_step(model, fgm);
  CHECK(max_diff(model, expected) < kTol);
  CHECK(r.passes == 2);
  CHECK(r.perturbation_norm == Approx(eps).epsilon(1e-12));
  CHECK(r.loss == Approx(plain_loss(p0, x, y).item<double>()).epsilon(1e-12));
  CHECK(
      r.adv_loss ==
      Approx(plain_loss(p0.with_W(p0.W + delta), x, y).item<double>())
          .epsilon(1e-12));
  CHECK_FALSE(fgm.is_perturbed());
}

TEST_CASE("FGSM step equals the plain computation", "[fgsm]") {
  const double eps = GENERATE(0.01, 0.2);
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  const Plain g0 = plain_grads(p0, x, y);
  const auto delta = eps * g0.W.sign();
  const Plain g1 = plain_grads(p0.with_W(p0.W + delta), x, y);
  const Plain expected = sgd(p0, g0 + g1);

  advtrain::FGSM fgsm(
      {model->embedding->weight}, advtrain::FGSMOptions().epsilon(eps));
  const auto r = trainer_step(model, fgsm);
  CHECK(max_diff(model, expected) < kTol);
  CHECK(r.passes == 2);
  // Rows 5 and 6 are not in the batch: zero gradient, zero sign, so 5 rows of
  // 4 elements move by eps each.
  CHECK(r.perturbation_norm == Approx(eps * std::sqrt(5.0 * 4.0)));
}

TEST_CASE("PGD step equals the plain computation", "[pgd]") {
  struct Case {
    double eps, alpha;
    int k;
    bool projects;
  };
  const Case c = GENERATE(
      Case{1.0, 0.1, 3, false},
      Case{1.0, 0.6, 3, true},
      Case{0.5, 0.3, 1, false},
      Case{0.2, 0.3, 1, true},
      Case{2.0, 0.5, 6, true});
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto plain = plain_pgd(p0, c.eps, c.alpha, c.k);
  REQUIRE(plain.second == c.projects);

  advtrain::PGD pgd(
      *model,
      "embedding",
      advtrain::PGDOptions().epsilon(c.eps).alpha(c.alpha).steps(c.k));
  const auto r = trainer_step(model, pgd);
  CHECK(max_diff(model, plain.first) < kTol);
  CHECK(r.passes == c.k + 1);
  CHECK(r.perturbation_norm <= c.eps * (1 + 1e-12));
  CHECK_FALSE(pgd.is_perturbed());
}

TEST_CASE("Several targets each get their own norm", "[fgm]") {
  auto model = make_model();
  const Plain p0 = Plain::of(model);
  const auto x = batch_ids();
  const auto y = batch_labels();
  const double eps = 0.7;
  const Plain g0 = plain_grads(p0, x, y);
  const Plain moved{
      p0.W + eps * g0.W / g0.W.norm(), p0.A + eps * g0.A / g0.A.norm(), p0.b};
  const Plain expected = sgd(p0, g0 + plain_grads(moved, x, y));

  advtrain::FGM fgm(
      {model->embedding->weight, model->fc->weight},
      advtrain::FGMOptions().epsilon(eps));
  const auto r = trainer_step(model, fgm);
  CHECK(max_diff(model, expected) < kTol);
  CHECK(r.perturbation_norm == Approx(eps * std::sqrt(2.0)));
}

TEST_CASE("README's low-level FGM loop equals Trainer::step", "[fgm][loop]") {
  auto a = make_model();
  auto b = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
    return cross_entropy(out, t);
  };

  advtrain::FGM fgm_a(*a, "embedding", advtrain::FGMOptions().epsilon(0.8));
  advtrain::FGM fgm_b(*b, "embedding", advtrain::FGMOptions().epsilon(0.8));
  torch::optim::SGD opt_a(a->parameters(), torch::optim::SGDOptions(kLr));
  torch::optim::SGD optimizer(b->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt_a, fgm_a);
  auto& model = b;
  for (int batch = 0; batch < 3; ++batch) {
    trainer.step(
        [&] { return a->forward(x); },
        [&](const torch::Tensor& out) { return loss_fn(out, y); });

    loss_fn(model->forward(x), y).backward();
    fgm_b.attack();
    loss_fn(model->forward(x), y).backward();
    fgm_b.restore();
    optimizer.step();
    optimizer.zero_grad();
  }
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    CHECK(max_abs_diff(a->parameters()[i], b->parameters()[i]) < 1e-12);
  }
  // And both moved: the loop really trained.
  CHECK(max_diff(a, Plain::of(make_model())) > 1e-3);
}

TEST_CASE("README's low-level PGD loop equals Trainer::step", "[pgd][loop]") {
  const int K = GENERATE(1, 3);
  auto a = make_model();
  auto b = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
    return cross_entropy(out, t);
  };
  const auto opts = advtrain::PGDOptions().epsilon(0.5).alpha(0.3).steps(K);
  advtrain::PGD pgd_a(*a, "embedding", opts);
  torch::optim::SGD opt_a(a->parameters(), torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt_a, pgd_a);

  auto& model = b;
  advtrain::PGD pgd(
      *model,
      "embedding",
      advtrain::PGDOptions().epsilon(0.5).alpha(0.3).steps(K));
  torch::optim::SGD optimizer(b->parameters(), torch::optim::SGDOptions(kLr));
  for (int batch = 0; batch < 3; ++batch) {
    trainer.step(
        [&] { return a->forward(x); },
        [&](const torch::Tensor& out) { return loss_fn(out, y); });

    loss_fn(model->forward(x), y).backward();
    pgd.backup_grad();
    for (int t = 0; t < K; ++t) {
      pgd.attack(/*is_first_attack=*/t == 0);
      if (t != K - 1)
        optimizer.zero_grad();
      else
        pgd.restore_grad();
      loss_fn(model->forward(x), y).backward();
    }
    pgd.restore();
    optimizer.step();
    optimizer.zero_grad();
  }
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    CHECK(max_abs_diff(a->parameters()[i], b->parameters()[i]) < 1e-12);
  }
  CHECK(max_diff(a, Plain::of(make_model())) > 1e-3);
}

TEST_CASE("restore() returns the weights bit for bit", "[attacker]") {
  auto model = make_model();
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto& W = model->embedding->weight;
  const auto before = W.detach().clone();

  advtrain::FGM fgm(*model, "embedding");
  advtrain::FGSM fgsm(
      *model, "embedding", advtrain::FGSMOptions().epsilon(0.3));
  advtrain::PGD pgd(*model, "embedding");
  for (advtrain::SearchAttacker* attacker :
       std::vector<advtrain::SearchAttacker*>{&fgm, &fgsm, &pgd}) {
    model->zero_grad();
    cross_entropy(model->forward(x), y).backward();
    attacker->attack();
    CHECK_FALSE(torch::equal(W, before));
    attacker->attack(); // repeated attack keeps the first backup
    cross_entropy(model->forward(x), y).backward();
    attacker->attack(false);
    attacker->restore();
    CHECK(torch::equal(W, before));
    attacker->restore(); // a second restore is a no-op
    CHECK(torch::equal(W, before));
  }
}

TEST_CASE("PGD's perturbation never exceeds epsilon", "[pgd]") {
  const double eps = GENERATE(0.1, 0.5, 1.0);
  auto model = make_model(11);
  const auto x = batch_ids();
  const auto y = batch_labels();
  auto& W = model->embedding->weight;
  const auto origin = W.detach().clone();
  advtrain::PGD pgd(
      *model,
      "embedding",
      advtrain::PGDOptions().epsilon(eps).alpha(0.4).steps(8));
  cross_entropy(model->forward(x), y).backward();
  double largest = 0;
  for (int t = 0; t < 8; ++t) {
    pgd.attack(t == 0);
    const double n = (W - origin).norm().item<double>();
    CHECK(n <= eps * (1 + 1e-12));
    CHECK(pgd.perturbation_norm() == Approx(n).epsilon(1e-9));
    largest = std::max(largest, n);
    model->zero_grad();
    cross_entropy(model->forward(x), y).backward();
  }
  // The bound was reached, so the projection was exercised.
  CHECK(largest == Approx(eps).epsilon(1e-9));
  pgd.restore();
  CHECK(torch::equal(W, origin));
}

TEST_CASE("Rows of tokens not in the batch are not perturbed", "[attacker]") {
  auto model = make_model();
  auto& W = model->embedding->weight;
  const auto before = W.detach().clone();
  advtrain::FGM fgm(*model, "embedding");
  cross_entropy(model->forward(batch_ids()), batch_labels()).backward();
  fgm.attack();
  CHECK(torch::equal(W.narrow(0, 5, 2), before.narrow(0, 5, 2)));
  CHECK_FALSE(torch::equal(W.narrow(0, 0, 5), before.narrow(0, 0, 5)));
  fgm.restore();
}

TEST_CASE("Half-precision tables take their norm in float32", "[attacker]") {
  const auto dtype = GENERATE(torch::kHalf, torch::kBFloat16);
  // ‖g‖² = 64 * 300² ≈ 5.8e6 overflows float16 (max 65504).
  auto W = torch::zeros({8, 8}, dtype).requires_grad_();
  W.mutable_grad() = torch::full({8, 8}, 300.0, dtype);
  advtrain::FGM fgm({W}, advtrain::FGMOptions().epsilon(1.0));
  fgm.attack();
  const auto w = W.detach().to(torch::kFloat);
  CHECK(torch::isfinite(w).all().item<bool>());
  // Each element is 1/8: ε * 300 / (8 * 300).
  CHECK(w.min().item<double>() == Approx(0.125).epsilon(1e-2));
  CHECK(fgm.perturbation_norm() == Approx(1.0));
  fgm.restore();
  CHECK(torch::equal(W, torch::zeros({8, 8}, dtype)));
}

TEST_CASE("A TorchScript model trains like a LibTorch one", "[torchscript]") {
  torch::jit::Module scripted = torch::jit::load(
      std::string(ADVTRAIN_TEST_DATA_DIR) + "/scripted_classifier.pt");
  std::map<std::string, torch::Tensor> named;
  for (const auto& item : scripted.named_parameters()) {
    named[item.name] = item.value;
  }
  REQUIRE(named.size() == 3);
  const Plain p0{
      named.at("embedding.weight").detach().clone(),
      named.at("fc.weight").detach().clone(),
      named.at("fc.bias").detach().clone()};
  const auto x = batch_ids();
  const auto y = batch_labels();
  const double eps = 0.6;
  const Plain g0 = plain_grads(p0, x, y);
  const Plain g1 =
      plain_grads(p0.with_W(p0.W + eps * g0.W / g0.W.norm()), x, y);
  const Plain expected = sgd(p0, g0 + g1);

  const auto picked = advtrain::select_parameters(scripted, "embedding");
  REQUIRE(picked.size() == 1);
  CHECK(picked[0].is_same(named.at("embedding.weight")));
  CHECK_THROWS_WITH(
      advtrain::select_parameters(scripted, "word_embeddings"),
      fixture::matchers::Contains("fc.bias"));

  std::vector<torch::Tensor> params;
  for (const auto& p : scripted.parameters()) {
    params.push_back(p);
  }
  advtrain::FGM fgm(scripted, "embedding", advtrain::FGMOptions().epsilon(eps));
  torch::optim::SGD opt(params, torch::optim::SGDOptions(kLr));
  advtrain::Trainer trainer(opt, fgm);
  const auto r = trainer.step(
      [&] { return scripted.forward({x}).toTensor(); },
      [&](const torch::Tensor& out) { return cross_entropy(out, y); });
  CHECK(r.passes == 2);
  CHECK(max_abs_diff(named.at("embedding.weight"), expected.W) < kTol);
  CHECK(max_abs_diff(named.at("fc.weight"), expected.A) < kTol);
  CHECK(max_abs_diff(named.at("fc.bias"), expected.b) < kTol);
}

TEST_CASE(
    "after_optimizer_step runs after each optimizer step, with the new "
    "parameters",
    "[trainer]") {
  auto model = make_model();
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(kLr));
  auto run = [&](advtrain::Attacker& attacker, bool accumulate) {
    advtrain::Trainer trainer(opt, attacker);
    std::vector<torch::Tensor> seen;
    trainer.after_optimizer_step(
        [&] { seen.push_back(model->fc->weight.detach().clone()); });
    auto forward = [&] { return model->forward(batch_ids()); };
    auto loss = [&](const torch::Tensor& out) {
      return cross_entropy(out, batch_labels());
    };
    const auto before = model->fc->weight.detach().clone();
    if (accumulate) {
      trainer.accumulate(forward, loss);
      opt.zero_grad();
    } else {
      trainer.step(forward, loss);
    }
    if (!seen.empty()) {
      CHECK(bit_equal(seen.back(), model->fc->weight.detach()));
      CHECK_FALSE(bit_equal(seen.front(), before));
    }
    return seen.size();
  };
  advtrain::FGM fgm(*model, "embedding");
  CHECK(run(fgm, false) == 1);
  CHECK(run(fgm, true) == 0);
  advtrain::FreeAT freeat(
      *model, "embedding", advtrain::FreeATOptions().replays(3));
  CHECK(run(freeat, false) == 3);
}

// Sparse table gradients (nn::EmbeddingOptions().sparse(true)): the
// strategies that move only gradient rows take them and train exactly as on
// the dense gradient (which the conformance tests hold to the official
// code); the others refuse them and leave the model as it was.

namespace {

/// `model`'s table made sparse: its lookup's backward yields a sparse
/// gradient.
TinyNet sparse_model(uint64_t seed = 7) {
  auto m = make_model(seed);
  m->embedding->options.sparse(true);
  return m;
}

/// Two batches, each leaving some rows of the table unused.
std::vector<std::pair<torch::Tensor, torch::Tensor>> two_batches() {
  return {
      {batch_ids(), batch_labels()},
      {torch::tensor({{6, 6, 1, 0, 1}, {1, 0, 0, 6, 1}}, torch::kLong),
       torch::tensor({1, 0}, torch::kLong)}};
}

/// Trains `model` with `attacker` for two steps on each of the two batches;
/// returns the parameters after each step.
template <typename Opt>
std::vector<std::vector<torch::Tensor>> train_steps(
    TinyNet& model, advtrain::Attacker& attacker, Opt& opt) {
  advtrain::Trainer trainer(opt, attacker);
  std::vector<std::vector<torch::Tensor>> after;
  for (int round = 0; round < 2; ++round) {
    for (const auto& b : two_batches()) {
      trainer.step(
          [&] { return model->forward(b.first); },
          [&](const torch::Tensor& out) {
            return cross_entropy(out, b.second);
          });
      CHECK_FALSE(attacker.is_perturbed());
      after.push_back(clone_all(model->parameters()));
    }
  }
  return after;
}

} // namespace

TEST_CASE(
    "Sparse table gradients train as the dense ones, or are refused",
    "[sparse]") {
  for (const auto& c : fixture::strategies()) {
    if (!c.on_table) {
      continue;
    }
    for (const std::string opt_name : {"SGD", "Adagrad"}) {
      DYNAMIC_SECTION(c.name << " with " << opt_name) {
        auto dense = make_model();
        auto sparse = sparse_model();
        const auto a_dense = c.on_table(*dense, "embedding", false);
        const auto a_sparse = c.on_table(*sparse, "embedding", false);
        const auto run = [&](TinyNet& m, advtrain::Attacker& a) {
          if (opt_name == "SGD") {
            torch::optim::SGD opt(
                m->parameters(), torch::optim::SGDOptions(kLr));
            return train_steps(m, a, opt);
          }
          torch::optim::Adagrad opt(
              m->parameters(), torch::optim::AdagradOptions(kLr));
          return train_steps(m, a, opt);
        };
        // What the entry expects is what the strategy declares.
        CHECK(c.takes_sparse_table() == a_dense->traits().accepts_sparse());
        if (c.takes_sparse_table()) {
          const auto want = run(dense, *a_dense);
          const auto got = run(sparse, *a_sparse);
          REQUIRE(got.size() == want.size());
          for (size_t s = 0; s < want.size(); ++s) {
            INFO("after step " << s + 1);
            CHECK(max_diff_all(got[s], want[s]) < 1e-12);
          }
          // The table really moved and the gradient really was sparse.
          CHECK_FALSE(torch::equal(
              got.back()[0], make_model()->embedding->weight.detach()));
          CHECK(sparse->embedding->weight.grad().is_sparse());
        } else {
          const auto before = clone_all(sparse->parameters());
          CHECK_THROWS_WITH(
              run(sparse, *a_sparse),
              fixture::matchers::Contains("is sparse") &&
                  fixture::matchers::Contains("needs a dense gradient"));
          CHECK_FALSE(a_sparse->is_perturbed());
          CHECK(equal_all(clone_all(sparse->parameters()), before));
        }
      }
    }
  }
}

TEST_CASE(
    "README's own PGD loop on a sparse table equals the dense one",
    "[sparse][loop]") {
  const auto loop = [](TinyNet& m) {
    advtrain::PGD pgd(
        *m, "embedding", advtrain::PGDOptions().steps(3).epsilon(0.2));
    torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(kLr));
    for (const auto& b : two_batches()) {
      opt.zero_grad();
      cross_entropy(m->forward(b.first), b.second).backward();
      pgd.backup_grad();
      for (int t = 0; t < 3; ++t) {
        pgd.attack(t == 0);
        if (t != 2) {
          opt.zero_grad();
        } else {
          pgd.restore_grad();
        }
        cross_entropy(m->forward(b.first), b.second).backward();
      }
      pgd.restore();
      opt.step();
    }
    return clone_all(m->parameters());
  };
  auto dense = make_model();
  auto sparse = sparse_model();
  CHECK(max_diff_all(loop(sparse), loop(dense)) < 1e-12);
}

TEST_CASE(
    "On a sparse table the attacker holds the batch's rows alone", "[sparse]") {
  torch::manual_seed(3);
  torch::nn::Embedding table(
      torch::nn::EmbeddingOptions(10000, kHidden).sparse(true));
  table->to(torch::kDouble);
  const auto before = table->weight.detach().clone();
  advtrain::FGM fgm(*table, "weight");
  const auto ids = batch_ids(); // rows 0-4
  table->forward(ids).pow(2).sum().backward();
  REQUIRE(table->weight.grad().is_sparse());
  fgm.attack();
  // Five rows of four doubles backed up, not 10,000.
  CHECK(fgm.held_bytes() == 5 * kHidden * 8);
  CHECK(std::abs(fgm.perturbation_norm() - 1.0) < 1e-12);
  CHECK(torch::equal(
      table->weight.detach().narrow(0, 5, 9995), before.narrow(0, 5, 9995)));
  fgm.restore();
  CHECK(bit_equal(table->weight.detach(), before));
}

TEST_CASE(
    "The row search finds exactly the rows with a nonzero entry",
    "[attacker][sparse]") {
  // Against a plain elementwise test, in each dtype a table may have, across
  // the search's block boundary (2^16 rows), with NaN, infinite and tiny
  // entries and rows whose entries cancel in a plain sum.
  torch::manual_seed(11);
  for (const auto dtype :
       {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    for (const int64_t rows : {int64_t{7}, int64_t{70000}}) {
      INFO("dtype " << dtype << ", " << rows << " rows");
      torch::Tensor g = torch::zeros({rows, 3}, torch::kDouble);
      const auto picked = torch::randint(rows, {20}, torch::kLong);
      g.index_put_({picked}, torch::randn({20, 3}, torch::kDouble));
      g[rows - 1][2] = std::numeric_limits<double>::quiet_NaN();
      g[1][0] = 1.0; // cancels in a plain sum
      g[1][1] = -1.0;
      g[rows / 2][0] = -std::numeric_limits<double>::infinity();
      g[rows / 3][1] = 1e-30; // stays nonzero in float and double
      g = g.to(dtype);
      const auto want = g.ne(0).any(1).nonzero().view(-1);
      const auto got = advtrain::detail::nonzero_rows(g);
      CHECK(torch::equal(got, want));
    }
  }
}

TEST_CASE(
    "Sparse tables: new rows in later attacks, AWP on every weight, "
    "accumulated micro-batches",
    "[sparse]") {
  const auto batches = two_batches();
  SECTION("PGD's second attack meets rows the first did not") {
    // Batch 2 uses row 6, which batch 1 does not: the backup grows.
    const auto loop = [&](TinyNet& m) {
      const auto before = clone_all(m->parameters());
      advtrain::PGD pgd(
          *m, "embedding", advtrain::PGDOptions().alpha(0.5).epsilon(0.6));
      std::vector<torch::Tensor> moved;
      for (size_t k = 0; k < batches.size(); ++k) {
        m->zero_grad();
        cross_entropy(m->forward(batches[k].first), batches[k].second)
            .backward();
        pgd.attack(k == 0);
        moved.push_back(m->embedding->weight.detach().clone());
      }
      pgd.restore();
      CHECK(equal_all(clone_all(m->parameters()), before));
      return moved;
    };
    auto dense = make_model();
    auto sparse = sparse_model();
    const auto want = loop(dense), got = loop(sparse);
    CHECK(max_diff_all(got, want) < 1e-12);
    // Row 6 moved only in the second attack.
    CHECK(torch::equal(got[0][6], make_model()->embedding->weight[6]));
    CHECK_FALSE(torch::equal(got[1][6], make_model()->embedding->weight[6]));
  }
  SECTION("AWP, two steps, on every weight (sparse table, dense layer)") {
    const auto run = [&](TinyNet& m) {
      advtrain::AWP awp(
          *m, "weight", advtrain::AWPOptions().epsilon(0.05).steps(2));
      torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(kLr));
      return train_steps(m, awp, opt);
    };
    auto dense = make_model();
    auto sparse = sparse_model();
    const auto want = run(dense), got = run(sparse);
    for (size_t s = 0; s < want.size(); ++s) {
      CHECK(max_diff_all(got[s], want[s]) < 1e-12);
    }
  }
  SECTION("FGM over two accumulated micro-batches") {
    const auto run = [&](TinyNet& m) {
      advtrain::FGM fgm(*m, "embedding");
      torch::optim::Adagrad opt(
          m->parameters(), torch::optim::AdagradOptions(kLr));
      advtrain::Trainer trainer(opt, fgm);
      for (const auto& b : batches) {
        trainer.accumulate(
            [&] { return m->forward(b.first); },
            [&](const torch::Tensor& out) {
              return cross_entropy(out, b.second) * 0.5;
            });
      }
      opt.step();
      return clone_all(m->parameters());
    };
    auto dense = make_model();
    auto sparse = sparse_model();
    CHECK(max_diff_all(run(sparse), run(dense)) < 1e-12);
  }
  SECTION("A refusal with several targets leaves FreeAT's delta alone") {
    auto m = sparse_model();
    // The dense layer first: its δ would move before the table refuses.
    advtrain::FreeAT freeat(
        std::vector<torch::Tensor>{m->fc->weight, m->embedding->weight});
    torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(kLr));
    const auto before = clone_all(m->parameters());
    CHECK_THROWS_WITH(
        train_steps(m, freeat, opt), fixture::matchers::Contains("is sparse"));
    for (const auto& d : freeat.deltas()) {
      CHECK((!d.defined() || d.abs().max().item<double>() == 0.0));
    }
    CHECK(equal_all(clone_all(m->parameters()), before));
  }
}

TEST_CASE(
    "Per example, every strategy trains on a sparse table as on a dense one",
    "[sparse]") {
  // δ's gradient is dense; only the table's own gradient is sparse.
  for (const auto& c : fixture::strategies()) {
    if (!c.per_example) {
      continue;
    }
    DYNAMIC_SECTION(c.name) {
      const auto run = [&](bool sparse) {
        auto m = make_act();
        m->embedding->options.sparse(sparse);
        const auto a = c.per_example(m->embedding, false);
        torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(kLr));
        advtrain::Trainer trainer(opt, *a);
        torch::manual_seed(5); // the same draws on both sides
        for (int s = 0; s < 2; ++s) {
          trainer.step(
              [&] { return m->forward(padded_ids()); },
              [&](const torch::Tensor& out) {
                return cross_entropy(out, batch_labels());
              });
        }
        if (sparse) {
          CHECK(m->embedding->weight.grad().is_sparse());
        }
        return clone_all(m->parameters());
      };
      CHECK(max_diff_all(run(true), run(false)) < 1e-12);
    }
  }
}

TEST_CASE(
    "A strategy has attack() exactly when its traits say it searches",
    "[attacker]") {
  // The base is chosen from the traits: SearchAttacker (attack(), the rule)
  // or Attacker (no rule to stub).
  for (const auto& c : fixture::strategies()) {
    DYNAMIC_SECTION(c.name) {
      auto model = make_act();
      const auto a = c.per_example ? c.per_example(model->embedding, false)
                                   : c.on_table(*model, "embedding", false);
      const bool searches =
          dynamic_cast<advtrain::SearchAttacker*>(a.get()) != nullptr;
      CHECK(searches == a->traits().searches());
    }
  }
  CHECK_FALSE(fixture::has_attack<advtrain::ASCC>);
  CHECK_FALSE(fixture::has_attack<advtrain::DNE>);
  CHECK(fixture::has_attack<advtrain::FreeAT>);
  CHECK(fixture::has_attack<advtrain::AWP>);
}
