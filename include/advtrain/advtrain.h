#pragma once

/// advtrain: adversarial training for NLP models on LibTorch.
/// This umbrella header brings in every strategy and the Trainer.

#include <advtrain/attacker.h>
#include <advtrain/fgm.h>
#include <advtrain/fgsm.h>
#include <advtrain/freeat.h>
#include <advtrain/freelb.h>
#include <advtrain/norm.h>
#include <advtrain/perturbed_embedding.h>
#include <advtrain/pgd.h>
#include <advtrain/smart.h>
#include <advtrain/trainer.h>
#include <advtrain/version.h>
#include <advtrain/yopo.h>
