//! A single-layer busybox-static OCI image (no registry is reachable), for the lifecycle tests
//! that must not depend on whiteouts passing through qtfs; the multi-layer and pause images are
//! in [`crate::images`]. The layer is a plain (uncompressed) tar made with tar(1).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Reference of the single-layer image.
pub const BBOX: &str = "docker.io/library/oe2e-bbox:1";

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A busybox-static root in `dir`: /bin/busybox and a link per applet.
fn busybox_root(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy /bin/busybox");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        let name = name.trim();
        if !name.is_empty() && name != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(name));
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

fn tar_dir(dir: &Path, out: &Path) -> Vec<u8> {
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name"])
        .args(["--mtime=@0", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("."));
    std::fs::read(out).unwrap()
}

/// Packs layer directories (bottom first) as an OCI image archive at `out` named `reference`.
fn pack(work: &Path, layers: &[PathBuf], reference: &str, out: &Path) {
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let data = tar_dir(l, &work.join(format!("layer{i}.tar")));
        let d = hex(&data);
        std::fs::write(blobs.join(&d), &data).unwrap();
        diff_ids.push(format!("\"sha256:{d}\""));
        descs.push(format!(
            "{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:{d}\",\"size\":{}}}",
            data.len()
        ));
    }
    let config = format!(
        "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{\"Env\":[\"PATH=/usr/sbin:/usr/bin:/sbin:/bin\"],\"Cmd\":[\"/bin/sh\"],\"WorkingDir\":\"/\"}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}},\"created\":\"2024-01-01T00:00:00Z\"}}",
        diff_ids.join(",")
    );
    let cd = hex(config.as_bytes());
    std::fs::write(blobs.join(&cd), &config).unwrap();
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:{cd}\",\"size\":{}}},\"layers\":[{}]}}",
        config.len(),
        descs.join(",")
    );
    let md = hex(manifest.as_bytes());
    std::fs::write(blobs.join(&md), &manifest).unwrap();
    let tag = reference.rsplit_once(':').map(|x| x.1).unwrap_or("latest");
    std::fs::write(
        layout.join("index.json"),
        format!(
            "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{md}\",\"size\":{},\"annotations\":{{\"io.containerd.image.name\":\"{reference}\",\"org.opencontainers.image.ref.name\":\"{tag}\"}}}}]}}",
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        "{\"imageLayoutVersion\":\"1.0.0\"}",
    )
    .unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(out)
        .args(["oci-layout", "index.json", "blobs"]));
}

/// Builds the single-layer busybox image ([`BBOX`]) as `out` (work files under `work`).
pub fn busybox(work: &Path, out: &Path) {
    let w = work.join("bbox");
    let root = w.join("rootfs");
    busybox_root(&root);
    pack(&w, &[root], BBOX, out);
}
