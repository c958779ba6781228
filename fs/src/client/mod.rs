//! DPU side of qtfs: a FUSE filesystem (fuser 0.18) whose every operation is a call to the
//! HOST's `fs` service over a [`transport::Client`] session.
//!
//! # Concurrency
//! fuser's event-loop threads only decode requests and never wait for the HOST: most requests
//! are spawned onto a tokio runtime and answered asynchronously, so any number of them (a
//! blocked FIFO read, a lock wait, a slow `fsync`) are in flight at once without holding an
//! event-loop thread. The most frequent ones — lookup, getattr, setattr — are sent by the
//! event-loop thread itself when the node and the session are at hand, and answered by the
//! session's reader where the reply arrives ([`transport::Session::call_then`]): no task and one
//! thread hand-off less per request. A lost session or a restarted HOST sends them down the
//! async path, which waits, re-resolves and retries.
//!
//! # Inodes and restarts
//! FUSE inode numbers are assigned here and map to the HOST's opaque node ids of the current
//! server *instance*. Each inode remembers its parent and name, each open handle its inode and
//! flags. When the HOST daemon restarts, calls fail until it is back (EIO after `timeout`, or
//! wait forever with `hard`), then the server answers "stale instance": the client mounts the
//! same source again and lazily re-resolves inodes by name from the root and re-opens handles,
//! so the mount and files opened before the restart keep working. Files that were unlinked while
//! open cannot be re-resolved (ESTALE).
//!
//! # Writes (write-behind, `-o sync` to turn off)
//! A write is acknowledged to the kernel once its request is queued on the session, behind
//! every earlier request, instead of once the HOST answered; up to 32 MiB per mount are in
//! flight, further writers wait. The HOST applies prompt calls in arrival order (see
//! [`transport::Service`]), so any later request — getattr, read, fsync, a HOST-side reader
//! after close — sees the write. A failure (ENOSPC, EIO after an outage) is reported by the
//! next write, by `close` (flush waits for the inode's writes in flight) or by `fsync`, as on
//! NFS; unmounting delivers what is still in flight. Writes in flight when the HOST daemon
//! restarts are sent again once it is back; two *overlapping* writes caught in flight by a
//! restart may then land in either order. Writes through FIFOs, pseudo filesystems
//! and `O_APPEND`/`O_SYNC`/`O_DSYNC`/`O_DIRECT` handles stay synchronous. Page-cache write-back
//! (`writeback_cache`) is opt-in: in that mode the kernel trusts its own file sizes and times
//! over the HOST's, so a file the HOST appends to would keep its old size on the DPU.
//!
//! # Directory operations (asynchronous, `-o wsync` to turn off)
//! In the manner of CephFS's `nowsync`: in a directory this mount made (it knows everything in
//! it; `Inner::foreign_change` ends that when something else changes it, and so does any
//! failure or an EEXIST there), create, mkdir, symlink, unlink and setattr are answered to the
//! kernel at once and queued to the HOST in order behind everything sent before. The kernel
//! gets the inode number and attributes the node will have (the caller's ownership, the exact
//! mode, the parent's setgid group; the parent's times now) and the new node is named on the
//! wire by an id this mount chose, which the HOST maps per session ("Client-chosen ids" in
//! [`crate::proto`]): writes, setattrs, lookups of children, release and forget that follow
//! are sent behind the create without waiting for it. When the HOST answers, its own id joins
//! the inode, so later lookups and listings give the kernel the same inode number. Writes
//! carry a file's known size and times forward instead of asking again, so `tar`'s utimes and
//! chmod after the data stay asynchronous.
//!
//! A failure is remembered on the node made or changed and on its directory, and reported like
//! a write-behind failure: by `close` (flush waits for the file's operations in flight) and
//! `fsync` of the file, by the next opendir (a listing) or fsync of the directory, and logged
//! at unmount, which delivers what is still in flight; the directory is synchronous after it.
//! After a lost session or HOST restart, operations not answered are done again under the
//! HOST's ids (a create without `O_EXCL`/`O_TRUNC`, a mkdir or symlink that finds its name
//! made, an unlink that finds it gone, take it as done) before anything re-resolves their
//! nodes by name. Rename, rmdir, link and mknod stay synchronous. `-o sync` turns this off
//! with write-behind; `-o wsync` (or `nowsync=0`) turns off only this.
//!
//! # Attributes the HOST just sent (NFS's post-op attributes)
//! The kernel drops its cached attributes after many of its own operations — a directory's
//! after every create in it, a file's before a `chown` (to recheck setuid bits) — and asks
//! again, a round trip each: two per file when a tree is unpacked. Every inode here remembers
//! the attributes last received from the HOST and when the request was sent; a GETATTR is
//! answered from them while they are younger than the attribute TTL and nothing this mount did
//! since changed the node without the HOST saying how (a write, a truncating open, an xattr
//! change; any unlink, rmdir or rename, which change link counts the HOST does not report).
//! Creates, mkdir, mknod, symlink and link return the directory's attributes after the
//! operation for this. HOST-side changes thus show up after the same bound as the kernel's own
//! attribute cache; proc/sys mounts (TTL 0) never reuse anything.
//!
//! `negative_timeout=S` goes further for directories this mount made: for S seconds, names it
//! did not make there are answered "absent" without asking (no lookup per file when
//! unpacking). Without the change feed (below) it is off by default, because a HOST process
//! creating a file in such a directory (a shim's pid file in the bundle directory containerd
//! made) would stay invisible that long; with the feed it lasts `coherent_ttl` and a HOST-side
//! create there ends it.
//!
//! # Coherent caching (the HOST's change feed)
//! Each mount subscribes to the HOST's change feed ([`crate::notify`]; `coherence` here): the
//! HOST watches the directories the mount holds (fanotify) and reports changes it did not make
//! for this mount; the DPU turns them into FUSE invalidations within milliseconds. While the
//! feed is up, attributes, entries, negative entries and file pages are cached for
//! `coherent_ttl` (60 s); without it (an unprivileged HOST daemon, a directory on a filesystem
//! the HOST cannot watch such as overlayfs, the feed lost) the short TTLs apply, and losing the
//! feed drops everything cached. What the feed does not promise: ordering against other
//! channels — a HOST process that changes a file and then tells a DPU process over a bridged
//! socket may be faster than the invalidation (a few milliseconds); and a file changed through
//! a hard link in a directory no DPU holds is not reported.
//!
//! # Pseudo filesystems (`proc`, `sys`)
//! Zero attribute/entry TTLs and direct I/O on every open, so files that report size 0 are read
//! to EOF and nothing is cached. With `proc`, the caller's own processes are the DPU's and
//! everything else the HOST's: `self`, `thread-self` and `/proc/<n>` for the caller's own
//! tgid and thread ids are generated here from the FUSE request's pid (the entries link into
//! `local_proc`), and their `mountinfo`/`mounts` show the HOST's cgroup mounts where the
//! caller reaches them through qtfs; the `procview` module has the rule.
//!
//! # FIFOs
//! HOST FIFOs are FIFOs on the DPU too (`stat` says S_IFIFO; `mkfifo` through the mount makes
//! a real FIFO on the HOST). The DPU kernel opens such a node itself — a local pipe per inode,
//! no FUSE OPEN, pollable, interruptible by `close` like any pipe — and a tunnel per FIFO
//! between this daemon and the HOST's joins that pipe with the HOST's ([`crate::fifo`] explains
//! the protocol). FIFO entries and attributes have a TTL of 0, so each path walk (LOOKUP) and
//! each open (its permission check: GETATTR) reaches this daemon: that arms the FIFO's tunnel
//! or makes it probe at once. The daemon's own opens go through one thread
//! ([`crate::fifo::Opener`]) whose requests are not taken as such hints. FIFOs that `ctr`
//! creates in DPU-local directories for container stdio are bridged by shim-bridge, not here.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info, warn};
use transport::sync::lock;
use transport::{CallError, Session};

