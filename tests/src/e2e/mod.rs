//! The separated-DPU harness every end-to-end test uses (issue 11).
//!
//! - HOST = this machine's PID and network namespaces; `offloadd --listen` runs in a private
//!   mount namespace in which `/run` and `/var/lib` are test directories, so the shims it
//!   launches and their containers use HOST default paths without touching the real ones.
//! - A veth pair (`oe2e-h` 10.254.80.1/30 here ↔ `oe2e-d` 10.254.80.2/30 in the DPU) carries
//!   the link over TCP — no loopback between the sides.
//! - DPU = `unshare -m -p -n -u -i -f` running `tests/e2e/dpu-init.sh` as its PID 1: its own
//!   root (read-only `/usr`, a copy of `/etc`, its own `/var`, tmpfs `/run` and `/tmp`, its own
//!   proc/sys/dev) entered with `pivot_root`, the old root detached. Inside it, `offload dpu
//!   setup` builds `/another_rootfs` from `dpu.toml`, then the DPU's `offloadd --connect`
//!   (bridge) and containerd chrooted in `/another_rootfs` (the shim replacement first on PATH).
//!
//! Labs are serialized with a file lock (one veth, one address pair) and torn down by `Drop`
//! even when a test fails: the DPU's PID 1 is killed (its namespaces and every qtfs mount go with
//! it), HOST shims in the lab's mount namespace and processes in the lab's cgroups are killed,
//! the HOST daemon stops, the veth and the lab's cgroups are removed, then the state directory.

pub mod image;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// containerd namespace of the lab (cgroup paths are shared by the one kernel).
pub const NS: &str = "oe2e";
/// HOST end of the veth.
pub const HOST_VETH: &str = "oe2e-h";
/// DPU end of the veth.
pub const DPU_VETH: &str = "oe2e-d";
/// HOST address on the veth.
pub const HOST_IP: &str = "10.254.80.1";
/// DPU address on the veth.
pub const DPU_IP: &str = "10.254.80.2";
/// HOST offloadd port on the veth address.
pub const PORT: u16 = 7380;
/// The management plane's root on the DPU.
pub const ROOT: &str = "/another_rootfs";
/// containerd's socket inside the DPU's root.
pub const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";
/// cgroup parent for CRI pods of a lab (`/oe2e/…`: the lab sweeps it like ctr's `/oe2e/<id>`).
pub const CGROUP_PARENT: &str = "/oe2e";
const LOCK: &str = "/tmp/oe2e.lock";

/// What a lab starts.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Run `offload dpu setup` on the DPU (containerd needs it).
    pub setup: bool,
    /// Start containerd on the DPU (after setup and the DPU offloadd).
    pub containerd: bool,
    /// Enable containerd's CRI plugin ([`crate::cri::containerd_cri_config`]: `sandbox_image` =
    /// [`crate::images::PAUSE_REF`], cgroupfs, host-network pods, no CNI plugins) and share its state directory
    /// `/run/containerd/io.containerd.grpc.v1.cri` through qtfs; off: the plugin is disabled.
    /// Pods should use a cgroup parent below [`CGROUP_PARENT`] (swept by the lab's Drop).
    pub cri: bool,
    /// Extra TOML appended to containerd's config.
    pub containerd_extra: String,
    /// Extra `[rootfs]` keys appended to the DPU's `dpu.toml` section.
    pub rootfs_extra: String,
    /// The offload-shim to deploy instead of the build's (e.g. the static deploy build,
    /// `cargo static-bins`).
    pub shim: Option<PathBuf>,
    /// Also run dockerd 20.10 on the DPU (after containerd, its `--containerd`), chrooted in
    /// the root and supervised by `offload run` (mount forwarding): one qtfs mount of the whole
    /// `/var/lib/docker`, `[mount]` on the HOST allowing overlay2's mounts, dockerd's stdio
    /// FIFO directory bridged. `docker -H unix:///run/docker.sock` on the DPU: [`Lab::docker`].
    pub docker: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            setup: true,
            containerd: true,
            cri: false,
            containerd_extra: String::new(),
            rootfs_extra: String::new(),
            shim: None,
            docker: false,
        }
    }
}

