#!/usr/bin/env bash
# Semi-supervised training measured: plain, FGM (supervised: the labeled
# share alone) and the label-free VAT, SMART and R3F (the labeled share
# plus one unlabeled batch per step from the rest of the training split),
# trained with a share of the training labels (--labeled), on both data sets.
#
# First a small grid on the validation split (seed 1) picks, per data set,
# labeled share and method, the option value with the best clean validation
# accuracy; then every method runs with its pick on the test split for each
# seed. Writes, under OUT:
#   grid.csv      one row per (data set, share, method, option value)
#   tuned.csv     the value kept: share,dataset,method,options
#   results.csv   one row per (share, data set, method, seed)
#   summary.csv   mean and sample standard deviation over the seeds
#   summary.md    Markdown tables, one per data set
#   accuracy_vs_labeled.png   clean accuracy and accuracy under PWWS against
#                 the labeled share, one line per method, per data set
#
# Usage: semi.sh [--bin PATH] [--out DIR] [--seeds "1 2 3"]
#                [--shares "0.05 0.2 1"] [--epochs N] [--limit N] [--jobs N]
#                [--sentiment FILE...] [--spamassassin DIR]
# The binary is built by CMake; the data by
# scripts/fetch_data.sh sentiment spamassassin.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/build/examples/text_classifier/text_classifier"
out="$root/results/semi"
seeds="1 2 3"
shares="0.05 0.2 1"
epochs=10
limit=0
jobs=2
sentiment="$root/data/sentiment/amazon.json,$root/data/sentiment/imdb.json,$root/data/sentiment/yelp.json"
spamassassin="$root/data/spamassassin"
methods="plain fgm vat smart r3f"

while [ $# -gt 0 ]; do
  case "$1" in
  --bin) bin=$2; shift ;;
  --out) out=$2; shift ;;
  --seeds) seeds=$2; shift ;;
  --shares) shares=$2; shift ;;
  --epochs) epochs=$2; shift ;;
  --limit) limit=$2; shift ;;
  --jobs) jobs=$2; shift ;;
  --sentiment) sentiment=$2; shift ;;
  --spamassassin) spamassassin=$2; shift ;;
  *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$bin" ] || { echo "error: no binary at $bin (build first)" >&2; exit 1; }
