#!/usr/bin/env bash
# Builds dpu-offload and starts a HOST/DPU pair on loopback, then shows each service working:
#   HOST offloadd  --listen tcp://127.0.0.1:$PORT   (fs exports, exec, bridge)
#   DPU  offloadd  --connect tcp://127.0.0.1:$PORT  (bridge, exec back to the DPU)
#   a qtfs mount of the HOST export on the "DPU" mount point, and a rexec to the HOST.
# Stays up until Ctrl-C (or exits after the demo with PAIR_ONESHOT=1), then cleans up.
# Needs root (FUSE mount). State lives in $PAIR_DIR (default /tmp/offload-pair).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PAIR_DIR=${PAIR_DIR:-/tmp/offload-pair}
PORT=${PORT:-7000}
PROFILE=${PROFILE:-release}

.ci/deps pair   # the apt packages the build and the mount need (no-op when present)

echo "== building ($PROFILE)"
if [ "$PROFILE" = release ]; then cargo build --release --workspace --bins; else cargo build --workspace --bins; fi
BIN=$ROOT/target/$PROFILE
[ -n "${CARGO_TARGET_DIR:-}" ] && BIN=$CARGO_TARGET_DIR/$PROFILE

mkdir -p "$PAIR_DIR"/{host-data,dpu-mnt,host-run,dpu-run,logs}
cd "$PAIR_DIR"
if [ ! -f psk ]; then (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > psk); fi
chmod 600 psk
echo "hello from the HOST" > host-data/hello.txt

cat > host.toml <<TOML
[fs]
exports = [ { path = "$PAIR_DIR/host-data" }, { path = "/proc", read_only = false }, { path = "/sys" } ]

[exec]
allow_any = true

[bridge]
watch = [ "$PAIR_DIR/host-run" ]
allow_kill = true
TOML
cat > dpu.toml <<TOML
[bridge]
allow_listen = [ "$PAIR_DIR/host-run" ]
TOML

PIDS=()
cleanup() {
  umount -l "$PAIR_DIR/dpu-mnt" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== HOST offloadd on tcp://127.0.0.1:$PORT"
"$BIN/offloadd" --listen "tcp://127.0.0.1:$PORT" --key-file psk --config host.toml >logs/host.log 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q "listening on" logs/host.log && break; sleep 0.1; done
grep -q "listening on" logs/host.log || { cat logs/host.log; exit 1; }

echo "== DPU offloadd connecting"
"$BIN/offloadd" --connect "tcp://127.0.0.1:$PORT" --key-file psk --config dpu.toml >logs/dpu.log 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q "connected to" logs/dpu.log && break; sleep 0.1; done
grep -q "connected to" logs/dpu.log || { cat logs/dpu.log; exit 1; }

echo "== qtfs: mount -t qtfs $PAIR_DIR/host-data $PAIR_DIR/dpu-mnt"
"$BIN/mount_qtfs" "$PAIR_DIR/host-data" "$PAIR_DIR/dpu-mnt" -o "addr=tcp://127.0.0.1:$PORT,keyfile=$PAIR_DIR/psk"
cat "$PAIR_DIR/dpu-mnt/hello.txt"
echo "written on the DPU" > "$PAIR_DIR/dpu-mnt/from-dpu.txt"
echo "HOST sees: $(cat "$PAIR_DIR/host-data/from-dpu.txt")"

echo "== rexec: uname -a on the HOST"
OFFLOAD_KEY_FILE=$PAIR_DIR/psk CMD_NET_ADDR=tcp://127.0.0.1:$PORT "$BIN/rexec" uname -a

cat <<TXT

HOST/DPU pair is up (logs in $PAIR_DIR/logs):
  ls $PAIR_DIR/dpu-mnt
  OFFLOAD_KEY_FILE=$PAIR_DIR/psk CMD_NET_ADDR=tcp://127.0.0.1:$PORT $BIN/rexec sh -c 'echo \$\$; hostname'
  $BIN/mount_qtfs -o proc,addr=tcp://127.0.0.1:$PORT,keyfile=$PAIR_DIR/psk /proc /mnt/host-proc
Ctrl-C stops everything.
TXT
if [ "${PAIR_ONESHOT:-0}" = 1 ]; then exit 0; fi
wait
