//! Shared helpers for the exec tests: a real `rexec_server` on a fresh link with an allow-list,
//! and running the real `rexec` against it.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Binaries the test server allows (resolved by the server; unlisted ones are refused).
pub const ALLOWED: &[&str] = &[
    "/bin/sh",
    "/bin/true",
    "/bin/false",
    "/usr/bin/sha256sum",
    "/usr/bin/cat",
    "/usr/bin/head",
    "/usr/bin/pwd",
    "/usr/bin/env",
    "/usr/bin/sleep",
    "/usr/bin/tty",
    "/usr/bin/stty",
    "/usr/bin/echo",
];

/// A running `rexec_server` (killed on drop).
pub struct Server {
    pub child: Child,
    pub url: String,
    pub key: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts `rexec_server` on a fresh `kind` link and waits until `rexec true` works.
    pub fn start(kind: &str) -> Server {
        Self::start_with(kind, &[])
    }

    /// [`Server::start`] with extra `rexec_server` arguments (e.g. heartbeat settings).
    pub fn start_with(kind: &str, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = tests::write_key(dir.path(), "psk");
        let cfg = dir.path().join("exec.toml");
        let list: Vec<String> = ALLOWED.iter().map(|p| format!("{p:?}")).collect();
        std::fs::write(&cfg, format!("[exec]\nallow = [{}]\n", list.join(", "))).expect("cfg");
        let listen = tests::listen_url(kind, dir.path());
        let child = Command::new(tests::bin("rexec_server"))
            .env("CMD_NET_ADDR", &listen)
            .arg("--key-file")
            .arg(&key)
            .arg("--config")
            .arg(&cfg)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rexec_server");
        let s = Server {
            child,
            url: tests::connect_url(&listen),
            key,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = s.rexec(&["/bin/true"]).output().expect("run rexec");
            if out.status.code() == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rexec_server on {} did not come up: {}",
                s.url,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// A `rexec` command aimed at this server (stdio inherited unless the caller changes it).
    pub fn rexec(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tests::bin("rexec"));
        c.env("CMD_NET_ADDR", &self.url)
            .env("OFFLOAD_KEY_FILE", &self.key)
            .args(args);
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with `stdin` bytes (written from a thread) and collects its output.
pub fn run_with_stdin(mut cmd: Command, stdin: Option<&Path>) -> Output {
    match stdin {
        Some(p) => {
            cmd.stdin(std::fs::File::open(p).expect("open stdin file"));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output().expect("run")
}

/// Writes `n` random bytes to a file in `dir`.
pub fn random_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).expect("create"));
    let mut left = n;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let k = left.min(buf.len());
        rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..k]);
        f.write_all(&buf[..k]).expect("write");
        left -= k;
    }
    f.flush().expect("flush");
    p
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits (bounded) for a file to appear with content; returns it.
pub fn wait_file(p: &Path, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
