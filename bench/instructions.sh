#!/usr/bin/env bash
# Instructions per training step, counted by valgrind's cachegrind: each
# runner (a plain step; each method written by hand, its "floor"; the
# library's Trainer::step; the library in the user's own loop; the Python
# classes of bench/python/) runs as its own process for N and N + K steps,
# and (I(N + K) - I(N)) / K is its cost per step; where the bench was built
# with valgrind >= 3.22's client requests, one process per runner counts
# its steps N+1..N+K alone (--count-from; half the processes, and LibTorch's
# start-up runs uncounted). Unlike wall time on a shared VM, the count does
# not move between runs: every runner runs in ROUNDS rounds and the script
# reports how far they disagree.
#
#   bench/instructions.sh                      (after cmake --build build)
#   bench/instructions.sh --methods fgm,pgd --rounds 1 --no-python
#   bench/instructions.sh --methods fgm,pgd,freelb --guard 1.02 --rounds 1
#
# Options:
#   --methods LIST   comma-separated (default: every method of the bench,
#                    from its --list-methods)
#   --shape "ARGS"   the model's bench arguments (default: --bag --vocab 30000
#                    --hidden 64 --batch 16 --length 32)
#   --steps N        the base step count (default 2)
#   --extra K        the extra steps (default 30: identical processes differ
#                    by up to a few M instructions, which K steps divide)
#   --rounds R       rounds per runner (default 2)
#   --jobs J         processes at once (default: the cores)
#   --no-python      skip the Python runners
#   --no-own         skip the own-loop runners
#   --wall REPEATS   also time every runner (medians of REPEATS, interleaved)
#   --guard RATIO    exit 1 when a method's library/floor ratio exceeds RATIO
#   --ceilings FILE  exit 1 when a method's library/floor ratio exceeds its
#                    ceiling in FILE (lines "method ratio"; # comments), or
#                    when FILE names no ceiling for a method
#   --in-process-only  skip (exit 77) unless the bench counts in process
# Exits 77 (skipped) when valgrind is not installed, or cannot run LibTorch
# on this processor.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=${ADVTRAIN_BENCH:-$root/build/bench/advtrain_bench}
python=${ADVTRAIN_PYTHON:-/usr/bin/python3}
methods=
shape="--bag --vocab 30000 --hidden 64 --batch 16 --length 32"
steps=2 extra=30 rounds=2 jobs=$(nproc) use_python=1 use_own=1 wall=0 guard=
ceilings= in_process_only=0
while [ $# -gt 0 ]; do
  case $1 in
    --methods) methods=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-python) use_python=0; shift ;;
    --no-own) use_own=0; shift ;;
    --wall) wall=$2; shift 2 ;;
    --guard) guard=$2; shift 2 ;;
    --ceilings) ceilings=$2; shift 2 ;;
    --in-process-only) in_process_only=1; shift ;;
    *) echo "error: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
  esac
done
if ! command -v valgrind >/dev/null; then
  echo "valgrind is not installed (apt-get install valgrind): skipped" >&2
  exit 77
fi
[ -x "$bench" ] || { echo "error: build $bench first" >&2; exit 1; }
if [ -z "$methods" ]; then
  methods=$("$bench" --list-methods) ||
    { echo "error: $bench has no --list-methods (rebuild it)" >&2; exit 1; }
fi
[ -z "$ceilings" ] || [ -r "$ceilings" ] ||
  { echo "error: cannot read $ceilings" >&2; exit 2; }
if [ "$use_python" = 1 ] && ! "$python" -c 'import torch' 2>/dev/null; then
  echo "note: $python has no torch (apt-get install python3-torch): no" \
    "Python runners" >&2
  use_python=0
fi
# The same allocator setting for every runner (see docs/performance.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295}
# One OpenBLAS thread, as --threads 1 gives LibTorch one: OpenBLAS 0.3.29
# (Debian trixie) keeps idle threads spinning, which cachegrind counts.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS-1}

