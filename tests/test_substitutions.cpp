// Word substitution: the candidate sets (`SubstitutionTable`, first and
// second order) against a plain reading of the mapping, and ASCC's and DNE's
// steps (and DNE's ensemble) against the same computations written plainly
// (the official protocols' replays are in test_conformance.cpp).

#include "common.h"

#include "catch.h"

#include <advtrain/advtrain.h>
#include <advtrain/substitutions.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

using fixture::matchers::Contains;

namespace {

const std::vector<std::string> kVocabulary = {
    "<pad>", "<unk>", "good", "great", "fine", "bad", "awful", "film"};

/// The neighbours in the counter-fitted file's shape: word -> substitutes,
/// some outside the vocabulary, one repeated, one naming the word itself.
advtrain::SubstitutionTable::Substitutes neighbours() {
  return {
      {"good", {"great", "nice", "fine", "great", "good", "bad"}},
      {"bad", {"awful"}},
      {"awful", {"terrible", "bad"}},
      {"<unk>", {"good"}},
      {"missing", {"good"}}};
}

} // namespace

TEST_CASE(
    "SubstitutionTable keeps each word's substitutes in order, itself "
    "first",
    "[substitutions]") {
  const advtrain::SubstitutionTable table(
      kVocabulary, neighbours(), /*max_candidates=*/3, /*fixed=*/{0, 1});
  REQUIRE(table.vocabulary_size() == 8);
  REQUIRE(table.max_candidates() == 3);
  // Written out by hand from the mapping: "nice" is not in the vocabulary,
  // the repeated "great" and "good" itself are skipped, S = 3 cuts "bad".
  const std::vector<std::vector<int64_t>> ids = {
      {0, 0, 0},
      {1, 1, 1},
      {2, 3, 4},
      {3, 3, 3},
      {4, 4, 4},
      {5, 6, 5},
      {6, 5, 6},
      {7, 7, 7}};
  const std::vector<std::vector<int>> mask = {
      {1, 0, 0},
      {1, 0, 0},
      {1, 1, 1},
      {1, 0, 0},
      {1, 0, 0},
      {1, 1, 0},
      {1, 1, 0},
      {1, 0, 0}};
  for (size_t i = 0; i < ids.size(); ++i) {
    for (size_t s = 0; s < 3; ++s) {
      INFO("id " << i << " candidate " << s);
      CHECK(table.ids()[i][s].item<int64_t>() == ids[i][s]);
      CHECK(table.mask()[i][s].item<bool>() == (mask[i][s] == 1));
    }
  }
  CHECK(table.with_substitutes() == 3);

  SECTION("without a cut, the fifth candidate appears") {
    const advtrain::SubstitutionTable wide(kVocabulary, neighbours(), 5);
    CHECK(wide.ids()[2][3].item<int64_t>() == 5); // "bad"
    CHECK(wide.mask()[2][3].item<bool>());
    CHECK_FALSE(wide.mask()[2][4].item<bool>());
    // "<unk>" is not fixed here: its substitute comes in.
    CHECK(wide.ids()[1][1].item<int64_t>() == 2);
  }
}

TEST_CASE(
    "SubstitutionTable::gather gives each token its row, [B, L, S]",
    "[substitutions]") {
  const advtrain::SubstitutionTable table(kVocabulary, neighbours(), 3, {0});
  const torch::Tensor batch =
      torch::tensor({2, 7, 5, 0, 6, 2, 0, 0}, torch::kInt).reshape({2, 4});
  const advtrain::Candidates c = table.gather(batch);
  REQUIRE(c.ids.sizes() == torch::IntArrayRef({2, 4, 3}));
  REQUIRE(c.mask.sizes() == torch::IntArrayRef({2, 4, 3}));
  CHECK(c.ids.scalar_type() == torch::kLong);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t l = 0; l < 4; ++l) {
      const int64_t id = batch[b][l].item<int64_t>();
      INFO("token " << b << "," << l << " id " << id);
      CHECK(torch::equal(c.ids[b][l], table.ids()[id]));
      CHECK(torch::equal(c.mask[b][l], table.mask()[id]));
      CHECK(c.ids[b][l][0].item<int64_t>() == id);
    }
  }
}

