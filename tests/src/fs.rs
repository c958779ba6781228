//! Helpers for the qtfs tests: a real `offloadd` serving fs exports and real FUSE mounts made
//! with `mount_qtfs`, both cleaned up on drop (even when a test fails).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True when FUSE mounts can be made here (root and /dev/fuse); prints a skip line otherwise.
pub fn fuse_ready(test: &str) -> bool {
    if !crate::is_root() {
        crate::skip(test, "needs root to mount FUSE");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        crate::skip(test, "no /dev/fuse");
        return false;
    }
    true
}

/// The link kinds an fs test runs over, with tracing set up; none (after the skip line) when
/// FUSE mounts cannot be made here, so the test's loop body never runs.
pub fn fs_test_links(test: &str) -> Vec<String> {
    crate::init_tracing();
    if !fuse_ready(test) {
        return Vec::new();
    }
    crate::link_kinds()
}

/// One export line of the HOST config.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    /// HOST path.
    pub path: PathBuf,
    /// Read-only export.
    pub read_only: bool,
}

impl ExportSpec {
    /// A read-write export.
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        ExportSpec {
            path: path.into(),
            read_only: false,
        }
    }
    /// A read-only export.
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        ExportSpec {
            path: path.into(),
            read_only: true,
        }
    }
}

/// A temporary directory holding an empty `export/`, served read-write by a fresh HOST daemon
/// on link `kind`: the start of most fs tests.
pub fn host_with_export(kind: &str) -> (tempfile::TempDir, PathBuf, Host) {
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    std::fs::create_dir(&exp).expect("create export dir");
    let host = Host::start(kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    (tmp, exp, host)
}

/// A running HOST daemon (`offloadd --listen`) with an `[fs]` section.
pub struct Host {
    /// URL the daemon listens on.
    pub listen: String,
    /// Pre-shared key file.
    pub key: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Host {
    /// Starts offloadd on a fresh address of link `kind` serving `exports`.
    pub fn start(kind: &str, dir: &Path, exports: &[ExportSpec]) -> Host {
        Host::start_with(kind, dir, exports, "")
    }

    /// [`Host::start`] with more config sections (`extra` TOML, e.g. `[metrics]`).
    pub fn start_with(kind: &str, dir: &Path, exports: &[ExportSpec], extra: &str) -> Host {
        let key = crate::write_key(dir, "fs.key");
        let listen = crate::listen_url(kind, dir);
        let mut toml = String::from("[fs]\nexports = [\n");
        for e in exports {
            toml.push_str(&format!(
                "  {{ path = {:?}, read_only = {} }},\n",
                e.path.display().to_string(),
                e.read_only
            ));
        }
        toml.push_str("]\n");
        toml.push_str(extra);
        let config = dir.join("host.toml");
        std::fs::write(&config, toml).expect("write host.toml");
        let mut h = Host {
            listen,
            key,
            config,
            child: None,
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        if let Some(p) = self.listen.strip_prefix("unix://") {
            let _ = std::fs::remove_file(p);
        }
        let mut child = Command::new(crate::bin("offloadd"))
            .arg("--listen")
            .arg(&self.listen)
            .arg("--key-file")
            .arg(&self.key)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn offloadd");
        let out = child.stdout.take().expect("offloadd stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(out);
            // Other announcements (the metrics endpoint) may come first.
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false)
                && !line.contains("listening")
            {
                line.clear();
            }
            let _ = tx.send(line);
            // Keep draining so the daemon never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        // Owned before waiting so that a failed start is still killed on drop.
        self.child = Some(child);
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("offloadd did not report listening within 30 s");
        assert!(line.contains("listening"), "offloadd: {line:?}");
    }

    /// SIGKILLs the daemon (an unclean HOST restart).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same address, key and config.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `-o` options reaching this daemon.
    pub fn mount_opts(&self) -> String {
        format!(
            "addr={},keyfile={},allow_other",
            crate::connect_url(&self.listen),
            self.key.display()
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `script` (`sh -c`, stdout piped) while the HOST daemon is killed 300 ms in, kept down
/// for `down` and restarted; `after` later creates `stop`, which the script polls to end. Its
/// output once it ended. The workload runs in its own process, as on a real DPU, where the
/// HOST daemon is not a child of a process blocked on the mount.
pub fn workload_across_restart(
    host: &mut Host,
    script: &str,
    stop: &Path,
    down: Duration,
    after: Duration,
) -> Output {
    let worker = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    std::thread::sleep(Duration::from_millis(300));
    host.kill();
    std::thread::sleep(down);
    host.restart();
    std::thread::sleep(after);
    std::fs::write(stop, b"").expect("create the stop file");
    worker.wait_with_output().expect("wait for the workload")
}

/// A live qtfs mount; lazily unmounted on drop.
pub struct Mount {
    /// Mount point.
    pub dir: PathBuf,
}

/// Runs `mount_qtfs SRC DST -o OPTS` (backgrounding) and returns its output.
pub fn mount_cmd(src: &Path, dst: &Path, opts: &str) -> Output {
    Command::new(crate::bin("mount_qtfs"))
        .arg(src)
        .arg(dst)
        .arg("-o")
        .arg(opts)
        .output()
        .expect("run mount_qtfs")
}

impl Mount {
    /// Mounts HOST `src` at `dst` (created if missing) with the host's address/key plus `extra`
    /// options; panics with mount_qtfs's message on failure.
    pub fn new(host: &Host, src: &Path, dst: &Path, extra: &str) -> Mount {
        std::fs::create_dir_all(dst).expect("create mount point");
        let mut opts = host.mount_opts();
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        let out = mount_cmd(src, dst, &opts);
        assert!(
            out.status.success(),
            "mount_qtfs {} {} failed: {}",
            src.display(),
            dst.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            is_mounted(dst),
            "{} not in mountinfo after mount_qtfs",
            dst.display()
        );
        Mount {
            dir: dst.to_path_buf(),
        }
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True when `dir` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let want = canon.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// Runs a command as `nobody` (uid/gid 65534) and returns its output.
pub fn as_nobody(prog: &str, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(prog)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody")
}

/// Runs `sh -c script` and asserts it succeeded; returns stdout.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary directory other users can traverse (tests run steps as `nobody`).
pub fn tmpdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    d
}

/// A small tmpfs mounted at a directory (which must exist), lazily unmounted on drop: a HOST
/// export that runs out of space.
pub struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (mount(8)'s syntax, e.g. "1m") at `dir`; panics if it cannot.
    pub fn mount(dir: &Path, size: &str) -> SmallTmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a {size} tmpfs at {}", dir.display());
        SmallTmpfs(dir.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
