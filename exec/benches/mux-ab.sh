#!/usr/bin/env bash
# Interleaved A/B of rexec's start-to-exit latency through a rexec_mux (issue 14's target:
# `rexec /bin/true` <= 2x a local `/bin/true`), docs/BENCHMARKS.md "exec".
#
#   cargo build --release -p tools --bin rexec_server --bin rexec_mux && cargo rexec-musl
#   exec/benches/mux-ab.sh            # RUNS=500 rounds; REXEC=<rexec to time>; BIN=<dir>
#
# Starts rexec_server (TCP loopback, encryption on, a throw-away key) and a rexec_mux holding
# one session to it, then times round-robin (exec/benches/spawn-ab.c): a local /bin/true;
# `rexec /bin/true` (the common call: no option, CMD_NET_ADDR set: rexec's front end hands it
# to the mux itself); `rexec-full /bin/true` (the same call by the full client, which the
# front end replaced for it); and `rexec --addr … /bin/true` (an option: the front end execs
# rexec-full, which parses it with clap). Stops both daemons at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-$PWD/target/release}
REXEC=${REXEC:-$PWD/target/$(uname -m)-unknown-linux-musl/release/rexec}
FULL=$(dirname "$REXEC")/rexec-full
RUNS=${RUNS:-500}
for b in "$BIN/rexec_server" "$BIN/rexec_mux" "$REXEC" "$FULL"; do
  [ -x "$b" ] || { echo "missing $b: see the build line at the top of $0" >&2; exit 1; }
done
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
cc -O2 -o "$W/spawn-ab" exec/benches/spawn-ab.c
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$W/psk"
chmod 600 "$W/psk"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ADDR=tcp://127.0.0.1:$PORT
CMD_NET_ADDR=$ADDR RUST_LOG=warn "$BIN/rexec_server" --key-file "$W/psk" --allow-any 2>"$W/server.log" &
PIDS+=($!)
# The mux's first dial must find the server listening (else it logs a retry at warn level).
for _ in $(seq 100); do [ -n "$(ss -Hltn "sport = :$PORT")" ] && break; sleep 0.05; done
CMD_NET_ADDR=$ADDR RUST_LOG=warn "$BIN/rexec_mux" --key-file "$W/psk" --control-path "$W/mux/rexec.sock" 2>"$W/mux.log" &
PIDS+=($!)
export OFFLOAD_KEY_FILE=$W/psk REXEC_CONTROL=$W/mux/rexec.sock CMD_NET_ADDR=$ADDR
for _ in $(seq 100); do "$REXEC" /bin/true 2>/dev/null && break; sleep 0.05; done
echo "rexec: $REXEC; load: $(cut -d' ' -f1-3 /proc/loadavg); $RUNS rounds; ms"
"$W/spawn-ab" "$RUNS" /bin/true -- "$REXEC" /bin/true -- "$FULL" /bin/true -- "$REXEC" --addr "$ADDR" /bin/true
# A mux that logged anything at warn level would make the figures suspect.
if [ -s "$W/mux.log" ] || [ -s "$W/server.log" ]; then
  echo "daemon logs:" >&2
  cat "$W/mux.log" "$W/server.log" >&2
fi
