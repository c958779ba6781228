//! Builds the end-to-end test images (tests/src/images.rs) from the local busybox-static into a
//! directory, for shell use and benchmarks: the multi-layer image (optionally with an
//! incompressible payload, e.g. `--payload-mib 48` for the ~50 MB import benchmark) and the
//! pause-like sandbox image, each as an OCI layout tarball and a docker-archive tarball.
//!
//! Prints one line per file: `REF FORMAT PATH MANIFEST_DIGEST`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tests::images::{self, MultiLayerOptions};

/// Build the dpu-offload test images (no registry needed).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Output directory (created if missing).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Incompressible payload added in the multi-layer image's third layer, in MiB.
    #[arg(long, default_value_t = 0)]
    payload_mib: u64,
    /// Reference of the multi-layer image.
    #[arg(long, default_value = images::MULTI_REF)]
    reference: String,
    /// The static busybox to build from.
    #[arg(long, default_value = images::BUSYBOX)]
    busybox: PathBuf,
    /// Skip the pause image.
    #[arg(long)]
    no_pause: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let multi = images::build_multi_layer(
        &a.out,
        &MultiLayerOptions {
            reference: a.reference.clone(),
            payload_bytes: a.payload_mib << 20,
            busybox: a.busybox.clone(),
        },
    )
    .context("build the multi-layer image")?;
    let mut built = vec![multi];
    if !a.no_pause {
        built.push(images::build_pause(&a.out, &a.busybox).context("build the pause image")?);
    }
    for i in &built {
        println!(
            "{} oci {} {}",
            i.reference,
            i.oci_tar.display(),
            i.manifest_digest
        );
        println!(
            "{} docker {} {}",
            i.reference,
            i.docker_tar.display(),
            i.manifest_digest
        );
    }
    Ok(())
}
