//! The CRI client (tests/src/cri.rs) against a real containerd 1.6 CRI plugin on this machine (a
//! private scratch instance, no DPU): a whole host-network pod life as kubelet drives it, the
//! pod's processes are real processes here, and nothing is left afterwards. The separated-DPU
//! harness runs the same `run_pod_lifecycle` against the DPU's containerd.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tests::cri::{self, proto, PodSpec};
use tests::images;
use tests::scratch_containerd::{self, ScratchContainerd, ScratchOptions};

#[test]
fn cri_pod_lifecycle_on_local_containerd() {
    let name = "cri_pod_lifecycle_on_local_containerd";
    if !tests::is_root() {
        return tests::skip(name, "needs root (containerd, runc, overlay mounts)");
    }
    if let Some(t) = scratch_containerd::missing_tool() {
        return tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
    }
    if !images::busybox_available() {
        return tests::skip(name, "no /bin/busybox (apt-get install busybox-static)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = images::build_all(dir.path()).expect("build images");
    let c = ScratchContainerd::start(&ScratchOptions {
        cri: true,
        namespaces: vec!["k8s.io".into()],
        ..Default::default()
    })
    .expect("scratch containerd with CRI");
    c.import("k8s.io", &imgs.pause.oci_tar)
        .expect("import pause");
    c.import("k8s.io", &imgs.multi.oci_tar)
        .expect("import multi");

    let log_dir = c.log_dir().join("pod");
    let mut spec = PodSpec::new(c.socket(), &format!("oecri-pod-{}", std::process::id()));
    spec.cgroup_parent = c.cgroup_parent().to_string();
    spec.log_directory = Some(log_dir.clone());

    let mut shims_while_running = Vec::new();
    let mut cmdline = String::new();
    let report = cri::run_pod_lifecycle_blocking(&spec, |r| {
        cri::check_on_this_host(r)?;
        shims_while_running = c.shim_pids();
        cmdline = std::fs::read(format!("/proc/{}/cmdline", r.container_pid))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .map_err(|e| e.to_string())?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("pod lifecycle: {e}\ncontainerd log:\n{}", c.log_tail(40)));
    eprintln!("timings: {:?}", report.timings);
    // Host network: containerd 1.6 never calls CNI (none is installed; it says so once at
    // start, "failed to load cni during init"); and the pod's life logs no error.
    let log = c.log();
    let pod_log: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("RunPodSandbox for"))
        .collect();
    assert!(!pod_log.is_empty(), "containerd logged the pod");
    let bad: Vec<&&str> = pod_log
        .iter()
        .filter(|l| l.to_lowercase().contains("cni") || l.contains("level=error"))
        .collect();
    assert!(
        bad.is_empty(),
        "CNI or errors during the pod's life: {bad:#?}"
    );

    let (rt_name, _, api) = &report.runtime;
    assert_eq!((rt_name.as_str(), api.as_str()), ("containerd", "v1"));
    assert!(report.sandbox_ready, "sandbox READY after RunPodSandbox");
    assert_eq!(
        report.status_running.state,
        proto::ContainerState::ContainerRunning as i32,
        "{:?}",
        report.status_running
    );
    assert!(report.status_running.started_at > 0);
    assert!(
        cmdline.starts_with("sleep 300"),
        "pid {} runs the container's command: {cmdline:?}",
        report.running.container_pid
    );
    assert!(
        !shims_while_running.is_empty(),
        "a shim serves the pod while it runs"
    );
    assert_eq!(
        report.exec_echo,
        cri::ExecResult {
            stdout: "hi\n".into(),
            stderr: String::new(),
            exit_code: 0
        }
    );
    assert_eq!(report.exec_fail.exit_code, 7, "{:?}", report.exec_fail);
    assert_eq!(report.exec_fail.stderr, "err\n");
    assert!(report.running.pid_ns_inside.starts_with("pid:["));
    assert!(
        report
            .running
            .cgroup_inside
            .contains(&report.running.container_id),
        "cgroup seen inside: {}",
        report.running.cgroup_inside
    );
    let cpu = report.stats.cpu.as_ref().expect("cpu stats");
    let mem = report.stats.memory.as_ref().expect("memory stats");
    assert!(cpu.timestamp > 0 && mem.timestamp > 0);
    assert!(
        cpu.usage_core_nano_seconds.as_ref().map_or(0, |v| v.value) > 0,
        "cpu usage: {cpu:?}"
    );
    assert!(
        mem.working_set_bytes.as_ref().map_or(0, |v| v.value) > 0
            || mem.usage_bytes.as_ref().map_or(0, |v| v.value) > 0,
        "memory usage: {mem:?}"
    );
    assert_eq!(
        report.stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(report.running.container_id.as_str())
    );
    assert_eq!(
        report.status_stopped.state,
        proto::ContainerState::ContainerExited as i32,
        "{:?}",
        report.status_stopped
    );
    assert!(
        !report.sandbox_ready_after_stop,
        "sandbox NOTREADY after stop"
    );
    assert!(
        report.left_containers.is_empty(),
        "{:?}",
        report.left_containers
    );
    assert!(
        report.left_sandboxes.is_empty(),
        "{:?}",
        report.left_sandboxes
    );

    assert_eq!(report.problems(), Vec::<String>::new());

    // The container's stdout went through containerd's log pipeline.
    let log = std::fs::read_to_string(log_dir.join("main.log")).unwrap_or_default();
    assert!(log.contains("stdout F started"), "container log: {log:?}");

    // Nothing left: processes, shims, mounts, cgroups, containerd objects.
    report
        .wait_processes_gone(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    tests::wait_until("shims gone", Duration::from_secs(10), || {
        c.shim_pids().is_empty()
    });
    let mounts: Vec<String> = c
        .mounts()
        .into_iter()
        .filter(|m| {
            m.contains(&report.running.container_id) || m.contains(&report.running.sandbox_id)
        })
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    for id in [&report.running.container_id, &report.running.sandbox_id] {
        let cg = Path::new("/sys/fs/cgroup/memory")
            .join(c.cgroup_parent().trim_start_matches('/'))
            .join(id);
        assert!(!cg.exists(), "cgroup left: {}", cg.display());
    }
    for what in ["task", "container"] {
        let out = c
            .ctr("k8s.io")
            .args([what, "ls", "-q"])
            .stdin(Stdio::null())
            .output()
            .expect("ctr ls");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{what}s left in containerd"
        );
    }
}

/// A test that fails half-way leaves a running pod behind; dropping the scratch containerd must
/// still leave nothing: no pod process, no shim, no cgroup of the instance.
#[test]
fn cri_scratch_containerd_drop_cleans_a_running_pod() {
    let name = "cri_scratch_containerd_drop_cleans_a_running_pod";
    if !tests::is_root() {
        return tests::skip(name, "needs root (containerd, runc, overlay mounts)");
    }
    if let Some(t) = scratch_containerd::missing_tool() {
        return tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
    }
    if !images::busybox_available() {
        return tests::skip(name, "no /bin/busybox (apt-get install busybox-static)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = images::build_all(dir.path()).expect("build images");
    let c = ScratchContainerd::start(&ScratchOptions {
        cri: true,
        namespaces: vec!["k8s.io".into()],
        ..Default::default()
    })
    .expect("scratch containerd with CRI");
    c.import("k8s.io", &imgs.pause.oci_tar)
        .expect("import pause");
    c.import("k8s.io", &imgs.multi.oci_tar)
        .expect("import multi");
    let mut spec = PodSpec::new(c.socket(), &format!("oecri-left-{}", std::process::id()));
    spec.cgroup_parent = c.cgroup_parent().to_string();

    // The check fails while the pod runs: run_pod_lifecycle cleans the pod up itself...
    let mut seen = None;
    let err = cri::run_pod_lifecycle_blocking(&spec, |r| {
        seen = Some(r.clone());
        Err("deliberate failure".into())
    })
    .expect_err("the check's failure is reported");
    assert!(matches!(err, cri::CriError::Check(_)), "{err}");
    let seen = seen.expect("check ran");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt
        .block_on(cri::CriClient::connect(c.socket(), Duration::from_secs(10)))
        .expect("connect");
    assert!(rt
        .block_on(client.list_pod_sandbox())
        .expect("list")
        .is_empty());
    assert!(!Path::new(&format!("/proc/{}", seen.container_pid)).exists());

    // ...and a pod the test never cleaned up goes with the scratch containerd.
    // The steps by hand, stopping where a failed test would: the pod keeps running.
    let pods: Vec<u32> = {
        let sandbox = proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: "left".into(),
                uid: format!("left-{}", std::process::id()),
                namespace: "oecri".into(),
                attempt: 0,
            }),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: c.cgroup_parent().into(),
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(proto::NamespaceOption {
                        network: proto::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    privileged: false,
                }),
            }),
            ..Default::default()
        };
        let sid = rt
            .block_on(client.run_pod_sandbox(sandbox.clone()))
            .expect("RunPodSandbox");
        let cid = rt
            .block_on(client.create_container(
                &sid,
                proto::ContainerConfig {
                    metadata: Some(proto::ContainerMetadata {
                        name: "left".into(),
                        attempt: 0,
                    }),
                    image: Some(proto::ImageSpec {
                        image: images::MULTI_REF.into(),
                    }),
                    command: vec!["sleep".into(), "300".into()],
                    ..Default::default()
                },
                sandbox,
            ))
            .expect("CreateContainer");
        rt.block_on(client.start_container(&cid))
            .expect("StartContainer");
        let st = rt.block_on(client.container_status(&cid)).expect("status");
        let ps = rt
            .block_on(client.pod_sandbox_status(&sid))
            .expect("status");
        [&st.info, &ps.info]
            .into_iter()
            .map(|info| {
                let v: serde_json::Value =
                    serde_json::from_str(&info["info"]).expect("verbose info JSON");
                v["pid"].as_u64().expect("pid") as u32
            })
            .collect()
    };
    for pid in &pods {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "pod pid {pid} runs"
        );
    }
    assert!(!c.shim_pids().is_empty());
    let parent = c.cgroup_parent().trim_start_matches('/').to_string();
    drop(client);
    drop(rt);
    drop(c);
    for pid in &pods {
        tests::wait_until(&format!("pid {pid} gone"), Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
    }
    let cg = Path::new("/sys/fs/cgroup/memory").join(parent);
    assert!(!cg.exists(), "cgroup left: {}", cg.display());
}

