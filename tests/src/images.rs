//! Test images built from the HOST's static busybox, with no registry: the end-to-end tests must
//! run offline, and the images must exercise what real images do (several layers, whiteouts,
//! opaque directories, a pod sandbox image).
//!
//! Two images, each written as an OCI layout tarball (`ctr image import`) and as a docker-archive
//! tarball (`docker load`, also accepted by `ctr image import`). The bytes depend only on the
//! busybox binary and the options: every timestamp is 0, owners are 0:0, gzip headers carry no
//! time, and the "random" payload comes from a fixed-seed generator.
//!
//! - [`MULTI_REF`] ([`build_multi_layer`]): layer 1 is a busybox rootfs with `/etc/old.txt` and
//!   `/data/{a,b}.txt`; layer 2 deletes `/etc/old.txt` (whiteout `etc/.wh.old.txt`), turns `/data`
//!   into an opaque directory (`data/.wh..wh..opq`) holding only `new.txt`, and adds
//!   `/etc/layer2.txt`; layer 3 adds `/etc/layer3.txt` and, optionally, `payload_bytes` of
//!   incompressible data under `/payload` (for the import benchmark's ~50 MB image).
//!   [`WHITEOUT_CHECK`] run inside a container proves the layers were applied correctly.
//! - [`PAUSE_REF`] ([`build_pause`]): named like containerd 1.6's default `sandbox_image`; its
//!   entrypoint blocks until SIGTERM or SIGINT and then exits 0, like the real pause.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Reference of the multi-layer image (containerd's fully qualified form).
pub const MULTI_REF: &str = "docker.io/library/oe2e-multi:1";
/// Reference of the pause-like sandbox image: containerd 1.6.20's default `sandbox_image`
/// (`containerd config default`), so a stock CRI config finds it without edits.
pub const PAUSE_REF: &str = "registry.k8s.io/pause:3.6";
/// Where the HOST's static busybox lives (Debian package `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// A command (argv) to run inside a container of the multi-layer image: exits 0 and prints
/// [`WHITEOUT_CHECK_OUTPUT`] only if the whiteout and the opaque directory were applied (the
/// deleted file is absent, `/data` lists exactly `new.txt`, layers 2 and 3 are present).
pub const WHITEOUT_CHECK: &[&str] = &[
    "/bin/sh",
    "-c",
    "test ! -e /etc/old.txt || { echo 'old.txt present'; exit 10; }; \
     l=$(ls -A /data | tr '\\n' ' '); [ \"$l\" = 'new.txt ' ] || { echo \"data: $l\"; exit 11; }; \
     cat /data/new.txt /etc/layer2.txt /etc/layer3.txt",
];
/// What [`WHITEOUT_CHECK`] prints on success.
pub const WHITEOUT_CHECK_OUTPUT: &str = "new\nlayer2\nlayer3\n";

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading busybox or writing the output failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `busybox --list-full` failed or printed nothing.
    #[error("busybox at {0} cannot list its applets (install busybox-static)")]
    Busybox(PathBuf),
    /// The reference is not `name:tag`.
    #[error("image reference {0:?} has no tag")]
    BadReference(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// One layer of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:…` of the gzip blob (the manifest's layer digest).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    /// Size of the gzip blob in bytes.
    pub size: u64,
}

/// An image written to disk in both formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Fully qualified reference, as `ctr image ls` and the CRI show it.
    pub reference: String,
    /// The tag in the docker archive's `RepoTags` (docker's short form, e.g. `oe2e-multi:1`).
    pub docker_tag: String,
    /// OCI image layout tarball, for `ctr image import`.
    pub oci_tar: PathBuf,
    /// docker-archive tarball (`docker save` format), for `docker load`.
    pub docker_tar: PathBuf,
    /// `sha256:…` of the manifest (what containerd reports as the image's digest).
    pub manifest_digest: String,
    /// `sha256:…` of the config (the image id docker reports).
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// Sum of the compressed layer sizes.
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Options of [`build_multi_layer`].
#[derive(Debug, Clone)]
pub struct MultiLayerOptions {
    /// Image reference (default [`MULTI_REF`]).
    pub reference: String,
    /// Bytes of incompressible data added in layer 3 under `/payload` (default 0). About
    /// 48 MiB gives the ~50 MB image of the import benchmark.
    pub payload_bytes: u64,
    /// The busybox binary to copy (default [`BUSYBOX`]).
    pub busybox: PathBuf,
}

