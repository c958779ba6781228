//! rexec: run a program on the peer exactly as if it ran here.
//!
//! [`server::ExecService`] is the `"exec"` service (in `offloadd` and `rexec_server`);
//! [`client::run`] drives one remote execution from the calling side (the `rexec` tool).
//! The wire protocol is in [`proto`]. [`mux`] keeps one session for every local `rexec`
//! (the `rexec_mux` daemon), so a call through it needs no handshake of its own.

pub mod client;
pub mod mux;
pub mod proto;
pub mod server;
pub mod spawn;
pub mod sys;

pub use server::{ExecConfig, ExecError, ExecService};
