//! The HOST's tables: nodes (one `O_PATH` descriptor per HOST inode and export, with the
//! client's lookup references counted per session), open files and directory handles, and the
//! nodes a forwarded mount covers.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tracing::debug;

use super::passthrough::R;
use super::{current_session, FsService};
use crate::proto::{Entry, Errno, Fh, NodeId, ALIAS_BIT};
use crate::sys;

/// A node's identity: (export, HOST device, HOST inode).
pub(super) type Key = (usize, u64, u64);

/// A directory a mount covers: its descriptor, key and mode.
pub(super) type Covered = (Arc<OwnedFd>, Key, u32);

pub(super) struct Node {
    /// `None` once the inode's last name was removed through this daemon and nothing had it
    /// open ([`FsService::unlinked`]): the HOST frees the inode at once, as a local unlink
    /// does, rather than when the DPU's forget arrives. The node answers ENOENT until then.
    pub(super) fd: Option<Arc<OwnedFd>>,
    pub(super) export: usize,
    pub(super) lookups: u64,
    pub(super) key: (usize, u64, u64),
    pub(super) mode: u32,
    /// What a forwarded mount on this directory covered: (fd, key, mode) of the directory
    /// below, innermost last, restored when that mount goes ([`FsService::uncover`]).
    pub(super) under: Vec<Covered>,
}

pub(super) struct OpenFile {
    pub(super) fd: OwnedFd,
    pub(super) export: usize,
    /// The node's key, counted in [`State::open_keys`].
    pub(super) key: Key,
    /// pread/pwrite at offsets (regular files) rather than read/write (pipes, devices).
    pub(super) seekable: bool,
    /// May block indefinitely (char device): use a dedicated thread.
    pub(super) blocking: bool,
}

/// A directory snapshot: (name, type bits, HOST inode) per entry, in getdents order.
pub(super) type Listing = Vec<(Vec<u8>, u32, u64)>;

pub(super) struct DirHandle {
    pub(super) node_fd: Arc<OwnedFd>,
    pub(super) export: usize,
    pub(super) entries: Option<Arc<Listing>>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) nodes: HashMap<NodeId, Node>,
    pub(super) by_key: HashMap<(usize, u64, u64), NodeId>,
    pub(super) files: HashMap<Fh, Arc<OpenFile>>,
    pub(super) dirs: HashMap<Fh, Arc<Mutex<DirHandle>>>,
    /// Lookup references per session id, released when that session ends (a mount process
    /// that exits or is unmounted never sends all its forgets).
    pub(super) held: HashMap<u64, HashMap<NodeId, u64>>,
    /// Open files per node key, so a removal can tell whether anything still has the inode
    /// open ([`FsService::unlinked`]).
    pub(super) open_keys: HashMap<Key, usize>,
    /// Client-chosen ids per session (see "Client-chosen ids" in [`crate::proto`]): the node
    /// or handle an asynchronous create made, or the errno it failed with.
    pub(super) aliases: HashMap<u64, HashMap<u64, Result<u64, Errno>>>,
}

impl State {
    /// The HOST id `id` stands for in session `sid`: itself, or what its alias maps to
    /// (ESTALE for an alias the session does not know: the client re-resolves).
    fn real(&self, sid: u64, id: u64) -> R<u64> {
        if id & ALIAS_BIT == 0 {
            return Ok(id);
        }
        match self.aliases.get(&sid).and_then(|m| m.get(&id)) {
            Some(r) => *r,
            None => Err(libc::ESTALE),
        }
    }

    /// Ends alias `id` of session `sid` (a forget or release of it); the id it stood for.
    fn unalias(&mut self, sid: u64, id: u64) -> R<u64> {
        if id & ALIAS_BIT == 0 {
            return Ok(id);
        }
        match self.aliases.get_mut(&sid).and_then(|m| m.remove(&id)) {
            Some(r) => r,
            None => Err(libc::ESTALE),
        }
    }
}

impl FsService {
    pub(super) fn node(&self, id: NodeId) -> R<(Arc<OwnedFd>, usize, u32)> {
        self.node_key(id)
            .map(|(fd, export, mode, _)| (fd, export, mode))
    }

    /// [`FsService::node`] and the node's key.
    pub(super) fn node_key(&self, id: NodeId) -> R<(Arc<OwnedFd>, usize, u32, Key)> {
        let st = self.state();
        let id = st.real(current_session(), id)?;
        let n = st.nodes.get(&id).ok_or(libc::ESTALE)?;
        let fd = n.fd.clone().ok_or(libc::ENOENT)?;
        Ok((fd, n.export, n.mode, n.key))
    }

    /// This daemon removed a name of the inode `key` (unlink, or a rename over it). When that
    /// was its last name and no open file refers to it, its node lets go of the `O_PATH`
    /// descriptor now: the HOST frees the inode and its space at once, as a local unlink does,
    /// instead of when the DPU's forget arrives (a `rm` then a create on a full filesystem
    /// must not fail with ENOSPC). Nothing on the DPU can name the inode any more; a request
    /// already on its way gets ENOENT, as it would racing a local unlink.
    pub(super) fn unlinked(&self, key: Key) {
        let mut s = self.state();
        if s.open_keys.contains_key(&key) {
            return;
        }
        let Some(&id) = s.by_key.get(&key) else {
            return;
        };
        let Some(n) = s.nodes.get_mut(&id) else {
            return;
        };
        if n.mode & libc::S_IFMT == libc::S_IFDIR || !n.under.is_empty() {
            return;
        }
        // Only the inode itself can say it has no name left (a hard link elsewhere, or a
        // name the HOST made meanwhile).
        let last = match &n.fd {
            Some(fd) => sys::fstat(fd.as_raw_fd()).is_ok_and(|st| st.st_nlink == 0),
            None => false,
        };
        if !last {
            return;
        }
        let fd = n.fd.take();
        s.by_key.remove(&key);
        drop(s);
        drop(fd);
        debug!(node = id, "released a removed inode");
    }

