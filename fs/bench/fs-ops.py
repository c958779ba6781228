#!/usr/bin/env python3
"""Per-operation latency on a directory (a qtfs mount, an sshfs mount, a local directory).

Usage: fs/bench/fs-ops.py DIR [DIR...]      # e.g. a local dir and a qtfs mount of the same disk

Each row is the mean over a loop of single-threaded syscalls, so on a FUSE mount it is the
kernel<->daemon round trip plus whatever the daemon does: `getxattr (absent)` is answered by
qtfs on the FUSE thread itself (the floor of any FUSE request on this machine), `write 10 KiB`
is acknowledged on the FUSE thread (write-behind), `futimens`/`fchmod` go to the HOST, `create`
is lookup + create + flush + release.
"""
import os, sys, time

N = 2000

def loop(f, n=N):
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    return (time.perf_counter() - t0) / n * 1e6

def run(d):
    p = os.path.join(d, "fs-ops.dat")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = b"x" * 10240
    os.stat(p)
    def absent(i):
        try:
            os.getxattr(p, "user.fs-ops-absent")
        except OSError:
            pass
    def create(i):
        os.close(os.open(os.path.join(d, f"fs-ops-{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    rows = [
        ("getxattr (absent)", loop(absent)),
        ("write 10 KiB", loop(lambda i: os.write(fd, buf))),
        ("futimens", loop(lambda i: os.utime(fd, (i, i)))),
        ("fchmod", loop(lambda i: os.fchmod(fd, 0o644 if i % 2 else 0o600))),
        ("open + close", loop(lambda i: os.close(os.open(p, os.O_RDONLY)), 500)),
        ("create + close", loop(create, 500)),
    ]
    os.close(fd)
    os.unlink(p)
    for i in range(500):
        os.unlink(os.path.join(d, f"fs-ops-{i}"))
    return rows

def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    res = {d: run(d) for d in sys.argv[1:]}
    print(f"{'us/op':20}" + "".join(f"{d[-28:]:>30}" for d in res))
    for k in range(len(next(iter(res.values())))):
        label = next(iter(res.values()))[k][0]
        print(f"{label:20}" + "".join(f"{res[d][k][1]:30.1f}" for d in res))

if __name__ == "__main__":
    main()
