//! HOST side of qtfs: serves configured exports to the DPU over the session.
//!
//! Every node the client can name is an `O_PATH` descriptor held here, reached from an export
//! root one component at a time with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_SYMLINKS)` and `O_NOFOLLOW`: `..`, symlinks (absolute or relative) and
//! `/proc/<pid>/root`-style magic links are never followed on the HOST. Symlinks are handed to
//! the DPU as text (readlink) and resolved by the DPU kernel in the DPU's namespace.
//!
//! Prompt syscalls (metadata, page-cache I/O) run inline on the request's task, long ones
//! (fsync, fallocate) on tokio's blocking pool; operations that can block indefinitely (opening,
//! reading or writing a character device, waiting for a lock, poll) run on dedicated threads so
//! they can never starve a pool (the failure mode of the original qtfs).
//!
//! FIFOs are never opened through FUSE (the DPU kernel makes its own pipe): the DPU opens a
//! stream per FIFO it uses and both daemons run a tunnel over it ([`crate::fifo`]).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{debug, warn};
use transport::{RemoteError, Service, Session, Stream};

use crate::fifo;
use crate::proto::{self, Attr, Caller, DirEntry, Entry, Fh, NodeId, Op, Reply, Request};
use crate::sys::{self, Errno};

/// One exported HOST directory.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Absolute HOST path of the export root (e.g. `/var/lib/docker/containers`, `/proc`).
    pub path: PathBuf,
    /// Refuse every modification with EROFS.
    #[serde(default)]
    pub read_only: bool,
    /// Optional short name a mount may use as its source instead of the path.
    #[serde(default)]
    pub name: Option<String>,
}

/// `[fs]` section of the HOST config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// Exported directories. Nothing outside them is reachable; empty means nothing is served.
    #[serde(default)]
    pub exports: Vec<Export>,
    /// Let clients create character/block device nodes (off: a device node of a HOST disk
    /// inside an export would bypass every export boundary). Overlay whiteouts (character
    /// device 0/0) are always allowed.
    #[serde(default)]
    pub allow_devices: bool,
}

/// Errors building the service.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// An export path is not absolute.
    #[error("fs export {0:?} is not an absolute path")]
    RelativeExport(PathBuf),
}

/// A node's identity: (export, HOST device, HOST inode).
type Key = (usize, u64, u64);

/// A directory a mount covers: its descriptor, key and mode.
type Covered = (Arc<OwnedFd>, Key, u32);

struct Node {
    fd: Arc<OwnedFd>,
    export: usize,
    lookups: u64,
    key: (usize, u64, u64),
    mode: u32,
    /// What a forwarded mount on this directory covered: (fd, key, mode) of the directory
    /// below, innermost last, restored when that mount goes ([`FsService::uncover`]).
    under: Vec<Covered>,
}

struct OpenFile {
    fd: OwnedFd,
    export: usize,
    /// pread/pwrite at offsets (regular files) rather than read/write (pipes, devices).
    seekable: bool,
    /// May block indefinitely (char device): use a dedicated thread.
    blocking: bool,
}

/// A directory snapshot: (name, type bits, HOST inode) per entry, in getdents order.
type Listing = Vec<(Vec<u8>, u32, u64)>;

struct DirHandle {
    node_fd: Arc<OwnedFd>,
    export: usize,
    entries: Option<Arc<Listing>>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<NodeId, Node>,
    by_key: HashMap<(usize, u64, u64), NodeId>,
    files: HashMap<Fh, Arc<OpenFile>>,
    dirs: HashMap<Fh, Arc<Mutex<DirHandle>>>,
    /// Lookup references per session id, released when that session ends (a mount process
    /// that exits or is unmounted never sends all its forgets).
    held: HashMap<u64, HashMap<NodeId, u64>>,
}

tokio::task_local! {
    /// Id of the session the current request came from (0 for in-process callers).
    static SESSION: u64;
}

fn current_session() -> u64 {
    SESSION.try_with(|s| *s).unwrap_or(0)
}

struct Inner {
    exports: Vec<Export>,
    allow_devices: bool,
    instance: u64,
    next: AtomicU64,
    state: Mutex<State>,
}

/// The `fs` service (register as `"fs"` in the HOST's registry).
#[derive(Clone)]
pub struct FsService {
    inner: Arc<Inner>,
}

type R<T> = Result<T, Errno>;

/// Runs a syscall that completes promptly (metadata, page-cache I/O on a local filesystem)
/// inline on the request's task. A hand-off to a thread pool costs two thread switches, more
/// than the syscall itself; sftp-server and knfsd run these inline too.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    f()
}

/// Runs a syscall that may take long but finishes (fsync, fallocate of a large range) on
/// tokio's blocking pool, so it does not hold an async worker.
async fn pooled<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(libc::EIO))
}

/// Runs `f` on its own thread: for syscalls that may block without bound (FIFO open/read/write,
/// lock waits, poll) so they never hold a slot of a bounded pool.
async fn dedicated<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("fs-blocking".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return Err(libc::EAGAIN);
    }
    rx.await.unwrap_or(Err(libc::EIO))
}

