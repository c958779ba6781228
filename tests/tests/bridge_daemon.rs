//! The bridge inside real `offloadd` daemons: `[bridge]` config parsing, the role taken from
//! --listen/--connect, watched-dir mirroring between processes, and recovery when the HOST
//! daemon dies and comes back (the DPU redials; proxies go with the old session and return
//! with the new one).

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{spawn_ready, wait_until, KillOnDrop as Kill};

fn is_sock(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Echo one line through `path`.
fn echo(path: &Path, msg: &str) -> String {
    let mut s = UnixStream::connect(path).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn bridge_daemons_mirror_and_recover_from_host_restart() {
    tests::init_tracing();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (h, p) = (d.join("host"), d.join("dpu"));
    std::fs::create_dir_all(h.join("s")).unwrap();
    std::fs::create_dir_all(&p).unwrap();
    let key = tests::write_key(d, "psk");
    let addr = format!("tcp://127.0.0.1:{}", tests::free_port());
    std::fs::write(
        d.join("host.toml"),
        format!("[bridge]\nwatch = [\"{}\"]\n", h.join("s").display()),
    )
    .unwrap();
    std::fs::write(
        d.join("dpu.toml"),
        format!(
            "[bridge]\nallow_listen = [\"{0}\"]\n[[bridge.map]]\nfrom = \"{1}\"\nto = \"{0}\"\n",
            p.display(),
            h.display()
        ),
    )
    .unwrap();
    let offloadd = tests::bin("offloadd");
    let host_cmd = || {
        let mut c = Command::new(&offloadd);
        c.args(["--listen", &addr, "--key-file"])
            .arg(&key)
            .arg("--config")
            .arg(d.join("host.toml"));
        c
    };
    let mut host = spawn_ready(host_cmd(), "listening");
    let mut dpu = Command::new(&offloadd);
    dpu.args(["--connect", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("dpu.toml"));
    let _dpu = Kill(vec![spawn_ready(dpu, "connected")]);

    // A server socket in the watched HOST dir (echoes what it reads, prefixed).
    let orig = h.join("s").join("svc.sock");
    let l = UnixListener::bind(&orig).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = String::new();
                if c.read_to_string(&mut buf).is_ok() {
                    let _ = c.write_all(format!("host got: {buf}").as_bytes());
                }
            });
        }
    });
    let mirror = p.join("s").join("svc.sock");
    wait_until("mirror on the DPU", Duration::from_secs(2), || {
        is_sock(&mirror)
    });
    assert_eq!(echo(&mirror, "one"), "host got: one");

    // HOST daemon dies: the DPU drops the proxy (its session ended) ...
    host.kill().unwrap();
    host.wait().unwrap();
    wait_until(
        "proxy removed after HOST death",
        Duration::from_secs(5),
        || !mirror.exists(),
    );
    assert!(UnixStream::connect(&mirror).is_err());

    // ... and gets it back once the HOST daemon is up again (redial backoff ≤ 5 s).
    let host = spawn_ready(host_cmd(), "listening");
    let _host = Kill(vec![host]);
    wait_until(
        "proxy back after HOST restart",
        Duration::from_secs(15),
        || is_sock(&mirror),
    );
    assert_eq!(echo(&mirror, "two"), "host got: two");
}
