//! The pluggable link: a `Transport` yields byte-stream connections; the session above never
//! knows which one carries it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::endpoint::Endpoint;

/// A connected, reliable, ordered byte stream.
pub trait AsyncConn: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Whether a thread outside the runtime may try a write on this connection itself (a
    /// non-blocking `poll_write` with a no-op waker), so a session can let callers write their
    /// own calls ([`crate::SessionConfig::direct_send`]). True for kernel sockets, whose
    /// writes are plain system calls; false for links driven by the runtime only (an RDMA
    /// queue pair's send path and completions belong to its task). The link answers, so the
    /// session never asks which endpoint kind it runs on.
    fn direct_write_ok(&self) -> bool;
}

impl AsyncConn for TcpStream {
    fn direct_write_ok(&self) -> bool {
        true
    }
}

impl AsyncConn for UnixStream {
    fn direct_write_ok(&self) -> bool {
        true
    }
}

impl AsyncConn for tokio_vsock::VsockStream {
    fn direct_write_ok(&self) -> bool {
        true
    }
}

/// A connection wrapped in another boxed connection (byte counters, test relays) keeps the
/// inner link's answer.
impl AsyncConn for Conn {
    fn direct_write_ok(&self) -> bool {
        (**self).direct_write_ok()
    }
}

/// A boxed connection of any link kind.
pub type Conn = Box<dyn AsyncConn>;

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket call failed.
    #[error("{op} {endpoint}: {source}")]
    Io {
        /// Which call (`connect`, `bind`, ...).
        op: &'static str,
        /// The endpoint it was for.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The link kind is not available in this build or on this machine.
    #[error("{0}")]
    Unsupported(String),
    /// The hypervisor's socket did not answer `CONNECT <port>` with `OK`.
    #[error("hybrid vsock {endpoint}: {reason}")]
    HybridHandshake {
        /// The hybrid vsock endpoint.
        endpoint: String,
        /// What the hypervisor answered (or why nothing came).
        reason: String,
    },
    /// The RDMA link failed (the text comes from [`crate::rdma`]'s error).
    #[error("rdma: {0}")]
    Rdma(String),
}

impl TransportError {
    fn io(op: &'static str, ep: &impl std::fmt::Display, source: io::Error) -> Self {
        TransportError::Io {
            op,
            endpoint: ep.to_string(),
            source,
        }
    }
}

/// Accepts incoming connections of one link kind.
#[async_trait]
pub trait Listener: Send {
    /// Waits for the next connection; the string describes the peer for logs.
    async fn accept(&mut self) -> Result<(Conn, String), TransportError>;
    /// The address actually bound (e.g. with the real port after listening on port 0).
    fn local_endpoint(&self) -> Endpoint;
}

/// One kind of link. Implementations must not be visible to services.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Dials `ep` (already known to be of this kind).
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError>;
    /// Binds `ep` and returns the listener.
    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError>;
}

/// Connects to `ep` with the link its scheme names.
pub async fn connect(ep: &Endpoint) -> Result<Conn, TransportError> {
    transport_for(ep)?.connect(ep).await
}

/// Listens on `ep` with the link its scheme names.
pub async fn listen(ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
    transport_for(ep)?.listen(ep).await
}

/// The implementation for an endpoint's scheme.
pub fn transport_for(ep: &Endpoint) -> Result<&'static dyn Transport, TransportError> {
    match ep {
        Endpoint::Tcp { .. } => Ok(&Tcp),
        Endpoint::Unix { .. } => Ok(&Unix),
        Endpoint::Vsock { .. } => Ok(&Vsock),
        Endpoint::VsockUds { .. } => Ok(&HybridVsock),
        #[cfg(feature = "rdma")]
        Endpoint::Rdma { .. } => Ok(&crate::rdma::Rdma),
        #[cfg(not(feature = "rdma"))]
        Endpoint::Rdma { .. } => Err(TransportError::Unsupported(format!(
            "{ep}: this build has no RDMA support (rebuild with the `rdma` feature)"
        ))),
    }
}

/// TCP with TCP_NODELAY (calls are latency bound) and keepalive (dead peers behind NAT/firewalls).
pub struct Tcp;

fn tune_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

#[async_trait]
impl Transport for Tcp {
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
        let Endpoint::Tcp { host, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not tcp")));
        };
        let s = TcpStream::connect((host.as_str(), *port))
            .await
            .map_err(|e| TransportError::io("connect", ep, e))?;
        tune_tcp(&s);
        Ok(Box::new(s))
    }

    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
        let Endpoint::Tcp { host, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not tcp")));
        };
        let l = TcpListener::bind((host.as_str(), *port))
            .await
            .map_err(|e| TransportError::io("listen", ep, e))?;
        let port = l
            .local_addr()
            .map_err(|e| TransportError::io("listen", ep, e))?
            .port();
        Ok(Box::new(TcpL {
            l,
            ep: Endpoint::Tcp {
                host: host.clone(),
                port,
            },
        }))
    }
}

struct TcpL {
    l: TcpListener,
    ep: Endpoint,
}

#[async_trait]
impl Listener for TcpL {
    async fn accept(&mut self) -> Result<(Conn, String), TransportError> {
        let (s, peer) = self
            .l
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", &self.ep, e))?;
        tune_tcp(&s);
        Ok((Box::new(s), format!("tcp:{peer}")))
    }
    fn local_endpoint(&self) -> Endpoint {
        self.ep.clone()
    }
}

