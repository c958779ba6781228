//! dpu-offload transport: pluggable links (TCP, Unix, vsock, hybrid vsock, RDMA) and the one
//! authenticated, multiplexed session every service runs on.
//!
//! Services implement [`Service`], register in a [`Registry`] and talk through a [`Session`]:
//! request/response [`Session::call`]s and flow-controlled [`Stream`]s, opened by either side.
//! They never see which link carries them.

pub mod auth;
pub mod client;
pub mod crypto;
pub(crate) mod dispatch;
pub mod endpoint;
pub(crate) mod handshake;
pub mod link;
pub(crate) mod rules;
pub mod service;
pub mod session;
mod stats;
pub mod stream;
pub mod sync;
pub mod wire;
// RDMA
#[cfg(feature = "rdma")]
pub mod rdma;
/// Pure decoding of the RDMA link's ring description and immediate data (no verbs needed).
#[doc(hidden)]
pub mod rdma_meta;

pub use auth::{resolve_key, AuthError, Key};
pub use client::Client;
pub use crypto::{EncryptPolicy, LinkSettings, TransportConfig};
pub use endpoint::{Endpoint, EndpointError};
pub use link::{connect, listen, AsyncConn, Conn, Listener, Transport, TransportError};
pub use service::{Registry, RemoteError, Service};
pub use session::{
    serve, CallError, CloseReason, HandshakeError, Session, SessionConfig, SessionError,
};
pub use stream::{Stream, StreamReader, StreamWriter};

pub use async_trait::async_trait;
pub use bytes::Bytes;

/// Makes glibc keep freed bulk buffers for reuse instead of unmapping them after every large
/// frame: without it, each fresh receive buffer costs a page fault per 4 KiB (measured at
/// ~12 % of a bridged transfer). Process-wide, so binaries opt in at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
