#!/bin/bash
# rexec benchmark: remote-exec latency and stdout streaming, rexec vs ssh, in one run.
#
#   cargo build --release -p tools --bin rexec --bin rexec-full --bin rexec_server --bin rexec_mux
#   cargo rexec-musl                      # the deployed build of rexec (static musl; or
#                                         # rexec-static / rexec-static-nopie, glibc; .cargo/config.toml)
#   exec/benches/exec-bench.sh            # RUNS=200 (latency runs), STREAM_RUNS=3, BIN=target/release
#
# REXEC = the rexec measured (default: the static musl build if present, else the static glibc
# build, else $BIN/rexec); every other build present (static glibc, dynamic $BIN/rexec) is
# measured too, one more row each.
#
# Measures (hyperfine -N, median):
#   local fork/exec of /bin/true | rexec /bin/true over TCP loopback (and a Unix socket) |
#   rexec /bin/true through a rexec_mux (started and stopped here) holding one TCP session |
#   ssh to a private loopback sshd, fresh connection | ssh reusing a ControlMaster;
#   and 1 GiB of stdout (`head -c 1GiB /dev/zero`, output discarded) through rexec (direct and
#   via the mux) vs ssh (ControlMaster). Rows other than the mux's set REXEC_CONTROL=none.
# Needs root, hyperfine, openssh-server/client. sshd listens on 127.0.0.1 only and is stopped at the
# end; ssh logs in as a throw-away user with /bin/sh (root's bash rc files would otherwise be
# part of every ssh row), removed at the end.
set -euo pipefail
RUNS=${RUNS:-200}
STREAM_RUNS=${STREAM_RUNS:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
W=$(mktemp -d /tmp/exec-bench.XXXXXX)
USER_NAME=rexecbench
PIDS=()
cleanup() {
  set +e
  [ -S "$W/cm" ] && ssh -F "$W/ssh_config" -o ControlPath="$W/cm" -O exit lab 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$W/sshd.pid" ] && kill "$(cat "$W/sshd.pid")" 2>/dev/null
  id "$USER_NAME" >/dev/null 2>&1 && userdel "$USER_NAME" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
for t in hyperfine /usr/sbin/sshd ssh python3; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
[ -x "$BIN/rexec" ] && [ -x "$BIN/rexec-full" ] && [ -x "$BIN/rexec_server" ] && [ -x "$BIN/rexec_mux" ] || { echo "build first: cargo build --release -p tools --bin rexec --bin rexec-full --bin rexec_server --bin rexec_mux (BIN=$BIN)" >&2; exit 1; }
STATIC=$(dirname "$BIN")/$(rustc --print host-tuple 2>/dev/null || echo none)/release/rexec
MUSL=$(dirname "$BIN")/$(uname -m)-unknown-linux-musl/release/rexec
if [ -z "${REXEC:-}" ]; then
  if [ -x "$MUSL" ]; then REXEC=$MUSL; elif [ -x "$STATIC" ]; then REXEC=$STATIC; else REXEC=$BIN/rexec; fi
fi
[ -x "$REXEC" ] || { echo "REXEC=$REXEC is not executable" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# rexec_server on TCP loopback and on a Unix socket (bench only: any binary allowed).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/psk"; chmod 600 "$W/psk"
RPORT=$(free_port)
CMD_NET_ADDR=tcp://127.0.0.1:$RPORT RUST_LOG=warn "$BIN/rexec_server" --key-file "$W/psk" --allow-any 2>"$W/rexec_server.log" & PIDS+=($!)
CMD_NET_ADDR=unix://$W/rexec.sock RUST_LOG=warn "$BIN/rexec_server" --key-file "$W/psk" --allow-any 2>>"$W/rexec_server.log" & PIDS+=($!)
export OFFLOAD_KEY_FILE=$W/psk
# Every row connects directly unless it names the mux (a mux of the machine's own is ignored).
export REXEC_CONTROL=none
# The mux: one session to the TCP server, its socket private under $W/mux.
MUX_SOCK=$W/mux/rexec.sock
CMD_NET_ADDR=tcp://127.0.0.1:$RPORT RUST_LOG=warn "$BIN/rexec_mux" --key-file "$W/psk" --control-path "$MUX_SOCK" 2>"$W/rexec_mux.log" & PIDS+=($!)
for i in $(seq 100); do [ -S "$MUX_SOCK" ] && break; sleep 0.05; done
for i in $(seq 100); do
  CMD_NET_ADDR=tcp://127.0.0.1:$RPORT "$REXEC" /bin/true 2>/dev/null && CMD_NET_ADDR=unix://$W/rexec.sock "$REXEC" /bin/true 2>/dev/null && break
  sleep 0.05
done

# Private sshd on 127.0.0.1, key auth, throw-away /bin/sh user.
SPORT=$(free_port)
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/host_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$W/id_ed25519"
id "$USER_NAME" >/dev/null 2>&1 || { useradd -r -M -d / -s /bin/sh "$USER_NAME"; usermod -p '*' "$USER_NAME"; }
mkdir -p "$W/auth"; chmod 755 "$W" "$W/auth"; cp "$W/id_ed25519.pub" "$W/auth/$USER_NAME"; chmod 644 "$W/auth/$USER_NAME"
cat > "$W/sshd_config" <<CFG
ListenAddress 127.0.0.1
Port $SPORT
HostKey $W/host_ed25519
PidFile $W/sshd.pid
AuthorizedKeysFile $W/auth/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
CFG
cat > "$W/ssh_config" <<CFG
Host lab
  HostName 127.0.0.1
  Port $SPORT
  User $USER_NAME
  IdentityFile $W/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
CFG
/usr/sbin/sshd -f "$W/sshd_config" -E "$W/sshd.log"
sleep 0.3
SSH="ssh -F $W/ssh_config"
$SSH -o ControlMaster=no -o ControlPath=none lab true
$SSH -o ControlMaster=yes -o ControlPath="$W/cm" -o ControlPersist=600 -N -f lab
$SSH -o ControlPath="$W/cm" -O check lab 2>/dev/null

summ() { python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))['results'][0]
print('| %-44s | %9.2f | %9.2f | %8.2f - %8.2f | %4d |' % (sys.argv[2], r['median']*1e3, r['mean']*1e3, r['min']*1e3, r['max']*1e3, len(r['times'])))
PY
}
hf() { local name=$1 runs=$2; shift 2; local f=$W/hf-$RANDOM.json
  hyperfine -N --warmup 3 --runs "$runs" --export-json "$f" "$@" >/dev/null 2>&1 || { echo "| $name | FAILED |"; return; }
  summ "$f" "$name"; }

linkage() { local libc=glibc; case "$1" in *-musl/*) libc=musl;; esac
  case "$(file -L "$1")" in *static-pie*) echo "$libc static-pie";; *statically*) echo "$libc static non-PIE";; *) echo "$libc dynamic";; esac; }
echo "# rexec benchmark $(date -u +%FT%TZ) on $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# rexec: $REXEC ($(linkage "$REXEC"))"
echo
echo "| case | median ms | mean ms | min - max ms | runs |"
echo "|---|---|---|---|---|"
# CMD_NET_ADDR is exported to hyperfine, not set through `env`: an `env` wrapper is one more
# program start (~1 ms here) that ssh's rows do not pay.
hf "local fork/exec /bin/true" "$RUNS" "/bin/true"
(export CMD_NET_ADDR=tcp://127.0.0.1:$RPORT
 hf "rexec /bin/true (TCP loopback)" "$RUNS" "$REXEC /bin/true"
 for other in "$STATIC" "$BIN/rexec"; do
   if [ -x "$other" ] && [ "$REXEC" != "$other" ]; then
     hf "rexec /bin/true (TCP, $(linkage "$other") build)" "$RUNS" "$other /bin/true"
   fi
 done)
(export CMD_NET_ADDR=unix://$W/rexec.sock
 hf "rexec /bin/true (Unix socket)" "$RUNS" "$REXEC /bin/true")
(export CMD_NET_ADDR=tcp://127.0.0.1:$RPORT REXEC_CONTROL=$MUX_SOCK
 hf "rexec /bin/true (via rexec_mux, TCP session)" "$RUNS" "$REXEC /bin/true")
hf "ssh true (ControlMaster reuse)" "$RUNS" "$SSH -o ControlMaster=no -o ControlPath=$W/cm lab true"
hf "ssh true (fresh connection)" 100 "$SSH -o ControlMaster=no -o ControlPath=none lab true"
echo
echo "| 1 GiB of stdout | median s | mean s | min - max s | runs |"
echo "|---|---|---|---|---|"
hfs() { local name=$1; shift; local f=$W/hf-$RANDOM.json
  hyperfine -N --warmup 1 --runs "$STREAM_RUNS" --export-json "$f" "$@" >/dev/null 2>&1 || { echo "| $name | FAILED |"; return; }
  python3 - "$f" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))['results'][0]
print('| %-44s | %7.2f (%5.0f MiB/s) | %7.2f | %6.2f - %6.2f | %d |' % (sys.argv[2], r['median'], 1024/r['median'], r['mean'], r['min'], r['max'], len(r['times'])))
PY
}
hfs "local head -c 1GiB /dev/zero" "head -c 1073741824 /dev/zero"
hfs "rexec head -c 1GiB /dev/zero (TCP loopback)" "$REXEC --addr tcp://127.0.0.1:$RPORT head -c 1073741824 /dev/zero"
if [ -x "$STATIC" ] && [ "$REXEC" != "$STATIC" ]; then
  hfs "rexec 1GiB (TCP, $(linkage "$STATIC") build)" "$STATIC --addr tcp://127.0.0.1:$RPORT head -c 1073741824 /dev/zero"
fi
(export REXEC_CONTROL=$MUX_SOCK
 hfs "rexec head -c 1GiB /dev/zero (via rexec_mux)" "$REXEC --addr tcp://127.0.0.1:$RPORT head -c 1073741824 /dev/zero")
hfs "ssh head -c 1GiB /dev/zero (ControlMaster)" "$SSH -o ControlMaster=no -o ControlPath=$W/cm lab head -c 1073741824 /dev/zero"
