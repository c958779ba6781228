//! The HOST side of the change feed ([`crate::notify`]): one fanotify group (directory file
//! handles and names, `FAN_REPORT_DFID_NAME`) with an inode mark on every directory node a
//! DPU holds, a thread reading its events, and one feed per subscribed session.
//!
//! Why fanotify and not inotify: each event carries the pid of the process that made the
//! change, so changes this daemon made for a DPU are recognised and not sent back to the DPU
//! that asked for them (when other sessions hold the same directory, they are sent to all —
//! correct, at the price of one needless invalidation for the originator). Directories are
//! found again by their file handle (`name_to_handle_at`, taken when marked), not by path.
//!
//! Only directories are marked (`FAN_EVENT_ON_CHILD` reports their files' changes): a file
//! changed through a hard link in a directory no DPU holds is not reported. A directory on a
//! filesystem that cannot report file handles (overlayfs, procfs, sysfs) is reported
//! [`Msg::Unwatched`] to the sessions holding it. An overflowing event queue sends
//! [`Msg::Reset`]. fanotify needs `CAP_SYS_ADMIN`; without it the feed says `watching: false`.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;
use tracing::{debug, warn};
use transport::sync::lock;

use super::{FsService, Inner};
use crate::notify::{what, Change, Msg, MAX_BATCH};
use crate::proto::NodeId;

/// A directory's identity as fanotify reports it: filesystem id, handle type, handle bytes.
type HandleKey = ([i32; 2], i32, Vec<u8>);

/// Messages queued per feed before the feed is declared overflowed (and sent a reset).
pub(super) const FEED_QUEUE: usize = 256;

const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ATTRIB
    | libc::FAN_MODIFY
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// Filesystems whose changes are not reported through fsnotify (or make no sense to watch).
const PSEUDO_FS: [i64; 6] = [
    libc::PROC_SUPER_MAGIC,
    libc::SYSFS_MAGIC,
    libc::CGROUP_SUPER_MAGIC,
    libc::CGROUP2_SUPER_MAGIC,
    libc::DEBUGFS_MAGIC,
    0x6c6f_6f70, // binderfs and friends: never exported in practice
];

#[derive(Default)]
struct Marks {
    by_handle: HashMap<HandleKey, NodeId>,
    of_node: HashMap<NodeId, HandleKey>,
    /// Nodes that could not be marked.
    unwatched: HashSet<NodeId>,
    /// Devices whose filesystem cannot be marked.
    bad_dev: HashSet<u64>,
}

/// The fanotify group and its marks.
pub(super) struct Watcher {
    fan: OwnedFd,
    marks: Mutex<Marks>,
}

/// The feeds of subscribed sessions.
#[derive(Default)]
pub(super) struct Feeds {
    senders: HashMap<u64, mpsc::Sender<Msg>>,
    /// Sessions whose queue overflowed: they get a [`Msg::Reset`] next.
    lost: HashSet<u64>,
}