fn is_type(mode: u32, t: u32) -> bool {
    mode & libc::S_IFMT == t
}

/// FUSE dirent sizes, so the server never returns more than the client's buffer holds.
fn dirent_size(namelen: usize, plus: bool) -> usize {
    let base = 24 + namelen.div_ceil(8) * 8;
    if plus {
        base + 128
    } else {
        base
    }
}

impl FsService {
    /// Builds the service; export roots are opened at mount time so a missing directory does not
    /// stop the daemon (it is reported to the mounting client instead).
    pub fn new(config: FsConfig) -> Result<FsService, FsError> {
        for e in &config.exports {
            if !e.path.is_absolute() {
                return Err(FsError::RelativeExport(e.path.clone()));
            }
            if !e.path.is_dir() {
                warn!(path = %e.path.display(), "fs export does not exist (yet)");
            }
        }
        raise_nofile_limit();
        Ok(FsService {
            inner: Arc::new(Inner {
                exports: config.exports,
                allow_devices: config.allow_devices,
                instance: sys::random_u64() | 1,
                next: AtomicU64::new(2),
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Number of nodes currently referenced by clients (for tests and diagnostics).
    pub fn node_count(&self) -> usize {
        self.state().nodes.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.inner.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn id(&self) -> u64 {
        self.inner.next.fetch_add(1, Ordering::Relaxed)
    }

    fn node(&self, id: NodeId) -> R<(Arc<OwnedFd>, usize, u32)> {
        let st = self.state();
        let n = st.nodes.get(&id).ok_or(libc::ESTALE)?;
        Ok((n.fd.clone(), n.export, n.mode))
    }

    fn writable(&self, export: usize) -> R<()> {
        match self.inner.exports.get(export) {
            Some(e) if !e.read_only => Ok(()),
            _ => Err(libc::EROFS),
        }
    }

    fn file(&self, fh: Fh) -> R<Arc<OpenFile>> {
        self.state().files.get(&fh).cloned().ok_or(libc::EBADF)
    }

    /// Registers a looked-up descriptor (deduplicated per export and HOST inode) with one
    /// lookup reference.
    fn register(&self, fd: OwnedFd, export: usize, st: &libc::stat) -> Entry {
        let key = (export, st.st_dev, st.st_ino);
        let attr = sys::attr_of_node(fd.as_raw_fd(), st);
        let sid = current_session();
        let mut s = self.state();
        if let Some(&id) = s.by_key.get(&key) {
            if let Some(n) = s.nodes.get_mut(&id) {
                n.lookups += 1;
                n.mode = st.st_mode;
                *s.held.entry(sid).or_default().entry(id).or_default() += 1;
                return Entry { node: id, attr };
            }
        }
        let id = self.id();
        s.nodes.insert(
            id,
            Node {
                fd: Arc::new(fd),
                export,
                lookups: 1,
                key,
                mode: st.st_mode,
                under: Vec::new(),
            },
        );
        s.by_key.insert(key, id);
        *s.held.entry(sid).or_default().entry(id).or_default() += 1;
        Entry { node: id, attr }
    }

    fn forget(&self, id: NodeId, n: u64) {
        let sid = current_session();
        let mut s = self.state();
        // Only what this session holds: a client forgetting nodes of its previous session
        // (already released when that ended) must not take other mounts' references.
        let mut n_held = 0;
        if let Some(h) = s.held.get_mut(&sid) {
            if let Some(c) = h.get_mut(&id) {
                n_held = n.min(*c);
                *c -= n_held;
                if *c == 0 {
                    h.remove(&id);
                }
            }
        }
        Self::drop_refs(&mut s, id, n_held);
    }

    /// Releases every reference a finished session still held.
    fn session_ended(&self, sid: u64) {
        let mut s = self.state();
        let Some(h) = s.held.remove(&sid) else {
            return;
        };
        let n = h.len();
        for (id, c) in h {
            Self::drop_refs(&mut s, id, c);
        }
        debug!(
            session = sid,
            nodes = n,
            "released the nodes of a closed session"
        );
    }

    fn drop_refs(s: &mut State, id: NodeId, n: u64) {
        let remove = match s.nodes.get_mut(&id) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if remove {
            if let Some(node) = s.nodes.remove(&id) {
                s.by_key.remove(&node.key);
            }
        }
    }

    /// Finds the export for a mount source: longest matching export path, or an export name
    /// (`name` or `name/sub/dir`).
    fn find_export(&self, src: &str) -> Option<(usize, PathBuf)> {
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
        let root = &self.inner.exports.get(idx).ok_or(libc::EPERM)?.path;
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
        let rfd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(rfd) };
        let rest = if rest.as_os_str().is_empty() {
            CString::new(".").map_err(|_| libc::EINVAL)?
        } else {
            CString::new(rest.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?
        };
        sys::openat2_beneath(rfd.as_raw_fd(), &rest, flags, libc::RESOLVE_NO_SYMLINKS)
    }

    /// A mount now covers the directory `under` (device, inode): every node of that
    /// directory is pointed at the new mount's root `root`, so a DPU that already looked the
    /// directory up (the kernel keeps the entry) sees the mounted content at once instead of
    /// the covered directory. Returns how many nodes moved.
    pub(crate) fn cover(&self, under: (u64, u64), root: &Arc<OwnedFd>, st: &libc::stat) -> usize {
        let mut g = self.state();
        let s = &mut *g;
        let mut moved = Vec::new();
        for (id, n) in s.nodes.iter_mut() {
            if (n.key.1, n.key.2) == under {
                let old = n.key;
                n.under.push((n.fd.clone(), n.key, n.mode));
                n.fd = root.clone();
                n.key = (n.export, st.st_dev, st.st_ino);
                n.mode = st.st_mode;
                moved.push((*id, old, n.key));
            }
        }
        for (id, old, new) in &moved {
            if s.by_key.get(old) == Some(id) {
                s.by_key.remove(old);
            }
            s.by_key.entry(*new).or_insert(*id);
        }
        moved.len()
    }

    /// The mount with root (device, inode) `root` and mount id `mnt` is about to go: nodes of
    /// its root get back the directory they covered, nodes inside it are dropped (the DPU
    /// gets ESTALE for them and looks the names up again), so no descriptor held here keeps
    /// the mount busy. Returns the (device, inode) of the directories restored.
    pub(crate) fn uncover(&self, root: (u64, u64), mnt: u64) -> Vec<(u64, u64)> {
        let mut g = self.state();
        let s = &mut *g;
        let ids: Vec<NodeId> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.key.1 == root.0 && sys::mnt_id(n.fd.as_raw_fd()) == Ok(mnt))
            .map(|(id, _)| *id)
            .collect();
        let mut restored = Vec::new();
        for id in ids {
            let Some(n) = s.nodes.get_mut(&id) else {
                continue;
            };
            let old = n.key;
            if (n.key.1, n.key.2) == root {
                if let Some((fd, key, mode)) = n.under.pop() {
                    n.fd = fd;
                    n.key = key;
                    n.mode = mode;
                    if s.by_key.get(&old) == Some(&id) {
                        s.by_key.remove(&old);
                    }
                    s.by_key.entry(key).or_insert(id);
                    restored.push((key.1, key.2));
                    continue;
                }
            }
            s.nodes.remove(&id);
            if s.by_key.get(&old) == Some(&id) {
                s.by_key.remove(&old);
            }
        }
        restored.sort_unstable();
        restored.dedup();
        restored
    }

    async fn mount(&self, version: u32, path: String) -> Result<Reply, RemoteError> {
        if version != proto::VERSION {
            return Err(RemoteError {
                code: libc::EPROTO,
                message: format!(
                    "fs protocol version {version} not supported (server speaks {})",
                    proto::VERSION
                ),
            });
        }
        let Some((idx, rest)) = self.find_export(&path) else {
            return Err(RemoteError {
                code: libc::EACCES,
                message: format!("{path} is not exported by this HOST"),
            });
        };
        // Refuse `..` in the remainder outright (RESOLVE_BENEATH would too).
        if rest
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(RemoteError {
                code: libc::EACCES,
                message: format!("{path}: only plain components are allowed below an export"),
            });
        }
        let root = self.inner.exports[idx].path.clone();
        let read_only = self.inner.exports[idx].read_only;
        let res = blocking(move || {
            let root_c =
                CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?;
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
            let rfd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(rfd) };
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
                Ok(Reply::Mounted {
                    instance: self.inner.instance,
                    root,
                    read_only,
                })
            }
            Err(e) => Err(RemoteError {
                code: e,
                message: format!("{path}: {}", std::io::Error::from_raw_os_error(e)),
            }),
        }
    }

    /// Applies the caller's ownership (and the exact requested mode, which the server's umask
    /// may have narrowed) to a node the server just created as root.
    fn fixup_new(fd: RawFd, caller: Caller, mode: Option<u32>, parent_mode: u32) -> R<()> {
        let parent_setgid = parent_mode & libc::S_ISGID != 0;
        if caller.uid != 0 || caller.gid != 0 {
            let gid = if parent_setgid { u32::MAX } else { caller.gid };
            sys::chown_fd(fd, caller.uid, gid)?;
        }
        if let Some(mode) = mode {
            let st = sys::fstat(fd)?;
            let mut want = mode & 0o7777;
            if is_type(st.st_mode, libc::S_IFDIR) && parent_setgid {
                want |= libc::S_ISGID;
            }
            if st.st_mode & 0o7777 != want {
                sys::chmod_fd(fd, want)?;
            }
        }
        Ok(())
    }

    async fn create_node(
        &self,
        parent: NodeId,
        name: Vec<u8>,
        caller: Caller,
        mode: Option<u32>,
        make: impl FnOnce(RawFd, &CString) -> R<()> + Send + 'static,
    ) -> R<Reply> {
        let (pfd, export, pmode) = self.node(parent)?;
        self.writable(export)?;
        let name = sys::component(&name)?;
        let (fd, st, pattr) = blocking(move || {
            make(pfd.as_raw_fd(), &name)?;
            let fd = sys::lookup(pfd.as_raw_fd(), &name)?;
            Self::fixup_new(fd.as_raw_fd(), caller, mode, pmode)?;
            let st = sys::fstat(fd.as_raw_fd())?;
            Ok((fd, st, post_op_attr(pfd.as_raw_fd())?))
        })
        .await?;
        Ok(Reply::Made {
            entry: self.register(fd, export, &st),
            parent: pattr,
        })
    }

    async fn open_fd(&self, fd: Arc<OwnedFd>, mode: u32, flags: i32) -> R<(OwnedFd, bool, bool)> {
        // The DPU kernel opens FIFOs itself (a local pipe joined to this one by a tunnel, see
        // [`crate::fifo`]); a FUSE OPEN of one comes only from a client that does not know.
        if is_type(mode, libc::S_IFIFO) {
            return Err(libc::ENXIO);
        }
        let special = is_type(mode, libc::S_IFCHR);
        let seekable = is_type(mode, libc::S_IFREG) || is_type(mode, libc::S_IFBLK);
        let flags = flags & !libc::O_NONBLOCK;
        let f = move || sys::reopen(fd.as_raw_fd(), flags);
        let ofd = if special {
            dedicated(f).await?
        } else {
            blocking(f).await?
        };
        Ok((ofd, seekable, special))
    }

    fn add_file(&self, fd: OwnedFd, export: usize, seekable: bool, blocking: bool) -> Fh {
        let fh = self.id();
        self.state().files.insert(
            fh,
            Arc::new(OpenFile {
                fd,
                export,
                seekable,
                blocking,
            }),
        );
        fh
    }

    async fn handle(&self, op: Op) -> R<Reply> {
        match op {
            Op::Mount { .. } => Err(libc::EINVAL),
            Op::Lookup { parent, name } => {
                let (pfd, export, _) = self.node(parent)?;
                let name = sys::component(&name)?;
                let (fd, st) = blocking(move || {
                    let fd = sys::lookup(pfd.as_raw_fd(), &name)?;
                    let st = sys::fstat(fd.as_raw_fd())?;
                    Ok((fd, st))
                })
                .await?;
                Ok(Reply::Entry(self.register(fd, export, &st)))
            }
            Op::Forget { nodes } => {
                for (id, n) in nodes {
                    self.forget(id, n);
                }
                Ok(Reply::Ok)
            }
            Op::GetAttr { node, fh } => {
                if let Some(fh) = fh {
                    if let Ok(f) = self.file(fh) {
                        let fd = f.fd.as_raw_fd();
                        let st = blocking(move || sys::fstat(fd)).await?;
                        return Ok(Reply::Attr(sys::attr_of_node(fd, &st)));
                    }
                }
                let (fd, _, _) = self.node(node)?;
                let raw = fd.as_raw_fd();
                let st = blocking(move || sys::fstat(raw)).await?;
                self.update_mode(node, st.st_mode);
                Ok(Reply::Attr(sys::attr_of_node(raw, &st)))
            }
            Op::SetAttr {
                node,
                fh,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => {
                let (fd, export, nmode) = self.node(node)?;
                self.writable(export)?;
                if is_type(nmode, libc::S_IFLNK) {
                    // chmod/truncate would go through /proc/self/fd: never on a symlink.
                    if mode.is_some() {
                        return Err(libc::EOPNOTSUPP);
                    }
                    if size.is_some() {
                        return Err(libc::EINVAL);
                    }
                }
                let file = fh.and_then(|fh| self.file(fh).ok());
                let st = blocking(move || {
                    let raw = fd.as_raw_fd();
                    if uid.is_some() || gid.is_some() {
                        sys::chown_fd(raw, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
                    }
                    if let Some(mode) = mode {
                        sys::chmod_fd(raw, mode)?;
                    }
                    if let Some(size) = size {
                        match &file {
                            Some(f) => sys::ftruncate(f.fd.as_raw_fd(), size)?,
                            None => {
                                let w = sys::reopen(raw, libc::O_WRONLY | libc::O_NONBLOCK)?;
                                sys::ftruncate(w.as_raw_fd(), size)?;
                            }
                        }
                    }
                    if atime.is_some() || mtime.is_some() {
                        sys::utimens_fd(raw, atime, mtime)?;
                    }
                    Ok(sys::attr_of_node(raw, &sys::fstat(raw)?))
                })
                .await?;
                Ok(Reply::Attr(st))
            }
            Op::ReadLink { node } => {
                let (fd, _, _) = self.node(node)?;
                let t = blocking(move || sys::readlink(fd.as_raw_fd())).await?;
                Ok(Reply::Data(t))
            }
            Op::Symlink {
                parent,
                name,
                target,
                caller,
            } => {
                let target = CString::new(target).map_err(|_| libc::EINVAL)?;
                self.create_node(parent, name, caller, None, move |d, n| {
                    sys::symlinkat(&target, d, n)
                })
                .await
            }
            Op::Mknod {
                parent,
                name,
                mode,
                rdev,
                caller,
            } => {
                let t = mode & libc::S_IFMT;
                // A character device 0/0 is an overlayfs whiteout (image layers unpack them):
                // it opens nothing, so it is allowed without `allow_devices`.
                let whiteout = t == libc::S_IFCHR && rdev == 0;
                if (t == libc::S_IFCHR || t == libc::S_IFBLK)
                    && !whiteout
                    && !self.inner.allow_devices
                {
                    return Err(libc::EPERM);
                }
                if t == libc::S_IFDIR || t == libc::S_IFLNK {
                    return Err(libc::EINVAL);
                }
                self.create_node(parent, name, caller, Some(mode), move |d, n| {
                    sys::mknodat(d, n, mode, rdev)
                })
                .await
            }
            Op::Mkdir {
                parent,
                name,
                mode,
                caller,
            } => {
                self.create_node(parent, name, caller, Some(mode), move |d, n| {
                    sys::mkdirat(d, n, mode)
                })
                .await
            }
            Op::Unlink { parent, name } => self.remove(parent, name, false).await,
            Op::Rmdir { parent, name } => self.remove(parent, name, true).await,
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                let (pfd, export, _) = self.node(parent)?;
                let (npfd, nexport, _) = self.node(newparent)?;
                self.writable(export)?;
                if export != nexport {
                    return Err(libc::EXDEV);
                }
                let name = sys::component(&name)?;
                let newname = sys::component(&newname)?;
                blocking(move || {
                    sys::renameat2(pfd.as_raw_fd(), &name, npfd.as_raw_fd(), &newname, flags)
                })
                .await?;
                Ok(Reply::Ok)
            }
            Op::Link {
                node,
                newparent,
                newname,
            } => {
                let (fd, export, _) = self.node(node)?;
                let (npfd, nexport, _) = self.node(newparent)?;
                self.writable(nexport)?;
                if export != nexport {
                    return Err(libc::EXDEV);
                }
                let newname = sys::component(&newname)?;
                let (fd2, st, pattr) = blocking(move || {
                    sys::link_fd(fd.as_raw_fd(), npfd.as_raw_fd(), &newname)?;
                    let fd2 = sys::lookup(npfd.as_raw_fd(), &newname)?;
                    let st = sys::fstat(fd2.as_raw_fd())?;
                    Ok((fd2, st, post_op_attr(npfd.as_raw_fd())?))
                })
                .await?;
                Ok(Reply::Made {
                    entry: self.register(fd2, export, &st),
                    parent: pattr,
                })
            }
            Op::Open { node, flags } => {
                let (fd, export, mode) = self.node(node)?;
                if is_type(mode, libc::S_IFLNK) {
                    return Err(libc::ELOOP);
                }
                if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    self.writable(export)?;
                }
                let (ofd, seekable, special) = self.open_fd(fd, mode, flags).await?;
                let fh = self.add_file(ofd, export, seekable, special);
                Ok(Reply::Opened {
                    fh,
                    direct: special || !seekable,
                })
            }
            Op::Create {
                parent,
                name,
                mode,
                flags,
                caller,
            } => {
                let (pfd, export, pmode) = self.node(parent)?;
                self.writable(export)?;
                let cname = sys::component(&name)?;
                let (fd, ofd, st, pattr) = blocking(move || {
                    let oflags = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_NOFOLLOW;
                    let how_flags = oflags;
                    // openat2 refuses a mode with O_CREAT through our helper (mode 0), so
                    // create with openat relative to the parent O_PATH fd (single component,
                    // O_NOFOLLOW: cannot leave the directory).
                    // SAFETY: valid C string, checked result.
                    let rc = unsafe {
                        libc::openat(
                            pfd.as_raw_fd(),
                            cname.as_ptr(),
                            how_flags | libc::O_CLOEXEC,
                            (mode & 0o7777) as libc::c_uint,
                        )
                    };
                    if rc < 0 {
                        return Err(sys::last());
                    }
                    // SAFETY: fresh descriptor.
                    let ofd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(rc) };
                    let fd = sys::lookup(pfd.as_raw_fd(), &cname)?;
                    Self::fixup_new(fd.as_raw_fd(), caller, Some(mode), pmode)?;
                    let st = sys::fstat(fd.as_raw_fd())?;
                    Ok((fd, ofd, st, post_op_attr(pfd.as_raw_fd())?))
                })
                .await?;
                let entry = self.register(fd, export, &st);
                let fh = self.add_file(ofd, export, true, false);
                Ok(Reply::Created {
                    entry,
                    fh,
                    direct: false,
                    parent: pattr,
                })
            }
            Op::Read { fh, offset, size } => {
                let f = self.file(fh)?;
                let size = size.min(proto::MAX_IO);
                let seekable = f.seekable;
                let run = move || sys::pread(f.fd.as_raw_fd(), offset, size, seekable);
                let data = if seekable {
                    blocking(run).await?
                } else {
                    dedicated(run).await?
                };
                Ok(Reply::Data(data))
            }
            Op::Write { fh, offset, data } => {
                let f = self.file(fh)?;
                self.writable(f.export)?;
                let seekable = f.seekable;
                let run = move || sys::pwrite(f.fd.as_raw_fd(), offset, &data, seekable);
                let n = if seekable {
                    blocking(run).await?
                } else {
                    dedicated(run).await?
                };
                Ok(Reply::Written(n as u32))
            }
            Op::Flush { fh, .. } => {
                // Data is written through on every write; nothing is buffered here.
                self.file(fh)?;
                Ok(Reply::Ok)
            }
            Op::Release { fh, .. } => {
                let f = self.state().files.remove(&fh);
                if let Some(f) = f {
                    // close(2) of a FIFO or device may block; never on the async workers.
                    if f.blocking {
                        let _ = dedicated(move || {
                            drop(f);
                            Ok(())
                        })
                        .await;
                    } else {
                        let _ = blocking(move || {
                            drop(f);
                            Ok(())
                        })
                        .await;
                    }
                }
                Ok(Reply::Ok)
            }
            Op::Fsync { fh, datasync } => {
                let f = self.file(fh)?;
                pooled(move || sys::fsync(f.fd.as_raw_fd(), datasync)).await?;
                Ok(Reply::Ok)
            }
            Op::OpenDir { node } => {
                let (fd, export, mode) = self.node(node)?;
                if !is_type(mode, libc::S_IFDIR) {
                    return Err(libc::ENOTDIR);
                }
                let fh = self.id();
                self.state().dirs.insert(
                    fh,
                    Arc::new(Mutex::new(DirHandle {
                        node_fd: fd,
                        export,
                        entries: None,
                    })),
                );
                Ok(Reply::Opened { fh, direct: false })
            }
            Op::ReadDir {
                fh,
                offset,
                max_bytes,
                plus,
            } => self.readdir(fh, offset, max_bytes, plus).await,
            Op::ReleaseDir { fh } => {
                self.state().dirs.remove(&fh);
                Ok(Reply::Ok)
            }
            Op::FsyncDir { fh, datasync } => {
                let d = self.state().dirs.get(&fh).cloned().ok_or(libc::EBADF)?;
                let fd = lock(&d).node_fd.clone();
                pooled(move || {
                    let r = sys::reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                    sys::fsync(r.as_raw_fd(), datasync)
                })
                .await?;
                Ok(Reply::Ok)
            }
            Op::StatFs { node } => {
                let (fd, _, _) = self.node(node)?;
                let s = blocking(move || sys::statfs(fd.as_raw_fd())).await?;
                Ok(Reply::StatFs(s))
            }
            Op::SetXattr {
                node,
                name,
                value,
                flags,
            } => {
                let (fd, export, nmode) = self.node(node)?;
                Self::no_symlink_xattr(nmode)?;
                self.writable(export)?;
                let name = CString::new(name).map_err(|_| libc::EINVAL)?;
                blocking(move || sys::setxattr(fd.as_raw_fd(), &name, &value, flags)).await?;
                Ok(Reply::Ok)
            }
            Op::GetXattr { node, name, size } => {
                let (fd, _, nmode) = self.node(node)?;
                Self::no_symlink_xattr(nmode)?;
                let name = CString::new(name).map_err(|_| libc::EINVAL)?;
                let size = size.min(proto::MAX_IO);
                let (n, data) =
                    blocking(move || sys::getxattr(fd.as_raw_fd(), &name, size)).await?;
                Ok(if size == 0 {
                    Reply::Size(n as u32)
                } else {
                    Reply::Data(data)
                })
            }
            Op::ListXattr { node, size } => {
                let (fd, _, nmode) = self.node(node)?;
                Self::no_symlink_xattr(nmode)?;
                let size = size.min(proto::MAX_IO);
                let (n, data) = blocking(move || sys::listxattr(fd.as_raw_fd(), size)).await?;
                Ok(if size == 0 {
                    Reply::Size(n as u32)
                } else {
                    Reply::Data(data)
                })
            }
            Op::RemoveXattr { node, name } => {
                let (fd, export, nmode) = self.node(node)?;
                Self::no_symlink_xattr(nmode)?;
                self.writable(export)?;
                let name = CString::new(name).map_err(|_| libc::EINVAL)?;
                blocking(move || sys::removexattr(fd.as_raw_fd(), &name)).await?;
                Ok(Reply::Ok)
            }
            Op::Access { node, mask, caller } => {
                let (fd, export, _) = self.node(node)?;
                if mask & libc::W_OK != 0 {
                    self.writable(export)?;
                }
                blocking(move || sys::access_as(fd.as_raw_fd(), mask, caller.uid, caller.gid))
                    .await?;
                Ok(Reply::Ok)
            }
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                let f = self.file(fh)?;
                self.writable(f.export)?;
                pooled(move || sys::fallocate(f.fd.as_raw_fd(), mode, offset, length)).await?;
                Ok(Reply::Ok)
            }
            Op::Lseek { fh, offset, whence } => {
                let f = self.file(fh)?;
                let r = blocking(move || sys::lseek(f.fd.as_raw_fd(), offset, whence)).await?;
                Ok(Reply::Offset(r))
            }
            Op::GetLk {
                fh,
                start,
                end,
                typ,
                ..
            } => {
                let f = self.file(fh)?;
                let (s, e, t, p) =
                    blocking(move || sys::getlk(f.fd.as_raw_fd(), start, end, typ)).await?;
                Ok(Reply::Lock {
                    start: s,
                    end: e,
                    typ: t,
                    pid: p,
                })
            }
            Op::SetLk {
                fh,
                start,
                end,
                typ,
                sleep,
                ..
            } => {
                let f = self.file(fh)?;
                let run = move || sys::setlk(f.fd.as_raw_fd(), start, end, typ, sleep);
                if sleep {
                    dedicated(run).await?;
                } else {
                    blocking(run).await?;
                }
                Ok(Reply::Ok)
            }
            Op::Poll {
                fh,
                events,
                wait_ms,
            } => {
                let f = self.file(fh)?;
                let run = move || sys::poll(f.fd.as_raw_fd(), events, wait_ms);
                let r = if wait_ms > 0 {
                    dedicated(run).await?
                } else {
                    blocking(run).await?
                };
                Ok(Reply::Poll(r))
            }
        }
    }

    /// xattr syscalls go through `/proc/self/fd/N`, which would follow a symlink's target on
    /// the HOST: refuse them on symlinks (Linux allows no user xattrs there anyway).
    fn no_symlink_xattr(mode: u32) -> R<()> {
        if is_type(mode, libc::S_IFLNK) {
            Err(libc::EOPNOTSUPP)
        } else {
            Ok(())
        }
    }

    fn update_mode(&self, node: NodeId, mode: u32) {
        if let Some(n) = self.state().nodes.get_mut(&node) {
            n.mode = mode;
        }
    }

    async fn remove(&self, parent: NodeId, name: Vec<u8>, dir: bool) -> R<Reply> {
        let (pfd, export, _) = self.node(parent)?;
        self.writable(export)?;
        let name = sys::component(&name)?;
        blocking(move || sys::unlinkat(pfd.as_raw_fd(), &name, dir)).await?;
        Ok(Reply::Ok)
    }

    async fn readdir(&self, fh: Fh, offset: u64, max_bytes: u32, plus: bool) -> R<Reply> {
        let d = self.state().dirs.get(&fh).cloned().ok_or(libc::EBADF)?;
        let (fd, export, cached) = {
            let g = lock(&d);
            (g.node_fd.clone(), g.export, g.entries.clone())
        };
        let entries = match cached {
            Some(e) if offset != 0 => e,
            _ => {
                let fd2 = fd.clone();
                let e = Arc::new(blocking(move || sys::read_dir(fd2.as_raw_fd())).await?);
                lock(&d).entries = Some(e.clone());
                e
            }
        };
        let mut out = Vec::new();
        let mut used = 0usize;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let picked: Vec<(usize, Vec<u8>, u32, u64)> = entries
            .iter()
            .enumerate()
            .skip(start)
            .take_while(|(_, (name, _, _))| {
                used += dirent_size(name.len(), plus);
                used <= max_bytes as usize
            })
            .map(|(i, (n, k, ino))| (i, n.clone(), *k, *ino))
            .collect();
        if !plus {
            for (i, name, kind, ino) in picked {
                out.push(DirEntry {
                    name,
                    offset: i as u64 + 1,
                    kind,
                    ino,
                    entry: None,
                });
            }
            return Ok(Reply::Dir(out));
        }
        let looked = blocking(move || {
            let mut v = Vec::with_capacity(picked.len());
            for (i, name, kind, ino) in picked {
                let res = if name == b"." || name == b".." {
                    None
                } else {
                    match sys::component(&name).and_then(|c| sys::lookup(fd.as_raw_fd(), &c)) {
                        Ok(f) => sys::fstat(f.as_raw_fd()).ok().map(|st| (f, st)),
                        Err(_) => None,
                    }
                };
                v.push((i, name, kind, ino, res));
            }
            Ok(v)
        })
        .await?;
        for (i, name, kind, ino, res) in looked {
            let entry = res.map(|(f, st)| self.register(f, export, &st));
            if entry.is_none() && name != b"." && name != b".." {
                // Vanished since the listing: skip it.
                continue;
            }
            out.push(DirEntry {
                name,
                offset: i as u64 + 1,
                kind,
                ino,
                entry,
            });
        }
        Ok(Reply::Dir(out))
    }

    /// A read of a regular file straight into the reply's buffer (the bulk path: no copy of
    /// the data into a `Reply`). `None`: not a regular file; handle it normally.
    fn read_in_place(&self, fh: Fh, offset: u64, size: u32) -> Option<Result<Bytes, RemoteError>> {
        let f = self.file(fh).ok().filter(|f| f.seekable)?;
        let size = size.min(proto::MAX_IO);
        let mut buf = Vec::with_capacity(proto::DATA_HEADROOM + size as usize);
        buf.resize(proto::DATA_HEADROOM, 0);
        let res = sys::pread_append(f.fd.as_raw_fd(), offset, size, &mut buf);
        Some(match res {
            Ok(()) => proto::data_reply(buf).map_err(encode_error),
            Err(e) => Err(errno_error(e)),
        })
    }

    /// A write to a regular file straight from the received request (the bulk path: no copy
    /// of the data into an `Op`). `None`: not such a write; decode and handle it normally.
    fn write_in_place(&self, req: &[u8]) -> Option<R<Reply>> {
        let (instance, fh, offset, data) = proto::decode_write(req)?;
        if instance != self.inner.instance {
            return None;
        }
        let f = self.file(fh).ok().filter(|f| f.seekable)?;
        let res = self
            .writable(f.export)
            .and_then(|()| sys::pwrite(f.fd.as_raw_fd(), offset, data, true));
        Some(res.map(|n| Reply::Written(n as u32)))
    }

    /// Handles one encoded request (also used by in-process tests).
    pub async fn dispatch(&self, req: &[u8]) -> Result<Bytes, RemoteError> {
        if let Some(written) = self.write_in_place(req) {
            return encoded(written.map_err(errno_error)?);
        }
        let req: Request = proto::decode(req).map_err(|e| RemoteError {
            code: libc::EPROTO,
            message: e.to_string(),
        })?;
        let reply = match req.op {
            Op::Mount { version, path } => self.mount(version, path).await?,
            op => {
                if req.instance != self.inner.instance {
                    return Err(RemoteError {
                        code: proto::STALE_INSTANCE,
                        message: "fs server restarted; remount".into(),
                    });
                }
                if let Op::Read { fh, offset, size } = op {
                    if let Some(reply) = self.read_in_place(fh, offset, size) {
                        return reply;
                    }
                }
                debug!(?op, "fs op");
                self.handle(op).await.map_err(errno_error)?
            }
        };
        encoded(reply)
    }
}

/// A directory's attributes right after an operation in it made a new entry.
fn post_op_attr(dir: RawFd) -> R<Attr> {
    Ok(sys::attr_of_node(dir, &sys::fstat(dir)?))
}

/// Every node the DPU kernel remembers is an open `O_PATH` descriptor here (like virtiofsd),
/// so lift the soft descriptor limit to the hard one.
/// An operation's errno as the service's error.
fn errno_error(e: Errno) -> RemoteError {
    RemoteError {
        code: e,
        message: std::io::Error::from_raw_os_error(e).to_string(),
    }
}

/// A reply that could not be encoded (EIO to the caller).
fn encode_error(e: proto::ProtoError) -> RemoteError {
    RemoteError {
        code: libc::EIO,
        message: e.to_string(),
    }
}

fn encoded(reply: Reply) -> Result<Bytes, RemoteError> {
    proto::encode(&reply).map(Bytes::from).map_err(encode_error)
}

fn raise_nofile_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; plain syscalls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            let old = rl.rlim_cur;
            rl.rlim_cur = rl.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 {
                debug!(from = old, to = rl.rlim_max, "raised RLIMIT_NOFILE");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[async_trait]
impl Service for FsService {
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let t0 = std::time::Instant::now();
        let res = SESSION.scope(session.id(), self.dispatch(&req)).await;
        offload_metrics::fs_op(proto::op_name(&req), t0.elapsed(), res.is_ok());
        res
    }

    fn attached(&self, session: &Session) {
        let (me, s) = (self.clone(), session.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                s.closed().await;
                me.session_ended(s.id());
            });
        }
    }

    /// FIFO tunnels (see [`crate::fifo`]): the DPU opens one stream per FIFO it uses.
    async fn stream(&self, _session: &Session, header: Bytes, stream: Stream) {
        let Some(h) = fifo::decode_header(&header) else {
            stream.reset_with("unknown fs stream");
            return;
        };
        if h.instance != self.inner.instance {
            stream.reset_with("stale instance");
            return;
        }
        match self.node(h.node) {
            Ok((_, _, mode)) if is_type(mode, libc::S_IFIFO) => {}
            _ => {
                stream.reset_with("not a FIFO node");
                return;
            }
        }
        let ends = HostEnds {
            svc: self.clone(),
            node: h.node,
        };
        let ctl = Arc::new(fifo::Control::default());
        match fifo::run(fifo::Side::Host, ends, stream, ctl).await {
            Ok(()) => debug!(node = h.node, "fifo tunnel closed"),
            Err(e) => debug!(node = h.node, error = %e, "fifo tunnel ended"),
        }
    }
}

/// The HOST's side of a FIFO tunnel: probes and mirror readers re-open the node's `O_PATH`
/// descriptor each time, so an idle tunnel holds nothing of the FIFO.
struct HostEnds {
    svc: FsService,
    node: NodeId,
}

impl HostEnds {
    fn open(&self, flags: i32) -> R<OwnedFd> {
        let (fd, _, mode) = self.svc.node(self.node)?;
        if !is_type(mode, libc::S_IFIFO) {
            return Err(libc::ESTALE);
        }
        sys::reopen(fd.as_raw_fd(), flags | libc::O_NONBLOCK)
    }
}

#[async_trait]
impl fifo::Ends for HostEnds {
    async fn probe(&mut self) -> Result<Option<OwnedFd>, i32> {
        match self.open(libc::O_WRONLY) {
            Ok(fd) => Ok(Some(fd)),
            Err(libc::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn reader(&mut self) -> Result<OwnedFd, i32> {
        self.open(libc::O_RDONLY)
    }
}
