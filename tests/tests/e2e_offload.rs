//! `offload dpu setup/teardown` on a separated DPU (tests/src/e2e): the root it builds works
//! (qtfs proc with the DPU's own pids local, HOST files through qtfs, the shim installed, a
//! wrapper that runs on the HOST), a second setup is a no-op, teardown leaves nothing mounted
//! and nothing it created, and a setup that fails half-way rolls back and names the step.

use std::time::Duration;

use tests::e2e::{Lab, LabOptions, ROOT};

const T: Duration = Duration::from_secs(20);

fn mounts_under_root(lab: &Lab) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{}/mountinfo", lab.dpu_init_pid()))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m == ROOT || m.starts_with(&format!("{ROOT}/")))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn e2e_offload_dpu_setup_is_idempotent_and_teardown_undoes_it() {
    let Some(lab) = Lab::start(
        "e2e_offload_dpu_setup_is_idempotent_and_teardown_undoes_it",
        LabOptions {
            containerd: false,
            ..Default::default()
        },
    ) else {
        return;
    };
    let cfg = ["dpu", "setup", "--config", "/etc/offload/dpu.toml"];

    // The root works: qtfs proc shows HOST processes but the caller's own pid is local.
    let m = mounts_under_root(&lab);
    for (mp, fstype) in [
        ("/proc", "fuse"),
        ("/sys", "fuse"),
        ("/var/lib/containerd", "fuse"),
        ("/local_proc", "proc"),
        ("/dev", "devtmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        let want = format!("{ROOT}{mp}");
        assert!(
            m.iter().any(|l| l.split(' ').nth(4) == Some(&want)
                && l.split(" - ").nth(1).is_some_and(|t| t.starts_with(fstype))),
            "{want} ({fstype}) not mounted:\n{}",
            m.join("\n")
        );
    }
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let r = lab
        .dpu_sh(
            "hostname; cat /proc/1/comm; read pid rest </proc/self/stat; echo \"$$ $pid\"",
            T,
        )
        .ok("inspecting the root");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("dpu"), "{}", r.stdout);
    let init = std::fs::read_to_string("/proc/1/comm").unwrap();
    assert_eq!(
        lines.next(),
        Some(init.trim()),
        "/proc/1 is the HOST's init"
    );
    assert!(own_proc_is_local(lines.next()), "{}", r.stdout);
    // A file the HOST writes shows through qtfs.
    std::fs::write(lab.host_path("/var/lib/containerd/from-host"), "hi\n").unwrap();
    let r = lab
        .dpu_sh("cat /var/lib/containerd/from-host", T)
        .ok("reading through qtfs");
    assert_eq!(r.stdout, "hi\n");
    // The shim replacement and a wrapper that runs on the HOST.
    let shim = lab.dpu_root_path("/opt/offload/shim/containerd-shim-runc-v2");
    assert_eq!(
        std::fs::read(&shim).unwrap(),
        std::fs::read(tests::bin("offload-shim")).unwrap()
    );
    let r = lab
        .dpu(&["/opt/offload/host/uname", "-n"], T)
        .ok("wrapper through rexec");
    assert_eq!(r.stdout.trim(), host_name.trim(), "wrapper ran on the HOST");

    // Idempotent: a second setup does nothing and says so.
    let r = lab.offload(&cfg);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("already set up: nothing to do"),
        "{}",
        r.stdout
    );
    assert_eq!(mounts_under_root(&lab).len(), m.len(), "no mount added");
    let r = lab.offload(&["dpu", "plan", "--config", "/etc/offload/dpu.toml"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("[in place]") && !r.stdout.contains("to do"),
        "{}",
        r.stdout
    );

    // A qtfs daemon that died leaves a stale mount: setup replaces it (and only it).
    let victim = dpu_processes(&lab)
        .into_iter()
        .find(|(_, c)| c.contains("mount_qtfs /var/lib/containerd "))
        .expect("the qtfs daemon of /var/lib/containerd");
    // SAFETY: kill(2) on a DPU process of this lab.
    unsafe { libc::kill(victim.0 as i32, libc::SIGKILL) };
    tests::wait_until("the daemon is gone", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{}", victim.0)).exists()
    });
    let r = lab.dpu_sh("cat /var/lib/containerd/from-host", T);
    assert_ne!(r.code, Some(0), "a dead daemon still serves: {}", r.stdout);
    let r = lab.offload(&cfg);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("1 step(s) done") && r.stdout.contains("/var/lib/containerd"),
        "{}",
        r.stdout
    );
    let r = lab
        .dpu_sh("cat /var/lib/containerd/from-host", T)
        .ok("reading through the replaced mount");
    assert_eq!(r.stdout, "hi\n");

    // Teardown: nothing mounted, nothing created left; user data kept.
    std::fs::write(lab.dpu_root_path("/opt/offload/user-file"), "keep").unwrap();
    let r = lab.offload(&["dpu", "teardown", "--config", "/etc/offload/dpu.toml"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let left = mounts_under_root(&lab);
    assert!(left.is_empty(), "mounts left:\n{}", left.join("\n"));
    for gone in [
        "/local_proc",
        "/opt/offload/host/uname",
        "/bin",
        "/var/run",
        "/dev",
    ] {
        assert!(
            lab.dpu_root_path(gone).symlink_metadata().is_err(),
            "{gone} left behind"
        );
    }
    // The DPU's own /opt/offload (bound in) is untouched, incl. the user's file.
    assert!(lab.dpu_path("/opt/offload/bin/offloadd").exists());
    assert_eq!(
        std::fs::read_to_string(lab.dpu_path("/opt/offload/user-file")).unwrap(),
        "keep"
    );
    // No mount_qtfs daemon outlives its mount (each exits once the kernel ends its session).
    tests::wait_until("qtfs daemons exit", Duration::from_secs(5), || {
        !run_ps(&lab).contains("mount_qtfs")
    });
    let r = lab.offload(&["dpu", "teardown", "--config", "/etc/offload/dpu.toml"]);
    assert!(r.stdout.contains("nothing to undo"), "{}", r.stdout);

    // Set up again after teardown: the same root again.
    let r = lab.offload(&cfg);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(mounts_under_root(&lab).len(), m.len());
    let r = lab.offload(&["dpu", "teardown", "--config", "/etc/offload/dpu.toml"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);

    // A setup that fails half-way (a HOST path that is not exported) rolls back and names it.
    let bad = std::fs::read_to_string(lab.dpu_path("/etc/offload/dpu.toml"))
        .unwrap()
        .replace(
            "qtfs = [\"/var/lib/containerd\"",
            "qtfs = [\"/var/lib/containerd\", \"/not/exported\"",
        );
    std::fs::write(lab.dpu_path("/etc/offload/bad.toml"), bad).unwrap();
    let r = lab.offload(&["dpu", "setup", "--config", "/etc/offload/bad.toml"]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("setup step") && r.stderr.contains("/not/exported"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
    let left = mounts_under_root(&lab);
    assert!(
        left.is_empty(),
        "mounts left after rollback:\n{}",
        left.join("\n")
    );
    // A bad config is refused before anything happens, with the key named.
    std::fs::write(
        lab.dpu_path("/etc/offload/typo.toml"),
        "[rootfs]\nqtfs = [\"relative\"]\n",
    )
    .unwrap();
    let r = lab.offload(&["dpu", "setup", "--config", "/etc/offload/typo.toml"]);
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("qtfs[2].src"), "{}", r.stderr);
}

/// The DPU's processes as (pid in this namespace, command line).
fn dpu_processes(lab: &Lab) -> Vec<(u32, String)> {
    let ns = std::fs::read_link(format!("/proc/{}/ns/pid", lab.dpu_init_pid())).unwrap();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(e.path().join("ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            v.push((pid, String::from_utf8_lossy(&c).replace('\0', " ")));
        }
    }
    v
}

fn run_ps(lab: &Lab) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(lab.dpu_path("/proc")).unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            s.push_str(&String::from_utf8_lossy(&c).replace('\0', " "));
            s.push('\n');
        }
    }
    s
}

