//! The CRI pod lifecycle (tests/src/cri.rs) through `offload-shim`: containerd with its CRI plugin
//! runs in a "DPU" mount namespace (private `/run`, offloadd connected to the HOST) with
//! `offload-shim` as the pods' runtime; the real `containerd-shim-runc-v2` and runc run on the
//! "HOST" side (another private `/run`), started over the session by the HOST's offloadd. The two
//! sides share the PID and network namespaces and the filesystem (root and state in a temporary
//! directory); the fully separated DPU (qtfs, own PID and network) is the deployment harness's.
//! This exercises what `ctr run` does not: one shim per pod serving sandbox and container,
//! ExecSync, stats, and the teardown order kubelet uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::cri::{self, PodSpec};
use tests::images;
use tests::{spawn_ready, KillOnDrop};

const REAL_SHIM: &str = "/usr/bin/containerd-shim-runc-v2";

fn mnt_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// Processes whose mount namespace is `ns` (their command lines).
fn procs_in(ns: &Path) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if mnt_ns(pid).as_deref() == Some(ns) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((pid, cmd));
        }
    }
    out
}

/// On drop: kills every process left in the two private mount namespaces and in the pods'
/// cgroup parent (containers have mount namespaces of their own), then removes the cgroups.
struct Cleanup {
    namespaces: Vec<PathBuf>,
    cgroup_parent: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kill = |pid: u32| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        for _ in 0..3 {
            for ns in &self.namespaces {
                for (pid, _) in procs_in(ns) {
                    kill(pid);
                }
            }
            let base =
                Path::new("/sys/fs/cgroup/memory").join(self.cgroup_parent.trim_start_matches('/'));
            for pid in cgroup_procs(&base) {
                kill(pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let base = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                tests::scratch_containerd::remove_cgroup_tree(&base);
                let _ = std::fs::remove_dir(h.path().join("oecri"));
            }
        }
    }
}

fn cgroup_procs(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(cgroup_procs(&e.path()));
            }
        }
    }
    out
}

/// `offload-shim` given to CRI as a path (`runtime_type = "/…/offload-shim"`, no runc options).
#[test]
fn cri_pod_lifecycle_through_offload_shim() {
    lifecycle_through_offload_shim("cri_pod_lifecycle_through_offload_shim", false);
}

/// `offload-shim` installed as the DPU's `containerd-shim-runc-v2` (first in containerd's PATH),
/// the deployment's way: the stock `io.containerd.runc.v2` runtime with its runc options, which
/// reach the real shim through offload-shim's stdin.
#[test]
fn cri_pod_lifecycle_through_offload_shim_stock_name() {
    lifecycle_through_offload_shim("cri_pod_lifecycle_through_offload_shim_stock_name", true);
}