impl Default for MultiLayerOptions {
    fn default() -> Self {
        MultiLayerOptions {
            reference: MULTI_REF.into(),
            payload_bytes: 0,
            busybox: BUSYBOX.into(),
        }
    }
}

/// Both test images built into one directory.
#[derive(Debug, Clone)]
pub struct TestImages {
    /// [`MULTI_REF`] with default options.
    pub multi: Image,
    /// [`PAUSE_REF`].
    pub pause: Image,
}

/// Builds the multi-layer image (default options) and the pause image into `dir`.
pub fn build_all(dir: &Path) -> Result<TestImages, ImageError> {
    Ok(TestImages {
        multi: build_multi_layer(dir, &MultiLayerOptions::default())?,
        pause: build_pause(dir, Path::new(BUSYBOX))?,
    })
}

/// True when the busybox these images need is installed (tests skip with a reason otherwise).
pub fn busybox_available() -> bool {
    Path::new(BUSYBOX).is_file()
}

/// Builds the multi-layer image described in the module docs into `dir`
/// (`<name>-<tag>-oci.tar` and `<name>-<tag>-docker.tar`).
pub fn build_multi_layer(dir: &Path, opts: &MultiLayerOptions) -> Result<Image, ImageError> {
    let mut l1 = busybox_rootfs(&opts.busybox)?;
    l1.file("etc/old.txt", 0o644, b"old\n".to_vec());
    l1.file("data/a.txt", 0o644, b"a\n".to_vec());
    l1.file("data/b.txt", 0o644, b"b\n".to_vec());

    let mut l2 = Tree::default();
    l2.file("etc/.wh.old.txt", 0o644, Vec::new());
    l2.file("data/.wh..wh..opq", 0o644, Vec::new());
    l2.file("data/new.txt", 0o644, b"new\n".to_vec());
    l2.file("etc/layer2.txt", 0o644, b"layer2\n".to_vec());

    let mut l3 = Tree::default();
    l3.file("etc/layer3.txt", 0o644, b"layer3\n".to_vec());
    if opts.payload_bytes > 0 {
        // Several files rather than one: an import then creates, writes and closes many.
        const CHUNK: u64 = 4 << 20;
        let mut rng = SplitMix64(0x6f65_3265_2d70_6179);
        let mut left = opts.payload_bytes;
        let mut n = 0;
        while left > 0 {
            let len = left.min(CHUNK);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            l3.file(&format!("payload/blob-{n:03}.bin"), 0o644, data);
            left -= len;
            n += 1;
        }
    }
    let config = ImageConfig {
        entrypoint: None,
        cmd: vec!["/bin/sh".into()],
        stop_signal: None,
        history: vec![
            "busybox rootfs, /etc/old.txt, /data/{a,b}.txt".into(),
            "whiteout /etc/old.txt, opaque /data with new.txt, /etc/layer2.txt".into(),
            "/etc/layer3.txt and the payload".into(),
        ],
    };
    write_image(dir, &opts.reference, &[l1, l2, l3], &config)
}

/// Builds the pause-like sandbox image ([`PAUSE_REF`]) into `dir`: a single busybox layer whose
/// entrypoint sleeps until SIGTERM/SIGINT and exits 0 (the shell waits on a background sleep, so
/// a trapped signal ends the wait at once).
pub fn build_pause(dir: &Path, busybox: &Path) -> Result<Image, ImageError> {
    let l1 = busybox_rootfs(busybox)?;
    let config = ImageConfig {
        entrypoint: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
        ]),
        cmd: Vec::new(),
        stop_signal: Some("SIGTERM".into()),
        history: vec!["busybox rootfs; entrypoint waits for SIGTERM".into()],
    };
    write_image(dir, PAUSE_REF, &[l1], &config)
}

