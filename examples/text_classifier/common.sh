# What sweep.sh and robustness.sh share; sourced, after they have read
# their options into $sentiment and $spamassassin.

# Small steps run far slower on fresh pages; every run gets this setting
# (see docs/performance.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295}

data_args() { # data set -> the binary's data arguments
  if [ "$1" = spamassassin ]; then
    echo "--dataset spamassassin --data $spamassassin"
  else
    echo "--dataset sentiment --data ${sentiment//,/ }"
  fi
}

# "epsilon=1;alpha=0.5" (the CSV's options) -> "--epsilon 1 --alpha 0.5"
to_args() {
  [ -n "$1" ] || return 0
  echo "--$1" | sed 's/;/ --/g; s/=/ /g; s/_/-/g'
}