mkdir -p "$out/runs" "$out/logs"
rm -f "$out"/runs/*.csv "$out"/logs/*.log
# shellcheck source=common.sh
source "$here/common.sh"

# The grid: each method's main option; the others keep the library's
# defaults.
grid_values() {
  case "$1" in
  fgm) printf -- '--epsilon %s\n' 1 2 4 ;;
  vat) printf -- '--epsilon %s\n' 1 2 5 ;;
  smart) printf -- '--weight %s\n' 1 3 10 ;;
  r3f) printf -- '--noise-var %s\n' 1e-5 0.1 0.5 ;;
  *) echo "" ;;
  esac
}

start=$(date +%s)
common=(--epochs "$epochs" --limit "$limit" --target activations --threads 1)

# run NAME ARGS...: one run of the binary, its CSV row in runs/NAME.csv.
run() {
  local name=$1
  shift
  "$bin" "$@" "${common[@]}" --csv "$out/runs/$name.csv" \
    >"$out/logs/$name.log" 2>&1 ||
    echo "error: $name failed (log: $out/logs/$name.log)"
}
# Runs "$@" in the background once fewer than --jobs runs are going.
spawn() {
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
  "$@" &
}
# Joins runs/*.csv into $1, each row led by its share (the file name's
# second field); $2: the rows expected.
join_runs() {
  local first
  first=$(set -- "$out"/runs/*.csv && echo "$1")
  {
    echo "share,$(head -1 "$first")"
    for f in "$out"/runs/*.csv; do
      share=$(basename "$f" .csv | cut -d- -f2)
      tail -n +2 "$f" | sed "s/^/$share,/"
    done
  } >"$1"
  rows=$(($(wc -l <"$1") - 1))
  [ "$rows" = "$2" ] || {
    echo "error: $1 has $rows rows, expected $2 (logs: $out/logs/)" >&2
    exit 1
  }
}

# The grid (spam first: the slow ones, so that the jobs end together).
for dataset in spamassassin sentiment; do
  for share in $shares; do
    for method in $methods; do
      mapfile -t values < <(grid_values "$method")
      k=0
      for v in "${values[@]}"; do
        k=$((k + 1))
        echo "[semi $(($(date +%s) - start)) s] grid $dataset labeled $share $method $v"
        # shellcheck disable=SC2046,SC2086
        spawn run "$dataset-$share-$method-$k" $(data_args "$dataset") \
          --method "$method" --labeled "$share" --seed 1 --validation \
          --pwws-sample 0 $v
      done
    done
  done
done
wait
n_values=0
for method in $methods; do
  n_values=$((n_values + $(grid_values "$method" | wc -l)))
done
join_runs "$out/grid.csv" $((2 * $(echo $shares | wc -w) * n_values))
rm -f "$out"/runs/*.csv
# Kept, per share, data set and method: the best clean validation accuracy
# (the first value tried among equals).
awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
  { key = $1 "," $2 "," $4; score = $(col["clean_acc"])
    if (!(key in best) || score > best[key]) { best[key] = score; opt[key] = $6 } }
  END { print "share,dataset,method,options"
        for (k in opt) print k "," opt[k] }' "$out/grid.csv" |
  (read -r header; echo "$header"; sort) >"$out/tuned.csv"
grid_took=$(($(date +%s) - start))

# The runs on the test split: each seed, each method with its pick.
for dataset in spamassassin sentiment; do
  for share in $shares; do
    for seed in $seeds; do
      for method in $methods; do
        options=$(awk -F, -v s="$share" -v d="$dataset" -v m="$method" \
          '$1 == s && $2 == d && $3 == m { print $4 }' "$out/tuned.csv" |
          tr -d '"')
        echo "[semi $(($(date +%s) - start)) s] $dataset labeled $share seed $seed $method $(to_args "$options")"
        # shellcheck disable=SC2046,SC2086
        spawn run "$dataset-$share-$method-$seed" $(data_args "$dataset") \
          --method "$method" --labeled "$share" --seed "$seed" \
          $(to_args "$options")
      done
    done
  done
done
wait
took=$(($(date +%s) - start))
join_runs "$out/results.csv" \
  $((2 * $(echo $shares | wc -w) * $(echo $seeds | wc -w) * $(echo $methods | wc -w)))

# Mean and sample standard deviation over the seeds.
awk -v key=share,dataset,method,options,unlabeled -v from=clean_acc \
  -f "$here/mean_std.awk" "$out/results.csv" >"$out/summary.csv"
sizes=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
  $(c["method"]) == "plain" { print $(c["dataset"]) " " $(c["share"]) ": " $(c["labeled"]) }' \
  "$out/results.csv" | sort -u | paste -sd';' | sed 's/;/; /g')
{
  echo "Made by \`examples/text_classifier/semi.sh\` in $took s ($jobs processes,"
  echo "grid $grid_took s of it): seeds $seeds; $epochs epochs, each as many steps as"
  echo "one over the whole training split; bag of words, random embeddings, the"
  echo "methods on each text's embedded words; labeled texts per share ($sizes);"
  echo "PWWS (WordNet, budget 25 % of the words) on the first 200 test texts;"
  echo "mean ± std over seeds, in %."
  for dataset in sentiment spamassassin; do
    echo
    echo "**$dataset** (test split)"
    echo
    echo "| labeled | method | options | unlabeled texts | clean | PWWS | PWWS success | s/epoch |"
    echo "|---|---|---|---|---|---|---|---|"
    awk -F, -v d="$dataset" -v ms="$methods" '
      NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i
                k = split(ms, m, " "); for (j = 1; j <= k; j++) rank[m[j]] = j
                next }
      function cell(name) {
        return sprintf("%.1f ± %.1f", 100 * $(col[name "_mean"]),
                       100 * $(col[name "_std"])) }
      $2 == d {
        o = $4; gsub(/"/, "", o); gsub(/;/, " ", o)
        printf "%s\t%d\t| %g %% | %s | %s | %s | %s | %s | %s | %.2f |\n", $1,
          rank[$3], 100 * $1, $3, o, $5,
          cell("clean_acc"), cell("pwws_acc"), cell("pwws_success"),
          $(col["epoch_seconds_mean"]) }' "$out/summary.csv" |
      sort -t"$(printf '\t')" -k1,1g -k2,2n | cut -f3-
  done
} >"$out/summary.md"

# The plot's data: per data set, one line per labeled share.
for dataset in sentiment spamassassin; do
  awk -F, -v d="$dataset" -v ms="$methods" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $2 == d { s[$1] = 1
      clean[$1, $3] = 100 * $(col["clean_acc_mean"])
      cs[$1, $3] = 100 * $(col["clean_acc_std"])
      pwws[$1, $3] = 100 * $(col["pwws_acc_mean"])
      ps[$1, $3] = 100 * $(col["pwws_acc_std"]) }
    END { k = split(ms, m, " ")
      printf "share"
      for (j = 1; j <= k; j++) printf " %s %s_std %s_pwws %s_pwws_std", m[j], m[j], m[j], m[j]
      printf "\n"
      n = 0; for (x in s) share[++n] = x + 0
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
        if (share[j] < share[i]) { t = share[i]; share[i] = share[j]; share[j] = t }
      for (i = 1; i <= n; i++) { x = share[i]; printf "%g", 100 * x
        for (j = 1; j <= k; j++)
          printf " %.3f %.3f %.3f %.3f", clean[x, m[j]], cs[x, m[j]],
            pwws[x, m[j]], ps[x, m[j]]
        printf "\n" } }' "$out/summary.csv" >"$out/semi_$dataset.dat"
done
{
  echo "set terminal pngcairo size 1400,900 font ',10'"
  echo "set output '$out/accuracy_vs_labeled.png'"
  echo "set multiplot layout 2,2 title 'Accuracy against the share of training labels (mean ± std over seeds $seeds)'"
  echo "set xlabel 'labeled share of the training split (%)'"
  echo "set ylabel 'accuracy (%)'"
  echo "set logscale x"
  echo "set xtics (5, 10, 20, 50, 100)"
  echo "set key bottom right box font ',8'"
  echo "set grid"
  k=$(echo $methods | wc -w)
  for dataset in sentiment spamassassin; do
    f="$out/semi_$dataset.dat"
    echo "set title '$dataset: clean test accuracy'"
    echo "plot for [i=0:$((k - 1))] '$f' using 1:(column(2 + 4 * i)):(column(3 + 4 * i)) with yerrorlines title columnheader(2 + 4 * i)"
    echo "set title '$dataset: accuracy under PWWS (WordNet, 25 % of the words)'"
    echo "plot for [i=0:$((k - 1))] '$f' using 1:(column(4 + 4 * i)):(column(5 + 4 * i)) with yerrorlines title columnheader(2 + 4 * i)"
  done
  echo "unset multiplot"
} >"$out/accuracy_vs_labeled.gp"
gnuplot "$out/accuracy_vs_labeled.gp"
[ -s "$out/accuracy_vs_labeled.png" ] || { echo "error: no plot" >&2; exit 1; }
echo "semi: $out/results.csv, summary.csv, summary.md, accuracy_vs_labeled.png ($took s)"
