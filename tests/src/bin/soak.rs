//! soak — many concurrent clients mixing fs, exec and bridge traffic against a real HOST/DPU
//! pair on loopback, with both daemons' RSS and open fds sampled every second.
//!
//! Starts a HOST `offloadd` (fs export, exec, bridge), a DPU `offloadd` (bridge) and a qtfs
//! mount (`mount_qtfs -f`, its FUSE daemon is the DPU's fs client), then runs `--clients`
//! workers for `--seconds`: a third loop over create/write/fsync/read/stat/rename/unlink on the
//! mount, a third `rexec /bin/echo` (a session per call), a third echo 4 KiB through a bridged
//! Unix socket. Prints a Markdown report (samples every 10 s, totals, growth after warm-up,
//! fds before and after) and exits 1 when an operation failed, the fds of a daemon did not come
//! back to their baseline, or `--max-host-rss-mib` was exceeded. Root (FUSE) needed.
//!
//! docs/RELIABILITY.md: `soak --seconds 600 --clients 64` is the documented soak; the test
//! suite runs a short form (tests/tests/soak_short.rs).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tests::{spawn_ready, KillOnDrop};

#[derive(Parser, Debug)]
#[command(
    name = "soak",
    about = "Concurrent fs, exec and bridge clients against a loopback HOST/DPU pair; RSS and fds sampled"
)]
struct Args {
    /// How long the clients run.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Concurrent clients (split evenly between fs, exec and bridge).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Fail when the HOST offloadd's peak RSS exceeds this many MiB (0 = report only).
    #[arg(long, default_value_t = 64)]
    max_host_rss_mib: u64,
    /// Extra environment for the HOST offloadd only, KEY=VALUE (repeatable): e.g. a heap
    /// profiler's LD_PRELOAD (docs/RELIABILITY.md, "Soak").
    #[arg(long, value_parser = parse_env)]
    host_env: Vec<(String, String)>,
}

/// `KEY=VALUE` as a pair.
fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Counters shared by the workers.
#[derive(Default)]
struct Stats {
    ops: BTreeMap<&'static str, AtomicU64>,
    failures: Mutex<Vec<String>>,
    failed: AtomicU64,
}

impl Stats {
    fn new() -> Self {
        let mut ops = BTreeMap::new();
        for k in ["fs", "exec", "bridge"] {
            ops.insert(k, AtomicU64::new(0));
        }
        Stats {
            ops,
            ..Default::default()
        }
    }

    fn ok(&self, kind: &'static str) {
        if let Some(c) = self.ops.get(kind) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = transport::sync::lock(&self.failures);
        if f.len() < 20 {
            f.push(what);
        }
    }
}

/// RSS in KiB and open fd count of `pid`.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

