//! `offload dpu setup/teardown`: the management plane's root on the DPU, built from the
//! `[rootfs]` section of `dpu.toml` (replacing the seed's mount script).
//!
//! [`config`] parses and validates the section, [`plan`](mod@plan) turns it into an ordered list of steps
//! (pure, unit-tested), [`apply`] performs the missing steps with a record for teardown.

pub mod apply;
pub mod cli;
pub mod config;
pub mod mountinfo;
pub mod plan;

pub use apply::{setup, teardown, DeployError, SetupReport, TeardownReport};
pub use config::{ConfigError, DockerConfig, DpuFile, QtfsLink, RootfsConfig};
pub use plan::{plan, PlanError, Step, Tools};

/// The tools a plan needs, looked up next to the running program (and `/sbin/mount.qtfs`).
pub fn find_tools() -> Tools {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()));
    let near = |name: &str| dir.as_ref().map(|d| d.join(name)).filter(|p| p.is_file());
    Tools {
        sbin_mount_qtfs: std::path::Path::new("/sbin/mount.qtfs").exists(),
        mount_qtfs: near("mount_qtfs").or_else(|| near("mount.qtfs")),
        offload_shim: near("offload-shim"),
        offload: std::env::current_exe().unwrap_or_else(|_| "offload".into()),
    }
}
