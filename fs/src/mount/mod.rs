//! Mount forwarding: mount(2)/umount2(2) that a DPU's management plane (dockerd, containerd)
//! makes on qtfs paths are carried out by the HOST with the same paths, so that runc on the
//! HOST finds e.g. an overlay2 `merged` directory mounted, and the DPU sees it through qtfs.
//!
//! - [`proto`]: the `mount` service's wire messages.
//! - [`spec`]: pure translation of a trapped syscall (flags, option strings, DPU → HOST paths);
//!   used by the DPU-side supervisor (`offload run`, seccomp user notification).
//! - [`host`]: [`MountService`], the HOST side with its allow-list (`[mount]` in `host.toml`).

pub mod host;
pub mod proto;
pub mod spec;

pub use host::{AllowRule, MountConfig, MountConfigError, MountService};
