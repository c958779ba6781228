//! Wire messages of the `mount` service (postcard, one request → one reply).
//!
//! A DPU asks its HOST to carry out a mount(2) or umount2(2) on a path inside the HOST's fs
//! exports. Paths are named the way qtfs mount sources name them (an export path, or
//! `export-name/sub/dir`), never with symlinks, `.` or `..`: the DPU resolves symlinks in its
//! own namespace first, the HOST refuses any symlink it meets (ELOOP). The HOST builds the
//! mount's option string itself from these structured fields, so nothing the DPU sends is
//! pasted into an option string unchecked. Failures travel as `RemoteError { code: errno }`.

use serde::{Deserialize, Serialize};

/// Service name in the session registry.
pub const SERVICE: &str = "mount";

/// Protocol version carried in every request.
pub const VERSION: u32 = 1;

/// Per-mount flags a request may carry; any other bit is refused with EINVAL. `MS_BIND`,
/// `MS_REC` and `MS_REMOUNT` are expressed by [`Kind`], propagation changes and `MS_MOVE` never
/// leave the DPU.
pub const ALLOWED_FLAGS: u64 = u64_of(
    libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | libc::MS_NOATIME
        | libc::MS_NODIRATIME
        | libc::MS_RELATIME
        | libc::MS_STRICTATIME,
);

/// Mount flags (`c_ulong`) as `u64`: the same type on 64-bit targets, not on 32-bit ones.
#[allow(clippy::unnecessary_cast)]
pub(crate) const fn u64_of(v: libc::c_ulong) -> u64 {
    v as u64
}

/// One `key` or `key=value` item of a mount option string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountOpt {
    /// Option name.
    pub key: String,
    /// Value after `=`, if any.
    pub value: Option<String>,
}

/// What to mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// An overlay whose directories all lie in HOST exports.
    Overlay {
        /// The mount's source name (`overlay`).
        source: String,
        /// `lowerdir` entries, top first.
        lower: Vec<String>,
        /// `upperdir` (absent for a read-only overlay).
        upper: Option<String>,
        /// `workdir` (with `upperdir`).
        work: Option<String>,
        /// Other options (`index=off`, `redirect_dir=…`, …), checked against a fixed list.
        options: Vec<MountOpt>,
    },
    /// A bind mount of another exported path.
    Bind {
        /// The path bound onto the target.
        source: String,
        /// `MS_REC`.
        recursive: bool,
    },
    /// Change the per-mount flags of the mount at the target (`MS_REMOUNT`).
    Remount {
        /// `MS_BIND` too: change only the mount point's flags, not the superblock's.
        bind: bool,
    },
    /// A filesystem without paths in its options (tmpfs, …); its source is a plain name.
    Other {
        /// Filesystem type.
        fstype: String,
        /// Source name (`tmpfs`, `shm`).
        source: String,
        /// Options, checked against the allow rule's option names.
        options: Vec<MountOpt>,
    },
}

impl Kind {
    /// The allow-list type this mount is matched against.
    pub fn fstype(&self) -> &str {
        match self {
            Kind::Overlay { .. } => "overlay",
            Kind::Bind { .. } => "bind",
            Kind::Remount { .. } => "remount",
            Kind::Other { fstype, .. } => fstype,
        }
    }
}

/// A request to the HOST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// mount(2) at `target`.
    Mount {
        /// [`VERSION`].
        version: u32,
        /// HOST path of the mount point.
        target: String,
        /// What to mount there.
        kind: Kind,
        /// Per-mount flags within [`ALLOWED_FLAGS`].
        flags: u64,
    },
    /// umount2(2) of the mount at `target`.
    Umount {
        /// [`VERSION`].
        version: u32,
        /// HOST path of the mount point.
        target: String,
        /// `MNT_DETACH`.
        detach: bool,
    },
}

/// The HOST's answer to a successful request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Done,
}
