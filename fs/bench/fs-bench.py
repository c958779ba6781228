#!/usr/bin/env python3
"""qtfs benchmark: local ext4 vs a qtfs mount over TCP loopback vs sshfs (FUSE over ssh to 127.0.0.1).

Starts everything it measures and stops it afterwards: a release offloadd exporting the
backing dir on 127.0.0.1:$QTFS_PORT with release mount_qtfs mounts, and (for the sshfs
targets) a private sshd on 127.0.0.1:$SSH_PORT with its own host and client keys under
$LAB/ssh. "cold" unmounts, drops caches and mounts again.

Workloads (each repeated N times, median reported; 'cold' = caches dropped and a fresh mount,
so neither the kernel nor the FUSE daemon has cached anything):
  write1g   dd if=/dev/zero of=big bs=1M count=1024 conv=fsync
  read1g    cold, dd if=big of=/dev/null bs=1M
  stat10k   os.stat() of 10,000 existing files by name (cold pass, then warm pass)
  ls10k     ls -l of a 10,000-entry directory (cold, then warm)
  untar     tar -xf of a ~51 MB / ~4,000-entry header tree (wall of tar; and tar+sync)
  notice    a change made on the HOST side (chmod of a file the mount has cached) until the
            mount shows it, 20 samples (qtfs targets and sshfs)
and the CPU seconds per GiB of the write and the read on the HOST side (offloadd; sshd and
its sftp) and on the DPU side (mount_qtfs; sshfs).
Usage: fs/bench/fs-bench.py [-n N] [targets...]
  targets: local qtfs qtfs-nofeed qtfs-wb qtfs-ttl20 sshfs sshfs-aes bindfs
Needs `cargo build --release -p tools --bin offloadd --bin mount_qtfs` (binaries from
$QTFS_BIN, default target/release), sshfs + openssh-server for the sshfs targets, bindfs for bindfs (a local FUSE passthrough:
what FUSE itself costs here, with no network and no HOST daemon).
"""
import os, sys, subprocess, time, json, statistics, shutil, argparse, atexit, signal

LAB = os.environ.get("LAB", "/tmp/ctrlab")
B = f"{LAB}/bench"
K = f"{LAB}/ssh"
SSH_PORT = os.environ.get("SSH_PORT", "2222")
SRC_TAR = f"{LAB}/src-tree.tar"
SSH_OPTS = (f"Port={SSH_PORT},IdentityFile={K}/id_ed25519,IdentitiesOnly=yes,"
            "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR,BatchMode=yes")
QTFS_BIN = os.environ.get("QTFS_BIN", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../target/release"))
QTFS_PORT = os.environ.get("QTFS_PORT", "7790")
QTFS_DIR = f"{B}/qtfs"
TARGETS = {
    # name: (backing dir, mount point or None, extra -o)
    "local":     (f"{B}/local", None, None),
    # the defaults: long cache lifetimes while the HOST pushes its changes
    "qtfs":      (f"{B}/export", f"{B}/mnt-qtfs", ""),
    # without the change feed: 1 s lifetimes (the defaults before the feed)
    "qtfs-nofeed": (f"{B}/export", f"{B}/mnt-qtfs-nofeed", ",coherent_ttl=0"),
    # kernel write-back caching (opt-in)
    "qtfs-wb":   (f"{B}/export", f"{B}/mnt-qtfs-wb", ",writeback_cache"),
    # without the feed, with sshfs's default cache lifetime (20 s)
    "qtfs-ttl20": (f"{B}/export", f"{B}/mnt-qtfs-ttl20", ",coherent_ttl=0,attr_timeout=20,entry_timeout=20"),
    "sshfs":     (f"{B}/export", f"{B}/mnt-sshfs", ""),
    # a local FUSE passthrough (libfuse, no network, no second daemon): the floor of any FUSE
    # design on this machine
    "bindfs":    (f"{B}/export", f"{B}/mnt-bindfs", ""),
    "sshfs-aes": (f"{B}/export", f"{B}/mnt-sshfs-aes", ",Ciphers=aes128-gcm@openssh.com,Compression=no"),
}
STARTED = {}   # name -> Popen or pid of what this run started

def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)

def drop():
    sh("sync; echo 3 > /proc/sys/vm/drop_caches")

def is_mounted(mnt):
    return subprocess.run(["mountpoint", "-q", mnt]).returncode == 0

def qtfs_server():
    """Starts (once) a release offloadd exporting the backing dir."""
    os.makedirs(QTFS_DIR, exist_ok=True)
    key = f"{QTFS_DIR}/psk"
    if not os.path.exists(key):
        with open(key, "w") as f:
            f.write(os.urandom(32).hex())
        os.chmod(key, 0o600)
    with open(f"{QTFS_DIR}/host.toml", "w") as f:
        f.write(f'[fs]\nexports = [{{ path = "{B}/export" }}]\n')
    if "offloadd" not in STARTED:
        STARTED["offloadd"] = subprocess.Popen(
            [f"{QTFS_BIN}/offloadd", "--listen", f"tcp://127.0.0.1:{QTFS_PORT}",
             "--key-file", key, "--config", f"{QTFS_DIR}/host.toml"],
            stdout=subprocess.DEVNULL, stderr=open(f"{QTFS_DIR}/offloadd.log", "a"))
        time.sleep(0.5)
    return key

