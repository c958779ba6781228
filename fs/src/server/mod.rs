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
//!
//! Layout: [`dispatch`] (the one entry point of every request: envelope, instance check,
//! the operation table), `passthrough` (the [`HostFs`] methods: the syscalls), `nodes` (node
//! and handle tables, lookup references per session, mount covering) and `exports` (export
//! resolution and mount roots).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::{debug, warn};
use transport::{RemoteError, Service, Session, Stream};

use crate::fifo;
use crate::notify;
use crate::proto::NodeId;
use crate::sys;

pub mod dispatch;
mod exports;
mod nodes;
mod passthrough;
mod watch;

pub use crate::proto::HostFs;
use nodes::State;
use passthrough::{is_type, R};

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
    /// The change watcher, started by the first change-feed subscription.
    watcher: std::sync::OnceLock<Option<Arc<watch::Watcher>>>,
    /// Change feeds of subscribed sessions.
    feeds: Mutex<watch::Feeds>,
}

/// The `fs` service (register as `"fs"` in the HOST's registry).
#[derive(Clone)]
pub struct FsService {
    inner: Arc<Inner>,
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
                watcher: std::sync::OnceLock::new(),
                feeds: Mutex::new(watch::Feeds::default()),
            }),
        })
    }

    /// Number of nodes currently referenced by clients (for tests and diagnostics).
    pub fn node_count(&self) -> usize {
        self.state().nodes.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        transport::sync::lock(&self.inner.state)
    }

    /// Handles one encoded request (also used by in-process tests): see [`dispatch::dispatch`].
    pub async fn dispatch(&self, req: &[u8]) -> Result<Bytes, RemoteError> {
        dispatch::dispatch(self, req).await
    }

    fn id(&self) -> u64 {
        self.inner.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Every node the DPU kernel remembers is an open `O_PATH` descriptor here (like virtiofsd),
/// so lift the soft descriptor limit to the hard one.
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

#[async_trait]
impl Service for FsService {
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        SESSION.scope(session.id(), self.dispatch(&req)).await
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

    /// FIFO tunnels (see [`crate::fifo`]): the DPU opens one stream per FIFO it uses; and
    /// one change feed per mount ([`crate::notify`]).
    async fn stream(&self, session: &Session, header: Bytes, stream: Stream) {
        if let Some(h) = notify::decode_header(&header) {
            return self.feed(session, h, stream).await;
        }
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

impl FsService {
    /// Serves one change feed until the DPU closes it or the session ends.
    async fn feed(&self, session: &Session, h: notify::FeedHeader, mut stream: Stream) {
        use tokio::io::AsyncReadExt;
        if h.instance != self.inner.instance {
            stream.reset_with("stale instance");
            return;
        }
        let sid = session.id();
        let (tx, mut rx) = tokio::sync::mpsc::channel(watch::FEED_QUEUE);
        let Some(first) = self.subscribe(sid, tx) else {
            let _ = stream
                .send(notify::frame(&notify::Msg::Ready { watching: false }))
                .await;
            let _ = stream.finish().await;
            return;
        };
        let (mut rd, mut wr) = stream.split();
        let mut ok = wr
            .send(notify::frame(&notify::Msg::Ready { watching: true }))
            .await
            .is_ok();
        for m in first {
            ok = ok && wr.send(notify::frame(&m)).await.is_ok();
        }
        debug!(session = sid, "change feed started");
        let mut sink = [0u8; 64];
        while ok {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    let m = if self.take_lost(sid) { notify::Msg::Reset } else { m };
                    ok = wr.send(notify::frame(&m)).await.is_ok();
                }
                // The DPU never writes: EOF or an error ends the feed.
                r = rd.read(&mut sink) => if !matches!(r, Ok(n) if n > 0) { break },
            }
        }
        self.unsubscribe(sid);
        debug!(session = sid, "change feed ended");
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
