#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 30) on a copy of its committed seed
# corpus, JOBS (default: the CPU count) at a time; exits non-zero when any target found a
# crash, leak, timeout or out-of-memory (the reproducer is left in fuzz/artifacts/<target>/).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# TARGETS="a b" restricts the set.
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
# libFuzzer runs one thread per target: JOBS targets at a time (default: one per CPU).
JOBS="${JOBS:-$(nproc)}"
# Runs one target; its log and a "FAILED" marker stay in $work for the report below.
run_target() {
  local t=$1
  # New inputs go to a scratch dir so the committed corpus stays the small seed set.
  mkdir -p "$work/$t"
  # -rss_limit_mb / -malloc_limit_mb: a decoder that allocates what a peer announces fails here.
  if ! cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=1024 -malloc_limit_mb=256 \
      -timeout=10 -print_final_stats=1 >"$work/$t.log" 2>&1; then
    touch "$work/$t.FAILED"
  fi
}
echo "== fuzz: each target for ${SECONDS_PER_TARGET}s, $JOBS at a time"
running=0
for t in $TARGETS; do
  run_target "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
failed=0
for t in $TARGETS; do
  if [ -e "$work/$t.FAILED" ]; then
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t FAILED (reproducer in fuzz/artifacts/$t/)" >&2
    failed=1
  else
    grep -E '^stat::number_of_executed_units|^Done ' "$work/$t.log" | sed "s/^/fuzz: $t: /"
  fi
done
[ "$failed" = 0 ] || exit 1
echo "fuzz: all targets clean ($(( $(date +%s) - start )) s in total)"
