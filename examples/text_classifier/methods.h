#pragma once

// The adversarial-training methods the example runs, as one table: a row per
// method gives its name, a line of help and how to build its attacker. The
// table is the list of --method values and what make_attacker builds, so a
// new method is a new row.

#include "config.h"
#include "model.h"

#include <advtrain/advtrain.h>

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace example {

/// The candidate sets of the model's vocabulary from the --train-synonyms
/// source (built when a method asks for them): each word's substitutes
/// (ASCC's), or with theirs (`second_order`, DNE's neighbourhoods).
using TableSource =
    std::function<advtrain::SubstitutionTable(bool second_order)>;

/// Builds a method's attacker for `model` from the options in `c` (unset
/// ones keep the library's defaults). `ids` is the caller's tensor of the
/// batch in training, which YOPO's first layer reads: it must outlive the
/// attacker; `table` gives the candidate sets (ASCC, DNE).
using AttackerFactory = std::function<std::unique_ptr<advtrain::Attacker>(
    Classifier& model,
    const Config& c,
    const torch::Tensor& ids,
    const TableSource& table)>;

/// One row of the table.
struct Method {
  std::string name;
  /// What the method does, in a line (for readers: --help lists the names).
  std::string help;
  /// Always perturbs each example's embedded tokens, whatever --target says.
  bool per_example = false;
  /// Empty for plain training (no attacker).
  AttackerFactory make;
  /// Trains with the substitutes of --train-synonyms.
  bool substitutes = false;
  /// Adds adversarial texts to each epoch after the first (A2T).
  bool augments = false;
};

/// `T` on the model's embedding: the weight table, or (`--target
/// activations`) each example's embedded tokens. One constructor argument
/// picks the target.
template <typename T, typename Options>
std::unique_ptr<advtrain::Attacker> on_target(
    Classifier& model, const Config& c, Options options) {
  if (c.target == "activations") {
    return std::make_unique<T>(model->embedding, std::move(options));
  }
  return std::make_unique<T>(*model, "embedding", std::move(options));
}

/// FreeLB from `o` with the options set in `c` (FreeLB and FreeLB++).
inline std::unique_ptr<advtrain::Attacker> freelb(
    Classifier& model, const Config& c, advtrain::FreeLBOptions o) {
  if (c.epsilon) {
    o.epsilon(*c.epsilon);
  }
  if (c.alpha) {
    o.alpha(*c.alpha);
  }
  if (c.steps) {
    o.steps(*c.steps);
  }
  if (c.init_mag) {
    o.init_mag(*c.init_mag);
  }
  if (c.norm == "linf") {
    return on_target<advtrain::FreeLBLInf>(model, c, o);
  }
  return on_target<advtrain::FreeLB>(model, c, o);
}

/// The methods, in the order `--method all` runs them.
inline const std::vector<Method> kMethods = {
    {"plain", "no attack: plain training, the baseline", false, nullptr},
    {"fgsm",
     "FGSM (Goodfellow et al.): one step epsilon * sign(g)",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::FGSMOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       return on_target<advtrain::FGSM>(model, c, o);
     }},
    {"fgm",
     "FGM (Miyato et al.): one step epsilon * g / |g|",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::FGMOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       return on_target<advtrain::FGM>(model, c, o);
     }},
    {"pgd",
     "PGD (Madry et al.): ascent steps projected into the epsilon-ball",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::PGDOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.norm == "linf") {
         return on_target<advtrain::PGDLInf>(model, c, o);
       }
       return on_target<advtrain::PGD>(model, c, o);
     }},
    {"freeat",
     "FreeAT (Shafahi et al.): each batch replayed, the perturbation kept",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::FreeATOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.replays) {
         o.replays(*c.replays);
       }
       if (c.norm == "l2") {
         return on_target<advtrain::FreeATL2>(model, c, o);
       }
       return on_target<advtrain::FreeAT>(model, c, o);
     }},
    {"freelb",
     "FreeLB (Zhu et al.): the gradients of the ascent steps averaged",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       return freelb(model, c, advtrain::FreeLBOptions());
     }},
    {"freelb++",
     "FreeLB++ (Li et al., TextDefender): FreeLB with 30 unbounded steps of "
     "0.03 from a random start, per example",
     true,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       Config per_example = c; // its random start needs embedded tokens
       per_example.target = "activations";
       return freelb(model, per_example, advtrain::freelb_plus_plus());
     }},
    {"smart",
     "SMART (Jiang et al.): a smoothness regularizer on the outputs",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::SMARTOptions o;
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.weight) {
         o.weight(*c.weight);
       }
       if (c.noise_var) {
         o.noise_var(*c.noise_var);
       }
       return on_target<advtrain::SMART>(model, c, o);
     }},
    {"vat",
     "VAT (Miyato et al.): KL to the output at a power-iteration direction",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::VATOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.steps) {
         o.power_iterations(*c.steps);
       }
       if (c.weight) {
         o.weight(*c.weight);
       }
       return on_target<advtrain::VAT>(model, c, o);
     }},
    {"r3f",
     "R3F (Aghajanyan et al.): symmetric KL to the output under noise",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::R3FOptions o;
       if (c.noise_var) {
         o.sigma(*c.noise_var);
       }
       if (c.weight) {
         o.weight(*c.weight);
       }
       return on_target<advtrain::R3F>(model, c, o);
     }},
    {"llr",
     "LLR (Qin et al.): the loss's distance from its linear expansion",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) {
       advtrain::LLROptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.weight) {
         o.weight(*c.weight);
       }
       if (c.norm == "linf") { // the paper's ball; here L2, as PGD's
         return on_target<advtrain::LLR>(model, c, o);
       }
       return on_target<advtrain::LLRL2>(model, c, o);
     }},
    {"awp",
     "AWP (Wu et al.): the weights perturbed, relative to their norms",
     false,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource&) -> std::unique_ptr<advtrain::Attacker> {
       advtrain::AWPOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.steps) {
         o.steps(*c.steps);
       }
       return std::make_unique<advtrain::AWP>(*model, "weight", o);
     }},
    {"yopo",
     "YOPO (Zhang et al.): inner ascent through the first layer only",
     true,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor& ids,
        const TableSource&) -> std::unique_ptr<advtrain::Attacker> {
       advtrain::YOPOOptions o;
       if (c.epsilon) {
         o.epsilon(*c.epsilon);
       }
       if (c.alpha) {
         o.alpha(*c.alpha);
       }
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.inner_steps) {
         o.inner_steps(*c.inner_steps);
       }
       if (c.init_mag) {
         o.init_mag(*c.init_mag);
       }
       auto first = [&model, &ids](const torch::Tensor& e) {
         return model->first(e, ids);
       };
       return std::make_unique<advtrain::YOPO>(model->embedding, first, o);
     }},
    {"ascc",
     "ASCC (Dong et al.): each word as the worst convex combination of its "
     "substitutes (--train-synonyms), found by Adam steps",
     true,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource& table) {
       advtrain::ASCCOptions o;
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.alpha) {
         o.search_lr(*c.alpha);
       }
       if (c.weight) {
         o.kl_weight(*c.weight);
       }
       return std::make_unique<advtrain::ASCC>(
           model->embedding, table(false), o);
     },
     true},
    {"a2t",
     "A2T-style augmentation (Yoo and Qi): plain steps; each epoch after the "
     "first, a greedy gradient-ranked attack with the --train-synonyms "
     "substitutes on --augment-share of the training texts, whose "
     "successes join the epoch",
     false,
     nullptr,
     true,
     true},
    {"dne",
     "DNE (Zhou et al.): each word as a Dirichlet-drawn combination of its "
     "neighbourhood (--train-synonyms, second order) moved up the loss; "
     "predictions average --ensemble combinations",
     true,
     [](Classifier& model,
        const Config& c,
        const torch::Tensor&,
        const TableSource& table) {
       advtrain::DNEOptions o;
       if (c.steps) {
         o.steps(*c.steps);
       }
       if (c.alpha) {
         o.step_size(*c.alpha);
       }
       if (c.dir_alpha) {
         o.alpha(*c.dir_alpha);
       }
       if (c.dir_decay) {
         o.decay(*c.dir_decay);
       }
       return std::make_unique<advtrain::DNE>(model->embedding, table(true), o);
     },
     true},
};

/// The methods' names, in the table's order.
inline std::vector<std::string> method_names() {
  std::vector<std::string> names;
  for (const auto& m : kMethods) {
    names.push_back(m.name);
  }
  return names;
}

/// The row of the method `name`.
inline const Method& find_method(const std::string& name) {
  for (const auto& m : kMethods) {
    if (m.name == name) {
      return m;
    }
  }
  throw std::invalid_argument("unknown method '" + name + "'");
}

/// What `method` perturbs: "weights" or "activations".
inline std::string target_of(const std::string& method, const Config& c) {
  return find_method(method).per_example ? "activations" : c.target;
}

/// The attacker for `method` (null for plain training). YOPO runs the
/// model's first layer on the ids in `current_ids`.
inline std::unique_ptr<advtrain::Attacker> make_attacker(
    const std::string& method,
    Classifier& model,
    const Config& c,
    const torch::Tensor& current_ids,
    const TableSource& table) {
  const Method& m = find_method(method);
  return m.make ? m.make(model, c, current_ids, table) : nullptr;
}

} // namespace example
