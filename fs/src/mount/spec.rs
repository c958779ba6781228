//! Pure translation from a trapped mount(2)/umount2(2) call to a [`Request`](super::proto::Request): flag
//! classification in the kernel's own order, option-string splitting, overlay directories, and
//! the DPU path → HOST path mapping through a qtfs mount's mountinfo line. No I/O here, so all
//! of it is unit tested.

use super::proto::{u64_of, MountOpt};

/// A raw errno value (what the trapped syscall returns on failure).
pub type Errno = i32;

/// `MS_MGC_VAL`: the magic old programs put in the upper 16 bits of the flags (the kernel
/// drops it).
const MS_MGC_MSK: u64 = 0xffff_0000;
const MS_MGC_VAL: u64 = 0xc0ed_0000;

/// What mount(2) does with its flags, in the kernel's order of precedence (`path_mount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOp {
    /// `MS_REMOUNT` (with `MS_BIND`: the mount point's flags only).
    Remount {
        /// `MS_BIND` was set too.
        bind: bool,
    },
    /// `MS_BIND` (with `MS_REC`: the whole subtree).
    Bind {
        /// `MS_REC`.
        recursive: bool,
    },
    /// `MS_SHARED`/`MS_PRIVATE`/`MS_SLAVE`/`MS_UNBINDABLE`: the caller's own mount tree.
    Propagation,
    /// `MS_MOVE`.
    Move,
    /// A new filesystem mount.
    New,
}

/// Splits mount(2) flags into the operation and its per-mount flags (`MS_SILENT`, the old
/// magic and the operation bits removed).
pub fn classify(flags: u64) -> (MountOp, u64) {
    let mut flags = flags;
    if flags & MS_MGC_MSK == MS_MGC_VAL {
        flags &= !MS_MGC_MSK;
    }
    let f = |b: libc::c_ulong| flags & u64_of(b) != 0;
    let op = if f(libc::MS_REMOUNT) {
        MountOp::Remount {
            bind: f(libc::MS_BIND),
        }
    } else if f(libc::MS_BIND) {
        MountOp::Bind {
            recursive: f(libc::MS_REC),
        }
    } else if f(libc::MS_SHARED | libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_UNBINDABLE) {
        MountOp::Propagation
    } else if f(libc::MS_MOVE) {
        MountOp::Move
    } else {
        MountOp::New
    };
    let strip = u64_of(
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_REC
            | libc::MS_SILENT
            | libc::MS_SHARED
            | libc::MS_PRIVATE
            | libc::MS_SLAVE
            | libc::MS_UNBINDABLE
            | libc::MS_MOVE,
    );
    (op, flags & !strip)
}

/// Splits a mount option string at commas outside double quotes (SELinux `context="a,b"`);
/// empty items are dropped. NUL bytes are refused.
pub fn split_options(data: &str) -> Result<Vec<MountOpt>, Errno> {
    if data.contains('\0') {
        return Err(libc::EINVAL);
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut push = |cur: &mut String| {
        if !cur.is_empty() {
            let item = std::mem::take(cur);
            out.push(match item.split_once('=') {
                Some((k, v)) => MountOpt {
                    key: k.to_string(),
                    value: Some(v.to_string()),
                },
                None => MountOpt {
                    key: item,
                    value: None,
                },
            });
        }
    };
    for c in data.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => push(&mut cur),
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(libc::EINVAL);
    }
    push(&mut cur);
    Ok(out)
}

/// Joins options back into the string mount(2) takes.
pub fn join_options(opts: &[MountOpt]) -> String {
    let mut s = String::new();
    for o in opts {
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(&o.key);
        if let Some(v) = &o.value {
            s.push('=');
            s.push_str(v);
        }
    }
    s
}

/// The directories of an overlay mount's options, as the caller wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlayDirs {
    /// `lowerdir`, top first.
    pub lower: Vec<String>,
    /// `upperdir`.
    pub upper: Option<String>,
    /// `workdir`.
    pub work: Option<String>,
    /// Every other option, in order.
    pub rest: Vec<MountOpt>,
}

