#!/bin/bash
# Boot the test VM (TCG software emulation; /dev/kvm here is kvm_pvm and cannot run a stock kernel)
# and run SCRIPT (an absolute host path) inside it as root, chrooted into the host's / (9p,
# read-only, tmpfs overlay). Serial console -> LOG. RESULTS (host dir) is mounted writable in the
# guest at the same path. Exit status: the script's, 98 if the guest never reported one.
# Usage: boot.sh SCRIPT LOG RESULTS [CWD]
# Env: SMP=2 MEM=2G VM_TIMEOUT=540 QEMU_EXTRA= (more qemu args) APPEND_EXTRA= (more kernel args)
#      TMPDISK=img (a raw ext4 image to use as the guest's /tmp; default tmpfs)
#      VM_PATHS=dir:dir (more host directories the guest must see at their host paths)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
C=$here/cache
S=$1; LOG=$2; RES=$3; CWD=${4:-$(pwd)}
mkdir -p "$RES"
# Host paths the guest must see where they are on the host, even below /tmp or /run (which the
# guest mounts afresh): the working directory, the script's directory and $VM_PATHS
# (colon-separated, e.g. the cargo target dir). Paths must not contain spaces or colons.
SHOW=$CWD:$(dirname "$S")${VM_PATHS:+:$VM_PATHS}
APPEND="console=ttyS0 panic=-1 quiet vmscript=$S vmcwd=$CWD vmresults=$RES vmpaths=$SHOW ${APPEND_EXTRA:-}"
# shellcheck disable=SC2086
timeout --kill-after=5 "${VM_TIMEOUT:-540}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
  -smp "${SMP:-2}" -m "${MEM:-2G}" -display none -no-reboot -nic none -serial stdio -monitor none \
  -kernel "$C/kernel/vmlinux" -initrd "$C/initramfs.gz" -append "$APPEND" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$RES,mount_tag=results,security_model=none,multidevs=remap" \
  ${TMPDISK:+-drive file=$TMPDISK,format=raw,if=virtio,cache=unsafe} ${QEMU_EXTRA:-} </dev/null > "$LOG" 2>&1
qrc=$?
rc=$(sed -n 's/^VM-EXIT rc=\([0-9]*\).*/\1/p' "$LOG" | tail -1)
if [ -z "$rc" ]; then
  echo "vm: the guest did not finish (qemu rc=$qrc); serial log $LOG:" >&2
  tail -n 80 "$LOG" >&2
  exit 98
fi
exit "$rc"
