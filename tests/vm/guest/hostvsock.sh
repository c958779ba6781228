#!/bin/sh
# Guest half of the host<->guest vsock test (driven by tests/vm/hostvsock.sh): the guest plays
# the HOST role over real AF_VSOCK through a vhost-user-vsock device. It serves an fs export and
# exec with offloadd on vsock port 7000 (exec through rexec_server on 7001 if this offloadd has
# no [exec] section), announces readiness on the console, and waits for the machine's side to
# finish (a "done" file in the shared results dir).
set -u
: "${VM_RESULTS:?}"
B=${OFFLOAD_BIN_DIR:?}
W=$VM_RESULTS/hv
mkdir -p /srv/export
echo "exported from the guest" > /srv/export/hello.txt
uname -r > /srv/export/kernel.txt
cp "$W/psk" /root/psk && chmod 600 /root/psk
cat > /root/host.toml <<T
[fs]
exports = [{ path = "/srv/export" }]
[exec]
allow_any = true
T
"$B/offloadd" --listen vsock://any:7000 --key-file /root/psk --config /root/host.toml > /tmp/offloadd.log 2>&1 &
sleep 3
if kill -0 $! 2>/dev/null; then
  echo 7000 > "$W/exec_port"
else
  echo "offloadd rejected [exec] (not wired yet): fs via offloadd, exec via rexec_server"
  cat /tmp/offloadd.log
  printf '[fs]\nexports = [{ path = "/srv/export" }]\n' > /root/host.toml
  "$B/offloadd" --listen vsock://any:7000 --key-file /root/psk --config /root/host.toml > /tmp/offloadd.log 2>&1 &
  "$B/rexec_server" --listen vsock://any:7001 --key-file /root/psk --allow-any > /tmp/rexec_server.log 2>&1 &
  echo 7001 > "$W/exec_port"
fi
i=0; until grep -q listening /tmp/offloadd.log || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/offloadd.log
echo "GUEST-LISTENING cid=$(cat /sys/class/vsock/vsock/local_cid 2>/dev/null || echo ?)"
i=0; until [ -e "$W/done" ] || [ $i -ge 1800 ]; do sleep 0.2; i=$((i+1)); done
echo "--- guest offloadd log"; cat /tmp/offloadd.log; cat /tmp/rexec_server.log 2>/dev/null
exit 0
