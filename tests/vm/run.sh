#!/bin/bash
# The VM test tier: builds the workspace (with RDMA) on this machine, boots a TCG-emulated guest
# (Debian 6.1 kernel, this machine's / shared read-only over 9p, vsock_loopback, soft-RoCE
# rxe0/rxe1 over a veth pair) and runs the transport, fs, exec and bridge test executables inside
# it once over vsock and once over rdma, plus the RDMA link's own tests (vm_*). Then (unless
# VM_HOSTVSOCK=0) the host<->guest vsock test through vhost-device-vsock (hostvsock.sh), and
# (unless VM_DPU=0) the VM-as-DPU test: containerd in the guest, containers here (vmdpu.sh).
# Prints one line per suite run and each run's cargo "test result:" line; exits non-zero if any
# suite failed or the guest did not boot (its serial log is shown).
#
# Usage: tests/vm/run.sh            Env: CARGO_TARGET_DIR (default <repo>/target)
#   VM_SUITES=regex   only test executables whose name matches (default ^(transport|fs|exec|bridge|vm)_)
#   VM_LINKS=vsock,rdma   link kinds for the link-agnostic suites
#   VM_SUITE_TIMEOUT=150  per suite run (seconds)   VM_HOSTVSOCK=0 skip the host<->guest test
#   VM_DPU=0 skip the VM-as-DPU containerd test   VMDPU_TIMEOUT=300 its limit (seconds)
#   VM_BUDGET=780  seconds for all guest suite runs; runs that do not fit are reported failed
#   VM_LAST="exec_table fs_posix fs_restart fs_workloads"  suites run last (minutes each under emulation)
#   VM_SKIP="64mib large_payloads hundred_concurrent"  test-name substrings skipped in the guest (sized for native speed)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
C=$here/cache
t0=$(date +%s)
"$here/setup.sh" || { echo "vm: setup failed" >&2; exit 1; }

cd "$repo"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
FEATURES=tools/rdma,tests/rdma
echo "vm: building workspace binaries and test executables (features $FEATURES)"
cargo build --locked --workspace --bins --features "$FEATURES" -q || { echo "vm: build failed" >&2; exit 1; }
# Same command line as the workspace test run (tests/run-all.sh), so nothing is rebuilt.
cargo test --locked --workspace --features "$FEATURES" --no-run --message-format=json -q > "$C/build.json" \
  || { echo "vm: test build failed" >&2; exit 1; }
BIN_DIR=$CARGO_TARGET_DIR/debug

RUN=$C/run; rm -rf "$RUN"; mkdir -p "$RUN"
# Default: the suites that fit the tier's 10-minute budget under TCG (measured: ~350 s of guest
# runs). fs_workloads (tar/diff of a source tree, minutes per link when emulated) and bridge_shim
# (needs containerd inside the guest) run on the machine over tcp/unix only;
# VM_SUITES='^(transport|fs|exec|bridge|vm)_' runs all.
PAT=${VM_SUITES:-'^(transport_.*|fs_escape|fs_pseudo|fs_posix|fs_restart|exec_.*|bridge_daemon|bridge_forward|vm_.*|faults_eio)$'}
LINKS=${VM_LINKS:-vsock,rdma}
grep '"kind":\["test"\]' "$C/build.json" | grep '"package_id":"[^"]*tests[#@ ]' \
  | sed -n 's/.*"target":{[^}]*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1 \2/p' \
  | sort -u | while read -r name exe; do
      [[ $name =~ $PAT ]] || continue
      # Order: the link's own tests, the transport, then the services (the time budget may
      # cut the tail; what was not run is reported as failed).
      # Suites known to take minutes under emulation (VM_LAST) go last.
      case " ${VM_LAST-exec_table fs_posix fs_restart fs_workloads} " in *" $name "*) echo "6 $name $LINKS $exe"; continue;; esac
      case $name in
        vm_*) echo "1 $name - $exe";; transport_*) echo "2 $name $LINKS $exe";;
        # A failing disk under the HOST export: what matters is the block layer, not the link.
        faults_eio) echo "5 $name ${LINKS%%,*} $exe";;
        bridge_*) echo "3 $name $LINKS $exe";; exec_*) echo "4 $name $LINKS $exe";; *) echo "5 $name $LINKS $exe";;
      esac
    done | sort -n -k1,1 -s | cut -d' ' -f2- > "$RUN/plan"
