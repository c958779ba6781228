//! HOST side of mount forwarding: the `mount` service carries out a DPU's mount(2) and
//! umount2(2) on paths inside the fs exports, within an allow-list from `host.toml`:
//!
//! ```toml
//! [mount]
//! allow = [
//!   { fstype = "overlay", target_under = "/var/lib/docker/overlay2" },   # lower/upper default to target_under
//!   { fstype = "tmpfs",   target_under = "/var/lib/docker/containers" },
//!   { fstype = "bind",    target_under = "/var/lib/kubelet/pods", source_under = ["/var/lib/kubelet/pods"] },
//! ]
//! ```
//!
//! Every path is resolved below its export with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` and handed to the kernel as `/proc/self/fd/N` of that descriptor, in
//! the target and in overlay's `lowerdir`/`upperdir`/`workdir`: the directory checked is the
//! directory mounted, whatever the DPU renames meanwhile. The option string is built here from
//! structured fields; option names come from a fixed list per filesystem type and values from a
//! small character set, so nothing can be smuggled in with a `,`. Anything outside the
//! allow-list or the exports is refused with EPERM and logged.
//!
//! Flags: `MS_RDONLY`, `MS_NOSUID`, `MS_NODEV`, `MS_NOEXEC` and the atime flags; bind mounts
//! (`MS_BIND`, `MS_REC`) of exported paths; remounts (`MS_REMOUNT`, with `MS_BIND`) of mounts
//! under an allowed target; umount with or without `MNT_DETACH`. Propagation changes and
//! `MS_MOVE` never reach the HOST (they concern the DPU's own mount tree).
//!
//! Mounts stay when the DPU's session ends: containers on the HOST use them.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{debug, info, warn};
use transport::{RemoteError, Service, Session, Stream};

use super::proto::{self, Kind, MountOpt, Reply, Request};
use super::spec::join_options;
use crate::server::FsService;
use crate::sys;

/// One allowed kind of mount.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// `overlay`, `bind`, `tmpfs` or another filesystem type whose options hold no paths.
    pub fstype: String,
    /// Mount points must lie at or below this HOST directory (and inside a writable export).
    /// Remounts and umounts are allowed at or below any rule's `target_under`.
    pub target_under: PathBuf,
    /// Bind sources must lie below one of these (default: `target_under`).
    #[serde(default)]
    pub source_under: Vec<PathBuf>,
    /// Overlay lower directories must lie below one of these (default: `target_under`).
    #[serde(default)]
    pub lower_under: Vec<PathBuf>,
    /// Overlay upper and work directories must lie below one of these (default:
    /// `target_under`).
    #[serde(default)]
    pub upper_under: Vec<PathBuf>,
    /// Option names allowed for other filesystem types (default for tmpfs: size, mode, uid,
    /// gid, nr_inodes, nr_blocks, huge, inode64; none for others).
    #[serde(default)]
    pub options: Option<Vec<String>>,
}

/// `[mount]` section of the HOST config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// What a DPU may mount; empty refuses everything.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// Errors building the service.
#[derive(Debug, thiserror::Error)]
pub enum MountConfigError {
    /// A path in a rule is not absolute.
    #[error("[mount] rule path {0:?} is not absolute")]
    RelativePath(PathBuf),
    /// `fstype` is empty or has odd characters.
    #[error("[mount] rule fstype {0:?} is not a filesystem type name")]
    BadType(String),
}

/// Overlay options a DPU may pass besides the directories (values checked by [`plain`]).
const OVERLAY_OPTIONS: &[&str] = &[
    "index",
    "redirect_dir",
    "metacopy",
    "xino",
    "volatile",
    "userxattr",
    "nfs_export",
    "uuid",
];

/// tmpfs options allowed when a rule does not list its own.
const TMPFS_OPTIONS: &[&str] = &[
    "size",
    "mode",
    "uid",
    "gid",
    "nr_inodes",
    "nr_blocks",
    "huge",
    "inode64",
];

/// A plain name or value: letters, digits and `%._-` only, at most 64 bytes (no `,`, `=`, `/`,
/// quotes or spaces).
fn plain(s: &str) -> bool {
    s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"%._-".contains(&b))
}

fn under(p: &Path, list: &[PathBuf], default: &Path) -> bool {
    if list.is_empty() {
        p.starts_with(default)
    } else {
        list.iter().any(|b| p.starts_with(b))
    }
}

