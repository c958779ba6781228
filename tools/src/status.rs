//! `offload status`: asks the local daemons over their control sockets (see
//! `offload_metrics::control`) and prints, at a glance, each daemon's sessions (peer,
//! transport, uptime, reconnects, round trip, bytes), per service and per fs operation counts,
//! errors and p50/p99 latencies, the bridge's connections and bytes, and the qtfs mounts of this
//! machine with their options. `--json` for scripts, `--watch` to refresh.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use offload_metrics::{control, OpSnapshot, Snapshot};
use serde::Serialize;

/// `offload status` options.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  offload status\n  offload status --json | jq '.daemons[0].sessions'\n  offload status --watch 1\n  offload status --socket /run/offload/offloadd-host.sock --metrics\n\
Without --socket, every offloadd-*.sock in $OFFLOAD_CONTROL_DIR (default /run/offload) is asked."
)]
pub struct StatusArgs {
    /// A daemon's control socket (repeatable); default: every offloadd-*.sock in the control
    /// directory.
    #[arg(long, value_name = "PATH")]
    pub socket: Vec<PathBuf>,
    /// Print JSON (one document per refresh) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Print the Prometheus text the daemon exports instead (same as GET /metrics).
    #[arg(long, conflicts_with = "json")]
    pub metrics: bool,
    /// Refresh every SECS seconds (default 2) until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
}

/// One daemon's answer, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Daemon {
    socket: PathBuf,
    #[serde(flatten)]
    status: Snapshot,
}

/// A qtfs mount of this machine.
#[derive(Debug, Serialize)]
struct QtfsMount {
    source: String,
    target: String,
    options: String,
}

/// Everything one refresh shows.
#[derive(Debug, Serialize)]
struct Report {
    daemons: Vec<Daemon>,
    /// Sockets that did not answer, with the reason.
    unreachable: Vec<(PathBuf, String)>,
    mounts: Vec<QtfsMount>,
}

/// The control sockets to ask.
fn sockets(args: &StatusArgs) -> anyhow::Result<Vec<PathBuf>> {
    if !args.socket.is_empty() {
        return Ok(args.socket.clone());
    }
    let dir = std::env::var_os("OFFLOAD_CONTROL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(control::DEFAULT_DIR));
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {} (is offloadd running?)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("offloadd-") && n.ends_with(".sock"))
        })
        .collect();
    found.sort();
    anyhow::ensure!(
        !found.is_empty(),
        "no offloadd-*.sock in {} (is offloadd running? give --socket PATH)",
        dir.display()
    );
    Ok(found)
}

/// qtfs mounts from `/proc/self/mounts`: type `fuse.qtfs`, or `fuse` with a `qtfs:…` source
/// (the kernel drops the subtype of mounts made without fusermount).
fn qtfs_mounts() -> Vec<QtfsMount> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let qtfs = f.len() >= 4
                && (f[2] == "fuse.qtfs" || (f[2] == "fuse" && f[0].starts_with("qtfs:")));
            qtfs.then(|| QtfsMount {
                source: offload_fs::mount::spec::unescape(f[0]),
                target: offload_fs::mount::spec::unescape(f[1]),
                options: f[3].to_string(),
            })
        })
        .collect()
}

fn collect(socks: &[PathBuf]) -> Report {
    let mut daemons = Vec::new();
    let mut unreachable = Vec::new();
    for s in socks {
        match control::status(s) {
            Ok(status) => daemons.push(Daemon {
                socket: s.clone(),
                status,
            }),
            Err(e) => unreachable.push((s.clone(), e.to_string())),
        }
    }
    Report {
        daemons,
        unreachable,
        mounts: qtfs_mounts(),
    }
}

/// Runs `offload status`; returns the exit code (1 when no daemon answered).
pub fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let socks = sockets(&args)?;
    if let Some(secs) = args.watch {
        anyhow::ensure!(
            secs.is_finite() && secs > 0.0,
            "--watch takes a positive number of seconds"
        );
    }
    loop {
        let code = if args.metrics {
            let mut ok = false;
            for s in &socks {
                match control::query(s, "metrics") {
                    Ok(t) => {
                        ok = true;
                        print!("{t}");
                    }
                    Err(e) => eprintln!("offload status: {e}"),
                }
            }
            u8::from(!ok)
        } else {
            let r = collect(&socks);
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                if args.watch.is_some() {
                    // Clear the screen and home the cursor.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", render(&r));
            }
            u8::from(r.daemons.is_empty())
        };
        match args.watch {
            Some(secs) => std::thread::sleep(Duration::from_secs_f64(secs)),
            None => return Ok(code),
        }
    }
}