    pub(super) fn writable(&self, export: usize) -> R<()> {
        match self.inner.exports.get(export) {
            Some(e) if !e.read_only => Ok(()),
            _ => Err(libc::EROFS),
        }
    }

    pub(super) fn file(&self, fh: Fh) -> R<Arc<OpenFile>> {
        let st = self.state();
        let fh = st.real(current_session(), fh)?;
        st.files.get(&fh).cloned().ok_or(libc::EBADF)
    }

    /// Takes the open file `fh` out of the table (release), ending its alias.
    pub(super) fn take_file(&self, fh: Fh) -> Option<Arc<OpenFile>> {
        let mut st = self.state();
        let fh = st.unalias(current_session(), fh).ok()?;
        let f = st.files.remove(&fh)?;
        if let Some(c) = st.open_keys.get_mut(&f.key) {
            *c -= 1;
            if *c == 0 {
                st.open_keys.remove(&f.key);
            }
        }
        Some(f)
    }

    /// Records what the client-chosen id `alias` stands for in this session: the node or
    /// handle an operation made, or the errno it failed with. Ids without [`ALIAS_BIT`] are
    /// the HOST's own and are never taken as aliases.
    pub(super) fn set_alias(&self, alias: Option<u64>, to: R<u64>) {
        let Some(alias) = alias.filter(|a| a & ALIAS_BIT != 0) else {
            return;
        };
        let sid = current_session();
        self.state()
            .aliases
            .entry(sid)
            .or_default()
            .insert(alias, to);
    }

    /// Registers a looked-up descriptor (deduplicated per export and HOST inode) with one
    /// lookup reference.
    pub(super) fn register(&self, fd: OwnedFd, export: usize, st: &libc::stat) -> Entry {
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
        let fd = Arc::new(fd);
        s.nodes.insert(
            id,
            Node {
                fd: Some(fd.clone()),
                export,
                lookups: 1,
                key,
                mode: st.st_mode,
                under: Vec::new(),
            },
        );
        s.by_key.insert(key, id);
        *s.held.entry(sid).or_default().entry(id).or_default() += 1;
        drop(s);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            self.watch_dir(id, fd.as_raw_fd());
        }
        Entry { node: id, attr }
    }

    pub(super) fn forget_refs(&self, id: NodeId, n: u64) {
        let sid = current_session();
        let mut s = self.state();
        let Ok(id) = s.unalias(sid, id) else {
            return;
        };
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
        let gone = Self::drop_refs(&mut s, id, n_held);
        drop(s);
        if let Some(fd) = gone {
            self.unwatch(id, &fd);
        }
    }

    /// Releases every reference a finished session still held.
    pub(super) fn session_ended(&self, sid: u64) {
        let mut s = self.state();
        s.aliases.remove(&sid);
        let Some(h) = s.held.remove(&sid) else {
            return;
        };
        let n = h.len();
        let mut gone = Vec::new();
        for (id, c) in h {
            if let Some(fd) = Self::drop_refs(&mut s, id, c) {
                gone.push((id, fd));
            }
        }
        drop(s);
        self.unsubscribe(sid);
        for (id, fd) in gone {
            self.unwatch(id, &fd);
        }
        debug!(
            session = sid,
            nodes = n,
            "released the nodes of a closed session"
        );
    }

    /// Drops `n` references; the descriptor of a node that left the table (to unmark it).
    fn drop_refs(s: &mut State, id: NodeId, n: u64) -> Option<Arc<OwnedFd>> {
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
                return node.fd;
            }
        }
        None
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
                let Some(fd) = n.fd.clone() else {
                    continue;
                };
                let old = n.key;
                n.under.push((fd, n.key, n.mode));
                n.fd = Some(root.clone());
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
            .filter(|(_, n)| {
                n.key.1 == root.0
                    && n.fd.as_ref().map(|fd| sys::mnt_id(fd.as_raw_fd())) == Some(Ok(mnt))
            })
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
                    n.fd = Some(fd);
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

    pub(super) fn update_mode(&self, node: NodeId, mode: u32) {
        let mut st = self.state();
        let Ok(node) = st.real(current_session(), node) else {
            return;
        };
        if let Some(n) = st.nodes.get_mut(&node) {
            n.mode = mode;
        }
    }

    pub(super) fn add_file(&self, fd: OwnedFd, key: Key, seekable: bool, blocking: bool) -> Fh {
        let fh = self.id();
        let mut s = self.state();
        *s.open_keys.entry(key).or_default() += 1;
        s.files.insert(
            fh,
            Arc::new(OpenFile {
                fd,
                export: key.0,
                key,
                seekable,
                blocking,
            }),
        );
        fh
    }
}
