#!/bin/bash
# A VM as the DPU: the qemu guest runs an unmodified containerd (and ctr) as the management plane,
# linked to this machine (the HOST) over real AF_VSOCK through rust-vmm's vhost-device-vsock
# (hybrid vsock: a guest connection to CID 2 port P arrives here on the Unix socket <uds>_P).
# The HOST's offloadd listens on that Unix socket, in a private mount namespace where /run and
# /var/lib are test directories (nothing of this machine's real containerd is touched); the real
# containerd-shim-runc-v2 and runc it launches for the guest run there too, so containers run on
# this machine. The guest half is tests/vm/guest/vmdpu.sh; the image is built by mkimage.sh.
# Checks: ctr image import, ctr run -d (the process is in this machine's process table, in the
# oevm cgroup, with the pid the DPU reports), ctr task exec (runs on the HOST kernel), task kill,
# and `ctr run --rm … sh -c 'echo hi; uname -r; exit 3'` (prints hi, the HOST kernel, returns 3)
# VMDPU_RM: auto (default) runs it when the DPU sees the bundle's shim `log` FIFO as a FIFO
# (FIFOs over qtfs; without them containerd's delete hangs) and prints a SKIPPED line
# otherwise; 1 always, 0 never.
# Image (VMDPU_IMAGE): bbox (default; one busybox layer, mkimage.sh) or multi (the e2e tests'
# multi-layer image from oe2e-images, plus a whiteout check inside the container; ~45 s more
# under emulation).
# Usage: tests/vm/vmdpu.sh   (after run.sh or a workspace build; env CARGO_TARGET_DIR /
#   OFFLOAD_BIN_DIR, VMDPU_TIMEOUT (whole run, default 300 s), VMDPU_PORT (default 7300))
# Prints "vmdpu: PASS/FAIL …" lines and "vmdpu: N passed, M failed"; exit 0 only if all passed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
C=$here/cache
B=${OFFLOAD_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}
PORT=${VMDPU_PORT:-7300}
NS=oevm
REAL=/usr/bin/containerd-shim-runc-v2
t0=$(date +%s)
skip() { echo "SKIPPED vmdpu: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (mount namespace, runc)"
for b in /usr/bin/containerd /usr/bin/ctr $REAL /usr/sbin/runc /usr/bin/busybox; do
  [ -x "$b" ] || skip "$b missing (apt-get install containerd runc busybox-static)"
done
for b in offloadd mount_qtfs offload-shim; do [ -x "$B/$b" ] || { echo "vmdpu: $B/$b missing (build first)"; exit 1; }; done
MC=${OFFLOAD_VM_CACHE:-/var/cache/offload-vm}
VH=$MC/vhost/bin/vhost-device-vsock
if [ ! -x "$VH" ]; then
  echo "vmdpu: installing vhost-device-vsock into $MC/vhost (once per machine, 1-4 min)"
  cargo install -q vhost-device-vsock --locked --root "$MC/vhost" || { echo "vmdpu: cargo install vhost-device-vsock failed"; exit 1; }
fi
[ -f "$C/kernel/vmlinux" ] && [ -f "$C/initramfs.gz" ] || "$here/setup.sh" || { echo "vmdpu: setup failed"; exit 1; }

RUN=$C/vd-run; rm -rf "$RUN"; mkdir -p "$RUN/w"
W=$RUN/w
D=$(mktemp -d /tmp/offload-vd.XXXXXX)   # short: Unix socket paths are limited to 108 bytes
H=$D/host                               # the HOST's /run and /var/lib for this test
TASKS=$H/run/containerd/io.containerd.runtime.v2.task/$NS
PIDS=()
HPID=
cleanup() {
  # What the HOST ran for the guest: container processes (the oevm cgroups, plus init.pid in
  # their bundle dirs), then every process in the HOST offloadd's private mount namespace (the
  # shims, offloadd itself; the namespace and the containers' rootfs mounts end with them),
  # then vhost-device-vsock and qemu, then the oevm cgroups and the temp dir.
  local p f mns
  for f in "$TASKS"/*/init.pid /sys/fs/cgroup/*/$NS/*/cgroup.procs; do
    [ -f "$f" ] && for p in $(cat "$f"); do kill -KILL "$p" 2>/dev/null; done
  done
  # (Only ever a namespace other than this script's own.)
  if [ -n "$HPID" ] && mns=$(readlink "/proc/$HPID/ns/mnt") && [ "$mns" != "$(readlink /proc/$$/ns/mnt)" ]; then
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mns" ] && [ "${p#/proc/}" != "$HPID" ] && kill -KILL "${p#/proc/}" 2>/dev/null
    done
    kill "$HPID" 2>/dev/null
  fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for f in /sys/fs/cgroup/*/$NS /sys/fs/cgroup/$NS; do
    [ -d "$f" ] && find "$f" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

mkdir -p "$H/run/containerd/io.containerd.runtime.v2.task" "$H/run/containerd/fifo" "$H/run/containerd/s" \
  "$H/var/lib/containerd"
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$D/psk"; chmod 600 "$D/psk"
cp "$D/psk" "$W/psk"; echo "$PORT" > "$W/port"; uname -r > "$W/host_kv"
echo "${VMDPU_RM:-auto}" > "$W/rm-mode"
if [ "${VMDPU_IMAGE:-bbox}" = multi ]; then
  # The e2e tests' multi-layer image (tests::images via oe2e-images): its unpack on the DPU
  # applies a whiteout and an opaque directory through qtfs; the guest checks both inside a
  # container.
  [ -x "$B/oe2e-images" ] || { echo "vmdpu: FAIL VMDPU_IMAGE=multi needs $B/oe2e-images"; exit 1; }
  line=$("$B/oe2e-images" --out "$W/img" --no-pause 2> "$RUN/mkimage.log" | awk '$2 == "oci"') \
    || { echo "vmdpu: FAIL image build"; cat "$RUN/mkimage.log"; exit 1; }
  read -r ref _ oci _ <<< "$line"
  mv "$oci" "$W/image.tar" && echo "$ref" > "$W/image.ref" && touch "$W/multi" && rm -rf "$W/img" \
    || { echo "vmdpu: FAIL image build: '$line'"; exit 1; }
else
  # One layer and only the applets the checks use (unpacking is the slow part under emulation).
  APPLETS="sh echo uname sleep cat ls true" "$here/mkimage.sh" "$W/image.tar" docker.io/library/oevm-bbox:1 \
    > "$RUN/mkimage.log" 2>&1 || { echo "vmdpu: FAIL image build"; cat "$RUN/mkimage.log"; exit 1; }
  echo docker.io/library/oevm-bbox:1 > "$W/image.ref"
fi
cat > "$D/host.toml" <<T
[fs]
exports = [
  { path = "/proc" },
  { path = "/sys" },
  { path = "/var/lib/containerd" },
  { path = "/run/containerd" },
]
[exec]
allow = ["$REAL"]
[bridge]
watch = ["/run/containerd/s"]
fifo_dirs = ["/run/containerd/fifo"]
T
# The HOST: offloadd on the hybrid-vsock socket for port $PORT, /run and /var/lib private.
unshare -m --propagation private sh -c "mount --bind '$H/run' /run && mount --bind '$H/var/lib' /var/lib && \
  exec env RUST_LOG=\${RUST_LOG:-info} '$B/offloadd' --listen 'unix://$D/vm5.vsock_$PORT' --key-file '$D/psk' --config '$D/host.toml'" \
  > "$RUN/host-offloadd.log" 2>&1 < /dev/null &
HPID=$!
for _ in $(seq 100); do grep -q listening "$RUN/host-offloadd.log" && break; kill -0 $HPID 2>/dev/null || break; sleep 0.1; done
grep -q listening "$RUN/host-offloadd.log" || { echo "vmdpu: FAIL HOST offloadd did not start"; cat "$RUN/host-offloadd.log"; exit 1; }
"$VH" --vm "guest-cid=5,socket=$D/vhost5.socket,uds-path=$D/vm5.vsock" > "$RUN/vhost-device-vsock.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$D/vhost5.socket" ] && break; sleep 0.1; done
[ -S "$D/vhost5.socket" ] || { echo "vmdpu: FAIL vhost-device-vsock did not start"; cat "$RUN/vhost-device-vsock.log"; exit 1; }
cat > "$RUN/guest.sh" <<G
#!/bin/sh
export OFFLOAD_BIN_DIR=$B
exec $here/guest/vmdpu.sh
G
chmod +x "$RUN/guest.sh"
MEM=2G
if [ "${VMDPU_NATIVE:-0}" = 1 ]; then
  # Debugging aid (seconds instead of minutes): the guest script on this machine in its own
  # mount+PID namespaces (/etc overlaid, a fresh /run), over the Unix socket instead of vsock.
  echo "vmdpu: VMDPU_NATIVE=1: the DPU script runs on this machine, link unix://$D/vm5.vsock_$PORT"
  mkdir -p "$D/etc-u" "$D/etc-w" "$D/dpu-root"
  timeout -k 5 "${VMDPU_TIMEOUT:-300}" unshare -m -p -f --mount-proc --propagation private sh -c \
    "mount -t overlay overlay -o lowerdir=/etc,upperdir='$D/etc-u',workdir='$D/etc-w' /etc && mount -t tmpfs dpu-run /run && \
     exec env VM_RESULTS='$RUN' OFFLOAD_BIN_DIR='$B' VMDPU_EP='unix://$D/vm5.vsock_$PORT' VMDPU_ROOT='$D/dpu-root' \
     '$here/guest/vmdpu.sh'" > "$RUN/serial.log" 2>&1 < /dev/null &
else
  echo "vmdpu: booting the DPU guest (HOST offloadd on $D/vm5.vsock_$PORT)"
  QEMU_EXTRA="-object memory-backend-memfd,id=mem,size=$MEM,share=on -machine memory-backend=mem \
    -chardev socket,id=vhv,path=$D/vhost5.socket -device vhost-user-vsock-pci,chardev=vhv" \
    APPEND_EXTRA="vmvsock=virtio" MEM=$MEM VM_TIMEOUT=${VMDPU_TIMEOUT:-300} VM_PATHS=$B \
    "$here/boot.sh" "$RUN/guest.sh" "$RUN/serial.log" "$RUN" "$repo" &
fi
QPID=$!; PIDS+=($QPID)

# While the guest's detached container runs: is it a process of this machine, in the oevm
# cgroup, and the pid the DPU's containerd reports (the HOST shim's init.pid)?
for _ in $(seq 3000); do [ -e "$W/running" ] && break; kill -0 $QPID 2>/dev/null || break; sleep 0.1; done
if [ -e "$W/running" ]; then
  read -r id pid < "$W/running"
  ipid=$(cat "$TASKS/$id/init.pid" 2>/dev/null)
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)
  cg=$(grep -m1 ":/$NS/$id\$" "/proc/$pid/cgroup" 2>/dev/null)
  if [ -n "$pid" ] && [ "$pid" = "$ipid" ] && [ "$cmd" = "sleep 600 " ] && [ -n "$cg" ]; then
    echo "ok: pid $pid runs '${cmd% }' on this machine in cgroup ${cg#*:}" > "$W/checked"
  else
    echo "fail: DPU pid '$pid', HOST init.pid '$ipid', cmdline '$cmd', cgroup '$cg'" > "$W/checked"
  fi
