//! The `[rootfs]` section of the DPU's `dpu.toml`: what `offload dpu setup` builds.
//!
//! The file is the one offloadd, mount.qtfs and offload-shim already read; each reads its own
//! sections. Defaults make a containerd root out of ~10 lines (see `tools/examples/dpu.toml`):
//! the DPU's procfs at `local_proc`, binds of `/usr` (read-only), `/etc`, `/run`, `/var/log`,
//! a devtmpfs, a tmpfs `/tmp`, qtfs `/proc` (proc mode) and `/sys` (sys mode), the data
//! directories listed in `qtfs`, the root made a mount point, and `offload-shim` installed as
//! `containerd-shim-runc-v2`.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Not TOML, or a field the tool does not know / of the wrong type.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// The file has no `[rootfs]` section.
    #[error("{path}: no [rootfs] section (see tools/examples/dpu.toml)")]
    NoRootfs {
        /// The file.
        path: PathBuf,
    },
    /// A value is out of range or inconsistent with another.
    #[error("[rootfs] {field}: {message}")]
    Invalid {
        /// The key, e.g. `qtfs[2].dst`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The DPU config file as this tool sees it: `[rootfs]` plus the `[qtfs]` address and key that
/// the qtfs mounts use. Other sections (`[bridge]`, ...) belong to other programs.
#[derive(Debug, Deserialize)]
pub struct DpuFile {
    /// `[qtfs] addr = "URL"` (and optional `transport`, `key_file`).
    #[serde(default)]
    pub qtfs: QtfsLink,
    /// The management plane's root.
    pub rootfs: Option<RootfsConfig>,
    /// `[bridge]` as far as setup checks it (offloadd reads the rest).
    #[serde(default)]
    pub bridge: BridgeView,
}

/// The keys of offloadd's `[bridge]` that `[rootfs.docker]` depends on.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct BridgeView {
    /// Directories whose stdio FIFOs the bridge pumps to the HOST.
    #[serde(default)]
    pub fifo_dirs: Vec<PathBuf>,
}

/// `[rootfs.docker]`: dockerd in the root, its mounts forwarded to the HOST by `offload run`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// dockerd's data root: one qtfs mount of it (dockerd binds a data root that is not a mount
    /// point onto itself, hiding separate mounts below it).
    pub data_root: PathBuf,
    /// Extra mount.qtfs options for the data root.
    pub data_root_options: String,
    /// dockerd's exec root; its `containerd` subdirectory holds container stdio FIFOs, which
    /// must be in `[bridge] fifo_dirs`.
    pub exec_root: PathBuf,
    /// The DPU containerd's socket (dockerd's `--containerd`).
    pub containerd: PathBuf,
    /// dockerd's API socket (`-H`).
    pub host: String,
    /// cgroup v1 controllers mounted at `/sys/fs/cgroup/<name>` in the root, over the qtfs
    /// `/sys`, where that directory exists (dockerd wants a devices cgroup in its mountinfo).
    pub cgroup_v1: Vec<String>,
    /// dockerd in the root.
    pub dockerd: PathBuf,
    /// More dockerd arguments.
    pub args: Vec<String>,
    /// The generated start script on the DPU (outside the root); a unit's `ExecStart`.
    pub wrapper: PathBuf,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            data_root: "/var/lib/docker".into(),
            data_root_options: String::new(),
            exec_root: "/run/docker".into(),
            containerd: "/run/containerd/containerd.sock".into(),
            host: "unix:///run/docker.sock".into(),
            cgroup_v1: [
                "cpu",
                "cpuacct",
                "cpuset",
                "memory",
                "devices",
                "freezer",
                "blkio",
                "pids",
                "perf_event",
                "hugetlb",
                "net_cls,net_prio",
            ]
            .map(String::from)
            .to_vec(),
            dockerd: "dockerd".into(),
            args: Vec::new(),
            wrapper: "/usr/local/sbin/offload-dockerd".into(),
        }
    }
}

/// `[qtfs]`: how mount.qtfs reaches the HOST (mount.qtfs reads the same keys).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct QtfsLink {
    /// HOST offloadd address (`tcp://H:P`, `vsock://CID:P`, ...).
    pub addr: Option<String>,
    /// Link type for a bare `addr`.
    pub transport: Option<String>,
    /// Pre-shared key file (default: mount.qtfs's own default, `/etc/offload/psk`).
    pub key_file: Option<PathBuf>,
}

