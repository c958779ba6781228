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
pub mod rdma;
/// Pure decoding of the RDMA link's ring description and immediate data (no verbs needed).
#[doc(hidden)]
pub mod rdma_meta;
pub(crate) mod rules;
pub mod service;
pub mod session;
mod stats;
pub mod stream;
pub mod sync;
pub mod wire;

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
///
/// Kept memory must stay bounded in a daemon that runs for months: glibc gives each thread
/// that meets lock contention an arena of its own (up to 8 per core), and every arena keeps
/// its own freed buffers, so a long soak's RSS crept upwards while the live heap stayed flat
/// (docs/RELIABILITY.md, "Soak"). Arenas are therefore capped at one per core, and a
/// housekeeping thread hands freed pages back every [`TRIM_INTERVAL`].
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only adjusts allocator parameters; called before any other thread
        // exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
                libc::mallopt(libc::M_ARENA_MAX, arenas);
            }
        }
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_INTERVAL);
                // SAFETY: malloc_trim takes the allocator's own locks; it only releases
                // free pages.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no allocator housekeeping thread: freed memory is kept");
        }
    }
}

/// How often a daemon that called [`tune_allocator`] returns freed pages to the system: rare
/// enough that a bulk transfer's buffers are reused in between, often enough that a burst's
/// memory does not stay with the process.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
