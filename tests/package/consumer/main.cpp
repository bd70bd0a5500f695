// A program that uses advtrain as a package: one FGM step on a tiny model.
#include <advtrain/advtrain.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Embedding embedding(10, 4);
  torch::nn::Linear fc(4, 2);
  std::vector<torch::Tensor> params = embedding->parameters();
  for (const auto& p : fc->parameters()) {
    params.push_back(p);
  }
  torch::optim::SGD optimizer(params, torch::optim::SGDOptions(0.1));
  advtrain::FGM fgm(*embedding, "weight");
  advtrain::Trainer trainer(optimizer, fgm);
  const auto x = torch::tensor({{1, 2, 3}, {4, 5, 6}}, torch::kLong);
  const auto y = torch::tensor({0, 1}, torch::kLong);
  const auto before = embedding->weight.detach().clone();
  const auto r = trainer.step(
      [&] { return fc(embedding(x).mean(1)); },
      [&](const torch::Tensor& out) {
        return torch::nn::functional::cross_entropy(out, y);
      });
  const bool ok = r.passes == 2 && r.perturbation_norm > 0.99 &&
                  !torch::equal(before, embedding->weight);
  std::cout << "advtrain " << ADVTRAIN_VERSION_MAJOR << "."
            << ADVTRAIN_VERSION_MINOR << "." << ADVTRAIN_VERSION_PATCH
            << ": passes " << r.passes << ", loss " << r.loss
            << (ok ? " ok" : " FAILED") << "\n";
  return ok ? 0 : 1;
}
