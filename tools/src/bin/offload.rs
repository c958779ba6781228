//! offload — the dpu-offload deployment tool. `offload dpu setup --config /etc/offload/dpu.toml`
//! builds the management plane's root on the DPU from the file's `[rootfs]` section (replacing
//! the seed's mount script); `offload dpu teardown` undoes it (see `tools::rootfs`).
//! `offload run -- CMD…` supervises a management plane so that its mounts on qtfs paths take
//! effect on the HOST (see `tools::run`). Each subcommand's code lives in its own library module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "offload",
    version,
    about = "dpu-offload deployment tool",
    after_help = "Examples:\n  offload dpu plan --config /etc/offload/dpu.toml\n  offload dpu setup --config /etc/offload/dpu.toml\n  offload dpu teardown --config /etc/offload/dpu.toml\n  offload run --addr tcp://HOST:7000 -- chroot /another_rootfs dockerd --data-root /var/lib/docker\n  offload status [--json] [--watch]\nExample configs: tools/examples/dpu.toml, tools/examples/host.toml."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Prepare or undo the DPU side (the management plane's root).
    #[command(subcommand)]
    Dpu(tools::rootfs::cli::DpuCmd),
    /// Run CMD (and all it starts) with mount(2)/umount2(2) on qtfs paths carried out by the
    /// HOST; other mounts run locally. Exits with CMD's status.
    #[cfg(feature = "seccomp")]
    Run(tools::run::RunArgs),
    /// Show what the local daemons' links and services are doing: sessions (peer, transport,
    /// uptime, reconnects, round trip, bytes), per-service and per-fs-op counts, errors and
    /// p50/p99 latencies, bridge traffic, qtfs mounts. Asks each offloadd's control socket.
    Status(tools::status::StatusArgs),
    /// Write man pages for offload and every dpu-offload binary next to it into DIR
    /// (generated from their command-line definitions).
    GenMan {
        /// Output directory (created if missing).
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tools::man::generate_if_asked(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GenMan { dir } => {
            match tools::man::gen_all(<Cli as clap::CommandFactory>::command(), &dir) {
                Ok(pages) => {
                    for p in pages {
                        println!("{}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("offload gen-man: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status(a) => {
            tools::init_tracing("warn");
            match tools::status::run(a) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("offload: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Dpu(c) => {
            tools::init_tracing("warn");
            match tools::rootfs::cli::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("offload: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "seccomp")]
        Cmd::Run(a) => {
            tools::init_tracing("info");
            match tools::run::run(a) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("offload: {e:#}");
                    ExitCode::from(125)
                }
            }
        }
    }
}
