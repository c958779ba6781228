//! The RDMA link on a real (soft-RoCE) device: byte-stream integrity across the inline and
//! staged write paths and many credit wraps, half-close, clear errors for bad setups, a peer that
//! vanishes mid-transfer, and a CPU-cost measurement. Needs an RDMA device, so these run in the
//! VM tier (tests/vm/run.sh: rxe0 = 10.77.0.1, rxe1 = 10.77.0.2) and skip elsewhere.
#![cfg(feature = "rdma")]

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::rdma::{RdmaListener, RdmaStream};
use transport::{Endpoint, TransportError};

/// rxe0's address (the listening side) or None (and a printed skip) without an RDMA device.
fn rdma_ip(test: &str) -> Option<String> {
    let devices = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| d.count())
        .unwrap_or(0);
    if devices == 0 {
        tests::skip(
            test,
            "no RDMA device (/sys/class/infiniband is empty); runs in the VM tier",
        );
        return None;
    }
    match std::env::var("OFFLOAD_RDMA_LISTEN_IP") {
        Ok(ip) => Some(ip),
        Err(_) => {
            tests::skip(
                test,
                "OFFLOAD_RDMA_LISTEN_IP (an RDMA device's IPv4 address) is not set",
            );
            None
        }
    }
}

async fn listen(ip: &str) -> (RdmaListener, std::net::SocketAddr) {
    let l =
        RdmaListener::bind(format!("{ip}:0").parse().expect("addr")).expect("bind rdma listener");
    let a = l.local_addr();
    (l, a)
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_in_both_directions_across_write_sizes() {
    let Some(ip) = rdma_ip("bytes_arrive_intact_in_both_directions_across_write_sizes") else {
        return;
    };
    let (mut l, addr) = listen(&ip).await;
    // Sizes cover inline (tiny), staged single-slot and multi-slot writes; > 256 messages wrap
    // the 8-bit credit counters many times.
    let sizes = [
        1usize,
        7,
        64,
        200,
        1000,
        4096,
        32 * 1024,
        32 * 1024 + 1,
        100_000,
        3,
        17,
        300,
    ];
    let data = pattern(4 * 1024 * 1024 + 12345, 7);
    let expect = Sha256::digest(&data);

    let server = tokio::spawn(async move {
        let mut s = l.accept_stream().await.expect("accept");
        // Echo everything back until EOF, with odd read sizes.
        let mut buf = vec![0u8; 50_000];
        let mut total = 0usize;
        loop {
            let n = s
                .read(&mut buf[..(total % 49_999) + 1])
                .await
                .expect("server read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.expect("server write");
            total += n;
        }
        s.shutdown().await.expect("server shutdown");
        total
    });

    let s = RdmaStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tokio::io::split(s);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        let mut off = 0;
        let mut i = 0;
        while off < to_send.len() {
            let n = sizes[i % sizes.len()].min(to_send.len() - off);
            wr.write_all(&to_send[off..off + n])
                .await
                .expect("client write");
            off += n;
            i += 1;
        }
        wr.shutdown().await.expect("client shutdown");
        (wr, i)
    });
    let mut got = Vec::with_capacity(data.len());
    rd.read_to_end(&mut got).await.expect("client read");
    let (_wr, msgs) = writer.await.expect("writer");
    let echoed = server.await.expect("server");
    assert!(
        msgs > 256,
        "expected > 256 messages (credit counter wrap), got {msgs}"
    );
    assert_eq!(echoed, data.len());
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), expect, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_through_the_transport_trait() {
    let Some(ip) = rdma_ip("many_connections_through_the_transport_trait") else {
        return;
    };
    let ep: Endpoint = format!("rdma://{ip}:0").parse().expect("endpoint");
    let mut l = transport::listen(&ep).await.expect("listen via trait");
    let local = l.local_endpoint();
    assert!(
        matches!(&local, Endpoint::Rdma { port, .. } if *port != 0),
        "{local}"
    );
    let server = tokio::spawn(async move {
        for _ in 0..8 {
            let (mut c, peer) = l.accept().await.expect("accept");
            assert!(peer.starts_with("rdma:"), "{peer}");
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                let n = c.read(&mut b).await.expect("read");
                c.write_all(&b[..n]).await.expect("write");
                let _ = c.shutdown().await;
            });
        }
    });
    for i in 0..8u8 {
        let mut c = transport::connect(&local).await.expect("connect via trait");
        let msg = [i; 33];
        c.write_all(&msg).await.expect("write");
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, msg);
    }
    server.await.expect("server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_setups_fail_clearly_and_quickly() {
    let Some(ip) = rdma_ip("bad_setups_fail_clearly_and_quickly") else {
        return;
    };
    let (_l, addr) = listen(&ip).await;

    // Port already taken.
    let err = RdmaListener::bind(addr)
        .err()
        .expect("second bind must fail");
    assert!(err.to_string().contains("already in use"), "{err}");

    // Nobody listens on this port.
    let mut closed = addr;
    closed.set_port(addr.port().wrapping_add(1).max(1));
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), RdmaStream::connect(closed))
        .await
        .expect("refused connect must not hang")
        .err()
        .expect("connect to a closed port must fail");
    assert!(
        err.to_string().contains("refused") || err.to_string().contains("reject"),
        "{err}"
    );
    eprintln!("refused after {:?}: {err}", t.elapsed());

    // An address this machine does not have (TEST-NET-1).
    let err = RdmaListener::bind("192.0.2.1:0".parse().expect("addr"))
        .err()
        .expect("binding a foreign address must fail");
    eprintln!("bind 192.0.2.1: {err}");
    assert!(err.to_string().contains("RDMA"), "{err}");

    // Nobody at that address (no neighbour answers): resolution fails within the timeout.
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        RdmaStream::connect("10.77.0.99:4000".parse().expect("addr")),
    )
    .await
    .expect("unreachable connect must not hang")
    .err()
    .expect("connect to an absent host must fail");
    eprintln!("unreachable: {err}");

    // Not an rdma endpoint through the trait, and a hostname that does not resolve.
    let err = transport::connect(
        &"rdma://no-such-host.invalid:1"
            .parse::<Endpoint>()
            .expect("ep"),
    )
    .await
    .err()
    .expect("unresolvable host must fail");
    assert!(matches!(err, TransportError::Rdma(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_gone_mid_transfer_is_an_error_not_a_hang() {
    let Some(ip) = rdma_ip("peer_gone_mid_transfer_is_an_error_not_a_hang") else {
        return;
    };
    let (mut l, addr) = listen(&ip).await;
    let server = tokio::spawn(async move {
        let mut s = l.accept_stream().await.expect("accept");
        let mut buf = vec![0u8; 100_000];
        let mut n = 0;
        while n < 1_000_000 {
            n += s.read(&mut buf).await.expect("read");
        }
        // Vanish without a FIN while the client is still writing.
        drop(s);
        n
    });
    let mut c = RdmaStream::connect(addr).await.expect("connect");
    let chunk = pattern(64 * 1024, 3);
    let res = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(e) = c.write_all(&chunk).await {
                return e;
            }
        }
    })
    .await
    .expect("writer must notice the vanished peer, not hang");
    eprintln!("writer error after peer vanished: {res}");
    assert!(
        matches!(
            res.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{res:?}"
    );
    assert!(server.await.expect("server") >= 1_000_000);
    // Reading after the peer vanished: end of stream, promptly.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("read after disconnect must not hang");
    assert!(r.is_ok() || r.is_err());
    assert!(rest.is_empty());
}

/// Moves `mib` MiB from `w` to `r` (both in this process) in 256 KiB writes; returns the process
/// CPU seconds (user, system) spent and the byte count the reader saw.
async fn cpu_for_transfer<R, W>(mut r: R, mut w: W, mib: usize) -> (f64, f64, usize)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin,
{
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            let k = r.read(&mut buf).await.expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let chunk = pattern(256 * 1024, 9);
    let (u0, s0) = rusage();
    for _ in 0..mib * 4 {
        w.write_all(&chunk).await.expect("write");
    }
    w.shutdown().await.expect("shutdown");
    let got = reader.await.expect("reader");
    let (u1, s1) = rusage();
    (u1 - u0, s1 - s0, got)
}

/// CPU cost per MiB on the RDMA path against TCP loopback in the same guest, both ends in this
/// process, reported for docs/BENCHMARKS.md. The guest is TCG-emulated and rxe is a software
/// RoCE device (its ICRC and copies are CPU work a real NIC does in hardware): only the ratio
/// and the order of magnitude mean anything, never the absolute figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_cost_per_mib() {
    let Some(ip) = rdma_ip("cpu_cost_per_mib") else {
        return;
    };
    const MIB: usize = 16;
    let (mut l, addr) = listen(&ip).await;
    let acc = tokio::spawn(async move { l.accept_stream().await.expect("accept") });
    let c = RdmaStream::connect(addr).await.expect("connect");
    let s = acc.await.expect("accept task");
    let before = transport::rdma::counters();
    let (rdma_user, rdma_sys, got) = cpu_for_transfer(s, c, MIB).await;
    let after = transport::rdma::counters();
    assert_eq!(got, MIB * 1024 * 1024);

    let tl = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("tcp bind");
    let ta = tl.local_addr().expect("addr");
    let acc = tokio::spawn(async move { tl.accept().await.expect("tcp accept").0 });
    let c = tokio::net::TcpStream::connect(ta)
        .await
        .expect("tcp connect");
    let s = acc.await.expect("accept task");
    let (tcp_user, tcp_sys, got) = cpu_for_transfer(s, c, MIB).await;
    assert_eq!(got, MIB * 1024 * 1024);

    let per = |x: f64| x * 1e3 / MIB as f64;
    let d = |a: u64, b: u64| (a - b) as f64 / MIB as f64;
    println!(
        "RDMA-CPU-COST per MiB: writes={:.1} ctrl={:.1} completions={:.1} cq_polls={:.1} progress_calls={:.1} cq_events={:.1}",
        d(after.writes, before.writes),
        d(after.ctrl, before.ctrl),
        d(after.completions, before.completions),
        d(after.cq_polls, before.cq_polls),
        d(after.progress, before.progress),
        d(after.cq_events, before.cq_events)
    );
    println!(
        "RDMA-CPU-COST mib={MIB} rdma_ms_per_mib user={:.1} sys={:.1} | tcp_loopback_ms_per_mib user={:.1} sys={:.1} | ratio={:.2} (both ends; debug build; TCG-emulated guest, soft-RoCE)",
        per(rdma_user),
        per(rdma_sys),
        per(tcp_user),
        per(tcp_sys),
        (rdma_user + rdma_sys) / (tcp_user + tcp_sys).max(1e-9)
    );
}

/// (user, system) CPU seconds of this process.
fn rusage() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage out buffer that lives across the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}
