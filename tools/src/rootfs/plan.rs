//! The list of steps `offload dpu setup` performs for a `[rootfs]` config, in order; teardown
//! undoes the ones setup recorded in reverse. Computed without touching the system (except
//! locating binaries), so it is unit-tested without root and shown by `offload dpu plan`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::config::{DockerConfig, QtfsLink, QtfsMode, RootfsConfig};

/// Where a file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A copy of a file on the DPU.
    Copy(PathBuf),
    /// Generated text.
    Text(String),
}

/// How a qtfs mount is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QtfsHelper {
    /// `mount -t qtfs [-o OPTS] SRC DST` (mount(8) runs `/sbin/mount.qtfs`).
    MountT,
    /// `PROGRAM SRC DST [-o OPTS]` (mount_qtfs or mount.qtfs by path).
    Program(PathBuf),
}

/// One setup step; paths are absolute on the DPU (already inside the root where relevant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a directory and its missing parents.
    Mkdir(PathBuf),
    /// Create a symlink `link -> target` when nothing exists at `link`.
    Symlink {
        /// The link.
        link: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// The DPU's own procfs.
    Proc(PathBuf),
    /// A bind mount (made private; remounted read-only when `ro`).
    Bind {
        /// DPU path.
        src: PathBuf,
        /// Target.
        dst: PathBuf,
        /// Read-only.
        ro: bool,
        /// Skip when `src` is missing.
        optional: bool,
    },
    /// A devtmpfs.
    Devtmpfs(PathBuf),
    /// A fresh tmpfs.
    Tmpfs(PathBuf),
    /// A qtfs mount of a HOST path.
    Qtfs {
        /// HOST path.
        src: PathBuf,
        /// Target.
        dst: PathBuf,
        /// mount.qtfs options.
        options: String,
        /// How to run it.
        helper: QtfsHelper,
    },
    /// Install a file (mode applied).
    Install {
        /// Target.
        dst: PathBuf,
        /// Content.
        content: Content,
        /// Permission bits.
        mode: u32,
    },
    /// A cgroup v1 hierarchy (`mount -t cgroup -o CONTROLLERS`), skipped when `dst` is not a
    /// directory (the kernel or the HOST does not have that controller).
    CgroupV1 {
        /// Comma-separated controllers.
        controllers: String,
        /// Target.
        dst: PathBuf,
    },
    /// `mount --rbind R R`: the root becomes a mount point of its own.
    RbindSelf(PathBuf),
}

impl Step {
    /// The path the step creates or mounts on.
    pub fn target(&self) -> &Path {
        match self {
            Step::Mkdir(p) | Step::Proc(p) | Step::Devtmpfs(p) | Step::Tmpfs(p) => p,
            Step::RbindSelf(p) => p,
            Step::Symlink { link, .. } => link,
            Step::Bind { dst, .. }
            | Step::Qtfs { dst, .. }
            | Step::Install { dst, .. }
            | Step::CgroupV1 { dst, .. } => dst,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Mkdir(p) => write!(f, "mkdir -p {}", p.display()),
            Step::Symlink { link, target } => {
                write!(f, "ln -s {} {}", target.display(), link.display())
            }
            Step::Proc(p) => write!(f, "mount -t proc proc {}", p.display()),
            Step::Bind {
                src,
                dst,
                ro,
                optional,
            } => write!(
                f,
                "mount --bind{} {} {}{}",
                if *ro { " -o ro" } else { "" },
                src.display(),
                dst.display(),
                if *optional { " (if it exists)" } else { "" }
            ),
            Step::Devtmpfs(p) => write!(f, "mount -t devtmpfs devtmpfs {}", p.display()),
            Step::Tmpfs(p) => write!(f, "mount -t tmpfs tmpfs {}", p.display()),
            Step::Qtfs {
                src,
                dst,
                options,
                helper,
            } => {
                let o = if options.is_empty() {
                    String::new()
                } else {
                    format!(" -o {options}")
                };
                match helper {
                    QtfsHelper::MountT => {
                        write!(f, "mount -t qtfs{o} {} {}", src.display(), dst.display())
                    }
                    QtfsHelper::Program(p) => {
                        write!(f, "{} {} {}{o}", p.display(), src.display(), dst.display())
                    }
                }
            }
            Step::Install { dst, content, mode } => match content {
                Content::Copy(src) => {
                    write!(f, "install -m {mode:o} {} {}", src.display(), dst.display())
                }
                Content::Text(_) => write!(f, "write {} (mode {mode:o})", dst.display()),
            },
            Step::CgroupV1 { controllers, dst } => write!(
                f,
                "mount -t cgroup -o {controllers} cgroup {} (if it exists)",
                dst.display()
            ),
            Step::RbindSelf(p) => write!(f, "mount --rbind {} {}", p.display(), p.display()),
        }
    }
}