TEST_CASE("SubstitutionTable from tensors is checked", "[substitutions]") {
  const torch::Tensor ids = torch::tensor({0, 1, 1, 0}).reshape({2, 2});
  const torch::Tensor mask =
      torch::tensor({true, true, true, false}).reshape({2, 2});
  const advtrain::SubstitutionTable table(ids, mask);
  CHECK(table.with_substitutes() == 1);
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(
          torch::tensor({1, 0, 1, 0}).reshape({2, 2}), mask),
      Contains("its own first candidate"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(
          torch::tensor({0, 2, 1, 0}).reshape({2, 2}), mask),
      Contains("lie in [0, 2)"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(ids, mask.to(torch::kLong)),
      Contains("mask must be a bool tensor"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(ids.to(torch::kFloat), mask),
      Contains("non-empty int64 [V, S]"));
}

TEST_CASE(
    "SubstitutionTable refuses bad input with what to do",
    "[substitutions][errors]") {
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(kVocabulary, neighbours(), 0),
      Contains("Invalid max_candidates: 0"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable({}, neighbours(), 3),
      Contains("the vocabulary is empty"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable({"a", "b", "a"}, neighbours(), 3),
      Contains("holds 'a' twice (ids 0 and 2)"));
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(kVocabulary, neighbours(), 3, {8}),
      Contains("fixed id 8 is outside the vocabulary [0, 8)"));
  const advtrain::SubstitutionTable table(kVocabulary, neighbours(), 3);
  CHECK_THROWS_WITH(
      table.gather(torch::tensor({1, 8})), Contains("outside the table's"));
  CHECK_THROWS_WITH(
      table.gather(torch::tensor({-1, 2})), Contains("outside the table's"));
  CHECK_THROWS_WITH(
      table.gather(torch::tensor({1.0, 2.0})), Contains("integer token ids"));
}

namespace {

/// Candidates over fixture::kVocab ids: token 0 pads (itself alone), 4 has
/// no substitute.
advtrain::SubstitutionTable small_table() {
  const std::vector<std::string> words = {
      "<pad>", "a", "b", "c", "d", "e", "f"};
  const advtrain::SubstitutionTable::Substitutes subs = {
      {"a", {"b", "c"}},
      {"b", {"a", "d", "e"}},
      {"c", {"a"}},
      {"e", {"f", "b"}},
      {"f", {"e"}},
      {"<pad>", {"a"}}};
  return advtrain::SubstitutionTable(words, subs, 4, /*fixed=*/{0});
}

/// ActNet's logits from embedded tokens `e` [B, L, H], written plainly.
torch::Tensor plain_logits(
    const fixture::Plain& p, const torch::Tensor& e, const torch::Tensor& x) {
  const auto m = fixture::mask_of(x);
  return ((e * m).sum(1) / m.sum(1).clamp_min(1)).matmul(p.A.t()) + p.b;
}

/// KL(softmax(q) ‖ softmax(a)) summed over the batch, from logits.
torch::Tensor plain_kl_sum(const torch::Tensor& q, const torch::Tensor& a) {
  const auto lq = q - q.logsumexp(1, true);
  const auto la = a - a.logsumexp(1, true);
  return (lq.exp() * (lq - la)).sum();
}

/// One ASCC step on ActNet at `p`, written out: the Kaiming draw, the
/// search with Adam's update by hand, the loss; returns the gradients.
fixture::Plain plain_ascc_grads(
    const fixture::Plain& p,
    const torch::Tensor& x,
    const torch::Tensor& y,
    const advtrain::SubstitutionTable& table,
    const advtrain::ASCCOptions& o,
    uint64_t seed) {
  const int64_t B = x.size(0), L = x.size(1), S = table.max_candidates();
  const auto cand =
      table.ids().index_select(0, x.reshape(-1)).reshape({B, L, S});
  const auto valid = table.mask()
                         .index_select(0, x.reshape(-1))
                         .reshape({B, L, S, 1})
                         .to(torch::kDouble);
  torch::manual_seed(seed);
  torch::Tensor w =
      torch::empty({B, L, S, 1}, torch::kDouble)
          .normal_(0, std::sqrt(2.0 / static_cast<double>(L * S)));
  const auto tokens = [&](const torch::Tensor& W) {
    return W.index_select(0, x.reshape(-1)).reshape({B, L, -1});
  };
  const auto E = p.W.index_select(0, cand.reshape(-1)).reshape({B, L, S, -1});
  const auto clean0 = plain_logits(p, tokens(p.W), x);
  const auto ww_of = [&](const torch::Tensor& v) {
    return v * valid - (1 - valid) * 500.0;
  };
  auto m = torch::zeros_like(w), v2 = torch::zeros_like(w);
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  for (int64_t t = 1; t <= o.steps(); ++t) {
    const auto wl = w.detach().requires_grad_();
    const auto ww = ww_of(wl);
    const auto q = ww.softmax(-2);
    const auto adv = plain_logits(p, (q * E).sum(-2), x);
    const auto entropy = (-(q * ww.log_softmax(-2))).sum(-2).mean();
    const auto objective =
        -plain_kl_sum(clean0, adv) + o.entropy_weight() * entropy;
    auto g = torch::autograd::grad({objective}, {wl})[0];
    g = g + o.search_weight_decay() * w;
    m = b1 * m + (1 - b1) * g;
    v2 = b2 * v2 + (1 - b2) * g * g;
    const double c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
    w = w - (o.search_lr() / c1) * m / (v2.sqrt() / std::sqrt(c2) + eps);
  }
  const auto q = ww_of(w).softmax(-2);
  auto W = p.W.detach().clone().requires_grad_();
  auto A = p.A.detach().clone().requires_grad_();
  auto b = p.b.detach().clone().requires_grad_();
  const fixture::Plain live{W, A, b};
  const auto clean = plain_logits(live, tokens(W), x);
  const auto adv = plain_logits(
      live,
      (q * W.index_select(0, cand.reshape(-1)).reshape({B, L, S, -1})).sum(-2),
      x);
  const auto loss = o.kl_weight() * plain_kl_sum(clean, adv) / B +
                    o.adv_weight() * fixture::cross_entropy(adv, y) +
                    o.clean_weight() * fixture::cross_entropy(clean, y);
  const auto g = torch::autograd::grad({loss}, {W, A, b});
  return {g[0], g[1], g[2]};
}

/// One Trainer::step of `attacker` on ActNet `model` (plain SGD, the
/// default generator seeded with `seed` first) on the padded batch.
advtrain::StepResult one_step(
    fixture::ActNet& model, advtrain::Attacker& attacker, uint64_t seed) {
  torch::optim::SGD opt(
      model->parameters(), torch::optim::SGDOptions(fixture::kLr));
  advtrain::Trainer trainer(opt, attacker);
  torch::manual_seed(seed);
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  return trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return fixture::cross_entropy(out, y); });
}

/// The model's parameters equal the plain computation's.
/// What every substitution strategy (`kind`: its name) refuses in a step (it
/// has no own-loop attack at all): a forward that skips its embedding, ids that
/// are not [B, L], an output that is not [B, C]; the parameters stay as they
/// were and the embedding is left plain.
void check_step_refusals(
    fixture::ActNet& model,
    advtrain::Attacker& attacker,
    const std::string& kind) {
  CHECK_FALSE(attacker.traits().searches()); // no own-loop attack()
  CHECK(dynamic_cast<advtrain::SearchAttacker*>(&attacker) == nullptr);
  const auto before = fixture::clone_all(model->parameters());
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, attacker);
  const auto y = fixture::batch_labels();
  CHECK_THROWS_WITH(
      trainer.step(
          [&] {
            return model->fc(
                torch::ones({3, fixture::kHidden}, torch::kDouble));
          },
          [&](const torch::Tensor& out) {
            return fixture::cross_entropy(out, y);
          }),
      Contains(kind + ": the forward did not look its ids up"));
  const auto loss = [&](const torch::Tensor& out) {
    return fixture::cross_entropy(out.reshape({3, -1}).narrow(1, 0, 3), y);
  };
  CHECK_THROWS_WITH(
      trainer.step(
          [&] {
            return model->fc(model->embedding(torch::tensor({1, 2, 3})));
          },
          loss),
      Contains(kind + ": needs a non-empty batch of sequences ([B, L] ids)"));
  CHECK_THROWS_WITH(
      trainer.step(
          [&] { return model->fc(model->embedding(fixture::padded_ids())); },
          loss),
      Contains(kind + ": the model's output must be logits [B, C]"));
  CHECK(fixture::equal_all(fixture::clone_all(model->parameters()), before));
  CHECK_FALSE(model->embedding->perturbation()->substituting());
}

