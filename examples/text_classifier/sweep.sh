#!/usr/bin/env bash
# Trains plain and every method on each data set with several seeds and
# writes, under OUT:
#   results.csv   one row per (data set, method, seed): the binary's --csv rows
#   summary.csv   mean and sample standard deviation over the seeds
#   summary.md    the same as Markdown tables, one per data set
#   accuracy_vs_epsilon.png   accuracy under PGD against its radius, one line
#                 per method, mean with error bars (± std over seeds)
# or, with --grid, tunes each method's main option on a validation split:
#   grid.csv      one row per (data set, method, option value)
#   tuned.csv     the value kept per data set and method: the best mean of
#                 validation accuracy clean and under PGD at radius 1
#
# Usage: sweep.sh [--grid] [--bin PATH] [--out DIR] [--seeds "1 2 3"]
#                 [--epochs N] [--limit N] [--tuned FILE] [--target T]
#                 [--sentiment FILE...] [--spamassassin DIR]
# The binary is built by CMake (build/examples/text_classifier/); the data
# sets by scripts/fetch_data.sh sentiment spamassassin.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/build/examples/text_classifier/text_classifier"
out="$root/results"
seeds="1 2 3"
epochs=10
limit=0
grid=0
target=activations
tuned="$here/tuned.csv"
sentiment="$root/data/sentiment/amazon.json,$root/data/sentiment/imdb.json,$root/data/sentiment/yelp.json"
spamassassin="$root/data/spamassassin"
methods="plain fgsm fgm pgd freeat freelb smart vat r3f llr awp yopo"

while [ $# -gt 0 ]; do
  case "$1" in
  --grid) grid=1 ;;
  --bin) bin=$2; shift ;;
  --out) out=$2; shift ;;
  --seeds) seeds=$2; shift ;;
  --epochs) epochs=$2; shift ;;
  --limit) limit=$2; shift ;;
  --tuned) tuned=$2; shift ;;
  --target) target=$2; shift ;;
  --sentiment) sentiment=$2; shift ;;
  --spamassassin) spamassassin=$2; shift ;;
  *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$bin" ] || { echo "error: no binary at $bin (build first)" >&2; exit 1; }
mkdir -p "$out"
# shellcheck source=common.sh
source "$here/common.sh"

# The grid: each method's main option (one setting per line); the others
# follow from it or keep the library's defaults.
grid_values() {
  case "$1" in
  fgsm) printf -- '--epsilon %s\n' 0.01 0.03 0.1 0.3 ;;
  fgm) printf -- '--epsilon %s\n' 0.5 1 2 4 ;;
  pgd) printf -- '--epsilon %s --alpha %s\n' 0.5 0.25 1 0.5 2 1 4 2 ;;
  freeat) printf -- '--epsilon %s --alpha %s\n' 0.01 0.01 0.03 0.03 0.1 0.1 \
    0.3 0.3 ;;
  freelb) printf -- '--alpha %s\n' 0.1 0.3 1 3 ;;
  smart) printf -- '--weight %s\n' 0.3 1 3 10 ;;
  vat) printf -- '--epsilon %s\n' 0.5 1 2 5 ;;
  r3f) printf -- '--noise-var %s\n' 1e-5 1e-2 0.1 0.5 ;;
  llr) printf -- '--epsilon 1 --alpha 0.5 --weight %s\n' 0.1 0.3 1 4 ;;
  awp) printf -- '--epsilon %s\n' 1e-3 1e-2 0.03 0.1 ;;
  yopo) printf -- '--epsilon %s --alpha %s\n' 0.5 0.125 1 0.25 2 0.5 4 1 ;;
  *) echo "" ;;
  esac
}


start=$(date +%s)
common=(--epochs "$epochs" --limit "$limit" --target "$target" --pwws-sample 0)

if [ "$grid" = 1 ]; then
  rm -f "$out/grid.csv"
  for dataset in sentiment spamassassin; do
    for method in $methods; do
      mapfile -t values < <(grid_values "$method")
      for v in "${values[@]}"; do
        echo "[grid $(($(date +%s) - start)) s] $dataset $method $v"
        # shellcheck disable=SC2046,SC2086
        "$bin" $(data_args "$dataset") --method "$method" "${common[@]}" \
          --seed 1 --validation --csv "$out/grid.csv" $v >/dev/null
      done
    done
  done
  # Keep, per data set and method, the row with the best (clean + radius 1)/2.
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    { key = $1 "," $3; score = ($(col["clean_acc"]) + $(col["acc_eps_1"])) / 2
      if (!(key in best) || score > best[key]) { best[key] = score; opt[key] = $5 } }
    END { print "dataset,method,options"
          for (k in opt) print k "," opt[k] }' "$out/grid.csv" |
    (read -r header; echo "$header"; sort) >"$out/tuned.csv"
  echo "grid: $out/grid.csv, kept: $out/tuned.csv ($(($(date +%s) - start)) s)"
  exit 0