/// Splits a `lowerdir` value at `:`; a backslash escapes the next character (overlayfs's own
/// rule, so `a\:b` is one directory named `a:b`).
pub fn split_lowerdir(v: &str) -> Result<Vec<String>, Errno> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in v.chars() {
        if esc {
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == ':' {
            if cur.is_empty() {
                return Err(libc::EINVAL);
            }
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if esc || cur.is_empty() {
        return Err(libc::EINVAL);
    }
    out.push(cur);
    Ok(out)
}

/// Picks the directories out of an overlay's options; a repeated directory option or an
/// overlay without `lowerdir` is EINVAL (as the kernel says), the new `lowerdir+`/`datadir+`
/// syntax is refused (EINVAL) rather than half understood.
pub fn overlay_dirs(opts: Vec<MountOpt>) -> Result<OverlayDirs, Errno> {
    let mut d = OverlayDirs::default();
    for o in opts {
        match (o.key.as_str(), o.value) {
            ("lowerdir", Some(v)) if d.lower.is_empty() => d.lower = split_lowerdir(&v)?,
            ("upperdir", Some(v)) if d.upper.is_none() && !v.is_empty() => d.upper = Some(v),
            ("workdir", Some(v)) if d.work.is_none() && !v.is_empty() => d.work = Some(v),
            ("lowerdir" | "upperdir" | "workdir" | "lowerdir+" | "datadir+", _) => {
                return Err(libc::EINVAL)
            }
            (_, value) => d.rest.push(MountOpt { key: o.key, value }),
        }
    }
    if d.lower.is_empty() || d.upper.is_some() != d.work.is_some() {
        return Err(libc::EINVAL);
    }
    Ok(d)
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id (as `statx(STATX_MNT_ID)` reports it).
    pub id: u64,
    /// Path of the mount's root inside its filesystem (`/` unless a bind of a subdirectory).
    pub root: String,
    /// Mount point, relative to the reading process's root.
    pub mount_point: String,
    /// Filesystem type (`fuse.qtfs` for qtfs).
    pub fstype: String,
    /// Mount source (`qtfs:/var/lib/docker` for qtfs).
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on). An escape above `\377`
/// is not one (it would not fit a byte) and stays as written. Also for `/proc/*/mounts`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            if sep < 6 || f.len() < sep + 3 {
                return None;
            }
            Some(MountInfo {
                id: f[0].parse().ok()?,
                root: unescape(f[3]),
                mount_point: unescape(f[4]),
                fstype: unescape(f[sep + 1]),
                source: unescape(f[sep + 2]),
            })
        })
        .collect()
}

/// A DPU path that lies on a qtfs mount, named for the HOST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QtfsPath {
    /// The HOST path (or `export-name/rest`), as a qtfs mount source names it.
    pub host: String,
    /// The path is the qtfs mount's own root (an operation on the DPU's mount itself).
    pub mount_root: bool,
}

/// `path` relative to `base` if `base` is a path prefix of it at a component boundary.
fn rel_to<'a>(path: &'a str, base: &str) -> Option<&'a str> {
    if base == "/" {
        return path.strip_prefix('/').map(|r| r.trim_start_matches('/'));
    }
    let rest = path.strip_prefix(base)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// A qtfs mount: type `fuse.qtfs`, or `fuse` with a `qtfs:` source (fuser's own mount
/// leaves the subtype out).
pub fn is_qtfs(m: &MountInfo) -> bool {
    m.fstype == "fuse.qtfs" || (m.fstype == "fuse" && m.source.starts_with("qtfs:"))
}