/// The docker `RepoTags` form of a reference: `docker.io/library/x:t` → `x:t`,
/// `docker.io/o/x:t` → `o/x:t`, other registries unchanged.
pub fn docker_tag(reference: &str) -> String {
    if let Some(rest) = reference.strip_prefix("docker.io/library/") {
        rest.into()
    } else if let Some(rest) = reference.strip_prefix("docker.io/") {
        rest.into()
    } else {
        reference.into()
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in h {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
}

/// A layer's contents keyed by relative path; sorted, so parents precede children.
#[derive(Debug, Clone, Default)]
struct Tree(BTreeMap<String, Node>);

impl Tree {
    fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        self.0.insert(path.into(), Node::Dir(mode));
    }
    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.0.insert(path.into(), Node::File(mode, data));
    }
    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.0.insert(path.into(), Node::Symlink(target.into()));
    }
    fn parents(&mut self, path: &str) {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            self.0.entry(parent.to_string()).or_insert(Node::Dir(0o755));
            p = parent;
        }
    }

    /// The layer as an uncompressed tar.
    fn to_tar(&self) -> Result<Vec<u8>, ImageError> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, node) in &self.0 {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            let err = io(format!("tar entry {path}"));
            match node {
                Node::Dir(mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(err)?;
                }
                Node::File(mode, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice()).map_err(err)?;
                }
                Node::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target).map_err(err)?;
                }
            }
        }
        b.into_inner().map_err(io("finish layer tar"))
    }
}

/// A minimal root filesystem: busybox, its applet symlinks, passwd/group, the usual dirs.
fn busybox_rootfs(busybox: &Path) -> Result<Tree, ImageError> {
    let bin = std::fs::read(busybox).map_err(io(format!("read {}", busybox.display())))?;
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io(format!("run {} --list-full", busybox.display())))?;
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || list.trim().is_empty() {
        return Err(ImageError::Busybox(busybox.into()));
    }
    let mut t = Tree::default();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "run", "var",
    ] {
        t.dir(d, 0o755);
    }
    t.dir("tmp", 0o1777);
    t.file("bin/busybox", 0o755, bin);
    for applet in list.lines().map(str::trim) {
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        t.symlink(applet.trim_start_matches('/'), "/bin/busybox");
    }
    t.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
    );
    t.file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    );
    Ok(t)
}

