//! A private containerd for tests on this machine: root, state, socket and `/run` all under a
//! temporary directory, in its own mount namespace, so neither the machine's `/run/containerd`,
//! `/var/lib/containerd` nor `/opt/containerd` is touched and every mount it or its shims make
//! vanishes with them.
//!
//! containerd runs as `unshare -m` → `mount --bind DIR/run /run` → `exec containerd`: the shims
//! (children of containerd) inherit that namespace, so their sockets under `/run/containerd/s`
//! land in `DIR/run/containerd/s`, which the test's namespace sees at that path too. A `ctr` run
//! from the test therefore passes `--fifo-dir` ([`ScratchContainerd::fifo_dir`]) so both sides
//! name the same FIFOs. The PID namespace is the machine's: container pids are real HOST pids.
//!
//! Dropping it kills every task in the namespaces it was told about, stops containerd, kills any
//! shim still serving its socket, and removes the cgroup parent it used.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the scratch containerd could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// Creating its directories or config failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// containerd did not answer `ctr version` in time; the tail of its log says why.
    #[error("containerd did not come up within {0:?}; log tail:\n{1}")]
    NotReady(Duration, String),
    /// A `ctr` command failed.
    #[error("`ctr {args}` failed ({status}): {stderr}")]
    Ctr {
        /// The arguments given.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScratchError {
    let what = what.into();
    move |source| ScratchError::Io { what, source }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ScratchOptions {
    /// Enable the CRI plugin (with `sandbox_image` = [`crate::images::PAUSE_REF`], host-network
    /// pods only: no CNI plugins are installed).
    pub cri: bool,
    /// containerd namespaces whose tasks and containers are removed on drop (`k8s.io` is added
    /// when `cri` is set).
    pub namespaces: Vec<String>,
    /// Extra TOML appended to the generated config.
    pub extra_config: String,
    /// containerd's log level (`[debug] level`).
    pub log_level: String,
}

impl Default for ScratchOptions {
    fn default() -> Self {
        ScratchOptions {
            cri: false,
            namespaces: vec!["oecri".into()],
            extra_config: String::new(),
            log_level: "info".into(),
        }
    }
}

/// Tools a scratch containerd needs; the first one missing, for a skip reason.
pub fn missing_tool() -> Option<&'static str> {
    [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/unshare",
    ]
    .into_iter()
    .find(|p| !Path::new(p).exists())
    .or_else(|| {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("runc").exists()))
            .unwrap_or(false);
        (!found).then_some("runc")
    })
}

/// A running private containerd; see the module docs.
pub struct ScratchContainerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    namespaces: Vec<String>,
    cgroup_parent: String,
}

