#!/bin/bash
# Builds a one-layer busybox-static OCI image tarball (oci-layout + index.json + blobs), loadable
# with `ctr image import`, without a registry and without python: the VM-as-DPU test imports it
# on the guest's containerd. Deterministic (sorted entries, mtime 0, gzip -n).
# Usage: tests/vm/mkimage.sh OUT.tar [REF]   (REF default docker.io/library/oevm-bbox:1; env APPLETS)
set -euo pipefail
OUT=$1
REF=${2:-docker.io/library/oevm-bbox:1}
BB=${BUSYBOX:-/usr/bin/busybox}
[ -x "$BB" ] || { echo "mkimage: $BB missing (apt-get install busybox-static)" >&2; exit 1; }
# A dynamically linked busybox would need the HOST's libc inside the container.
file -L "$BB" | grep -q 'statically linked' || { echo "mkimage: $BB is not static (busybox-static)" >&2; exit 1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=$W/rootfs
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,root,usr/bin,usr/sbin}
cp "$BB" "$R/bin/busybox"
# APPLETS: the commands linked in /bin (default: all of busybox's; fewer = a faster unpack
# where every file system operation is expensive, e.g. over qtfs in an emulated guest).
for a in ${APPLETS:-$("$BB" --list)}; do
  [ "$a" = busybox ] || [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=pax \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$R" -cf "$W/layer.tar" .
diffid=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
gzip -n -c "$W/layer.tar" > "$W/layer.tgz"
mkdir -p "$W/img/blobs/sha256"
blob() { # blob FILE -> prints "digest size", stores the blob
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1); s=$(stat -c %s "$1")
  cp "$1" "$W/img/blobs/sha256/$d"; echo "$d $s"
}
read -r ldig lsize < <(blob "$W/layer.tgz")
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$diffid"'"]},"created":"2024-01-01T00:00:00Z"}' > "$W/config.json"
read -r cdig csize < <(blob "$W/config.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$cdig"'","size":'"$csize"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$ldig"'","size":'"$lsize"'}]}' > "$W/manifest.json"
read -r mdig msize < <(blob "$W/manifest.json")
printf '%s' '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$mdig"'","size":'"$msize"',"annotations":{"io.containerd.image.name":"'"$REF"'","org.opencontainers.image.ref.name":"'"${REF##*:}"'"}}]}' > "$W/img/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$W/img/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$W/img" -cf "$OUT" oci-layout index.json blobs
echo "mkimage: $OUT ($REF, manifest sha256:$mdig, layer $lsize bytes)"