/// The seed's own mount script (tests/e2e/seed-mount.sh: verbatim but for the insmod line)
/// still works with `/sbin/mount.qtfs`: all twelve `mount -t qtfs` lines mount, and the root
/// sees HOST files and its own `/proc/self`.
#[test]
fn e2e_seed_mount_script_still_works() {
    let Some(lab) = Lab::start(
        "e2e_seed_mount_script_still_works",
        LabOptions {
            setup: false,
            containerd: false,
            ..Default::default()
        },
    ) else {
        return;
    };
    // The seed expects a prepared rootfs.
    let a = lab.dpu_path(ROOT);
    for d in [
        "usr",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "local_proc",
        "var/lib",
        "var/log",
    ] {
        std::fs::create_dir_all(a.join(d)).unwrap();
    }
    for l in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{l}"), a.join(l)).unwrap();
    }
    std::os::unix::fs::symlink("../run", a.join("var/run")).unwrap();
    // ... and the DPU's /var/lib (bound into it) to hold the mount points.
    for d in [
        "containers",
        "containerd",
        "overlay2",
        "image",
        "tmp",
        "../kubelet/pods",
    ] {
        std::fs::create_dir_all(lab.dpu_path(&format!("/var/lib/docker/{d}"))).unwrap();
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/seed-mount.sh");
    std::fs::copy(&script, lab.dpu_path("/root/seed-mount.sh")).unwrap();
    let r = tests::e2e::run_timeout(
        lab.dpu_machine(&[
            "sh",
            "-c",
            "mount --bind /usr /another_rootfs/usr && bash /root/seed-mount.sh",
        ]),
        Duration::from_secs(120),
    );
    assert_eq!(
        r.code,
        Some(0),
        "{}\n{}\n{}",
        r.describe(),
        r.stdout,
        r.stderr
    );
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", lab.dpu_init_pid())).unwrap();
    for src in [
        "/proc",
        "/sys",
        "/var/lib/docker/containers",
        "/var/lib/docker/containerd",
        "/var/lib/docker/overlay2",
        "/var/lib/docker/image",
        "/var/lib/docker/tmp",
        "/run/containerd/io.containerd.runtime.v1.linux",
        "/var/lib/kubelet/pods",
    ] {
        assert!(
            info.lines()
                .any(|l| l.contains(&format!(" qtfs:{src} "))
                    || l.contains(&format!(" qtfs:{src}/ "))),
            "seed line for {src} did not mount:\n{}\n{info}",
            r.stdout
        );
    }
    // The `/var/run/docker/containerd` line (a HOST symlink path) mounted too.
    assert!(
        info.lines().any(|l| {
            let mp = l.split(' ').nth(4).unwrap_or_default();
            l.contains(" - fuse qtfs:") && mp == "/another_rootfs/run/docker/containerd"
        }),
        "the /var/run/docker/containerd line did not mount:\n{info}"
    );
    // No qtfs line failed (the kernel's cgroup layout may refuse some cgroup lines).
    for l in r.stdout.lines().filter(|l| l.starts_with("SEED-FAIL")) {
        assert!(!l.contains("qtfs"), "{l}");
    }
    std::fs::write(
        lab.host_path("/var/lib/docker/containers/from-host"),
        "seed\n",
    )
    .unwrap();
    let r = lab
        .dpu_sh(
            "cat /var/lib/docker/containers/from-host; read pid rest </proc/self/stat; echo \"$$ $pid\"",
            T,
        )
        .ok("reading through the seed's mounts");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("seed"));
    assert!(own_proc_is_local(lines.next()), "{}", r.stdout);
}

/// A line `"$$ <pid field of /proc/self/stat>"` printed by a DPU shell: `/proc/self` is the
/// caller's own DPU process (whatever form the link takes), not the HOST's process of that number.
fn own_proc_is_local(line: Option<&str>) -> bool {
    let mut f = line.unwrap_or_default().split_whitespace();
    matches!((f.next(), f.next()), (Some(a), Some(b)) if a == b)
}