/// A command's outcome, with a timeout turned into a clear failure text.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None`: killed by a signal or timed out).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// True when the limit was reached and the command was killed.
    pub timed_out: bool,
    /// How long it took.
    pub elapsed: Duration,
}

impl Run {
    /// Panics with `what`, the output and the timeout note unless the command exited 0.
    pub fn ok(self, what: &str) -> Run {
        assert!(
            self.code == Some(0),
            "{what}: {}\nstdout: {}\nstderr: {}",
            self.describe(),
            self.stdout,
            self.stderr
        );
        self
    }

    /// "exit N" / "timed out after …" / "killed by a signal".
    pub fn describe(&self) -> String {
        match (self.timed_out, self.code) {
            (true, _) => format!("timed out after {:?} (hang)", self.elapsed),
            (false, Some(c)) => format!("exit {c} after {:?}", self.elapsed),
            (false, None) => "killed by a signal".into(),
        }
    }
}

/// Runs `cmd` with stdio captured; kills it (and reports `timed_out`) after `limit`.
pub fn run_timeout(mut cmd: Command, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let to = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    // A grandchild may still hold the pipes after a timeout: don't wait for it forever.
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        let t = Instant::now();
        while !h.is_finished() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
        } else {
            String::from("(output still held open by a child)")
        }
    };
    Run {
        code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        stdout: join(to),
        stderr: join(te),
        timed_out,
        elapsed,
    }
}

/// Holds the lab lock (flock on a file) for the lab's lifetime.
struct LabLock(#[allow(dead_code)] File);

impl LabLock {
    fn take() -> LabLock {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .expect("open lab lock");
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {LOCK}");
        LabLock(f)
    }
}

/// A running separated DPU + HOST pair. See the module docs.
pub struct Lab {
    dir: tempfile::TempDir,
    host: Option<Child>,
    host_pid: u32,
    host_mntns: String,
    unshare: Option<Child>,
    dpu_init: u32,
    _lock: LabLock,
}

fn sh(cmd: &str) -> Run {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]);
    run_timeout(c, Duration::from_secs(30))
}

/// Why a lab cannot run here (None: it can).
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("needs root (namespaces, veth, mounts)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    for t in [
        "unshare",
        "nsenter",
        "ip",
        "containerd",
        "ctr",
        "runc",
        "tar",
    ] {
        if sh(&format!("command -v {t}")).code != Some(0) {
            return Some(format!(
                "{t} not installed (apt-get install containerd runc iproute2 util-linux tar)"
            ));
        }
    }
    if !Path::new("/usr/bin/containerd-shim-runc-v2").exists() {
        return Some("containerd-shim-runc-v2 not installed".into());
    }
    None
}

