#!/usr/bin/env bash
# Runs the README's test command on LibTorch 2.x: Debian trixie's
# libtorch-dev 2.6 with GCC 14 and Catch2 v3, in a chroot of trixie that it
# builds on first use (debootstrap: about 2 minutes, then 1-2 minutes of
# packages, 2.3 GB) and reuses after. Needs root (chroot, mounts).
#
#   scripts/test_trixie.sh            # the whole suite, as .ci/run runs it
#   scripts/test_trixie.sh -R cuda    # extra arguments go to ctest
#
# ADVTRAIN_TRIXIE_ROOT: where the chroot lives (default
# /var/tmp/advtrain-trixie). The working tree (git's tracked and untracked,
# not ignored, files) is copied to /advtrain in it; its build directory is
# kept there between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${ADVTRAIN_TRIXIE_ROOT:-/var/tmp/advtrain-trixie}
packages=(cmake g++ ninja-build libtorch-dev catch2 libfmt-dev
  libopenblas0-pthread libgloo-dev nlohmann-json3-dev libcli11-dev
  wordnet-base wordnet-dev valgrind gnuplot-nox)

[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (chroot)" >&2; exit 1; }
start=$(date +%s)
if [ ! -x "$root/usr/bin/apt-get" ]; then
  # The archive this machine already uses (deb822 or one-line sources).
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -m1 '/debian$' ||
    true)
  mirror=${mirror:-http://deb.debian.org/debian}
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends debootstrap >/dev/null
  }
  echo "trixie: building the chroot in $root from $mirror"
  rm -rf "$root"
  debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; exit 1; }
fi

mounted=()
cleanup() {
  for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
for m in proc dev; do
  if ! mountpoint -q "$root/$m"; then
    if [ "$m" = proc ]; then mount -t proc proc "$root/proc"
    else mount --bind /dev "$root/dev"; fi
    mounted+=("$root/$m")
  fi
done
cp /etc/resolv.conf "$root/etc/resolv.conf"

if ! chroot "$root" dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  echo "trixie: installing ${packages[*]}"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive bash -c \
    "apt-get update -qq && apt-get install -y -qq --no-install-recommends \
     ${packages[*]} >/dev/null"
fi
echo "trixie: ready after $(($(date +%s) - start)) s:" \
  "$(chroot "$root" dpkg-query -W -f '${Package} ${Version}, ' \
    libtorch-dev g++ catch2)"

# The working tree, as git sees it; the chroot's build directory is kept.
# Files are stamped with the time of the copy, except those whose content
# the last copy (the one the kept build was made from) already had, which
# keep its time: the build then redoes exactly what changed, whatever the
# times of the files here (an older edit than another tree's build, as
# after a CI run of another commit, would otherwise be taken as built).
src="$root/advtrain"
stage="$root/advtrain.copy"
mkdir -p "$src"
rm -rf "$stage" && mkdir -p "$stage"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
  tar -cf - --null -T - | tar -xf - --touch -C "$stage"
(cd "$stage" && find . -type f -print0) |
  while IFS= read -r -d '' f; do
    if cmp -s "$stage/$f" "$src/$f"; then touch -r "$src/$f" "$stage/$f"; fi
  done
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
tar -C "$stage" -cf - . | tar -xf - -C "$src"
rm -rf "$stage"

# The README's test command, exactly (extra arguments go to ctest).
chroot "$root" bash -c 'cd /advtrain &&
  cmake -S . -B build -G Ninja && cmake --build build -j2 &&
  ctest --test-dir build -j2 --output-on-failure "$@"' ctest "$@"
echo "trixie: done after $(($(date +%s) - start)) s"