use crate::fifo;
use crate::procview::{self, is_syn_fh, is_syn_ino, ProcView, SynNode};
mod async_ops;
mod attr_cache;
mod coherence;
mod fifos;
mod fuse;
mod inodes;
mod proc;
mod rpc;
#[cfg(test)]
mod tests;
mod write_behind;

use fifos::Fifos;
use fuse::*;
use rpc::decode_reply;
use write_behind::{reply_write, Unstable, WriteStart, WB_BUDGET_KIB};

use crate::proto::{
    self, op, Attr, Caller, DataIn, DataOut, DirEntry, EncodedArgs, Entry, Fh, NodeId, Operation,
    SetTime, Status, Ts,
};

/// Setting this extended attribute on a directory of a qtfs mount (root only, any value) tells
/// the mount that the directory's contents changed on the HOST in a way no change report
/// covers — a mount forwarded onto it (`offload run` does this after each one): the mount
/// drops what it assumed about the directory before the call returns.
pub const REFRESH_XATTR: &str = "trusted.qtfs.refresh";

/// Options of one mount (from `mount -o ...`).
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// HOST path (inside an export) to mount.
    pub source: String,
    /// procfs mode: the caller's own `self`, `thread-self`, `/proc/<own pid>` from
    /// `local_proc` (see the module docs), no caching, direct I/O.
    pub proc_fs: bool,
    /// sysfs/cgroupfs mode: no caching, direct I/O.
    pub sys_fs: bool,
    /// Read-only mount.
    pub read_only: bool,
    /// Where the DPU's own procfs is mounted (as seen by the processes using this mount).
    pub local_proc: PathBuf,
    /// Attribute cache TTL (ignored for proc/sys: zero).
    pub attr_timeout: Duration,
    /// Entry (name) cache TTL (ignored for proc/sys: zero).
    pub entry_timeout: Duration,
    /// How long a directory this mount made is known to hold only what the mount made in it
    /// (libfuse's `negative_timeout`, scoped to new directories). Zero (the default) turns it
    /// off: a HOST process creating a file there would stay invisible this long.
    pub negative_timeout: Duration,
    /// How long an operation waits for the HOST during an outage before failing with EIO.
    pub timeout: Duration,
    /// Wait forever for the HOST instead of failing (`hard`).
    pub hard: bool,
    /// Let other users than the mounting one use the mount.
    pub allow_other: bool,
    /// Kernel write-back caching (off by default: HOST-side writers must stay visible).
    pub writeback_cache: bool,
    /// fuser event-loop threads.
    pub threads: usize,
    /// Acknowledge writes once they are queued to the HOST, in order, instead of once the HOST
    /// answered (NFS-style write-behind: errors surface at `close`/`fsync`). Off with `-o sync`.
    pub write_behind: bool,
    /// Kernel readahead in KiB for this mount (0: the kernel's default, 128).
    pub readahead_kb: u32,
    /// Asynchronous directory operations (CephFS's `nowsync`, see the module docs): creates,
    /// mkdirs, symlinks, unlinks and setattrs in directories this mount made are answered at
    /// once and sent in order; errors surface at close/fsync/listing. Off with `-o sync` or
    /// `-o wsync`.
    pub async_dirops: bool,
    /// Cache lifetime of attributes, entries (also negative ones) and pages while the HOST
    /// pushes its changes (see `coherence`); zero turns the change feed off, and then
    /// `attr_timeout`/`entry_timeout` apply throughout.
    pub coherent_ttl: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            source: "/".into(),
            proc_fs: false,
            sys_fs: false,
            read_only: false,
            local_proc: PathBuf::from("/local_proc"),
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            negative_timeout: Duration::ZERO,
            timeout: Duration::from_secs(30),
            hard: false,
            allow_other: false,
            writeback_cache: false,
            threads: 4,
            write_behind: true,
            readahead_kb: 4096,
            async_dirops: true,
            coherent_ttl: Duration::from_secs(60),
        }
    }
}