/// A bind mount of a DPU path into the root.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum BindSpec {
    /// Same path on the DPU and in the root, read-write.
    Path(PathBuf),
    /// Full form.
    Full {
        /// DPU path.
        src: PathBuf,
        /// Path in the root (default: `src`).
        dst: Option<PathBuf>,
        /// Remount read-only.
        #[serde(default)]
        ro: bool,
        /// Skip (with a note) when `src` does not exist instead of failing.
        #[serde(default)]
        optional: bool,
    },
}

/// qtfs mount modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QtfsMode {
    /// A data directory (caching, write-behind).
    #[default]
    Data,
    /// The HOST's `/proc` (own pids resolve to `local_proc`).
    Proc,
    /// The HOST's `/sys`.
    Sys,
}

/// A qtfs mount of a HOST path into the root.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum QtfsSpec {
    /// A HOST data directory at the same path in the root.
    Path(PathBuf),
    /// Full form.
    Full {
        /// HOST path (inside one of the HOST's exports).
        src: PathBuf,
        /// Path in the root (default: `src`).
        dst: Option<PathBuf>,
        /// Mode (default `data`).
        #[serde(default)]
        mode: QtfsMode,
        /// Extra mount.qtfs options, e.g. `"negative_timeout=1,sync"`.
        #[serde(default)]
        options: String,
    },
}

/// A wrapper script in the root that runs a HOST program through rexec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrapperSpec {
    /// Path of the script in the root (e.g. `/opt/offload/bin/runc`).
    pub path: PathBuf,
    /// The program on the HOST.
    pub exec: PathBuf,
}

/// `[rootfs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootfsConfig {
    /// The management plane's root on the DPU.
    pub path: PathBuf,
    /// Where the DPU's own procfs is mounted, as a path inside the root (qtfs proc mode sends
    /// the caller's own pids there).
    pub local_proc: PathBuf,
    /// Create `bin`, `sbin`, `lib`, `lib64` as links into `usr/` and `var/run -> ../run` when
    /// absent (a usr-merged root whose `/usr` is a bind).
    pub usr_merge: bool,
    /// DPU paths bound into the root, in order.
    pub binds: Vec<BindSpec>,
    /// Mount a devtmpfs at `/dev` in the root.
    pub devtmpfs: bool,
    /// Fresh tmpfs directories in the root.
    pub tmpfs: Vec<PathBuf>,
    /// qtfs `/proc` (proc mode) at `/proc` in the root.
    pub proc: bool,
    /// qtfs `/sys` (sys mode) at `/sys` in the root.
    pub sys: bool,
    /// HOST directories mounted through qtfs, in order (parents before children).
    pub qtfs: Vec<QtfsSpec>,
    /// Options added to every qtfs mount (e.g. `"log=/var/log/offload/qtfs.log"`).
    pub qtfs_options: String,
    /// `mount.qtfs` to run; default `/sbin/mount.qtfs` through `mount -t qtfs` when it exists,
    /// else `mount_qtfs` next to this program, else on `PATH`.
    pub mount_qtfs: Option<PathBuf>,
    /// Make the root a mount point of its own (`mount --rbind R R`): dockerd's image unpacker
    /// remounts `/` rslave and needs it.
    pub rbind_self: bool,
    /// `offload-shim` to install as `containerd-shim-runc-v2` (default: next to this program).
    /// Empty string: install no shim.
    pub shim: Option<PathBuf>,
    /// Directory in the root that receives the shim; put it first on the daemon's `PATH`.
    pub shim_dir: PathBuf,
    /// Wrapper scripts that run HOST programs through rexec.
    pub wrappers: Vec<WrapperSpec>,
    /// rexec as the wrappers name it (found on the root's `PATH` by default).
    pub rexec: PathBuf,
    /// Directory for the record of what setup did (teardown reads it).
    pub state_dir: PathBuf,
    /// dockerd as a management plane too (absent: containerd only).
    pub docker: Option<DockerConfig>,
}

impl Default for RootfsConfig {
    fn default() -> Self {
        let p = PathBuf::from;
        RootfsConfig {
            path: p("/another_rootfs"),
            local_proc: p("/local_proc"),
            usr_merge: true,
            binds: vec![
                BindSpec::Full {
                    src: p("/usr"),
                    dst: None,
                    ro: true,
                    optional: false,
                },
                BindSpec::Path(p("/etc")),
                BindSpec::Path(p("/run")),
                BindSpec::Full {
                    src: p("/var/log"),
                    dst: None,
                    ro: false,
                    optional: true,
                },
            ],
            devtmpfs: true,
            tmpfs: vec![p("/tmp")],
            proc: true,
            sys: true,
            qtfs: Vec::new(),
            qtfs_options: String::new(),
            mount_qtfs: None,
            rbind_self: true,
            shim: None,
            shim_dir: p("/opt/offload/shim"),
            wrappers: Vec::new(),
            rexec: p("rexec"),
            state_dir: p("/run/offload"),
            docker: None,
        }
    }
}