fn wait_for_file_line(path: &Path, needle: &str, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            if t.contains(needle) {
                return Ok(());
            }
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{needle:?} not in {} within {limit:?}:\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Lab {
    /// Starts HOST and DPU (and containerd unless disabled); `None` (after a skip line) when the
    /// machine cannot run it. Panics with the failing step's output otherwise.
    pub fn start(test: &str, opts: LabOptions) -> Option<Lab> {
        crate::init_tracing();
        if let Some(why) = unavailable() {
            crate::skip(test, &why);
            return None;
        }
        let lock = LabLock::take();
        // Leftovers of a run that was killed before its Drop (same names; we hold the lock, so
        // no other lab is running): the veth, shims of the lab's namespace, its cgroups.
        let _ = sh(&format!("ip link del {HOST_VETH} 2>/dev/null"));
        sweep_leftovers();
        let dir = tempfile::Builder::new()
            .prefix("oe2e-")
            .tempdir()
            .expect("tempdir");
        let mut lab = Lab {
            dir,
            host: None,
            host_pid: 0,
            host_mntns: String::new(),
            unshare: None,
            dpu_init: 0,
            _lock: lock,
        };
        lab.prepare(&opts);
        lab.start_host();
        lab.start_dpu();
        if opts.setup {
            lab.dpu_setup();
        }
        lab.start_dpu_offloadd();
        if opts.containerd {
            assert!(
                opts.setup,
                "containerd on the DPU needs `offload dpu setup`"
            );
            lab.start_containerd();
        }
        if opts.docker {
            assert!(opts.containerd, "dockerd on the DPU needs its containerd");
            lab.start_dockerd();
        }
        Some(lab)
    }

    /// The lab's state directory on this machine.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The DPU machine's root directory (pivot_root'ed into by the DPU).
    fn dpu_disk(&self) -> PathBuf {
        self.dir().join("dpu")
    }

    /// PID (in this namespace) of the DPU's init.
    pub fn dpu_init_pid(&self) -> u32 {
        self.dpu_init
    }

    /// PID of the HOST offloadd (whose mount namespace is the HOST's view).
    pub fn host_offloadd_pid(&self) -> u32 {
        self.host_pid
    }

    /// A DPU path (machine root) as seen from this test process.
    pub fn dpu_path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.dpu_init, p))
    }

    /// A path in the DPU's management-plane root as seen from this test process.
    pub fn dpu_root_path(&self, p: &str) -> PathBuf {
        self.dpu_path(&format!("{ROOT}{p}"))
    }

    /// A HOST path (in the HOST daemon's mount namespace) as seen from this test process.
    pub fn host_path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.host_pid, p))
    }

    /// containerd's socket as this test process reaches it (for gRPC clients such as CRI).
    pub fn containerd_socket(&self) -> PathBuf {
        self.dpu_root_path(CONTAINERD_SOCK)
    }

    /// A command run on the DPU at its machine root (all of the DPU's namespaces).
    pub fn dpu_machine(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.dpu_init.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
        ])
        .args(["-r", "-w", "--", "env"])
        .arg("PATH=/opt/offload/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .args(args);
        c
    }

    /// A command run on the DPU inside the management plane's root (like containerd), killed
    /// inside the DPU after `limit` too (so a hung `ctr` does not outlive the test).
    pub fn dpu(&self, args: &[&str], limit: Duration) -> Run {
        let secs = limit.as_secs().max(1).to_string();
        let mut full = vec!["chroot", ROOT, "timeout", "-s", "KILL", &secs];
        full.extend_from_slice(args);
        let mut r = run_timeout(self.dpu_machine(&full), limit + Duration::from_secs(3));
        // timeout(1) and nsenter pass the SIGKILL on: killed at the limit = timed out.
        if r.code.is_none() && r.elapsed + Duration::from_millis(200) >= limit {
            r.timed_out = true;
        }
        r
    }

    /// `sh -c script` on the DPU inside the management plane's root.
    pub fn dpu_sh(&self, script: &str, limit: Duration) -> Run {
        self.dpu(&["sh", "-c", script], limit)
    }

    /// `ctr -n oe2e ARGS` on the DPU.
    pub fn ctr(&self, args: &[&str], limit: Duration) -> Run {
        let mut full = vec!["ctr", "--address", CONTAINERD_SOCK, "-n", NS];
        full.extend_from_slice(args);
        self.dpu(&full, limit)
    }

    /// `ctr -n NS ARGS` on the DPU for another containerd namespace (e.g. `k8s.io` for CRI).
    pub fn ctr_ns(&self, ns: &str, args: &[&str], limit: Duration) -> Run {
        let mut full = vec!["ctr", "--address", CONTAINERD_SOCK, "-n", ns];
        full.extend_from_slice(args);
        self.dpu(&full, limit)
    }

    /// `sh -c script` on the HOST, in the HOST daemon's mount namespace (HOST default paths).
    pub fn host_sh(&self, script: &str, limit: Duration) -> Run {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.host_pid.to_string(),
            "-m",
            "--",
            "sh",
            "-c",
            script,
        ]);
        run_timeout(c, limit)
    }

    /// A DPU log file's content (`/var/log/oe2e/NAME` on the DPU).
    pub fn dpu_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dpu_path(&format!("/var/log/oe2e/{name}"))).unwrap_or_default()
    }

    /// The HOST daemon's log.
    pub fn host_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("host-offloadd.log")).unwrap_or_default()
    }

    /// Every log of the lab, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- host offloadd\n{}\n--- dpu offloadd\n{}\n--- containerd\n{}\n--- shim\n{}\n--- dockerd\n{}",
            tail(self.host_log()),
            tail(self.dpu_log("dpu-offloadd.log")),
            tail(self.dpu_log("containerd.log")),
            tail(self.dpu_log("shim.log")),
            tail(self.dpu_log("dockerd.log")),
        )
    }

    /// Paths of the files the HOST daemon holds open that were deleted.
    pub fn host_deleted_fds(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/fd", self.host_pid)) {
            for e in rd.flatten() {
                if let Ok(t) = std::fs::read_link(e.path()) {
                    let s = t.to_string_lossy().into_owned();
                    if s.ends_with("(deleted)") {
                        v.push(s);
                    }
                }
            }
        }
        v
    }

    /// PIDs of HOST processes living in the lab's HOST mount namespace other than the daemon
    /// (the shims it launched).
    pub fn host_shims(&self) -> Vec<(u32, String)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.host_pid {
                continue;
            }
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if ns == self.host_mntns {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                    .unwrap_or_default();
                v.push((pid, cmd));
            }
        }
        v
    }

    /// PIDs in the lab's containerd namespace cgroups (`/sys/fs/cgroup/pids/oe2e/…`).
    pub fn container_pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for base in cgroup_dirs() {
            collect_procs(&base, &mut v);
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Sends SIGUSR1 to the DPU's containerd and returns the goroutine dump it logs.
    pub fn containerd_goroutines(&self) -> String {
        let before = self.dpu_log("containerd.log").len();
        let pid = self.containerd_pid();
        if let Some(pid) = pid {
            // SAFETY: plain kill(2) on a pid of the lab's containerd.
            unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        }
        std::thread::sleep(Duration::from_millis(500));
        let log = self.dpu_log("containerd.log");
        log.get(before..).unwrap_or_default().to_string()
    }

    /// HOST pid (this namespace) of the DPU's containerd.
    pub fn containerd_pid(&self) -> Option<u32> {
        let t = std::fs::read_to_string(self.dpu_path("/var/log/oe2e/containerd.hostpid")).ok()?;
        t.trim().parse().ok()
    }

    /// Stops the DPU's containerd with SIGTERM; `Ok(time taken)` when it exits within `limit`.
    pub fn stop_containerd(&self, limit: Duration) -> Result<Duration, String> {
        let pid = self.containerd_pid().ok_or("containerd pid unknown")?;
        let start = Instant::now();
        // SAFETY: kill(2) on the lab's containerd.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            if start.elapsed() > limit {
                return Err(format!("containerd still running {limit:?} after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    fn prepare(&self, opts: &LabOptions) {
        let d = self.dir();
        let r = self.dpu_disk();
        let host = d.join("host");
        for p in [
            "run/containerd/io.containerd.runtime.v2.task",
            "run/containerd/io.containerd.runtime.v1.linux",
            "run/containerd/io.containerd.grpc.v1.cri",
            "run/containerd/fifo",
            "run/containerd/s",
            "run/docker/containerd",
            "var/lib/containerd",
            "var/lib/docker/containers",
            "var/lib/docker/containerd",
            "var/lib/docker/overlay2",
            "var/lib/docker/image",
            "var/lib/docker/tmp",
            "var/lib/kubelet/pods",
        ] {
            std::fs::create_dir_all(host.join(p)).unwrap();
        }
        for p in ["etc", "opt/offload/bin", "var/log/oe2e", "var/lib", "root"] {
            std::fs::create_dir_all(r.join(p)).unwrap();
        }
        sh(&format!("cp -a /etc/. {}/etc/", r.display())).ok("copying /etc for the DPU");
        // Binaries for the DPU's /opt/offload/bin.
        for b in [
            "offload",
            "offloadd",
            "mount_qtfs",
            "rexec",
            "rexec-full",
            "offload-shim",
            "remote_kill",
        ] {
            // A hard link when the build and the lab share a filesystem (debug binaries are
            // ~100 MB each: copying them cost most of a lab's start), else a copy.
            let src = match (&opts.shim, b) {
                (Some(p), "offload-shim") => p.clone(),
                _ => crate::bin(b),
            };
            let dst = r.join("opt/offload/bin").join(b);
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).unwrap();
            }
        }
        let key = crate::write_key(d, "psk");
        // dockerd's container stdio FIFOs live in its exec-root on the DPU.
        let fifo_dirs = if opts.docker {
            "\"/run/containerd/fifo\", \"/run/docker/containerd\""
        } else {
            "\"/run/containerd/fifo\""
        };
        let mount = if opts.docker {
            "[mount]\nallow = [\n  { fstype = \"overlay\", target_under = \"/var/lib/docker/overlay2\" },\n  \
             { fstype = \"tmpfs\", target_under = \"/var/lib/docker/containers\" },\n]\n"
        } else {
            ""
        };
        std::fs::create_dir_all(r.join("etc/offload")).unwrap();
        std::fs::copy(&key, r.join("etc/offload/psk")).unwrap();
        std::fs::write(
            d.join("host.toml"),
            String::from(
                "[fs]\nexports = [\n  { path = \"/proc\" },\n  { path = \"/sys\" },\n  \
             { path = \"/var/lib/containerd\" },\n  { path = \"/run/containerd\" },\n  \
             { path = \"/var/lib/docker\" },\n  { path = \"/var/lib/kubelet/pods\" },\n  \
             { path = \"/run/docker\" },\n  { path = \"/var/run/docker/containerd\" },\n]\n\
             [exec]\nallow_any = true\n[bridge]\nwatch = [\"/run/containerd/s\"]\n\
             fifo_dirs = [FIFO_DIRS]\nallow_kill = true\n",
            )
            .replace("FIFO_DIRS", fifo_dirs)
                + mount,
        )
        .unwrap();
        let addr = format!("tcp://{HOST_IP}:{PORT}");
        std::fs::write(
            r.join("etc/offload/dpu.toml"),
            format!(
                r#"[qtfs]
addr = "{addr}"
key_file = "/etc/offload/psk"

[bridge]
fifo_dirs = [{}]
[[bridge.forward]]
listen_side = "host"
path = "/run/containerd/containerd.sock.ttrpc"
[bridge.shim]
connect = "{addr}"
key_file = "/etc/offload/psk"

[rootfs]
binds = [{{ src = "/usr", ro = true }}, "/etc", "/run", "/var/log", "/opt/offload"]
qtfs = ["/var/lib/containerd", "/run/containerd/io.containerd.runtime.v2.task"{}]
qtfs_options = "log=/var/log/oe2e/qtfs.log"
wrappers = [{{ path = "/opt/offload/host/uname", exec = "/usr/bin/uname" }}]
rexec = "/opt/offload/bin/rexec"
{}
{}"#,
                fifo_dirs,
                // With the CRI plugin: its state, and kubelet's pod directories (host-path
                // volumes live there; the CRI plugin creates missing ones on the DPU side).
                if opts.cri {
                    ", \"/run/containerd/io.containerd.grpc.v1.cri\", \"/var/lib/kubelet/pods\""
                } else {
                    ""
                },
                opts.rootfs_extra,
                // dockerd: setup adds one qtfs mount of its data root, the cgroup v1
                // hierarchies over the qtfs /sys and the start script running it under
                // `offload run` (tools/src/rootfs).
                if opts.docker {
                    "[rootfs.docker]\nwrapper = \"/opt/offload/bin/offload-dockerd\"\n\
                     args = [\"--containerd-namespace\", \"oe2e\", \"--containerd-plugins-namespace\", \
                     \"oe2e-plugins\", \"--cgroup-parent\", \"/oe2e\", \"--bridge=none\", \
                     \"--iptables=false\", \"--ip-masq=false\", \"--userland-proxy=false\"]\n"
                } else {
                    ""
                }
            ),
        )
        .unwrap();
        std::fs::create_dir_all(r.join("etc/containerd")).unwrap();
        std::fs::write(r.join("etc/containerd/oe2e.toml"), containerd_config(opts)).unwrap();
    }

    fn start_host(&mut self) {
        let d = self.dir().to_path_buf();
        let r = sh(&format!(
            "ip link add {HOST_VETH} type veth peer name {DPU_VETH} && \
             ip addr add {HOST_IP}/30 dev {HOST_VETH} && ip link set {HOST_VETH} up"
        ));
        r.ok("creating the veth pair");
        let log = File::create(d.join("host-offloadd.log")).unwrap();
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount --bind \"$H/run\" /run && mount --bind \"$H/var/lib\" /var/lib && \
                 exec \"$OFFLOADD\" --listen \"$LISTEN\" --key-file \"$KEY\" --config \"$CONF\"",
            )
            .env("H", d.join("host"))
            .env("OFFLOADD", crate::bin("offloadd"))
            .env("LISTEN", format!("tcp://{HOST_IP}:{PORT}"))
            .env("KEY", d.join("psk"))
            .env("CONF", d.join("host.toml"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut c);
        let child = c.spawn().expect("starting the HOST offloadd");
        self.host_pid = child.id();
        self.host = Some(child);
        wait_for_file_line(
            &d.join("host-offloadd.log"),
            "listening on",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("HOST offloadd: {e}"));
        self.host_mntns = std::fs::read_link(format!("/proc/{}/ns/mnt", self.host_pid))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
    }

    fn start_dpu(&mut self) {
        let d = self.dir().to_path_buf();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/dpu-init.sh");
        let log = File::create(d.join("dpu-init.log")).unwrap();
        let mut c = Command::new("unshare");
        // --kill-child: the DPU's PID 1 (and with it the whole DPU) dies with unshare, which
        // dies with this process (die_with_parent) even if it is killed before Drop runs.
        c.args([
            "-m",
            "-p",
            "-n",
            "-u",
            "-i",
            "--kill-child",
            "--propagation",
            "private",
        ])
        .arg("bash")
        .arg(&script)
        .env("R", self.dpu_disk())
        .env("VETH", DPU_VETH)
        .env("DIP", DPU_IP)
        .env("HIP", HOST_IP)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        die_with_parent(&mut c);
        let child = c.spawn().expect("starting the DPU");
        let upid = child.id();
        self.unshare = Some(child);
        let start = Instant::now();
        loop {
            let kids = std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
                .unwrap_or_default();
            if let Some(p) = kids.split_whitespace().next().and_then(|s| s.parse().ok()) {
                self.dpu_init = p;
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "DPU init did not start:\n{}",
                std::fs::read_to_string(d.join("dpu-init.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        sh(&format!("ip link set {DPU_VETH} netns {}", self.dpu_init))
            .ok("moving the veth end into the DPU");
        wait_for_file_line(
            &d.join("dpu-init.log"),
            "DPU-READY",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("DPU: {e}"));
    }

    /// `offload dpu setup` on the DPU (also what tests call to check idempotence).
    pub fn offload(&self, args: &[&str]) -> Run {
        let mut full = vec!["offload"];
        full.extend_from_slice(args);
        run_timeout(self.dpu_machine(&full), Duration::from_secs(90))
    }

    fn dpu_setup(&self) {
        let r = self.offload(&["dpu", "setup", "--config", "/etc/offload/dpu.toml"]);
        assert!(
            r.code == Some(0),
            "offload dpu setup on the DPU: {}\n{}\n{}\n--- host offloadd\n{}",
            r.describe(),
            r.stdout,
            r.stderr,
            self.host_log()
        );
    }

    /// Starts a daemon on the DPU (detached, logging to /var/log/oe2e/NAME.log, its HOST pid in
    /// /var/log/oe2e/NAME.hostpid is not known here: the DPU pid goes to NAME.pid).
    fn dpu_daemon(&self, name: &str, script: &str) {
        let full = format!(
            "setsid sh -c '{script}' >/var/log/oe2e/{name}.log 2>&1 </dev/null & echo $! >/var/log/oe2e/{name}.pid"
        );
        run_timeout(
            self.dpu_machine(&["sh", "-c", &full]),
            Duration::from_secs(10),
        )
        .ok(&format!("starting {name} on the DPU"));
    }

    fn start_dpu_offloadd(&self) {
        self.dpu_daemon(
            "dpu-offloadd",
            "exec offloadd --connect tcp://10.254.80.1:7380 --key-file /etc/offload/psk --config /etc/offload/dpu.toml",
        );
        wait_for_file_line(
            &self.dpu_path("/var/log/oe2e/dpu-offloadd.log"),
            "connected to",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("DPU offloadd: {e}\n{}", self.host_log()));
    }

    fn start_containerd(&self) {
        self.dpu_daemon(
            "containerd",
            "exec chroot /another_rootfs env PATH=/opt/offload/shim:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
             OFFLOAD_SHIM_LOG=/var/log/oe2e/shim.log containerd --config /etc/containerd/oe2e.toml --log-level debug",
        );
        // The DPU pid of containerd → its pid here (for signals from the test).
        let dpid: u32 = std::fs::read_to_string(self.dpu_path("/var/log/oe2e/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("containerd pid file");
        if let Some(hp) = host_pid_of(self.dpu_init, dpid) {
            let _ = std::fs::write(
                self.dpu_path("/var/log/oe2e/containerd.hostpid"),
                hp.to_string(),
            );
        }
        wait_for_file_line(
            &self.dpu_path("/var/log/oe2e/containerd.log"),
            "containerd successfully booted",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("containerd on the DPU: {e}\n{}", self.logs()));
    }
}

impl Lab {
    /// dockerd on the DPU through the start script `offload dpu setup` generated from
    /// `[rootfs.docker]` (see [`LabOptions::docker`]).
    fn start_dockerd(&self) {
        self.dpu_daemon(
            "dockerd",
            "RUST_LOG=info,transport=warn exec /opt/offload/bin/offload-dockerd",
        );
        wait_for_file_line(
            &self.dpu_path("/var/log/oe2e/dockerd.log"),
            "API listen on",
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("dockerd on the DPU: {e}\n{}", self.logs()));
    }

    /// `docker ARGS` on the DPU (inside the root, against the lab's dockerd).
    pub fn docker(&self, args: &[&str], limit: Duration) -> Run {
        let mut full = vec!["docker", "-H", "unix:///run/docker.sock"];
        full.extend_from_slice(args);
        self.dpu(&full, limit)
    }
}

/// containerd's config on the DPU (`/etc/containerd/oe2e.toml`).
fn containerd_config(opts: &LabOptions) -> String {
    let mut c = String::from("version = 2\n");
    if !opts.cri {
        c.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
    }
    c.push_str(&format!(
        "root = \"/var/lib/containerd\"\nstate = \"/run/containerd\"\n\
         [grpc]\n  address = \"{CONTAINERD_SOCK}\"\n"
    ));
    if opts.cri {
        // Host-network pods, cgroupfs, the pause image imported by the test, OOM score clamped
        // (see `cri::containerd_cri_config`); the CNI directories stay empty.
        c.push_str(&crate::cri::containerd_cri_config(
            crate::images::PAUSE_REF,
            "io.containerd.runc.v2",
            Path::new("/opt/cni/bin"),
            Path::new("/etc/cni/net.d"),
        ));
    }
    c.push_str(&opts.containerd_extra);
    c.push('\n');
    c
}

/// The child gets SIGKILL when the test process dies (PR_SET_PDEATHSIG survives exec).
fn die_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Kills what a lab killed before its Drop left: processes in the `oe2e` cgroups and real shims
/// serving the `oe2e` containerd namespace; removes the `oe2e` cgroups.
fn sweep_leftovers() {
    let mut pids = Vec::new();
    for d in cgroup_dirs() {
        collect_procs(&d, &mut pids);
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-namespace" && w[1] == NS.as_bytes());
        if is_shim && ours {
            pids.push(pid);
        }
    }
    for pid in pids {
        // SAFETY: kill(2) on processes of the lab's namespace/cgroups (see above).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
    for d in cgroup_dirs() {
        remove_cgroup_tree(&d);
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The pid in this namespace of `dpid` in the PID namespace of `init`.
fn host_pid_of(init: u32, dpid: u32) -> Option<u32> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|s| s.parse::<u32>().ok());
        if inner == Some(dpid) {
            return Some(pid);
        }
    }
    None
}

/// `/sys/fs/cgroup/<controller>/oe2e` (v1) or `/sys/fs/cgroup/oe2e` (v2) where they exist.
fn cgroup_dirs() -> Vec<PathBuf> {
    namespace_cgroup_dirs(NS)
}

/// The cgroup directories ctr's default cgroup path (`/<namespace>/<id>`) uses for `ns`.
fn namespace_cgroup_dirs(ns: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join(ns).is_dir() {
        v.push(root.join(ns));
    }
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path().join(ns);
        if p.is_dir() {
            v.push(p);
        }
    }
    v
}

/// Removes the (empty) cgroups ctr made for containerd namespace `ns` (`/<ns>/<id>` in every
/// hierarchy), for tests and tools that run containers in their own namespace.
pub fn remove_namespace_cgroups(ns: &str) {
    for d in namespace_cgroup_dirs(ns) {
        remove_cgroup_tree(&d);
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(f) = File::open(dir.join("cgroup.procs")) {
        out.extend(
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_procs(&e.path(), out);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Lab {
    fn drop(&mut self) {
        let kill = |pid: u32| {
            // SAFETY: kill(2) on processes this lab started (identified by namespace/cgroup).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        };
        // The DPU: its PID 1 takes every DPU process, its mount namespace and qtfs mounts along.
        if self.dpu_init != 0 {
            kill(self.dpu_init);
        }
        if let Some(mut u) = self.unshare.take() {
            let _ = u.kill();
            let _ = u.wait();
        }
        // HOST: shims launched by the lab's HOST daemon, then the containers they ran.
        if !self.host_mntns.is_empty() {
            for (pid, _) in self.host_shims() {
                kill(pid);
            }
        }
        for pid in self.container_pids() {
            kill(pid);
        }
        if let Some(mut h) = self.host.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let start = Instant::now();
        while !self.container_pids().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in cgroup_dirs() {
            remove_cgroup_tree(&d);
        }
        let _ = sh(&format!("ip link del {HOST_VETH} 2>/dev/null"));
        // Wait for the DPU init to be gone so its mounts are released before the files go.
        let start = Instant::now();
        while Path::new(&format!("/proc/{}", self.dpu_init)).exists()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::env::var_os("OE2E_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("OE2E_KEEP: lab state left in {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}
