//! `offload dpu …`: plan, setup and teardown of the root described by `[rootfs]` (the CLI
//! glue of the `offload` binary; the work is in [`super::apply`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::rootfs;

/// The DPU config file option shared by the subcommands.
#[derive(Args, Debug)]
pub struct ConfigArg {
    /// The DPU's config file (its `[rootfs]` and `[qtfs]` sections are used).
    #[arg(long, value_name = "FILE", default_value = "/etc/offload/dpu.toml")]
    config: PathBuf,
}

/// `offload dpu` subcommands.
#[derive(Subcommand, Debug)]
pub enum DpuCmd {
    /// Print the steps setup takes, each marked `in place` or `to do` (nothing is changed).
    Plan(ConfigArg),
    /// Build the root: mounts, binds, qtfs mounts, shim, wrappers. Idempotent; a failing step
    /// rolls back what this run did and names the step.
    Setup(ConfigArg),
    /// Undo everything setup recorded (unmounts in reverse, removes only what it created).
    Teardown(ConfigArg),
}

fn load(c: &ConfigArg) -> anyhow::Result<(rootfs::QtfsLink, rootfs::RootfsConfig)> {
    Ok(rootfs::DpuFile::load(&c.config)?)
}

fn need_root(what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "offload dpu {what} must run as root (it mounts and unmounts)"
    );
    Ok(())
}

/// Runs one `offload dpu` subcommand.
pub fn run(cmd: DpuCmd) -> anyhow::Result<()> {
    match cmd {
        DpuCmd::Plan(c) => {
            let (link, cfg) = load(&c)?;
            let steps = rootfs::plan(&link, &cfg, &rootfs::find_tools())?;
            let done = rootfs::apply::status(&steps, &cfg.path, &cfg.state_dir)?;
            for (i, (s, d)) in steps.iter().zip(done).enumerate() {
                let mark = if d { "in place" } else { "to do" };
                println!("{:3}  [{mark:>8}]  {s}", i + 1);
            }
            Ok(())
        }
        DpuCmd::Setup(c) => {
            let (link, cfg) = load(&c)?;
            need_root("setup")?;
            let steps = rootfs::plan(&link, &cfg, &rootfs::find_tools())?;
            let rep = rootfs::setup(&steps, &cfg.path, &cfg.state_dir, |s| println!("{s}"))
                .with_context(|| format!("setting up {}", cfg.path.display()))?;
            for n in &rep.notes {
                println!("note: {n}");
            }
            if rep.performed.is_empty() {
                println!(
                    "{} is already set up: nothing to do ({} steps in place)",
                    cfg.path.display(),
                    rep.already
                );
            } else {
                println!(
                    "{} set up: {} step(s) done, {} already in place",
                    cfg.path.display(),
                    rep.performed.len(),
                    rep.already
                );
            }
            Ok(())
        }
        DpuCmd::Teardown(c) => {
            let (_, cfg) = load(&c)?;
            need_root("teardown")?;
            let rep = rootfs::teardown(&cfg.path, &cfg.state_dir, |s| tracing::info!("{s}"))
                .with_context(|| format!("tearing down {}", cfg.path.display()))?;
            for n in &rep.notes {
                println!("note: {n}");
            }
            if rep.nothing_recorded {
                println!(
                    "{}: nothing recorded by setup (no {}): nothing to undo",
                    cfg.path.display(),
                    rootfs::apply::state_path(&cfg.state_dir, &cfg.path).display()
                );
            } else {
                println!(
                    "{} torn down: {} item(s) undone",
                    cfg.path.display(),
                    rep.undone
                );
            }
            Ok(())
        }
    }
}