/// A bind after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// DPU path.
    pub src: PathBuf,
    /// Path in the root.
    pub dst: PathBuf,
    /// Read-only.
    pub ro: bool,
    /// Skip when `src` is missing.
    pub optional: bool,
}

/// A qtfs mount after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qtfs {
    /// HOST path.
    pub src: PathBuf,
    /// Path in the root.
    pub dst: PathBuf,
    /// Mode.
    pub mode: QtfsMode,
    /// Extra options (comma separated).
    pub options: String,
}

impl BindSpec {
    /// With defaults applied.
    pub fn resolve(&self) -> Bind {
        match self {
            BindSpec::Path(p) => Bind {
                src: p.clone(),
                dst: p.clone(),
                ro: false,
                optional: false,
            },
            BindSpec::Full {
                src,
                dst,
                ro,
                optional,
            } => Bind {
                src: src.clone(),
                dst: dst.clone().unwrap_or_else(|| src.clone()),
                ro: *ro,
                optional: *optional,
            },
        }
    }
}

impl QtfsSpec {
    /// With defaults applied.
    pub fn resolve(&self) -> Qtfs {
        match self {
            QtfsSpec::Path(p) => Qtfs {
                src: p.clone(),
                dst: p.clone(),
                mode: QtfsMode::Data,
                options: String::new(),
            },
            QtfsSpec::Full {
                src,
                dst,
                mode,
                options,
            } => Qtfs {
                src: src.clone(),
                dst: dst.clone().unwrap_or_else(|| src.clone()),
                mode: *mode,
                options: options.clone(),
            },
        }
    }
}

/// Absolute, normal (no `.`/`..`) path check.
fn check_abs(field: &str, p: &Path) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError::Invalid {
        field: field.to_string(),
        message: format!("{}: {message}", p.display()),
    };
    if !p.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("must not contain `.` or `..`"));
    }
    Ok(())
}

impl RootfsConfig {
    /// The binds with defaults applied.
    pub fn binds(&self) -> Vec<Bind> {
        self.binds.iter().map(BindSpec::resolve).collect()
    }

    /// Every qtfs mount, `/proc` and `/sys` first when enabled.
    pub fn qtfs_mounts(&self) -> Vec<Qtfs> {
        let mut v = Vec::new();
        if self.proc {
            v.push(Qtfs {
                src: "/proc".into(),
                dst: "/proc".into(),
                mode: QtfsMode::Proc,
                options: String::new(),
            });
        }
        if self.sys {
            v.push(Qtfs {
                src: "/sys".into(),
                dst: "/sys".into(),
                mode: QtfsMode::Sys,
                options: String::new(),
            });
        }
        v.extend(self.qtfs.iter().map(QtfsSpec::resolve));
        if let Some(d) = &self.docker {
            if !v.iter().any(|q| q.dst == d.data_root) {
                v.push(Qtfs {
                    src: d.data_root.clone(),
                    dst: d.data_root.clone(),
                    mode: QtfsMode::Data,
                    options: d.data_root_options.clone(),
                });
            }
        }
        v
    }

