//! Exports: which HOST directory a mount source or a forwarded mount names, opened beneath
//! its export root.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use super::passthrough::{blocking, R};
use super::FsService;
use crate::proto::{self, Mounted, Refusal};
use crate::sys;

impl FsService {
    /// Finds the export for a mount source: longest matching export path, or an export name
    /// (`name` or `name/sub/dir`).
    pub(super) fn find_export(&self, src: &str) -> Option<(usize, PathBuf)> {
        let p = Path::new(src);
        let mut best: Option<(usize, PathBuf, usize)> = None;
        for (i, e) in self.inner.exports.iter().enumerate() {
            if let Ok(rest) = p.strip_prefix(&e.path) {
                let depth = e.path.components().count();
                if best.as_ref().is_none_or(|b| depth > b.2) {
                    best = Some((i, rest.to_path_buf(), depth));
                }
            }
            if let Some(name) = &e.name {
                let (head, tail) = src.split_once('/').unwrap_or((src, ""));
                if head == name && best.is_none() {
                    best = Some((i, PathBuf::from(tail), 0));
                }
            }
        }
        best.map(|(i, rest, _)| (i, rest))
    }

    /// Resolves a path named the way mount sources are (an export path or `name/sub/dir`) to
    /// its export, the HOST path it names and the part below the export root. Only plain
    /// components are accepted below the export (`.`, `..`: EINVAL); no export: EPERM.
    pub(crate) fn export_path(&self, path: &str) -> R<(usize, PathBuf, PathBuf)> {
        let (idx, rest) = self.find_export(path).ok_or(libc::EPERM)?;
        if rest
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(libc::EINVAL);
        }
        let host = self.inner.exports[idx].path.join(&rest);
        Ok((idx, host, rest))
    }

    /// The export is read-only.
    pub(crate) fn export_read_only(&self, idx: usize) -> bool {
        self.inner.exports.get(idx).is_none_or(|e| e.read_only)
    }

    /// Opens `rest` below export `idx` with `flags` (plus `O_PATH` callers pass themselves),
    /// refusing every symlink on the way (ELOOP) and never leaving the export; mounts on the
    /// way are entered.
    pub(crate) fn open_in_export(&self, idx: usize, rest: &Path, flags: i32) -> R<OwnedFd> {
        let rfd = open_root(&self.inner.exports.get(idx).ok_or(libc::EPERM)?.path)?;
        let rest = if rest.as_os_str().is_empty() {
            CString::new(".").map_err(|_| libc::EINVAL)?
        } else {
            CString::new(rest.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?
        };
        sys::openat2_beneath(rfd.as_raw_fd(), &rest, flags, libc::RESOLVE_NO_SYMLINKS)
    }

    /// Resolves a mount source to its root node, or says why not.
    pub(super) async fn resolve_mount(
        &self,
        version: u32,
        path: String,
    ) -> Result<Mounted, Refusal> {
        if version != proto::VERSION {
            return Err(Refusal {
                errno: libc::EPROTO,
                message: format!(
                    "fs protocol version {version} not supported (server speaks {})",
                    proto::VERSION
                ),
            });
        }
        let Some((idx, rest)) = self.find_export(&path) else {
            return Err(Refusal {
                errno: libc::EACCES,
                message: format!("{path} is not exported by this HOST"),
            });
        };
        // Refuse `..` in the remainder outright (RESOLVE_BENEATH would too).
        if rest
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(Refusal {
                errno: libc::EACCES,
                message: format!("{path}: only plain components are allowed below an export"),
            });
        }
        let root = self.inner.exports[idx].path.clone();
        let read_only = self.inner.exports[idx].read_only;
        let res = blocking(move || {
            let rfd = open_root(&root)?;
            let fd = if rest.as_os_str().is_empty() {
                rfd
            } else {
                let rest_c =
                    CString::new(rest.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?;
                sys::openat2_beneath(
                    rfd.as_raw_fd(),
                    &rest_c,
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?
            };
            let st = sys::fstat(fd.as_raw_fd())?;
            Ok((fd, st))
        })
        .await;
        match res {
            Ok((fd, st)) => {
                let root = self.register(fd, idx, &st);
                Ok(Mounted {
                    instance: self.inner.instance,
                    root,
                    read_only,
                })
            }
            Err(e) => Err(Refusal {
                errno: e,
                message: format!("{path}: {}", std::io::Error::from_raw_os_error(e)),
            }),
        }
    }
}

/// An `O_PATH` descriptor of an export root (a HOST path from the configuration, followed as
/// the HOST resolves it: the root itself may be a symlink or a mount).
fn open_root(root: &Path) -> R<OwnedFd> {
    let root_c = CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: valid C string; result checked.
    let rfd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if rfd < 0 {
        return Err(sys::last());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(rfd) })
}
