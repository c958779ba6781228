#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 30) on a copy of its committed seed
# corpus; exits non-zero on the first crash, leak, timeout or out-of-memory (the reproducer is
# left in fuzz/artifacts/<target>/). Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz --locked`). TARGETS="a b" restricts the set.
set -euo pipefail
SECONDS_PER_TARGET="${1:-30}"
cd "$(dirname "$0")"
TARGETS="${TARGETS:-$(cargo +nightly fuzz list)}"
start=$(date +%s)
# cargo-fuzz has no --locked: fail here if fuzz/Cargo.lock no longer matches the workspace
# crates (it must be committed updated, like the workspace's own Cargo.lock).
cargo +nightly metadata --locked --format-version 1 >/dev/null
cargo +nightly fuzz build -O
echo "fuzz: build took $(( $(date +%s) - start )) s"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $TARGETS; do
  # New inputs go to a scratch dir so the committed corpus stays the small seed set.
  mkdir -p "$work/$t"
  echo "== fuzz $t for ${SECONDS_PER_TARGET}s"
  # -rss_limit_mb / -malloc_limit_mb: a decoder that allocates what a peer announces fails here.
  if ! cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=1024 -malloc_limit_mb=256 \
      -timeout=10 -print_final_stats=1 2>"$work/$t.log"; then
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t FAILED (reproducer in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^Done ' "$work/$t.log" | sed "s/^/fuzz: $t: /"
done
echo "fuzz: all targets clean ($(( $(date +%s) - start )) s in total)"