    /// Checks every path and that no two mounts share a target.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_abs("path", &self.path)?;
        if self.path == Path::new("/") {
            return Err(ConfigError::Invalid {
                field: "path".into(),
                message: "the root must not be `/`".into(),
            });
        }
        check_abs("local_proc", &self.local_proc)?;
        check_abs("shim_dir", &self.shim_dir)?;
        check_abs("state_dir", &self.state_dir)?;
        let mut targets: Vec<(String, PathBuf)> =
            vec![("local_proc".into(), self.local_proc.clone())];
        for (i, b) in self.binds().iter().enumerate() {
            check_abs(&format!("binds[{i}].src"), &b.src)?;
            check_abs(&format!("binds[{i}].dst"), &b.dst)?;
            targets.push((format!("binds[{i}].dst"), b.dst.clone()));
        }
        if self.devtmpfs {
            targets.push(("devtmpfs".into(), "/dev".into()));
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            check_abs(&format!("tmpfs[{i}]"), t)?;
            targets.push((format!("tmpfs[{i}]"), t.clone()));
        }
        for (i, q) in self.qtfs_mounts().iter().enumerate() {
            let f = format!("qtfs[{i}]");
            check_abs(&format!("{f}.src"), &q.src)?;
            check_abs(&format!("{f}.dst"), &q.dst)?;
            if q.options.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    field: format!("{f}.options"),
                    message: "comma separated, no spaces".into(),
                });
            }
            targets.push((format!("{f}.dst"), q.dst.clone()));
        }
        for (i, w) in self.wrappers.iter().enumerate() {
            check_abs(&format!("wrappers[{i}].path"), &w.path)?;
            check_abs(&format!("wrappers[{i}].exec"), &w.exec)?;
        }
        if let Some(d) = &self.docker {
            check_abs("docker.data_root", &d.data_root)?;
            check_abs("docker.exec_root", &d.exec_root)?;
            check_abs("docker.containerd", &d.containerd)?;
            check_abs("docker.wrapper", &d.wrapper)?;
            if let Some(bad) = self
                .qtfs_mounts()
                .iter()
                .find(|q| q.dst != d.data_root && q.dst.starts_with(&d.data_root))
            {
                return Err(ConfigError::Invalid {
                    field: "docker.data_root".into(),
                    message: format!(
                        "{} is mounted separately below it: dockerd's self-bind of its data root \
                         would hide that mount; mount only the data root",
                        bad.dst.display()
                    ),
                });
            }
            for (i, c) in d.cgroup_v1.iter().enumerate() {
                if c.is_empty()
                    || !c
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "_,".contains(ch))
                {
                    return Err(ConfigError::Invalid {
                        field: format!("docker.cgroup_v1[{i}]"),
                        message: format!("{c:?} is not a cgroup v1 controller list"),
                    });
                }
            }
        }
        if self.qtfs_options.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                field: "qtfs_options".into(),
                message: "comma separated, no spaces".into(),
            });
        }
        for (i, (fa, a)) in targets.iter().enumerate() {
            if a == Path::new("/") {
                return Err(ConfigError::Invalid {
                    field: fa.clone(),
                    message: "cannot mount over the root itself".into(),
                });
            }
            if let Some((fb, _)) = targets[..i].iter().find(|(_, b)| b == a) {
                return Err(ConfigError::Invalid {
                    field: fa.clone(),
                    message: format!("{} is already the target of {fb}", a.display()),
                });
            }
        }
        Ok(())
    }
}