def sshd():
    """Starts (once) a private sshd on 127.0.0.1:$SSH_PORT with its own keys."""
    if "sshd" in STARTED:
        return
    os.makedirs(K, mode=0o700, exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)
    for k in ("host_ed25519", "id_ed25519"):
        if not os.path.exists(f"{K}/{k}"):
            sh(f"ssh-keygen -q -t ed25519 -N '' -f {K}/{k}")
    os.makedirs(f"{K}-auth", exist_ok=True)
    os.chmod(f"{K}-auth", 0o755)
    shutil.copy(f"{K}/id_ed25519.pub", f"{K}-auth/root")
    with open(f"{K}/sshd_config", "w") as f:
        f.write(f"""ListenAddress 127.0.0.1
Port {SSH_PORT}
HostKey {K}/host_ed25519
PidFile {K}/sshd.pid
AuthorizedKeysFile {K}-auth/%u
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    STARTED["sshd"] = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", f"{K}/sshd_config"])
    time.sleep(0.5)

def stop_all():
    for t in TARGETS:
        try:
            umount(t)
        except Exception:
            pass
    for name, p in STARTED.items():
        p.terminate()
        try:
            p.wait(5)
        except Exception:
            p.kill()
    STARTED.clear()

def cpu_of(pids):
    """utime+stime seconds of these processes and their threads."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick

def sides(t):
    """(HOST pids, DPU pids) of a FUSE target."""
    _, mnt, _ = TARGETS[t]
    if mnt is None:
        return [], []
    pg = lambda pat: [int(p) for p in subprocess.run(["pgrep", "-f", pat], capture_output=True, text=True).stdout.split()]
    if t.startswith("qtfs"):
        host = [STARTED["offloadd"].pid] if "offloadd" in STARTED else []
        return host, pg(f"mount_qtfs .* {mnt}( |$)")
    if t == "bindfs":
        return [], pg(f"bindfs .* {mnt}( |$)")
    host = [int(p) for p in subprocess.run(["pgrep", "-P", str(STARTED["sshd"].pid)], capture_output=True, text=True).stdout.split()] if "sshd" in STARTED else []
    host += [c for p in list(host) for c in pg(f"sshd: .*") if c != STARTED["sshd"].pid]
    return sorted(set(host)), pg(f"sshfs .* {mnt}( |$)")

def umount(t):
    _, mnt, _ = TARGETS[t]
    if mnt and is_mounted(mnt):
        sh(f"umount {mnt}" if t.startswith("qtfs") or t == "bindfs" else f"fusermount3 -u {mnt}")

def mount(t):
    back, mnt, extra = TARGETS[t]
    if mnt is None:
        return
    os.makedirs(mnt, exist_ok=True)
    if not is_mounted(mnt):
        if t.startswith("qtfs"):
            key = qtfs_server()
            sh(f"{QTFS_BIN}/mount_qtfs {back} {mnt} -o addr=tcp://127.0.0.1:{QTFS_PORT},keyfile={key}{extra}")
        elif t == "bindfs":
            sh(f"bindfs {back} {mnt}")
        else:
            sshd()
            sh(f"sshfs -o {SSH_OPTS}{extra} root@127.0.0.1:{back} {mnt}")

def cold(t):
    umount(t); drop(); mount(t)

def path(t):
    back, mnt, _ = TARGETS[t]
    return mnt or back

def timed(cmd):
    t0 = time.monotonic(); sh(cmd); return time.monotonic() - t0

def prepare(t):
    back = TARGETS[t][0]
    os.makedirs(f"{back}/files10k", exist_ok=True)
    if len(os.listdir(f"{back}/files10k")) != 10000:
        for i in range(10000):
            with open(f"{back}/files10k/f{i:05d}", "w") as f:
                f.write("x" * 100)
    if not os.path.exists(SRC_TAR):
        sh(f"tar -C /usr/include -cf {SRC_TAR} llvm-14 c++ linux x86_64-linux-gnu unicode")

def stat_loop(d):
    names = [f"{d}/f{i:05d}" for i in range(10000)]
    t0 = time.monotonic()
    for n in names:
        os.stat(n)
    return time.monotonic() - t0

def notice(t, samples=20):
    """Median ms from a HOST-side chmod of a file the mount has cached to the mount showing it."""
    back = TARGETS[t][0]
    f = "notice-probe"
    open(f"{back}/{f}", "w").close()
    mp = f"{path(t)}/{f}"
    took = []
    for i in range(samples):
        want = 0o600 if i % 2 == 0 else 0o644
        os.stat(mp)          # cached now
        time.sleep(0.05)
        t0 = time.monotonic()
        os.chmod(f"{back}/{f}", want)
        while os.stat(mp).st_mode & 0o777 != want:
            if time.monotonic() - t0 > 30:
                break
            time.sleep(0.0005)
        took.append((time.monotonic() - t0) * 1000)
    os.unlink(f"{back}/{f}")
    return statistics.median(took)

def run(t, n):
    back = TARGETS[t][0]
    prepare(t)
    r = {k: [] for k in ["write1g_s", "read1g_s", "stat10k_cold_s", "stat10k_warm_s",
                         "ls10k_cold_s", "ls10k_warm_s", "untar_s", "untar_sync_s",
                         "write_cpu_host", "write_cpu_dpu", "read_cpu_host", "read_cpu_dpu",
                         "notice_ms"]}
    for i in range(n):
        cold(t)
        if os.path.exists(f"{back}/big"):
            os.unlink(f"{back}/big")
        h, d = sides(t)
        c0 = (cpu_of(h), cpu_of(d))
        r["write1g_s"].append(timed(f"dd if=/dev/zero of={path(t)}/big bs=1M count=1024 conv=fsync status=none"))
        r["write_cpu_host"].append(cpu_of(h) - c0[0]); r["write_cpu_dpu"].append(cpu_of(d) - c0[1])
        cold(t)
        h, d = sides(t)
        c0 = (cpu_of(h), cpu_of(d))
        r["read1g_s"].append(timed(f"dd if={path(t)}/big of=/dev/null bs=1M status=none"))
        r["read_cpu_host"].append(cpu_of(h) - c0[0]); r["read_cpu_dpu"].append(cpu_of(d) - c0[1])
        if TARGETS[t][1] is not None:
            r["notice_ms"].append(notice(t))
        cold(t)
        r["stat10k_cold_s"].append(stat_loop(f"{path(t)}/files10k"))
        r["stat10k_warm_s"].append(stat_loop(f"{path(t)}/files10k"))
        cold(t)
        r["ls10k_cold_s"].append(timed(f"ls -l {path(t)}/files10k > /dev/null"))
        r["ls10k_warm_s"].append(timed(f"ls -l {path(t)}/files10k > /dev/null"))
        shutil.rmtree(f"{back}/untar", ignore_errors=True)
        cold(t)
        os.makedirs(f"{path(t)}/untar")
        t0 = time.monotonic()
        sh(f"tar -xf {SRC_TAR} -C {path(t)}/untar")
        t1 = time.monotonic(); sh("sync"); t2 = time.monotonic()
        r["untar_s"].append(t1 - t0); r["untar_sync_s"].append(t2 - t0)
        print(f"  [{t} run {i+1}/{n}] " + " ".join(f"{k}={v[-1]:.3f}" for k, v in r.items() if v), flush=True)
    umount(t)
    if os.path.exists(f"{back}/big"):
        os.unlink(f"{back}/big")
    return r

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("targets", nargs="*", default=["local", "qtfs", "sshfs"])
    a = ap.parse_args()
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    res = {}
    for t in a.targets:
        print(f"== {t}", flush=True)
        res[t] = run(t, a.n)
    out = f"{B}/results.json"
    old = json.load(open(out)) if os.path.exists(out) else {}
    old.update(res); json.dump(old, open(out, "w"), indent=1)
    med = lambda v: statistics.median(v)
    fmt = lambda v: f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.3g}")
    print(f"\nmedian of {a.n} (min-max)   " + "".join(f"{t:>26}" for t in res))
    rows = [("seq write 1 GiB MB/s", "write1g_s", lambda s: 1024 / s),
            ("seq read 1 GiB MB/s (cold)", "read1g_s", lambda s: 1024 / s),
            ("stat x10k cold us/op", "stat10k_cold_s", lambda s: s * 100),
            ("stat x10k warm us/op", "stat10k_warm_s", lambda s: s * 100),
            ("ls -l 10k cold s", "ls10k_cold_s", lambda s: s),
            ("ls -l 10k warm s", "ls10k_warm_s", lambda s: s),
            ("untar 51MB/4k files s", "untar_s", lambda s: s),
            ("untar + sync s", "untar_sync_s", lambda s: s),
            ("write CPU s/GiB HOST side", "write_cpu_host", lambda s: s),
            ("write CPU s/GiB DPU side", "write_cpu_dpu", lambda s: s),
            ("read CPU s/GiB HOST side", "read_cpu_host", lambda s: s),
            ("read CPU s/GiB DPU side", "read_cpu_dpu", lambda s: s),
            ("HOST change seen after ms", "notice_ms", lambda s: s)]
    for label, k, f in rows:
        cells = []
        for t in res:
            if not res[t][k]:
                cells.append("-")
                continue
            vals = sorted(f(x) for x in res[t][k])
            cells.append(f"{fmt(f(med(res[t][k])))} ({fmt(vals[0])}-{fmt(vals[-1])})")
        print(f"{label:27}" + "".join(f"{c:>26}" for c in cells))

if __name__ == "__main__":
    main()
