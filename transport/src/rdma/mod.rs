//! RDMA link (`rdma://IP:PORT`): a reliable, ordered byte stream over one reliable-connected (RC)
//! queue pair, set up with librdmacm and driven by tokio without a polling thread.
//!
//! # Data path
//! Each side registers a receive ring of [`SLOTS`] slots of [`SLOT_SIZE`] bytes and tells the peer
//! its address and rkey in the connection's private data. A `poll_write` becomes one
//! `RDMA_WRITE_WITH_IMM` of up to one slot straight into the peer's next ring slot (message `k`
//! goes to slot `k % slots`): the payload is placed by the NIC, no bounce buffer on the receive
//! side. Small payloads (up to the QP's inline limit) are posted `IBV_SEND_INLINE`, larger ones are
//! copied once into a registered send slot. The 32-bit immediate carries the length and piggybacks
//! credit returns. Control messages (credit returns when no data flows back, end-of-stream) are
//! zero-length `SEND_WITH_IMM`s.
//!
//! Small data is not sent as a SEND into separate bounce buffers on purpose: writes of every
//! size land in one ordered ring with one receive path and one credit type, and a small inline
//! write costs the same as an inline SEND.
//!
//! Copies per message: one on the sending side (user buffer into the inline WQE or the registered
//! send slot), one on the receiving side (ring slot into the reader's buffer) — the minimum for
//! the `AsyncRead`/`AsyncWrite` byte-stream interface.
//!
//! # Flow control (no RNR by construction)
//! Receive work requests carry no buffer; each side posts `slots + ctrl` of them and reposts one
//! as soon as it polls a receive completion. A sender may have at most `slots` data messages that
//! the peer has not yet *released* (read out of its ring), and at most `ctrl` control messages the
//! peer has not yet *polled*. Both counters travel back cumulatively (mod 256) in every immediate,
//! so at most `slots + ctrl` receives are ever consumed and not yet reposted: the receive queue
//! never runs dry and the QP never sees receiver-not-ready.
//!
//! # Completions
//! One CQ for sends and receives with a completion channel whose fd is registered with tokio
//! (`AsyncFd`); the rdma_cm event channel fd (peer disconnects) likewise. `OFFLOAD_RDMA_POLL=1`
//! switches a connection to busy polling (lower latency, one core spinning while it waits).
//!
//! # Layout
//! - `ring` (always built, unit-tested without RDMA): the slot indexing and both credit
//!   counters as a pure state machine: what arrived, what may be posted now, when credits and
//!   the FIN go out. The immediate and private-data encodings beside it are in
//!   [`crate::rdma_meta`] (fuzzed).
//! - `verbs`: every librdmacm/libibverbs call, each `unsafe` with its reason.
//! - `stream`: `RdmaStream`, the thin driver: completions in, the core's decisions out.
//! - `listen`: `RdmaListener`.
//!
//! Everything but the ring core needs the `rdma` feature (librdmacm and libibverbs).

#[cfg(feature = "rdma")]
mod listen;
pub(crate) mod ring;
#[cfg(feature = "rdma")]
mod stream;
#[cfg(feature = "rdma")]
mod verbs;

use std::io;
use std::net::SocketAddr;
#[cfg(feature = "rdma")]
use std::time::Duration;

use crate::link::TransportError;
use crate::rdma_meta::MetaError;
#[cfg(feature = "rdma")]
pub use {listen::RdmaListener, stream::RdmaStream};

/// Bytes per receive-ring slot, i.e. the largest single RDMA write.
pub const SLOT_SIZE: usize = 32 * 1024;
/// Receive-ring slots per direction (at most 128 so the mod-256 credit counters stay unambiguous).
pub const SLOTS: u32 = 32;
/// Receive work requests reserved for control messages.
#[cfg(feature = "rdma")]
const CTRL: u32 = 8;
/// Bound on connection establishment (peer accepts, or the CM gives up).
#[cfg(feature = "rdma")]
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long dropping a connection waits for its posted writes to be acknowledged.
#[cfg(feature = "rdma")]
const DRAIN_ON_DROP: Duration = Duration::from_millis(500);

/// Process-wide event counters (cheap relaxed atomics), for benchmarks and diagnosis.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Calls into the progress engine (each poll_read / poll_write / poll_shutdown).
    pub progress: u64,
    /// `ibv_poll_cq` calls.
    pub cq_polls: u64,
    /// Work completions processed.
    pub completions: u64,
    /// Completion-channel events (idle -> busy wakeups).
    pub cq_events: u64,
    /// Data messages (RDMA writes) posted.
    pub writes: u64,
    /// Control messages (credit returns, FIN) posted.
    pub ctrl: u64,
}

