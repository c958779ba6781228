#!/bin/sh
# Runs inside the test VM (chrooted into the host's /, as root, cwd = repo root): every test
# executable named in $VM_RESULTS/plan, once per link kind, with its output in
# $VM_RESULTS/<suite>.<link>.log and one "VM-SUITE ..." summary line per run on the console.
# Plan lines: "<suite> <links,comma-separated or -> <executable>".
set -u
: "${VM_RESULTS:?}"
T=${VM_SUITE_TIMEOUT:-150}
BUDGET=${VM_BUDGET:-540}
START=$(date +%s)
# Tests sized for native speed (tens of MiB) are skipped in the emulated guest; they run over
# tcp/unix on the machine itself. VM_SKIP: space-separated name substrings (libtest --skip).
SKIP=""
for s in ${VM_SKIP-64mib large_payloads}; do SKIP="$SKIP --skip $s"; done
fails=0
while read -r name links exe; do
  [ -n "$name" ] || continue
  for link in $(echo "$links" | tr , ' '); do
    log=$VM_RESULTS/$name.$link.log
    t0=$(date +%s)
    left=$((BUDGET - (t0 - START)))
    if [ $left -lt 10 ]; then
      echo "VM-SUITE $name $link rc=125 0s skipped=0 | test result: FAILED. 0 passed; 1 failed; (not run: VM_BUDGET=${BUDGET}s used up)"
      fails=$((fails + 1)); continue
    fi
    [ $left -lt "$T" ] && t=$left || t=$T
    if [ "$link" = "-" ]; then
      # The VM tier's own tests print figures (e.g. RDMA-CPU-COST) the host collects.
      timeout -k 5 "$t" "$exe" --nocapture $SKIP > "$log" 2>&1; rc=$?
    else
      OFFLOAD_TEST_LINKS=$link timeout -k 5 "$t" "$exe" $SKIP > "$log" 2>&1; rc=$?
    fi
    t1=$(date +%s)
    res=$(grep -a '^test result:' "$log" | tail -1)
    [ -n "$res" ] || res="test result: FAILED. 0 passed; 1 failed; (no summary: rc=$rc$([ $rc = 124 ] && echo ', timed out after '"$t"'s'))"
    skipped=$(grep -ac '^SKIPPED ' "$log")
    grep -a '^RDMA-CPU-COST' "$log"
    echo "VM-SUITE $name $link rc=$rc $((t1 - t0))s skipped=$skipped | $res"
    [ "$rc" = 0 ] || fails=$((fails + 1))
  done
done < "$VM_RESULTS/plan"
exit $((fails > 0))