/// A refusal or failure: errno plus what the log and the DPU are told.
struct Fail(i32, String);

type Res<T> = Result<T, Fail>;

fn errno_fail<'a>(what: &'a str, path: &'a str) -> impl FnOnce(i32) -> Fail + 'a {
    move |e| {
        Fail(
            e,
            format!("{what} {path}: {}", std::io::Error::from_raw_os_error(e)),
        )
    }
}

/// The `mount` service (register as [`proto::SERVICE`] next to the `fs` service it shares
/// exports and nodes with).
#[derive(Clone)]
pub struct MountService {
    rules: Arc<Vec<AllowRule>>,
    fs: FsService,
}

/// A path resolved inside an export.
struct Resolved {
    idx: usize,
    host: PathBuf,
    rest: PathBuf,
}

impl MountService {
    /// Builds the service over the HOST's fs service (same exports, same node table).
    pub fn new(config: MountConfig, fs: FsService) -> Result<MountService, MountConfigError> {
        for r in &config.allow {
            if r.fstype.is_empty() || !plain(&r.fstype) {
                return Err(MountConfigError::BadType(r.fstype.clone()));
            }
            for p in std::iter::once(&r.target_under)
                .chain(&r.source_under)
                .chain(&r.lower_under)
                .chain(&r.upper_under)
            {
                if !p.is_absolute() {
                    return Err(MountConfigError::RelativePath(p.clone()));
                }
            }
        }
        Ok(MountService {
            rules: Arc::new(config.allow),
            fs,
        })
    }

    fn resolve(&self, path: &str, what: &str) -> Res<Resolved> {
        let (idx, host, rest) = self.fs.export_path(path).map_err(|e| {
            Fail(
                e,
                if e == libc::EPERM {
                    format!("{what} {path} is not inside an fs export")
                } else {
                    format!("{what} {path}: only plain components are allowed")
                },
            )
        })?;
        if rest.as_os_str().is_empty() {
            return Err(Fail(
                libc::EPERM,
                format!("{what} {path} is an export root"),
            ));
        }
        Ok(Resolved { idx, host, rest })
    }

    fn open(&self, r: &Resolved, flags: i32, what: &str) -> Res<OwnedFd> {
        let shown = r.host.display().to_string();
        self.fs
            .open_in_export(r.idx, &r.rest, flags)
            .map_err(errno_fail(what, &shown))
    }

    fn writable(&self, r: &Resolved, what: &str) -> Res<()> {
        if self.fs.export_read_only(r.idx) {
            return Err(Fail(
                libc::EROFS,
                format!("{what} {} is in a read-only export", r.host.display()),
            ));
        }
        Ok(())
    }

    fn any_target_rule(&self, host: &Path) -> bool {
        any_target(&self.rules, host)
    }

