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

/// How the tests' `rexec` reaches the server: a link kind, directly or through a `rexec_mux`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Link kind between the caller's side and the server (tests::link_kinds()).
    pub kind: String,
    /// Through a `rexec_mux` holding the session (rexec itself then does no handshake).
    pub mux: bool,
}

impl std::fmt::Display for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mux {
            write!(f, "{} via rexec_mux", self.kind)
        } else {
            write!(f, "{}", self.kind)
        }
    }
}

/// Every link kind directly, and tcp (the deployed link, when among the kinds) through a mux:
/// the behaviours checked must hold both ways. The mux is the caller's side only (its session
/// is the same code over every link), so it runs once, on the machine's tier; the VM tier
/// (vsock, rdma under emulation, a time budget per suite) keeps its runs as they were.
pub fn setups() -> Vec<Setup> {
    let kinds = tests::link_kinds();
    let mut v: Vec<Setup> = kinds
        .iter()
        .map(|k| Setup {
            kind: k.clone(),
            mux: false,
        })
        .collect();
    if mux_tier() {
        v.push(Setup {
            kind: "tcp".into(),
            mux: true,
        });
    }
    v
}

/// True where the exec tests also run through a mux: on the machine's tier (tcp among the
/// link kinds), see [`setups`].
pub fn mux_tier() -> bool {
    tests::link_kinds().iter().any(|k| k == "tcp")
}

/// An address nothing listens on: in mux mode rexec gets it as `CMD_NET_ADDR`, so a call that
/// fell back to a direct connection instead of going through the mux fails (exit 255).
pub const DEAD_ADDR: &str = "tcp://127.0.0.1:1";

/// A running `rexec_mux` (killed on drop).
pub struct Mux {
    pub child: Child,
    /// Its socket (`REXEC_CONTROL`).
    pub path: PathBuf,
}

impl Mux {
    /// Starts `rexec_mux` for `url` with `key` (and extra link arguments), its socket in
    /// `dir/ctl/`, and waits until the socket exists with its final mode.
    pub fn start(url: &str, key: &Path, dir: &Path, extra: &[&str]) -> Mux {
        let path = dir.join("ctl").join("mux.sock");
        let child = Command::new(tests::bin("rexec_mux"))
            .env("CMD_NET_ADDR", url)
            .arg("--key-file")
            .arg(key)
            .arg("--control-path")
            .arg(&path)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rexec_mux");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Up once the socket is there with its final mode (the mux binds, then restricts it;
        // a test that loosens the mode must not race that).
        let ready = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600)
        };
        while !ready(&path) {
            assert!(Instant::now() < deadline, "rexec_mux did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mux { child, path }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `rexec_server` (killed on drop), and the mux in front of it in mux mode.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub key: PathBuf,
    pub dir: tempfile::TempDir,
    pub mux: Option<Mux>,
}

impl Server {
    /// Starts `rexec_server` on a fresh `kind` link and waits until `rexec true` works.
    pub fn start(kind: &str) -> Server {
        Self::start_with(kind, &[])
    }

    /// [`Server::start`], then a `rexec_mux` in front of it if `setup.mux`.
    pub fn start_setup(setup: &Setup) -> Server {
        Self::start_setup_with(setup, &[])
    }

    /// [`Server::start_setup`] with extra link arguments for `rexec_server` and the mux.
    pub fn start_setup_with(setup: &Setup, extra: &[&str]) -> Server {
        let mut s = Self::start_with(&setup.kind, extra);
        if setup.mux {
            s.mux = Some(Mux::start(&s.url, &s.key, s.dir.path(), extra));
            s.wait_ready();
        }
        s
    }

    /// `CMD_NET_ADDR`, `OFFLOAD_KEY_FILE` and `REXEC_CONTROL` for a `rexec` aimed at this
    /// server (through the mux in mux mode, with a dead direct address, see [`DEAD_ADDR`]).
    pub fn rexec_env(&self) -> Vec<(&'static str, String)> {
        let key = self.key.to_string_lossy().into_owned();
        match &self.mux {
            Some(m) => vec![
                ("CMD_NET_ADDR", DEAD_ADDR.to_string()),
                ("OFFLOAD_KEY_FILE", key),
                ("REXEC_CONTROL", m.path.to_string_lossy().into_owned()),
            ],
            None => vec![
                ("CMD_NET_ADDR", self.url.clone()),
                ("OFFLOAD_KEY_FILE", key),
                ("REXEC_CONTROL", "none".to_string()),
            ],
        }
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
            mux: None,
        };
        s.wait_ready();
        s
    }

    /// Waits until `rexec true` works.
    fn wait_ready(&self) {
        let s = self;
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
    }

    /// A `rexec` command aimed at this server (stdio inherited unless the caller changes it).
    pub fn rexec(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tests::bin("rexec"));
        c.envs(self.rexec_env()).args(args);
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The mux first (its session would only see the server go).
        self.mux = None;
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
