#!/usr/bin/env python3
"""Writes the seed corpus: a few valid encodings per fuzz target (fuzz/corpus/<target>/seed-N).

Postcard by hand: unsigned ints are LEB128 varints (u8 raw), signed ones zigzag varints, enums a
varint variant index, strings/bytes/Vecs a varint length then the items, Option 0/1 then the
value, bool 0/1, fixed arrays raw. Variant indexes follow the declaration order in the sources.
The fs envelope: a request is the op code byte, the instance, the postcard arguments as a
length-prefixed byte string, then the raw payload; a reply is the status, then (on success) the
result as a length-prefixed byte string and the raw payload. Op codes follow the table in
fs/src/proto.rs (`fs_ops!`).
Run from anywhere: python3 fuzz/seeds.py
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def v(n):  # varint
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def z(n):  # zigzag varint (i32/i64)
    return v((n << 1) ^ (n >> 63) if n >= 0 else ((-n - 1) << 1) | 1)


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return v(len(b)) + b


def some(x):
    return b"\x01" + x


NONE = b"\x00"


def header(kind, body, id_=0):
    return struct.pack("<IBBHI", len(body), kind, 0, 0, id_) + body


def hello_msg(services, auth, version=3, encrypt=True):
    hello = b"DPUOFFL\x01" + v(version) + bytes(range(32)) + v(len(services))
    hello += b"".join(s(x) for x in services) + (b"\x01" if auth else b"\x00")
    hello += v(256 * 1024) + v(1 << 20)
    if version >= 3:
        # HelloExt: encrypt flag, X25519 public key (a fixed array: 32 raw bytes).
        hello += (b"\x01" if encrypt else b"\x00") + bytes(range(9, 41))
    return hello


def record(n, fill=b"\x00"):
    """An encrypted record header and n + 16 bytes (fails authentication; reaches the check)."""
    return struct.pack("<I", n + 16) + fill * (n + 16)


caller = v(1000) + v(1000)
seeds = {
    "wire_frame": [
        struct.pack("<I", 1 << 20) + header(5, b"\x02fs" + b"body", 7),
        struct.pack("<I", 1 << 20) + header(7, z(-2) + s("no such file"), 9),
        struct.pack("<I", 1 << 20) + header(12, struct.pack("<I", 65536), 3),
        struct.pack("<I", 16) + header(4, s("wrong key")),
    ],
    "handshake": [  # role byte (bit 0 dialer, bit 1 encrypt) is prefixed below, all four
        header(1, hello_msg(["fs", "exec", "bridge"], True)) + header(3, s(bytes(32))),
        header(1, hello_msg([], False)) + header(2, s(b"")),
        header(1, hello_msg(["fs"], True)) + header(4, s("wrong key")),
        header(1, hello_msg(["fs"], True, version=2)) + header(3, s(bytes(32))),
        header(1, hello_msg([], True, encrypt=False)) + header(2, s(bytes(32))),
        header(1, hello_msg(["bridge"], True)[:-32] + bytes(32)) + header(3, s(bytes(32))),
    ],
    "record": [
        b"\x80" + b"frames sealed into a record" * 4,
        b"\xff" + bytes(range(256)),
        b"\x00" + record(5),
        b"\x00" + struct.pack("<I", (4 << 20) + 17),
        b"\x40" + b"prefix" + record(0) + b"\x01\x02",
    ],
    "fs_request": [  # op code, instance, length-prefixed postcard arguments, raw payload
        bytes([0]) + v(0) + s(v(7) + s("/srv/export")),  # Mount
        bytes([1]) + v(1) + s(v(1) + s(b"etc")),  # Lookup
        bytes([16]) + v(7) + s(v(3) + v(4096)) + b"hello world",  # Write + payload
        bytes([15]) + v(7) + s(v(3) + v(0) + v(65536)),  # Read
        bytes([14]) + v(7) + s(v(1) + s(b"new") + v(0o644) + z(0o101) + caller
                              + some(v((1 << 63) | 1) + v((1 << 63) | 2))),  # Create, aliased
        bytes([11]) + v(7) + s(v(1) + s(b"a") + v(2) + s(b"b") + v(1)),  # Rename
        bytes([2]) + v(7) + s(v(2) + v(5) + v(1) + v(6) + v(2)),  # Forget
    ],
    "fs_reply": [  # status (0 ok, 1 errno, 2 stale instance), then result and raw payload
        v(0) + s(b"") + b"file contents",  # Read: () + data
        v(0) + s(b""),  # Ok
        v(0) + s(v(42) + b"\x00"),  # Opened
        v(0) + s(v(4096)),  # Written
        v(0) + s(z(-1)),  # Offset
        v(1) + z(2),  # ENOENT
        v(2),  # StaleInstance
    ],
    "fs_fifo": [
        b"\x01" + v(3) + v(12),  # tunnel header
        b"".join(struct.pack("<I", len(m)) + m for m in [
            v(0), v(1) + v(1), v(4) + v(1) + s(b"data through the pipe"), v(5) + v(1), v(2) + v(1)]),
        struct.pack("<I", 2) + v(3) + v(9),
    ],
    "exec_proto": [
        b"\x03" + v(3) + v(0xDEADBEEF) + v(2) + s(b"/bin/echo") + s(b"hi")
        + v(1) + s(b"PATH") + s(b"/usr/bin") + some(s(b"/")) + NONE + NONE + b"\x00"
        + some(v(0o22)) + some(z(0)) + v(1 << 1) + v(0) + v(2) + v(1),  # umask, nice, ignored, stdio
        b"\x05" + b"\x01" + struct.pack(">I", 3) + b"out" + b"\x02" + struct.pack(">I", 3) + b"err"
        + b"\x03" + struct.pack(">I", 3) + v(1) + v(0) + z(0),
        b"\x01" + v(0) + v(77) + v(1) + b"\x01",  # ControlRequest::Signal (group)
        b"\x02" + b"\x03" + struct.pack(">I", 2) + v(0) + v(1234),
    ],
    "bridge_proto": [
        v(0) + v(1),
        v(1) + s("/run/containerd/s/abc") + s("/run/containerd/s/abc"),
        v(3) + z(1234) + z(15),
        v(1) + s("/run/containerd/fifo/x-stdout") + v(1),
        v(2) + v(3),
    ],
    "bridge_rules": [
        b'role = "host"\nwatch = ["/run/containerd/s"]\nallow_listen = ["/run/containerd"]\n'
        b'[[forward]]\nlisten_side = "dpu"\npath = "/run/containerd/containerd.sock"\n'
        b'[[map]]\nfrom = "/another_rootfs"\nto = "/"\n\x00/another_rootfs/run/containerd/s/x',
        b'fifo_dirs = ["/run/containerd/fifo"]\nallow_connect = ["/run/x"]\n\x00/run/containerd/fifo/../../etc/passwd',
    ],
    "rdma_meta": [
        struct.pack("<IHHIIIQ", 0x52445055, 1, 32, 32768, 8, 77, 0x123456789ABC),
        struct.pack("<IHHIIIQ", 0x52445055, 1, 128, 65536, 128, 1, 0),
    ],
}
seeds["handshake"] = [bytes([role]) + h for h in seeds["handshake"] for role in range(4)]

for target, items in seeds.items():
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for i, data in enumerate(items):
        with open(os.path.join(d, f"seed-{i}"), "wb") as f:
            f.write(data)
print("seeds written under", ROOT)