void check_equal(fixture::ActNet& model, const fixture::Plain& want) {
  CHECK(fixture::max_abs_diff(model->embedding->weight, want.W) < 1e-10);
  CHECK(fixture::max_abs_diff(model->fc->weight, want.A) < 1e-10);
  CHECK(fixture::max_abs_diff(model->fc->bias, want.b) < 1e-10);
}

} // namespace

TEST_CASE("ASCC's step equals the plain computation", "[ascc]") {
  const auto table = small_table();
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  for (const auto& o :
       {advtrain::ASCCOptions(),
        advtrain::ASCCOptions()
            .steps(3)
            .search_lr(0.3)
            .entropy_weight(0)
            .adv_weight(1.0)}) {
    INFO("steps " << o.steps() << ", search_lr " << o.search_lr());
    auto model = fixture::make_act();
    const auto p0 = fixture::Plain::of(model);
    advtrain::ASCC ascc(model->embedding, table, o);
    const auto r = one_step(model, ascc, 11);
    check_equal(
        model, fixture::sgd(p0, plain_ascc_grads(p0, x, y, table, o, 11)));
    CHECK(r.passes == o.steps() + 3);
    CHECK(r.regularizer > 0);
    CHECK(r.perturbation_norm > 0);
    // The slot is left as a plain lookup.
    CHECK_FALSE(model->embedding->perturbation()->substituting());
    CHECK(torch::equal(
        model->embedding(x),
        torch::nn::functional::embedding(x, model->embedding->weight)));
  }
}

