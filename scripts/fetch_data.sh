#!/usr/bin/env bash
# Downloads the UCI "Sentiment Labelled Sentences" data set (Kotzias et al.,
# KDD 2015; CC BY 4.0) as shipped by the npm package sentiment@5.0.2, checks
# the package's sha256 and unpacks its three JSON files into data/sentiment/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/sentiment"
package=sentiment@5.0.2
tarball=sentiment-5.0.2.tgz
sha256=89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f
files=(imdb amazon yelp)

if [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha256" ]; then
  echo "data/sentiment is already there (verified $package)"
  exit 0
fi
command -v npm >/dev/null || {
  echo "error: npm is needed to fetch $package (apt-get install npm)" >&2
  exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $package ..."
(cd "$tmp" && npm pack --silent "$package" >/dev/null)
echo "$sha256  $tmp/$tarball" | sha256sum --check --quiet || {
  echo "error: $tarball does not have the expected sha256" >&2
  exit 1
}
tar -xzf "$tmp/$tarball" -C "$tmp"
mkdir -p "$dest"
for f in "${files[@]}"; do
  cp "$tmp/package/test/fixtures/$f.json" "$dest/$f.json"
done
echo "$sha256" >"$dest/.sha256"
echo "unpacked ${files[*]} into data/sentiment/"
