#!/usr/bin/env bash
# Sparse against dense table gradients at a large vocabulary: a plain step,
# FGM and PGD (Trainer::step) on embedding V x H -> mean -> tanh -> linear,
# batch 32 x 64, SGD, each run as its own process (so that its peak memory is
# its own), at V = 30,000 and V = 1,000,000. Prints the median step time (steps
# 3 on), the process's peak RSS and the attacker's peak memory.
#
#   bench/sparse_tables.sh                  (after cmake --build build)
#   STEPS=20 THREADS=2 VOCABS="30000 1000000" HIDDEN=256 bench/sparse_tables.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=${ADVTRAIN_BENCH:-$root/build/bench/advtrain_bench}
steps=${STEPS:-30}
threads=${THREADS:-2}
vocabs=${VOCABS:-30000 1000000}
hidden=${HIDDEN:-256}
optimizer=${OPTIMIZER:-sgd}
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295}
[ -x "$bench" ] || { echo "error: build $bench first" >&2; exit 1; }

echo "embedding V x $hidden -> mean -> tanh -> linear, batch 32 x 64," \
  "$optimizer, $threads threads, $steps steps," \
  "GLIBC_TUNABLES=${GLIBC_TUNABLES:-(unset)}"
printf "%-9s %-7s %-7s %10s %12s %14s\n" V grad runner "step ms" "peak RSS MiB" \
  "attacker MiB"
for v in $vocabs; do
  for grad in dense sparse; do
    for runner in plain fgm pgd; do
      flag=
      [ "$grad" = sparse ] && flag=--sparse
      line=$("$bench" --bag --vocab "$v" --hidden "$hidden" --batch 32 \
        --length 64 --threads "$threads" --optimizer "$optimizer" $flag \
        --runner "$runner" --steps "$steps")
      # "ran R x N: median step X ms (steps 3-), peak RSS Y MiB, attacker
      # peak Z MiB"
      echo "$line" | awk -v v="$v" -v g="$grad" -v r="$runner" '{
        printf "%-9s %-7s %-7s %10s %12s %14s\n", v, g, r, $7, $13, $17 }'
    done
  done
done
