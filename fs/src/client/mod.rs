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
//! (`writeback_cache`) stays off: HOST-side writers must stay visible.
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
//! `negative_timeout=S` (off by default) goes further for directories this mount made: for S
//! seconds, names it did not make there are answered ENOENT without asking (no lookup per file
//! when unpacking). Off by default because a HOST process creating a file in such a directory
//! (a shim's pid file in the bundle directory containerd made) would stay invisible that long.
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
use crate::proto::{
    self, op, Attr, Caller, DataIn, DataOut, DirEntry, EncodedArgs, Entry, Fh, NodeId, Operation,
    SetTime, Status, Ts,
};

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
    /// Counts changes this mount made whose effect on attributes the HOST did not report.
    seq: u64,
    /// `seq` at the last unlink, rmdir or rename: they change link counts and ctimes of inodes
    /// the HOST does not name in its reply, so no attributes asked for before are reused.
    removal_at: u64,
    /// Acknowledged writes being sent again (after a lost session or a short write): until
    /// they land, no reply says whether it saw them, so no attributes are reused.
    resending: u32,
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
    /// Inodes with acknowledged writes the HOST has not answered yet.
    unstable: Mutex<HashMap<u64, Arc<Unstable>>>,
    /// Bytes of acknowledged writes in flight, in KiB permits: bounds the memory write-behind
    /// holds and makes writers wait when the HOST falls behind.
    wb_budget: Arc<tokio::sync::Semaphore>,
    /// FIFO tunnels of this mount.
    fifos: Fifos,
    /// proc mode's own-process view (`None` unless `proc`).
    proc_view: Option<ProcView>,
}

/// Most FIFO tunnels armed at once per mount (each is one stream of the session).
const MAX_TUNNELS: usize = 1024;

/// The FIFO tunnels of one mount (see [`crate::fifo`]).
#[derive(Default)]
struct Fifos {
    /// Where this mount is, as this process sees it (set by [`QtfsFs::mount`]).
    mountpoint: std::sync::OnceLock<PathBuf>,
    /// Runs this daemon's opens of FIFOs through the mount; started with the first tunnel.
    opener: std::sync::OnceLock<Option<Arc<fifo::Opener>>>,
    /// Armed tunnels by inode.
    armed: Mutex<HashMap<u64, Arc<fifo::Control>>>,
}

impl Fifos {
    fn armed(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<fifo::Control>>> {
        match self.armed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// True for a request made by this daemon's own opener thread.
    fn own(&self, pid: u32) -> bool {
        matches!(self.opener.get(), Some(Some(o)) if o.tid() == pid)
    }

    fn opener(&self) -> Option<Arc<fifo::Opener>> {
        let mp = self.mountpoint.get()?.clone();
        self.opener
            .get_or_init(|| match fifo::Opener::start(mp) {
                Ok(o) => Some(Arc::new(o)),
                Err(e) => {
                    warn!(error = %e, "cannot start the FIFO opener thread; FIFOs stay local");
                    None
                }
            })
            .clone()
    }
}

/// Write-behind budget of one mount.
const WB_BUDGET_KIB: usize = 32 * 1024;

/// Budget permits (KiB) an acknowledged write of `n` bytes holds while in flight.
fn wb_kib(n: u32) -> u32 {
    (n as usize).div_ceil(1024).clamp(1, WB_BUDGET_KIB) as u32
}

/// Acknowledged writes of one inode still on their way to the HOST.
#[derive(Default)]
struct Unstable {
    /// (writes in flight, first failure not yet reported to the application)
    state: Mutex<(usize, Option<OpError>)>,
    idle: tokio::sync::Notify,
}

impl Unstable {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<OpError>)> {
        lock(&self.state)
    }

    fn finish(&self, res: R<()>) {
        let mut st = self.lock();
        st.0 -= 1;
        if let Err(e) = res {
            st.1.get_or_insert(e);
        }
        if st.0 == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no write is in flight, then hands out (and clears) a pending failure.
    async fn settle(&self) -> R<()> {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut st = self.lock();
                if st.0 == 0 {
                    return st.1.take().map_or(Ok(()), Err);
                }
            }
            idle.await;
        }
    }
}

/// The FUSE filesystem. Build with [`QtfsFs::connect`], then mount with fuser.
pub struct QtfsFs {
    inner: Arc<Inner>,
}

fn ts_to_system(t: Ts) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

fn system_to_ts(t: SystemTime) -> Ts {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Ts {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Ts { sec, nsec }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(system_to_ts(t)),
    })
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn is_fifo(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFIFO
}

