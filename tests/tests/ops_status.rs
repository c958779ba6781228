//! `offload status` and the Prometheus endpoint against a live HOST/DPU pair of real `offloadd`
//! daemons: counters move when the fs (a real qtfs mount), exec (real `rexec` runs) and the
//! bridge (a proxied Unix socket) are used; percentiles are plausible; the endpoint's output
//! parses as Prometheus text format (strict line parser below); the control socket is 0600.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{spawn_ready, wait_until, KillOnDrop};

/// A free port in this test's assigned range (7700–7799).
fn port_in_range() -> u16 {
    for p in 7700..7800 {
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in 7700..7800");
}

fn status_json(sock: &Path) -> Value {
    let out = Command::new(tests::bin("offload"))
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()
        .expect("run offload status");
    assert!(
        out.status.success(),
        "offload status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    v["daemons"][0].clone()
}

fn op<'a>(d: &'a Value, name: &str) -> Option<&'a Value> {
    d["fs_ops"].as_array()?.iter().find(|o| o["name"] == name)
}

fn op_count(d: &Value, name: &str) -> u64 {
    op(d, name).and_then(|o| o["count"].as_u64()).unwrap_or(0)
}

fn service<'a>(d: &'a Value, name: &str) -> Option<&'a Value> {
    d["services"].as_array()?.iter().find(|s| s["name"] == name)
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP head");
    (head.to_string(), body.to_string())
}

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}")),
    }
}

/// Parses `{k="v",…}` at the start of `s`; returns the labels and the rest.
type Labels = Vec<(String, String)>;

fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut val = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next().ok_or("unterminated label value")?;
            match c {
                '\\' => match chars.next().map(|x| x.1) {
                    Some('n') => val.push('\n'),
                    Some('\\') => val.push('\\'),
                    Some('"') => val.push('"'),
                    other => return Err(format!("bad escape \\{other:?}")),
                },
                '"' => break i,
                '\n' => return Err("newline in label value".into()),
                c => val.push(c),
            }
        };
        labels.push((key.to_string(), val));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} after a label, got {rest:?}"));
        }
    }
}

