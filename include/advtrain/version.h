// advtrain's version.
#pragma once

/// advtrain's version; kept equal to `project(advtrain VERSION ...)` in
/// CMakeLists.txt (a test checks it).
#define ADVTRAIN_VERSION_MAJOR 0
#define ADVTRAIN_VERSION_MINOR 1
#define ADVTRAIN_VERSION_PATCH 0

/// The version as one number: MAJOR * 10000 + MINOR * 100 + PATCH.
#define ADVTRAIN_VERSION                                           \
  (ADVTRAIN_VERSION_MAJOR * 10000 + ADVTRAIN_VERSION_MINOR * 100 + \
   ADVTRAIN_VERSION_PATCH)