fn fuse_attr(ino: u64, a: &Attr) -> FileAttr {
    let fifo = is_fifo(a.mode);
    FileAttr {
        ino: INodeNo(ino),
        size: if fifo { 0 } else { a.size },
        blocks: a.blocks,
        atime: ts_to_system(a.atime),
        mtime: ts_to_system(a.mtime),
        ctime: ts_to_system(a.ctime),
        crtime: ts_to_system(a.ctime),
        kind: kind_of(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: if a.blksize == 0 { 4096 } else { a.blksize },
        flags: 0,
    }
}

/// The errno of a failure (an [`OpError`], or a plain errno of the local proc view) for the
/// kernel.
fn errno(e: impl Into<OpError>) -> Errno {
    Errno::from_i32(e.into().errno())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
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
                    seq: 0,
                    removal_at: 0,
                    resending: 0,
                }),
                remount_lock: tokio::sync::Mutex::new(()),
                rt: tokio::runtime::Handle::current(),
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                no_xattr: Mutex::new(HashMap::new()),
                unstable: Mutex::new(HashMap::new()),
                wb_budget: Arc::new(tokio::sync::Semaphore::new(WB_BUDGET_KIB)),
                fifos: Fifos::default(),
                proc_view: opts.proc_fs.then(|| ProcView::new(opts.local_proc.clone())),
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
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn ttl(&self) -> Duration {
        if self.opts.pseudo() {
            Duration::ZERO
        } else {
            self.opts.attr_timeout
        }
    }

    /// The attribute TTL for a node: zero for FIFOs, so every open of one asks (a hint).
    fn ttl_for(&self, a: &Attr) -> Duration {
        if is_fifo(a.mode) {
            Duration::ZERO
        } else {
            self.ttl()
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

    /// One operation on the HOST with the current instance, retrying across session loss
    /// until the mount's timeout (or forever for `hard`): the typed client stub of every
    /// operation without payloads. [`OpError::Stale`] on an instance change.
    async fn call<O: Operation>(&self, op: O) -> R<O::Reply> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, &[]).await?;
        Ok(decode_reply::<O::Reply>(&reply)?.0)
    }

    /// [`Inner::call`] for an operation whose reply carries a payload (a slice of the
    /// received frame: read data is used where it lies).
    async fn call_data<O: DataOut>(&self, op: O) -> R<(O::Reply, Bytes)> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, &[]).await?;
        decode_reply::<O::Reply>(&reply)
    }

    /// [`Inner::call`] for an operation whose request carries a payload.
    async fn call_with<O: DataIn>(&self, op: O, payload: &[u8]) -> R<O::Reply> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, payload).await?;
        Ok(decode_reply::<O::Reply>(&reply)?.0)
    }

    /// Sends encoded arguments and a payload; the reply as received.
    async fn send(&self, args: &EncodedArgs, payload: &[u8]) -> R<Bytes> {
        let instance = self.st().instance;
        let body = args
            .request(instance, payload)
            .map_err(|_| OpError::Protocol)?;
        let body = Bytes::from(body);
        let start = Instant::now();
        let deadline = if self.opts.hard {
            None
        } else {
            Some(self.opts.timeout)
        };
        loop {
            let remaining = deadline.map(|d| d.saturating_sub(start.elapsed()));
            if remaining == Some(Duration::ZERO) {
                return Err(OpError::Unreachable);
            }
            let session = match self
                .client
                .session_retry(Duration::from_millis(100), remaining)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "HOST unreachable");
                    return Err(OpError::Unreachable);
                }
            };
            match session.call("fs", body.clone()).await {
                Ok(reply) => return Ok(reply),
                // The request itself was refused (a protocol mismatch).
                Err(CallError::Remote(e)) => return Err(OpError::Errno(e.code)),
                Err(CallError::Closed(reason)) => {
                    debug!(%reason, "session lost; redialing");
                    self.client.invalidate().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(CallError::Busy) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    warn!(error = %e, "fs call failed");
                    return Err(OpError::Unreachable);
                }
            }
        }
    }

    /// The HOST node of `ino`, the server instance and the live session, when all are at hand
    /// without waiting (the common case): the request can then leave from the FUSE thread.
    fn ready(&self, ino: u64) -> Option<(NodeId, u64, Session)> {
        let session = self.client.current()?;
        let st = self.st();
        let n = st.inodes.get(&ino)?;
        (n.epoch == st.epoch).then_some((n.node, st.instance, session))
    }

    /// The HOST handle of open handle `fh` when it is current: `Some(None)` for an unknown
    /// handle (the call goes without one, as on the async path), `None` when it must first be
    /// re-opened after a HOST restart.
    fn fh_ready(&self, fh: Option<u64>) -> Option<Option<Fh>> {
        let Some(fh) = fh else { return Some(None) };
        let st = self.st();
        match st.handles.get(&fh) {
            Some(h) if h.epoch == st.epoch => Some(Some(h.fh)),
            Some(_) => None,
            None => Some(None),
        }
    }

    /// Sends `op` from the calling thread (see [`transport::Session::call_then`]) and gives
    /// `done` the outcome where it arrives. `None`: the session was lost or the HOST restarted;
    /// the caller then takes the async path, which waits, re-resolves and retries.
    fn call_then<O: Operation>(
        &self,
        session: &Session,
        instance: u64,
        op: O,
        done: impl FnOnce(Option<R<O::Reply>>) + Send + 'static,
    ) {
        let Ok(body) = proto::encode_request(instance, &op, &[]) else {
            return done(Some(Err(OpError::Protocol)));
        };
        session.call_then("fs", Bytes::from(body), move |res| {
            done(match res {
                Ok(b) => match decode_reply::<O::Reply>(&b) {
                    Err(OpError::Stale) => None,
                    r => Some(r.map(|(v, _)| v)),
                },
                Err(CallError::Remote(e)) => Some(Err(OpError::Errno(e.code))),
                Err(_) => None,
            })
        });
    }

    /// Sends `build(node, handle)` for inode `ino` (and open handle `fh`): from this FUSE
    /// thread when the node, the handle and the session are at hand, else (or after a lost
    /// session) on the runtime, which waits out outages and re-resolves after a HOST restart.
    /// The one place the fast/slow choice is made; `done` gets the outcome either way.
    fn request<O, B, D>(self: &Arc<Self>, ino: u64, fh: Option<u64>, build: B, done: D)
    where
        O: Operation,
        B: Fn(NodeId, Option<Fh>) -> O + Send + Sync + 'static,
        D: FnOnce(&Arc<Inner>, R<O::Reply>) + Send + 'static,
    {
        let fast = match (self.ready(ino), self.fh_ready(fh)) {
            (Some((node, instance, session)), Some(sfh)) => {
                Some((build(node, sfh), instance, session))
            }
            _ => None,
        };
        let slow = move |me: Arc<Inner>, done: D| {
            me.rt.clone().spawn(async move {
                let res = me
                    .with(|| async {
                        let node = me.node_of(ino).await?;
                        let sfh = match fh {
                            Some(h) => me.fh_of(h).await.ok(),
                            None => None,
                        };
                        me.call(build(node, sfh)).await
                    })
                    .await;
                done(&me, res);
            });
        };
        let me = self.clone();
        match fast {
            Some((op, instance, session)) => {
                self.call_then(&session, instance, op, move |r| match r {
                    Some(r) => done(&me, r),
                    None => slow(me, done),
                })
            }
            None => slow(me, done),
        }
    }

    /// Mounts the source again on a restarted server and starts a new epoch.
    async fn remount(&self, seen_epoch: u64) -> R<()> {
        let _g = self.remount_lock.lock().await;
        if self.st().epoch != seen_epoch {
            return Ok(());
        }
        let mounted = self
            .call(op::Mount {
                version: proto::VERSION,
                path: self.opts.source.clone(),
            })
            .await?;
        let Ok(proto::Mounted { instance, root, .. }) = mounted else {
            return Err(OpError::Errno(libc::EIO));
        };
        let mut st = self.st();
        st.instance = instance;
        st.epoch += 1;
        let epoch = st.epoch;
        st.by_node.clear();
        st.by_node.insert(root.node, ROOT);
        if let Some(r) = st.inodes.get_mut(&ROOT) {
            r.node = root.node;
            r.epoch = epoch;
            r.server_lookups = 1;
        }
        info!(epoch, "HOST fs service restarted; re-resolving inodes");
        Ok(())
    }

    /// Runs `f`, re-mounting and retrying when the server instance changed underneath.
    async fn with<T, F, Fut>(self: &Arc<Self>, f: F) -> R<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = R<T>>,
    {
        for _ in 0..4 {
            let epoch = self.st().epoch;
            match f().await {
                Err(OpError::Stale) => self.remount(epoch).await?,
                other => return other,
            }
        }
        Err(OpError::Errno(libc::EIO))
    }

    /// The current server node of an inode, re-resolving it by name after a restart.
    fn node_of<'a>(
        self: &'a Arc<Self>,
        ino: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = R<NodeId>> + Send + 'a>> {
        Box::pin(async move {
            let (parent, name) = {
                let st = self.st();
                let n = st.inodes.get(&ino).ok_or(libc::ESTALE)?;
                if n.epoch == st.epoch {
                    return Ok(n.node);
                }
                if ino == ROOT {
                    return Err(OpError::Stale);
                }
                (n.parent, n.name.clone())
            };
            let pnode = self.node_of(parent).await?;
            let e = self
                .call(op::Lookup {
                    parent: pnode,
                    name,
                })
                .await?;
            let mut st = self.st();
            let epoch = st.epoch;
            if let Some(n) = st.inodes.get_mut(&ino) {
                if n.epoch != epoch {
                    n.node = e.node;
                    n.epoch = epoch;
                    n.server_lookups = 1;
                } else {
                    n.server_lookups += 1;
                }
            }
            st.by_node.insert(e.node, ino);
            Ok(e.node)
        })
    }

    /// The current server handle of an open file, re-opening it after a restart.
    async fn fh_of(self: &Arc<Self>, fh: u64) -> R<Fh> {
        let (ino, flags, dir) = {
            let st = self.st();
            let h = st.handles.get(&fh).ok_or(libc::EBADF)?;
            if h.epoch == st.epoch {
                return Ok(h.fh);
            }
            (h.ino, h.flags, h.dir)
        };
        let node = self.node_of(ino).await?;
        let opened = if dir {
            self.call(op::OpenDir { node }).await?
        } else {
            let flags = flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
            self.call(op::Open { node, flags }).await?
        };
        let sfh = opened.fh;
        let mut st = self.st();
        let epoch = st.epoch;
        if let Some(h) = st.handles.get_mut(&fh) {
            h.fh = sfh;
            h.epoch = epoch;
        }
        debug!(fh, "re-opened handle after HOST restart");
        Ok(sfh)
    }

    /// Records an entry the server returned for `parent/name`: one kernel lookup reference.
    /// `sent`: [`Inner::attr_seq`] before the request went out.
    fn add_entry(&self, parent: u64, name: &[u8], e: &Entry, sent: u64) -> u64 {
        let mut st = self.st();
        let epoch = st.epoch;
        if let Some(&ino) = st.by_node.get(&e.node) {
            if let Some(n) = st.inodes.get_mut(&ino) {
                n.kernel_lookups += 1;
                n.server_lookups += 1;
                if ino != ROOT {
                    n.parent = parent;
                    n.name = name.to_vec();
                }
                n.fifo = is_fifo(e.attr.mode);
                n.attr = Some((e.attr, Instant::now(), sent));
                drop(st);
                self.note_xattrs(ino, &e.attr);
                return ino;
            }
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(
            ino,
            Inode {
                kernel_lookups: 1,
                parent,
                name: name.to_vec(),
                node: e.node,
                epoch,
                server_lookups: 1,
                fifo: is_fifo(e.attr.mode),
                attr: Some((e.attr, Instant::now(), sent)),
                stale_at: 0,
            },
        );
        st.by_node.insert(e.node, ino);
        drop(st);
        self.note_xattrs(ino, &e.attr);
        ino
    }

    /// Drops `n` kernel references; forgets the server node when none remain.
    fn forget(self: &Arc<Self>, ino: u64, n: u64) {
        if ino == ROOT || is_syn_ino(ino) {
            return;
        }
        let release = {
            let mut st = self.st();
            let epoch = st.epoch;
            let gone = match st.inodes.get_mut(&ino) {
                Some(i) => {
                    i.kernel_lookups = i.kernel_lookups.saturating_sub(n);
                    i.kernel_lookups == 0
                }
                None => false,
            };
            if !gone {
                return;
            }
            if let Some(c) = self.fifos.armed().get(&ino) {
                c.stop();
            }
            match st.inodes.remove(&ino) {
                Some(i) if i.epoch == epoch => {
                    if st.by_node.get(&i.node) == Some(&ino) {
                        st.by_node.remove(&i.node);
                    }
                    Some((i.node, i.server_lookups))
                }
                _ => None,
            }
        };
        if let Some((node, count)) = release {
            let me = self.clone();
            self.rt.spawn(async move {
                // Best effort: a lost forget only keeps an O_PATH fd open on the HOST.
                let _ = me
                    .call(op::Forget {
                        nodes: vec![(node, count)],
                    })
                    .await;
            });
        }
    }

    fn xattr_known_absent(&self, ino: u64, name: &[u8]) -> bool {
        let cache = match self.no_xattr.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let fresh = |k: (u64, Vec<u8>)| cache.get(&k).is_some_and(|until| now < *until);
        fresh((ino, Vec::new())) || fresh((ino, name.to_vec()))
    }

    /// The change sequence now; taken before a request whose reply carries attributes.
    fn attr_seq(&self) -> u64 {
        self.st().seq
    }

    /// Records attributes just received from the HOST and handed to the kernel with the
    /// attribute TTL; `sent`: [`Inner::attr_seq`] before the request went out.
    fn note_attr(&self, ino: u64, a: &Attr, sent: u64) {
        if let Some(n) = self.st().inodes.get_mut(&ino) {
            n.attr = Some((*a, Instant::now(), sent));
        }
        self.note_xattrs(ino, a);
    }

    /// Marks the recorded attributes of `ino`: an operation changed them (size, times,
    /// link count) and the HOST did not say how.
    fn stale_attr(&self, ino: u64) {
        let mut st = self.st();
        st.seq += 1;
        let seq = st.seq;
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.stale_at = seq;
        }
    }

    /// Forgets every recorded attribute: after removals and renames, whose effect on other
    /// inodes (link counts, ctime) the HOST does not report.
    fn stale_all_attrs(&self) {
        let mut st = self.st();
        st.seq += 1;
        st.removal_at = st.seq;
    }

    /// Attributes the kernel may be given again without asking the HOST, with their remaining
    /// lifetime: received less than one attribute TTL ago, and nothing this mount did since has
    /// changed them. The kernel drops its own copy after every change it makes (a create in a
    /// directory, a write, a `chown`'s suid check right after a `utimes`), and re-reading
    /// attributes the HOST has just sent would cost a round trip each (two per file when a tree
    /// is unpacked). HOST-side changes show up after the same bound as the kernel's own cache.
    /// "Nothing since" is judged from when the request was sent, so a reply that overtook
    /// a change in this mount (a write acknowledged while a getattr was in flight) is not reused.
    ///
    /// Writes still in flight do not matter: the HOST applies calls in arrival order, so a
    /// reply to a request sent after a write has seen it.
    fn fresh_attr(&self, ino: u64) -> Option<(Attr, Duration)> {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return None;
        }
        let st = self.st();
        if st.resending > 0 {
            return None;
        }
        let n = st.inodes.get(&ino)?;
        let (a, at, sent) = n.attr?;
        if sent < n.stale_at || sent < st.removal_at {
            return None;
        }
        let left = ttl.checked_sub(at.elapsed())?;
        (!left.is_zero()).then_some((a, left))
    }

    fn begin_resend(&self) {
        self.st().resending += 1;
    }

    fn end_resend(&self, ino: u64) {
        self.st().resending -= 1;
        self.stale_attr(ino);
    }

    /// Records what an operation that made `dir/name` returned about `dir`.
    fn made_in(&self, dir: u64, name: &[u8], dir_attr: &Attr, sent: u64) {
        self.note_attr(dir, dir_attr, sent);
        self.note_new_name(dir, name);
    }

    /// Sends an operation that makes a name in directory `dir` (mkdir, mknod, symlink, link):
    /// the new entry and the directory's attributes after it.
    async fn make<O: Operation<Reply = proto::Made>>(&self, dir: u64, op: O) -> R<(Entry, Attr)> {
        let made = self.call(op).await.map_err(|e| self.make_failed(dir, e))?;
        Ok((made.entry, made.parent))
    }

    /// An operation making a name in `dir` failed with `e`: EEXIST means the directory holds
    /// a name this mount did not make, so it is no longer "known to hold only ours".
    fn make_failed(&self, dir: u64, e: OpError) -> OpError {
        if e == OpError::Errno(libc::EEXIST) {
            self.st().new_dirs.remove(&dir);
        }
        e
    }

    /// Starts tracking a directory this mount just made (see [`NewDir`]).
    fn note_new_dir(&self, ino: u64) {
        let ttl = self.negative_ttl();
        if ttl.is_zero() {
            return;
        }
        let mut st = self.st();
        if st.new_dirs.len() >= 1024 {
            st.new_dirs.retain(|_, d| d.made.elapsed() < ttl);
        }
        st.new_dirs.insert(
            ino,
            NewDir {
                made: Instant::now(),
                names: HashSet::new(),
            },
        );
    }

    /// Records that `name` now exists in `dir`, if `dir` is a tracked new directory.
    fn note_new_name(&self, dir: u64, name: &[u8]) {
        let mut st = self.st();
        let ttl = self.negative_ttl();
        let drop_it = match st.new_dirs.get_mut(&dir) {
            None => return,
            Some(d) if d.made.elapsed() >= ttl || d.names.len() >= NEW_DIR_MAX_NAMES => true,
            Some(d) => {
                d.names.insert(name.to_vec());
                false
            }
        };
        if drop_it {
            st.new_dirs.remove(&dir);
        }
    }

    /// True when `dir/name` is taken not to exist: `dir` was made by this mount less than
    /// `negative_timeout` ago and `name` was never made in it.
    fn known_absent(&self, dir: u64, name: &[u8]) -> bool {
        let mut st = self.st();
        let ttl = self.negative_ttl();
        let Some(d) = st.new_dirs.get(&dir) else {
            return false;
        };
        if d.made.elapsed() >= ttl {
            st.new_dirs.remove(&dir);
            return false;
        }
        !d.names.contains(name)
    }

    /// Records what fresh attributes say: an inode with no xattrs at all answers every xattr
    /// probe here for one attribute TTL (the empty name stands for all names).
    fn note_xattrs(&self, ino: u64, a: &Attr) {
        if a.xattrs {
            let mut cache = match self.no_xattr.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            cache.remove(&(ino, Vec::new()));
        } else {
            self.remember_no_xattr(ino, Vec::new());
        }
    }

    fn remember_no_xattr(&self, ino: u64, name: Vec<u8>) {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return;
        }
        let mut cache = match self.no_xattr.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if cache.len() > 65536 {
            let now = Instant::now();
            cache.retain(|_, until| *until > now);
            if cache.len() > 65536 {
                cache.clear();
            }
        }
        cache.insert((ino, name), Instant::now() + ttl);
    }

    fn forget_xattrs(&self, ino: u64) {
        self.stale_attr(ino);
        let mut cache = match self.no_xattr.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        cache.retain(|(i, _), _| *i != ino);
    }

    /// The HOST handle and instance to write through handle `fh` with write-behind, if its
    /// writes may be acknowledged before the HOST answers: not for pseudo filesystems,
    /// files opened for synchronous or appending writes, or a handle not re-opened yet after a
    /// HOST restart.
    fn write_behind_target(&self, fh: u64) -> Option<(Fh, u64)> {
        if !self.opts.write_behind || self.opts.pseudo() {
            return None;
        }
        let st = self.st();
        let h = st.handles.get(&fh)?;
        let no = libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT;
        let ok = h.epoch == st.epoch && !h.dir && h.flags & no == 0;
        ok.then_some((h.fh, st.instance))
    }

    fn unstable_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Unstable>>> {
        match self.unstable.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Counts one more acknowledged write of `ino` in flight.
    fn begin_write(&self, ino: u64) -> Arc<Unstable> {
        // Called once the write is queued and before it is acknowledged: a reply to any request
        // queued before it (its attributes may already be recorded, or on their way) predates
        // the write; requests queued after it see it.
        self.stale_attr(ino);
        let mut map = self.unstable_map();
        let u = map.entry(ino).or_default().clone();
        u.lock().0 += 1;
        u
    }

    /// A failure of an acknowledged write of `ino` not reported yet (cleared by taking it).
    fn take_write_error(&self, ino: u64) -> Option<OpError> {
        let map = self.unstable_map();
        let u = map.get(&ino)?;
        let e = u.lock().1.take();
        e
    }

    /// Waits for the acknowledged writes of `ino`; returns the first one that failed.
    async fn settle(&self, ino: u64) -> R<()> {
        let Some(u) = self.unstable_map().get(&ino).cloned() else {
            return Ok(());
        };
        let res = u.settle().await;
        let mut map = self.unstable_map();
        if map.get(&ino).is_some_and(|u| *u.lock() == (0, None)) {
            map.remove(&ino);
        }
        res
    }

    fn has_unstable(&self, ino: u64) -> bool {
        self.unstable_map().contains_key(&ino)
    }

    /// One write through handle `fh`, answered by the HOST.
    async fn write_sync(self: &Arc<Self>, fh: u64, offset: u64, data: &[u8]) -> R<u32> {
        self.with(|| async {
            let sfh = self.fh_of(fh).await?;
            self.call_with(op::Write { fh: sfh, offset }, data).await
        })
        .await
    }

    /// Write-behind: queues the write to the HOST, acknowledges it, then collects the answer.
    /// The session keeps frames in order and the HOST applies prompt calls in arrival order,
    /// so every later request (getattr, read, fsync, ...) sees this write; a failure is
    /// reported by the next write, `close` (flush) or `fsync` of the inode.
    async fn write_behind(self: &Arc<Self>, w: PendingWrite, body: Bytes, reply: ReplyWrite) {
        let n = w.data.len() as u32;
        let Ok(permit) = self.wb_budget.clone().acquire_many_owned(wb_kib(n)).await else {
            reply.error(Errno::EIO);
            return;
        };
        if let Some(e) = self.take_write_error(w.ino) {
            reply.error(errno(e));
            return;
        }
        let session = self
            .client
            .session_retry(Duration::from_millis(100), Some(Duration::ZERO))
            .await;
        let call = match session.map(|s| s.start_call("fs", body.clone())) {
            Ok(Ok(call)) => call,
            _ => {
                // No live session: write synchronously (waits out the outage).
                drop(permit);
                let res = self.write_sync(w.fh, w.offset, &w.data).await;
                self.stale_attr(w.ino);
                return reply_write(reply, res);
            }
        };
        let unstable = self.begin_write(w.ino);
        reply.written(n);
        self.collect_write(w, call, unstable, permit).await;
    }

    /// Waits for the HOST's answer to an acknowledged write and records a failure for the
    /// application's next write, close or fsync.
    async fn collect_write(
        self: &Arc<Self>,
        w: PendingWrite,
        call: impl Future<Output = Result<Bytes, CallError>>,
        unstable: Arc<Unstable>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let PendingWrite {
            ino,
            fh,
            offset,
            data,
        } = w;
        let n = data.len() as u32;
        let answer = match call.await.map_err(|e| match e {
            CallError::Remote(e) => OpError::Errno(e.code),
            _ => OpError::Stale,
        }) {
            Ok(r) => decode_reply::<u32>(&r).map(|(w, _)| w),
            Err(e) => Err(e),
        };
        let answer = match answer {
            // Session lost or HOST restarted: send the kept payload again (same offset, the
            // handle re-opened). Replies to requests sent after the first attempt may now
            // predate the write.
            Err(OpError::Stale) => {
                self.begin_resend();
                let r = self.write_sync(fh, offset, &data).await;
                self.end_resend(ino);
                r
            }
            other => other,
        };
        let res = match answer {
            Ok(w) if w >= n => Ok(()),
            // Short write (the HOST ran out of space mid-way): the rest says why.
            Ok(w) => {
                let rest = data.slice((w as usize).min(data.len())..);
                self.begin_resend();
                let r = self.write_sync(fh, offset + u64::from(w), &rest).await;
                self.end_resend(ino);
                r.and_then(|r| {
                    if r as usize == rest.len() {
                        Ok(())
                    } else {
                        Err(OpError::Errno(libc::EIO))
                    }
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            warn!(
                ino,
                offset,
                error = ?e,
                "acknowledged write failed on the HOST; reported at close/fsync"
            );
        }
        unstable.finish(res);
        drop(permit);
    }

    fn new_handle(&self, ino: u64, flags: i32, dir: bool, fh: Fh) -> u64 {
        let mut st = self.st();
        let id = st.next_fh;
        st.next_fh += 1;
        let epoch = st.epoch;
        st.handles.insert(
            id,
            Handle {
                ino,
                flags,
                dir,
                fh,
                epoch,
            },
        );
        id
    }

    fn is_fifo_ino(&self, ino: u64) -> bool {
        self.st().inodes.get(&ino).is_some_and(|i| i.fifo)
    }

    fn open_flags(&self, direct: bool) -> FopenFlags {
        let mut f = FopenFlags::empty();
        if direct || self.opts.pseudo() {
            f |= FopenFlags::FOPEN_DIRECT_IO;
        }
        f
    }

    /// A DPU process looks up, stats or opens FIFO `ino` (FUSE request from thread `pid`):
    /// arm its tunnel, or make an armed one probe at once. The daemon's own requests are not
    /// hints (they would kick the tunnel in a loop).
    fn fifo_hint(self: &Arc<Self>, ino: u64, pid: u32) {
        if self.opts.pseudo() || self.fifos.own(pid) || self.fifos.mountpoint.get().is_none() {
            return;
        }
        let (node, instance) = {
            let st = self.st();
            match st.inodes.get(&ino) {
                Some(n) if n.fifo && n.epoch == st.epoch => (n.node, st.instance),
                _ => return,
            }
        };
        let ctl = {
            let mut armed = self.fifos.armed();
            if let Some(c) = armed.get(&ino) {
                c.kick();
                return;
            }
            if armed.len() >= MAX_TUNNELS {
                warn!(
                    ino,
                    "too many FIFO tunnels; this FIFO stays local to the DPU"
                );
                return;
            }
            let c = Arc::new(fifo::Control::default());
            armed.insert(ino, c.clone());
            c
        };
        let me = self.clone();
        self.rt.spawn(async move {
            match me.fifo_tunnel(ino, node, instance, ctl.clone()).await {
                Ok(()) => debug!(ino, "fifo tunnel closed"),
                Err(e) => debug!(ino, error = %e, "fifo tunnel ended"),
            }
            let mut armed = me.fifos.armed();
            if armed.get(&ino).is_some_and(|c| Arc::ptr_eq(c, &ctl)) {
                armed.remove(&ino);
            }
        });
    }

    async fn fifo_tunnel(
        self: &Arc<Self>,
        ino: u64,
        node: NodeId,
        instance: u64,
        ctl: Arc<fifo::Control>,
    ) -> Result<(), fifo::TunnelError> {
        let Some(opener) = self.fifos.opener() else {
            return Ok(());
        };
        let session = self
            .client
            .session()
            .await
            .map_err(|e| fifo::TunnelError::Io(std::io::Error::other(e.to_string())))?;
        let header = fifo::encode_header(&fifo::TunnelHeader { instance, node });
        let stream = session
            .open_stream("fs", header)
            .await
            .map_err(|e| fifo::TunnelError::Io(std::io::Error::other(e.to_string())))?;
        debug!(ino, node, "fifo tunnel armed");
        let ends = DpuEnds {
            inner: self.clone(),
            opener,
            ino,
            node_fd: None,
        };
        fifo::run(fifo::Side::Dpu, ends, stream, ctl).await
    }

    /// `parent/name` was unlinked through this mount: an armed tunnel of that FIFO ends once
    /// no cycle runs (its DPU openers, if any, keep their pipe).
    fn fifo_unlinked(&self, parent: u64, name: &[u8]) {
        let st = self.st();
        let armed = self.fifos.armed();
        for (ino, c) in armed.iter() {
            if st
                .inodes
                .get(ino)
                .is_some_and(|i| i.parent == parent && i.name == name)
            {
                c.stop();
            }
        }
    }

    /// The path of `ino` below the mount root, from the names this mount knows.
    fn rel_path(&self, ino: u64) -> Option<PathBuf> {
        let st = self.st();
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = st.inodes.get(&cur)?;
            if parts.len() > 4096 || n.name.is_empty() {
                return None;
            }
            parts.push(&n.name);
            cur = n.parent;
        }
        let mut p = PathBuf::new();
        for c in parts.iter().rev() {
            p.push(OsStr::from_bytes(c));
        }
        Some(p)
    }
}

/// A reply's result and payload, or why it failed: a stale instance, or ESTALE (the server
/// released this mount's nodes when its previous session ended while the daemon stayed up),
/// is re-resolved like a restart.
fn decode_reply<T: serde::de::DeserializeOwned>(reply: &Bytes) -> R<(T, Bytes)> {
    match proto::decode_reply::<T>(reply) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(Status::StaleInstance | Status::Errno(libc::ESTALE))) => Err(OpError::Stale),
        Ok(Err(Status::Errno(e))) => Err(OpError::Errno(e)),
        Ok(Err(Status::Ok)) | Err(_) => Err(OpError::Protocol),
    }
}