    /// Checks a mount against one rule; the Ok value holds the descriptors (kept open until
    /// the mount is done), the source, type and the data string.
    fn prepare(&self, rule: &AllowRule, kind: &Kind) -> Res<Prepared> {
        let mut fds = Vec::new();
        let mut fd_path = |fd: OwnedFd| {
            let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
            fds.push(fd);
            p
        };
        let dir = libc::O_PATH | libc::O_DIRECTORY;
        match kind {
            Kind::Overlay {
                source,
                lower,
                upper,
                work,
                options,
            } => {
                if !plain(source) || source.is_empty() {
                    return Err(Fail(libc::EINVAL, format!("bad source name {source:?}")));
                }
                let mut data = String::from("lowerdir=");
                for (i, l) in lower.iter().enumerate() {
                    let r = self.resolve(l, "lowerdir")?;
                    if !under(&r.host, &rule.lower_under, &rule.target_under) {
                        return Err(Fail(
                            libc::EPERM,
                            format!("lowerdir {} is outside the allowed trees", r.host.display()),
                        ));
                    }
                    if i > 0 {
                        data.push(':');
                    }
                    data.push_str(&fd_path(self.open(&r, dir, "lowerdir")?));
                }
                for (key, p) in [("upperdir", upper), ("workdir", work)] {
                    let Some(p) = p else { continue };
                    let r = self.resolve(p, key)?;
                    if !under(&r.host, &rule.upper_under, &rule.target_under) {
                        return Err(Fail(
                            libc::EPERM,
                            format!("{key} {} is outside the allowed trees", r.host.display()),
                        ));
                    }
                    self.writable(&r, key)?;
                    data.push_str(&format!(",{key}={}", fd_path(self.open(&r, dir, key)?)));
                }
                check_options(options, OVERLAY_OPTIONS)?;
                if !options.is_empty() {
                    data.push(',');
                    data.push_str(&join_options(options));
                }
                Ok(Prepared {
                    fds,
                    source: Some(source.clone()),
                    fstype: Some("overlay".into()),
                    flags: 0,
                    data: Some(data),
                })
            }
            Kind::Bind { source, recursive } => {
                let r = self.resolve(source, "bind source")?;
                if !under(&r.host, &rule.source_under, &rule.target_under) {
                    return Err(Fail(
                        libc::EPERM,
                        format!(
                            "bind source {} is outside the allowed trees",
                            r.host.display()
                        ),
                    ));
                }
                let src = fd_path(self.open(&r, libc::O_PATH, "bind source")?);
                let rec = if *recursive { libc::MS_REC } else { 0 };
                Ok(Prepared {
                    fds,
                    source: Some(src),
                    fstype: None,
                    flags: proto::u64_of(libc::MS_BIND | rec),
                    data: None,
                })
            }
            Kind::Other {
                fstype,
                source,
                options,
            } => {
                if !plain(source) || source.is_empty() {
                    return Err(Fail(
                        libc::EPERM,
                        format!("source {source:?} is not a plain name (device paths are refused)"),
                    ));
                }
                let names: Vec<&str> = match &rule.options {
                    Some(l) => l.iter().map(String::as_str).collect(),
                    None if fstype == "tmpfs" => TMPFS_OPTIONS.to_vec(),
                    None => Vec::new(),
                };
                check_options(options, &names)?;
                Ok(Prepared {
                    fds,
                    source: Some(source.clone()),
                    fstype: Some(fstype.clone()),
                    flags: 0,
                    data: (!options.is_empty()).then(|| join_options(options)),
                })
            }
            Kind::Remount { .. } => Err(Fail(libc::EINVAL, "remount is not a new mount".into())),
        }
    }

    fn do_mount(&self, target: &str, kind: &Kind, flags: u64) -> Res<String> {
        if flags & !proto::ALLOWED_FLAGS != 0 {
            return Err(Fail(
                libc::EINVAL,
                format!(
                    "flags {:#x} beyond the allowed per-mount flags",
                    flags & !proto::ALLOWED_FLAGS
                ),
            ));
        }
        let t = self.resolve(target, "target")?;
        if let Kind::Remount { bind } = kind {
            if !self.any_target_rule(&t.host) {
                return Err(Fail(
                    libc::EPERM,
                    format!(
                        "remount of {} is outside every allowed target",
                        t.host.display()
                    ),
                ));
            }
            let tfd = self.open(&t, libc::O_PATH, "target")?;
            let b = if *bind { libc::MS_BIND } else { 0 };
            sys_mount(
                None,
                &tfd,
                None,
                flags | proto::u64_of(libc::MS_REMOUNT | b),
                None,
            )
            .map_err(errno_fail("remount", &t.host.display().to_string()))?;
            return Ok(format!("remounted {} ({flags:#x})", t.host.display()));
        }
        let mut last = Fail(
            libc::EPERM,
            format!(
                "no allow rule for {} mounts at {}",
                kind.fstype(),
                t.host.display()
            ),
        );
        let mut prepared = None;
        for rule in rules_for(&self.rules, kind.fstype(), &t.host) {
            match self.prepare(rule, kind) {
                Ok(p) => {
                    prepared = Some(p);
                    break;
                }
                Err(f) => last = f,
            }
        }
        let Some(p) = prepared else {
            return Err(last);
        };
        self.writable(&t, "target")?;
        let tflags = if matches!(kind, Kind::Bind { .. }) {
            libc::O_PATH
        } else {
            libc::O_PATH | libc::O_DIRECTORY
        };
        let tfd = self.open(&t, tflags, "target")?;
        let under = sys::fstat(tfd.as_raw_fd())
            .map_err(errno_fail("target", &t.host.display().to_string()))?;
        sys_mount(
            p.source.as_deref(),
            &tfd,
            p.fstype.as_deref(),
            flags | p.flags,
            p.data.as_deref(),
        )
        .map_err(errno_fail("mount on", &t.host.display().to_string()))?;
        drop(p.fds);
        // The new mount's root, reached by path again (this enters the mount).
        let mut moved = 0;
        if let Ok(root) = self.open(&t, libc::O_PATH, "target") {
            if let Ok(st) = sys::fstat(root.as_raw_fd()) {
                if (st.st_dev, st.st_ino) != (under.st_dev, under.st_ino) {
                    moved = self
                        .fs
                        .cover((under.st_dev, under.st_ino), &Arc::new(root), &st);
                }
            }
        }
        Ok(format!(
            "mounted {} on {} (DPU nodes moved onto it: {moved})",
            kind.fstype(),
            t.host.display()
        ))
    }