impl Watcher {
    /// A fanotify group reporting directory handles and names, or `None` (not privileged,
    /// kernel older than 5.9) — then nothing is watched.
    fn new() -> Option<Watcher> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: plain syscall; the result is checked before use as a descriptor.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
        if fd < 0 {
            warn!(
                error = %std::io::Error::last_os_error(),
                "fanotify unavailable: DPU mounts keep short cache lifetimes"
            );
            return None;
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by nobody else.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Watcher {
            fan,
            marks: Mutex::new(Marks::default()),
        })
    }

    /// Marks directory node `node` (descriptor `fd`). `false`: it cannot be watched.
    fn mark(&self, node: NodeId, fd: RawFd) -> bool {
        let mut m = lock(&self.marks);
        if m.of_node.contains_key(&node) {
            return true;
        }
        if m.unwatched.contains(&node) {
            return false;
        }
        let st = crate::sys::fstat(fd).ok();
        let dev = st.map(|s| s.st_dev).unwrap_or(0);
        let ok = !m.bad_dev.contains(&dev) && {
            match self.try_mark(fd) {
                Ok(key) => {
                    tracing::trace!(node, "directory watched");
                    m.by_handle.insert(key.clone(), node);
                    m.of_node.insert(node, key);
                    true
                }
                Err(MarkError::Filesystem) => {
                    m.bad_dev.insert(dev);
                    false
                }
                Err(MarkError::Node(e)) => {
                    debug!(node, errno = e, "directory not watched");
                    false
                }
            }
        };
        if !ok {
            m.unwatched.insert(node);
        }
        ok
    }

    fn try_mark(&self, fd: RawFd) -> Result<HandleKey, MarkError> {
        // SAFETY: zeroed statfs is a valid out-buffer; plain syscall on a descriptor we hold.
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(fd, &mut sfs) } != 0 {
            return Err(MarkError::Node(crate::sys::last()));
        }
        if PSEUDO_FS.contains(&(sfs.f_type as i64)) {
            return Err(MarkError::Filesystem);
        }
        // SAFETY: fsid_t is two c_ints (its field is private in libc).
        let fsid: [i32; 2] = unsafe { std::mem::transmute(sfs.f_fsid) };
        let (ty, bytes) = handle_of(fd)?;
        let path = crate::sys::fd_path(fd);
        // SAFETY: valid descriptor and NUL-terminated path; plain syscall.
        let r = unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                libc::FAN_MARK_ADD,
                MASK,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if r != 0 {
            let e = crate::sys::last();
            return Err(match e {
                libc::EXDEV | libc::EOPNOTSUPP | libc::ENODEV | libc::EINVAL => {
                    MarkError::Filesystem
                }
                e => {
                    if e == libc::ENOSPC {
                        warn!("fanotify mark limit reached (fs.fanotify.max_user_marks): some directories keep short cache lifetimes on the DPU");
                    }
                    MarkError::Node(e)
                }
            });
        }
        Ok((fsid, ty, bytes))
    }

    /// Removes the mark of a node that is going away.
    fn unmark(&self, node: NodeId, fd: RawFd) {
        let mut m = lock(&self.marks);
        m.unwatched.remove(&node);
        let Some(key) = m.of_node.remove(&node) else {
            return;
        };
        if m.by_handle.get(&key) == Some(&node) {
            m.by_handle.remove(&key);
        }
        drop(m);
        let path = crate::sys::fd_path(fd);
        // SAFETY: valid descriptor and NUL-terminated path; the result only matters for logs
        // (a removed directory has lost its mark already).
        unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                libc::FAN_MARK_REMOVE,
                MASK,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
    }
}

enum MarkError {
    /// The whole filesystem cannot be watched.
    Filesystem,
    /// This node cannot (errno).
    Node(i32),
}

