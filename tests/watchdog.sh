#!/usr/bin/env bash
# Cargo test runner (tests/run-all.sh sets it through CARGO_TARGET_<triple>_RUNNER): runs one
# test binary with a deadline, so a hung test fails its binary within minutes instead of
# eating the whole CI budget. On timeout it prints what every thread of the binary and of its
# child processes is blocked in (wchan, kernel stack), then kills the process group.
#   OFFLOAD_TEST_TIMEOUT  seconds per test binary (default 1200)
set -uo pipefail
limit=${OFFLOAD_TEST_TIMEOUT:-1200}
# The qtfs mounts under the temp dir, one "minor mountpoint" line each (mount daemons detach
# from the test's process group, so what a killed binary mounted is told apart by this list).
tmp=${TMPDIR:-/tmp}
qtfs_mounts() {
  awk -v t="$tmp/" '$5 ~ "^"t && / - fuse(\.qtfs)? qtfs:/ { split($3, d, ":"); print d[2], $5 }' \
    /proc/self/mountinfo | sort
}
before=$(qtfs_mounts)
# Own process group: the kill below reaches the binary's children (daemons, mounts' helpers).
setsid "$@" &
pid=$!
# Ends the binary and its group when this runner is stopped (e.g. by an outer timeout).
trap 'kill -KILL -- -"$pid" 2>/dev/null; exit 143' TERM INT
start=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
  if [ $((SECONDS - start)) -ge "$limit" ]; then
    echo "WATCHDOG: $(basename "$1") still running after ${limit}s: killing it (OFFLOAD_TEST_TIMEOUT)" >&2
    # The process tree under the binary, with where each thread sleeps.
    pids=$(ps -eo pid=,pgid= | awk -v g="$pid" '$2 == g { print $1 }')
    for p in $pids; do
      echo "--- pid $p: $(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | cut -c1-200)" >&2
      for t in /proc/"$p"/task/*; do
        [ -d "$t" ] || continue
        echo "  tid ${t##*/} $(cat "$t"/comm 2>/dev/null) state=$(awk '{print $3}' "$t"/stat 2>/dev/null) wchan=$(cat "$t"/wchan 2>/dev/null)" >&2
        sed 's/^/      /' "$t"/stack 2>/dev/null | head -12 >&2
      done
    done
    # fusectl (per-connection "waiting" counts and "abort") is not mounted everywhere.
    [ -d /sys/fs/fuse/connections ] && ! mountpoint -q /sys/fs/fuse/connections &&
      mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null
    echo "--- FUSE connections still waiting:" >&2
    for c in /sys/fs/fuse/connections/*; do
      [ -f "$c"/waiting ] && echo "  ${c##*/} waiting=$(cat "$c"/waiting)" >&2
    done
    kill -TERM -- -"$pid" 2>/dev/null
    for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- -"$pid" 2>/dev/null
    # The qtfs mounts the binary made and left: abort their FUSE connections (nothing stays
    # blocked in D state, and their mount daemons exit) and detach them. Mounts that were
    # there before it started, and other FUSE mounts, are left alone.
    comm -13 <(echo "$before") <(qtfs_mounts) | while read -r minor dir; do
      [ -n "$minor" ] || continue
      echo "--- leftover mount $dir: aborted and detached" >&2
      [ -f /sys/fs/fuse/connections/"$minor"/abort ] && echo 1 >/sys/fs/fuse/connections/"$minor"/abort 2>/dev/null
      umount -l "$dir" 2>/dev/null
    done
    wait "$pid" 2>/dev/null
    exit 124
  fi
  sleep 0.2
done
wait "$pid"
