//! test-images — writes the end-to-end tests' images ([`tests::images`]) to a directory, for
//! harnesses that are scripts rather than Rust tests (the VM tier's VM-as-DPU run builds them on
//! the machine before the guest boots; the guest has no compiler and no registry).
//!
//! Prints one line per image: `<reference> <oci tarball> <docker tarball>`. With the
//! multi-layer image it also writes `whiteout-check.sh` (run it with `sh -c` in a container of
//! that image) and `whiteout-check.out` (what it prints when the layers were applied right).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tests::images::{self, MultiLayerOptions};

#[derive(Parser, Debug)]
#[command(
    name = "test-images",
    about = "Write the test images (multi-layer with whiteouts, pause-like) as OCI and docker-archive tarballs",
    after_help = "Example: test-images --out /tmp/img   (then: ctr image import /tmp/img/oe2e-multi-1-oci.tar)"
)]
struct Args {
    /// Directory to write the tarballs into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Only the multi-layer image (default: both).
    #[arg(long, conflicts_with = "pause_only")]
    multi_only: bool,
    /// Only the pause-like sandbox image (default: both).
    #[arg(long)]
    pause_only: bool,
    /// MiB of incompressible payload in the multi-layer image's top layer (the import benchmark).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    payload_mib: u64,
    /// The static busybox to build from.
    #[arg(long, value_name = "PATH", default_value = images::BUSYBOX)]
    busybox: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut built = Vec::new();
    if !args.pause_only {
        let opts = MultiLayerOptions {
            payload_bytes: args.payload_mib << 20,
            busybox: args.busybox.clone(),
            ..MultiLayerOptions::default()
        };
        built.push(images::build_multi_layer(&args.out, &opts)?);
        // For scripts: the whiteout check (`sh -c` script) and what it prints on success.
        let script = images::WHITEOUT_CHECK
            .last()
            .context("WHITEOUT_CHECK is empty")?;
        std::fs::write(args.out.join("whiteout-check.sh"), script)?;
        std::fs::write(
            args.out.join("whiteout-check.out"),
            images::WHITEOUT_CHECK_OUTPUT,
        )?;
    }
    if !args.multi_only {
        built.push(images::build_pause(&args.out, &args.busybox)?);
    }
    for img in built {
        println!(
            "{} {} {}",
            img.reference,
            img.oci_tar.display(),
            img.docker_tar.display()
        );
    }
    Ok(())
}
