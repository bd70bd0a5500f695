#pragma once

// FGSM is the fast-gradient step of FGM under the L∞ norm; both live in fgm.h.
#include <advtrain/fgm.h>