runners="plain"
for m in ${methods//,/ }; do
  runners="$runners ${m}_floor $m"
  case $m in fgsm | fgm | pgd) [ "$use_own" = 1 ] && runners="$runners ${m}_own" ;; esac
  case $m in fgm | pgd) [ "$use_python" = 1 ] && runners="$runners ${m}_python" ;; esac
done
[ "$use_python" = 1 ] && runners="$runners plain_python"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Counting inside one process needs the bench's client requests (exit 3
# without them) and runs the C++ runners only.
in_process=0 probe_rc=3
if [ "$use_python" = 0 ]; then
  probe_log=$("$bench" $shape --threads 1 --runner plain --steps 1 \
    --count-from 0 2>&1) && probe_rc=0 || probe_rc=$?
fi
if [ "$probe_rc" = 0 ]; then
  in_process=1
elif [ "$probe_rc" != 3 ]; then # not the "no client requests" refusal
  echo "error: the bench failed (exit $probe_rc):" >&2
  echo "$probe_log" | tail -5 >&2
  exit 1
elif [ "$in_process_only" = 1 ]; then
  echo "the bench cannot count in process (built without valgrind >= 3.22's" \
    "<valgrind/cachegrind.h>, or with Python runners): skipped" >&2
  exit 77
fi
# One line per process: round runner steps.
for r in $(seq "$rounds"); do
  for name in $runners; do
    if [ "$in_process" = 1 ]; then echo "$r $name $((steps + extra))"
    else for s in "$steps" $((steps + extra)); do echo "$r $name $s"; done; fi
  done
done >"$work/jobs"
total=$(wc -l <"$work/jobs")
echo "cachegrind: $total processes, $jobs at a time ($shape, 1 thread," \
  "GLIBC_TUNABLES=${GLIBC_TUNABLES:-(unset)}, counted" \
  "$([ "$in_process" = 1 ] && echo "in process" || echo "by difference"))" >&2

# Runs one process under cachegrind; prints "round runner steps instructions"
# (counted in process: also "round runner base 0", so that the difference
# below is the count itself).
count() {
  local round=$1 name=$2 n=$3 cmd vg=()
  case $name in
    *_python) cmd=("$python" "$root/bench/python/bench_python.py" $shape
                   --threads 1 --runner "${name%_python}" --steps "$n") ;;
    *) cmd=("$bench" $shape --threads 1 --runner "$name" --steps "$n") ;;
  esac
  if [ "$in_process" = 1 ]; then
    cmd+=(--count-from "$steps")
    vg=(--instr-at-start=no)
    echo "$round $name $steps 0"
  fi
  local log
  log=$(valgrind --tool=cachegrind --cache-sim=no "${vg[@]}" \
    --cachegrind-out-file=/dev/null "${cmd[@]}" 2>&1) || {
    echo "error: $name x $n failed:" >&2
    echo "$log" | tail -5 >&2
    return 1
  }
  local refs
  refs=$(echo "$log" | sed -n 's/.*I *refs: *//p' | tr -d ,)
  echo "$round $name $n $refs"
  echo "  $name x $n (round $round): $refs instructions" >&2
}
# Some valgrind releases cannot decode every instruction LibTorch's CPU
# detection runs on some processors (valgrind 3.19, Debian bookworm's, stops
# at RDTSCP on AMD EPYC with SIGILL): then nothing can be counted here.
probe=$(valgrind --tool=cachegrind --cache-sim=no \
  --cachegrind-out-file=/dev/null "$bench" $shape --threads 1 \
  --runner plain --steps 1 2>&1) || true
if grep -q "Unrecognised instruction" <<<"$probe"; then
  echo "valgrind $(valgrind --version) cannot run LibTorch on this processor" \
    "(an instruction it does not decode): skipped" >&2
  echo "$probe" | grep -m1 "unhandled instruction bytes" >&2 || true
  exit 77
fi

export -f count
export python root shape bench steps in_process
xargs -P "$jobs" -L 1 bash -c 'count "$@"' _ <"$work/jobs" >"$work/counts"

