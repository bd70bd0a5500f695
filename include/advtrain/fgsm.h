// FGSM: the fast-gradient step of FGM under the L∞ norm (both in fgm.h).
// FGSM's documentation (paper, rule, defaults, protocol, example) is the
// block above `class FGSM` there.
#pragma once

#include <advtrain/fgm.h>