/// `root` + an absolute path inside it.
pub fn in_root(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Where the binaries the plan needs are (resolved by the caller: next to `offload`, PATH).
#[derive(Debug, Clone)]
pub struct Tools {
    /// `/sbin/mount.qtfs` exists: use `mount -t qtfs`.
    pub sbin_mount_qtfs: bool,
    /// `mount_qtfs` next to this program, if there.
    pub mount_qtfs: Option<PathBuf>,
    /// `offload-shim` next to this program, if there.
    pub offload_shim: Option<PathBuf>,
    /// This program (the docker start script runs `offload run` with it).
    pub offload: PathBuf,
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The shim replacement binary was not found.
    #[error("offload-shim not found next to this program: set [rootfs] shim = \"/path/offload-shim\" (or \"\" for none)")]
    NoShim,
}

/// Comma-joins non-empty option strings.
fn join_opts(parts: &[&str]) -> String {
    parts
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// The generated wrapper script.
pub fn wrapper_script(rexec: &Path, exec: &Path, addr: Option<&str>) -> String {
    let mut s = format!(
        "#!/bin/sh\n# Generated by `offload dpu setup`: runs {} on the HOST through rexec.\n",
        exec.display()
    );
    if let Some(a) = addr {
        s.push_str(&format!(
            "CMD_NET_ADDR=\"${{CMD_NET_ADDR:-{a}}}\"\nexport CMD_NET_ADDR\n"
        ));
    }
    s.push_str(&format!(
        "exec {} {} \"$@\"\n",
        rexec.display(),
        exec.display()
    ));
    s
}

/// Quotes `s` for a POSIX shell when it needs it.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The generated dockerd start script: dockerd chrooted in the root under `offload run`, so
/// the mounts its overlay2 driver makes are carried out on the HOST.
pub fn docker_script(
    link: &QtfsLink,
    cfg: &RootfsConfig,
    d: &DockerConfig,
    offload: &Path,
) -> String {
    let mut run = vec![offload.display().to_string(), "run".into()];
    if let Some(a) = &link.addr {
        run.extend(["--addr".into(), a.clone()]);
    }
    if let Some(t) = &link.transport {
        run.extend(["--transport".into(), t.clone()]);
    }
    if let Some(k) = &link.key_file {
        run.extend(["--key-file".into(), k.display().to_string()]);
    }
    run.extend(["--".into(), "chroot".into(), cfg.path.display().to_string()]);
    run.push(d.dockerd.display().to_string());
    run.extend([
        "--containerd".into(),
        d.containerd.display().to_string(),
        "--data-root".into(),
        d.data_root.display().to_string(),
        "--exec-root".into(),
        d.exec_root.display().to_string(),
        "-H".into(),
        d.host.clone(),
        "--storage-driver".into(),
        "overlay2".into(),
    ]);
    run.extend(d.args.iter().cloned());
    let line: Vec<String> = run.iter().map(|a| sh_quote(a)).collect();
    format!(
        "#!/bin/sh\n# Generated by `offload dpu setup`: dockerd in {} with its mounts carried out on\n\
         # the HOST (offload run). Extra arguments are passed to dockerd.\nexec {} \"$@\"\n",
        cfg.path.display(),
        line.join(" ")
    )
}

/// Builds the ordered step list for `cfg`.
pub fn plan(link: &QtfsLink, cfg: &RootfsConfig, tools: &Tools) -> Result<Vec<Step>, PlanError> {
    let r = &cfg.path;
    let mut steps = vec![Step::Mkdir(r.clone())];
    let mkdir = |steps: &mut Vec<Step>, p: PathBuf| steps.push(Step::Mkdir(p));
    if cfg.usr_merge {
        for d in ["bin", "sbin", "lib", "lib64"] {
            steps.push(Step::Symlink {
                link: r.join(d),
                target: PathBuf::from(format!("usr/{d}")),
            });
        }
        mkdir(&mut steps, r.join("var"));
        steps.push(Step::Symlink {
            link: r.join("var/run"),
            target: "../run".into(),
        });
    }
    let lp = in_root(r, &cfg.local_proc);
    mkdir(&mut steps, lp.clone());
    steps.push(Step::Proc(lp));
    for b in cfg.binds() {
        let dst = in_root(r, &b.dst);
        mkdir(&mut steps, dst.clone());
        steps.push(Step::Bind {
            src: b.src,
            dst,
            ro: b.ro,
            optional: b.optional,
        });
    }
    if cfg.devtmpfs {
        let d = r.join("dev");
        mkdir(&mut steps, d.clone());
        steps.push(Step::Devtmpfs(d));
    }
    for t in &cfg.tmpfs {
        let d = in_root(r, t);
        mkdir(&mut steps, d.clone());
        steps.push(Step::Tmpfs(d));
    }
    let helper = match (&cfg.mount_qtfs, tools.sbin_mount_qtfs, &tools.mount_qtfs) {
        (Some(p), _, _) => QtfsHelper::Program(p.clone()),
        (None, true, _) => QtfsHelper::MountT,
        (None, false, Some(p)) => QtfsHelper::Program(p.clone()),
        (None, false, None) => QtfsHelper::Program("mount_qtfs".into()),
    };
    let addr = link.addr.as_deref().map(|a| format!("addr={a}"));
    let transport = link.transport.as_deref().map(|t| format!("transport={t}"));
    let key = link
        .key_file
        .as_ref()
        .map(|k| format!("keyfile={}", k.display()));
    for q in cfg.qtfs_mounts() {
        let dst = in_root(r, &q.dst);
        let mode = match q.mode {
            QtfsMode::Data => String::new(),
            QtfsMode::Sys => "sys".into(),
            QtfsMode::Proc => format!("proc,local_proc={}", cfg.local_proc.display()),
        };
        let options = join_opts(&[
            addr.as_deref().unwrap_or(""),
            transport.as_deref().unwrap_or(""),
            key.as_deref().unwrap_or(""),
            &mode,
            &cfg.qtfs_options,
            &q.options,
        ]);
        mkdir(&mut steps, dst.clone());
        steps.push(Step::Qtfs {
            src: q.src,
            dst,
            options,
            helper: helper.clone(),
        });
    }
    let shim = match &cfg.shim {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None => Some(tools.offload_shim.clone().ok_or(PlanError::NoShim)?),
    };
    if let Some(src) = shim {
        let dir = in_root(r, &cfg.shim_dir);
        mkdir(&mut steps, dir.clone());
        steps.push(Step::Install {
            dst: dir.join("containerd-shim-runc-v2"),
            content: Content::Copy(src),
            mode: 0o755,
        });
    }
    for w in &cfg.wrappers {
        let dst = in_root(r, &w.path);
        if let Some(parent) = dst.parent() {
            mkdir(&mut steps, parent.to_path_buf());
        }
        steps.push(Step::Install {
            dst,
            content: Content::Text(wrapper_script(&cfg.rexec, &w.exec, link.addr.as_deref())),
            mode: 0o755,
        });
    }
    if let Some(d) = &cfg.docker {
        if cfg.sys {
            for c in &d.cgroup_v1 {
                steps.push(Step::CgroupV1 {
                    controllers: c.clone(),
                    dst: r.join("sys/fs/cgroup").join(c),
                });
            }
        }
        if let Some(parent) = d.wrapper.parent() {
            mkdir(&mut steps, parent.to_path_buf());
        }
        steps.push(Step::Install {
            dst: d.wrapper.clone(),
            content: Content::Text(docker_script(link, cfg, d, &tools.offload)),
            mode: 0o755,
        });
    }
    if cfg.rbind_self {
        steps.push(Step::RbindSelf(r.clone()));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::config::DpuFile;

    fn tools() -> Tools {
        Tools {
            sbin_mount_qtfs: false,
            mount_qtfs: Some("/opt/offload/bin/mount_qtfs".into()),
            offload_shim: Some("/opt/offload/bin/offload-shim".into()),
            offload: "/opt/offload/bin/offload".into(),
        }
    }

    /// The plan as `offload dpu plan` prints it, one step per line.
    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.to_string()).collect()
    }

    /// Index of the step printed as `needle`; fails showing the whole plan.
    fn position(text: &[String], needle: &str) -> usize {
        text.iter()
            .position(|s| s == needle)
            .unwrap_or_else(|| panic!("{needle:?} not in plan:\n{}", text.join("\n")))
    }

    fn load(t: &str) -> (QtfsLink, RootfsConfig) {
        DpuFile::parse(Path::new("dpu.toml"), t).unwrap()
    }

    #[test]
    fn containerd_plan_in_order() {
        let (link, cfg) = load(
            r#"
            [qtfs]
            addr = "tcp://10.0.0.1:7000"
            key_file = "/etc/offload/psk"
            [rootfs]
            qtfs = ["/var/lib/containerd"]
            qtfs_options = "log=/var/log/q.log"
            wrappers = [{ path = "/opt/offload/bin/runc", exec = "/usr/bin/runc" }]
            "#,
        );
        let steps = plan(&link, &cfg, &tools()).unwrap();
        let text = lines(&steps);
        let pos = |needle: &str| position(&text, needle);
        let r = "/another_rootfs";
        assert_eq!(pos(&format!("mkdir -p {r}")), 0);
        let lp = pos(&format!("mount -t proc proc {r}/local_proc"));
        let usr = pos(&format!("mount --bind -o ro /usr {r}/usr"));
        let qproc = pos(&format!("/opt/offload/bin/mount_qtfs /proc {r}/proc -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk,proc,local_proc=/local_proc,log=/var/log/q.log"));
        let qsys = pos(&format!("/opt/offload/bin/mount_qtfs /sys {r}/sys -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk,sys,log=/var/log/q.log"));
        let qdata = pos(&format!("/opt/offload/bin/mount_qtfs /var/lib/containerd {r}/var/lib/containerd -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk,log=/var/log/q.log"));
        let shim = pos(&format!("install -m 755 /opt/offload/bin/offload-shim {r}/opt/offload/shim/containerd-shim-runc-v2"));
        let rb = pos(&format!("mount --rbind {r} {r}"));
        assert!(lp < usr && usr < qproc && qproc < qsys && qsys < qdata && qdata < shim);
        assert_eq!(rb, text.len() - 1, "the self-bind comes last");
        pos(&format!("ln -s ../run {r}/var/run"));
        pos(&format!("mount -t devtmpfs devtmpfs {r}/dev"));
        pos(&format!("mount -t tmpfs tmpfs {r}/tmp"));
        // Every mount's target directory is made before it.
        for (i, s) in steps.iter().enumerate() {
            if matches!(s, Step::Qtfs { .. } | Step::Bind { .. } | Step::Proc(_)) {
                assert_eq!(steps[i - 1], Step::Mkdir(s.target().to_path_buf()));
            }
        }
        let wrapper = steps
            .iter()
            .find_map(|s| match s {
                Step::Install {
                    dst,
                    content: Content::Text(t),
                    ..
                } if dst.ends_with("bin/runc") => Some(t.clone()),
                _ => None,
            })
            .unwrap();
        assert!(wrapper.starts_with("#!/bin/sh\n"));
        assert!(wrapper.contains("exec rexec /usr/bin/runc \"$@\""));
        assert!(wrapper.contains("CMD_NET_ADDR:-tcp://10.0.0.1:7000"));
    }

    #[test]
    fn docker_plan() {
        let (link, cfg) = load(
            r#"
            [qtfs]
            addr = "tcp://10.0.0.1:7000"
            key_file = "/etc/offload/psk"
            [bridge]
            fifo_dirs = ["/run/containerd/fifo", "/run/docker/containerd"]
            [rootfs]
            qtfs = ["/var/lib/containerd"]
            [rootfs.docker]
            cgroup_v1 = ["devices", "net_cls,net_prio"]
            args = ["--bridge=none", "--label", "a b"]
            "#,
        );
        let steps = plan(&link, &cfg, &tools()).unwrap();
        let text = lines(&steps);
        let pos = |needle: &str| position(&text, needle);
        let r = "/another_rootfs";
        let qsys = pos(&format!("/opt/offload/bin/mount_qtfs /sys {r}/sys -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk,sys"));
        let data = pos(&format!("/opt/offload/bin/mount_qtfs /var/lib/docker {r}/var/lib/docker -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk"));
        let dev = pos(&format!(
            "mount -t cgroup -o devices cgroup {r}/sys/fs/cgroup/devices (if it exists)"
        ));
        pos(&format!("mount -t cgroup -o net_cls,net_prio cgroup {r}/sys/fs/cgroup/net_cls,net_prio (if it exists)"));
        let wrapper = pos("write /usr/local/sbin/offload-dockerd (mode 755)");
        let rb = pos(&format!("mount --rbind {r} {r}"));
        assert!(qsys < dev && data < wrapper && dev < rb && wrapper < rb);
        assert_eq!(
            text.iter()
                .filter(|t| t.contains("/var/lib/docker "))
                .count(),
            1,
            "one qtfs mount for the whole data root"
        );
        let script = steps
            .iter()
            .find_map(|s| match s {
                Step::Install {
                    content: Content::Text(t),
                    dst,
                    ..
                } if dst.ends_with("offload-dockerd") => Some(t.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            script.contains(
                "exec /opt/offload/bin/offload run --addr tcp://10.0.0.1:7000 --key-file /etc/offload/psk \
                 -- chroot /another_rootfs dockerd --containerd /run/containerd/containerd.sock \
                 --data-root /var/lib/docker --exec-root /run/docker -H unix:///run/docker.sock \
                 --storage-driver overlay2 --bridge=none --label 'a b' \"$@\""
            ),
            "{script}"
        );
    }

    #[test]
    fn helper_choice_and_shim() {
        let (link, cfg) = load("[rootfs]\nproc = false\nsys = false\nqtfs = [\"/d\"]\n");
        let mut t = tools();
        t.sbin_mount_qtfs = true;
        let steps = plan(&link, &cfg, &t).unwrap();
        assert!(steps
            .iter()
            .any(|s| s.to_string() == "mount -t qtfs /d /another_rootfs/d"));
        t.offload_shim = None;
        assert!(matches!(plan(&link, &cfg, &t), Err(PlanError::NoShim)));
        let (link, cfg) = load("[rootfs]\nshim = \"\"\nrbind_self = false\n");
        let steps = plan(&link, &cfg, &t).unwrap();
        assert!(!steps.iter().any(|s| matches!(s, Step::Install { .. })));
        assert!(!steps.iter().any(|s| matches!(s, Step::RbindSelf(_))));
    }
}