# Wall time (optional): the bench's interleaved medians, and Python's.
: >"$work/wall"
if [ "$wall" -gt 0 ]; then
  echo "wall time: $wall repeats, 1 thread" >&2
  "$bench" $shape --threads 1 --methods "$methods" --repeats "$wall" --raw |
    sed -n 's/^ms //p' >>"$work/wall"
  if [ "$use_python" = 1 ]; then
    "$python" "$root/bench/python/bench_python.py" $shape --threads 1 \
      --repeats "$wall" | sed -n 's/^ms \([a-z]*\) /\1_python /p' \
      >>"$work/wall"
  fi
fi

awk -v steps="$steps" -v extra="$extra" -v methods="$methods" \
  -v guard="$guard" -v shape="$shape" -v has_ceilings="${ceilings:+1}" \
  -v in_process="$in_process" '
  FILENAME == ARGV[1] { c[$1 " " $2 " " $3] = $4; seen[$2] = 1; rr[$1] = 1; next }
  FILENAME == ARGV[2] { ms[$1] = $2; next }
  /^[ \t]*(#|$)/ { next }
  {
    sub(/\r$/, "")
    if (NF != 2 || $2 !~ /^[0-9]*\.?[0-9]+$/) {
      printf "GUARD: %s, line %d: not \"method ratio\": %s\n", FILENAME, FNR, $0
      bad = 1
      next
    }
    ceiling[$1] = $2
  }
  function per_step(name,   r, a, n, lo, hi, v) {
    n = 0; a = 0
    for (r in rr) {
      v = (c[r " " name " " steps + extra] - c[r " " name " " steps]) / extra
      a += v
      if (n == 0 || v < lo) lo = v
      if (n == 0 || v > hi) hi = v
      n++
    }
    spread[name] = n > 1 && lo > 0 ? 100 * (hi - lo) / lo : 0
    if (spread[name] > worst) worst = spread[name]
    return a / n
  }
  function mi(v) { return v > 0 ? sprintf("%.2f", v / 1e6) : "-" }
  function ratio(a, b) { return a > 0 && b > 0 ? sprintf("%.3f", a / b) : "-" }
  function wall(name) { return (name in ms) ? sprintf("%.2f", ms[name]) : "-" }
  END {
    for (name in seen) i[name] = per_step(name)
    if (in_process)
      printf "instructions per step (M), %s, 1 thread; steps %d-%d counted in process\n",
        shape, steps + 1, steps + extra
    else
      printf "instructions per step (M), %s, 1 thread; (I(%d) - I(%d)) / %d\n",
        shape, steps + extra, steps, extra
    printf "%-8s %8s %8s %8s %8s %8s %10s %10s %10s %8s %8s %8s\n",
      "method", "plain", "floor", "library", "own", "python",
      "lib/floor", "lib/plain", "lib/python", "ms floor", "ms lib", "ms py"
    n = split(methods, m, ",")
    for (k = 1; k <= n; k++) {
      name = m[k]
      printf "%-8s %8s %8s %8s %8s %8s %10s %10s %10s %8s %8s %8s\n", name,
        mi(i["plain"]), mi(i[name "_floor"]), mi(i[name]), mi(i[name "_own"]),
        mi(i[name "_python"]), ratio(i[name], i[name "_floor"]),
        ratio(i[name], i["plain"]), ratio(i[name], i[name "_python"]),
        wall(name "_floor"), wall(name), wall(name "_python")
      limit = (name in ceiling) ? ceiling[name] : guard
      if (has_ceilings && !(name in ceiling)) {
        printf "GUARD: %s has no ceiling in the ceilings file\n", name
        bad = 1
      }
      if (limit != "" && !(i[name "_floor"] > 0 && i[name] / i[name "_floor"] <= limit + 0)) {
        printf "GUARD: %s library/floor %s > %s\n", name,
          ratio(i[name], i[name "_floor"]), limit
        bad = 1
      }
    }
    if ("plain_python" in i)
      printf "python plain step: %s M (library plain / python plain %s)\n",
        mi(i["plain_python"]), ratio(i["plain"], i["plain_python"])
    printf "largest disagreement between rounds: %.3f %%\n", worst
    exit bad
  }' "$work/counts" "$work/wall" ${ceilings:+"$ceilings"}
