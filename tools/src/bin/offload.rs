//! offload — the dpu-offload deployment tool. `offload dpu setup --config /etc/offload/dpu.toml`
//! builds the management plane's root on the DPU from the file's `[rootfs]` section (replacing
//! the seed's mount script); `offload dpu teardown` undoes it (see `tools::rootfs`). Each
//! subcommand's code lives in its own library module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "offload",
    version,
    about = "dpu-offload deployment tool",
    after_help = "Examples:\n  offload dpu plan --config /etc/offload/dpu.toml\n  offload dpu setup --config /etc/offload/dpu.toml\n  offload dpu teardown --config /etc/offload/dpu.toml\nExample configs: tools/examples/dpu.toml, tools/examples/host.toml."
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
}

fn main() -> ExitCode {
    tools::init_tracing("warn");
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Dpu(c) => tools::rootfs::cli::run(c),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offload: {e:#}");
            ExitCode::FAILURE
        }
    }
}
