// FGSM: the fast-gradient step of FGM under the L∞ norm (both in fgm.h).
#pragma once

#include <advtrain/fgm.h>
