//! Unmodified dockerd 20.10 on a separated DPU (tests/src/e2e), chrooted in the management
//! plane's root and supervised by `offload run`: overlay2's mounts are made on the HOST (issue
//! 12), so `docker run` works end to end with the containers on the HOST.

use std::time::Duration;

use tests::e2e::{Lab, LabOptions};
use tests::images;

const T: Duration = Duration::from_secs(90);

fn ok(lab: &Lab, what: &str, args: &[&str]) -> String {
    let r = lab.docker(args, T);
    assert_eq!(
        r.code,
        Some(0),
        "docker {what}: {}\n{}\n{}\n{}",
        r.describe(),
        r.stdout,
        r.stderr,
        lab.logs()
    );
    r.stdout
}

/// Overlay mounts of dockerd's data root in a mountinfo text (the HOST daemon's namespace
/// started as a copy of the machine's, which may hold other overlays).
fn overlays(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter(|l| l.contains(" - overlay "))
        .map(|l| l.split(' ').nth(4).unwrap_or("").to_string())
        .filter(|p| p.contains("/var/lib/docker/"))
        .collect()
}

#[test]
fn e2e_docker_overlay2_run_exec_logs_stop_rm_leave_nothing() {
    let test = "e2e_docker_overlay2_run_exec_logs_stop_rm_leave_nothing";
    let Some(lab) = Lab::start(
        test,
        LabOptions {
            docker: true,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let host_overlays = || {
        let r = lab.host_sh("cat /proc/self/mountinfo", T);
        overlays(&r.stdout)
    };
    let dpu_overlays = || {
        let r = lab.dpu(&["cat", "/proc/self/mountinfo"], T);
        overlays(&r.stdout)
    };

    // docker load of the multi-layer image: its layers land on the HOST's disk.
    let img = images::build_multi_layer(lab.dir(), &images::MultiLayerOptions::default())
        .expect("building the multi-layer image");
    std::fs::copy(&img.docker_tar, lab.dpu_root_path("/tmp/multi-docker.tar"))
        .expect("copy the image into the DPU");
    let out = ok(&lab, "load", &["load", "-i", "/tmp/multi-docker.tar"]);
    assert!(
        out.contains(&format!("Loaded image: {}", img.docker_tag)),
        "{out}"
    );
    let layers = std::fs::read_dir(lab.host_path("/var/lib/docker/overlay2"))
        .expect("HOST overlay2")
        .count();
    assert!(
        layers > img.layers.len(),
        "{layers} entries in the HOST's overlay2"
    );
    let tag = img.docker_tag.as_str();

    // run --rm: output, exit codes, the image's whiteouts and opaque directory.
    assert_eq!(
        ok(&lab, "run --rm echo", &["run", "--rm", tag, "echo", "hi"]),
        "hi\n"
    );
    let r = lab.docker(&["run", "--rm", tag, "sh", "-c", "exit 5"], T);
    assert_eq!(r.code, Some(5), "exit 5: {}\n{}", r.describe(), lab.logs());
    let mut args = vec!["run", "--rm", tag];
    args.extend_from_slice(images::WHITEOUT_CHECK);
    assert_eq!(
        ok(&lab, "run --rm whiteouts", &args),
        images::WHITEOUT_CHECK_OUTPUT
    );

    // run -d: the container is a HOST process in an overlay the HOST mounted.
    let id = ok(
        &lab,
        "run -d",
        &[
            "run",
            "-d",
            "--name",
            "d1",
            tag,
            "sh",
            "-c",
            "echo started; exec sleep 300",
        ],
    );
    let id = id.trim();
    let fmt = "{{.State.Pid}} {{.State.Status}} {{.GraphDriver.Data.MergedDir}}";
    let inspect = ok(&lab, "inspect", &["inspect", "-f", fmt, "d1"]);
    let f: Vec<&str> = inspect.split_whitespace().collect();
    assert_eq!(f.get(1), Some(&"running"), "{inspect}");
    let pid: u32 = f[0].parse().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&cmdline).replace('\0', " ").trim(),
        "sleep 300",
        "HOST pid {pid} is not the container"
    );
    let merged = f[2].to_string();
    assert!(
        host_overlays().contains(&merged),
        "no HOST overlay at {merged}: {:?}",
        host_overlays()
    );
    assert!(
        dpu_overlays().is_empty(),
        "DPU overlays: {:?}",
        dpu_overlays()
    );
    // The DPU sees the mounted rootfs through qtfs.
    let r = lab.dpu(&["ls", &merged], T).ok("ls merged on the DPU");
    assert!(r.stdout.lines().any(|l| l == "bin"), "{}", r.stdout);

    let out = ok(
        &lab,
        "exec",
        &[
            "exec",
            "d1",
            "sh",
            "-c",
            "echo exec-ok; cat /proc/1/cmdline",
        ],
    );
    assert!(out.starts_with("exec-ok\nsleep"), "{out}");
    let r = lab.docker(&["exec", "d1", "sh", "-c", "exit 7"], T);
    assert_eq!(r.code, Some(7), "exec exit 7: {}", r.describe());
    assert_eq!(ok(&lab, "logs", &["logs", "d1"]), "started\n");
    let ps = ok(
        &lab,
        "ps -a",
        &[
            "ps",
            "-a",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Names}} {{.Status}}",
        ],
    );
    assert!(
        ps.lines().any(|l| l.starts_with(&format!("{id} d1 Up"))),
        "{ps}"
    );

    ok(&lab, "stop", &["stop", "-t", "1", "d1"]);
    ok(&lab, "rm", &["rm", "d1"]);
    let ps = ok(&lab, "ps -a", &["ps", "-a", "-q"]);
    assert!(ps.trim().is_empty(), "{ps}");

    // Nothing left on either side: no overlay mount, shim, container process or directory.
    assert!(
        host_overlays().is_empty(),
        "HOST overlays: {:?}",
        host_overlays()
    );
    assert!(
        dpu_overlays().is_empty(),
        "DPU overlays: {:?}",
        dpu_overlays()
    );
    assert!(lab.host_shims().is_empty(), "shims: {:?}", lab.host_shims());
    assert!(
        lab.container_pids().is_empty(),
        "{:?}",
        lab.container_pids()
    );
    let left: Vec<_> = std::fs::read_dir(lab.host_path("/var/lib/docker/containers"))
        .expect("HOST containers dir")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "container dirs left: {left:?}");
    // Every mount went through the supervisor to the HOST.
    let log = lab.host_log();
    assert!(
        log.contains("mounted overlay on /var/lib/docker/overlay2/"),
        "{log}"
    );
    assert!(log.contains("unmounted /var/lib/docker/overlay2/"), "{log}");
}
