#!/bin/bash
# Host<->guest test over real AF_VSOCK: the guest (HOST role) runs offloadd on AF_VSOCK port 7000
# through a vhost-user-vsock-pci device served on this machine by rust-vmm's vhost-device-vsock;
# this machine (DPU role) reaches it over the hybrid-vsock Unix socket (vsock-uds://PATH:PORT),
# mounts the guest's export with mount.qtfs and runs commands there with rexec.
# (This machine has no vhost_vsock, so a host-side AF_VSOCK socket to the guest is impossible.)
# Usage: tests/vm/hostvsock.sh   (after run.sh built everything; env CARGO_TARGET_DIR / OFFLOAD_BIN_DIR)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
C=$here/cache
B=${OFFLOAD_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}
# Built once per machine (outside the work tree, like the kernel; OFFLOAD_VM_CACHE overrides).
MC=${OFFLOAD_VM_CACHE:-/var/cache/offload-vm}
VH=$MC/vhost/bin/vhost-device-vsock
if [ ! -x "$VH" ]; then
  echo "hostvsock: installing vhost-device-vsock into $MC/vhost (once per machine, 1-4 min)"
  cargo install -q vhost-device-vsock --locked --root "$MC/vhost" || { echo "hostvsock: cargo install vhost-device-vsock failed"; exit 1; }
fi
for b in offloadd mount_qtfs rexec rexec_server; do [ -x "$B/$b" ] || { echo "hostvsock: $B/$b missing"; exit 1; }; done

RUN=$C/hv-run; rm -rf "$RUN"; mkdir -p "$RUN/hv"
D=$(mktemp -d /tmp/offload-hv.XXXXXX)   # short: Unix socket paths are limited to 108 bytes
PIDS=()
cleanup() {
  umount "$D/mnt" 2>/dev/null || umount -l "$D/mnt" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null; rm -rf "$D"
}
trap cleanup EXIT
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$D/psk"; chmod 600 "$D/psk"
cp "$D/psk" "$RUN/hv/psk"
"$VH" --vm "guest-cid=4,socket=$D/vhost4.socket,uds-path=$D/vm4.vsock" > "$RUN/vhost-device-vsock.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$D/vhost4.socket" ] && break; sleep 0.1; done
[ -S "$D/vhost4.socket" ] || { echo "hostvsock: vhost-device-vsock did not start"; cat "$RUN/vhost-device-vsock.log"; exit 1; }
cat > "$RUN/guest.sh" <<G
#!/bin/sh
export OFFLOAD_BIN_DIR=$B
exec $here/guest/hostvsock.sh
G
chmod +x "$RUN/guest.sh"
MEM=2G
QEMU_EXTRA="-object memory-backend-memfd,id=mem,size=$MEM,share=on -machine memory-backend=mem \
  -chardev socket,id=vhv,path=$D/vhost4.socket -device vhost-user-vsock-pci,chardev=vhv" \
  APPEND_EXTRA="vmvsock=virtio" MEM=$MEM VM_TIMEOUT=400 VM_PATHS=$B \
  "$here/boot.sh" "$RUN/guest.sh" "$RUN/serial.log" "$RUN" "$repo" &
QPID=$!; PIDS+=($QPID)
for _ in $(seq 1800); do
  grep -aq '^GUEST-LISTENING' "$RUN/serial.log" 2>/dev/null && break
  kill -0 $QPID 2>/dev/null || break; sleep 0.1
done
if ! grep -aq '^GUEST-LISTENING' "$RUN/serial.log"; then
  echo "hostvsock: guest never listened; serial log:"; cat "$RUN/serial.log"; exit 1
fi
EP=vsock-uds://$D/vm4.vsock
XP=$(cat "$RUN/hv/exec_port")
pass=0; fail=0
check() { # check NAME EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then echo "hostvsock: PASS $1"; pass=$((pass + 1))
  else echo "hostvsock: FAIL $1: expected '$2', got '$3'"; fail=$((fail + 1)); fi
}
mkdir -p "$D/mnt"
if timeout 60 "$B/mount_qtfs" /srv/export "$D/mnt" -o "addr=$EP:7000,keyfile=$D/psk,log=$RUN/mount.log"; then
  check "fs: read a guest file through the mount" "exported from the guest" "$(timeout 30 cat "$D/mnt/hello.txt" 2>&1)"
  echo "written on the machine" > "$D/mnt/from-machine.txt"
  check "fs: write through the mount, read back" "written on the machine" "$(timeout 30 cat "$D/mnt/from-machine.txt" 2>&1)"
else
  echo "hostvsock: FAIL fs: mount.qtfs over $EP:7000"; cat "$RUN/mount.log" 2>/dev/null; fail=$((fail + 1))
fi
GK=$(timeout 60 "$B/rexec" --addr "$EP:$XP" --key-file "$D/psk" uname -r 2>&1)
check "exec: rexec uname -r runs in the guest (its 6.1 kernel)" "$(cat "$C/kv")" "$GK"
check "exec: rexec sees the file written through the fs mount" "written on the machine" \
  "$(timeout 60 "$B/rexec" --addr "$EP:$XP" --key-file "$D/psk" cat /srv/export/from-machine.txt 2>&1)"
umount "$D/mnt" 2>/dev/null
touch "$RUN/hv/done"
wait $QPID; qrc=$?
[ $qrc = 0 ] || { echo "hostvsock: guest exited with $qrc"; tail -40 "$RUN/serial.log"; fail=$((fail + 1)); }
[ $fail = 0 ] || { echo "--- guest serial log"; tail -60 "$RUN/serial.log"; }
echo "hostvsock: $pass passed, $fail failed"
[ $fail = 0 ]