impl MountOptions {
    fn pseudo(&self) -> bool {
        self.proc_fs || self.sys_fs
    }
}

/// Why a mount could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HOST could not be reached or the handshake failed (wrong key, not an offloadd).
    #[error("cannot reach the HOST fs service: {0}")]
    Connect(#[from] transport::SessionError),
    /// The HOST refused the mount source.
    #[error("HOST refused {source_path}: {message}")]
    Refused {
        /// The requested source.
        source_path: String,
        /// The HOST's explanation.
        message: String,
    },
    /// A call failed at the session level.
    #[error("fs call failed: {0}")]
    Call(#[from] CallError),
    /// The reply could not be decoded.
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    /// The reply made no sense for the request.
    #[error("unexpected reply from the HOST fs service")]
    Unexpected,
}

const ROOT: u64 = 1;
const SELF_INO: u64 = u64::MAX - 1;
const THREAD_SELF_INO: u64 = u64::MAX - 2;

/// Why an operation of this mount failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpError {
    /// The HOST (or this client, for what it knows itself) answered with this errno.
    Errno(i32),
    /// The node and handle ids are from another server instance (the HOST daemon restarted,
    /// or released this mount's nodes when its previous session ended): mount again and
    /// re-resolve.
    Stale,
    /// The HOST stayed unreachable past the mount's timeout.
    Unreachable,
    /// The HOST's reply made no sense for the request (a peer bug or version mismatch).
    Protocol,
}