TEST_CASE(
    "ASCC: candidates' rows get gradient, without substitutes it is "
    "the clean step",
    "[ascc]") {
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  SECTION("a candidate outside the batch moves") {
    // A batch of "b" (2) and "c" (3): "a" (1), "d" (4) and "e" (5) are in
    // it only as their candidates. A soft search keeps every weight well
    // above rounding.
    const auto xb = torch::tensor({{2, 3, 0}, {3, 2, 2}}, torch::kLong);
    const auto yb = torch::tensor({0, 1}, torch::kLong);
    auto model = fixture::make_act();
    const auto before = model->embedding->weight.detach().clone();
    advtrain::ASCC ascc(
        model->embedding,
        small_table(),
        advtrain::ASCCOptions().steps(2).search_lr(0.1));
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
    advtrain::Trainer trainer(opt, ascc);
    trainer.step(
        [&] { return model->forward(xb); },
        [&](const torch::Tensor& out) {
          return fixture::cross_entropy(out, yb);
        });
    const auto moved =
        (model->embedding->weight.detach() - before).abs().sum(1).gt(0);
    CHECK(moved[1].item<bool>());
    CHECK(moved[4].item<bool>());
    CHECK(moved[5].item<bool>());
    CHECK_FALSE(moved[6].item<bool>()); // no candidate of the batch
    CHECK_FALSE(moved[0].item<bool>()); // padding
  }
  SECTION("no substitutes: the combination is the token, the KL zero") {
    const std::vector<std::string> words = {
        "<pad>", "a", "b", "c", "d", "e", "f"};
    const advtrain::SubstitutionTable alone(words, {}, 3);
    auto model = fixture::make_act();
    const auto p0 = fixture::Plain::of(model);
    advtrain::ASCC ascc(model->embedding, alone);
    torch::optim::SGD opt(
        model->parameters(), torch::optim::SGDOptions(fixture::kLr));
    advtrain::Trainer trainer(opt, ascc);
    const auto r = trainer.step(
        [&] { return model->forward(x); },
        [&](const torch::Tensor& out) {
          return fixture::cross_entropy(out, y);
        });
    // The plain masked-mean model's gradient of the clean loss alone.
    auto W = p0.W.clone().requires_grad_();
    auto A = p0.A.clone().requires_grad_();
    auto b = p0.b.clone().requires_grad_();
    const auto e = W.index_select(0, x.reshape(-1)).reshape({3, 5, -1});
    const auto loss = fixture::cross_entropy(plain_logits({W, A, b}, e, x), y);
    const auto g = torch::autograd::grad({loss}, {W, A, b});
    const auto want = fixture::sgd(p0, {g[0], g[1], g[2]});
    CHECK(fixture::max_abs_diff(model->embedding->weight, want.W) < 1e-12);
    CHECK(fixture::max_abs_diff(model->fc->weight, want.A) < 1e-12);
    CHECK(r.regularizer == Approx(0.0).margin(1e-15));
    CHECK(r.perturbation_norm == Approx(0.0).margin(1e-15));
  }
}

