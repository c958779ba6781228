//! Stock containerd on a separated DPU (tests/src/e2e: own mount/PID/net/UTS/IPC namespaces,
//! veth + TCP, HOST files only through qtfs, prepared by `offload dpu setup`) runs containers on
//! the HOST through their whole life (issue 11). Every ctr step has a timeout, so a hang fails
//! fast and says so. Images are built here from busybox-static (tests/src/e2e/image.rs).

use std::time::{Duration, Instant};

use tests::e2e::{image, Lab, LabOptions, NS};
use tests::images;

const T: Duration = Duration::from_secs(30);

/// Builds an image (the multi-layer one from tests/src/images.rs when `multi`, else the
/// single-layer busybox) and imports it on the DPU; returns its reference.
fn import(lab: &Lab, multi: bool) -> String {
    let (tar, reference, name) = if multi {
        let img = images::build_multi_layer(lab.dir(), &images::MultiLayerOptions::default())
            .expect("building the multi-layer image");
        (img.oci_tar, img.reference, "/tmp/multi.tar")
    } else {
        let tar = lab.dir().join("bbox.tar");
        image::busybox(lab.dir(), &tar);
        (tar, image::BBOX.to_string(), "/tmp/bbox.tar")
    };
    std::fs::copy(&tar, lab.dpu_root_path(name)).expect("copy the image into the DPU");
    let r = lab.ctr(&["image", "import", name], Duration::from_secs(90));
    assert_eq!(
        r.code,
        Some(0),
        "ctr image import: {}\n{}\n{}\n{}",
        r.describe(),
        r.stdout,
        r.stderr,
        lab.logs()
    );
    let r = lab.ctr(&["image", "ls", "-q"], T).ok("ctr image ls");
    assert!(r.stdout.lines().any(|l| l == reference), "{}", r.stdout);
    reference
}

/// `ctr task ls` rows as (id, pid, status).
fn tasks(lab: &Lab) -> Vec<(String, u32, String)> {
    let r = lab.ctr(&["task", "ls"], T).ok("ctr task ls");
    r.stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.parse().ok()?,
                f.get(2)?.to_string(),
            ))
        })
        .collect()
}

fn wait_status(lab: &Lab, id: &str, status: &str) {
    let start = Instant::now();
    loop {
        let t = tasks(lab);
        if t.iter().any(|(i, _, s)| i == id && s == status) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "task {id} not {status}: {t:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn host_mounts(lab: &Lab) -> String {
    std::fs::read_to_string(format!("/proc/{}/mountinfo", lab.host_offloadd_pid()))
        .unwrap_or_default()
}

/// `ctr run -d`: the container is a HOST process in the HOST's cgroups, its shim a HOST process,
/// its rootfs an overlay mounted on the HOST; `task exec` (stdio, exit code); its cgroups are
/// found (`task metrics`, no cgroup errors in containerd's log); `task kill`.
#[test]
fn e2e_containerd_run_detached_on_host_exec_metrics_kill() {
    let Some(lab) = Lab::start(
        "e2e_containerd_run_detached_on_host_exec_metrics_kill",
        LabOptions::default(),
    ) else {
        return;
    };
    let img = &import(&lab, false);
    lab.ctr(&["run", "-d", img, "c1", "sleep", "300"], T)
        .ok("ctr run -d");
    wait_status(&lab, "c1", "RUNNING");
    let (_, pid, _) = tasks(&lab).into_iter().find(|(i, _, _)| i == "c1").unwrap();
    // The pid ctr reports is a HOST pid running the container's command.
    assert_eq!(cmdline(pid), "sleep 300", "HOST pid {pid}");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains(&format!("/{NS}/c1")), "cgroups of {pid}:\n{cg}");
    assert!(
        lab.container_pids().contains(&pid),
        "pid {pid} not in the lab's cgroups"
    );
    // ... and not a DPU process.
    let dpu_procs: Vec<String> = std::fs::read_dir(lab.dpu_path("/proc"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect();
    assert!(
        !dpu_procs.iter().any(|c| c.trim() == "sleep 300"),
        "the container runs on the DPU: {dpu_procs:?}"
    );
    // The real shim runs on the HOST; the rootfs overlay is mounted there.
    let shims = lab.host_shims();
    assert!(
        shims
            .iter()
            .any(|(_, c)| c.contains("containerd-shim-runc-v2")
                && c.contains(&format!("-namespace {NS}"))
                && c.contains("-id c1")),
        "no HOST shim for c1: {shims:?}"
    );
    let m = host_mounts(&lab);
    assert!(
        m.lines().any(|l| l.contains(&format!(
            "/run/containerd/io.containerd.runtime.v2.task/{NS}/c1/rootfs"
        )) && l.contains(" - overlay ")),
        "no overlay rootfs on the HOST:\n{m}"
    );
    // exec: output and exit code come back; it runs on the HOST (its hostname).
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let r = lab.ctr(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c1",
            "sh",
            "-c",
            "hostname; echo err >&2; exit 5",
        ],
        T,
    );
    assert_eq!(
        r.code,
        Some(5),
        "exec: {}\n{}\n{}",
        r.describe(),
        r.stderr,
        lab.logs()
    );
    assert_eq!(r.stdout.trim(), host_name.trim());
    assert!(r.stderr.contains("err"), "stderr: {}", r.stderr);
    // The cgroups of the running container are found: `task metrics` reports them and no
    // "cannot find cgroup mount destination" lands in containerd's log, where the shim's own
    // log (its `loading cgroup for PID` errors) arrives too.
    let r = lab
        .ctr(&["task", "metrics", "c1"], T)
        .ok("ctr task metrics");
    assert!(
        r.stdout.contains("memory") || r.stdout.contains("pids"),
        "{}",
        r.stdout
    );
    let log = lab.dpu_log("containerd.log");
    assert!(
        log.lines()
            .any(|l| l.contains("starting signal loop") && l.contains("/c1")),
        "the shim's log does not reach containerd's:\n{}",
        lab.logs()
    );
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot find cgroup mount destination"))
        .collect();
    assert!(
        bad.is_empty(),
        "containerd cgroup errors:\n{}",
        bad.join("\n")
    );
    // kill: the HOST process goes, the task is STOPPED.
    lab.ctr(&["task", "kill", "-s", "KILL", "c1"], T)
        .ok("ctr task kill");
    wait_status(&lab, "c1", "STOPPED");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || cmdline(pid) != "sleep 300",
        "HOST process {pid} still running"
    );
}