impl ScratchContainerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start(opts: &ScratchOptions) -> Result<Self, ScratchError> {
        let dir = tempfile::Builder::new()
            .prefix("oecri-")
            .tempdir()
            .map_err(io("tempdir"))?;
        let d = dir.path();
        for sub in ["root", "state", "run", "opt", "cni/bin", "cni/conf", "logs"] {
            std::fs::create_dir_all(d.join(sub)).map_err(io(format!("mkdir {sub}")))?;
        }
        let socket = d.join("containerd.sock");
        let tag = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("oecri-{}", std::process::id()));
        let cgroup_parent = format!("/oecri/{tag}");
        let mut cfg = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             [grpc]\n  address = \"{sock}\"\n\
             [debug]\n  level = \"{level}\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            opt = d.join("opt").display(),
            level = opts.log_level,
        );
        if opts.cri {
            cfg.push_str(&crate::cri::containerd_cri_config(
                crate::images::PAUSE_REF,
                "io.containerd.runc.v2",
                &d.join("cni/bin"),
                &d.join("cni/conf"),
            ));
        } else {
            // Top-level keys must precede the first table.
            cfg = cfg.replacen(
                "version = 2\n",
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
                1,
            );
        }
        cfg.push_str(&opts.extra_config);
        let cfg_path = d.join("config.toml");
        std::fs::write(&cfg_path, cfg).map_err(io("write config.toml"))?;
        let log = std::fs::File::create(d.join("containerd.log")).map_err(io("create log"))?;
        let log2 = log.try_clone().map_err(io("dup log"))?;
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$1/run\" /run && exec containerd --config \"$1/config.toml\"")
            .arg("sh")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawn unshare containerd"))?;
        let mut me = ScratchContainerd {
            dir,
            socket,
            child: Some(child),
            namespaces: {
                let mut ns = opts.namespaces.clone();
                if opts.cri && !ns.iter().any(|n| n == "k8s.io") {
                    ns.push("k8s.io".into());
                }
                ns
            },
            cgroup_parent,
        };
        let limit = Duration::from_secs(20);
        let start = Instant::now();
        loop {
            // Dial first: a client waits (ctr: 10 s) on a socket nobody listens on yet.
            let ok = std::os::unix::net::UnixStream::connect(&me.socket).is_ok()
                && me
                    .ctr("default")
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if ok {
                break;
            }
            let exited = me
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited || start.elapsed() > limit {
                return Err(ScratchError::NotReady(limit, me.log_tail(40)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// The containerd gRPC socket (for `ctr --address` and the CRI client).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temporary directory holding root, state, run, logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory for CRI pod logs (`log_directory`).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Where `ctr run` must create its FIFOs (`--fifo-dir`) so containerd's namespace sees them.
    pub fn fifo_dir(&self) -> PathBuf {
        self.dir.path().join("run/containerd/fifo")
    }

    /// The cgroup parent this instance's pods and containers should use (removed on drop).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// containerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `ctr --address SOCK -n NS` with nothing else.
    pub fn ctr(&self, ns: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).args(["-n", ns]);
        c
    }

    /// Runs `ctr -n NS ARGS…`, returning stdout; an error carries stderr.
    pub fn ctr_ok(&self, ns: &str, args: &[&str]) -> Result<String, ScratchError> {
        let out = self
            .ctr(ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("run ctr {}", args.join(" "))))?;
        if !out.status.success() {
            return Err(ScratchError::Ctr {
                args: args.join(" "),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr -n NS image import FILE` (local content only, unpacked for the default snapshotter).
    pub fn import(&self, ns: &str, tar: &Path) -> Result<String, ScratchError> {
        let p = tar.to_string_lossy();
        self.ctr_ok(ns, &["image", "import", &p])
    }

    /// Mount points (from containerd's own mount namespace) under this instance's directory,
    /// besides the `/run` bind itself: rootfs and volume mounts of live containers.
    pub fn mounts(&self) -> Vec<String> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let dir = self.dir.path().to_string_lossy().into_owned();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir) || m.starts_with("/run/"))
            .map(str::to_string)
            .collect()
    }

    /// Pids of processes whose command line names this instance's socket: its shims.
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket.to_string_lossy().into_owned();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if Some(pid) == self.pid() {
                continue;
            }
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .map(|a| a.ends_with(b"containerd-shim-runc-v2"))
                .unwrap_or(false);
            if is_shim && args.contains(&sock.as_bytes()) {
                out.push(pid);
            }
        }
        out
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// containerd's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Stops containerd gracefully (SIGTERM, up to 10 s, then SIGKILL); true if it exited on
    /// SIGTERM in time. Cleanup of containers and shims happens on drop.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    fn remove_everything(&self) {
        for ns in &self.namespaces {
            let tasks = self.ctr_ok(ns, &["task", "ls", "-q"]).unwrap_or_default();
            for t in tasks.split_whitespace() {
                let _ = self.ctr_ok(ns, &["task", "kill", "-a", "-s", "KILL", t]);
            }
            for t in tasks.split_whitespace() {
                // The CRI plugin deletes a task itself when it sees it exit: gone counts as done.
                for _ in 0..50 {
                    if self.ctr_ok(ns, &["task", "delete", "-f", t]).is_ok() {
                        break;
                    }
                    let left = self.ctr_ok(ns, &["task", "ls", "-q"]).unwrap_or_default();
                    if !left.split_whitespace().any(|x| x == t) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let cs = self
                .ctr_ok(ns, &["container", "ls", "-q"])
                .unwrap_or_default();
            for c in cs.split_whitespace() {
                let _ = self.ctr_ok(ns, &["container", "rm", c]);
            }
        }
    }
}

impl Drop for ScratchContainerd {
    fn drop(&mut self) {
        // ctr waits 10 s to dial a dead socket: only clean up through a live containerd.
        let alive = self
            .child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false);
        if alive && std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
            self.remove_everything();
        }
        self.stop();
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Leftover cgroups of this instance, deepest first (rmdir fails on a busy one).
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let base = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                remove_cgroup_tree(&base);
                let _ = std::fs::remove_dir(h.path().join("oecri"));
            }
        }
    }
}

/// Removes a cgroup directory and its sub-cgroups, deepest first (a busy one stays).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