TEST_CASE(
    "ASCC refuses what it cannot run, and changes nothing", "[ascc][errors]") {
  auto model = fixture::make_act();
  const std::vector<std::string> five = {"a", "b", "c", "d", "e"};
  CHECK_THROWS_WITH(
      advtrain::ASCC(
          model->embedding, advtrain::SubstitutionTable(five, {}, 2)),
      Contains("the substitution table has 5 ids, the embedding 7"));
  CHECK_THROWS_WITH(
      advtrain::ASCC(
          model->embedding, small_table(), advtrain::ASCCOptions().steps(-1)),
      Contains("ASCC: Invalid steps: -1"));
  CHECK_THROWS_WITH(
      advtrain::ASCC(
          model->embedding,
          small_table(),
          advtrain::ASCCOptions().kl_weight(0).adv_weight(0)),
      Contains("some weight on the combination"));
  CHECK_THROWS_WITH(
      advtrain::ASCC(
          model->embedding,
          small_table(),
          advtrain::ASCCOptions().search_lr(INFINITY)),
      Contains("must be finite"));
  advtrain::ASCC ascc(model->embedding, small_table());
  check_step_refusals(model, ascc, "ASCC");
}

TEST_CASE(
    "ASCC's state saves and loads, another's archive is refused",
    "[ascc][state]") {
  auto model = fixture::make_act();
  advtrain::ASCC ascc(model->embedding, small_table());
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  advtrain::Trainer trainer(opt, ascc);
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  trainer.step(
      [&] { return model->forward(x); },
      [&](const torch::Tensor& out) { return fixture::cross_entropy(out, y); });
  const std::string file =
      std::string(P_tmpdir) + "/advtrain_test_state_ascc.pt";
  torch::save(ascc, file);
  auto copy = fixture::make_act();
  advtrain::ASCC loaded(copy->embedding, small_table());
  torch::load(loaded, file);
  CHECK(loaded.steps_done() == 1);
  advtrain::FGM fgm(copy->embedding);
  CHECK_THROWS_WITH(torch::load(fgm, file), Contains("state of ASCC"));
  CHECK(fgm.steps_done() == 0);
  std::remove(file.c_str());
}

