//! shim-bridge: Unix sockets and container stdio FIFOs of one side made reachable on the other,
//! so an unmodified containerd on the DPU drives `containerd-shim-runc-v2` on the HOST.
//!
//! - [`BridgeService`] (service `"bridge"` inside offloadd): proxy listeners whose connections
//!   become session streams; static rules, watched directories (every socket in a watched HOST
//!   dir gets a proxy at the same path on the DPU), stdio FIFO pumps and remote signals.
//! - [`client`]: calls tools make on a bridge (`remote_kill`, `expose`) and the DPU → HOST
//!   connection settings shared by `offload-shim` and `remote_kill`.
//!
//! Limitation: SCM_RIGHTS (fd passing) cannot cross machines; fds a client sends are closed
//! and a warning is logged, the bytes still go through.

pub mod client;
pub mod config;
mod fifo;
mod forward;
pub mod proto;
mod service;
pub mod shim;
mod watch;

pub use config::{BridgeConfig, ForwardRule, PathMap, Role};
pub use service::{BridgeService, SERVICE};

/// Errors of the bridge library.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// `role` was neither configured nor filled in by offloadd.
    #[error("bridge: role (host or dpu) not set")]
    NoRole,
    /// Invalid configuration.
    #[error("bridge config: {0}")]
    Config(String),
    /// A call to the peer failed (session gone, or the peer refused).
    #[error("bridge call: {0}")]
    Call(#[from] transport::CallError),
    /// The peer sent something undecodable.
    #[error("bridge protocol: {0}")]
    Proto(#[from] postcard::Error),
    /// The peer answered with an unexpected reply.
    #[error("bridge protocol: unexpected reply {0}")]
    Unexpected(String),
    /// Local I/O.
    #[error("bridge I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Reaching the HOST failed.
    #[error("session: {0}")]
    Session(#[from] transport::SessionError),
    /// Key loading failed.
    #[error("key: {0}")]
    Auth(#[from] transport::AuthError),
    /// Bad endpoint.
    #[error("endpoint: {0}")]
    Endpoint(#[from] transport::EndpointError),
}