impl OpError {
    /// The errno an application sees.
    pub fn errno(self) -> i32 {
        match self {
            OpError::Errno(e) if e > 0 => e,
            _ => libc::EIO,
        }
    }
}

impl From<i32> for OpError {
    fn from(e: i32) -> OpError {
        OpError::Errno(e)
    }
}

type R<T> = Result<T, OpError>;

struct Inode {
    kernel_lookups: u64,
    parent: u64,
    name: Vec<u8>,
    node: NodeId,
    epoch: u64,
    server_lookups: u64,
    /// A FIFO (TTL 0; its lookups and getattrs arm or kick its tunnel).
    fifo: bool,
    /// The attributes last received from the HOST (and handed to the kernel), when, and the
    /// mount's change sequence when the request was sent (see [`Inner::fresh_attr`]).
    attr: Option<(Attr, Instant, u64)>,
    /// The change sequence when an operation last changed this node without the HOST saying
    /// how (a write, a truncating open, an xattr change).
    stale_at: u64,
    /// The HOST's own id of a node made asynchronously, once it answered (`node` is then the
    /// alias this mount chose, see `async_ops`): its later lookups find this inode.
    real: Option<NodeId>,
    /// `attr` was worked out here (an asynchronous operation's effect), not sent by the HOST:
    /// the kernel gets it with TTL 0 and only while an operation on the node is in flight.
    local: bool,
    /// Asynchronous operations in flight that name this inode (the node they made, or the
    /// directory they change): it stays in the table, for their replay after a HOST restart,
    /// when the kernel forgets it first.
    pins: u32,
}

/// A directory this mount created: empty on the HOST at `made`, and since then holding only
/// `names` as far as this mount knows. With `negative_timeout`, lookups of other names are
/// answered "no such entry" here until it runs out, without a round trip per file when a tree
/// is unpacked into new directories. Off by default: a HOST process creating a file there
/// (a shim writing its pid file into a bundle directory containerd made) must be seen.
struct NewDir {
    made: Instant,
    names: HashSet<Vec<u8>>,
}

/// A new directory stops being tracked past this many names.
const NEW_DIR_MAX_NAMES: usize = 4096;

struct Handle {
    ino: u64,
    flags: i32,
    dir: bool,
    fh: Fh,
    epoch: u64,
    /// `O_APPEND` handles: where the file ended after the last append through this handle
    /// (the HOST's answer), what a resend of the next one names (`op::Append`).
    append_end: Option<u64>,
    /// The inode's write-failure count this handle has been told of ([`Unstable`]): a failure
    /// is reported through each open file (at `close`, again at every `close` until an
    /// `fsync` or a write takes it), never to another open of the file.
    err_seen: u64,
}

