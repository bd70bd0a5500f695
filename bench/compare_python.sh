#!/usr/bin/env bash
# advtrain against the widely used Python FGM and PGD classes on the same model
# and shapes: runs advtrain_bench and bench/python/bench_python.py twice each,
# alternating, and prints the median step time per side and the ratio
# advtrain / Python per method (below 1: advtrain is faster).
#
#   bench/compare_python.sh            (after building: cmake --build build)
#
# Both sides run with the same threads and the same GLIBC_TUNABLES (set below
# unless already set); Python is Debian's python3-torch, the ATen of
# libtorch-dev.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=${ADVTRAIN_BENCH:-$root/build/bench/advtrain_bench}
python=${ADVTRAIN_PYTHON:-/usr/bin/python3}
threads=${THREADS:-2}
repeats=${REPEATS:-15}
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295}

[ -x "$bench" ] || { echo "error: build $bench first" >&2; exit 1; }
"$python" -c 'import torch' 2>/dev/null || {
  echo "error: $python has no torch (apt-get install python3-torch)" >&2
  exit 1
}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in 1 2; do
  echo "round $round: advtrain" >&2
  "$bench" --methods fgm,pgd --threads "$threads" --repeats "$repeats" --raw |
    sed -n 's/^ms \(.*\)/cpp \1/p' >>"$out"
  echo "round $round: python" >&2
  "$python" "$root/bench/python/bench_python.py" --threads "$threads" \
    --repeats "$repeats" | sed -n 's/^ms \(.*\)/py \1/p' >>"$out"
done
echo "GLIBC_TUNABLES=${GLIBC_TUNABLES:-(unset)}, $threads threads, V=30000 H=256, batch 32 x 64, Adam"
awk '
  { t[$1 " " $2] = t[$1 " " $2] + $3; n[$1 " " $2]++ }
  END {
    printf "%-8s %14s %14s %18s\n", "method", "advtrain ms", "python ms", "advtrain/python"
    split("plain fgm pgd", m, " ")
    for (i = 1; i <= 3; i++) {
      c = t["cpp " m[i]] / n["cpp " m[i]]; p = t["py " m[i]] / n["py " m[i]]
      printf "%-8s %14.1f %14.1f %18.2f\n", m[i], c, p, c / p
    }
  }' "$out"