impl DpuFile {
    /// Parses `text` (named `path` in messages) and validates `[rootfs]`.
    pub fn parse(path: &Path, text: &str) -> Result<(QtfsLink, RootfsConfig), ConfigError> {
        let f: DpuFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let r = f.rootfs.ok_or_else(|| ConfigError::NoRootfs {
            path: path.to_path_buf(),
        })?;
        r.validate()?;
        if let Some(d) = &r.docker {
            let want = d.exec_root.join("containerd");
            if !f.bridge.fifo_dirs.contains(&want) {
                return Err(ConfigError::Invalid {
                    field: "docker.exec_root".into(),
                    message: format!(
                        "dockerd's container stdio FIFOs live in {}: add it to [bridge] fifo_dirs \
                         (here and on the HOST) or `docker run` output never arrives",
                        want.display()
                    ),
                });
            }
        }
        Ok((f.qtfs, r))
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<(QtfsLink, RootfsConfig), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(QtfsLink, RootfsConfig), ConfigError> {
        DpuFile::parse(Path::new("dpu.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let (link, r) = parse(
            r#"
            [qtfs]
            addr = "tcp://10.0.0.1:7000"
            [bridge]
            fifo_dirs = ["/run/containerd/fifo"]
            [rootfs]
            qtfs = ["/var/lib/containerd", { src = "/run/containerd/io.containerd.runtime.v2.task" }]
            "#,
        )
        .unwrap();
        assert_eq!(link.addr.as_deref(), Some("tcp://10.0.0.1:7000"));
        assert_eq!(r.path, PathBuf::from("/another_rootfs"));
        assert_eq!(r.local_proc, PathBuf::from("/local_proc"));
        let q = r.qtfs_mounts();
        assert_eq!(q.len(), 4);
        assert_eq!(q[0].mode, QtfsMode::Proc);
        assert_eq!(q[1].mode, QtfsMode::Sys);
        assert_eq!(q[2].dst, PathBuf::from("/var/lib/containerd"));
        assert_eq!(
            q[3].dst,
            PathBuf::from("/run/containerd/io.containerd.runtime.v2.task")
        );
        let b = r.binds();
        assert!(b[0].ro && b[0].src == Path::new("/usr"));
        assert!(b.iter().any(|b| b.dst == Path::new("/run")));
    }

    #[test]
    fn full_forms_parse() {
        let (_, r) = parse(
            r#"
            [rootfs]
            path = "/srv/mp"
            binds = ["/etc", { src = "/opt/x", dst = "/x", ro = true, optional = true }]
            proc = false
            qtfs = [{ src = "/var/lib/docker", options = "negative_timeout=1" }]
            wrappers = [{ path = "/opt/offload/bin/runc", exec = "/usr/bin/runc" }]
            "#,
        )
        .unwrap();
        assert_eq!(
            r.binds()[1],
            Bind {
                src: "/opt/x".into(),
                dst: "/x".into(),
                ro: true,
                optional: true
            }
        );
        assert_eq!(r.qtfs_mounts().len(), 2);
        assert_eq!(r.wrappers[0].exec, PathBuf::from("/usr/bin/runc"));
    }

    #[test]
    fn bad_configs_are_named() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(err("[qtfs]\naddr = \"x\"\n").contains("no [rootfs] section"));
        assert!(err("[rootfs]\npathh = \"/x\"\n").contains("unknown field `pathh`"));
        assert!(err("[rootfs]\npath = \"rel\"\n").contains("path: rel: must be an absolute"));
        assert!(err("[rootfs]\npath = \"/\"\n").contains("must not be `/`"));
        assert!(err("[rootfs]\nqtfs = [\"/a/../b\"]\n").contains("`..`"));
        let e = err("[rootfs]\nqtfs = [\"/etc\"]\n");
        assert!(
            e.contains("qtfs[2].dst") && e.contains("binds[1].dst"),
            "{e}"
        );
        assert!(err("[rootfs]\nqtfs = [{ src = \"/a\", mode = \"blob\" }]\n").contains("parsing"));
        assert!(err("[rootfs]\nqtfs_options = \"a, b\"\n").contains("no spaces"));
        assert!(err("[rootfs]\ntmpfs = [\"/\"]\n").contains("over the root"));
    }

    /// The example files shipped in tools/examples parse as each of their readers parses them.
    #[test]
    fn docker_needs_its_fifo_dir_and_one_data_root_mount() {
        let e = parse("[rootfs.docker]\n").unwrap_err().to_string();
        assert!(
            e.contains("/run/docker/containerd") && e.contains("fifo_dirs"),
            "{e}"
        );
        let ok = "[bridge]\nfifo_dirs = [\"/run/docker/containerd\"]\n[rootfs.docker]\n";
        let (_, cfg) = parse(ok).unwrap();
        assert!(cfg
            .qtfs_mounts()
            .iter()
            .any(|q| q.dst == Path::new("/var/lib/docker")));
        let e = parse(
            "[bridge]\nfifo_dirs = [\"/run/docker/containerd\"]\n[rootfs]\nqtfs = [\"/var/lib/docker/image\"]\n[rootfs.docker]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("self-bind"), "{e}");
        let e = parse(&format!("{ok}cgroup_v1 = [\"devices; rm\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cgroup_v1[0]"), "{e}");
    }

    #[test]
    fn shipped_examples_parse() {
        let dpu = include_str!("../../examples/dpu.toml");
        let host = include_str!("../../examples/host.toml");
        let (link, r) = DpuFile::parse(Path::new("tools/examples/dpu.toml"), dpu).unwrap();
        assert!(link.addr.is_some());
        assert_eq!(r.qtfs_mounts().len(), 4);
        let tbl = |t: &str| -> toml::Table { toml::from_str(t).unwrap() };
        let (d, h) = (tbl(dpu), tbl(host));
        for t in [&d, &h] {
            let _: shim_bridge::BridgeConfig = t["bridge"].clone().try_into().unwrap();
        }
        let _: offload_fs::FsConfig = h["fs"].clone().try_into().unwrap();
        let _: offload_exec::ExecConfig = h["exec"].clone().try_into().unwrap();
        for t in [&d, &h] {
            let tc: transport::TransportConfig = t["transport"].clone().try_into().unwrap();
            assert!(tc.encrypt_policy().tcp);
        }
    }
}