TEST_CASE(
    "SubstitutionTable::second_order lists the substitutes, then theirs",
    "[substitutions]") {
  const auto table = advtrain::SubstitutionTable::second_order(
      kVocabulary, neighbours(), /*max_candidates=*/5, /*fixed=*/{0, 1});
  // Written out by hand from the mapping: "good" has great, fine, bad, then
  // bad's awful; "bad" has awful, whose substitutes are terrible (not in the
  // vocabulary) and bad itself.
  const std::vector<std::vector<int64_t>> ids = {
      {0, 0, 0, 0, 0},
      {1, 1, 1, 1, 1},
      {2, 3, 4, 5, 6},
      {3, 3, 3, 3, 3},
      {4, 4, 4, 4, 4},
      {5, 6, 5, 5, 5},
      {6, 5, 6, 6, 6},
      {7, 7, 7, 7, 7}};
  const std::vector<int64_t> valid = {1, 1, 5, 1, 1, 2, 2, 1};
  const std::vector<int64_t> first = {1, 1, 4, 1, 1, 2, 2, 1};
  for (size_t i = 0; i < ids.size(); ++i) {
    INFO("id " << i);
    for (size_t s = 0; s < 5; ++s) {
      CHECK(table.ids()[i][s].item<int64_t>() == ids[i][s]);
      CHECK(
          table.mask()[i][s].item<bool>() ==
          (static_cast<int64_t>(s) < valid[i]));
    }
    CHECK(table.first_order()[i].item<int64_t>() == first[i]);
  }
  // A first-order table's first order is every valid candidate; gather
  // gives each token's count.
  const advtrain::SubstitutionTable plain(kVocabulary, neighbours(), 5);
  CHECK(torch::equal(plain.first_order(), plain.mask().sum(1)));
  const auto c = table.gather(torch::tensor({{2, 5}, {6, 0}}));
  CHECK(torch::equal(c.first_order, torch::tensor({{4, 2}, {2, 1}})));
  // S = 4 cuts the second order first.
  const auto cut =
      advtrain::SubstitutionTable::second_order(kVocabulary, neighbours(), 4);
  CHECK(cut.ids()[2][3].item<int64_t>() == 5);
  CHECK(cut.first_order()[2].item<int64_t>() == 4);
  CHECK_THROWS_WITH(
      advtrain::SubstitutionTable(
          table.ids(), table.mask(), torch::zeros({8}, torch::kLong)),
      Contains("first_order must be an int64 [8]"));
}

namespace {

/// One DNE step on ActNet at `p`, written out: the Dirichlet draws, the
/// clean pass, K passes up the normalized gradient of the logits; returns
/// the summed gradients.
fixture::Plain plain_dne_grads(
    const fixture::Plain& p,
    const torch::Tensor& x,
    const torch::Tensor& y,
    const advtrain::SubstitutionTable& table,
    const advtrain::DNEOptions& o,
    uint64_t seed) {
  const int64_t B = x.size(0), L = x.size(1), S = table.max_candidates();
  const auto flat = x.reshape(-1);
  const auto cand = table.ids().index_select(0, flat).reshape({B, L, S});
  const auto valid = table.mask().index_select(0, flat).reshape({B, L, S});
  const auto first =
      table.first_order().index_select(0, flat).reshape({B, L, 1});
  torch::manual_seed(seed);
  // Concentrations: α up to the first order, α·decay after, 1 where invalid
  // (drawn, then zeroed).
  auto alpha = torch::empty({B, L, S}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t s = 0; s < S; ++s) {
        alpha[b][l][s] =
            !valid[b][l][s].item<bool>()
                ? 1.0
                : (s < first[b][l][0].item<int64_t>() ? o.alpha()
                                                      : o.alpha() * o.decay());
      }
    }
  }
  const auto g = at::_standard_gamma(alpha) * valid.to(torch::kDouble);
  const auto c = g / g.sum(-1, true);
  auto z = (c + 1e-6).log();
  z = z - std::get<0>(z.max(-1, true));
  auto W = p.W.detach().clone().requires_grad_();
  auto A = p.A.detach().clone().requires_grad_();
  auto b = p.b.detach().clone().requires_grad_();
  const fixture::Plain live{W, A, b};
  std::vector<torch::Tensor> sum(3);
  for (int64_t k = 0; k <= o.steps(); ++k) {
    const auto zl = z.detach().requires_grad_();
    const auto E = W.index_select(0, cand.reshape(-1)).reshape({B, L, S, -1});
    const auto e = (zl.softmax(-1).unsqueeze(-1) * E).sum(-2);
    const double weight = k == 0 ? 1.0 : 1.0 / static_cast<double>(o.steps());
    const auto loss =
        fixture::cross_entropy(plain_logits(live, e, x), y) * weight;
    const auto grads = torch::autograd::grad({loss}, {W, A, b, zl});
    for (size_t i = 0; i < 3; ++i) {
      sum[i] = k == 0 ? grads[i] : sum[i] + grads[i];
    }
    const auto gz = grads[3];
    z = zl.detach() + o.step_size() * gz / (gz.norm(2, -1, true) + 1e-6);
    z = z - std::get<0>(z.max(-1, true));
  }
  return {sum[0], sum[1], sum[2]};
}

