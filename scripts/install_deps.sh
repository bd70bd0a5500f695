#!/usr/bin/env bash
# Installs what advtrain's build, tests and example need on Debian bookworm.
# npm (for scripts/fetch_data.sh) is added only when it is missing; valgrind
# runs the instruction-count guard (ctest label perf); clang builds the
# fuzz targets (tests/fuzz/run.sh).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
packages=(cmake g++ make ninja-build libtorch-dev catch2 libfmt-dev
  libopenblas0-pthread libgloo-dev nlohmann-json3-dev libcli11-dev
  gnuplot-nox clang-format clang wordnet-base wordnet-dev valgrind)
command -v npm >/dev/null || packages+=(npm)
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "installed: ${packages[*]}"
