//! Session layer vs a raw tokio socket on the same link, in one run: 64-byte round trips and
//! one-way throughput with 64 KiB and 1 MiB messages (1 MiB also as fresh buffers, the fs
//! write pattern), over TCP loopback (session in clear and
//! encrypted, the tcp default) and Unix (clear, its default). Ends with the encrypted/clear
//! ratio on TCP.
//!
//! The CPU rows count the user + system time of both processes (this client and the server
//! child) per MB moved: on a loaded machine they vary far less than the MB/s, and when the
//! transfer is CPU-bound their clear/encrypted ratio is the throughput ratio to expect.
//!
//! `cargo run --release -p tests --bin transport-bench [-- --secs 3]` prints a Markdown table
//! (the one in docs/BENCHMARKS.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{
    EncryptPolicy, Endpoint, Key, Registry, RemoteError, Service, Session, SessionConfig, Stream,
};

struct Bench;

#[transport::async_trait]
impl Service for Bench {
    async fn call(&self, _s: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        Ok(req)
    }
    /// Sink: counts bytes until EOF, then replies with the count.
    async fn stream(&self, _s: &Session, _h: Bytes, stream: Stream) {
        let (mut rd, mut wr) = stream.split();
        let mut n: u64 = 0;
        while let Ok(Some(b)) = rd.recv().await {
            n += b.len() as u64;
        }
        let _ = wr.send(Bytes::copy_from_slice(&n.to_le_bytes())).await;
        let _ = wr.finish();
    }
}

fn cfg(encrypt: bool) -> SessionConfig {
    SessionConfig {
        encrypt: EncryptPolicy::all(encrypt),
        ..SessionConfig::new(Some(Key::from_bytes(vec![7u8; 32]).expect("key")))
    }
}

/// Raw baseline server: echoes 64-byte messages on connections that start with b'E', sinks
/// (and acknowledges the byte count at EOF) on connections that start with b'S'.
async fn raw_server(ep: &Endpoint) -> Endpoint {
    let mut l = transport::listen(ep).await.expect("listen raw");
    let bound = l.local_endpoint();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if c.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'E' {
                    let mut m = [0u8; 64];
                    while c.read_exact(&mut m).await.is_ok() {
                        if c.write_all(&m).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut n: u64 = 0;
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k as u64,
                        }
                    }
                    let _ = c.write_all(&n.to_le_bytes()).await;
                }
            });
        }
    });
    bound
}

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

async fn raw_rtt(ep: &Endpoint, n: usize) -> f64 {
    let mut c = transport::connect(ep).await.expect("connect raw");
    c.write_all(b"E").await.expect("mode");
    let m = [1u8; 64];
    let mut r = [0u8; 64];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&m).await.expect("write");
        c.read_exact(&mut r).await.expect("read");
        v.push(t.elapsed());
    }
    median_us(v)
}

async fn session_rtt(s: &Session, n: usize) -> f64 {
    let m = Bytes::from(vec![1u8; 64]);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.call("bench", m.clone()).await.expect("call");
        v.push(t.elapsed());
    }
    median_us(v)
}

/// MB/s (10^6 bytes) for `total` bytes sent as `msg`-sized writes, acknowledged at the end.
/// `fresh`: each message is first copied into a new buffer, as [`session_tput`] does.
async fn raw_tput(ep: &Endpoint, msg: usize, total: u64, fresh: bool) -> f64 {
    let mut c = transport::connect(ep).await.expect("connect raw");
    c.write_all(b"S").await.expect("mode");
    let buf = vec![3u8; msg];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        if fresh {
            let m = std::hint::black_box(buf.to_vec());
            c.write_all(&m).await.expect("write");
        } else {
            c.write_all(&buf).await.expect("write");
        }
        sent += msg as u64;
    }
    c.shutdown().await.expect("shutdown");
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack).await.expect("ack");
    assert_eq!(u64::from_le_bytes(ack), sent);
    sent as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// One-way throughput on a session stream. `fresh`: every message is a new buffer the sender
/// fills (copied from its source, as an fs write copies the FUSE data into its request), so
/// the session holds the only reference; otherwise the same shared buffer is sent again.
async fn session_tput(s: &Session, msg: usize, total: u64, fresh: bool) -> f64 {
    let st = s.open_stream("bench", Bytes::new()).await.expect("open");
    let (mut rd, mut wr) = st.split();
    let buf = Bytes::from(vec![3u8; msg]);
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let m = if fresh {
            Bytes::from(buf.to_vec())
        } else {
            buf.clone()
        };
        wr.send(m).await.expect("send");
        sent += msg as u64;
    }
    wr.finish().expect("finish");
    let ack = rd.recv().await.expect("ack").expect("ack");
    assert_eq!(
        u64::from_le_bytes(ack[..8].try_into().expect("8 bytes")),
        sent
    );
    sent as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Child mode: serve the raw baseline and the session on `kind` links (multi-threaded, like
/// offloadd) and print both endpoints on one line.
fn serve_child(kind: &str, encrypt: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw_ep = raw_server(&tests::listen_url(kind, dir.path()).parse().expect("url")).await;
        let l = transport::listen(&tests::listen_url(kind, dir.path()).parse().expect("url"))
            .await
            .expect("listen");
        println!("{raw_ep} {}", l.local_endpoint());
        transport::serve(
            l,
            cfg(encrypt),
            Registry::new().with("bench", Arc::new(Bench)),
        )
        .await;
    });
}