/// Human-readable byte count.
fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Human-readable duration for latencies.
fn lat(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

fn uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn op_row(out: &mut String, name: &str, o: &OpSnapshot) {
    out.push_str(&format!(
        "    {:<12} {:>10} {:>7} {:>9} {:>9}\n",
        name,
        o.count,
        o.errors,
        lat(o.p50_seconds),
        lat(o.p99_seconds)
    ));
}

fn count_of(ops: &[OpSnapshot], names: &[&str]) -> u64 {
    ops.iter()
        .filter(|o| names.contains(&o.name.as_str()))
        .map(|o| o.count - o.errors)
        .sum()
}

fn render(r: &Report) -> String {
    let mut out = String::new();
    for d in &r.daemons {
        let s = &d.status;
        out.push_str(&format!(
            "offloadd {} {} (pid {}, v{}, up {}) [{}]\n",
            if s.info.role.is_empty() {
                "?"
            } else {
                &s.info.role
            },
            s.info.address,
            s.pid,
            s.version,
            uptime(s.uptime_seconds),
            d.socket.display()
        ));
        out.push_str(&format!(
            "  services offered: {}\n",
            if s.info.services.is_empty() {
                "none".to_string()
            } else {
                s.info.services.join(", ")
            }
        ));
        out.push_str(&format!(
            "  sessions: {} live, {} established, {} reconnects; link {} in, {} out\n",
            s.sessions.len(),
            s.sessions_total,
            s.reconnects,
            bytes(s.link_bytes_in),
            bytes(s.link_bytes_out)
        ));
        for x in &s.sessions {
            out.push_str(&format!(
                "    peer {} ({}, {}) up {}: rtt {}, {} in, {} out, {} streams open, {} calls in flight\n",
                x.peer,
                x.transport,
                x.role,
                uptime(x.uptime_seconds),
                lat(x.rtt_seconds),
                bytes(x.bytes_in),
                bytes(x.bytes_out),
                x.open_streams,
                x.calls_in_flight
            ));
        }
        if !s.services.is_empty() {
            out.push_str("  served          count  errors       p50       p99\n");
            for v in &s.services {
                if v.calls.count > 0 {
                    op_row(&mut out, &format!("{} calls", v.name), &v.calls);
                }
                if v.streams.count > 0 || v.open_streams > 0 {
                    op_row(&mut out, &format!("{} streams", v.name), &v.streams);
                    out.push_str(&format!(
                        "      ({} open; latency = time open)\n",
                        v.open_streams
                    ));
                }
            }
        }
        if !s.fs_ops.is_empty() {
            out.push_str("  fs op           count  errors       p50       p99\n");
            for o in &s.fs_ops {
                op_row(&mut out, &o.name, o);
            }
            let opened = count_of(&s.fs_ops, &["open", "create", "opendir"]);
            let released = count_of(&s.fs_ops, &["release", "releasedir"]);
            out.push_str(&format!(
                "    open handles (opened − released): {}\n",
                opened.saturating_sub(released)
            ));
        }
        let b = &s.bridge;
        if b.connections > 0 || b.fifo_bytes_in + b.fifo_bytes_out > 0 {
            out.push_str(&format!(
                "  bridge: {} connections ({} open), sockets {} out / {} in, fifos {} out / {} in\n",
                b.connections,
                b.open_connections,
                bytes(b.socket_bytes_out),
                bytes(b.socket_bytes_in),
                bytes(b.fifo_bytes_out),
                bytes(b.fifo_bytes_in)
            ));
        }
    }
    for (p, e) in &r.unreachable {
        out.push_str(&format!("unreachable: {}: {e}\n", p.display()));
    }
    if r.mounts.is_empty() {
        out.push_str("qtfs mounts here: none\n");
    } else {
        out.push_str("qtfs mounts here:\n");
        for m in &r.mounts {
            out.push_str(&format!("  {} on {} ({})\n", m.source, m.target, m.options));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(lat(Some(42e-6)), "42µs");
        assert_eq!(lat(Some(0.0025)), "2.50ms");
        assert_eq!(uptime(61.0), "1m01s");
    }
}
