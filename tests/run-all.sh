#!/usr/bin/env bash
# The whole test suite: every binary built, every workspace test (real sockets, real FUSE
# mounts, real containerd/runc where installed), then the VM tier (vsock and soft-RoCE RDMA in a
# nested guest, plus host<->guest vsock). Set SKIP_VM=1 to leave the VM tier out (it prints so).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=1
# The apt packages the tests drive (no-op when present; OFFLOAD_NO_DEPS=1 skips the check).
.ci/deps test
echo "== build (all binaries, rdma feature included)"
cargo build --locked --workspace --bins --features tools/rdma,tests/rdma
# Built just above: the tests need not each check that their binaries are fresh (tests::bin).
export OFFLOAD_TESTS_PREBUILT=1
# Every test binary runs under a deadline (tests/watchdog.sh, OFFLOAD_TEST_TIMEOUT seconds,
# default 1200): a hung test fails its binary with a dump of where it is blocked, and the rest
# of the suite still runs.
host_triple=$(rustc -vV | sed -n 's/^host: //p')
export "CARGO_TARGET_$(echo "$host_triple" | tr 'a-z-' 'A-Z_')_RUNNER=$PWD/tests/watchdog.sh"
echo "== workspace tests"
cargo test --locked --workspace --no-fail-fast --features tools/rdma,tests/rdma -- --test-threads=2
if [ "${SKIP_VM:-0}" = 1 ]; then
  echo "SKIPPED VM tier: SKIP_VM=1"
else
  echo "== VM tier (vsock + RDMA in a nested guest)"
  tests/vm/run.sh
fi
