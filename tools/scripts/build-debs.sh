#!/usr/bin/env bash
# Builds the Debian packages offload-common, offload-host and offload-dpu into
# ${CARGO_TARGET_DIR:-target}/debian/ (cargo-deb metadata in tools/Cargo.toml; contents in
# docs/OPERATIONS.md). Needs the build packages (.ci/deps build) and cargo-deb (installed with
# `cargo install cargo-deb --locked` when missing).
#
#   tools/scripts/build-debs.sh                  # release build (what you ship)
#   PROFILE=debug tools/scripts/build-debs.sh    # debug binaries, reusing the test build: what CI
#                                                # does, to keep its cost to packaging only
#   CHECK=1 tools/scripts/build-debs.sh          # then unpack each package into a scratch root
#                                                # (dpkg -x) and run every binary's --version
#   FEATURES=tools/rdma (default) | FEATURES=    # RDMA links (libibverbs at run time) or not
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release}
FEATURES=${FEATURES-tools/rdma}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
case "$PROFILE" in
  release) DIR=release; build=(cargo build --locked --release -p tools --bins) ;;
  # The test command's exact flags: the binaries it built are reused as they are.
  debug | dev) DIR=debug; PROFILE=dev; build=(cargo build --locked --workspace --bins) ;;
  *) echo "build-debs: PROFILE must be release or debug" >&2; exit 2 ;;
esac
if [ -n "$FEATURES" ]; then
  if [ "$DIR" = debug ]; then build+=(--features "$FEATURES,tests/rdma"); else build+=(--features "$FEATURES"); fi
fi

.ci/deps build
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-debs: installing cargo-deb"
  cargo install cargo-deb --locked --version 3.8.0   # the version these flags are known to work with
fi

echo "== ${build[*]}"
"${build[@]}"
BIN=$TARGET/$DIR
echo "== man pages"
rm -rf "$BIN/man"
"$BIN/offload" gen-man "$BIN/man" >/dev/null
gzip -9nf "$BIN"/man/*.1

OUT=$TARGET/debian
mkdir -p "$OUT"
rm -f "$OUT"/offload-{common,host,dpu}_*.deb
for variant in "" host dpu; do
  # Stripped (cargo-deb's default); debug packages compress fast (CI throws them away).
  args=(deb -p tools --no-build --profile "$PROFILE" --output "$OUT")
  [ "$DIR" = debug ] && args+=(--fast)
  [ -n "$variant" ] && args+=(--variant "$variant")
  echo "== cargo ${args[*]}"
  cargo "${args[@]}"
done
ls -l "$OUT"/offload-{common,host,dpu}_*.deb

if [ "${CHECK:-0}" = 1 ]; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  for deb in "$OUT"/offload-{common,host,dpu}_*.deb; do
    echo "== $(basename "$deb")"
    dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Depends\): /  \1: /p'
    dpkg -x "$deb" "$root"
  done
  # Every binary the packages install answers --version from the scratch root.
  for b in "$root"/usr/bin/* "$root"/sbin/*; do
    printf '  %-28s ' "${b#"$root"}"
    "$b" --version
  done
  for f in /lib/systemd/system/offloadd-host.service /lib/systemd/system/offloadd-dpu.service \
           /lib/systemd/system/offload-dpu-setup.service /lib/systemd/system/rexec-mux.service \
           /usr/share/man/man1/offloadd.1.gz \
           /usr/share/doc/offload-host/examples/host.toml /usr/share/doc/offload-dpu/examples/dpu.toml; do
    [ -f "$root$f" ] || { echo "build-debs: $f missing from the packages" >&2; exit 1; }
  done
  echo "build-debs: packages unpack and every binary runs"
fi