fi
wait $QPID; qrc=$?
pass=0; fail=0
# After `ctr run --rm` and the detached container's delete + rm, nothing of either may be
# left on the HOST: no bundle dir, no shim (nothing but offloadd in its mount namespace), no
# container cgroup.
if [ -e "$W/rm-done" ] && grep -aq '^VMDPU-END' "$RUN/serial.log"; then
  mns=$(readlink "/proc/$HPID/ns/mnt" 2>/dev/null)
  procs=
  if [ -n "$mns" ] && [ "$mns" != "$(readlink /proc/$$/ns/mnt)" ]; then
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mns" ] && [ "${p#/proc/}" != "$HPID" ] \
        && procs="$procs ${p#/proc/}:$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)"
    done
  fi
  bundles=$(ls "$TASKS" 2>/dev/null | tr '\n' ' ')
  cgs=$(find /sys/fs/cgroup/*/$NS -mindepth 1 -type d 2>/dev/null | tr '\n' ' ')
  if [ -z "$procs$bundles$cgs" ]; then
    echo "VMDPU-PASS HOST side after delete: no bundle dir, shim or container cgroup left" >> "$RUN/serial.log"
  else
    echo "VMDPU-FAIL HOST side after delete: processes '$procs' bundles '$bundles' cgroups '$cgs'" >> "$RUN/serial.log"
  fi
fi
while read -r line; do
  case $line in
    VMDPU-PASS*) echo "vmdpu: PASS ${line#VMDPU-PASS }"; pass=$((pass + 1));;
    VMDPU-FAIL*) echo "vmdpu: FAIL ${line#VMDPU-FAIL }"; fail=$((fail + 1));;
    VMDPU-SKIP*) echo "SKIPPED vmdpu: ${line#VMDPU-SKIP }";;
  esac
done < <(grep -a '^VMDPU-\(PASS\|FAIL\|SKIP\)' "$RUN/serial.log")
grep -aq '^VMDPU-END' "$RUN/serial.log" || { echo "vmdpu: FAIL the guest did not finish (qemu/boot rc=$qrc)"; fail=$((fail + 1)); }
if [ $fail -gt 0 ] || [ $qrc != 0 ]; then
  [ $fail -gt 0 ] || fail=1
  echo "--- guest serial log (tail)"; tail -n 60 "$RUN/serial.log"
  for f in "$W"/logs/containerd.log "$W"/logs/dpu-offloadd.log "$W"/logs/shim.log "$RUN/host-offloadd.log"; do
    [ -f "$f" ] && { echo "--- $f (tail)"; tail -n 25 "$f"; }
  done
fi
echo "vmdpu: $pass passed, $fail failed ($(( $(date +%s) - t0 ))s, logs in $RUN)"
[ $fail = 0 ]
