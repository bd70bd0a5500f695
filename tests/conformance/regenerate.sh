#!/usr/bin/env bash
# Regenerates the golden files of the conformance test from the Python
# replays. Needs Debian's python3-torch (ATen 1.13, as libtorch-dev):
#   sudo apt-get install python3-torch
# CI does not run this: the goldens are committed.
set -euo pipefail
cd "$(dirname "$0")"
python=/usr/bin/python3
"$python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("1.13") else 1)' || {
  echo "regenerate.sh: needs Debian's python3-torch 1.13 at $python" >&2
  exit 1
}
for replay in fgm_pgd freeat_main_free freelb_hf smart_mtdnn yopo_fairseq vat_tf r3f_fairseq awp_class ascc_official dne_official; do
  echo "== $replay.py"
  "$python" "$replay.py"
done
echo "Goldens written; 'git diff --stat tests/conformance' shows what changed."
