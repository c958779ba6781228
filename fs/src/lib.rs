//! qtfs: HOST directories, `/proc`, `/sys` and cgroup mounted on the DPU through FUSE.
//!
//! - [`proto`]: the handle-based wire protocol of the `fs` service.
//! - [`server`]: [`FsService`], the HOST side (exports resolved beneath their roots).
//! - [`client`]: [`QtfsFs`], the DPU side FUSE filesystem used by `mount.qtfs`.
//! - [`fifo`]: tunnels that join a FIFO's DPU pipe and its HOST pipe.
//! - [`notify`]: the change feed (HOST-side changes pushed to DPU mounts).
//! - `procview`: proc mode's rule for the caller's own processes.
//! - [`mount`]: mount forwarding (the `mount` service and the DPU-side translation).

pub mod client;
pub mod fifo;
#[cfg(test)]
mod memfs;
pub mod mount;
pub mod notify;
mod procview;
pub mod proto;
pub mod server;
mod streams;
mod sys;

pub use client::{ClientError, MountOptions, QtfsFs};
pub use server::{Export, FsConfig, FsError, FsService};
