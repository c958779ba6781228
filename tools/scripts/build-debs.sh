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
#   MUSL_REXEC=auto (default) | 1 | 0            # release: ship rexec and rexec-full as the static
#                                                # musl build (`cargo rexec-musl`, the build the
#                                                # exec benchmarks measure); auto = when the musl
#                                                # target is installed (else says so and ships glibc)
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

# rexec and rexec-full: the static musl build where wrapper scripts start rexec per operation
# (docs/BENCHMARKS.md, exec: a glibc start-up costs ~0.3 ms more on a VM). cargo-deb takes its
# assets from $BIN, so the musl executables stand in for the glibc ones while packaging and the
# glibc ones are put back afterwards (the cargo build stays as it was).
MUSL_REXEC=${MUSL_REXEC:-auto}
musl_dir=$TARGET/$(uname -m)-unknown-linux-musl/release
swapped=()
restore_rexec() {
  local b
  for b in "${swapped[@]}"; do mv -f "$BIN/.$b.glibc" "$BIN/$b"; done
  swapped=()
}
trap restore_rexec EXIT
if [ "$DIR" = release ] && [ "$MUSL_REXEC" != 0 ]; then
  if rustup target list --installed 2>/dev/null | grep -qx "$(uname -m)-unknown-linux-musl"; then
    echo "== cargo rexec-musl (rexec and rexec-full for offload-dpu)"
    cargo rexec-musl --locked
    for b in rexec rexec-full; do
      cp -f "$BIN/$b" "$BIN/.$b.glibc"
      swapped+=("$b")
      cp -f "$musl_dir/$b" "$BIN/$b"
    done
  elif [ "$MUSL_REXEC" = 1 ]; then
    echo "build-debs: MUSL_REXEC=1 but the target is missing: rustup target add $(uname -m)-unknown-linux-musl" >&2
    exit 1
  else
    echo "build-debs: no $(uname -m)-unknown-linux-musl target: offload-dpu ships the glibc rexec (slower start; rustup target add $(uname -m)-unknown-linux-musl)"
  fi
fi
echo "== man pages"
rm -rf "$BIN/man"
"$BIN/offload" gen-man "$BIN/man" >/dev/null
gzip -9nf "$BIN"/man/*.1

OUT=$TARGET/debian
mkdir -p "$OUT"
rm -f "$OUT"/offload-{common,host,dpu}_*.deb
for variant in "" host dpu; do
  # Stripped: the release profile keeps line tables (debug = 1) for local backtraces, and
  # cargo-deb keeps whatever the profile has unless told (the packages were ~10x their size).
  # Debug packages compress fast (CI throws them away).
  args=(deb -p tools --no-build --profile "$PROFILE" --output "$OUT" --strip)
  [ "$DIR" = debug ] && args+=(--fast)
  [ -n "$variant" ] && args+=(--variant "$variant")
  echo "== cargo ${args[*]}"
  cargo "${args[@]}"
done
restore_rexec
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
