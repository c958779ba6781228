//! The test images (tests/src/images.rs): the tarballs are deterministic and self-consistent
//! (every digest matches its bytes), and a real containerd imports them and runs them with the
//! whiteout semantics intact. The containerd is a private scratch instance (own root, state,
//! socket and `/run`, namespace `oecri`), not the machine's.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::images::{self, Image, MultiLayerOptions};
use tests::scratch_containerd::{self, ScratchContainerd, ScratchOptions};
use tests::scratch_dockerd::{self, ScratchDockerd};

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

fn hex(d: &str) -> &str {
    d.strip_prefix("sha256:").expect("sha256: digest")
}

/// Parses the OCI layout and checks every link index → manifest → config/layers → diff_ids.
/// Returns the uncompressed layer tars.
fn check_oci(img: &Image) -> Vec<Vec<u8>> {
    let tar = std::fs::read(&img.oci_tar).expect("read OCI tar");
    let files = images::read_tar(&tar).expect("OCI tar parses");
    assert_eq!(
        json(&files["oci-layout"])["imageLayoutVersion"],
        "1.0.0",
        "oci-layout"
    );
    for (path, data) in &files {
        if let Some(h) = path.strip_prefix("blobs/sha256/") {
            assert_eq!(
                images::sha256_digest(data),
                format!("sha256:{h}"),
                "blob {path} content matches its name"
            );
        }
    }
    let index = json(&files["index.json"]);
    let m = &index["manifests"][0];
    assert_eq!(m["annotations"]["io.containerd.image.name"], img.reference);
    assert_eq!(m["digest"], img.manifest_digest);
    let mbytes = &files[&format!("blobs/sha256/{}", hex(&img.manifest_digest))];
    assert_eq!(m["size"], mbytes.len());
    let manifest = json(mbytes);
    assert_eq!(manifest["config"]["digest"], img.config_digest);
    let cbytes = &files[&format!("blobs/sha256/{}", hex(&img.config_digest))];
    assert_eq!(manifest["config"]["size"], cbytes.len());
    let config = json(cbytes);
    let mlayers = manifest["layers"].as_array().expect("layers array");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(mlayers.len(), img.layers.len());
    assert_eq!(diff_ids.len(), img.layers.len());
    let mut raw = Vec::new();
    for ((ml, did), l) in mlayers.iter().zip(diff_ids).zip(&img.layers) {
        assert_eq!(ml["digest"], l.digest);
        assert_eq!(ml["size"], l.size);
        assert_eq!(*did, l.diff_id);
        let blob = &files[&format!("blobs/sha256/{}", hex(&l.digest))];
        assert_eq!(blob.len() as u64, l.size);
        let t = images::gunzip(blob).expect("layer gunzips");
        assert_eq!(images::sha256_digest(&t), l.diff_id, "diff_id of the layer");
        raw.push(t);
    }
    raw
}

