//! Hostile clients of the HOST daemon (issue 15) while a real DPU mount uses it: 1 000
//! half-open connections held open, 10 000 connects in a row and a garbage flood before
//! authenticating, all from another source address (127.0.0.2) than the DPU (127.0.0.1). The
//! daemon keeps answering the DPU (p99 of uncached stat calls reported and bounded), a new DPU
//! session still gets in while the half-open connections are held, the flood is cut off, and
//! the daemon's descriptors come back to their baseline.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tests::fs::{fuse_ready, tmpdir, ExportSpec, Host, Mount};

/// A TCP connection to `to` from source address 127.0.0.2.
fn connect_from_other(to: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(v4) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by `fd` below; the address structs
    // live across the calls.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let src = sin([127, 0, 0, 2], 0);
        if libc::bind(raw, &src as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dst = sin(v4.ip().octets(), v4.port());
        if libc::connect(raw, &dst as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TcpStream::from(fd))
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Latencies (µs) of `n` uncached stat calls on `path`.
fn stat_latencies(path: &std::path::Path, n: usize) -> Vec<u128> {
    let mut v: Vec<u128> = (0..n)
        .map(|_| {
            let t = Instant::now();
            std::fs::metadata(path).expect("stat through the mount");
            t.elapsed().as_micros()
        })
        .collect();
    v.sort_unstable();
    v
}

fn p(v: &[u128], q: f64) -> u128 {
    v[((v.len() as f64 - 1.0) * q) as usize]
}

#[test]
fn adversarial_clients_do_not_keep_the_dpu_out() {
    let name = "adversarial_clients_do_not_keep_the_dpu_out";
    if !fuse_ready(name) {
        return;
    }
    tests::init_tracing();
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    std::fs::create_dir_all(&exp).unwrap();
    std::fs::write(exp.join("f"), b"x").unwrap();
    let host = Host::start("tcp", tmp.path(), &[ExportSpec::rw(&exp)]);
    let pid = host.pid().unwrap();
    let m = Mount::new(
        &host,
        &exp,
        &tmp.path().join("mnt"),
        "attr_timeout=0,entry_timeout=0",
    );
    let target = m.path("f");
    let addr: SocketAddr = host
        .listen
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .expect("tcp listen address");
    let base = stat_latencies(&target, 300);
    let fd0 = fds(pid);
    eprintln!(
        "baseline: stat p50 {} µs, p99 {} µs; daemon fds {fd0}",
        p(&base, 0.5),
        p(&base, 0.99)
    );

    // 1 000 half-open connections from another source, held.
    let mut held = Vec::new();
    for _ in 0..1000 {
        match connect_from_other(addr) {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect #{}: {e}", held.len()),
        }
    }
    let during = stat_latencies(&target, 300);
    eprintln!(
        "1000 half-open held: stat p50 {} µs, p99 {} µs; daemon fds {}",
        p(&during, 0.5),
        p(&during, 0.99),
        fds(pid)
    );
    // Refused cheaply: at most 64 handshakes per source wait; the others were closed unread.
    assert!(
        fds(pid) < fd0 + 100,
        "daemon holds {} fds for 1000 half-open connections",
        fds(pid)
    );
    // A new DPU session (another mount, from 127.0.0.1) gets in meanwhile.
    let t = Instant::now();
    let m2 = Mount::new(&host, &exp, &tmp.path().join("mnt2"), "");
    assert_eq!(std::fs::read(m2.path("f")).unwrap(), b"x");
    eprintln!("new DPU session while they are held: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(m2);
    drop(held);

    // 10 000 connects in a row, each sending a little garbage, while the DPU keeps working.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, target2) = (stop.clone(), target.clone());
    let prober = std::thread::spawn(move || {
        let mut all = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            all.extend(stat_latencies(&target2, 20));
        }
        all.sort_unstable();
        all
    });
    let t = Instant::now();
    let mut refused = 0;
    for i in 0..10_000u32 {
        match connect_from_other(addr) {
            Ok(mut s) => {
                let _ = s.write_all(&i.to_le_bytes().repeat(4));
            }
            Err(_) => refused += 1,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churn = prober.join().unwrap();
    eprintln!(
        "10000 connects in {:?} ({refused} refused by the kernel): stat p50 {} µs, p99 {} µs over {} calls",
        t.elapsed(),
        p(&churn, 0.5),
        p(&churn, 0.99),
        churn.len()
    );

    // A garbage flood before authenticating is cut off long before 64 MiB.
    let mut s = connect_from_other(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let junk = vec![0xa5u8; 1 << 20];
    let mut sent = 0usize;
    let flood = (0..64).try_for_each(|_| {
        s.write_all(&junk)?;
        sent += junk.len();
        Ok::<_, std::io::Error>(())
    });
    eprintln!(
        "garbage flood: {} MiB accepted, then {:?}",
        sent >> 20,
        flood.as_ref().err()
    );
    assert!(
        flood.is_err(),
        "64 MiB of garbage accepted before authentication"
    );
    drop(s);

    // Still serving, descriptors back to the baseline.
    let after = stat_latencies(&target, 300);
    assert!(
        p(&after, 0.99) < 200_000,
        "stat p99 {} µs after the attacks",
        p(&after, 0.99)
    );
    for p99 in [p(&during, 0.99), p(&churn, 0.99)] {
        assert!(p99 < 500_000, "stat p99 {p99} µs under attack");
    }
    let start = Instant::now();
    while fds(pid) > fd0 + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon fds {} after the attacks, {fd0} before",
            fds(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(m);
}