mod counters {
    use std::sync::atomic::AtomicU64;
    pub static PROGRESS: AtomicU64 = AtomicU64::new(0);
    pub static CQ_POLLS: AtomicU64 = AtomicU64::new(0);
    pub static COMPLETIONS: AtomicU64 = AtomicU64::new(0);
    pub static CQ_EVENTS: AtomicU64 = AtomicU64::new(0);
    pub static WRITES: AtomicU64 = AtomicU64::new(0);
    pub static CTRL: AtomicU64 = AtomicU64::new(0);
}

#[cfg(feature = "rdma")]
fn bump(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// The counters summed over every RDMA connection of this process so far.
pub fn counters() -> Counters {
    use std::sync::atomic::Ordering::Relaxed;
    Counters {
        progress: counters::PROGRESS.load(Relaxed),
        cq_polls: counters::CQ_POLLS.load(Relaxed),
        completions: counters::COMPLETIONS.load(Relaxed),
        cq_events: counters::CQ_EVENTS.load(Relaxed),
        writes: counters::WRITES.load(Relaxed),
        ctrl: counters::CTRL.load(Relaxed),
    }
}

/// Why an RDMA connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device (or none for the address).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs or RDMA CM call failed.
    #[error("{op}: {source}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// errno as an I/O error.
        #[source]
        source: io::Error,
    },
    /// Another RDMA CM listener holds the address.
    #[error("{addr} is already in use by another RDMA listener")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Address or route resolution failed.
    #[error("cannot reach {addr} over RDMA: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: SocketAddr,
        /// The CM event that said so.
        reason: String,
    },
    /// The peer's CM rejected the connection.
    #[error("connection to {addr} refused (nothing listens there over RDMA)")]
    Refused {
        /// The peer's address.
        addr: SocketAddr,
    },
    /// A CM step did not complete in time (the text says which).
    #[error("timed out {0}")]
    Timeout(String),
    /// The peer's ring metadata or immediate data broke the link rules.
    #[error("peer violated the RDMA link protocol: {0}")]
    Protocol(String),
    /// The endpoint's host is not an IP address (RDMA CM needs one).
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
}

#[cfg(feature = "rdma")]
impl RdmaError {
    fn sys(op: &'static str) -> Self {
        RdmaError::Sys {
            op,
            source: io::Error::last_os_error(),
        }
    }
    /// For calls that return a positive errno instead of setting `errno` (the posting verbs).
    fn errno(op: &'static str, rc: i32) -> Self {
        RdmaError::Sys {
            op,
            source: io::Error::from_raw_os_error(rc.abs()),
        }
    }
}

impl From<MetaError> for RdmaError {
    fn from(e: MetaError) -> Self {
        RdmaError::Protocol(e.0)
    }
}

impl From<RdmaError> for TransportError {
    fn from(e: RdmaError) -> Self {
        TransportError::Rdma(e.to_string())
    }
}

#[cfg(feature = "rdma")]
pub use link::Rdma;

#[cfg(feature = "rdma")]
mod link {
    use std::net::{IpAddr, SocketAddr};

    use async_trait::async_trait;

    use super::{RdmaError, RdmaListener, RdmaStream};
    use crate::endpoint::Endpoint;
    use crate::link::{Conn, Listener, Transport, TransportError};

    /// The `rdma://` [`Transport`].
    pub struct Rdma;

    async fn resolve(host: &str, port: u16) -> Result<SocketAddr, RdmaError> {
        if let Ok(ip) = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        {
            return Ok(SocketAddr::new(ip, port));
        }
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| RdmaError::Address(host.to_string(), e.to_string()))?
            .next()
            .ok_or_else(|| RdmaError::Address(host.to_string(), "no address".into()))
    }

    #[async_trait]
    impl Transport for Rdma {
        async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
            let Endpoint::Rdma { host, port } = ep else {
                return Err(TransportError::Unsupported(format!("{ep} is not rdma")));
            };
            let addr = resolve(host, *port).await?;
            Ok(Box::new(RdmaStream::connect(addr).await?))
        }

        async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
            let Endpoint::Rdma { host, port } = ep else {
                return Err(TransportError::Unsupported(format!("{ep} is not rdma")));
            };
            let addr = resolve(host, *port).await?;
            Ok(Box::new(RdmaListener::bind(addr)?))
        }
    }
}