/// The file handle of `fd` (type and bytes), as fanotify reports it.
fn handle_of(fd: RawFd) -> Result<(i32, Vec<u8>), MarkError> {
    const MAX: usize = 128;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = [0u32; 2 + MAX / 4];
    buf[0] = MAX as u32;
    let mut mnt: libc::c_int = 0;
    let empty = CString::default();
    // SAFETY: `buf` is a file_handle with room for MAX bytes, as its first field says.
    let r = unsafe {
        libc::name_to_handle_at(
            fd,
            empty.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mnt,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(match crate::sys::last() {
            libc::EOPNOTSUPP | libc::EOVERFLOW => MarkError::Filesystem,
            e => MarkError::Node(e),
        });
    }
    let n = (buf[0] as usize).min(MAX);
    let ty = buf[1] as i32;
    let bytes: Vec<u8> = buf[2..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(n)
        .collect();
    Ok((ty, bytes))
}

/// One parsed fanotify event.
#[derive(Debug, PartialEq, Eq)]
struct Event {
    mask: u64,
    pid: i32,
    /// Directory handle and child name (`None`: the directory itself); `None` for events
    /// without file information (an overflow).
    target: Option<(HandleKey, Option<Vec<u8>>)>,
}

/// Parses a buffer of fanotify events (`FAN_REPORT_DFID_NAME` format). Malformed tails are
/// dropped: the kernel is the only writer, but nothing here trusts lengths blindly.
fn parse(buf: &[u8]) -> Vec<Event> {
    const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    let mut off = 0;
    while off + META <= buf.len() {
        let b = &buf[off..];
        let Some(event_len) = u32_at(b, 0).map(|v| v as usize) else {
            break;
        };
        let meta_len = u16::from_ne_bytes([b[6], b[7]]) as usize;
        if event_len < META || event_len > b.len() || meta_len < META || meta_len > event_len {
            break;
        }
        let mask = u64::from_ne_bytes(b[8..16].try_into().unwrap_or([0; 8]));
        let pid = i32::from_ne_bytes(b[20..24].try_into().unwrap_or([0; 4]));
        let mut target = None;
        let mut io = meta_len;
        while io + 4 <= event_len {
            let ty = b[io];
            let len = u16::from_ne_bytes([b[io + 2], b[io + 3]]) as usize;
            if len < 4 || io + len > event_len {
                break;
            }
            let rec = &b[io..io + len];
            if ty == libc::FAN_EVENT_INFO_TYPE_DFID_NAME || ty == libc::FAN_EVENT_INFO_TYPE_DFID {
                target = parse_fid(rec, ty == libc::FAN_EVENT_INFO_TYPE_DFID_NAME);
            }
            io += len;
        }
        out.push(Event { mask, pid, target });
        off += event_len;
    }
    out
}

/// `hdr(4) fsid(8) handle_bytes(4) handle_type(4) f_handle[handle_bytes] [name NUL]`.
fn parse_fid(rec: &[u8], named: bool) -> Option<(HandleKey, Option<Vec<u8>>)> {
    let i32_at =
        |o: usize| -> Option<i32> { Some(i32::from_ne_bytes(rec.get(o..o + 4)?.try_into().ok()?)) };
    let fsid = [i32_at(4)?, i32_at(8)?];
    let n = i32_at(12)? as u32 as usize;
    let ty = i32_at(16)?;
    let handle = rec.get(20..20 + n)?.to_vec();
    let name = if named {
        let rest = rec.get(20 + n..)?;
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let name = &rest[..end];
        (!name.is_empty() && name != b".").then(|| name.to_vec())
    } else {
        None
    };
    Some(((fsid, ty, handle), name))
}

fn what_of(mask: u64, named: bool) -> u8 {
    let mut w = 0;
    if mask & (libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO) != 0
    {
        w |= what::NAME;
    }
    if mask & libc::FAN_ATTRIB != 0 {
        w |= what::ATTR;
    }
    if mask & libc::FAN_MODIFY != 0 {
        w |= what::DATA | what::ATTR;
    }
    if !named && mask & (libc::FAN_DELETE_SELF | libc::FAN_MOVE_SELF) != 0 {
        w |= what::GONE;
    }
    w
}

impl FsService {
    /// The watcher, started on the first subscription (`None`: fanotify unavailable).
    pub(super) fn watcher(&self) -> Option<Arc<Watcher>> {
        self.inner
            .watcher
            .get_or_init(|| {
                let w = Arc::new(Watcher::new()?);
                let weak = Arc::downgrade(&self.inner);
                let w2 = w.clone();
                let spawned = std::thread::Builder::new()
                    .name("fs-watch".into())
                    .spawn(move || run(weak, w2));
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start the fs watcher thread");
                    return None;
                }
                Some(w)
            })
            .clone()
    }

    /// Marks a directory node if a watcher runs; reports it unwatched to its holders if it
    /// cannot be marked.
    pub(super) fn watch_dir(&self, node: NodeId, fd: RawFd) {
        let Some(w) = self.inner.watcher.get().and_then(|w| w.clone()) else {
            return;
        };
        if !w.mark(node, fd) {
            self.send_to_holders(node, || Msg::Unwatched(vec![node]));
        }
    }

    /// A node left the table: drop its mark.
    pub(super) fn unwatch(&self, node: NodeId, fd: &OwnedFd) {
        if let Some(Some(w)) = self.inner.watcher.get() {
            w.unmark(node, fd.as_raw_fd());
        }
    }

    fn send_to_holders(&self, node: NodeId, msg: impl Fn() -> Msg) {
        let subscribed = self.subscribed();
        let holders = holders(&self.state(), &subscribed, node);
        let mut feeds = lock(&self.inner.feeds);
        for sid in holders {
            feeds.send(sid, msg());
        }
    }

    /// The sessions with a feed.
    fn subscribed(&self) -> Vec<u64> {
        lock(&self.inner.feeds).senders.keys().copied().collect()
    }

    /// A session subscribed: marks the directories it holds and returns the messages that
    /// start its feed (which of them cannot be watched).
    pub(super) fn subscribe(&self, sid: u64, tx: mpsc::Sender<Msg>) -> Option<Vec<Msg>> {
        let w = self.watcher()?;
        lock(&self.inner.feeds).senders.insert(sid, tx);
        let dirs: Vec<(NodeId, Arc<OwnedFd>)> = {
            let s = self.state();
            let Some(h) = s.held.get(&sid) else {
                return Some(Vec::new());
            };
            h.keys()
                .filter_map(|id| {
                    let n = s.nodes.get(id)?;
                    Some((*id, n.mode, n.fd.clone()?))
                })
                .filter(|(_, mode, _)| mode & libc::S_IFMT == libc::S_IFDIR)
                .map(|(id, _, fd)| (id, fd))
                .collect()
        };
        let unwatched: Vec<NodeId> = dirs
            .iter()
            .filter(|(id, fd)| !w.mark(*id, fd.as_raw_fd()))
            .map(|(id, _)| *id)
            .collect();
        Some(if unwatched.is_empty() {
            Vec::new()
        } else {
            vec![Msg::Unwatched(unwatched)]
        })
    }

    pub(super) fn unsubscribe(&self, sid: u64) {
        let mut f = lock(&self.inner.feeds);
        f.senders.remove(&sid);
        f.lost.remove(&sid);
    }

    /// Takes the "your feed overflowed" flag of a session.
    pub(super) fn take_lost(&self, sid: u64) -> bool {
        lock(&self.inner.feeds).lost.remove(&sid)
    }

    /// Routes parsed events to the feeds of the sessions holding their directories.
    fn deliver(&self, w: &Watcher, events: Vec<Event>) {
        let own = std::process::id() as i32;
        let mut overflow = false;
        let mut resolved = Vec::with_capacity(events.len());
        {
            let m = lock(&w.marks);
            for e in events {
                if e.mask & libc::FAN_Q_OVERFLOW != 0 {
                    overflow = true;
                    continue;
                }
                let Some((key, name)) = e.target else {
                    continue;
                };
                let Some(&node) = m.by_handle.get(&key) else {
                    continue;
                };
                let what = what_of(e.mask, name.is_some());
                if what != 0 {
                    resolved.push((node, name, what, e.pid == own));
                }
            }
        }
        tracing::trace!(events = resolved.len(), overflow, "fs watch events");
        let mut batches: HashMap<u64, Vec<Change>> = HashMap::new();
        let subscribed = self.subscribed();
        {
            let s = self.state();
            for (node, name, what, ours) in resolved {
                let holders = holders(&s, &subscribed, node);
                // Our own change, asked for by the only session holding the directory: it
                // knows already.
                if ours && holders.len() <= 1 {
                    continue;
                }
                for sid in holders {
                    let b = batches.entry(sid).or_default();
                    // Consecutive identical changes (a writer's many writes) collapse.
                    if b.last()
                        .is_some_and(|c: &Change| c.dir == node && c.name == name && c.what == what)
                    {
                        continue;
                    }
                    b.push(Change {
                        dir: node,
                        name: name.clone(),
                        what,
                    });
                }
            }
        }
        let mut feeds = lock(&self.inner.feeds);
        if overflow {
            warn!("fanotify queue overflowed: DPU mounts drop their caches");
            for sid in subscribed {
                feeds.send(sid, Msg::Reset);
            }
        }
        for (sid, changes) in batches {
            for chunk in changes.chunks(MAX_BATCH) {
                feeds.send(sid, Msg::Changes(chunk.to_vec()));
            }
        }
    }
}

/// The sessions among `subscribed` that hold `node`.
fn holders(s: &super::State, subscribed: &[u64], node: NodeId) -> Vec<u64> {
    subscribed
        .iter()
        .filter(|sid| s.held.get(sid).is_some_and(|h| h.contains_key(&node)))
        .copied()
        .collect()
}

impl Feeds {
    fn send(&mut self, sid: u64, msg: Msg) {
        let Some(tx) = self.senders.get(&sid) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg) {
            self.lost.insert(sid);
        }
    }
}

