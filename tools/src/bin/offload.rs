//! offload — the dpu-offload deployment tool. `offload run -- CMD…` supervises a management
//! plane so that its mounts on qtfs paths take effect on the HOST (see `tools::run`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "offload",
    version,
    about = "dpu-offload deployment tool",
    after_help = "DPU:  offload run --addr tcp://HOST:7000 -- chroot /another_rootfs dockerd --data-root /var/lib/docker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run CMD (and all it starts) with mount(2)/umount2(2) on qtfs paths carried out by the
    /// HOST; other mounts run locally. Exits with CMD's status.
    Run(tools::run::RunArgs),
}

fn main() -> ExitCode {
    tools::init_tracing("info");
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(a) => tools::run::run(a),
    };
    match res {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("offload: {e:#}");
            ExitCode::from(125)
        }
    }
}