fi

# The sweep: every method with its tuned options, each seed, on the test split.
rm -f "$out/results.csv"
for dataset in sentiment spamassassin; do
  for seed in $seeds; do
    for method in $methods; do
      options=""
      if [ -f "$tuned" ]; then
        options=$(awk -F, -v d="$dataset" -v m="$method" \
          '$1 == d && $2 == m { print $3 }' "$tuned" | tr -d '"')
      fi
      echo "[sweep $(($(date +%s) - start)) s] $dataset seed $seed $method $(to_args "$options")"
      # shellcheck disable=SC2046,SC2086
      "$bin" $(data_args "$dataset") --method "$method" "${common[@]}" \
        --seed "$seed" --csv "$out/results.csv" $(to_args "$options") >/dev/null
    done
  done
done
took=$(($(date +%s) - start))
rows=$(($(wc -l <"$out/results.csv") - 1))
expected=$((2 * $(echo $seeds | wc -w) * $(echo $methods | wc -w)))
[ "$rows" = "$expected" ] || {
  echo "error: $out/results.csv has $rows rows, expected $expected" >&2
  exit 1
}

# Mean and sample standard deviation over the seeds of every number column.
awk -v key=dataset,method,target,options -v from=epochs \
  -f "$here/mean_std.awk" "$out/results.csv" >"$out/summary.csv"

# Markdown tables and the plot's data, one per data set.
epsilons=$(head -1 "$out/results.csv" | tr ',' '\n' | sed -n 's/^acc_eps_//p' |
  paste -sd' ')
{
  echo "Made by \`examples/text_classifier/sweep.sh\` in $took s: seeds $seeds,"
  echo "$epochs epochs, target $target; mean ± std over seeds, in %."
  for dataset in sentiment spamassassin; do
    echo
    echo "**$dataset** (test split)"
    echo
    printf "| method | options | clean |"
    for e in $epsilons; do [ "$e" = 0 ] || printf " PGD ε=%s |" "$e"; done
    printf " s/epoch | passes/step |\n|---|---|---|"
    for e in $epsilons; do [ "$e" = 0 ] || printf -- "---|"; done
    printf -- "---|---|\n"
    awk -F, -v d="$dataset" -v eps="$epsilons" '
      NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
      $1 == d {
        o = $4; gsub(/"/, "", o); gsub(/;/, " ", o)
        printf "| %s | %s | %.1f ± %.1f |", $2, o,
          100 * $(col["clean_acc_mean"]), 100 * $(col["clean_acc_std"])
        k = split(eps, e, " ")
        for (j = 1; j <= k; j++) if (e[j] != "0")
          printf " %.1f ± %.1f |", 100 * $(col["acc_eps_" e[j] "_mean"]),
            100 * $(col["acc_eps_" e[j] "_std"])
        printf " %.2f | %.1f |\n", $(col["epoch_seconds_mean"]),
          $(col["passes_per_step_mean"]) }' "$out/summary.csv"
  done
} >"$out/summary.md"

for dataset in sentiment spamassassin; do
  awk -F, -v d="$dataset" -v eps="$epsilons" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $1 == d { m[++n] = $2
      k = split(eps, e, " ")
      for (j = 1; j <= k; j++) {
        mean[n, j] = 100 * $(col["acc_eps_" e[j] "_mean"])
        sd[n, j] = 100 * $(col["acc_eps_" e[j] "_std"]) } }
    END { printf "eps"; for (i = 1; i <= n; i++) printf " %s %s_std", m[i], m[i]
      printf "\n"
      for (j = 1; j <= k; j++) { printf "%s", e[j]
        for (i = 1; i <= n; i++) printf " %.3f %.3f", mean[i, j], sd[i, j]
        printf "\n" } }' "$out/summary.csv" >"$out/curve_$dataset.dat"
done
gnuplot -e "outfile='$out/accuracy_vs_epsilon.png'; dir='$out'" \
  "$here/plot.gp"
[ -s "$out/accuracy_vs_epsilon.png" ] || { echo "error: no plot" >&2; exit 1; }
echo "sweep: $out/results.csv, summary.csv, summary.md, accuracy_vs_epsilon.png ($took s)"
