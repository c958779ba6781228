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

/// Path of a workspace binary. The first call in a test process makes sure every workspace
/// binary is built and fresh ([`ensure_built`]), so a plain `cargo test --workspace` works and
/// never runs stale daemons; panics with the build command if the binary is still missing.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` (the README's test command does)",
        p.display()
    );
    p
}

/// Runs `cargo build --workspace --bins` once per test process, into the target directory and
/// profile this test executable was built with (features: `tools/rdma` when this crate has
/// `rdma`). Cargo does not build a workspace's binaries for another package's integration
/// tests, and `cargo test --workspace` must not need a separate build step. A no-op (after a
/// fresh check, ~1 s) when everything is built. Skipped when `OFFLOAD_BIN_DIR` points elsewhere
/// (the VM tier) or `OFFLOAD_TESTS_PREBUILT=1` (tests/run-all.sh built everything just before).
pub fn ensure_built() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("OFFLOAD_BIN_DIR").is_some()
            || std::env::var("OFFLOAD_TESTS_PREBUILT").is_ok_and(|v| v == "1")
        {
            return;
        }
        let dir = bin_dir();
        let Some(cmd) = build_command(&dir) else {
            let _ = writeln!(
                std::io::stderr(),
                "tests: {} is not a cargo target directory; not building binaries",
                dir.display()
            );
            return;
        };
        let mut cmd = cmd;
        let status = cmd.status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("building the workspace binaries failed ({other:?}): {cmd:?}"),
        }
    });
}

/// The `cargo build` that (re)builds the binaries in `dir` (`TARGET/<profile>` or
/// `TARGET/<triple>/<profile>`), or `None` when `dir` is not inside a cargo target directory.
pub fn build_command(dir: &Path) -> Option<std::process::Command> {
    let profile_dir = dir.file_name()?.to_str()?.to_string();
    let parent = dir.parent()?;
    // `CACHEDIR.TAG` marks a cargo target directory's root.
    let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
        (parent.to_path_buf(), None)
    } else {
        let root = parent.parent()?;
        if !root.join("CACHEDIR.TAG").exists() {
            return None;
        }
        (
            root.to_path_buf(),
            parent.file_name()?.to_str().map(String::from),
        )
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--workspace", "--bins", "--quiet", "--target-dir"])
        .arg(&target_dir);
    match profile_dir.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(t) = triple {
        cmd.args(["--target", &t]);
    }
    if cfg!(feature = "rdma") {
        cmd.args(["--features", "tools/rdma,tests/rdma"]);
    }
    Some(cmd)
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

/// A Unix socket server at `path` that echoes each connection's bytes back once the client
/// shut down its writing side (the HOST end of a bridged socket in soak and fault tests).
pub fn echo_unix_server(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if c.read_to_end(&mut buf).is_ok() {
                    let _ = c.write_all(&buf);
                }
            });
        }
    });
    Ok(())
}
