//! bridge_bench — shim-bridge benchmark and probe.
//!
//! `bridge_bench run [--secs S]`: bridged Unix socket (two real `offloadd` processes over TCP
//! loopback) vs a direct Unix socket vs `socat` relaying the same hops (Unix → TCP loopback →
//! Unix), in the same run: 64-byte round-trip latency and 1 MiB-chunk throughput, with one
//! connection and with 16 at once. Needs the release binaries next to this one
//! (`cargo build --release -p tools -p tests --bins`) and `socat` in PATH.
//!
//! `bridge_bench ttrpc-connect SOCKET ID`: sends containerd's ttrpc `Task.Connect` to a shim
//! socket and prints `shim_pid=N task_pid=M` (used by the shim tests through a bridge proxy).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnix;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("ttrpc-connect") if args.len() == 4 => ttrpc_connect(Path::new(&args[2]), &args[3]),
        Some("run") => {
            let secs = args
                .iter()
                .position(|a| a == "--secs")
                .and_then(|i| args.get(i + 1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(2.0);
            bench(secs)
        }
        _ => {
            Err("usage: bridge_bench run [--secs S] | bridge_bench ttrpc-connect SOCKET ID".into())
        }
    };
    if let Err(e) = r {
        eprintln!("bridge_bench: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

// ---- ttrpc probe -------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn get_varint(b: &[u8], i: &mut usize) -> Res<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or("truncated varint")?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// Top-level fields of a protobuf message: (field, varint value or bytes).
fn fields(b: &[u8]) -> Res<Vec<(u64, u64, Vec<u8>)>> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let tag = get_varint(b, &mut i)?;
        match tag & 7 {
            0 => out.push((tag >> 3, get_varint(b, &mut i)?, Vec::new())),
            2 => {
                let n = get_varint(b, &mut i)? as usize;
                let end = i
                    .checked_add(n)
                    .filter(|e| *e <= b.len())
                    .ok_or("truncated field")?;
                out.push((tag >> 3, 0, b[i..end].to_vec()));
                i = end;
            }
            w => return Err(format!("unsupported wire type {w}").into()),
        }
    }
    Ok(out)
}

fn ttrpc_connect(sock: &Path, id: &str) -> Res<()> {
    let mut inner = Vec::new();
    put_bytes(&mut inner, 1, id.as_bytes()); // ConnectRequest.id
    let mut req = Vec::new();
    put_bytes(&mut req, 1, b"containerd.task.v2.Task");
    put_bytes(&mut req, 2, b"Connect");
    put_bytes(&mut req, 3, &inner);
    let mut msg = Vec::new();
    msg.extend_from_slice(&(req.len() as u32).to_be_bytes());
    msg.extend_from_slice(&1u32.to_be_bytes()); // stream id
    msg.extend_from_slice(&[1, 0]); // type request, flags
    msg.extend_from_slice(&req);
    let mut s = StdUnix::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&msg)?;
    let mut head = [0u8; 10];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if head[8] != 2 || len > 1 << 20 {
        return Err(format!("unexpected ttrpc reply header {head:?}").into());
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let resp = fields(&body)?;
    if let Some((_, _, status)) = resp.iter().find(|f| f.0 == 1) {
        let st = fields(status)?;
        if st.iter().any(|f| f.0 == 1 && f.1 != 0) {
            return Err(
                format!("ttrpc error status: {:?}", String::from_utf8_lossy(status)).into(),
            );
        }
    }
    let payload = resp
        .iter()
        .find(|f| f.0 == 2)
        .map(|f| f.2.clone())
        .unwrap_or_default();
    let cr = fields(&payload)?;
    let get = |n| cr.iter().find(|f| f.0 == n).map(|f| f.1).unwrap_or(0);
    println!("shim_pid={} task_pid={}", get(1), get(2));
    Ok(())
}

// ---- benchmark ---------------------------------------------------------------------------

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Echo (answers every byte) and sink (reads everything, then reports the count) servers.
async fn serve(echo: PathBuf, sink: PathBuf) -> Res<()> {
    let e = UnixListener::bind(&echo)?;
    let s = UnixListener::bind(&sink)?;
    tokio::spawn(async move {
        while let Ok((mut c, _)) = e.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut c, _)) = s.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = c.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Connects, retrying while the listener's backlog is full (EAGAIN on Unix sockets; socat
/// listens with a backlog of 5).
async fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            r => return r,
        }
    }
}

/// Round trips of 64 bytes on `conns` connections for `secs`; returns (mean µs, total ops/s).
async fn latency(path: &Path, conns: usize, secs: f64) -> Res<(f64, f64)> {
    let mut tasks = Vec::new();
    let dur = Duration::from_secs_f64(secs);
    for _ in 0..conns {
        let path = path.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&path).await?;
            let msg = [7u8; 64];
            let mut buf = [0u8; 64];
            for _ in 0..50 {
                c.write_all(&msg).await?;
                c.read_exact(&mut buf).await?;
            }
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < dur {
                c.write_all(&msg).await?;
                c.read_exact(&mut buf).await?;
                n += 1;
            }
            Ok::<_, std::io::Error>((n, start.elapsed()))
        }));
    }
    let (mut ops, mut lat_sum, mut elapsed) = (0u64, 0f64, 0f64);
    for t in tasks {
        let (n, e) = t.await??;
        ops += n;
        lat_sum += e.as_secs_f64() * 1e6 / n.max(1) as f64;
        elapsed = f64::max(elapsed, e.as_secs_f64());
    }
    Ok((lat_sum / conns as f64, ops as f64 / elapsed))
}