fn reply_write(reply: ReplyWrite, res: R<u32>) {
    match res {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(e)),
    }
}

/// An acknowledged write on its way to the HOST: enough to send it again after a lost session
/// or HOST restart without decoding the request (the payload is a slice of the request sent).
struct PendingWrite {
    ino: u64,
    /// This mount's handle (re-opened on the HOST after a restart).
    fh: u64,
    offset: u64,
    data: Bytes,
}

macro_rules! spawn_reply {
    ($self:ident, $reply:ident, |$me:ident| $body:expr, |$v:ident| $ok:expr) => {{
        let $me = $self.inner.clone();
        $self.inner.rt.spawn(async move {
            let res = $me.with(|| async { $body }).await;
            match res {
                Ok($v) => $ok,
                Err(e) => $reply.error(errno(e)),
            }
        });
    }};
}

impl QtfsFs {
    /// Answers with attributes the HOST returned for `ino`.
    fn attr_reply(me: &Inner, ino: u64, r: R<Attr>, sent: u64, reply: ReplyAttr) {
        match r {
            Ok(a) => {
                me.note_attr(ino, &a, sent);
                reply.attr(&me.ttl_for(&a), &fuse_attr(ino, &a))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Answers with an entry the HOST returned; the kernel's new inode number. `pid`: the
    /// caller, whose lookup of a FIFO arms or kicks its tunnel (0: no hint).
    fn entry_reply(
        inner: &Arc<Inner>,
        parent: u64,
        name: &[u8],
        e: Entry,
        sent: u64,
        pid: u32,
        reply: ReplyEntry,
    ) -> u64 {
        let ino = inner.add_entry(parent, name, &e, sent);
        let fifo = is_fifo(e.attr.mode);
        let (ttl, entry_ttl) = if fifo {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (inner.ttl(), inner.entry_ttl())
        };
        reply.entry_with_ttls(&ttl, &entry_ttl, &fuse_attr(ino, &e.attr), Generation(0));
        if fifo && pid != 0 {
            inner.fifo_hint(ino, pid);
        }
        ino
    }
}

impl Filesystem for QtfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let mut want = InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        if !self.inner.opts.pseudo() {
            want |= InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        }
        if self.inner.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(want & caps);
        let _ = config.set_max_write(proto::MAX_IO);
        let _ = config.set_max_readahead(proto::MAX_IO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    /// Unmounting: acknowledged writes still in flight are delivered before the process ends
    /// (bounded by the mount's timeout unless `hard`).
    fn destroy(&mut self) {
        for c in self.inner.fifos.armed().values() {
            c.stop();
        }
        let pending: Vec<u64> = self.inner.unstable_map().keys().copied().collect();
        if pending.is_empty() {
            return;
        }
        let me = self.inner.clone();
        let drain = async move {
            for ino in pending {
                if let Err(e) = me.settle(ino).await {
                    warn!(ino, error = ?e, "write failed while unmounting; data lost");
                }
            }
        };
        if self.inner.opts.hard {
            self.inner.rt.block_on(drain);
        } else if self
            .inner
            .rt
            .block_on(tokio::time::timeout(self.inner.opts.timeout, drain))
            .is_err()
        {
            warn!("HOST unreachable while unmounting; acknowledged writes lost");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let pid = req.pid();
        let name = name.as_bytes().to_vec();
        let Some(reply) = self.syn_lookup(req, parent, &name, reply) else {
            return;
        };
        if self.inner.known_absent(parent, &name) {
            reply.error(Errno::ENOENT);
            return;
        }
        let sent = self.inner.attr_seq();
        let build = {
            let name = name.clone();
            move |p, _| op::Lookup {
                parent: p,
                name: name.clone(),
            }
        };
        self.inner
            .request(parent, None, build, move |me, r| match r {
                Ok(e) => {
                    QtfsFs::entry_reply(me, parent, &name, e, sent, pid, reply);
                }
                Err(e) => reply.error(errno(e)),
            });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if is_syn_ino(ino.0) {
            if let Some(v) = self.view() {
                v.forget(ino.0, nlookup);
            }
            return;
        }
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        let Some(reply) = self.syn_getattr(ino, reply) else {
            return;
        };
        if self.inner.is_fifo_ino(ino) {
            // Someone stats or opens the FIFO (its attributes have TTL 0).
            self.inner.fifo_hint(ino, req.pid());
        }
        if let Some((a, left)) = self.inner.fresh_attr(ino) {
            let left = if is_fifo(a.mode) {
                Duration::ZERO
            } else {
                left
            };
            reply.attr(&left, &fuse_attr(ino, &a));
            return;
        }
        let sent = self.inner.attr_seq();
        self.inner.request(
            ino,
            fh.map(|h| h.0),
            |node, fh| op::GetAttr { node, fh },
            move |me, r| QtfsFs::attr_reply(me, ino, r, sent, reply),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        let (atime, mtime) = (set_time(atime), set_time(mtime));
        let sent = self.inner.attr_seq();
        let build = move |node, fh| op::SetAttr {
            node,
            fh,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        self.inner
            .request(ino, fh.map(|h| h.0), build, move |me, r| {
                QtfsFs::attr_reply(me, ino, r, sent, reply)
            });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = ino.0;
        let Some(reply) = self.syn_readlink(req, ino, reply) else {
            return;
        };
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                Ok(me.call_data(op::ReadLink { node }).await?.1)
            },
            |d| reply.data(&d)
        )
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let pid = req.pid();
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Mknod {
                        parent: p,
                        name: name.clone(),
                        mode,
                        rdev: rdev as u64,
                        caller,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                // A FIFO made here is about to be opened: arm its tunnel.
                QtfsFs::entry_reply(&me, parent, &name, e, sent, pid, reply);
            }
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Mkdir {
                        parent: p,
                        name: name.clone(),
                        mode,
                        caller,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                let ino = QtfsFs::entry_reply(&me, parent, &name, e, sent, 0, reply);
                me.note_new_dir(ino);
            }
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        self.inner.stale_all_attrs();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.call(op::Unlink {
                    parent: p,
                    name: name.clone(),
                })
                .await
            },
            |_r| {
                me.stale_all_attrs();
                me.fifo_unlinked(parent, &name);
                reply.ok()
            }
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        self.inner.stale_all_attrs();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.call(op::Rmdir {
                    parent: p,
                    name: name.clone(),
                })
                .await
            },
            |_r| {
                me.stale_all_attrs();
                reply.ok()
            }
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        let caller = caller(req);
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Symlink {
                        parent: p,
                        name: name.clone(),
                        target: target.clone(),
                        caller,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                QtfsFs::entry_reply(&me, parent, &name, e, sent, 0, reply);
            }
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, newparent) = (parent.0, newparent.0);
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        let flags = flags.bits();
        self.inner.stale_all_attrs();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                let np = me.node_of(newparent).await?;
                me.call(op::Rename {
                    parent: p,
                    name: name.clone(),
                    newparent: np,
                    newname: newname.clone(),
                    flags,
                })
                .await
                .map_err(|e| me.make_failed(newparent, e))
            },
            |_r| {
                // Keep the re-resolution names current.
                let mut st = me.st();
                let moved = st
                    .inodes
                    .iter()
                    .find(|(_, i)| i.parent == parent && i.name == name)
                    .map(|(k, _)| *k);
                let other = st
                    .inodes
                    .iter()
                    .find(|(_, i)| i.parent == newparent && i.name == newname)
                    .map(|(k, _)| *k);
                if let Some(k) = moved {
                    if let Some(i) = st.inodes.get_mut(&k) {
                        i.parent = newparent;
                        i.name = newname.clone();
                    }
                }
                if flags & libc::RENAME_EXCHANGE != 0 {
                    if let Some(k) = other {
                        if let Some(i) = st.inodes.get_mut(&k) {
                            i.parent = parent;
                            i.name = name.clone();
                        }
                    }
                }
                drop(st);
                me.stale_all_attrs();
                me.note_new_name(newparent, &newname);
                if flags & libc::RENAME_EXCHANGE != 0 {
                    me.note_new_name(parent, &name);
                }
                reply.ok()
            }
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (ino, newparent) = (ino.0, newparent.0);
        let newname = newname.as_bytes().to_vec();
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                let np = me.node_of(newparent).await?;
                me.make(
                    newparent,
                    op::Link {
                        node,
                        newparent: np,
                        newname: newname.clone(),
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(newparent, &newname, &pattr, sent);
                QtfsFs::entry_reply(&me, newparent, &newname, e, sent, 0, reply);
            }
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        let Some(reply) = self.syn_open(ino, reply) else {
            return;
        };
        let flags = flags.0;
        let truncates = flags & libc::O_TRUNC != 0;
        if truncates {
            self.inner.stale_attr(ino);
        }
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                let o = me.call(op::Open { node, flags }).await?;
                Ok((o.fh, o.direct))
            },
            |v| {
                let (sfh, direct) = v;
                if truncates {
                    me.stale_attr(ino);
                }
                let fh = me.new_handle(ino, flags, false, sfh);
                reply.opened(FileHandle(fh), me.open_flags(direct))
            }
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(reply) = self.syn_read(fh.0, offset, size, reply) else {
            return;
        };
        // A read may update the access time.
        self.inner.stale_attr(ino.0);
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                let read = op::Read {
                    fh: sfh,
                    offset,
                    size,
                };
                Ok(me.call_data(read).await?.1)
            },
            |data| reply.data(&data)
        )
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let me = self.inner.clone();
        if let Some((sfh, instance)) = self.inner.write_behind_target(fh.0) {
            // Encoded here, straight from the kernel's buffer: the only copy of the data, kept
            // (as a slice of the request) until the HOST answered.
            let args = op::Write { fh: sfh, offset };
            let Ok(body) = proto::encode_request(instance, &args, data) else {
                reply.error(Errno::EIO);
                return;
            };
            let (body, n) = (Bytes::from(body), data.len() as u32);
            let w = PendingWrite {
                ino: ino.0,
                fh: fh.0,
                offset,
                data: body.slice(body.len() - data.len()..),
            };
            if let Some(e) = self.inner.take_write_error(ino.0) {
                reply.error(errno(e));
                return;
            }
            // Budget left and a live session: queue and acknowledge right on this FUSE thread,
            // the runtime only collects the answer. Otherwise wait for both on the runtime.
            let permit = self
                .inner
                .wb_budget
                .clone()
                .try_acquire_many_owned(wb_kib(n));
            if let (Ok(permit), Some(session)) = (permit, self.inner.client.current()) {
                if let Ok(call) = session.start_call("fs", body.clone()) {
                    let unstable = self.inner.begin_write(ino.0);
                    reply.written(n);
                    self.inner
                        .rt
                        .spawn(async move { me.collect_write(w, call, unstable, permit).await });
                    return;
                }
            }
            self.inner
                .rt
                .spawn(async move { me.write_behind(w, body, reply).await });
            return;
        }
        let data = data.to_vec();
        self.inner.rt.spawn(async move {
            let res = me.write_sync(fh.0, offset, &data).await;
            me.stale_attr(ino.0);
            reply_write(reply, res);
        });
    }

    /// Waits for the inode's acknowledged writes still in flight and reports the first that
    /// failed (close(2) returns it, as on NFS). Nothing else is buffered here, so with no write
    /// in flight it is answered at once and close (also the implicit close of O_CLOEXEC files at
    /// exec) never waits for the HOST during an outage.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        if !self.inner.has_unstable(ino) {
            reply.ok();
            return;
        }
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            match me.settle(ino).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(reply) = self.syn_release(fh.0, reply) else {
            return;
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            // Writes still in flight need the handle (re-opened after a HOST restart).
            if let Err(e) = me.settle(ino.0).await {
                warn!(
                    ino = ino.0,
                    error = ?e,
                    "write failure after the last close; data lost"
                );
            }
            let h = me.st().handles.remove(&fh.0);
            let Some(h) = h else {
                reply.ok();
                return;
            };
            if h.epoch == me.st().epoch {
                let _ = me
                    .call(op::Release {
                        fh: h.fh,
                        lock_owner: lock_owner.map(|l| l.0),
                    })
                    .await;
            }
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                me.settle(ino.0).await?;
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::Fsync { fh: sfh, datasync }).await
            },
            |_r| reply.ok()
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        let Some(reply) = self.syn_opendir(ino, reply) else {
            return;
        };
        let flags = flags.0;
        // A listing shows what the HOST holds: names must not be denied that it lists. And
        // reading the directory may update its access time.
        self.inner.st().new_dirs.remove(&ino);
        self.inner.stale_attr(ino);
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                Ok(me.call(op::OpenDir { node }).await?.fh)
            },
            |sfh| {
                let fh = me.new_handle(ino, flags, true, sfh);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let Some(mut reply) = self.syn_readdir(fh.0, offset, reply) else {
            return;
        };
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::ReadDir {
                    fh: sfh,
                    offset,
                    max_bytes: 64 * 1024,
                    plus: false,
                })
                .await
            },
            |entries| {
                for e in entries {
                    let kind = kind_of(if e.kind == 0 { libc::S_IFREG } else { e.kind });
                    if reply.add(
                        INodeNo(e.ino.max(1)),
                        e.offset,
                        kind,
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
        )
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir_ino = ino.0;
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::ReadDir {
                    fh: sfh,
                    offset,
                    max_bytes: 64 * 1024,
                    plus: true,
                })
                .await
            },
            |entries| {
                let ttl = me.ttl();
                let mut leftovers: Vec<(NodeId, u64)> = Vec::new();
                let mut full = false;
                for DirEntry {
                    name,
                    offset,
                    entry,
                    kind,
                    ..
                } in entries
                {
                    match entry {
                        Some(e) if !full => {
                            let ino = me.add_entry(dir_ino, &name, &e, sent);
                            let attr = fuse_attr(ino, &e.attr);
                            let ttl = if is_fifo(e.attr.mode) {
                                Duration::ZERO
                            } else {
                                ttl
                            };
                            if reply.add(
                                INodeNo(ino),
                                offset,
                                OsStr::from_bytes(&name),
                                &ttl,
                                &attr,
                                Generation(0),
                            ) {
                                full = true;
                                me.forget(ino, 1);
                            }
                        }
                        Some(e) => leftovers.push((e.node, 1)),
                        None if !full => {
                            // `.` and `..`: the kernel takes no reference for them.
                            let a = Attr {
                                mode: if kind == 0 { libc::S_IFDIR } else { kind },
                                ..Default::default()
                            };
                            let attr = fuse_attr(dir_ino, &a);
                            if reply.add(
                                INodeNo(dir_ino),
                                offset,
                                OsStr::from_bytes(&name),
                                &Duration::ZERO,
                                &attr,
                                Generation(0),
                            ) {
                                full = true;
                            }
                        }
                        None => {}
                    }
                }
                if !leftovers.is_empty() {
                    let me2 = me.clone();
                    me.rt.spawn(async move {
                        let _ = me2.call(op::Forget { nodes: leftovers }).await;
                    });
                }
                reply.ok()
            }
        )
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let Some(reply) = self.syn_release(fh.0, reply) else {
            return;
        };
        let h = self.inner.st().handles.remove(&fh.0);
        let Some(h) = h else {
            reply.ok();
            return;
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            if h.epoch == me.st().epoch {
                let _ = me.call(op::ReleaseDir { fh: h.fh }).await;
            }
            reply.ok();
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::FsyncDir { fh: sfh, datasync }).await
            },
            |_r| reply.ok()
        )
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let ino = if is_syn_ino(ino.0) { ROOT } else { ino.0 };
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call(op::StatFs { node }).await
            },
            |s| reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize
            )
        )
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        let name = name.as_bytes().to_vec();
        let value = value.to_vec();
        self.inner.stale_attr(ino);
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call(op::SetXattr {
                    node,
                    name: name.clone(),
                    value: value.clone(),
                    flags,
                })
                .await
            },
            |_r| {
                me.forget_xattrs(ino);
                reply.ok()
            }
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.error(Errno::ENODATA);
            return;
        }
        let name = name.as_bytes().to_vec();
        if self.inner.xattr_known_absent(ino, &name) {
            reply.error(Errno::ENODATA);
            return;
        }
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            let res = me
                .with(|| async {
                    let node = me.node_of(ino).await?;
                    me.call_data(op::GetXattr {
                        node,
                        name: name.clone(),
                        size,
                    })
                    .await
                })
                .await;
            match res {
                Ok((n, _)) if size == 0 => reply.size(n),
                Ok((_, d)) => reply.data(&d),
                Err(e) => {
                    if e == OpError::Errno(libc::ENODATA) {
                        me.remember_no_xattr(ino, name);
                    }
                    reply.error(errno(e))
                }
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.size(0);
            return;
        }
        if self.inner.xattr_known_absent(ino, b"") {
            if size == 0 {
                reply.size(0);
            } else {
                reply.data(&[]);
            }
            return;
        }
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call_data(op::ListXattr { node, size }).await
            },
            |r| match r {
                (n, _) if size == 0 => reply.size(n),
                (_, d) => reply.data(&d),
            }
        )
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let ino = ino.0;
        let name = name.as_bytes().to_vec();
        self.inner.stale_attr(ino);
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call(op::RemoveXattr {
                    node,
                    name: name.clone(),
                })
                .await
            },
            |_r| {
                me.forget_xattrs(ino);
                reply.ok()
            }
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.ok();
            return;
        }
        let caller = caller(req);
        let mask = mask.bits();
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call(op::Access { node, mask, caller }).await
            },
            |_r| reply.ok()
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.call(op::Create {
                    parent: p,
                    name: name.clone(),
                    mode,
                    flags,
                    caller,
                })
                .await
                .map_err(|e| me.make_failed(parent, e))
            },
            |c| {
                let proto::Created {
                    entry,
                    opened: proto::Opened { fh: sfh, direct },
                    parent: pattr,
                } = c;
                me.made_in(parent, &name, &pattr, sent);
                let ino = me.add_entry(parent, &name, &entry, sent);
                let fh = me.new_handle(ino, flags, false, sfh);
                reply.created(
                    &me.entry_ttl(),
                    &fuse_attr(ino, &entry.attr),
                    Generation(0),
                    FileHandle(fh),
                    me.open_flags(direct),
                )
            }
        )
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::GetLk {
                    fh: sfh,
                    owner: lock_owner.0,
                    start,
                    end,
                    typ,
                    pid,
                })
                .await
            },
            |l| reply.locked(l.start, l.end, l.typ, l.pid)
        )
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::SetLk {
                    fh: sfh,
                    owner: lock_owner.0,
                    start,
                    end,
                    typ,
                    pid,
                    sleep,
                })
                .await
            },
            |_r| reply.ok()
        )
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        events: PollEvents,
        flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let Some(reply) = self.syn_poll(fh.0, events, reply) else {
            return;
        };
        let ev = events.bits();
        let notify = flags.contains(PollFlags::FUSE_POLL_SCHEDULE_NOTIFY);
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                let poll = op::Poll {
                    fh: sfh,
                    events: ev,
                    wait_ms: 0,
                };
                Ok((sfh, me.call(poll).await?))
            },
            |v| {
                let (sfh, revents) = v;
                reply.poll(PollEvents::from_bits_retain(revents));
                if revents == 0 && notify {
                    // Wait on the HOST (dedicated thread there) and wake the kernel when ready.
                    let me2 = me.clone();
                    me.rt.spawn(async move {
                        loop {
                            let still_open = me2.st().handles.contains_key(&fh.0);
                            if !still_open {
                                return;
                            }
                            match me2
                                .call(op::Poll {
                                    fh: sfh,
                                    events: ev,
                                    wait_ms: 5000,
                                })
                                .await
                            {
                                Ok(0) => continue,
                                _ => {
                                    let _ = ph.notify();
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        )
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        self.inner.stale_attr(ino);
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::Fallocate {
                    fh: sfh,
                    offset,
                    length,
                    mode,
                })
                .await
            },
            |_r| {
                me.stale_attr(ino);
                reply.ok()
            }
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::Lseek {
                    fh: sfh,
                    offset,
                    whence,
                })
                .await
            },
            |o| reply.offset(o)
        )
    }
}

