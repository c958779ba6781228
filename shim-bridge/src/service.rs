//! The "bridge" service: proxy listeners, forwarded connections, watched directories, signals.

use crate::config::{under_any, BridgeConfig, Role};
use crate::forward::pump;
use crate::proto::{self, Reply, Request, StreamHeader, PROTO_VERSION};
use crate::watch::{list, DirWatcher};
use crate::BridgeError;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use transport::{RemoteError, Service, Session, Stream};

/// Service name on the session.
pub const SERVICE: &str = "bridge";

/// How long the far side tries to connect to the real socket before resetting the stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A proxy listener bound on this side.
struct Proxy {
    id: u64,
    target: String,
    cancel: CancellationToken,
    /// Inode of the socket file we bound, to tell our file from a newer one at the same path.
    ino: u64,
}

/// A session whose peer runs a bridge (answered `Hello`).
struct Peer {
    id: u64,
    session: Session,
    /// Paths (peer-visible names) this side asked the peer to proxy; shared by the dir watcher
    /// and `Expose` so removals are never missed.
    announced: Arc<tokio::sync::Mutex<HashSet<String>>>,
}

pub(crate) struct Inner {
    pub(crate) cfg: BridgeConfig,
    pub(crate) role: Role,
    proxies: Mutex<HashMap<PathBuf, Proxy>>,
    /// Local sockets exported by static rules (this side owns them).
    exports: HashSet<PathBuf>,
    peers: Mutex<Vec<Peer>>,
    next_id: AtomicU64,
}

/// The shim-bridge service: register it as `"bridge"` on every session of `offloadd`.
#[derive(Clone)]
pub struct BridgeService {
    pub(crate) inner: Arc<Inner>,
}

fn rerr(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError {
        code,
        message: message.into(),
    }
}

