//! dpu-offload transport: pluggable links (TCP, Unix, vsock, hybrid vsock, RDMA) and the one
//! authenticated, multiplexed session every service runs on.
//!
//! Services implement [`Service`], register in a [`Registry`] and talk through a [`Session`]:
//! request/response [`Session::call`]s and flow-controlled [`Stream`]s, opened by either side.
//! They never see which link carries them.

pub mod auth;
pub mod client;
pub mod endpoint;
pub mod link;
pub mod service;
pub mod session;
pub mod stream;
pub mod wire;
// RDMA
#[cfg(feature = "rdma")]
pub mod rdma;

pub use auth::{resolve_key, AuthError, Key};
pub use client::Client;
pub use endpoint::{Endpoint, EndpointError};
pub use link::{connect, listen, AsyncConn, Conn, Listener, Transport, TransportError};
pub use service::{Registry, RemoteError, Service};
pub use session::{
    serve, CallError, CloseReason, HandshakeError, Session, SessionConfig, SessionError,
};
pub use stream::{Stream, StreamReader, StreamWriter};

pub use async_trait::async_trait;
pub use bytes::Bytes;