advtrain::SubstitutionTable small_second_order() {
  const std::vector<std::string> words = {
      "<pad>", "a", "b", "c", "d", "e", "f"};
  const advtrain::SubstitutionTable::Substitutes subs = {
      {"a", {"b"}}, {"b", {"a", "d"}}, {"d", {"e"}}, {"e", {"f"}}};
  return advtrain::SubstitutionTable::second_order(words, subs, 4, {0});
}

} // namespace

TEST_CASE("DNE's step equals the plain computation", "[dne]") {
  const auto table = small_second_order();
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  for (const auto& o :
       {advtrain::DNEOptions(),
        advtrain::DNEOptions().alpha(0.3).decay(0.2).steps(1).step_size(0.5)}) {
    INFO("alpha " << o.alpha() << ", steps " << o.steps());
    auto model = fixture::make_act();
    const auto p0 = fixture::Plain::of(model);
    advtrain::DNE dne(model->embedding, table, o);
    const auto r = one_step(model, dne, 21);
    check_equal(
        model, fixture::sgd(p0, plain_dne_grads(p0, x, y, table, o, 21)));
    CHECK(r.passes == o.steps() + 1);
    CHECK(r.adv_loss > r.loss); // up the loss
    CHECK(r.perturbation_norm > 0);
    CHECK_FALSE(model->embedding->perturbation()->substituting());
  }
}

TEST_CASE("DNE's ensemble weights each member by its confidence", "[dne]") {
  const auto table = small_second_order();
  const auto x = fixture::padded_ids();
  auto model = fixture::make_act();
  model->eval();
  advtrain::DNE dne(
      model->embedding, table, advtrain::DNEOptions().alpha(0.5).decay(0.5));
  torch::manual_seed(5);
  const auto probs = dne.predict([&] { return model->forward(x); }, 3);
  // By hand: three draws, each member's softmax, w = Σ (max p − p)³.
  const auto p = fixture::Plain::of(model);
  const int64_t B = 3, L = 5, S = 4;
  const auto flat = x.reshape(-1);
  const auto cand = table.ids().index_select(0, flat).reshape({B, L, S});
  const auto valid =
      table.mask().index_select(0, flat).reshape({B, L, S}).to(torch::kDouble);
  const auto E = p.W.index_select(0, cand.reshape(-1)).reshape({B, L, S, -1});
  torch::manual_seed(5);
  auto num = torch::zeros({B, 3}, torch::kDouble);
  auto den = torch::zeros({B, 1}, torch::kDouble);
  auto mean = torch::zeros({B, 3}, torch::kDouble);
  for (int m = 0; m < 3; ++m) {
    // The first-order hull: α = 0.5 for the token and its substitutes; the
    // second order, like invalid candidates, drawn at 1, zeroed, and left
    // out (logit −∞).
    const auto first =
        table.first_order().index_select(0, flat).reshape({B, L, 1});
    const auto second = torch::arange(S).reshape({1, 1, S}).ge(first);
    const auto used = valid.gt(0).logical_and(second.logical_not());
    const auto alpha = torch::full({B, L, S}, 0.5, torch::kDouble)
                           .masked_fill(used.logical_not(), 1.0);
    const auto g = at::_standard_gamma(alpha) * used.to(torch::kDouble);
    auto z = (g / g.sum(-1, true) + 1e-6).log();
    z = z.masked_fill(second, -INFINITY);
    const auto e = (z.softmax(-1).unsqueeze(-1) * E).sum(-2);
    const auto q = plain_logits(p, e, x).softmax(1);
    const auto w = (std::get<0>(q.max(1, true)) - q).pow(3).sum(1, true);
    num = num + w * q;
    den = den + w;
    mean = mean + q / 3.0;
  }
  CHECK(fixture::max_abs_diff(probs, num / den) < 1e-12);
  CHECK(fixture::max_abs_diff(probs.sum(1), torch::ones({B})) < 1e-12);
  // The weighting matters: not the plain mean.
  CHECK(fixture::max_abs_diff(probs, mean) > 1e-6);
  CHECK_FALSE(model->embedding->perturbation()->substituting());
  // The table has a second order ("a": b, then b's d) for the hull to drop.
  CHECK(table.first_order()[1].item<int64_t>() == 2);
  CHECK(table.mask()[1][2].item<bool>());
  // A model that outputs the same logits for every class: the plain mean.
  const auto uniform = dne.predict([&] { return model->forward(x) * 0.0; }, 2);
  CHECK(
      fixture::max_abs_diff(
          uniform, torch::full({B, 3}, 1.0 / 3, torch::kDouble)) < 1e-12);
  CHECK_THROWS_WITH(
      dne.predict([&] { return model->forward(x); }, 0),
      Contains("Invalid members: 0"));
  // In the output's dtype.
  CHECK(
      dne.predict([&] { return model->forward(x).to(torch::kFloat); }, 1)
          .scalar_type() == torch::kFloat);
}