/// Parses the docker archive and checks it describes the same config and layers.
fn check_docker(img: &Image) {
    let tar = std::fs::read(&img.docker_tar).expect("read docker tar");
    let files = images::read_tar(&tar).expect("docker tar parses");
    let m = json(&files["manifest.json"]);
    assert_eq!(m[0]["RepoTags"][0], img.docker_tag);
    let cname = m[0]["Config"].as_str().expect("Config");
    assert_eq!(
        images::sha256_digest(&files[cname]),
        img.config_digest,
        "docker config is the OCI config"
    );
    let layers = m[0]["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), img.layers.len());
    for (p, l) in layers.iter().zip(&img.layers) {
        let data = &files[p.as_str().expect("layer path")];
        assert_eq!(images::sha256_digest(data), l.diff_id);
    }
}

#[test]
fn images_are_deterministic_and_consistent() {
    if !images::busybox_available() {
        return tests::skip(
            "images_are_deterministic_and_consistent",
            "no /bin/busybox (busybox-static)",
        );
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let ia = images::build_all(a.path()).expect("build images");
    let ib = images::build_all(b.path()).expect("build images again");
    for (x, y) in [(&ia.multi, &ib.multi), (&ia.pause, &ib.pause)] {
        assert_eq!(x.manifest_digest, y.manifest_digest);
        for (p, q) in [(&x.oci_tar, &y.oci_tar), (&x.docker_tar, &y.docker_tar)] {
            assert_eq!(
                std::fs::read(p).expect("read"),
                std::fs::read(q).expect("read"),
                "{} is byte-for-byte reproducible",
                p.display()
            );
        }
        check_docker(x);
    }
    assert_eq!(ia.multi.reference, images::MULTI_REF);
    assert_eq!(ia.multi.docker_tag, "oe2e-multi:1");
    assert_eq!(ia.pause.reference, images::PAUSE_REF);
    assert_eq!(ia.pause.docker_tag, images::PAUSE_REF);

    let raw = check_oci(&ia.multi);
    assert_eq!(raw.len(), 3, "three layers");
    let l1: BTreeMap<String, _> = images::list_tar(&raw[0])
        .expect("layer 1")
        .into_iter()
        .map(|(p, t, l)| (p, (t, l)))
        .collect();
    assert_eq!(l1["bin/busybox"].0, tar::EntryType::Regular);
    assert_eq!(
        l1["bin/sh"],
        (tar::EntryType::Symlink, Some("/bin/busybox".into()))
    );
    for f in ["etc/old.txt", "data/a.txt", "data/b.txt", "etc/passwd"] {
        assert_eq!(l1[f].0, tar::EntryType::Regular, "{f} in layer 1");
    }
    let l2: Vec<String> = images::list_tar(&raw[1])
        .expect("layer 2")
        .into_iter()
        .map(|(p, _, _)| p)
        .collect();
    for f in [
        "etc/.wh.old.txt",
        "data/.wh..wh..opq",
        "data/new.txt",
        "etc/layer2.txt",
    ] {
        assert!(l2.iter().any(|p| p == f), "{f} in layer 2: {l2:?}");
    }
    assert!(!l2.iter().any(|p| p == "data/a.txt"));

    let raw = check_oci(&ia.pause);
    assert_eq!(raw.len(), 1);
    let files = images::read_tar(&std::fs::read(&ia.pause.oci_tar).expect("read")).expect("tar");
    let config = json(&files[&format!("blobs/sha256/{}", hex(&ia.pause.config_digest))]);
    let ep = config["config"]["Entrypoint"]
        .as_array()
        .expect("pause entrypoint");
    assert!(ep[2].as_str().expect("script").contains("trap"), "{ep:?}");

    // The payload option: incompressible, so the layers grow by about the payload.
    let c = tempfile::tempdir().expect("tempdir");
    let big = images::build_multi_layer(
        c.path(),
        &MultiLayerOptions {
            payload_bytes: 9 << 20,
            ..Default::default()
        },
    )
    .expect("build with payload");
    check_oci(&big);
    check_docker(&big);
    assert!(
        big.layers[2].size > 9 << 20,
        "payload layer {} bytes",
        big.layers[2].size
    );
    assert_eq!(big.layers[0], ia.multi.layers[0], "layer 1 unchanged");
}

fn root_and_tools(name: &str) -> bool {
    if !tests::is_root() {
        tests::skip(name, "needs root (containerd, overlay mounts)");
        return false;
    }
    if let Some(t) = scratch_containerd::missing_tool() {
        tests::skip(
            name,
            &format!("{t} missing (apt-get install containerd runc)"),
        );
        return false;
    }
    if !images::busybox_available() {
        tests::skip(name, "no /bin/busybox (apt-get install busybox-static)");
        return false;
    }
    true
}

/// `ctr run --rm` of IMAGE with ARGV; returns (exit code, stdout).
fn ctr_run(c: &ScratchContainerd, image: &str, id: &str, argv: &[&str]) -> (i32, String) {
    let fifo = c.fifo_dir();
    let out = c
        .ctr("oecri")
        .args(["run", "--rm", "--fifo-dir"])
        .arg(&fifo)
        .args([image, id])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .expect("run ctr");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn images_import_and_run_in_containerd() {
    let name = "images_import_and_run_in_containerd";
    if !root_and_tools(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = images::build_all(dir.path()).expect("build images");
    let c = ScratchContainerd::start(&ScratchOptions::default()).expect("scratch containerd");

    // OCI layout: the image keeps the manifest digest we computed.
    c.import("oecri", &imgs.multi.oci_tar).expect("import OCI");
    let ls = c.ctr_ok("oecri", &["image", "ls"]).expect("image ls");
    let line = ls
        .lines()
        .find(|l| l.starts_with(images::MULTI_REF))
        .unwrap_or_else(|| panic!("{} imported: {ls}", images::MULTI_REF));
    assert!(line.contains(&imgs.multi.manifest_digest), "{line}");

    let pid = std::process::id();
    let (code, out) = ctr_run(
        &c,
        images::MULTI_REF,
        &format!("wh-oci-{pid}"),
        images::WHITEOUT_CHECK,
    );
    assert_eq!(
        (code, out.as_str()),
        (0, images::WHITEOUT_CHECK_OUTPUT),
        "whiteouts (OCI import)"
    );
    let (code, out) = ctr_run(
        &c,
        images::MULTI_REF,
        &format!("exit-{pid}"),
        &["sh", "-c", "exit 3"],
    );
    assert_eq!(code, 3, "exit code passes through: {out}");

    // docker-archive: same name, docker's own manifest; the same layers.
    c.ctr_ok("oecri", &["image", "rm", images::MULTI_REF])
        .expect("image rm");
    c.import("oecri", &imgs.multi.docker_tar)
        .expect("import docker archive");
    let (code, out) = ctr_run(
        &c,
        images::MULTI_REF,
        &format!("wh-dock-{pid}"),
        images::WHITEOUT_CHECK,
    );
    assert_eq!(
        (code, out.as_str()),
        (0, images::WHITEOUT_CHECK_OUTPUT),
        "whiteouts (docker import)"
    );

    // The pause image blocks until SIGTERM and then exits 0, promptly.
    c.import("oecri", &imgs.pause.oci_tar)
        .expect("import pause");
    let id = format!("pause-{pid}");
    c.ctr("oecri")
        .args(["run", "-d", "--fifo-dir"])
        .arg(c.fifo_dir())
        .args([images::PAUSE_REF, &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("ctr run -d pause")
        .success()
        .then_some(())
        .expect("pause started");
    std::thread::sleep(Duration::from_millis(300));
    let tasks = c.ctr_ok("oecri", &["task", "ls"]).expect("task ls");
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING")),
        "pause keeps running: {tasks}"
    );
    let t0 = Instant::now();
    c.ctr_ok("oecri", &["task", "kill", "-s", "SIGTERM", &id])
        .expect("kill");
    let stopped = loop {
        let tasks = c.ctr_ok("oecri", &["task", "ls"]).expect("task ls");
        if tasks
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(stopped, "pause exits on SIGTERM within 5 s");
    // `ctr task delete` exits with the task's exit code: success means the pause exited 0.
    c.ctr_ok("oecri", &["task", "delete", &id])
        .expect("pause exited 0 on SIGTERM");
    c.ctr_ok("oecri", &["container", "rm", &id])
        .expect("container rm");

    // Nothing left: no shim, no rootfs mount.
    tests::wait_until("shims gone", Duration::from_secs(10), || {
        c.shim_pids().is_empty()
    });
    let mounts: Vec<String> = c
        .mounts()
        .into_iter()
        .filter(|m| m.contains("rootfs"))
        .collect();
    assert!(mounts.is_empty(), "rootfs mounts left: {mounts:?}");
}

#[test]
fn images_docker_load_and_run() {
    let name = "images_docker_load_and_run";
    if !root_and_tools(name) {
        return;
    }
    if let Some(t) = scratch_dockerd::missing_tool() {
        return tests::skip(name, &format!("{t} missing (apt-get install docker.io)"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = images::build_all(dir.path()).expect("build images");
    let d = ScratchDockerd::start().expect("scratch dockerd");
    for img in [&imgs.multi, &imgs.pause] {
        let p = img.docker_tar.to_string_lossy().into_owned();
        let out = d.docker_ok(&["load", "-i", &p]).expect("docker load");
        assert!(
            out.contains(&format!("Loaded image: {}", img.docker_tag)),
            "{out}"
        );
        // docker's image id is the config digest we wrote.
        let id = d
            .docker_ok(&["image", "inspect", "-f", "{{.Id}}", &img.docker_tag])
            .expect("inspect");
        assert_eq!(id.trim(), img.config_digest);
    }
    let mut args = vec!["run", "--rm", "--network", "none", &imgs.multi.docker_tag];
    args.extend(images::WHITEOUT_CHECK);
    let out = d.docker_ok(&args).expect("docker run whiteout check");
    assert_eq!(
        out,
        images::WHITEOUT_CHECK_OUTPUT,
        "whiteouts (docker load)"
    );
    let st = d
        .docker()
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            &imgs.multi.docker_tag,
            "sh",
            "-c",
            "exit 3",
        ])
        .stdin(Stdio::null())
        .status()
        .expect("docker run");
    assert_eq!(st.code(), Some(3));
    tests::wait_until("docker shims gone", Duration::from_secs(10), || {
        d.shim_pids().is_empty()
    });
}

#[test]
fn images_cli_builds_the_same_images() {
    if !images::busybox_available() {
        return tests::skip(
            "images_cli_builds_the_same_images",
            "no /bin/busybox (busybox-static)",
        );
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let lib = images::build_all(a.path()).expect("build images");
    let out = std::process::Command::new(tests::bin("oe2e-images"))
        .arg("--out")
        .arg(b.path())
        .output()
        .expect("run oe2e-images");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (img, fmt) in [
        (&lib.multi, "oci"),
        (&lib.multi, "docker"),
        (&lib.pause, "oci"),
        (&lib.pause, "docker"),
    ] {
        let l = lines
            .iter()
            .find(|l| l[0] == img.reference && l[1] == fmt)
            .unwrap_or_else(|| panic!("{} {fmt} listed: {text}", img.reference));
        assert_eq!(l[3], img.manifest_digest);
        let mine = if fmt == "oci" {
            &img.oci_tar
        } else {
            &img.docker_tar
        };
        assert_eq!(
            std::fs::read(l[2]).expect("read CLI output"),
            std::fs::read(mine).expect("read library output"),
            "{} {fmt}: the CLI writes the library's bytes",
            img.reference
        );
    }
}