/// 1 MiB writes on `conns` connections for about `secs`; returns aggregate MB/s (10^6 B/s),
/// counted by the sink (bytes that arrived).
async fn throughput(path: &Path, conns: usize, secs: f64) -> Res<f64> {
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&path).await?;
            let chunk = vec![0x5au8; 1 << 20];
            let t0 = Instant::now();
            let mut sent = 0u64;
            while t0.elapsed() < dur {
                c.write_all(&chunk).await?;
                sent += chunk.len() as u64;
            }
            c.shutdown().await?;
            let mut n = [0u8; 8];
            c.read_exact(&mut n).await?;
            let got = u64::from_be_bytes(n);
            if got != sent {
                return Err(std::io::Error::other(format!(
                    "sink got {got} of {sent} bytes"
                )));
            }
            Ok::<_, std::io::Error>(got)
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_socket(p: &Path) -> Res<()> {
    let start = Instant::now();
    while StdUnix::connect(p).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} did not come up", p.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn bench(secs: f64) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (echo, sink) = (d.join("echo.sock"), d.join("sink.sock"));
    rt.block_on(serve(echo.clone(), sink.clone()))?;
    let mut procs = Procs(Vec::new());

    // Bridge: HOST offloadd owns the servers, DPU offloadd gets proxies; link = TCP loopback.
    let key = d.join("psk");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let port = free_port()?;
    // BRIDGE_BENCH_CHUNK: bytes per local read in the bridge (default: the config default).
    let chunk_line = std::env::var("BRIDGE_BENCH_CHUNK")
        .map(|c| format!("read_chunk = {c}\n"))
        .unwrap_or_default();
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[bridge]\n{3}[[bridge.forward]]\nlisten_side = \"dpu\"\npath = \"{0}/b-echo\"\ntarget = \"{1}\"\n\
             [[bridge.forward]]\nlisten_side = \"dpu\"\npath = \"{0}/b-sink\"\ntarget = \"{2}\"\n",
            d.display(),
            echo.display(),
            sink.display(),
            chunk_line
        ),
    )?;
    std::fs::write(
        d.join("dpu.toml"),
        format!("[bridge]\nallow_listen = [\"{}\"]\n", d.display()),
    )?;
    let offloadd = bin("offloadd");
    let quiet = || Stdio::null();
    procs.0.push(
        Command::new(&offloadd)
            .args(["--listen", &format!("tcp://127.0.0.1:{port}"), "--key-file"])
            .arg(&key)
            .arg("--config")
            .arg(d.join("host.toml"))
            .env("RUST_LOG", "warn")
            .stdout(quiet())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    procs.0.push(
        Command::new(&offloadd)
            .args([
                "--connect",
                &format!("tcp://127.0.0.1:{port}"),
                "--key-file",
            ])
            .arg(&key)
            .arg("--config")
            .arg(d.join("dpu.toml"))
            .env("RUST_LOG", "warn")
            .stdout(quiet())
            .spawn()?,
    );
    wait_socket(&d.join("b-echo"))?;
    wait_socket(&d.join("b-sink"))?;

    // socat: Unix -> TCP loopback -> Unix, one relay pair per server; with socat's default
    // 8 KiB transfer block and with -b 262144 (the bridge reads 256 KiB at a time).
    for (prefix, block) in [("s", None), ("sb", Some("262144"))] {
        for (name, target) in [("echo", &echo), ("sink", &sink)] {
            let p = free_port()?;
            let listen = d.join(format!("{prefix}-{name}"));
            let mut a = Command::new("socat");
            let mut b = Command::new("socat");
            if let Some(bs) = block {
                a.args(["-b", bs]);
                b.args(["-b", bs]);
            }
            a.arg(format!("TCP-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork"))
                .arg(format!("UNIX-CONNECT:{}", target.display()))
                .stderr(quiet());
            b.arg(format!("UNIX-LISTEN:{},fork", listen.display()))
                .arg(format!("TCP:127.0.0.1:{p}"))
                .stderr(quiet());
            procs.0.push(a.spawn()?);
            procs.0.push(b.spawn()?);
            wait_socket(&listen)?;
        }
    }

    println!("| path | RTT 64 B, 1 conn (µs) | RTT 64 B, 16 conns (µs, mean) | round trips/s, 16 conns | 1 MiB chunks, 1 conn (MB/s) | 1 MiB chunks, 16 conns (MB/s aggregate) |");
    println!("|---|---|---|---|---|---|");
    let cases: [(&str, PathBuf, PathBuf); 4] = [
        ("direct Unix socket", echo.clone(), sink.clone()),
        (
            "shim-bridge (2 offloadd, TCP loopback, PSK)",
            d.join("b-echo"),
            d.join("b-sink"),
        ),
        ("socat Unix→TCP→Unix", d.join("s-echo"), d.join("s-sink")),
        (
            "socat -b 262144 Unix→TCP→Unix",
            d.join("sb-echo"),
            d.join("sb-sink"),
        ),
    ];
    // BRIDGE_BENCH_ONLY=<substring>: run only the matching paths (e.g. for profiling).
    let only = std::env::var("BRIDGE_BENCH_ONLY").unwrap_or_default();
    for (name, e, s) in cases {
        if !name.contains(only.as_str()) {
            continue;
        }
        let (l1, _) = rt.block_on(latency(&e, 1, secs))?;
        let (l16, ops16) = rt.block_on(latency(&e, 16, secs))?;
        let t1 = rt.block_on(throughput(&s, 1, secs))?;
        let t16 = rt.block_on(throughput(&s, 16, secs))?;
        println!("| {name} | {l1:.1} | {l16:.1} | {ops16:.0} | {t1:.0} | {t16:.0} |");
    }
    Ok(())
}