/// Unix stream sockets (same-machine tests, and the host end of proxies).
pub struct Unix;

/// Binds a Unix listener, replacing a stale socket file nobody listens on (a daemon that died
/// leaves one behind) but never a live one.
async fn bind_unix(path: &Path, ep: &Endpoint) -> Result<UnixListener, TransportError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(TransportError::io("listen", ep, e));
            }
            std::fs::remove_file(path).map_err(|e| TransportError::io("listen", ep, e))?;
            UnixListener::bind(path).map_err(|e| TransportError::io("listen", ep, e))
        }
        Err(e) => Err(TransportError::io("listen", ep, e)),
    }
}

#[async_trait]
impl Transport for Unix {
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
        let Endpoint::Unix { path } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not unix")));
        };
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| TransportError::io("connect", ep, e))?;
        Ok(Box::new(s))
    }

    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
        let Endpoint::Unix { path } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not unix")));
        };
        let l = bind_unix(path, ep).await?;
        Ok(Box::new(UnixL {
            l,
            path: path.clone(),
            ep: ep.clone(),
        }))
    }
}

struct UnixL {
    l: UnixListener,
    path: PathBuf,
    ep: Endpoint,
}

impl Drop for UnixL {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait]
impl Listener for UnixL {
    async fn accept(&mut self) -> Result<(Conn, String), TransportError> {
        let (s, _) = self
            .l
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", &self.ep, e))?;
        let peer = match s.peer_cred() {
            Ok(c) => format!("unix:pid={:?},uid={}", c.pid(), c.uid()),
            Err(_) => "unix".to_string(),
        };
        Ok((Box::new(s), peer))
    }
    fn local_endpoint(&self) -> Endpoint {
        self.ep.clone()
    }
}

/// AF_VSOCK (virtio-vsock between a VM or DPU and its host).
pub struct Vsock;

#[async_trait]
impl Transport for Vsock {
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
        let Endpoint::Vsock { cid, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not vsock")));
        };
        if *cid == crate::endpoint::VSOCK_CID_ANY {
            return Err(TransportError::Unsupported(format!(
                "{ep}: cannot connect to CID any; name the peer's CID"
            )));
        }
        let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
            .await
            .map_err(|e| TransportError::io("connect", ep, e))?;
        Ok(Box::new(s))
    }

    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
        let Endpoint::Vsock { cid, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not vsock")));
        };
        let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
            .map_err(|e| TransportError::io("listen", ep, e))?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(*port);
        Ok(Box::new(VsockL {
            l,
            ep: Endpoint::Vsock { cid: *cid, port },
        }))
    }
}

struct VsockL {
    l: tokio_vsock::VsockListener,
    ep: Endpoint,
}

#[async_trait]
impl Listener for VsockL {
    async fn accept(&mut self) -> Result<(Conn, String), TransportError> {
        let (s, peer) = self
            .l
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", &self.ep, e))?;
        Ok((Box::new(s), format!("vsock:{}:{}", peer.cid(), peer.port())))
    }
    fn local_endpoint(&self) -> Endpoint {
        self.ep.clone()
    }
}

/// The host end of a Firecracker / Cloud Hypervisor / vhost-device-vsock "hybrid vsock":
/// a Unix socket speaking `CONNECT <port>\n` → `OK <port>\n`.
pub struct HybridVsock;

/// Longest acknowledgement line accepted; anything longer is not the hybrid vsock protocol.
const MAX_ACK_LINE: usize = 64;

/// Runs the client side of the hybrid vsock handshake on an already connected Unix stream.
pub async fn hybrid_connect_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    port: u32,
    ep: &Endpoint,
) -> Result<(), TransportError> {
    let fail = |reason: String| TransportError::HybridHandshake {
        endpoint: ep.to_string(),
        reason,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| TransportError::io("connect", ep, e))?;
    // Byte by byte: anything after the newline already belongs to the connection.
    let mut line = Vec::with_capacity(16);
    loop {
        let b = s.read_u8().await.map_err(|e| {
            fail(format!(
                "no acknowledgement ({e}); is port {port} listening in the guest?"
            ))
        })?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_ACK_LINE {
            return Err(fail("acknowledgement line too long".into()));
        }
    }
    let line = String::from_utf8_lossy(&line);
    match line.strip_prefix("OK ") {
        Some(p) if p.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(fail(format!("expected \"OK <port>\", got {line:?}"))),
    }
}

#[async_trait]
impl Transport for HybridVsock {
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
        let Endpoint::VsockUds { path, port } = ep else {
            return Err(TransportError::Unsupported(format!(
                "{ep} is not vsock-uds"
            )));
        };
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|e| TransportError::io("connect", ep, e))?;
        hybrid_connect_handshake(&mut s, *port, ep).await?;
        Ok(Box::new(s))
    }

    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
        let Endpoint::VsockUds { path, port } = ep else {
            return Err(TransportError::Unsupported(format!(
                "{ep} is not vsock-uds"
            )));
        };
        // Guest-initiated connections to host port P arrive at "<path>_<P>".
        let mut name = path.as_os_str().to_owned();
        name.push(format!("_{port}"));
        let sock = PathBuf::from(name);
        let l = bind_unix(&sock, ep).await?;
        Ok(Box::new(UnixL {
            l,
            path: sock,
            ep: ep.clone(),
        }))
    }
}