fn io_rerr(e: &std::io::Error, what: &str) -> RemoteError {
    rerr(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

impl BridgeService {
    /// Builds the service; `cfg.role` must be set (offloadd derives it from --listen/--connect).
    pub fn new(cfg: BridgeConfig) -> Result<BridgeService, BridgeError> {
        let role = cfg.role.ok_or(BridgeError::NoRole)?;
        for p in cfg.watch.iter().chain(cfg.fifo_dirs.iter()) {
            if !p.is_absolute() {
                return Err(BridgeError::Config(format!(
                    "{} is not absolute",
                    p.display()
                )));
            }
        }
        for r in &cfg.forward {
            if !r.path.is_absolute() || !r.target().is_absolute() {
                return Err(BridgeError::Config(format!(
                    "forward rule {} -> {}: paths must be absolute",
                    r.path.display(),
                    r.target().display()
                )));
            }
        }
        if cfg.read_chunk < 4096 {
            return Err(BridgeError::Config(
                "read_chunk must be at least 4096".into(),
            ));
        }
        let exports = cfg
            .forward
            .iter()
            .filter(|r| r.listen_side != role)
            .map(|r| r.target().to_path_buf())
            .collect();
        Ok(BridgeService {
            inner: Arc::new(Inner {
                cfg,
                role,
                proxies: Mutex::new(HashMap::new()),
                exports,
                peers: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// Local paths of the proxy listeners currently bound (for diagnostics and tests).
    pub fn proxies(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = lock(&self.inner.proxies).keys().cloned().collect();
        v.sort();
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// May the peer connect to local socket `p`?
    fn may_connect(&self, p: &Path) -> bool {
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return false;
        }
        self.exports.contains(p)
            || p.parent()
                .is_some_and(|d| self.cfg.watch.iter().any(|w| w == d))
            || under_any(p, &self.cfg.allow_connect)
    }

    /// Binds a proxy listener at local `path` forwarding to the peer's `target`, replacing an
    /// older proxy of ours at the same path. Idempotent for an identical live proxy.
    fn add_proxy(
        self: &Arc<Self>,
        session: &Session,
        path: &Path,
        target: &str,
        parent: &CancellationToken,
    ) -> Result<(), std::io::Error> {
        {
            let proxies = lock(&self.proxies);
            if let Some(p) = proxies.get(path) {
                if p.target == target && !p.cancel.is_cancelled() && is_socket(path) {
                    return Ok(());
                }
            }
        }
        let old_ino = lock(&self.proxies).remove(path).map(|old| {
            old.cancel.cancel();
            old.ino
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            // Our own previous listener (e.g. before a redial): the rename below replaces it
            // atomically, so a client never finds the path missing.
            Ok(m) if m.file_type().is_socket() && Some(m.ino()) == old_ino => {}
            Ok(m) if m.file_type().is_socket() => {
                // Someone else's live socket is never replaced; a stale one is.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => return Err(std::io::Error::from_raw_os_error(libc::EEXIST)),
            Err(_) => {}
        }
        let id = self.id();
        let listener = bind_atomically(path, id)?;
        let ino = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .unwrap_or(0);
        let cancel = parent.child_token();
        lock(&self.proxies).insert(
            path.to_path_buf(),
            Proxy {
                id,
                target: target.to_string(),
                cancel: cancel.clone(),
                ino,
            },
        );
        tracing::info!(path = %path.display(), target, "proxy listener up");
        let inner = self.clone();
        let session = session.clone();
        let path = path.to_path_buf();
        let target = target.to_string();
        tokio::spawn(async move {
            inner
                .accept_loop(listener, &session, &path, &target, &cancel)
                .await;
            cancel.cancel();
            // Remove the socket file only if it is still the one we bound.
            if std::fs::symlink_metadata(&path).map(|m| m.ino()).ok() == Some(ino) {
                let _ = std::fs::remove_file(&path);
            }
            let mut proxies = lock(&inner.proxies);
            if proxies.get(&path).is_some_and(|p| p.id == id) {
                proxies.remove(&path);
            }
            tracing::info!(path = %path.display(), "proxy listener down");
        });
        Ok(())
    }

    async fn accept_loop(
        &self,
        listener: UnixListener,
        session: &Session,
        path: &Path,
        target: &str,
        cancel: &CancellationToken,
    ) {
        loop {
            let conn = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = session.closed() => return,
                c = listener.accept() => c,
            };
            let (sock, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let session = session.clone();
            let target = target.to_string();
            let cancel = cancel.child_token();
            let chunk = self.cfg.read_chunk;
            let label = path.display().to_string();
            tokio::spawn(async move {
                let header = match proto::encode(&StreamHeader::Connect {
                    path: target.clone(),
                }) {
                    Ok(h) => h,
                    Err(_) => return,
                };
                match session.open_stream(SERVICE, header).await {
                    Ok(stream) => pump(sock, stream, chunk, cancel, label).await,
                    Err(e) => {
                        tracing::warn!(path = %label, target, error = %e, "cannot open bridge stream");
                        // Dropping `sock` closes the client's connection at once.
                    }
                }
            });
        }
    }

    fn remove_proxy(&self, path: &Path) -> bool {
        match lock(&self.proxies).remove(path) {
            Some(p) => {
                p.cancel.cancel();
                // The accept task removes the file; do it now too so new connects fail at once.
                let _ = std::fs::remove_file(path);
                true
            }
            None => false,
        }
    }

    /// Far side of a forwarded connection.
    async fn serve_connect(&self, path: String, stream: Stream) {
        let local = self.cfg.to_local(Path::new(&path));
        if !self.may_connect(&local) {
            tracing::warn!(path, local = %local.display(), "peer asked for a socket that is not exported; refused");
            stream.reset();
            return;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&local)).await {
            Ok(Ok(sock)) => {
                let label = local.display().to_string();
                pump(
                    sock,
                    stream,
                    self.cfg.read_chunk,
                    CancellationToken::new(),
                    label,
                )
                .await
            }
            Ok(Err(e)) => {
                tracing::debug!(path = %local.display(), error = %e, "bridged connect failed");
                stream.reset();
            }
            Err(_) => {
                tracing::warn!(path = %local.display(), "bridged connect timed out");
                stream.reset();
            }
        }
    }

    fn kill(&self, pid: i32, signal: i32) -> Result<Reply, RemoteError> {
        if !self.cfg.allow_kill {
            return Err(rerr(
                libc::EPERM,
                "remote kill disabled (bridge.allow_kill = false)",
            ));
        }
        if pid <= 0 {
            return Err(rerr(
                libc::EINVAL,
                format!("refusing to signal pid {pid} (must be > 0)"),
            ));
        }
        if !(0..=64).contains(&signal) {
            return Err(rerr(libc::EINVAL, format!("invalid signal {signal}")));
        }
        // SAFETY: kill(2) with validated arguments.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(io_rerr(&e, &format!("kill({pid}, {signal})")));
        }
        tracing::info!(pid, signal, "signal delivered for the peer");
        Ok(Reply::Done)
    }

    /// Makes local socket `path` (peer-visible name) reachable on every bridge peer now.
    async fn expose(&self, path: &str) -> Result<Reply, RemoteError> {
        let local = self.cfg.to_local(Path::new(path));
        if !self.may_connect(&local) {
            return Err(rerr(
                libc::EACCES,
                format!("{path} is not in a watched dir or exported"),
            ));
        }
        if !is_socket(&local) {
            return Err(rerr(libc::ENOENT, format!("{path} is not a socket")));
        }
        let name = self.cfg.to_peer(&local).display().to_string();
        let peers: Vec<_> = lock(&self.peers)
            .iter()
            .map(|p| (p.session.clone(), p.announced.clone()))
            .collect();
        let mut n = 0;
        for (session, announced) in peers {
            let mut set = announced.lock().await;
            if announce(&session, &name).await.is_ok() {
                set.insert(name.clone());
                n += 1;
            }
        }
        Ok(Reply::Exposed { peers: n })
    }

    /// Per-session work once the peer proved it runs a bridge.
    async fn run_session(self: Arc<Self>, session: Session) {
        if !session.peer_services().iter().any(|s| s == SERVICE) {
            tracing::debug!(
                peer = session.peer(),
                "peer offers no bridge (tool session)"
            );
            return;
        }
        let hello = match proto::encode(&Request::Hello {
            version: PROTO_VERSION,
        }) {
            Ok(h) => h,
            Err(_) => return,
        };
        let reply = tokio::select! {
            r = session.call(SERVICE, hello) => r,
            _ = session.closed() => return,
        };
        match reply.map(|b| proto::decode::<Reply>(&b)) {
            Ok(Ok(Reply::Hello { version })) if version == PROTO_VERSION => {}
            Ok(Ok(other)) => {
                tracing::warn!(
                    ?other,
                    "peer bridge speaks another protocol version; not bridging"
                );
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "undecodable Hello reply; not bridging");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "peer offers no bridge (tool session); nothing to do");
                return;
            }
        }
        let cancel = CancellationToken::new();
        let peer_id = self.id();
        let announced = Arc::new(tokio::sync::Mutex::new(HashSet::new()));
        lock(&self.peers).push(Peer {
            id: peer_id,
            session: session.clone(),
            announced: announced.clone(),
        });
        tracing::info!(role = ?self.role, "bridge peer attached");

        for rule in &self.cfg.forward {
            if rule.listen_side == self.role {
                let target = rule.target().display().to_string();
                if let Err(e) = self.add_proxy(&session, &rule.path, &target, &cancel) {
                    tracing::error!(path = %rule.path.display(), error = %e, "static proxy listener failed");
                }
            } else {
                let name = rule.path.display().to_string();
                let target = self.cfg.to_peer(rule.target()).display().to_string();
                let req = Request::AddProxy {
                    path: name.clone(),
                    target,
                };
                if let Err(e) = call(&session, &req).await {
                    tracing::error!(path = name, error = %e, "peer refused static proxy");
                }
            }
        }
        if !self.cfg.watch.is_empty() {
            let inner = self.clone();
            let (s, a, c) = (session.clone(), announced.clone(), cancel.clone());
            tokio::spawn(async move { inner.watch_sockets(s, a, c).await });
        }
        if self.role == Role::Dpu && !self.cfg.fifo_dirs.is_empty() {
            let inner = self.clone();
            let (s, c) = (session.clone(), cancel.clone());
            tokio::spawn(async move { crate::fifo::watch_fifos(inner, s, c).await });
        }

        session.closed().await;
        cancel.cancel();
        lock(&self.peers).retain(|p| p.id != peer_id);
        tracing::info!("bridge peer detached; its proxies and watchers stopped");
    }

    /// Mirrors the sockets of the watched dirs on the peer until `cancel`.
    async fn watch_sockets(
        self: Arc<Self>,
        session: Session,
        announced: Arc<tokio::sync::Mutex<HashSet<String>>>,
        cancel: CancellationToken,
    ) {
        let mut w = DirWatcher::new(Duration::from_millis(self.cfg.rescan_interval_ms.max(50)));
        let mut refused: HashSet<String> = HashSet::new();
        loop {
            for d in &self.cfg.watch {
                w.watch(d);
            }
            let now: HashSet<String> = self
                .cfg
                .watch
                .iter()
                .flat_map(|d| list(d, |t| t.is_socket()))
                .map(|p| self.cfg.to_peer(&p).display().to_string())
                .collect();
            {
                let mut set = announced.lock().await;
                let gone: Vec<String> = set.difference(&now).cloned().collect();
                for p in gone {
                    // Remove first so a failing peer call is not retried forever.
                    set.remove(&p);
                    if let Err(e) = call(&session, &Request::RemoveProxy { path: p.clone() }).await
                    {
                        tracing::debug!(path = p, error = %e, "RemoveProxy failed");
                    }
                }
                refused.retain(|p| now.contains(p));
                let new: Vec<String> = now.difference(&set).cloned().collect();
                for p in new {
                    match announce(&session, &p).await {
                        Ok(()) => {
                            set.insert(p);
                        }
                        Err(e) => {
                            // Warn once per path; the retry on every rescan stays quiet.
                            if refused.insert(p.clone()) {
                                tracing::warn!(path = p, error = %e, "peer refused proxy; retrying on each rescan");
                            } else {
                                tracing::debug!(path = p, error = %e, "peer still refuses proxy");
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = w.changed() => {}
            }
        }
    }
}

async fn announce(session: &Session, name: &str) -> Result<(), BridgeError> {
    call(
        session,
        &Request::AddProxy {
            path: name.to_string(),
            target: name.to_string(),
        },
    )
    .await
    .map(|_| ())
}

/// One control call to the peer's bridge.
pub(crate) async fn call(session: &Session, req: &Request) -> Result<Reply, BridgeError> {
    let b = proto::encode(req)?;
    let r = session.call(SERVICE, b).await?;
    Ok(proto::decode(&r)?)
}

pub(crate) fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

#[async_trait]
impl Service for BridgeService {
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let req: Request = proto::decode(&req)
            .map_err(|e| rerr(libc::EINVAL, format!("bad bridge request: {e}")))?;
        let reply = match req {
            Request::Hello { .. } => Reply::Hello {
                version: PROTO_VERSION,
            },
            Request::AddProxy { path, target } => {
                let local = self.inner.cfg.to_local(Path::new(&path));
                if !under_any(&local, &self.inner.cfg.allow_listen) {
                    return Err(rerr(
                        libc::EACCES,
                        format!("{} is not under bridge.allow_listen", local.display()),
                    ));
                }
                // Proxies live as long as the session that asked for them: the accept loop
                // ends on `session.closed()` and cancels its connections.
                self.inner
                    .add_proxy(session, &local, &target, &CancellationToken::new())
                    .map_err(|e| io_rerr(&e, &format!("listen on {}", local.display())))?;
                Reply::Done
            }
            Request::RemoveProxy { path } => {
                let local = self.inner.cfg.to_local(Path::new(&path));
                self.inner.remove_proxy(&local);
                Reply::Done
            }
            Request::Kill { pid, signal } => self.inner.kill(pid, signal)?,
            Request::Expose { path } => self.inner.expose(&path).await?,
        };
        proto::encode(&reply).map_err(|e| rerr(libc::EIO, e.to_string()))
    }

    async fn stream(&self, _session: &Session, header: Bytes, stream: Stream) {
        match proto::decode::<StreamHeader>(&header) {
            Ok(StreamHeader::Connect { path }) => self.inner.serve_connect(path, stream).await,
            Ok(StreamHeader::Fifo { path, direction }) => {
                crate::fifo::serve_fifo(&self.inner, path, direction, stream).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable bridge stream header");
                stream.reset();
            }
        }
    }

    fn attached(&self, session: &Session) {
        let inner = self.inner.clone();
        let session = session.clone();
        tokio::spawn(inner.run_session(session));
    }
}

/// Binds and listens under a temporary name next to `path`, then renames it into place, so the
/// socket file appears (or replaces our previous one) only once it accepts connections: a client
/// that connects as soon as it sees the file never gets ECONNREFUSED from the bind-to-listen gap.
/// Falls back to binding `path` directly when the temporary name would not fit in `sun_path`.
fn bind_atomically(path: &Path, id: u64) -> Result<UnixListener, std::io::Error> {
    let tmp = path.with_file_name(format!(
        "{}{}.{id}",
        crate::watch::TMP_PREFIX,
        std::process::id()
    ));
    if tmp.as_os_str().len() >= 108 {
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}
