#!/bin/bash
# Idempotent setup for the VM test tier; everything lands in tests/vm/cache/ (gitignored).
#   1. Debian packages (qemu, busybox, rdma-core userland + dev headers for rdma-sys)
#   2. the Debian 6.1 generic kernel package (kept in /var/cache/offload-vm, shared by every
#      clone on the machine), fetched with `apt-get download` and extracted
#      with `dpkg -x` (never installed), depmod'ed, and its uncompressed ELF vmlinux (PVH entry:
#      booting it skips the XZ decompressor, ~3.6 s under TCG)
#   3. a small initramfs: busybox + kmod + the module subset the guest needs. Everything else
#      (test binaries, iproute2, libibverbs providers) comes from the host's / over 9p.
# Env: KPKG=linux-image-6.1.0-NN-amd64 to pin the kernel (default: what linux-image-amd64 depends on).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
C=$here/cache
mkdir -p "$C"
export DEBIAN_FRONTEND=noninteractive

# Packages. rdma-core/ibverbs-providers provide librxe + /etc/libibverbs.d for the guest (via 9p);
# libibverbs-dev librdmacm-dev libclang-dev pkg-config are for building rdma-sys (bindgen).
PKGS="qemu-system-x86 busybox-static kmod cpio xz-utils file iproute2 e2fsprogs rdma-core ibverbs-providers
      ibverbs-utils rdmacm-utils libibverbs-dev librdmacm-dev libclang-dev pkg-config"
need=()
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "vm setup: installing ${need[*]}"
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Kernel.
KPKG=${KPKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6/{print $2; exit}')}
if [ -z "$KPKG" ]; then apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{print $2; exit}'); fi
[ -n "$KPKG" ] || { echo "vm setup: cannot determine the Debian kernel package (set KPKG)" >&2; exit 1; }
KV=${KPKG#linux-image-}
# The extracted kernel (≈ 450 MB) is kept per machine, outside the work tree, so fresh clones on
# the same machine (CI) reuse it. OFFLOAD_VM_CACHE overrides the place.
MC=${OFFLOAD_VM_CACHE:-/var/cache/offload-vm}
mkdir -p "$MC"
K=$MC/kernel-$KV
if [ ! -f "$K/.done" ]; then
  echo "vm setup: fetching $KPKG"
  rm -rf "$K.tmp"; mkdir -p "$K.tmp/debs"
  (cd "$K.tmp/debs" && apt-get download "$KPKG" >/dev/null)
  dpkg -x "$K.tmp"/debs/"${KPKG}"_*.deb "$K.tmp"
  rm -rf "$K.tmp/debs"
  /usr/sbin/depmod -b "$K.tmp" "$KV"
  # bzImage -> ELF vmlinux: find the XZ stream and decompress it (trailing data makes xz complain).
  vz=$K.tmp/boot/vmlinuz-$KV
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vz" | head -1 | cut -d: -f1)
  tail -c +$((off + 1)) "$vz" | xz -dc 2>/dev/null > "$K.tmp/vmlinux" || true
  file "$K.tmp/vmlinux" | grep -q 'ELF 64-bit' || { echo "vm setup: vmlinux extraction failed" >&2; exit 1; }
  touch "$K.tmp/.done"
  rm -rf "$K"; mv "$K.tmp" "$K"
fi
# Older layout kept the kernel inside the work tree.
[ -L "$C/kernel" ] || rm -rf "$C/kernel"
ln -sfn "$K" "$C/kernel"
echo "$KV" > "$C/kv"

# Initramfs (rebuilt when the init script or this script changes).
stamp=$(cat "$here/guest/init" "$0" | sha256sum | cut -c1-16)-$KV
if [ ! -f "$C/initramfs.gz" ] || [ "$(cat "$C/initramfs.stamp" 2>/dev/null)" != "$stamp" ]; then
  R=$(mktemp -d); trap 'rm -rf "$R"' EXIT
  mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,etc,run,mnt,newroot,lower,ovl,usr/bin,usr/sbin,lib64,lib/modules/$KV}
  cp /bin/busybox "$R/bin/busybox"
  for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
  # kmod (real modprobe, so the kernel's request_module() for crc32 etc. works) + its libraries.
  copy_with_libs() {
    local f=$1; mkdir -p "$R$(dirname "$f")"; cp -L "$f" "$R$f"
    ldd "$f" | awk '/=>/ && $3 ~ /^\// {print $3}' | while read -r l; do
      mkdir -p "$R$(dirname "$l")"; [ -e "$R$l" ] || cp -L "$l" "$R$l"; done
  }
  copy_with_libs /usr/bin/kmod
  cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
  [ -e "$R/lib" ] || true
  for t in modprobe insmod lsmod; do ln -sf ../../usr/bin/kmod "$R/usr/sbin/$t"; done
  M=$K/lib/modules/$KV
  # loop, dm_mod, dm_flakey: a failing HOST disk for tests/tests/faults_eio.rs.
  MODS="virtio_pci 9pnet_virtio 9p overlay fuse veth vsock_loopback vmw_vsock_virtio_transport rdma_rxe ib_uverbs rdma_ucm virtio_blk ext4 loop dm_mod dm_flakey"
  for m in $MODS; do
    /usr/sbin/modprobe -d "$K" -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}' | while read -r p; do
      rel=${p#*/lib/modules/$KV/}; mkdir -p "$R/lib/modules/$KV/$(dirname "$rel")"; cp -n "$p" "$R/lib/modules/$KV/$rel"
    done
  done
  # rxe allocates the crc32 shash at runtime: ship the crypto modules so request_module() finds them.
  for d in crypto arch/x86/crypto lib; do
    [ -d "$M/kernel/$d" ] && { mkdir -p "$R/lib/modules/$KV/kernel/$d"; cp -rn "$M/kernel/$d/." "$R/lib/modules/$KV/kernel/$d/"; }
  done
  cp "$M"/modules.{builtin,builtin.modinfo,order} "$R/lib/modules/$KV/"
  /usr/sbin/depmod -b "$R" "$KV"
  echo "$KV" > "$R/etc/kv"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"; echo 'root:x:0:' > "$R/etc/group"
  cp "$here/guest/init" "$R/init"; chmod +x "$R/init"
  (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$C/initramfs.gz.tmp"
  mv "$C/initramfs.gz.tmp" "$C/initramfs.gz"
  echo "$stamp" > "$C/initramfs.stamp"
  echo "vm setup: initramfs $(du -h "$C/initramfs.gz" | cut -f1), kernel $KV"
fi