/// `ctr run --rm` returns the exit code promptly; `task delete`, `task start`, `container rm`
/// complete; afterwards nothing is left on either side: no shim, mount, bundle directory,
/// container process, HOST fd on a deleted file, stuck goroutine; containerd stops promptly.
#[test]
fn e2e_containerd_run_rm_delete_start_leave_nothing() {
    let Some(lab) = Lab::start(
        "e2e_containerd_run_rm_delete_start_leave_nothing",
        LabOptions::default(),
    ) else {
        return;
    };
    let img = &import(&lab, false);
    let r = lab.ctr(
        &["run", "--rm", img, "r1", "sh", "-c", "echo out; exit 3"],
        T,
    );
    assert_eq!(
        r.code,
        Some(3),
        "ctr run --rm: {} (expected exit 3)\nstdout: {}\nstderr: {}\n{}",
        r.describe(),
        r.stdout,
        r.stderr,
        lab.logs()
    );
    assert_eq!(r.stdout.trim(), "out");
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);

    lab.ctr(&["run", "-d", img, "c2", "sleep", "300"], T)
        .ok("ctr run -d");
    wait_status(&lab, "c2", "RUNNING");
    lab.ctr(&["task", "kill", "-s", "KILL", "c2"], T)
        .ok("ctr task kill");
    wait_status(&lab, "c2", "STOPPED");
    let r = lab.ctr(&["task", "delete", "c2"], T);
    assert_eq!(
        r.code,
        Some(0),
        "ctr task delete: {}\n{}\n{}",
        r.describe(),
        r.stderr,
        lab.logs()
    );

    lab.ctr(
        &[
            "container",
            "create",
            img,
            "c3",
            // ctr's `container create` would take `-c` as its own `--config`.
            "--",
            "sh",
            "-c",
            "echo started; exit 7",
        ],
        T,
    )
    .ok("ctr container create");
    let r = lab.ctr(&["task", "start", "c3"], T);
    assert_eq!(
        r.code,
        Some(7),
        "ctr task start: {}\n{}\n{}",
        r.describe(),
        r.stderr,
        lab.logs()
    );
    assert_eq!(r.stdout.trim(), "started");
    let t = tasks(&lab);
    assert!(t.is_empty(), "tasks left: {t:?}");
    lab.ctr(&["container", "rm", "c2", "c3"], T)
        .ok("ctr container rm");
    let r = lab
        .ctr(&["container", "ls", "-q"], T)
        .ok("ctr container ls");
    assert_eq!(r.stdout.trim(), "", "containers left");

    // Nothing left on either side.
    let start = Instant::now();
    loop {
        let shims = lab.host_shims();
        let fds = lab.host_deleted_fds();
        let m = host_mounts(&lab);
        let overlay = m.lines().any(|l| l.contains(" - overlay "));
        let pids = lab.container_pids();
        if shims.is_empty() && fds.is_empty() && !overlay && pids.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left behind: shims {shims:?}, HOST fds on deleted files {fds:?}, overlay {overlay}, container pids {pids:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let bundles = lab.host_path(&format!(
        "/run/containerd/io.containerd.runtime.v2.task/{NS}"
    ));
    let left: Vec<_> = std::fs::read_dir(&bundles)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "bundle dirs left on the HOST: {left:?}");
    let proxies: Vec<_> = std::fs::read_dir(lab.dpu_path("/run/containerd/s"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        proxies.is_empty(),
        "shim socket proxies left on the DPU: {proxies:?}"
    );
    let dump = lab.containerd_goroutines();
    for stuck in [
        "fifo.(*fifo).Read",
        "UserOnCloseWait",
        "(*binary).Start.func",
    ] {
        assert!(
            !dump.contains(stuck),
            "containerd goroutine stuck in {stuck}:\n{dump}"
        );
    }
    let took = lab
        .stop_containerd(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(took < Duration::from_secs(10));
}

/// A two-layer image unpacks through qtfs: in the container the file the upper layer deleted
/// is absent and the directory it replaced shows only the new contents.
#[test]
fn e2e_containerd_multilayer_whiteouts() {
    let Some(lab) = Lab::start("e2e_containerd_multilayer_whiteouts", LabOptions::default()) else {
        return;
    };
    let img = &import(&lab, true);
    lab.ctr(&["run", "-d", img, "w1", "sleep", "300"], T)
        .ok("ctr run -d (multi-layer)");
    wait_status(&lab, "w1", "RUNNING");
    let mut exec = vec!["task", "exec", "--exec-id", "x", "w1"];
    exec.extend_from_slice(images::WHITEOUT_CHECK);
    let r = lab.ctr(&exec, T);
    assert_eq!(
        r.code,
        Some(0),
        "whiteout check: {}\n{}{}\n{}",
        r.describe(),
        r.stdout,
        r.stderr,
        lab.logs()
    );
    assert_eq!(r.stdout, images::WHITEOUT_CHECK_OUTPUT);
    lab.ctr(&["task", "kill", "-s", "KILL", "w1"], T)
        .ok("ctr task kill");
}
