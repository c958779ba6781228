//! A private dockerd for tests on this machine, like [`crate::scratch_containerd`]: data-root,
//! exec-root, socket and `/run` under a temporary directory, its own mount namespace, no bridge
//! and no iptables rules (containers use `--network none` or `host`), cgroup parent
//! `/oecri/<dir name>`. dockerd starts its own containerd under the exec-root. Dropping it removes
//! every container, stops dockerd, kills any shim left under its directory and removes its
//! cgroups; the machine's `/var/lib/docker` and `/run/docker*` are never touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scratch_containerd::ScratchError;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScratchError {
    let what = what.into();
    move |source| ScratchError::Io { what, source }
}

/// Tools a scratch dockerd needs; the first one missing, for a skip reason.
pub fn missing_tool() -> Option<&'static str> {
    ["/usr/sbin/dockerd", "/usr/bin/docker", "/usr/bin/unshare"]
        .into_iter()
        .find(|p| !Path::new(p).exists())
}

/// A running private dockerd; see the module docs.
pub struct ScratchDockerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    cgroup_parent: String,
}

impl ScratchDockerd {
    /// Starts dockerd (overlay2, cgroupfs) and waits until `docker version` answers.
    pub fn start() -> Result<Self, ScratchError> {
        let dir = tempfile::Builder::new()
            .prefix("oecri-dk-")
            .tempdir()
            .map_err(io("tempdir"))?;
        let d = dir.path();
        for sub in ["run", "data", "exec"] {
            std::fs::create_dir_all(d.join(sub)).map_err(io(format!("mkdir {sub}")))?;
        }
        std::fs::write(d.join("daemon.json"), "{}\n").map_err(io("write daemon.json"))?;
        let socket = d.join("docker.sock");
        let tag = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("oecri-dk-{}", std::process::id()));
        let cgroup_parent = format!("/oecri/{tag}");
        let log = std::fs::File::create(d.join("dockerd.log")).map_err(io("create log"))?;
        let log2 = log.try_clone().map_err(io("dup log"))?;
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$1/run\" /run && exec dockerd --data-root \"$1/data\" \
                 --exec-root \"$1/exec\" --pidfile \"$1/dockerd.pid\" -H \"unix://$1/docker.sock\" \
                 --config-file \"$1/daemon.json\" --bridge=none --iptables=false --ip6tables=false \
                 --ip-masq=false --storage-driver overlay2 --exec-opt native.cgroupdriver=cgroupfs \
                 --cgroup-parent \"$2\"",
            )
            .arg("sh")
            .arg(d)
            .arg(&cgroup_parent)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawn unshare dockerd"))?;
        let mut me = ScratchDockerd {
            dir,
            socket,
            child: Some(child),
            cgroup_parent,
        };
        let limit = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            // Dial first: a client waits (ctr: 10 s) on a socket nobody listens on yet.
            let ok = std::os::unix::net::UnixStream::connect(&me.socket).is_ok()
                && me
                    .docker()
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
                let log =
                    std::fs::read_to_string(me.dir.path().join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(ScratchError::NotReady(limit, tail.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    /// The dockerd API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The cgroup parent of its containers (removed on drop).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// `docker -H unix://SOCK` with nothing else.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }

    /// Runs `docker ARGS…`, returning stdout; an error carries stderr.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String, ScratchError> {
        let out = self
            .docker()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("run docker {}", args.join(" "))))?;
        if !out.status.success() {
            return Err(ScratchError::Ctr {
                args: format!("(docker) {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pids of the shims serving this dockerd's containerd (their arguments name its directory).
    pub fn shim_pids(&self) -> Vec<u32> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .map(|a| a.ends_with(b"containerd-shim-runc-v2"))
                .unwrap_or(false);
            if is_shim && args.iter().any(|a| a.starts_with(dir.as_bytes())) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for ScratchDockerd {
    fn drop(&mut self) {
        let alive = self
            .child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false);
        if alive && std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
            let ids = self.docker_ok(&["ps", "-aq"]).unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker_ok(&args);
            }
        }
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            let mut exited = false;
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let base = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                crate::scratch_containerd::remove_cgroup_tree(&base);
                let _ = std::fs::remove_dir(h.path().join("oecri"));
            }
        }
    }
}
