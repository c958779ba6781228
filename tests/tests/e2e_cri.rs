//! The CRI plugin of stock containerd on a separated DPU (tests/src/e2e, `LabOptions::cri`) runs
//! a host-network pod's whole life as kubelet drives it (tests/src/cri.rs: RunPodSandbox,
//! CreateContainer, StartContainer, ExecSync, ContainerStatus, ContainerStats, StopContainer,
//! StopPodSandbox, RemovePodSandbox); the pod's processes are HOST processes, and nothing is
//! left on either side afterwards. The pod's image is the single-layer busybox one, so this test
//! does not depend on whiteouts (e2e_containerd_multilayer_whiteouts covers those).

use std::time::{Duration, Instant};

use tests::cri::{self, PodSpec};
use tests::e2e::{image, Lab, LabOptions, CGROUP_PARENT};
use tests::images;

const T: Duration = Duration::from_secs(60);

#[test]
fn e2e_cri_pod_lifecycle_on_separated_dpu() {
    let name = "e2e_cri_pod_lifecycle_on_separated_dpu";
    let Some(lab) = Lab::start(
        name,
        LabOptions {
            cri: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let pause = images::build_pause(lab.dir(), std::path::Path::new(images::BUSYBOX))
        .expect("building the pause image");
    std::fs::copy(&pause.oci_tar, lab.dpu_root_path("/tmp/pause.tar")).unwrap();
    let bbox = lab.dir().join("bbox.tar");
    image::busybox(lab.dir(), &bbox);
    std::fs::copy(&bbox, lab.dpu_root_path("/tmp/bbox.tar")).unwrap();
    for t in ["/tmp/pause.tar", "/tmp/bbox.tar"] {
        lab.ctr_ns("k8s.io", &["image", "import", t], T)
            .ok("import into k8s.io on the DPU");
    }
    let mut spec = PodSpec::new(lab.containerd_socket(), "oe2e-pod");
    spec.image = image::BBOX.into();
    spec.cgroup_parent = format!("{CGROUP_PARENT}/pod");
    // A host-path volume under kubelet's pod directory (qtfs-mounted on the DPU): the CRI
    // plugin on the DPU checks/creates the host path through qtfs, runc on the HOST binds it.
    let vol = "/var/lib/kubelet/pods/oe2e-pod-uid/volumes/kubernetes.io~empty-dir/data";
    std::fs::create_dir_all(lab.host_path(vol)).unwrap();
    std::fs::write(lab.host_path(&format!("{vol}/in.txt")), "from the HOST\n").unwrap();
    spec.volumes = vec![(vol.into(), "/data".into())];
    spec.command = vec![
        "sh".into(),
        "-c".into(),
        "cat /data/in.txt > /data/out.txt && echo written by the pod >> /data/out.txt; \
         echo started; exec sleep 300"
            .into(),
    ];
    let mut shims_while_running = Vec::new();
    let report = cri::run_pod_lifecycle_blocking(&spec, |r| {
        cri::check_on_this_host(r)?;
        shims_while_running = lab.host_shims();
        Ok(())
    })
    .unwrap_or_else(|e| panic!("pod lifecycle: {e}\n{}", lab.logs()));
    eprintln!("timings: {:?}", report.timings);
    let problems = report.problems();
    assert!(problems.is_empty(), "{problems:#?}\n{}", lab.logs());
    assert!(
        shims_while_running
            .iter()
            .any(|(_, c)| c.contains("containerd-shim-runc-v2") && c.contains("k8s.io")),
        "the pod's shim runs on the HOST: {shims_while_running:?}"
    );
    assert_eq!(report.exec_echo.stdout, "hi\n");
    // The volume: the pod wrote through the bind on the HOST; the DPU sees it through qtfs.
    let out = std::fs::read_to_string(lab.host_path(&format!("{vol}/out.txt")))
        .unwrap_or_else(|e| panic!("the pod's file on the HOST: {e}\n{}", lab.logs()));
    assert_eq!(out, "from the HOST\nwritten by the pod\n");
    let seen = lab.dpu_sh(&format!("cat {vol}/out.txt"), Duration::from_secs(10));
    assert_eq!(
        seen.stdout,
        out,
        "the DPU's view through qtfs: {} {}\n{}",
        seen.describe(),
        seen.stderr,
        lab.logs()
    );
    assert_eq!(report.exec_fail.exit_code, 7, "{:?}", report.exec_fail);
    report
        .wait_processes_gone(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    // Nothing left on either side.
    let start = Instant::now();
    loop {
        let shims = lab.host_shims();
        let pids = lab.container_pids();
        let fds = lab.host_deleted_fds();
        if shims.is_empty() && pids.is_empty() && fds.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left: shims {shims:?}, pod pids {pids:?}, HOST fds on deleted files {fds:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.dpu_log("containerd.log");
    let bad: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("RunPodSandbox for"))
        .filter(|l| l.contains("level=error"))
        .collect();
    assert!(
        bad.is_empty(),
        "errors during the pod's life:\n{}",
        bad.join("\n")
    );
}