    fn do_umount(&self, target: &str, detach: bool) -> Res<String> {
        let t = self.resolve(target, "target")?;
        let shown = t.host.display().to_string();
        let parent = Resolved {
            idx: t.idx,
            host: t.host.clone(),
            rest: t.rest.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let name = t
            .rest
            .file_name()
            .and_then(|n| CString::new(n.as_encoded_bytes()).ok())
            .ok_or_else(|| Fail(libc::EINVAL, format!("bad target {shown}")))?;
        let pfd = self.open(&parent, libc::O_PATH | libc::O_DIRECTORY, "parent of")?;
        let pmnt = sys::mnt_id(pfd.as_raw_fd()).map_err(errno_fail("parent of", &shown))?;
        let (root, tmnt) = {
            let top = sys::openat2_beneath(
                pfd.as_raw_fd(),
                &name,
                libc::O_PATH | libc::O_NOFOLLOW,
                libc::RESOLVE_NO_SYMLINKS,
            )
            .map_err(errno_fail("target", &shown))?;
            let st = sys::fstat(top.as_raw_fd()).map_err(errno_fail("target", &shown))?;
            let mnt = sys::mnt_id(top.as_raw_fd()).map_err(errno_fail("target", &shown))?;
            ((st.st_dev, st.st_ino), mnt)
        };
        // Not a mount point: the kernel's EINVAL, whatever the allow-list says (dockerd
        // unmounts directories that may not be mounted and ignores only EINVAL).
        if tmnt == pmnt {
            return Err(Fail(libc::EINVAL, format!("{shown} is not a mount point")));
        }
        if !self.any_target_rule(&t.host) {
            return Err(Fail(
                libc::EPERM,
                format!("umount of {shown} is outside every allowed target"),
            ));
        }
        let restored = self.fs.uncover(root, tmnt);
        let flags = libc::UMOUNT_NOFOLLOW | if detach { libc::MNT_DETACH } else { 0 };
        if let Err(e) = umount_at(pfd, name, flags) {
            // Still mounted: point the restored nodes at its root again.
            if let Ok(rfd) = self.open(&t, libc::O_PATH, "target") {
                if let Ok(st) = sys::fstat(rfd.as_raw_fd()) {
                    let rfd = Arc::new(rfd);
                    for u in &restored {
                        self.fs.cover(*u, &rfd, &st);
                    }
                }
            }
            return Err(errno_fail("umount", &shown)(e));
        }
        Ok(format!("unmounted {shown}"))
    }

    fn handle(&self, req: Request) -> Res<String> {
        match req {
            Request::Mount { version, .. } | Request::Umount { version, .. }
                if version != proto::VERSION =>
            {
                Err(Fail(
                    libc::EPROTO,
                    format!(
                        "mount protocol version {version} not supported (HOST speaks {})",
                        proto::VERSION
                    ),
                ))
            }
            Request::Mount {
                target,
                kind,
                flags,
                ..
            } => self.do_mount(&target, &kind, flags),
            Request::Umount { target, detach, .. } => self.do_umount(&target, detach),
        }
    }
}

/// The rules that may allow a new `fstype` mount at HOST path `target`.
fn rules_for<'a>(
    rules: &'a [AllowRule],
    fstype: &'a str,
    target: &'a Path,
) -> impl Iterator<Item = &'a AllowRule> + 'a {
    rules
        .iter()
        .filter(move |r| r.fstype == fstype && target.starts_with(&r.target_under))
}