/// A strict parser for the text exposition format (Prometheus 0.0.4 and OpenMetrics text):
/// every line is a HELP/TYPE/UNIT comment, `# EOF` (last), or a sample `name{labels} value
/// [timestamp]` of a family declared by a TYPE line before it, with the suffix its type allows.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if eof {
            return Err(err("content after # EOF".into()));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            let mut it = c.splitn(3, ' ');
            let (kw, name) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            if !valid_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            match kw {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = it.next().unwrap_or("");
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ]
                    .contains(&t)
                    {
                        return Err(err(format!("unknown type {t:?}")));
                    }
                    if types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(err("family declared twice".into()));
                    }
                }
                other => return Err(err(format!("unknown comment {other:?}"))),
            }
            continue;
        }
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("sample without value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err(format!("bad sample name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>()
                .map_err(|e| err(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        // The family this sample belongs to, by the suffixes its type allows.
        let family = [
            ("_total", "counter"),
            ("_created", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
            ("_info", "info"),
        ]
        .iter()
        .find_map(|(suf, t)| {
            let base = name.strip_suffix(suf)?;
            (types.get(base).map(String::as_str) == Some(*t)).then_some(base)
        })
        .or_else(|| {
            types
                .get(name)
                .filter(|t| matches!(t.as_str(), "gauge" | "untyped" | "unknown"))
                .map(|_| name)
        });
        if family.is_none() {
            return Err(err(format!("sample {name} of no declared family")));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.value)
}

/// Every histogram's buckets are cumulative (non-decreasing in `le`) and end in +Inf = count.
fn check_histograms(samples: &[Sample]) {
    let mut series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    let key = |s: &Sample, base: &str| {
        let mut l: Vec<String> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        l.sort();
        format!("{base}{{{}}}", l.join(","))
    };
    for s in samples {
        if let Some(base) = s.name.strip_suffix("_bucket") {
            let le = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .map(|(_, v)| parse_value(v).expect("le is a number"))
                .expect("bucket has le");
            series.entry(key(s, base)).or_default().push((le, s.value));
        } else if let Some(base) = s.name.strip_suffix("_count") {
            counts.insert(key(s, base), s.value);
        }
    }
    assert!(!series.is_empty(), "no histogram in the output");
    for (k, b) in &series {
        for w in b.windows(2) {
            assert!(w[0].0 < w[1].0, "{k}: le not increasing");
            assert!(w[0].1 <= w[1].1, "{k}: buckets not cumulative");
        }
        let last = b.last().expect("buckets");
        assert!(last.0.is_infinite(), "{k}: no +Inf bucket");
        assert_eq!(Some(&last.1), counts.get(k), "{k}: +Inf bucket != count");
    }
}

#[test]
fn status_and_metrics_follow_fs_exec_and_bridge() {
    const T: &str = "status_and_metrics_follow_fs_exec_and_bridge";
    tests::init_tracing();
    if !tests::fs::fuse_ready(T) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (data, mnt, hs, ds) = (
        d.join("data"),
        d.join("mnt"),
        d.join("host-s"),
        d.join("dpu-s"),
    );
    for p in [&data, &mnt, &hs, &ds] {
        std::fs::create_dir_all(p).unwrap();
    }
    let key = tests::write_key(d, "psk");
    let port = port_in_range();
    let addr = format!("tcp://127.0.0.1:{port}");
    let (mport_h, mport_d) = {
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (
            l1.local_addr().unwrap().port(),
            l2.local_addr().unwrap().port(),
        )
    };
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[fs]\nexports = [ {{ path = \"{}\" }} ]\n[exec]\nallow_any = true\n\
             [bridge]\nwatch = [\"{}\"]\n[metrics]\nlisten = \"127.0.0.1:{mport_h}\"\n",
            data.display(),
            hs.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dpu.toml"),
        format!(
            "[bridge]\nallow_listen = [\"{0}\"]\n[[bridge.map]]\nfrom = \"{1}\"\nto = \"{0}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{mport_d}\"\ncontrol_socket = \"{2}\"\n",
            ds.display(),
            hs.display(),
            d.join("dpu.sock").display()
        ),
    )
    .unwrap();
    let (host_sock, dpu_sock) = (d.join("host.sock"), d.join("dpu.sock"));
    let offloadd = tests::bin("offloadd");
    let mut host = Command::new(&offloadd);
    host.args([
        "--listen",
        &addr,
        "--heartbeat-interval",
        "0.2",
        "--key-file",
    ])
    .arg(&key)
    .arg("--config")
    .arg(d.join("host.toml"))
    .arg("--control-socket")
    .arg(&host_sock);
    let mut daemons = KillOnDrop(vec![spawn_ready(host, "listening on")]);
    let mut dpu = Command::new(&offloadd);
    dpu.args([
        "--connect",
        &addr,
        "--heartbeat-interval",
        "0.2",
        "--key-file",
    ])
    .arg(&key)
    .arg("--config")
    .arg(d.join("dpu.toml"));
    daemons.0.push(spawn_ready(dpu, "connected to"));

    // Root-only control sockets, one per daemon (the DPU's from its [metrics] section).
    for s in [&host_sock, &dpu_sock] {
        let m = std::fs::metadata(s).expect("control socket exists");
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", s.display());
    }

    let before = status_json(&host_sock);
    assert_eq!(before["info"]["role"], "host");
    assert_eq!(before["info"]["address"], addr.as_str());
    let lookups0 = op_count(&before, "lookup");

    // fs: a real mount; creates, writes, reads, stats (some of a missing name: errors).
    let started = Instant::now();
    let out = tests::fs::mount_cmd(
        &data,
        &mnt,
        &format!("addr={addr},keyfile={}", key.display()),
    );
    assert!(
        out.status.success(),
        "mount_qtfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mount = tests::fs::Mount { dir: mnt.clone() };
    for i in 0..40 {
        let p = mnt.join(format!("f{i}"));
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap().len(), 4096);
        assert!(std::fs::metadata(mnt.join(format!("missing{i}"))).is_err());
    }
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 40);

    // exec: five real rexec runs on the HOST.
    for _ in 0..5 {
        let st = Command::new(tests::bin("rexec"))
            .args(["sh", "-c", "exit 0"])
            .env("CMD_NET_ADDR", &addr)
            .env("OFFLOAD_KEY_FILE", &key)
            .status()
            .unwrap();
        assert!(st.success());
    }

    // bridge: an echo server in the HOST's watched dir, used through its DPU mirror.
    let l = UnixListener::bind(hs.join("echo.sock")).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
            let _ = c.write_all(&buf);
        }
    });
    let mirror = ds.join("echo.sock");
    wait_until("bridge mirror on the DPU", Duration::from_secs(10), || {
        std::fs::symlink_metadata(&mirror).is_ok_and(|m| m.file_type().is_socket())
    });
    let payload = vec![b'b'; 10_000];
    for _ in 0..3 {
        let mut c = UnixStream::connect(&mirror).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&payload).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, payload);
    }
    let busy = started.elapsed();

    // Counters moved on the HOST.
    let after = status_json(&host_sock);
    assert!(
        op_count(&after, "lookup") >= lookups0 + 40,
        "lookups: {after}"
    );
    assert!(op_count(&after, "create") >= 40, "creates: {after}");
    assert!(op_count(&after, "write") >= 40, "writes: {after}");
    let lookup = op(&after, "lookup").unwrap();
    assert!(
        lookup["errors"].as_u64().unwrap() >= 40,
        "missing names are errors: {lookup}"
    );
    // Plausible percentiles: 0 < p50 <= p99 <= the largest sample <= the whole run.
    for o in after["fs_ops"].as_array().unwrap() {
        let (p50, p99) = (o["p50_seconds"].as_f64(), o["p99_seconds"].as_f64());
        let max = o["latency"]["max_seconds"].as_f64().unwrap();
        let (p50, p99) = (p50.expect("p50"), p99.expect("p99"));
        assert!(
            p50 > 0.0 && p50 <= p99 && p99 <= max + 1e-12 && max <= busy.as_secs_f64() + 1.0,
            "implausible latency for {}: p50 {p50} p99 {p99} max {max} (run took {busy:?})",
            o["name"]
        );
    }
    let exec = service(&after, "exec").expect("exec service stats");
    assert!(exec["streams"]["count"].as_u64().unwrap() >= 5, "{exec}");
    assert!(exec["streams"]["p99_seconds"].as_f64().unwrap() < 30.0);
    let fs = service(&after, "fs").expect("fs service stats");
    assert!(fs["calls"]["count"].as_u64().unwrap() >= 160, "{fs}");
    let bridge = &after["bridge"];
    assert!(bridge["connections"].as_u64().unwrap() >= 3, "{bridge}");
    assert!(
        bridge["socket_bytes_in"].as_u64().unwrap() >= 30_000,
        "{bridge}"
    );
    assert!(
        bridge["socket_bytes_out"].as_u64().unwrap() >= 30_000,
        "{bridge}"
    );
    assert!(after["link_bytes_in"].as_u64().unwrap() > 40 * 4096);
    // The DPU side counted its half of the bridge and its session.
    let dpu = status_json(&dpu_sock);
    assert_eq!(dpu["info"]["role"], "dpu");
    assert!(dpu["bridge"]["connections"].as_u64().unwrap() >= 3, "{dpu}");
    assert_eq!(dpu["reconnects"], 0);
    let s = &dpu["sessions"][0];
    assert_eq!(s["transport"], "tcp");
    assert_eq!(s["role"], "dialer");
    // Round trip: measured by the heartbeat once the link idles (interval 0.2 s).
    wait_until(
        "an RTT on the DPU's session",
        Duration::from_secs(10),
        || {
            status_json(&dpu_sock)["sessions"][0]["rtt_seconds"]
                .as_f64()
                .is_some_and(|r| r > 0.0 && r < 1.0)
        },
    );

    // The table names what it shows.
    let human = Command::new(tests::bin("offload"))
        .arg("status")
        .arg("--socket")
        .arg(&host_sock)
        .output()
        .unwrap();
    assert!(human.status.success());
    let human = String::from_utf8_lossy(&human.stdout);
    for want in [
        "offloadd host",
        "fs op",
        "lookup",
        "exec streams",
        "bridge:",
        "qtfs mounts here:",
    ] {
        assert!(human.contains(want), "{want:?} missing from:\n{human}");
    }
    assert!(
        human.contains(&mnt.display().to_string()),
        "the mount is listed:\n{human}"
    );

    // Prometheus: the HOST's endpoint parses strictly and agrees with the status.
    let (head, body) = http_get(mport_h, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    check_histograms(&samples);
    let prom_lookups = sample(&samples, "offload_fs_requests_total", &[("op", "lookup")])
        .expect("offload_fs_requests_total{op=\"lookup\"}");
    assert!(prom_lookups >= op_count(&after, "lookup") as f64);
    assert!(
        sample(
            &samples,
            "offload_fs_request_duration_seconds_count",
            &[("op", "write")]
        )
        .unwrap()
            >= 40.0
    );
    assert!(
        sample(
            &samples,
            "offload_service_streams_total",
            &[("service", "exec")]
        )
        .unwrap()
            >= 5.0
    );
    assert!(sample(&samples, "offload_bridge_connections_total", &[]).unwrap() >= 3.0);
    assert!(sample(&samples, "offload_sessions", &[]).unwrap() >= 1.0);
    let (head, _) = http_get(mport_h, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // The DPU's endpoint and `offload status --metrics` speak the same format.
    let (_, dbody) = http_get(mport_d, "/metrics");
    parse_exposition(&dbody).unwrap_or_else(|e| panic!("{e}\n{dbody}"));
    let m = Command::new(tests::bin("offload"))
        .args(["status", "--metrics", "--socket"])
        .arg(&dpu_sock)
        .output()
        .unwrap();
    assert!(m.status.success());
    let text = String::from_utf8(m.stdout).unwrap();
    let s = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        sample(&s, "offload_build_info", &[("role", "dpu")]),
        Some(1.0)
    );

    // The parser is strict: it rejects what Prometheus rejects.
    for bad in [
        "offload_x 1\n",                                  // no TYPE
        "# TYPE offload_x gauge\noffload_x{a=b} 1\n",     // unquoted label value
        "# TYPE offload_x gauge\noffload_x 1 2 3\n",      // trailing field
        "# TYPE offload_x counter\noffload_x_bucket 1\n", // wrong suffix for the type
        "# TYPE offload_x gauge\noffload_x one\n",        // not a number
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }

    // A daemon stopped with SIGTERM removes its control socket.
    let pid = daemons.0[1].id() as i32;
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until(
        "DPU control socket removed",
        Duration::from_secs(10),
        || !dpu_sock.exists(),
    );
}

#[test]
fn control_socket_refuses_a_second_daemon_and_status_reports_none() {
    tests::init_tracing();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = tests::write_key(d, "psk");
    let sock = d.join("c.sock");
    let offloadd = tests::bin("offloadd");
    let start = |port: u16| {
        let mut c = Command::new(&offloadd);
        c.args(["--listen", &format!("tcp://127.0.0.1:{port}"), "--key-file"])
            .arg(&key)
            .arg("--control-socket")
            .arg(&sock);
        c
    };
    let _first = KillOnDrop(vec![spawn_ready(start(tests::free_port()), "listening on")]);
    // An explicit path held by a live daemon is an error, not a silent takeover.
    let out = start(tests::free_port())
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "second daemon started on a held socket"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    // A fresh daemon: no sessions, no traffic; status still answers.
    let v = status_json(&sock);
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["sessions_total"], 0);
    // No socket at all: offload status fails with a message naming the path.
    let out = Command::new(tests::bin("offload"))
        .args(["status", "--socket"])
        .arg(d.join("absent.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("absent.sock"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