TEST_CASE(
    "DNE: without substitutes it is the clean step, and bad input is "
    "refused",
    "[dne][errors]") {
  const auto x = fixture::padded_ids();
  const auto y = fixture::batch_labels();
  SECTION("no substitutes: every candidate is the token") {
    const std::vector<std::string> words = {
        "<pad>", "a", "b", "c", "d", "e", "f"};
    auto model = fixture::make_act();
    const auto p0 = fixture::Plain::of(model);
    advtrain::DNE dne(
        model->embedding, advtrain::SubstitutionTable(words, {}, 3));
    torch::optim::SGD opt(
        model->parameters(), torch::optim::SGDOptions(fixture::kLr));
    advtrain::Trainer trainer(opt, dne);
    trainer.step(
        [&] { return model->forward(x); },
        [&](const torch::Tensor& out) {
          return fixture::cross_entropy(out, y);
        });
    // The clean loss's gradient, with weight 1 + K · (1 / K) = 2.
    auto W = p0.W.clone().requires_grad_();
    auto A = p0.A.clone().requires_grad_();
    auto b = p0.b.clone().requires_grad_();
    const auto e = W.index_select(0, x.reshape(-1)).reshape({3, 5, -1});
    const auto loss =
        2.0 * fixture::cross_entropy(plain_logits({W, A, b}, e, x), y);
    const auto g = torch::autograd::grad({loss}, {W, A, b});
    const auto want = fixture::sgd(p0, {g[0], g[1], g[2]});
    CHECK(fixture::max_abs_diff(model->embedding->weight, want.W) < 1e-12);
    CHECK(fixture::max_abs_diff(model->fc->weight, want.A) < 1e-12);
  }
  SECTION("refusals") {
    auto model = fixture::make_act();
    const std::vector<std::string> five = {"a", "b", "c", "d", "e"};
    CHECK_THROWS_WITH(
        advtrain::DNE(
            model->embedding, advtrain::SubstitutionTable(five, {}, 2)),
        Contains("DNE: the substitution table has 5 ids, the embedding 7"));
    const auto table = small_second_order();
    CHECK_THROWS_WITH(
        advtrain::DNE(model->embedding, table, advtrain::DNEOptions().alpha(0)),
        Contains("DNE: Invalid alpha: 0"));
    CHECK_THROWS_WITH(
        advtrain::DNE(
            model->embedding, table, advtrain::DNEOptions().decay(-1)),
        Contains("DNE: Invalid decay: -1"));
    CHECK_THROWS_WITH(
        advtrain::DNE(
            model->embedding, table, advtrain::DNEOptions().decay(1.5)),
        Contains("DNE: Invalid decay: 1.5 (must be in (0, 1])"));
    CHECK_THROWS_WITH(
        advtrain::DNE(
            model->embedding, table, advtrain::DNEOptions().steps(-1)),
        Contains("DNE: Invalid steps: -1"));
    CHECK_THROWS_WITH(
        advtrain::DNE(
            model->embedding, table, advtrain::DNEOptions().step_size(NAN)),
        Contains("must be finite"));
    advtrain::DNE dne(model->embedding, table);
    check_step_refusals(model, dne, "DNE");
  }
}