/// Remounts and umounts: at or below any rule's `target_under`.
fn any_target(rules: &[AllowRule], target: &Path) -> bool {
    rules.iter().any(|r| target.starts_with(&r.target_under))
}

/// Descriptors and arguments of a checked mount.
struct Prepared {
    fds: Vec<OwnedFd>,
    source: Option<String>,
    fstype: Option<String>,
    flags: u64,
    data: Option<String>,
}

fn check_options(options: &[MountOpt], names: &[&str]) -> Res<()> {
    for o in options {
        if !names.contains(&o.key.as_str()) {
            return Err(Fail(
                libc::EPERM,
                format!("option {:?} is not allowed", o.key),
            ));
        }
        if let Some(v) = &o.value {
            if !plain(v) {
                return Err(Fail(
                    libc::EINVAL,
                    format!(
                        "option {}: value {v:?} has characters outside [A-Za-z0-9%._-]",
                        o.key
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn cstr(s: &str) -> Result<CString, i32> {
    CString::new(s).map_err(|_| libc::EINVAL)
}

/// mount(2) onto the directory `target` refers to (through its `/proc/self/fd` link).
fn sys_mount(
    source: Option<&str>,
    target: &OwnedFd,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> Result<(), i32> {
    let src = source.map(cstr).transpose()?;
    let typ = fstype.map(cstr).transpose()?;
    let dat = data.map(cstr).transpose()?;
    let tgt = sys::fd_path(target.as_raw_fd());
    // SAFETY: every pointer is a valid C string or null; the result is checked.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            tgt.as_ptr(),
            typ.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags as libc::c_ulong,
            dat.as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr() as *const libc::c_void),
        )
    };
    if rc < 0 {
        Err(sys::last())
    } else {
        Ok(())
    }
}

/// umount2(2) of `name` in the directory `parent`, from a thread with its own working
/// directory (`unshare(CLONE_FS)`): no path is resolved from the root, and no descriptor
/// of ours pins the mount (a `/proc/self/fd` target would make it busy).
fn umount_at(parent: OwnedFd, name: CString, flags: i32) -> Result<(), i32> {
    let t = std::thread::Builder::new()
        .name("umount".into())
        .spawn(move || {
            // SAFETY: plain syscalls on this thread's own fs context; results checked.
            unsafe {
                if libc::unshare(libc::CLONE_FS) < 0 {
                    return Err(sys::last());
                }
                if libc::fchdir(parent.as_raw_fd()) < 0 {
                    return Err(sys::last());
                }
                drop(parent);
                if libc::umount2(name.as_ptr(), flags) < 0 {
                    return Err(sys::last());
                }
            }
            Ok(())
        })
        .map_err(|_| libc::EAGAIN)?;
    t.join().unwrap_or(Err(libc::EIO))
}

#[async_trait]
impl Service for MountService {
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let req: Request = postcard::from_bytes(&req)
            .map_err(|e| RemoteError::new(libc::EINVAL, format!("bad mount request: {e}")))?;
        let me = self.clone();
        let peer = session.peer().to_string();
        let what = format!("{req:?}");
        let res = tokio::task::spawn_blocking(move || me.handle(req))
            .await
            .unwrap_or_else(|_| Err(Fail(libc::EIO, "mount handler panicked".into())));
        match res {
            Ok(msg) => {
                info!(%peer, "{msg}");
                postcard::to_allocvec(&Reply::Done)
                    .map(Bytes::from)
                    .map_err(|e| RemoteError::new(libc::EIO, e.to_string()))
            }
            Err(Fail(code, message)) => {
                if code == libc::EPERM {
                    warn!(%peer, request = %what, "refused a DPU mount: {message}");
                } else if code == libc::EINVAL {
                    // dockerd unmounts every candidate directory on clean-up.
                    debug!(%peer, request = %what, "DPU mount failed: {message}");
                } else {
                    info!(%peer, request = %what, errno = code, "DPU mount failed: {message}");
                }
                Err(RemoteError::new(code, message))
            }
        }
    }

    async fn stream(&self, _session: &Session, _header: Bytes, stream: Stream) {
        stream.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<AllowRule> {
        let cfg: MountConfig = toml::from_str(
            r#"
            allow = [
              { fstype = "overlay", target_under = "/var/lib/docker/overlay2" },
              { fstype = "overlay", target_under = "/var/lib/containerd/tmpmounts", lower_under = ["/var/lib/containerd/snapshots"], upper_under = ["/var/lib/containerd/snapshots"] },
              { fstype = "tmpfs", target_under = "/var/lib/docker/containers", options = ["size"] },
            ]
            "#,
        )
        .expect("parse [mount]");
        cfg.allow
    }

    #[test]
    fn rules_match_by_type_and_target_tree() {
        let r = rules();
        let p = Path::new;
        let n = |t: &str, at: &str| rules_for(&r, t, p(at)).count();
        assert_eq!(n("overlay", "/var/lib/docker/overlay2/x/merged"), 1);
        assert_eq!(n("overlay", "/var/lib/docker/overlay2"), 1);
        // Component-wise: a sibling with the same prefix is outside.
        assert_eq!(n("overlay", "/var/lib/docker/overlay22/x"), 0);
        assert_eq!(n("tmpfs", "/var/lib/docker/overlay2/x/merged"), 0);
        assert_eq!(n("bind", "/var/lib/docker/overlay2/x"), 0);
        assert_eq!(n("tmpfs", "/var/lib/docker/containers/c/mounts/shm"), 1);
        assert!(any_target(&r, p("/var/lib/containerd/tmpmounts/m1")));
        assert!(!any_target(&r, p("/var/lib/containerd/snapshots/1/fs")));
        assert!(!any_target(&r, p("/etc")));
    }

    #[test]
    fn source_trees_default_to_the_target_tree() {
        let r = rules();
        let docker = &r[0];
        let p = Path::new;
        assert!(under(
            p("/var/lib/docker/overlay2/l1/diff"),
            &docker.lower_under,
            &docker.target_under
        ));
        assert!(!under(
            p("/var/lib/docker/image"),
            &docker.lower_under,
            &docker.target_under
        ));
        let ctrd = &r[1];
        assert!(under(
            p("/var/lib/containerd/snapshots/3/fs"),
            &ctrd.lower_under,
            &ctrd.target_under
        ));
        assert!(!under(
            p("/var/lib/containerd/tmpmounts/x"),
            &ctrd.lower_under,
            &ctrd.target_under
        ));
    }

    #[test]
    fn option_names_and_values_are_checked() {
        let o = |k: &str, v: Option<&str>| MountOpt {
            key: k.into(),
            value: v.map(Into::into),
        };
        assert!(check_options(
            &[o("size", Some("64m")), o("mode", Some("1777"))],
            TMPFS_OPTIONS
        )
        .is_ok());
        assert!(check_options(
            &[o("index", Some("off")), o("userxattr", None)],
            OVERLAY_OPTIONS
        )
        .is_ok());
        // Names off the list: EPERM.
        for bad in [
            o("mpol", Some("bind")),
            o("context", Some("x")),
            o("lowerdir", Some("/etc")),
        ] {
            assert_eq!(
                check_options(&[bad], TMPFS_OPTIONS).err().map(|f| f.0),
                Some(libc::EPERM)
            );
        }
        // Values that could smuggle an option or a path: EINVAL.
        for v in ["1m,uid=0", "/etc", "a b", "\"a\"", "x=y", &"9".repeat(65)] {
            assert_eq!(
                check_options(&[o("size", Some(v))], TMPFS_OPTIONS)
                    .err()
                    .map(|f| f.0),
                Some(libc::EINVAL),
                "{v}"
            );
        }
        assert!(plain("shm") && plain("overlay") && !plain("/dev/sda1"));
    }

    #[test]
    fn bad_rules_are_refused_at_start() {
        let bad: MountConfig =
            toml::from_str(r#"allow = [ { fstype = "overlay", target_under = "rel/dir" } ]"#)
                .expect("parse");
        assert!(matches!(
            MountService::new(bad, FsService::new(Default::default()).expect("fs")),
            Err(MountConfigError::RelativePath(_))
        ));
        let bad: MountConfig =
            toml::from_str(r#"allow = [ { fstype = "over,lay", target_under = "/x" } ]"#)
                .expect("parse");
        assert!(matches!(
            MountService::new(bad, FsService::new(Default::default()).expect("fs")),
            Err(MountConfigError::BadType(_))
        ));
        assert!(toml::from_str::<MountConfig>(
            r#"allow = [ { fstype = "tmpfs", target = "/x" } ]"#
        )
        .is_err());
    }
}
