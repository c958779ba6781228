//! shim-bridge: Unix sockets and container stdio FIFOs of one side made reachable on the other,
//! so an unmodified containerd on the DPU drives `containerd-shim-runc-v2` on the HOST.
//!
//! - [`BridgeService`] (service `"bridge"` inside offloadd): proxy listeners whose accepted
//!   connections become session streams; the far side connects to the real socket and pumps
//!   both ways with half-close kept. Static rules, watched directories (every socket in a
//!   watched HOST dir gets a proxy at the same path on each DPU, removed when it goes), stdio
//!   FIFO pumps and remote signals.
//! - [`shim`] + `offload-shim`: the DPU's `containerd-shim-runc-v2` runs the real one on the
//!   HOST through the exec service and prints its output byte for byte.
//! - [`client`]: calls tools make on a bridge (`remote_kill`, `expose`) and the DPU → HOST
//!   connection settings shared by `offload-shim` and `remote_kill`.
//!
//! Deployment for containerd 1.6 (HOST runs no containerd of its own):
//!
//! ```toml
//! # HOST /etc/offload/host.toml
//! [exec]
//! allow = ["/usr/bin/containerd-shim-runc-v2"]
//! [bridge]
//! watch = ["/run/containerd/s"]          # shim sockets -> proxies on every DPU
//! fifo_dirs = ["/run/containerd/fifo"]   # accept stdio FIFOs the DPU mirrors here
//! allow_listen = ["/run/containerd"]     # where the DPU may ask for listeners
//!
//! # DPU /etc/offload/dpu.toml
//! [bridge]
//! fifo_dirs = ["/run/containerd/fifo"]   # ctr's FIFOs, mirrored to the HOST
//! [[bridge.forward]]                     # containerd's event socket, used by HOST shims
//! listen_side = "host"
//! path = "/run/containerd/containerd.sock.ttrpc"
//! [bridge.shim]                          # read by offload-shim / remote_kill
//! connect = "vsock://2:7000"
//! ```
//!
//! Paths on the wire are the HOST's names; `[[bridge.map]]` rewrites them on a side whose
//! tree lives elsewhere (e.g. `/another_rootfs`, or tests running both sides on one machine).
//! Security: the side owning a socket only connects for the peer to sockets it exports (its
//! static rules, sockets directly in its watched dirs, `allow_connect` prefixes), and only
//! listens where `allow_listen` permits; FIFOs only under `fifo_dirs`; `..` is refused.
//!
//! Stdio FIFO ordering (`fifo.rs`): stdout/stderr are read on the HOST from the moment the
//! FIFO is mirrored (nothing the shim writes is lost); stdin is opened on the DPU only after the
//! HOST shim opened its end, so `ctr` sees the same blocking as with a local shim.
//!
//! Limitations: SCM_RIGHTS (fd passing) cannot cross machines; fds a client sends are closed
//! and a warning is logged, the bytes still go through. Stdio FIFOs are mirrored when they
//! appear (inotify): the HOST copy exists within milliseconds, before the shim's `Create`
//! normally arrives, but this ordering is not enforced by containerd.

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