impl QtfsFs {
    /// The uid/gid that mounted (informational).
    pub fn owner(&self) -> (u32, u32) {
        (self.inner.uid, self.inner.gid)
    }
}

/// The DPU's side of a FIFO tunnel: opens through this mount, on the opener thread. Holds an
/// `O_PATH` descriptor of the FIFO only while the tunnel probes fast or runs a cycle.
struct DpuEnds {
    inner: Arc<Inner>,
    opener: Arc<fifo::Opener>,
    ino: u64,
    node_fd: Option<Arc<std::os::fd::OwnedFd>>,
}

impl DpuEnds {
    async fn open(&mut self, flags: i32) -> Result<std::os::fd::OwnedFd, i32> {
        let fd = match &self.node_fd {
            Some(fd) => fd.clone(),
            None => {
                let rel = self.inner.rel_path(self.ino).ok_or(libc::ESTALE)?;
                let ino = self.ino;
                let fd = self
                    .opener
                    .run(move |r| r.open_node(&rel, ino))
                    .await
                    .ok_or(libc::EIO)??;
                let fd = Arc::new(fd);
                self.node_fd = Some(fd.clone());
                fd
            }
        };
        self.opener
            .run(move |_| {
                use std::os::fd::AsRawFd;
                crate::sys::reopen(fd.as_raw_fd(), flags | libc::O_NONBLOCK)
            })
            .await
            .ok_or(libc::EIO)?
    }
}

