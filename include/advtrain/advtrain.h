// The umbrella header: every strategy, the Trainer, the targets and the
// norms of advtrain (adversarial training for NLP models on LibTorch).
#pragma once

#include <advtrain/ascc.h>
#include <advtrain/attacker.h>
#include <advtrain/awp.h>
#include <advtrain/divergence.h>
#include <advtrain/dne.h>
#include <advtrain/fgm.h>
#include <advtrain/fgsm.h>
#include <advtrain/freeat.h>
#include <advtrain/freelb.h>
#include <advtrain/llr.h>
#include <advtrain/norm.h>
#include <advtrain/parameters.h>
#include <advtrain/perturbed_embedding.h>
#include <advtrain/pgd.h>
#include <advtrain/r3f.h>
#include <advtrain/regularizer.h>
#include <advtrain/search.h>
#include <advtrain/smart.h>
#include <advtrain/step.h>
#include <advtrain/strategy.h>
#include <advtrain/substitutions.h>
#include <advtrain/target.h>
#include <advtrain/trainer.h>
#include <advtrain/traits.h>
#include <advtrain/vat.h>
#include <advtrain/version.h>
#include <advtrain/yopo.h>
