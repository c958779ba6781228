#!/bin/bash
# PID 1 of a separated DPU (started by tests/src/e2e.rs as `unshare -m -p -n -u -i -f`): own
# mount, PID, network, UTS and IPC namespaces. Builds the DPU machine's root in $R (prepared by
# the harness: a copy of /etc, the binaries in opt/offload/bin), pivot_roots into it with the
# old root detached, brings up its veth end ($VETH, $DIP/30), prints DPU-READY and stays as init
# (reaping orphans). `offload dpu setup`, offloadd and containerd are started by the harness
# through nsenter (the DPU offloadd redials until the HOST answers). Env: R, VETH, DIP, HIP.
PS4='+ $(date +%s.%N) '
set -eux
hostname dpu
mount --make-rprivate /
mount --bind "$R" "$R"
mkdir -p "$R"/{usr,etc,proc,sys,dev,run,tmp,root,oldroot,var/lib,var/log,opt/offload/bin,another_rootfs}
# /sbin is the DPU's own directory (the seed installs /sbin/mount.qtfs; /usr is read-only)
for l in bin lib lib64; do ln -sfn "usr/$l" "$R/$l"; done
mkdir -p "$R/sbin"
ln -sfn ../run "$R/var/run"
mount --bind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
mount -t tmpfs -o mode=755 dpu-run "$R/run"
mount -t tmpfs -o mode=1777 dpu-tmp "$R/tmp"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t devtmpfs devtmpfs "$R/dev"
cd "$R"
pivot_root . oldroot
umount -l /oldroot
cd /
export PATH=/opt/offload/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for i in $(seq 100); do ip link show "$VETH" >/dev/null 2>&1 && break; sleep 0.05; done
ip link set lo up
ip addr add "$DIP/30" dev "$VETH"
ip link set "$VETH" up
echo DPU-READY
set +x
while :; do sleep 3600 & wait $! || true; done