/// The `cri-pod` tool (the same lifecycle, for use by hand on a DPU) against a scratch containerd.
#[test]
fn cri_pod_tool_runs_a_pod() {
    let name = "cri_pod_tool_runs_a_pod";
    if !tests::is_root() {
        return tests::skip(name, "needs root (containerd, runc, overlay mounts)");
    }
    if let Some(t) = scratch_containerd::missing_tool() {
        return tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
    }
    if !images::busybox_available() {
        return tests::skip(name, "no /bin/busybox (apt-get install busybox-static)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = images::build_all(dir.path()).expect("build images");
    let c = ScratchContainerd::start(&ScratchOptions {
        cri: true,
        namespaces: vec!["k8s.io".into()],
        ..Default::default()
    })
    .expect("scratch containerd with CRI");
    c.import("k8s.io", &imgs.pause.oci_tar)
        .expect("import pause");
    c.import("k8s.io", &imgs.multi.oci_tar)
        .expect("import multi");
    let out = std::process::Command::new(tests::bin("cri-pod"))
        .arg("--socket")
        .arg(c.socket())
        .args(["--name", &format!("oecri-tool-{}", std::process::id())])
        .args(["--cgroup-parent", c.cgroup_parent(), "--check-local"])
        .stdin(Stdio::null())
        .output()
        .expect("run cri-pod");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cri-pod failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("runtime: containerd"), "{text}");
    assert!(text.lines().last() == Some("ok"), "{text}");
    tests::wait_until("shims gone", Duration::from_secs(10), || {
        c.shim_pids().is_empty()
    });
}

/// A containerd that cannot start is reported at once with its own words, and leaves nothing.
#[test]
fn cri_scratch_containerd_reports_a_failed_start() {
    let name = "cri_scratch_containerd_reports_a_failed_start";
    if !tests::is_root() {
        return tests::skip(name, "needs root (mount namespace)");
    }
    if let Some(t) = scratch_containerd::missing_tool() {
        return tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
    }
    let t0 = std::time::Instant::now();
    let err = match ScratchContainerd::start(&ScratchOptions {
        extra_config: "[broken\n".into(),
        ..Default::default()
    }) {
        Ok(_) => panic!("containerd started with a broken config"),
        Err(e) => e.to_string(),
    };
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "reported after {:?}",
        t0.elapsed()
    );
    assert!(
        err.contains("did not come up") && err.to_lowercase().contains("toml"),
        "{err}"
    );
}
