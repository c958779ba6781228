//! Shared helpers for the integration and end-to-end tests: locating the workspace binaries,
//! writing pre-shared keys, picking free ports and reporting skips loudly.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directory holding the workspace binaries (`target/<profile>/`), derived from the test executable
/// (`target/<profile>/deps/<test>-<hash>`). `OFFLOAD_BIN_DIR` overrides it (the VM tier uses this).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OFFLOAD_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test exe has a parent");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    dir
}

/// Path of a workspace binary; panics with the build command to run if it is missing, because the
/// test command builds every binary before running tests (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// Writes a fresh random 32-byte pre-shared key (hex) with mode 0600 into `dir` and returns its path.
pub fn write_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::File::create(&path).expect("create key file");
    f.write_all(hex.as_bytes()).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// True when running as root; tests needing root call [`skip`] otherwise.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Prints a skip reason where CI logs show it. Never skip silently: the line goes straight to
/// the process's stderr, which libtest does not capture (it captures only `print!`/`eprint!`).
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Installs a tracing subscriber honouring `RUST_LOG` once per test binary.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The link kinds the transport-agnostic tests exercise: `OFFLOAD_TEST_LINKS` (comma separated,
/// e.g. `vsock,rdma` inside the VM tier), default `tcp,unix`.
pub fn link_kinds() -> Vec<String> {
    std::env::var("OFFLOAD_TEST_LINKS")
        .unwrap_or_else(|_| "tcp,unix".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A fresh listen URL for `kind`, using `dir` for Unix socket paths. vsock listens on `any`
/// (connect to CID 1 inside the VM); rdma listens on `OFFLOAD_RDMA_LISTEN_IP` (rxe0's address).
pub fn listen_url(kind: &str, dir: &Path) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match kind {
        "tcp" => format!("tcp://127.0.0.1:{}", free_port()),
        "unix" => format!("unix://{}/link-{n}.sock", dir.display()),
        "vsock" => format!(
            "vsock://any:{}",
            20000 + (std::process::id() % 20000) + n * 7
        ),
        "rdma" => {
            let ip = std::env::var("OFFLOAD_RDMA_LISTEN_IP").unwrap_or_else(|_| "10.10.0.1".into());
            format!(
                "rdma://{ip}:{}",
                20000 + (std::process::id() % 20000) + n * 7
            )
        }
        other => panic!("unknown link kind {other:?} in OFFLOAD_TEST_LINKS"),
    }
}

/// The URL a client uses to reach a listener created from [`listen_url`].
pub fn connect_url(listen: &str) -> String {
    match listen.strip_prefix("vsock://any:") {
        Some(port) => format!("vsock://1:{port}"),
        None => listen.to_string(),
    }
}
pub mod cri;
pub mod e2e;
pub mod fs;
pub mod images;
pub mod scratch_containerd;
pub mod scratch_dockerd;

/// Kills and reaps the daemons a test started, even when the test fails.
pub struct KillOnDrop(pub Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd` and waits (up to 15 s) for a stdout line containing `ready`, e.g. offloadd's
/// "listening on" / "connected to".
pub fn spawn_ready(mut cmd: std::process::Command, ready: &str) -> std::process::Child {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn daemon");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(&ready) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(15))
        .expect("daemon ready line");
    child
}

/// Polls `f` every 10 ms until it holds; fails the test after `limit`.
pub fn wait_until(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