[ -s "$RUN/plan" ] || { echo "vm: no test executables matched $PAT" >&2; exit 1; }
echo "vm: skipped inside the guest (native-size payloads, they run on the machine over tcp/unix): ${VM_SKIP-64mib large_payloads hundred_concurrent}"
echo "vm: suites: $(awk '{print $1}' "$RUN/plan" | tr '\n' ' ')"
cat > "$RUN/guest.sh" <<G
#!/bin/sh
export OFFLOAD_BIN_DIR=$BIN_DIR VM_SUITE_TIMEOUT=${VM_SUITE_TIMEOUT:-150} VM_BUDGET=${VM_BUDGET:-780} RUST_BACKTRACE=1
export VM_SKIP="${VM_SKIP-64mib large_payloads hundred_concurrent}"
exec $here/guest/suites.sh
G
chmod +x "$RUN/guest.sh"
tb=$(date +%s)
echo "vm: booting the guest (setup+build took $((tb - t0))s)"
# Guest /tmp on a fresh sparse ext4 image (discarded after the run).
truncate -s 8G "$RUN/tmp.img" && mkfs.ext4 -q -F "$RUN/tmp.img" || { echo "vm: mkfs.ext4 failed" >&2; exit 1; }
TMPDISK=$RUN/tmp.img VM_TIMEOUT=${VM_TIMEOUT:-1500} VM_PATHS=$CARGO_TARGET_DIR "$here/boot.sh" "$RUN/guest.sh" "$RUN/serial.log" "$RUN" "$repo"
rc=$?
te=$(date +%s)
if [ $rc = 98 ] || [ $rc = 99 ]; then
  echo "vm: the guest failed to boot or set up; serial log:" >&2
  cat "$RUN/serial.log" >&2
  exit 1
fi
grep -a '^VM-' "$RUN/serial.log" | grep -av '^VM-SUITE'
grep -a '^RDMA-CPU-COST' "$RUN/serial.log"
pass=0; fail=0
while read -r line; do
  echo "$line"
  set -- $line
  name=$2; link=$3
  echo "${line#*| }"
  p=$(echo "$line" | sed -n 's/.* \([0-9]*\) passed.*/\1/p'); f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
  pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
  case $line in *"rc=0 "*|*"rc=125 "*) ;; *)
    echo "---- $name over $link: failures (full log: $RUN/$name.$link.log)"
    sed -n '/^failures:/,$p' "$RUN/$name.$link.log" | head -n 150
    [ -n "$(sed -n '/^failures:/p' "$RUN/$name.$link.log")" ] || tail -n 60 "$RUN/$name.$link.log";;
  esac
done < <(grep -a '^VM-SUITE' "$RUN/serial.log")
echo "vm: guest suites took $((te - tb))s"
rm -f "$RUN/tmp.img"
hrc=0
if [ "${VM_HOSTVSOCK:-1}" != 0 ] && [ -x "$here/hostvsock.sh" ]; then
  if "$here/hostvsock.sh"; then pass=$((pass + 1)); else hrc=1; fail=$((fail + 1)); fi
fi
# A VM as the DPU: containerd in the guest, containers on this machine, link over vsock.
if [ "${VM_DPU:-1}" != 0 ] && [ -x "$here/vmdpu.sh" ]; then
  if timeout -k 10 $(( ${VMDPU_TIMEOUT:-300} + 60 )) "$here/vmdpu.sh"; then pass=$((pass + 1)); else hrc=1; fail=$((fail + 1)); fi
fi
echo "vm tier total $(( $(date +%s) - t0 ))s"
[ $rc = 0 ] || [ $fail -gt 0 ] || fail=1
echo "vm: $pass passed, $fail failed"
[ $rc = 0 ] && [ $hrc = 0 ]