/// Maps a canonical DPU path on mount `m` to the HOST path it shows, when `m` is a qtfs
/// mount: the mount's source + its root inside the filesystem + the path below the mount
/// point. None for any other filesystem.
pub fn qtfs_host_path(m: &MountInfo, canonical: &str) -> Option<QtfsPath> {
    if !is_qtfs(m) {
        return None;
    }
    let rel = rel_to(canonical, &m.mount_point)?;
    let src = m.source.strip_prefix("qtfs:").unwrap_or(&m.source);
    let mut host = src.trim_end_matches('/').to_string();
    for part in m.root.split('/').chain(rel.split('/')) {
        if !part.is_empty() {
            host.push('/');
            host.push_str(part);
        }
    }
    if host.is_empty() {
        host.push('/');
    }
    Some(QtfsPath {
        host,
        mount_root: rel.is_empty() && m.root.trim_matches('/').is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(k: &str, v: Option<&str>) -> MountOpt {
        MountOpt {
            key: k.into(),
            value: v.map(Into::into),
        }
    }

    #[test]
    fn flags_follow_the_kernels_precedence() {
        let ms = u64_of;
        assert_eq!(classify(0), (MountOp::New, 0));
        assert_eq!(
            classify(ms(libc::MS_NOSUID | libc::MS_NODEV | libc::MS_SILENT)),
            (MountOp::New, ms(libc::MS_NOSUID | libc::MS_NODEV))
        );
        assert_eq!(
            classify(MS_MGC_VAL | ms(libc::MS_RDONLY)),
            (MountOp::New, ms(libc::MS_RDONLY))
        );
        assert_eq!(
            classify(ms(libc::MS_BIND | libc::MS_REC)),
            (MountOp::Bind { recursive: true }, 0)
        );
        assert_eq!(
            classify(ms(libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY)),
            (MountOp::Remount { bind: true }, ms(libc::MS_RDONLY))
        );
        assert_eq!(
            classify(ms(libc::MS_REC | libc::MS_SLAVE)).0,
            MountOp::Propagation
        );
        assert_eq!(classify(ms(libc::MS_MOVE)).0, MountOp::Move);
        // A remount wins over the propagation bits, as in path_mount().
        assert_eq!(
            classify(ms(libc::MS_REMOUNT | libc::MS_PRIVATE)).0,
            MountOp::Remount { bind: false }
        );
    }

    #[test]
    fn options_split_at_commas_outside_quotes() {
        assert_eq!(
            split_options("mode=1777,size=67108864,,nr_inodes=5,ro").unwrap(),
            vec![
                opt("mode", Some("1777")),
                opt("size", Some("67108864")),
                opt("nr_inodes", Some("5")),
                opt("ro", None)
            ]
        );
        assert_eq!(
            split_options(r#"lowerdir=/a,context="s0:c1,c2""#).unwrap(),
            vec![
                opt("lowerdir", Some("/a")),
                opt("context", Some("\"s0:c1,c2\""))
            ]
        );
        assert_eq!(split_options("a=\"x"), Err(libc::EINVAL));
        assert_eq!(split_options("a\0b"), Err(libc::EINVAL));
        assert_eq!(split_options("").unwrap(), vec![]);
        assert_eq!(
            join_options(&split_options("a=1,b,c=x=y").unwrap()),
            "a=1,b,c=x=y"
        );
    }

    #[test]
    fn overlay_directories_and_escapes() {
        let d = overlay_dirs(
            split_options("lowerdir=l/A:l/B\\:x,upperdir=/u/diff,workdir=/u/work,index=off")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(d.lower, vec!["l/A".to_string(), "l/B:x".to_string()]);
        assert_eq!(d.upper.as_deref(), Some("/u/diff"));
        assert_eq!(d.work.as_deref(), Some("/u/work"));
        assert_eq!(d.rest, vec![opt("index", Some("off"))]);
        // Read-only overlay: lowers only.
        let d = overlay_dirs(split_options("lowerdir=/a:/b").unwrap()).unwrap();
        assert_eq!(d.lower.len(), 2);
        assert!(d.upper.is_none());
        for bad in [
            "upperdir=/u,workdir=/w",
            "lowerdir=/a,upperdir=/u",
            "lowerdir=/a::/b",
            "lowerdir=/a:",
            "lowerdir=/a\\",
            "lowerdir=/a,lowerdir=/b",
            "lowerdir=/a,upperdir=/u,workdir=/w,upperdir=/v",
            "lowerdir+=/a",
            "lowerdir",
        ] {
            assert_eq!(
                overlay_dirs(split_options(bad).unwrap()),
                Err(libc::EINVAL),
                "{bad}"
            );
        }
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape("x\\134y\\"), "x\\y\\");
        assert_eq!(unescape("a\\040b"), "a b");
        // Not a byte: left as written rather than wrapped.
        assert_eq!(unescape("\\777"), "\\777");
    }

    #[test]
    fn mountinfo_lines_parse() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
            301 29 0:77 / /srv/dpu/var/lib/docker rw,nosuid,nodev,relatime shared:200 - fuse.qtfs qtfs:/var/lib/docker rw,user_id=0\n\
            302 301 0:77 /overlay2 /srv/with\\040space rw - fuse.qtfs qtfs:/var/lib/docker rw\n\
            garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].id, 301);
        assert_eq!(m[1].fstype, "fuse.qtfs");
        assert_eq!(m[1].source, "qtfs:/var/lib/docker");
        assert_eq!(m[2].mount_point, "/srv/with space");
        assert_eq!(m[2].root, "/overlay2");
    }

    #[test]
    fn dpu_paths_map_to_host_paths() {
        let m = MountInfo {
            id: 1,
            root: "/".into(),
            mount_point: "/another_rootfs/var/lib/docker".into(),
            fstype: "fuse.qtfs".into(),
            source: "qtfs:/var/lib/docker".into(),
        };
        let p = qtfs_host_path(&m, "/another_rootfs/var/lib/docker/overlay2/x/merged").unwrap();
        assert_eq!(p.host, "/var/lib/docker/overlay2/x/merged");
        assert!(!p.mount_root);
        let p = qtfs_host_path(&m, "/another_rootfs/var/lib/docker").unwrap();
        assert_eq!(p.host, "/var/lib/docker");
        assert!(p.mount_root);
        // Not below the mount point (a sibling with the same prefix).
        assert!(qtfs_host_path(&m, "/another_rootfs/var/lib/dockerx/a").is_none());
        // A bind of a subdirectory of the qtfs mount: the root field counts.
        let b = MountInfo {
            root: "/overlay2".into(),
            mount_point: "/d/overlay2".into(),
            ..m.clone()
        };
        let p = qtfs_host_path(&b, "/d/overlay2/y/merged").unwrap();
        assert_eq!(p.host, "/var/lib/docker/overlay2/y/merged");
        assert!(!qtfs_host_path(&b, "/d/overlay2").unwrap().mount_root);
        // Export-name sources pass through for the HOST to resolve.
        let n = MountInfo {
            source: "qtfs:docker".into(),
            mount_point: "/".into(),
            ..m.clone()
        };
        assert_eq!(qtfs_host_path(&n, "/a/b").unwrap().host, "docker/a/b");
        // fuser's own mount shows type `fuse` with the qtfs source.
        let f = MountInfo {
            fstype: "fuse".into(),
            ..m.clone()
        };
        assert!(qtfs_host_path(&f, "/another_rootfs/var/lib/docker/a").is_some());
        // Other filesystems (and other FUSE filesystems) are not forwarded.
        for (fstype, source) in [
            ("ext4", "/dev/vda"),
            ("fuse", "sshfs#h:/x"),
            ("fuse.sshfs", "qtfs:/x"),
        ] {
            let e = MountInfo {
                fstype: fstype.into(),
                source: source.into(),
                ..m.clone()
            };
            assert!(qtfs_host_path(&e, "/another_rootfs/var/lib/docker/a").is_none());
        }
    }
}