struct State {
    instance: u64,
    epoch: u64,
    inodes: HashMap<u64, Inode>,
    by_node: HashMap<NodeId, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Directories made by this mount within `negative_timeout` (see [`NewDir`]).
    new_dirs: HashMap<u64, NewDir>,
    /// Directories this mount made and knows everything in (no foreign change reported):
    /// operations there may be asynchronous (`async_ops`).
    excl: HashSet<u64>,
    /// Last client-chosen id handed out (see [`proto::ALIAS_BIT`]).
    next_alias: u64,
    /// Counts changes this mount made whose effect on attributes the HOST did not report.
    seq: u64,
    /// `seq` at the last unlink, rmdir or rename: they change link counts and ctimes of inodes
    /// the HOST does not name in its reply, so no attributes asked for before are reused.
    removal_at: u64,
    /// Acknowledged writes being sent again (after a lost session or a short write): until
    /// they land, no reply says whether it saw them, so no attributes are reused.
    resending: u32,
    /// `seq` when the last HOST-side change arrived (see `coherence`).
    feed_at: u64,
    /// (parent, name) → inode: resolves the names the change feed reports.
    names: HashMap<(u64, Vec<u8>), u64>,
}

struct Inner {
    client: transport::Client,
    opts: MountOptions,
    state: Mutex<State>,
    remount_lock: tokio::sync::Mutex<()>,
    rt: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
    /// (inode, xattr name) known absent until the instant: `ls -l` probes ACL xattrs of every
    /// file, and the answer is almost always ENODATA. Same staleness bound as attributes.
    no_xattr: Mutex<HashMap<(u64, Vec<u8>), Instant>>,
    /// Inodes with acknowledged writes or asynchronous directory operations the HOST has not
    /// answered yet (and their first failure not reported yet).
    unstable: Mutex<HashMap<u64, Arc<Unstable>>>,
    /// Inodes whose asynchronous creation is not answered yet: re-resolving one by name after
    /// a HOST restart waits until its creation was replayed.
    creating: Mutex<HashMap<u64, Arc<Unstable>>>,
    /// Bytes of acknowledged writes in flight, in KiB permits: bounds the memory write-behind
    /// holds and makes writers wait when the HOST falls behind.
    wb_budget: Arc<tokio::sync::Semaphore>,
    /// FIFO tunnels of this mount.
    fifos: Fifos,
    /// proc mode's own-process view (`None` unless `proc`).
    proc_view: Option<ProcView>,
    /// The HOST's change feed (see `coherence`).
    feed: coherence::Feed,
}

/// The FUSE filesystem. Build with [`QtfsFs::connect`], then mount with fuser.
pub struct QtfsFs {
    inner: Arc<Inner>,
}

