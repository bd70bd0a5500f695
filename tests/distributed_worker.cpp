// One worker of the data-parallel test:
//   advtrain_distributed_worker RANK WORLD STORE_FILE METHOD OUT_FILE
// Builds the shared case's model from its own seed (DataParallel broadcasts
// rank 0's), trains on its shard with gradients averaged over the group, and
// saves its parameters and the number of reductions to OUT_FILE.

#include "distributed_case.h"

#include <advtrain/distributed.h>

#include <cstdlib>
#include <exception>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: " << argv[0]
              << " RANK WORLD STORE_FILE METHOD OUT_FILE\n";
    return 2;
  }
  try {
    const int rank = std::atoi(argv[1]);
    const int world = std::atoi(argv[2]);
    auto store = c10::make_intrusive<c10d::FileStore>(argv[3], world);
    auto group = advtrain::make_gloo_group(store, rank, world);
    auto net = dp_case::make_net(/*seed=*/100 + rank);
    advtrain::DataParallel dp(group, net->parameters());
    auto params = dp_case::train(
        net,
        argv[4],
        dp_case::shard(dp_case::ids(), rank, world),
        dp_case::shard(dp_case::labels(), rank, world),
        [&](advtrain::Trainer& trainer) { dp.attach(trainer); });
    params.push_back(torch::tensor(dp.reductions()));
    torch::save(params, argv[5]);
  } catch (const std::exception& e) {
    std::cerr << "worker " << argv[1] << ": " << e.what() << "\n";
    return 1;
  }
  return 0;
}
