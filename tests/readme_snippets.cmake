# Extracts every ```cpp block of README.md and of the pages of docs/ into one
# C++ file, each block in a function of its own, so that the build fails when
# the API the documentation shows stops compiling. The blocks' free names
# (model, optimizer, x, y, ...) come from the prelude below. Run as:
#   cmake -DROOT=. "-DSOURCES=README.md|docs/guide.md" -DOUT=snippets.cpp \
#         -P readme_snippets.cmake
# SOURCES: the Markdown files, separated by '|' (paths absolute or relative
# to ROOT); tests/CMakeLists.txt passes README.md and every docs/*.md.
if(NOT ROOT)
  set(ROOT "${CMAKE_SOURCE_DIR}")
endif()
string(REPLACE "|" ";" sources "${SOURCES}")
if(NOT sources)
  message(FATAL_ERROR "readme_snippets: no SOURCES given")
endif()
set(blocks "")
set(labels "")
set(count 0)
foreach(source IN LISTS sources)
  get_filename_component(path "${source}" ABSOLUTE BASE_DIR "${ROOT}")
  file(RELATIVE_PATH name "${ROOT}" "${path}")
  file(READ "${path}" text)
  # CMake lists split on ';' and treat brackets specially: hide them.
  string(REPLACE ";" "@SEMI@" text "${text}")
  string(REPLACE "[" "@LB@" text "${text}")
  string(REPLACE "]" "@RB@" text "${text}")
  string(REGEX MATCHALL "```cpp\n[^`]*```" found "${text}")
  list(LENGTH found extracted)
  # Every opening fence must give a block: one with a backtick inside would
  # be skipped silently by the pattern above.
  string(REGEX MATCHALL "```cpp\n" fences "${text}")
  list(LENGTH fences opened)
  if(NOT extracted EQUAL opened)
    message(FATAL_ERROR "readme_snippets: ${opened} C++ blocks open in "
      "${name}, ${extracted} extracted (no backtick may stand inside a block)")
  endif()
  set(n 0)
  foreach(block IN LISTS found)
    math(EXPR n "${n} + 1")
    list(APPEND labels "${name} block ${n}")
  endforeach()
  list(APPEND blocks ${found})
  math(EXPR count "${count} + ${extracted}")
endforeach()
# The README and the pages held 16 blocks when the pages were split off the
# README: far fewer means a page is missing from SOURCES.
if(count LESS 12)
  message(FATAL_ERROR "readme_snippets: only ${count} C++ blocks in "
    "${SOURCES}: is a page missing?")
endif()

set(includes "")
set(functions "")
set(index 0)
foreach(block IN LISTS blocks)
  list(GET labels ${index} label)
  math(EXPR index "${index} + 1")
  string(REGEX REPLACE "^```cpp\n" "" block "${block}")
  string(REGEX REPLACE "```$" "" block "${block}")
  string(REPLACE "@SEMI@" ";" block "${block}")
  string(REPLACE "@LB@" "[" block "${block}")
  string(REPLACE "@RB@" "]" block "${block}")
  # #include lines go to the top; the rest is the function's body.
  string(REGEX MATCHALL "#include <[^>\n]*>" found "${block}")
  list(APPEND includes ${found})
  string(REGEX REPLACE "#include <[^>\n]*>\n?" "" body "${block}")
  set(guard_begin "")
  set(guard_end "")
  if(block MATCHES "advtrain/distributed.h")
    set(guard_begin "#if ADVTRAIN_README_DISTRIBUTED\n")
    set(guard_end "#endif\n")
  endif()
  string(APPEND functions
    "${guard_begin}// ${label}\n"
    "[[maybe_unused]] void block_${index}(Env& env) {\n"
    "  ADVTRAIN_README_NAMES\n  {\n${body}  }\n}\n${guard_end}\n")
endforeach()
list(REMOVE_DUPLICATES includes)
list(REMOVE_ITEM includes "#include <advtrain/distributed.h>")
string(REPLACE ";" "\n" includes "${includes}")

file(WRITE "${OUT}" "// Generated from README.md and docs/*.md by tests/readme_snippets.cmake:
// every C++ block of the documentation, each in a function of its own.
// Compiled, not run.
#include <advtrain/advtrain.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>
${includes}
#if ADVTRAIN_README_DISTRIBUTED
#include <advtrain/distributed.h>
#endif

namespace readme {

// What the blocks refer to without declaring it.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : embedding(register_module(
            \"embedding\", advtrain::PerturbedEmbedding(10, 4))),
        fc(register_module(\"fc\", torch::nn::Linear(4, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return rest(first(embedding(x)));
  }
  torch::Tensor first(const torch::Tensor& e) {
    return torch::tanh(e);
  }
  torch::Tensor rest(const torch::Tensor& z) {
    return fc(z.mean(1));
  }
  advtrain::PerturbedEmbedding embedding;
  torch::nn::Linear fc;
};
TORCH_MODULE(Net);

struct Batch {
  torch::Tensor data, target;
};

struct LossFn { // used as loss_fn(out, y) and as a LossFunction
  const torch::Tensor* y;
  torch::Tensor operator()(const torch::Tensor& out, const torch::Tensor& t) const {
    return torch::nn::functional::cross_entropy(out, t);
  }
  torch::Tensor operator()(const torch::Tensor& out) const {
    return torch::nn::functional::cross_entropy(out, *y);
  }
};

struct Env {
  Net model;
  std::vector<Batch> loader;
  torch::Tensor x, y, ids, labels, unlabeled_ids;
  int K = 3, m = 4, rank = 0, world = 1;
  torch::optim::SGD optimizer{model->parameters(), torch::optim::SGDOptions(0.1)};
  LossFn loss_fn{&y};
  advtrain::FreeAT freeat{*model, \"embedding\"};
  advtrain::ForwardFunction forward_on_my_shard;
};

#define ADVTRAIN_README_NAMES                      \\
  auto& model = env.model;                         \\
  auto& loader = env.loader;                       \\
  auto& x = env.x;                                 \\
  auto& y = env.y;                                 \\
  auto& ids = env.ids;                             \\
  auto& labels = env.labels;                       \\
  auto& unlabeled_ids = env.unlabeled_ids;         \\
  auto& K = env.K;                                 \\
  auto& m = env.m;                                 \\
  auto& rank = env.rank;                           \\
  auto& world = env.world;                         \\
  auto& optimizer = env.optimizer;                 \\
  auto& loss_fn = env.loss_fn;                     \\
  auto& freeat = env.freeat;                       \\
  auto& forward_on_my_shard = env.forward_on_my_shard; \\
  (void)model, (void)loader, (void)x, (void)y, (void)ids, (void)labels, \\
      (void)unlabeled_ids, (void)K, (void)m, \\
      (void)rank, (void)world, (void)optimizer, (void)loss_fn, (void)freeat, \\
      (void)forward_on_my_shard;

${functions}} // namespace readme
")
list(LENGTH sources files)
message(STATUS "readme_snippets: ${count} C++ blocks of ${files} files -> "
  "${OUT}")