#[async_trait::async_trait]
impl fifo::Ends for DpuEnds {
    async fn probe(&mut self) -> Result<Option<std::os::fd::OwnedFd>, i32> {
        match self.open(libc::O_WRONLY).await {
            Ok(fd) => Ok(Some(fd)),
            Err(libc::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn reader(&mut self) -> Result<std::os::fd::OwnedFd, i32> {
        self.open(libc::O_RDONLY).await
    }

    fn rest(&mut self) {
        self.node_fd = None;
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
        Ok(Mounted(fuser::Session::new(self, mountpoint, &cfg)?))
    }
}

/// proc mode: the caller's own entries (module `procview`). The FUSE methods call these
/// first: each answers a request about a generated node (`None`) or hands the reply back.
impl QtfsFs {
    fn view(&self) -> Option<&ProcView> {
        self.inner.proc_view.as_ref()
    }

    /// Replies with a generated node, taking a kernel reference to it.
    fn syn_entry(&self, node: SynNode, reply: ReplyEntry) {
        let Some(v) = self.view() else {
            reply.error(Errno::ENOENT);
            return;
        };
        let ino = v.intern(node.clone());
        match v.attr(ino, &node) {
            Ok(a) => reply.entry(&Duration::ZERO, &a, Generation(0)),
            Err(e) => {
                v.forget(ino, 1);
                reply.error(errno(e));
            }
        }
    }

    fn syn_lookup(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        reply: ReplyEntry,
    ) -> Option<ReplyEntry> {
        let Some(v) = self.view() else {
            return Some(reply);
        };
        let hand = |reply: ReplyEntry, r: Result<SynNode, i32>| match r {
            Ok(n) => self.syn_entry(n, reply),
            Err(e) => reply.error(errno(e)),
        };
        if parent == ROOT {
            let ino = match name {
                b"self" => SELF_INO,
                b"thread-self" => THREAD_SELF_INO,
                _ => match v.own_root_entry(req.pid(), name) {
                    Some(n) => {
                        hand(reply, Ok(n));
                        return None;
                    }
                    None => return Some(reply),
                },
            };
            reply.entry(&Duration::ZERO, &procview::self_attr(ino), Generation(0));
            return None;
        }
        if !is_syn_ino(parent) {
            return Some(reply);
        }
        match v.node(parent) {
            Some(p) => hand(reply, v.lookup(&p, name)),
            None => reply.error(Errno::ESTALE),
        }
        None
    }

    fn syn_getattr(&self, ino: u64, reply: ReplyAttr) -> Option<ReplyAttr> {
        if ino == SELF_INO || ino == THREAD_SELF_INO {
            reply.attr(&Duration::ZERO, &procview::self_attr(ino));
            return None;
        }
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        match self.view().and_then(|v| Some((v, v.node(ino)?))) {
            Some((v, n)) => match v.attr(ino, &n) {
                Ok(a) => reply.attr(&Duration::ZERO, &a),
                Err(e) => reply.error(errno(e)),
            },
            None => reply.error(Errno::ESTALE),
        }
        None
    }

    fn syn_readlink(&self, req: &Request, ino: u64, reply: ReplyData) -> Option<ReplyData> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let Some(v) = self.view() else {
            reply.error(Errno::ESTALE);
            return None;
        };
        let r = match ino {
            SELF_INO => Ok(v.self_target(req.pid(), false)),
            THREAD_SELF_INO => Ok(v.self_target(req.pid(), true)),
            _ => match v.node(ino) {
                Some(n) => v.readlink(&n),
                None => Err(libc::ESTALE),
            },
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    fn syn_opendir(&self, ino: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let r = match self.view().and_then(|v| Some((v, v.node(ino)?))) {
            Some((v, n)) => v.opendir(&n),
            None => Err(libc::ESTALE),
        };
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    fn syn_readdir(
        &self,
        fh: u64,
        offset: u64,
        mut reply: ReplyDirectory,
    ) -> Option<ReplyDirectory> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        let Some(v) = self.view() else {
            reply.error(Errno::EBADF);
            return None;
        };
        match v.readdir(fh, offset) {
            Ok(list) => {
                for (i, (name, kind, next)) in list.into_iter().enumerate() {
                    // d_ino only: any stable non-zero number.
                    let ino = INodeNo(procview::SYN_BASE - 1 - (next + i as u64) % 1024);
                    if reply.add(ino, next, kind, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    /// Releases a generated handle (directory or file).
    fn syn_release(&self, fh: u64, reply: ReplyEmpty) -> Option<ReplyEmpty> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        if let Some(v) = self.view() {
            v.release(fh);
        }
        reply.ok();
        None
    }

    /// Opens a generated `mountinfo`/`mounts`: its content is made now, with the HOST's
    /// mount table fetched through this mount (at most once a second).
    fn syn_open(&self, ino: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let node = self.view().and_then(|v| v.node(ino));
        let node = match node {
            Some(n @ SynNode::File { .. }) => n,
            Some(SynNode::Link { .. }) => {
                reply.error(Errno::ELOOP);
                return None;
            }
            Some(_) => {
                reply.error(Errno::EISDIR);
                return None;
            }
            None => {
                reply.error(Errno::ESTALE);
                return None;
            }
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            let host = match me.host_mountinfo().await {
                Ok(h) => h,
                Err(e) => {
                    // Still the caller's own table, only without HOST cgroup lines.
                    debug!(error = ?e, "HOST mountinfo unavailable");
                    Arc::new(String::new())
                }
            };
            let Some(v) = me.proc_view.as_ref() else {
                reply.error(Errno::ESTALE);
                return;
            };
            match v.render(&node, &host) {
                Ok(data) => {
                    reply.opened(FileHandle(v.open_file(data)), FopenFlags::FOPEN_DIRECT_IO)
                }
                Err(e) => reply.error(errno(e)),
            }
        });
        None
    }

    /// A generated file is always ready, like a regular file. (An error here would read as
    /// EPOLLERR, and Go's runtime, which polls every file it opens, then fails its reads with
    /// "not pollable".)
    fn syn_poll(&self, fh: u64, events: PollEvents, reply: ReplyPoll) -> Option<ReplyPoll> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        let ready = (libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32;
        reply.poll(PollEvents::from_bits_retain(events.bits() & ready));
        None
    }

    fn syn_read(&self, fh: u64, offset: u64, size: u32, reply: ReplyData) -> Option<ReplyData> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        match self.view().map(|v| v.read(fh, offset, size)) {
            Some(Ok(d)) => reply.data(&d),
            Some(Err(e)) => reply.error(errno(e)),
            None => reply.error(Errno::EBADF),
        }
        None
    }
}

impl Inner {
    /// The HOST's `/proc/1/mountinfo`, read through this (proc) mount's source; reused for
    /// [`procview::HOST_MOUNTS_TTL`].
    async fn host_mountinfo(self: &Arc<Self>) -> R<Arc<String>> {
        let Some(v) = self.proc_view.as_ref() else {
            return Err(OpError::Errno(libc::EINVAL));
        };
        if let Some(s) = v.cached_host_mounts() {
            return Ok(s);
        }
        // Bounded: a management plane reads its mountinfo often, and an outage must not stall
        // each read for the mount's whole timeout. The last table fetched stands in meanwhile.
        let fetch = self.with(|| async { self.read_host_file(&[b"1", b"mountinfo"]).await });
        match tokio::time::timeout(procview::HOST_MOUNTS_WAIT, fetch).await {
            Ok(Ok(text)) => {
                let s = Arc::new(String::from_utf8_lossy(&text).into_owned());
                v.store_host_mounts(s.clone());
                Ok(s)
            }
            Ok(Err(e)) => v.last_host_mounts().ok_or(e),
            Err(_) => v.last_host_mounts().ok_or(OpError::Errno(libc::ETIMEDOUT)),
        }
    }

    /// Reads the HOST file at `path` (components below the mount's root) to its end without
    /// involving the kernel's view of the mount; every reference taken is dropped again.
    async fn read_host_file(self: &Arc<Self>, path: &[&[u8]]) -> R<Vec<u8>> {
        const LIMIT: usize = 16 << 20;
        let mut node = self.node_of(ROOT).await?;
        let mut taken: Vec<(NodeId, u64)> = Vec::new();
        let res = async {
            for name in path {
                let e = self
                    .call(op::Lookup {
                        parent: node,
                        name: name.to_vec(),
                    })
                    .await?;
                taken.push((e.node, 1));
                node = e.node;
            }
            let open = op::Open {
                node,
                flags: libc::O_RDONLY,
            };
            let fh = self.call(open).await?.fh;
            let mut out = Vec::new();
            let read = async {
                loop {
                    let read = op::Read {
                        fh,
                        offset: out.len() as u64,
                        size: 64 << 10,
                    };
                    let (_, d) = self.call_data(read).await?;
                    if d.is_empty() || out.len() + d.len() > LIMIT {
                        return Ok(());
                    }
                    out.extend_from_slice(&d);
                }
            }
            .await;
            let _ = self
                .call(op::Release {
                    fh,
                    lock_owner: None,
                })
                .await;
            read.map(|()| out)
        }
        .await;
        if !taken.is_empty() && res != Err(OpError::Stale) {
            let _ = self.call(op::Forget { nodes: taken }).await;
        }
        res
    }
}