fn fs_client(dir: PathBuf, id: usize, stop: &AtomicBool, stats: &Stats) {
    if let Err(e) = std::fs::create_dir_all(&dir) {
        stats.fail(format!("fs{id}: mkdir {}: {e}", dir.display()));
        return;
    }
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let data: Vec<u8> = (0..16384u64)
            .map(|i| (i.wrapping_mul(31) ^ n ^ id as u64) as u8)
            .collect();
        let (p, q) = (dir.join(format!("f{}", n % 8)), dir.join("renamed"));
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&data)?;
            if n.is_multiple_of(10) {
                f.sync_all()?;
            }
            drop(f);
            let back = std::fs::read(&p)?;
            if back != data {
                return Err(std::io::Error::other("read back differs"));
            }
            let m = std::fs::metadata(&p)?;
            if m.len() != data.len() as u64 {
                return Err(std::io::Error::other(format!("size {}", m.len())));
            }
            std::fs::rename(&p, &q)?;
            std::fs::remove_file(&q)?;
            Ok(())
        })();
        match r {
            Ok(()) => stats.ok("fs"),
            Err(e) => stats.fail(format!("fs{id} op {n}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn exec_client(addr: &str, key: &Path, id: usize, stop: &AtomicBool, stats: &Stats) {
    let rexec = tests::bin("rexec");
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let want = format!("soak {id} {n}\n");
        let out = Command::new(&rexec)
            .args(["/bin/echo", "soak", &id.to_string(), &n.to_string()])
            .env("CMD_NET_ADDR", addr)
            .env("OFFLOAD_KEY_FILE", key)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() && o.stdout == want.as_bytes() => stats.ok("exec"),
            Ok(o) => stats.fail(format!(
                "exec{id} call {n}: {:?} stdout {:?} stderr {:?}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => stats.fail(format!("exec{id} call {n}: spawn rexec: {e}")),
        }
    }
}

fn bridge_client(sock: &Path, id: usize, stop: &AtomicBool, stats: &Stats) {
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let msg: Vec<u8> = (0..4096u64).map(|i| (i ^ n ^ id as u64) as u8).collect();
        let r = (|| -> std::io::Result<()> {
            let mut s = UnixStream::connect(sock)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(&msg)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            if back != msg {
                return Err(std::io::Error::other(format!(
                    "echo differs ({} bytes back)",
                    back.len()
                )));
            }
            Ok(())
        })();
        match r {
            Ok(()) => stats.ok("bridge"),
            Err(e) => stats.fail(format!("bridge{id} op {n}: {e}")),
        }
    }
}

struct Sample {
    t: f64,
    procs: Vec<Option<(u64, usize)>>,
    ops: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(tests::is_root(), "soak needs root (a FUSE mount)");
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    let t = tempfile::tempdir()?;
    let d = t.path();
    let (export, mnt, hs, ds) = (d.join("export"), d.join("mnt"), d.join("h"), d.join("p"));
    for p in [&export, &mnt, &hs, &ds] {
        std::fs::create_dir_all(p)?;
    }
    let key = tests::write_key(d, "psk");
    let addr = format!("tcp://127.0.0.1:{}", tests::free_port());
    let (hsock, dsock) = (hs.join("echo.sock"), ds.join("echo.sock"));
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[fs]\nexports = [{{ path = {:?} }}]\n[exec]\nallow = [\"/bin/echo\"]\n\
             [bridge]\n[[bridge.forward]]\nlisten_side = \"dpu\"\npath = {:?}\ntarget = {:?}\n",
            export.display().to_string(),
            dsock.display().to_string(),
            hsock.display().to_string()
        ),
    )?;
    std::fs::write(
        d.join("dpu.toml"),
        format!(
            "[bridge]\nallow_listen = [{:?}]\n",
            ds.display().to_string()
        ),
    )?;
    tests::echo_unix_server(&hsock).with_context(|| format!("bind {}", hsock.display()))?;
    let offloadd = tests::bin("offloadd");
    let mut host = Command::new(&offloadd);
    host.args(["--listen", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("host.toml"))
        .env("RUST_LOG", "warn")
        .envs(args.host_env.iter().map(|(k, v)| (k, v)));
    let mut daemons = KillOnDrop(Vec::new());
    daemons.0.push(spawn_ready(host, "listening"));
    let mut dpu = Command::new(&offloadd);
    dpu.args(["--connect", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("dpu.toml"))
        .env("RUST_LOG", "warn");
    daemons.0.push(spawn_ready(dpu, "connected"));
    daemons.0.push(
        Command::new(tests::bin("mount_qtfs"))
            .arg("-f")
            .arg("-o")
            .arg(format!("addr={addr},keyfile={}", key.display()))
            .arg(&export)
            .arg(&mnt)
            .env("RUST_LOG", "warn")
            .spawn()
            .context("spawn mount_qtfs")?,
    );
    let pids = [
        ("HOST offloadd", daemons.0[0].id()),
        ("DPU offloadd", daemons.0[1].id()),
        ("DPU qtfs (mount_qtfs)", daemons.0[2].id()),
    ];
    let start = Instant::now();
    while !(tests::fs::is_mounted(&mnt) && dsock.exists()) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "mount or bridged socket not ready within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let baseline: Vec<Option<(u64, usize)>> = pids.iter().map(|(_, p)| usage(*p)).collect();

    let stats = Arc::new(Stats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..args.clients {
        let (stats, stop) = (stats.clone(), stop.clone());
        let (mnt, addr, key, dsock) = (mnt.clone(), addr.clone(), key.clone(), dsock.clone());
        workers.push(std::thread::spawn(move || match i % 3 {
            0 => fs_client(mnt.join(format!("c{i}")), i, &stop, &stats),
            1 => exec_client(&addr, &key, i, &stop, &stats),
            _ => bridge_client(&dsock, i, &stop, &stats),
        }));
    }
    let total_ops = |s: &Stats| -> u64 { s.ops.values().map(|c| c.load(Ordering::Relaxed)).sum() };
    let mut samples = Vec::new();
    let run = Duration::from_secs(args.seconds);
    let t0 = Instant::now();
    while t0.elapsed() < run {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(Sample {
            t: t0.elapsed().as_secs_f64(),
            procs: pids.iter().map(|(_, p)| usage(*p)).collect(),
            ops: total_ops(&stats),
        });
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    // The clients are gone: give the daemons a moment to close what they served.
    let settle = Instant::now();
    let after = loop {
        std::thread::sleep(Duration::from_millis(500));
        let after = pids.iter().map(|(_, p)| usage(*p)).collect::<Vec<_>>();
        let back = after.iter().zip(&baseline).all(|(a, b)| match (a, b) {
            (Some((_, fa)), Some((_, fb))) => fa <= fb,
            _ => false,
        });
        if back || settle.elapsed() > Duration::from_secs(10) {
            break after;
        }
    };

    // Report.
    let mut bad = Vec::new();
    println!(
        "# soak: {} clients, {} s, fs/exec/bridge = {}/{}/{}\n",
        args.clients,
        args.seconds,
        args.clients.div_ceil(3),
        (args.clients + 1) / 3,
        args.clients / 3
    );
    println!(
        "| t (s) | ops/s | {} |",
        pids.iter()
            .map(|(n, _)| format!("{n} RSS MiB / fds"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(pids.len()));
    let mut prev_ops = 0;
    let mut prev_t = 0.0;
    for (i, s) in samples.iter().enumerate() {
        let every = (samples.len() / 12).max(1);
        if i % every == every - 1 || i + 1 == samples.len() {
            let rate = (s.ops - prev_ops) as f64 / (s.t - prev_t).max(1e-9);
            (prev_ops, prev_t) = (s.ops, s.t);
            println!(
                "| {:.0} | {rate:.0} | {} |",
                s.t,
                s.procs
                    .iter()
                    .map(|p| p.map_or("gone".into(), |(r, f)| format!(
                        "{:.1} / {f}",
                        r as f64 / 1024.0
                    )))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
    println!();
    for (k, c) in &stats.ops {
        println!(
            "- {k}: {} operations ({:.0}/s)",
            c.load(Ordering::Relaxed),
            c.load(Ordering::Relaxed) as f64 / args.seconds.max(1) as f64
        );
    }
    let failed = stats.failed.load(Ordering::Relaxed);
    println!("- failed operations: {failed}");
    if failed > 0 {
        bad.push(format!("{failed} operations failed"));
        for f in transport::sync::lock(&stats.failures).iter() {
            println!("  - {f}");
        }
    }
    // Growth: mean RSS over the second fifth vs the last fifth (the first fifth is warm-up).
    let n = samples.len();
    for (j, (name, _)) in pids.iter().enumerate() {
        let rss = |range: std::ops::Range<usize>| -> Option<f64> {
            let v: Vec<u64> = samples[range]
                .iter()
                .filter_map(|s| s.procs[j].map(|(r, _)| r))
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0)
        };
        let peak = samples
            .iter()
            .filter_map(|s| s.procs[j].map(|(r, _)| r))
            .max()
            .unwrap_or(0) as f64
            / 1024.0;
        let growth = if n >= 5 {
            match (rss(n / 5..2 * n / 5), rss(4 * n / 5..n)) {
                (Some(a), Some(b)) => {
                    format!("{a:.1} → {b:.1} MiB ({:+.1} %)", (b - a) / a * 100.0)
                }
                _ => "n/a".into(),
            }
        } else {
            "too short".into()
        };
        let fds = match (baseline[j], after[j]) {
            (Some((_, b)), Some((_, a))) => {
                if a > b {
                    bad.push(format!(
                        "{name}: {a} fds after the clients left, {b} before"
                    ));
                }
                format!("{b} before, {a} after")
            }
            _ => {
                bad.push(format!("{name} exited during the soak"));
                "process gone".into()
            }
        };
        println!("- {name}: peak RSS {peak:.1} MiB; after warm-up {growth}; fds {fds}");
        if j == 0 && args.max_host_rss_mib > 0 && peak > args.max_host_rss_mib as f64 {
            bad.push(format!(
                "HOST offloadd peak RSS {peak:.1} MiB > {} MiB",
                args.max_host_rss_mib
            ));
        }
    }
    drop(daemons);
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    if bad.is_empty() {
        println!("\nsoak: PASS");
        Ok(())
    } else {
        println!("\nsoak: FAIL: {}", bad.join("; "));
        std::process::exit(1);
    }
}
