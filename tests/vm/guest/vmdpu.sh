#!/bin/sh
# Guest half of the VM-as-DPU test (driven by tests/vm/vmdpu.sh): the guest is the DPU. It builds
# the management plane's root /another_rootfs (seed layout: the DPU's own procfs at /local_proc,
# the HOST's /proc in proc mode and /sys over qtfs, containerd's root and runtime-v2 state over
# qtfs), all over AF_VSOCK to the machine (CID 2, through vhost-device-vsock), runs the DPU
# offloadd (bridge: stdio FIFOs, containerd.sock.ttrpc forward) and an unmodified containerd
# chrooted there with offload-shim as containerd-shim-runc-v2, and drives ctr. Every check prints
# one "VMDPU-PASS <what>" or "VMDPU-FAIL <what>: <detail>" console line; the HOST side
# (the machine) checks its own process table when this script writes $W/running and answers in
# $W/checked.
set -u
: "${VM_RESULTS:?}"
B=${OFFLOAD_BIN_DIR:?}
W=$VM_RESULTS/w
PORT=$(cat "$W/port")
EP=${VMDPU_EP:-vsock://2:$PORT}   # VMDPU_EP: another link for a run outside the VM
A=${VMDPU_ROOT:-/another_rootfs}
NS=oevm
IMG=$(cat "$W/image.ref")   # the image the machine built (tests/vm/vmdpu.sh)
HOST_KV=$(cat "$W/host_kv")
LOGS=$W/logs
mkdir -p "$LOGS"
fails=0
t0=$(date +%s)
pass() { echo "VMDPU-PASS $1 (t+$(($(date +%s) - t0))s)"; }
fail() { echo "VMDPU-FAIL $1: $2"; fails=$((fails + 1)); }
step() { echo "vmdpu: $* (t+$(($(date +%s) - t0))s)"; }
# Everything the management plane runs is chrooted like the seed's containerd.
dpu() { chroot "$A" env PATH=/opt/offload/shim:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
# ctr, bounded: SIGKILL, because ctr forwards SIGTERM to the container and keeps waiting.
ctrq() { timeout -s KILL 30 chroot "$A" ctr -n $NS "$@"; }
finish() {
  step "done, $fails failed"
  # A clean guest-side stop: containerd and the DPU offloadd end, the qtfs mounts go away.
  [ -n "${CPID:-}" ] && kill "$CPID" 2>/dev/null
  [ -n "${OPID:-}" ] && kill "$OPID" 2>/dev/null
  # (containerd may hang in shutdown: SIGKILL after 10 s. `wait` reaps it, kill -0 would not
  # tell an exited child from a running one.)
  if [ -n "${CPID:-}" ]; then
    (sleep 10; kill -KILL "$CPID" 2>/dev/null) & KPID=$!
    wait "$CPID" 2>/dev/null; kill "$KPID" 2>/dev/null
    step "containerd stopped"
  fi
  [ -n "${SOCKDIR:-}" ] && umount "$A$SOCKDIR"
  if [ "${SETUP:-}" = tool ]; then
    if "$B/offload" dpu teardown --config /etc/offload/dpu.toml > "$LOGS/teardown.log" 2>&1 \
      && ! grep -q " $A[/ ]" /proc/mounts; then pass "offload dpu teardown: nothing left mounted under $A"
    else fail "offload dpu teardown" "$(tail -3 "$LOGS/teardown.log"; grep " $A[/ ]" /proc/mounts | head -5)"; fi
  else
    for m in run/containerd/io.containerd.runtime.v2.task var/lib/containerd sys proc; do
      umount -l "$A/$m" 2>/dev/null
    done
  fi
  echo "VMDPU-END failed=$fails"
  exit $((fails > 0))
}

step "building $A"
mkdir -p /etc/offload /etc/containerd
cp "$W/psk" /etc/offload/psk && chmod 600 /etc/offload/psk
cat > /etc/offload/dpu.toml <<T
[qtfs]
addr = "$EP"
key_file = "/etc/offload/psk"
[bridge]
fifo_dirs = ["/run/containerd/fifo"]
[[bridge.forward]]
listen_side = "host"
path = "/run/containerd/containerd.sock.ttrpc"
[bridge.shim]
connect = "$EP"
key_file = "/etc/offload/psk"
T
if [ -x "$B/offload" ]; then
  # The deployment tool builds the root from [rootfs] (local_proc, binds, devtmpfs, qtfs /proc
  # in proc mode, /sys, the data directories, the shim); teardown undoes it at the end.
  SETUP=tool
  cat >> /etc/offload/dpu.toml <<T
[rootfs]
path = "$A"
binds = [{ src = "/usr", ro = true }, "/etc", "/run", "$B", "$W"]
qtfs = ["/var/lib/containerd", "/run/containerd/io.containerd.runtime.v2.task"]
qtfs_options = "log=$LOGS/qtfs.log"
T
  if "$B/offload" dpu setup --config /etc/offload/dpu.toml > "$LOGS/setup.log" 2>&1; then
    pass "offload dpu setup built $A ($(tail -1 "$LOGS/setup.log"))"
  else
    fail "offload dpu setup" "$(tail -5 "$LOGS/setup.log")"; finish
  fi
  mkdir -p "$A/run/containerd/fifo"
else
  # The same steps by hand (the seed's layout).
  SETUP=script
  mkdir -p "$A/usr" "$A/etc" "$A/proc" "$A/sys" "$A/dev" "$A/run" "$A/tmp" "$A/root" "$A/local_proc" \
    "$A/var/lib/containerd" "$A/var/log" "$A/opt/offload/shim" "$A$B" "$A$W"
  for l in bin sbin lib lib64; do ln -sfn "usr/$l" "$A/$l"; done
  ln -sfn ../run "$A/var/run"
  mount --bind /usr "$A/usr" && mount --bind /etc "$A/etc" && mount --bind /dev "$A/dev" \
    && mount --bind /tmp "$A/tmp" && mount -t tmpfs -o mode=755 dpu-run "$A/run" \
    && mount -t proc proc "$A/local_proc" && mount --bind "$B" "$A$B" && mount --bind "$W" "$A$W" \
    || { fail "DPU root" "a local mount failed"; finish; }
  mkdir -p "$A/run/containerd/io.containerd.runtime.v2.task" "$A/run/containerd/fifo"
  ln -sfn "$B/offload-shim" "$A/opt/offload/shim/containerd-shim-runc-v2"
  # HOST directories over qtfs (vsock to the machine). mount_qtfs backgrounds itself once mounted.
  qt() { # qt OPTS SRC DST
    timeout 60 "$B/mount_qtfs" "$2" "$A$3" -o "addr=$EP,keyfile=/etc/offload/psk,log=$LOGS/qtfs-$(echo "$3" | tr / _).log${1:+,$1}"
  }
  qt proc /proc /proc && qt sys /sys /sys && qt "" /var/lib/containerd /var/lib/containerd \
    && qt "" /run/containerd/io.containerd.runtime.v2.task /run/containerd/io.containerd.runtime.v2.task \
    || { fail "qtfs mounts over $EP" "mount_qtfs failed"; finish; }
fi
# A Unix-socket link (VMDPU_NATIVE=1 only) must be reachable from inside the root too.
case $EP in unix://*)
  SOCKDIR=$(dirname "${EP#unix://}"); mkdir -p "$A$SOCKDIR" && mount --bind "$SOCKDIR" "$A$SOCKDIR";;
esac
# proc mode: /proc is the HOST's (its kernel release), except the caller's own process:
# /proc/self/stat opened by a DPU shell names that shell's DPU pid.
h1=$(dpu cat /proc/sys/kernel/osrelease 2>&1)
s1=$(dpu sh -c 'read p _ < /proc/self/stat; echo "$p $$"' 2>&1)
if [ "$h1" = "$HOST_KV" ] && [ "${s1% *}" = "${s1#* }" ]; then pass "qtfs: /proc is the HOST's ($h1), /proc/self the caller's (pid ${s1#* })"
else fail "qtfs proc mode" "osrelease '$h1' (HOST '$HOST_KV'), /proc/self/stat pid and \$\$: '$s1'"; fi
# The guest mounts no cgroup file system: cgroup files under /sys/fs/cgroup are the HOST's.
if [ -n "$(ls "$A/sys/fs/cgroup/memory/memory.limit_in_bytes" "$A/sys/fs/cgroup/cgroup.controllers" 2>/dev/null)" ] \
  && [ "$(stat -f -c %T "$A/sys")" != sysfs ]; then pass "qtfs: /sys is the HOST's (its cgroup hierarchy is visible)"
else fail "qtfs sys mode" "$(stat -f -c %T "$A/sys") $(ls "$A/sys/fs/cgroup" 2>&1 | tr '\n' ' ')"; fi

cat > /etc/containerd/oevm.toml <<T
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/containerd/containerd.sock"
[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"
T
step "starting the DPU offloadd and containerd"
dpu env RUST_LOG=info "$B/offloadd" --connect "$EP" --key-file /etc/offload/psk --config /etc/offload/dpu.toml \
  > "$LOGS/dpu-offloadd.log" 2>&1 &
OPID=$!
i=0; until grep -q connected "$LOGS/dpu-offloadd.log" || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
grep -q connected "$LOGS/dpu-offloadd.log" || { fail "DPU offloadd" "did not connect: $(tail -5 "$LOGS/dpu-offloadd.log")"; finish; }
dpu env CMD_NET_ADDR="$EP" OFFLOAD_KEY_FILE=/etc/offload/psk OFFLOAD_SHIM_LOG="$LOGS/shim.log" \
  containerd --config /etc/containerd/oevm.toml > "$LOGS/containerd.log" 2>&1 &
CPID=$!
# (ctr itself takes seconds to start under emulation: wait for the socket first.)
i=0; until [ -S "$A/run/containerd/containerd.sock" ] || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
timeout -s KILL 60 chroot "$A" ctr version > /dev/null 2>&1 || { fail "containerd on the DPU" "not up: $(tail -5 "$LOGS/containerd.log")"; finish; }
pass "containerd up on the DPU (root and state over qtfs)"

out=$(timeout -s KILL 120 chroot "$A" ctr -n $NS image import "$W/image.tar" 2>&1); rc=$?
if [ $rc = 0 ] && ctrq image ls -q | grep -qx "$IMG"; then pass "ctr image import ($IMG)"
else fail "ctr image import" "rc=$rc $out"; finish; fi

# A detached container: its process must be in the HOST's process table (checked by the machine).
ID=oevm-d$$
out=$(timeout -s KILL 90 chroot "$A" ctr -n $NS run -d "$IMG" "$ID" sleep 600 2>&1); rc=$?
[ $rc = 0 ] || { fail "ctr run -d" "rc=$rc $out"; tail -20 "$LOGS/containerd.log"; finish; }
pid=$(ctrq task ls | awk -v id="$ID" '$1 == id && $3 == "RUNNING" {print $2}')
if [ -n "$pid" ]; then pass "ctr run -d: task $ID RUNNING, pid $pid"; else fail "ctr run -d" "$(ctrq task ls 2>&1)"; fi
# Does the DPU see the bundle's shim log FIFO as a FIFO (FIFOs over qtfs)? Without that,
# containerd's delete hangs on it: the --rm case runs only then (VMDPU_RM=auto).
logtype=$(stat -c %F "$A/run/containerd/io.containerd.runtime.v2.task/$NS/$ID/log" 2>&1)
echo "$ID $pid" > "$W/running"
i=0; until [ -e "$W/checked" ] || [ $i -ge 300 ]; do sleep 0.2; i=$((i + 1)); done
case $(cat "$W/checked" 2>/dev/null) in
  ok*) pass "HOST side: $(cat "$W/checked")";;
  *) fail "HOST side check" "$(cat "$W/checked" 2>/dev/null || echo 'no answer')";;
esac
out=$(timeout -s KILL 60 chroot "$A" ctr -n $NS task exec --exec-id x1 "$ID" sh -c 'echo exec-ok; uname -r' 2>&1); rc=$?
if [ $rc = 0 ] && [ "$out" = "exec-ok
$HOST_KV" ]; then pass "ctr task exec runs on the HOST (uname -r $HOST_KV)"
else fail "ctr task exec" "rc=$rc '$out' (HOST kernel $HOST_KV)"; fi
if [ -e "$W/multi" ]; then
  # The multi-layer image was unpacked through qtfs: the file layer 2 deleted is absent, the
  # directory it made opaque shows only its own entry, layers 2 and 3 are there (the same check
  # as tests::images::WHITEOUT_CHECK), inside the container, on the HOST.
  out=$(timeout -s KILL 60 chroot "$A" ctr -n $NS task exec --exec-id wh "$ID" sh -c \
    'test ! -e /etc/old.txt || echo old.txt present; ls -A /data; cat /etc/layer2.txt /etc/layer3.txt' 2>&1); rc=$?
  if [ $rc = 0 ] && [ "$out" = "new.txt
layer2
layer3" ]; then pass "image layers applied through qtfs (whiteout, opaque directory)"
  else fail "whiteout check in the container" "rc=$rc '$out'"; fi
fi
timeout -s KILL 30 chroot "$A" ctr -n $NS task kill -s KILL "$ID" > /dev/null 2>&1
i=0; st=
until [ "$st" = STOPPED ] || [ $i -ge 60 ]; do
  st=$(ctrq task ls | awk -v id="$ID" '$1 == id {print $3}'); sleep 0.5; i=$((i + 1))
done
[ "$st" = STOPPED ] && pass "ctr task kill -s KILL: STOPPED" || fail "ctr task kill" "status '$st'"

case $(cat "$W/rm-mode")/$logtype in
  1/*|auto/fifo) RM=1;;
  0/*) RM=0;;
  *) RM=0; echo "VMDPU-SKIP ctr run --rm, task delete, container rm: the bundle's log FIFO is a '$logtype' on the DPU (no FIFOs over qtfs in this tree; containerd's delete would hang)";;
esac
if [ $RM = 1 ]; then
  touch "$W/rm-done"
  # The whole life of a container: output, exit code, delete (needs the shim log FIFO over qtfs).
  t1=$(date +%s)
  out=$(timeout -s KILL 60 chroot "$A" ctr -n $NS run --rm "$IMG" oevm-rm$$ sh -c 'echo hi; uname -r; exit 3' 2>&1); rc=$?
  dt=$(($(date +%s) - t1))
  if [ $rc = 3 ] && [ "$out" = "hi
$HOST_KV" ]; then pass "ctr run --rm: printed hi, ran on the HOST ($HOST_KV), returned 3 in ${dt}s"
  else fail "ctr run --rm" "rc=$rc (want 3) after ${dt}s, output '$out' (want hi + $HOST_KV)"; fi
  out=$(timeout -s KILL 30 chroot "$A" ctr -n $NS task delete "$ID" 2>&1); rc=$?
  [ $rc = 0 ] && pass "ctr task delete $ID" || fail "ctr task delete" "rc=$rc $out"
  out=$(timeout -s KILL 30 chroot "$A" ctr -n $NS container rm "$ID" 2>&1); rc=$?
  [ $rc = 0 ] && pass "ctr container rm $ID" || fail "ctr container rm" "rc=$rc $out"
  left=$(ctrq container ls -q)
  [ -z "$left" ] && pass "no containers left on the DPU" || fail "containers left" "$left"
fi
finish