impl QtfsFs {
    /// Dials the HOST and mounts `opts.source` there (checking that it is exported), before
    /// anything is mounted locally so that errors reach the user.
    pub async fn connect(
        client: transport::Client,
        opts: MountOptions,
    ) -> Result<QtfsFs, ClientError> {
        let session = client.session().await?;
        let mount = op::Mount {
            version: proto::VERSION,
            path: opts.source.clone(),
        };
        let req = proto::encode_request(0, &mount, &[])?;
        let reply = match session.call("fs", Bytes::from(req)).await {
            Ok(r) => r,
            Err(CallError::Remote(e)) => {
                return Err(ClientError::Refused {
                    source_path: opts.source.clone(),
                    message: e.message,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let refused = |message: String| ClientError::Refused {
            source_path: opts.source.clone(),
            message,
        };
        let (instance, root) = match proto::decode_reply::<<op::Mount as Operation>::Reply>(&reply)?
        {
            Ok((Ok(m), _)) => (m.instance, m.root),
            Ok((Err(r), _)) => return Err(refused(r.message)),
            Err(_) => return Err(ClientError::Unexpected),
        };
        if !matches!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR) {
            return Err(ClientError::Refused {
                source_path: opts.source.clone(),
                message: "not a directory".into(),
            });
        }
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                kernel_lookups: 1,
                parent: ROOT,
                name: Vec::new(),
                node: root.node,
                epoch: 1,
                server_lookups: 1,
                fifo: false,
                attr: None,
                stale_at: 0,
                real: None,
                local: false,
                pins: 0,
            },
        );
        let mut by_node = HashMap::new();
        by_node.insert(root.node, ROOT);
        info!(source = %opts.source, endpoint = %client.endpoint(), "qtfs connected");
        Ok(QtfsFs {
            inner: Arc::new(Inner {
                client,
                state: Mutex::new(State {
                    instance,
                    epoch: 1,
                    inodes,
                    by_node,
                    next_ino: 2,
                    handles: HashMap::new(),
                    next_fh: 1,
                    new_dirs: HashMap::new(),
                    excl: HashSet::new(),
                    next_alias: 0,
                    seq: 0,
                    removal_at: 0,
                    resending: 0,
                    feed_at: 0,
                    names: HashMap::new(),
                }),
                remount_lock: tokio::sync::Mutex::new(()),
                rt: tokio::runtime::Handle::current(),
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                no_xattr: Mutex::new(HashMap::new()),
                unstable: Mutex::new(HashMap::new()),
                creating: Mutex::new(HashMap::new()),
                wb_budget: Arc::new(tokio::sync::Semaphore::new(WB_BUDGET_KIB)),
                fifos: Fifos::default(),
                proc_view: opts.proc_fs.then(|| ProcView::new(opts.local_proc.clone())),
                feed: coherence::Feed::default(),
                opts,
            }),
        })
    }

    /// fuser configuration for this mount (threads, ACL, kernel options).
    pub fn fuser_config(&self) -> fuser::Config {
        let o = &self.inner.opts;
        let mut cfg = fuser::Config::default();
        let mut mo = vec![
            fuser::MountOption::FSName(format!("qtfs:{}", o.source)),
            fuser::MountOption::Subtype("qtfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        if o.read_only {
            mo.push(fuser::MountOption::RO);
        }
        // Device nodes and setuid binaries on the HOST stay inert on the DPU unless asked for.
        mo.push(fuser::MountOption::NoDev);
        mo.push(fuser::MountOption::NoSuid);
        cfg.mount_options = mo;
        cfg.acl = if o.allow_other {
            fuser::SessionACL::All
        } else {
            fuser::SessionACL::Owner
        };
        cfg.n_threads = Some(o.threads.max(1));
        cfg.clone_fd = true;
        cfg
    }
}

impl Inner {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn ttl(&self) -> Duration {
        if self.opts.pseudo() {
            Duration::ZERO
        } else {
            self.opts.attr_timeout
        }
    }

    fn entry_ttl(&self) -> Duration {
        if self.opts.pseudo() {
            Duration::ZERO
        } else {
            self.opts.entry_timeout
        }
    }

    fn negative_ttl(&self) -> Duration {
        if self.opts.pseudo() {
            Duration::ZERO
        } else {
            self.opts.negative_timeout
        }
    }
}

impl QtfsFs {
    /// The uid/gid that mounted (informational).
    pub fn owner(&self) -> (u32, u32) {
        (self.inner.uid, self.inner.gid)
    }
}

/// A live FUSE mount; [`Mounted::run`] serves it until it is unmounted (`umount DST`).
pub struct Mounted(fuser::Session<QtfsFs>);

impl Mounted {
    /// Serves kernel requests until the filesystem is unmounted.
    pub fn run(self) -> std::io::Result<()> {
        self.0.run()
    }
}

impl QtfsFs {
    /// Mounts this filesystem at `mountpoint` (the mount syscall directly when root, else
    /// fusermount3); the mount is live when this returns.
    pub fn mount(self, mountpoint: &Path) -> std::io::Result<Mounted> {
        let cfg = self.fuser_config();
        // Resolved now: afterwards resolving it would ask this not yet serving mount. FIFO
        // tunnels open FIFOs through it.
        let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        let _ = self.inner.fifos.mountpoint.set(mp);
        let inner = self.inner.clone();
        let session = fuser::Session::new(self, mountpoint, &cfg)?;
        inner.start_feed(session.notifier());
        inner.wait_feed(Duration::from_secs(2));
        Ok(Mounted(session))
    }
}