struct ImageConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Vec<String>,
    stop_signal: Option<String>,
    history: Vec<String>,
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn write_image(
    dir: &Path,
    reference: &str,
    trees: &[Tree],
    cfg: &ImageConfig,
) -> Result<Image, ImageError> {
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => return Err(ImageError::BadReference(reference.into())),
    };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;

    let mut tars = Vec::new();
    let mut blobs = Vec::new();
    let mut layers = Vec::new();
    for t in trees {
        let raw = t.to_tar()?;
        let diff_id = sha256_digest(&raw);
        // Large layers (the benchmark payload) compress fast; the rest as usual.
        let level = if raw.len() > 8 << 20 {
            flate2::Compression::fast()
        } else {
            flate2::Compression::default()
        };
        // GzBuilder writes mtime 0 and no file name: the blob depends only on the tar.
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), level);
        gz.write_all(&raw).map_err(io("gzip layer"))?;
        let gz = gz.finish().map_err(io("gzip layer"))?;
        let digest = sha256_digest(&gz);
        layers.push(Layer {
            digest,
            diff_id,
            size: gz.len() as u64,
        });
        tars.push(raw);
        blobs.push(gz);
    }

    let mut config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": cfg.history.iter().map(|h| serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": h,
        })).collect::<Vec<_>>(),
    });
    if let Some(ep) = &cfg.entrypoint {
        config["config"]["Entrypoint"] = serde_json::json!(ep);
    }
    if !cfg.cmd.is_empty() {
        config["config"]["Cmd"] = serde_json::json!(cfg.cmd);
    }
    if let Some(s) = &cfg.stop_signal {
        config["config"]["StopSignal"] = serde_json::json!(s);
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| ImageError::Io {
        what: "encode config".into(),
        source: e.into(),
    })?;
    let config_digest = sha256_digest(&config_bytes);

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Io {
        what: "encode manifest".into(),
        source: e.into(),
    })?;
    let manifest_digest = sha256_digest(&manifest_bytes);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": oci_arch(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let index_bytes = serde_json::to_vec(&index).map_err(|e| ImageError::Io {
        what: "encode index".into(),
        source: e.into(),
    })?;

    let base = name.rsplit('/').next().unwrap_or(name);
    let stem = format!("{base}-{tag}");
    let oci_tar = dir.join(format!("{stem}-oci.tar"));
    let docker_tar = dir.join(format!("{stem}-docker.tar"));

    // OCI image layout.
    {
        let mut files: Vec<(String, &[u8])> = vec![
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json".into(), &index_bytes),
        ];
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        files.push((
            format!("blobs/sha256/{}", hex(&config_digest)),
            &config_bytes,
        ));
        files.push((
            format!("blobs/sha256/{}", hex(&manifest_digest)),
            &manifest_bytes,
        ));
        for (l, b) in layers.iter().zip(&blobs) {
            files.push((format!("blobs/sha256/{}", hex(&l.digest)), b));
        }
        write_flat_tar(&oci_tar, &["blobs", "blobs/sha256"], &files)?;
    }

    // docker-archive (`docker save`): uncompressed layer tars named by diff_id.
    let docker_tag = docker_tag(reference);
    {
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let layer_paths: Vec<String> = layers
            .iter()
            .map(|l| format!("{}/layer.tar", hex(&l.diff_id)))
            .collect();
        let dmanifest = serde_json::json!([{
            "Config": format!("{}.json", hex(&config_digest)),
            "RepoTags": [docker_tag],
            "Layers": layer_paths,
        }]);
        let dmanifest_bytes = serde_json::to_vec(&dmanifest).map_err(|e| ImageError::Io {
            what: "encode docker manifest".into(),
            source: e.into(),
        })?;
        let mut repos = BTreeMap::new();
        repos.insert(
            docker_tag
                .rsplit_once(':')
                .map(|x| x.0)
                .unwrap_or(&docker_tag),
            BTreeMap::from([(
                tag,
                hex(&layers.last().map(|l| l.diff_id.clone()).unwrap_or_default()),
            )]),
        );
        let repos_bytes = serde_json::to_vec(&repos).map_err(|e| ImageError::Io {
            what: "encode repositories".into(),
            source: e.into(),
        })?;
        let config_name = format!("{}.json", hex(&config_digest));
        let mut files: Vec<(String, &[u8])> = vec![(config_name, &config_bytes)];
        let mut dirs = Vec::new();
        for (p, t) in layer_paths.iter().zip(&tars) {
            dirs.push(p.trim_end_matches("/layer.tar").to_string());
            files.push((p.clone(), t));
        }
        files.push(("manifest.json".into(), &dmanifest_bytes));
        files.push(("repositories".into(), &repos_bytes));
        let dir_refs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        write_flat_tar(&docker_tar, &dir_refs, &files)?;
    }

    Ok(Image {
        reference: reference.into(),
        docker_tag,
        oci_tar,
        docker_tar,
        manifest_digest,
        config_digest,
        layers,
    })
}

/// Writes a tar of `dirs` then `files` (path, bytes), deterministic headers, atomically.
fn write_flat_tar(out: &Path, dirs: &[&str], files: &[(String, &[u8])]) -> Result<(), ImageError> {
    let tmp = out.with_extension("tar.partial");
    let f = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    let err = || io(format!("write {}", tmp.display()));
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_size(0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())
            .map_err(err())?;
    }
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).map_err(err())?;
    }
    let mut w = b.into_inner().map_err(err())?;
    w.flush().map_err(err())?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io(format!("rename to {}", out.display())))
}

/// Deterministic, fast, incompressible bytes (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Reads every regular file of a tar archive into a map (path → bytes); used by the tests to
/// check what was written.
pub fn read_tar(data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, std::io::Error> {
    let mut a = tar::Archive::new(data);
    let mut out = BTreeMap::new();
    for e in a.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = e.path()?.to_string_lossy().into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v)?;
        out.insert(path, v);
    }
    Ok(out)
}

/// Lists a layer tar's entries as (path, type, link target) — for checking whiteouts.
pub fn list_tar(
    data: &[u8],
) -> Result<Vec<(String, tar::EntryType, Option<String>)>, std::io::Error> {
    let mut a = tar::Archive::new(data);
    let mut out = Vec::new();
    for e in a.entries()? {
        let e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let link = e.link_name()?.map(|l| l.to_string_lossy().into_owned());
        out.push((path, e.header().entry_type(), link));
    }
    Ok(out)
}

/// Decompresses a gzip layer blob.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut v = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut v)?;
    Ok(v)
}