fn lifecycle_through_offload_shim(name: &str, stock_name: bool) {
    if !tests::is_root() {
        return tests::skip(name, "needs root (mount namespaces, containerd, runc)");
    }
    if let Some(t) = tests::scratch_containerd::missing_tool() {
        return tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
    }
    if !images::busybox_available() || !Path::new("/usr/bin/nsenter").exists() {
        return tests::skip(name, "busybox-static or nsenter missing");
    }
    let t = tempfile::Builder::new()
        .prefix("oecri-sh-")
        .tempdir()
        .expect("tempdir");
    let d = t.path();
    let imgs = images::build_all(&d.join("img")).expect("build images");
    let key = tests::write_key(d, "psk");
    let link = format!("unix://{}/link.sock", d.display());
    let tag = d
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("oecri-sh-{}", std::process::id()));
    let cgroup_parent = format!("/oecri/{tag}");
    for sub in ["root", "state", "opt", "cni/bin", "cni/conf", "logs"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[exec]\nallow = [\"{REAL_SHIM}\"]\n[bridge]\nwatch = [\"/run/containerd/s\"]\n\
             fifo_dirs = [\"/run/containerd/fifo\"]\n"
        ),
    )
    .expect("host.toml");
    std::fs::write(
        d.join("dpu.toml"),
        "[bridge]\nfifo_dirs = [\"/run/containerd/fifo\"]\n[[bridge.forward]]\nlisten_side = \"host\"\n\
         path = \"/run/containerd/containerd.sock.ttrpc\"\n",
    )
    .expect("dpu.toml");
    let shim = tests::bin("offload-shim");
    let shim_dir = d.join("shimbin");
    std::fs::create_dir_all(&shim_dir).expect("mkdir shimbin");
    std::os::unix::fs::symlink(&shim, shim_dir.join("containerd-shim-runc-v2"))
        .expect("symlink offload-shim");
    let runtime_type = if stock_name {
        "io.containerd.runc.v2".to_string()
    } else {
        shim.to_string_lossy().into_owned()
    };
    std::fs::write(
        d.join("containerd.toml"),
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             [grpc]\n  address = \"/run/containerd/containerd.sock\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{0}/opt\"\n{1}",
            d.display(),
            cri::containerd_cri_config(
                images::PAUSE_REF,
                &runtime_type,
                &d.join("cni/bin"),
                &d.join("cni/conf"),
            )
        ),
    )
    .expect("containerd.toml");

    let offloadd = tests::bin("offloadd");
    let mut host = Command::new("unshare");
    host.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs oecri-host-run /run || exit 1; exec \"$OFFLOADD\" --listen \"$LINK\" \
             --key-file \"$KEY\" --config \"$DIR/host.toml\"",
        )
        .env("OFFLOADD", &offloadd)
        .env("LINK", &link)
        .env("KEY", &key)
        .env("DIR", d);
    let host = spawn_ready(host, "listening");
    let host_pid = host.id();
    let mut procs = KillOnDrop(vec![host]);
    let mut dpu = Command::new("unshare");
    dpu.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs oecri-dpu-run /run || exit 1; \"$OFFLOADD\" --connect \"$CMD_NET_ADDR\" \
             --config \"$DIR/dpu.toml\" >\"$DIR/dpu-offloadd.log\" 2>&1 & sleep 0.5; echo dpu-ready; \
             exec containerd --config \"$DIR/containerd.toml\" >\"$DIR/containerd.log\" 2>&1",
        )
        .env("OFFLOADD", &offloadd)
        .env("DIR", d)
        .env("CMD_NET_ADDR", &link)
        .env("OFFLOAD_KEY_FILE", &key)
        .env("OFFLOAD_DPU_CONFIG", "/nonexistent")
        .env("OFFLOAD_SHIM_LOG", d.join("offload-shim.log"));
    if stock_name {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![shim_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        dpu.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    }
    let dpu = spawn_ready(dpu, "dpu-ready");
    let dpu_pid = dpu.id();
    procs.0.push(dpu);
    let host_ns = mnt_ns(host_pid).expect("HOST mount namespace");
    let dpu_ns = mnt_ns(dpu_pid).expect("DPU mount namespace");
    assert_ne!(host_ns, dpu_ns);
    let _cleanup = Cleanup {
        namespaces: vec![host_ns.clone(), dpu_ns.clone()],
        cgroup_parent: cgroup_parent.clone(),
    };

    // The DPU's containerd, reached from here through its mount namespace.
    let socket = PathBuf::from(format!(
        "/proc/{dpu_pid}/root/run/containerd/containerd.sock"
    ));
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    };
    let log = || std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default();
    tests::wait_until("DPU containerd up", Duration::from_secs(20), || {
        ctr(&["version"]).status.success()
    });
    for img in [&imgs.pause, &imgs.multi] {
        let out = ctr(&["image", "import", &img.oci_tar.to_string_lossy()]);
        assert!(
            out.status.success(),
            "import {}: {}",
            img.reference,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut spec = PodSpec::new(&socket, &format!("oecri-shim-{}", std::process::id()));
    spec.cgroup_parent = cgroup_parent.clone();
    spec.log_directory = Some(d.join("logs/pod"));
    let mut host_shims = Vec::new();
    let mut dpu_procs = Vec::new();
    let report = cri::run_pod_lifecycle_blocking(&spec, |r| {
        cri::check_on_this_host(r)?;
        host_shims = procs_in(&host_ns)
            .into_iter()
            .filter(|(_, c)| c.starts_with(REAL_SHIM))
            .collect();
        dpu_procs = procs_in(&dpu_ns);
        Ok(())
    })
    .unwrap_or_else(|e| {
        let l = log();
        let tail: Vec<&str> = l.lines().rev().take(40).collect();
        panic!(
            "pod lifecycle: {e}\ncontainerd log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    });
    eprintln!("timings: {:?}", report.timings);
    assert_eq!(report.runtime.0, "containerd");
    let shim_log = std::fs::read_to_string(d.join("offload-shim.log")).unwrap_or_default();
    assert!(
        !shim_log.is_empty(),
        "offload-shim ran (its log {} is empty)",
        d.join("offload-shim.log").display()
    );
    assert_eq!(report.problems(), Vec::<String>::new());
    assert!(
        !host_shims.is_empty(),
        "the real shim runs on the HOST side while the pod runs"
    );
    assert!(
        !dpu_procs.iter().any(|(_, c)| c.starts_with(REAL_SHIM)),
        "no real shim on the DPU side: {dpu_procs:?}"
    );
    let clog = std::fs::read_to_string(d.join("logs/pod/main.log")).unwrap_or_default();
    assert!(clog.contains("stdout F started"), "container log: {clog:?}");

    // Nothing left: pod processes, HOST shims, containerd objects; no errors logged.
    report
        .wait_processes_gone(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    tests::wait_until("HOST shims gone", Duration::from_secs(10), || {
        !procs_in(&host_ns)
            .iter()
            .any(|(_, c)| c.starts_with(REAL_SHIM))
    });
    for what in ["task", "container"] {
        let out = ctr(&[what, "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{what}s left in the DPU's containerd"
        );
    }
    let l = log();
    let errors: Vec<&str> = l
        .lines()
        .skip_while(|l| !l.contains("RunPodSandbox for"))
        .filter(|l| l.contains("level=error"))
        .collect();
    assert!(
        errors.is_empty(),
        "errors in the DPU containerd's log: {errors:#?}"
    );
    drop(procs);
}