/// The watcher thread: reads events until the service is gone.
fn run(svc: Weak<Inner>, w: Arc<Watcher>) {
    let mut buf = vec![0u64; 8192];
    loop {
        let mut pfd = libc::pollfd {
            fd: w.fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let Some(inner) = svc.upgrade() else { return };
        let me = FsService { inner };
        loop {
            let bytes = buf.len() * 8;
            // SAFETY: reading into our own buffer of `bytes` bytes.
            let n = unsafe { libc::read(w.fan.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if n <= 0 {
                break;
            }
            // SAFETY: the u64 buffer viewed as the `n` bytes the kernel wrote.
            let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            me.deliver(&w, parse(raw));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, pid: i32, handle: &[u8], name: Option<&[u8]>) -> Vec<u8> {
        let mut rec = Vec::new();
        rec.push(if name.is_some() {
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME
        } else {
            libc::FAN_EVENT_INFO_TYPE_DFID
        });
        rec.push(0);
        rec.extend_from_slice(&[0, 0]);
        rec.extend_from_slice(&1i32.to_ne_bytes());
        rec.extend_from_slice(&2i32.to_ne_bytes());
        rec.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        rec.extend_from_slice(&1i32.to_ne_bytes());
        rec.extend_from_slice(handle);
        if let Some(n) = name {
            rec.extend_from_slice(n);
            rec.push(0);
        }
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let l = rec.len() as u16;
        rec[2..4].copy_from_slice(&l.to_ne_bytes());
        let mut ev = Vec::new();
        let total = (24 + rec.len()) as u32;
        ev.extend_from_slice(&total.to_ne_bytes());
        ev.extend_from_slice(&[3, 0]);
        ev.extend_from_slice(&24u16.to_ne_bytes());
        ev.extend_from_slice(&mask.to_ne_bytes());
        ev.extend_from_slice(&(-1i32).to_ne_bytes());
        ev.extend_from_slice(&pid.to_ne_bytes());
        ev.extend_from_slice(&rec);
        ev
    }

    #[test]
    fn parses_named_self_and_truncated_events() {
        let mut buf = event(libc::FAN_CREATE, 42, b"abcdefgh", Some(b"init.pid"));
        buf.extend(event(
            libc::FAN_ATTRIB | libc::FAN_ONDIR,
            7,
            b"abcdefgh",
            Some(b"."),
        ));
        buf.extend(event(libc::FAN_DELETE_SELF, 7, b"xy", None));
        let full = parse(&buf);
        assert_eq!(full.len(), 3);
        let key = ([1, 2], 1, b"abcdefgh".to_vec());
        assert_eq!(
            full[0].target,
            Some((key.clone(), Some(b"init.pid".to_vec())))
        );
        assert_eq!(full[0].pid, 42);
        assert_eq!(full[1].target, Some((key, None)));
        assert_eq!(what_of(full[2].mask, false), what::GONE);
        assert_eq!(what_of(libc::FAN_MODIFY, true), what::DATA | what::ATTR);
        // A cut buffer yields the whole events before the cut, and nothing absurd.
        let cut = parse(&buf[..buf.len() - 3]);
        assert_eq!(cut.len(), 2);
        // Garbage lengths stop the parse.
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse(&bad).is_empty());
    }
}
