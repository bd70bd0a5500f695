#!/usr/bin/env bash
# Fuzzes the example's readers (tests/fuzz/fuzz_readers.cpp) with libFuzzer:
# builds each target with clang (AddressSanitizer + UndefinedBehaviorSanitizer)
# and runs it for SECONDS (default 60) from its committed corpus
# (tests/fuzz/corpus/TARGET, seeded with the test files); what it finds new
# goes to build-fuzz/, not into the repository. A crash stops the run with
# the input saved as build-fuzz/crash-*; make it a test, fix, and commit the
# input into the corpus.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]   TARGET: json email glove tuned
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(json email glove tuned)
out=${ADVTRAIN_FUZZ_DIR:-../../build-fuzz}
mkdir -p "$out"
cxx=${CLANGXX:-clang++}
command -v "$cxx" >/dev/null || { echo "$0: needs clang++ (apt-get install clang)" >&2; exit 1; }
for t in "${targets[@]}"; do
  upper=$(echo "$t" | tr '[:lower:]' '[:upper:]')
  "$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -DFUZZ_"$upper" -DFMT_HEADER_ONLY \
    -I../../examples/text_classifier fuzz_readers.cpp -o "$out/fuzz_$t"
  mkdir -p "$out/corpus_$t"
  echo "fuzz $t: ${secs} s from corpus/$t"
  (cd "$out" && ./"fuzz_$t" -max_total_time="$secs" -print_final_stats=1 \
    -timeout=10 -rss_limit_mb=2048 "corpus_$t" "$OLDPWD/corpus/$t" \
    >"fuzz_$t.log" 2>&1) || { tail -40 "$out/fuzz_$t.log" >&2; exit 1; }
  # The last status line (coverage, features, corpus) and the run's totals.
  grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$out/fuzz_$t.log" | tail -1
  grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec' \
    "$out/fuzz_$t.log" | tr '\n' ' '
  echo
done