/// Session layer vs a raw socket on the same link, in one run (docs/BENCHMARKS.md, transport).
#[derive(clap::Parser, Debug)]
#[command(name = "transport-bench")]
struct Args {
    /// Seconds of traffic per measurement (scales the round-trip count and the bytes sent).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    secs: f64,
    /// Links to measure, comma-separated: tcp (clear), tcp-encrypted, unix.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tcp,tcp-encrypted,unix",
        value_name = "L"
    )]
    links: Vec<String>,
    /// Internal: serve the raw baseline and the session for the client (`KIND`, optionally
    /// followed by `encrypted`).
    #[arg(long, num_args = 1..=2, hide = true, value_name = "KIND")]
    serve: Option<Vec<String>>,
}

fn main() {
    use clap::Parser;
    if std::env::var_os("BENCH_NO_TUNE").is_none() {
        transport::tune_allocator();
    }
    let args = Args::parse();
    if let Some(s) = &args.serve {
        return serve_child(
            s.first().map(String::as_str).unwrap_or("tcp"),
            s.get(1).map(String::as_str) == Some("encrypted"),
        );
    }
    let mut links = Vec::new();
    for l in &args.links {
        links.push(match l.as_str() {
            "tcp" => ("tcp", false),
            "tcp-encrypted" => ("tcp", true),
            "unix" => ("unix", false),
            other => {
                eprintln!("transport-bench: unknown link {other:?} (tcp, tcp-encrypted, unix)");
                std::process::exit(2);
            }
        });
    }
    // The client side runs on a current-thread runtime, like rexec and mount.qtfs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(client_main(args.secs, &links));
}

async fn client_main(secs: f64, links: &[(&str, bool)]) {
    use std::io::BufRead;
    let rtt_n = (20_000.0 * secs) as usize;
    let total: u64 = (2048.0 * secs) as u64 * (1 << 20);
    println!("| link | metric | raw socket | session | session/raw |");
    println!("|---|---|---|---|---|");
    // Session figures of the clear and the encrypted TCP runs: round trip, 64 KiB, 1 MiB.
    let mut tcp: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // CPU seconds per MB of the session runs (client + server), clear and encrypted.
    let mut tcp_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for &(kind, encrypt) in links {
        let exe = std::env::current_exe().expect("current_exe");
        let mode = if encrypt { "encrypted" } else { "clear" };
        let mut child = std::process::Command::new(exe)
            .args(["--serve", kind, mode])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("server endpoints");
        let mut eps = line
            .split_whitespace()
            .map(|e| e.parse::<Endpoint>().expect("endpoint"));
        let (raw_ep, sess_ep) = (eps.next().expect("raw"), eps.next().expect("session"));
        let s = Session::connect(&sess_ep, cfg(encrypt), Registry::new())
            .await
            .expect("session");
        // Warm up both paths.
        raw_rtt(&raw_ep, 1000).await;
        session_rtt(&s, 1000).await;
        let r = raw_rtt(&raw_ep, rtt_n).await;
        let m = session_rtt(&s, rtt_n).await;
        let link = if encrypt {
            format!("{kind} (encrypted)")
        } else {
            kind.to_string()
        };
        let mut mine = vec![m];
        println!(
            "| {link} | 64 B round trip, median µs | {r:.1} | {m:.1} | {:.2}× |",
            m / r
        );
        let mut cpu_row = Vec::new();
        for (msg, label, fresh) in [
            (64 << 10, "64 KiB", false),
            (1 << 20, "1 MiB", false),
            (1 << 20, "1 MiB fresh", true),
        ] {
            let c0 = cpu_secs("self") + cpu_secs(&child.id().to_string());
            let r = raw_tput(&raw_ep, msg, total, fresh).await;
            let c1 = cpu_secs("self") + cpu_secs(&child.id().to_string());
            let m = session_tput(&s, msg, total, fresh).await;
            let c2 = cpu_secs("self") + cpu_secs(&child.id().to_string());
            mine.push(m);
            let per_mb = |c: f64| c * 1e6 / (total as f64 / 1e6);
            cpu_row.push(per_mb(c2 - c1));
            println!(
                "| {link} | throughput, {label} writes, MB/s | {r:.0} | {m:.0} | {:.0} % |",
                m / r * 100.0
            );
            println!(
                "| {link} | CPU per MB, {label} writes, µs (both processes) | {:.0} | {:.0} | {:.2}× |",
                per_mb(c1 - c0),
                per_mb(c2 - c1),
                (c2 - c1) / (c1 - c0)
            );
        }
        if kind == "tcp" {
            tcp[usize::from(encrypt)] = mine;
            tcp_cpu[usize::from(encrypt)] = cpu_row;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    if tcp.iter().any(Vec::is_empty) {
        return;
    }
    let [clear, enc] = &tcp;
    println!(
        "\nTCP session, encrypted vs clear: round trip {:.2}×, 64 KiB writes {:.0} %, 1 MiB writes {:.0} %, 1 MiB fresh writes {:.0} %",
        enc[0] / clear[0],
        enc[1] / clear[1] * 100.0,
        enc[2] / clear[2] * 100.0,
        enc[3] / clear[3] * 100.0
    );
    let [clear, enc] = &tcp_cpu;
    println!(
        "TCP session CPU per MB (both processes), clear/encrypted, the throughput ratio when CPU-bound: 64 KiB writes {:.0} %, 1 MiB writes {:.0} %, 1 MiB fresh writes {:.0} %",
        clear[0] / enc[0] * 100.0,
        clear[1] / enc[1] * 100.0,
        clear[2] / enc[2] * 100.0
    );
}

/// User + system CPU seconds used so far by process `pid` (`"self"` for this one), from
/// `/proc/PID/stat` (whole-process, all threads; 0 if unreadable).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}
