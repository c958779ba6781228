//! Runs one host-network pod through its whole CRI life against a runtime socket (tests/src/cri.rs
//! `run_pod_lifecycle`), e.g. against the DPU's containerd, and prints what the runtime answered.
//! The images must be in the runtime already (`ctr -n k8s.io image import`, see `oe2e-images`).
//! Exits non-zero if a step fails or the answers are not those of a working runtime.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tests::cri::{self, PodSpec};

/// Drive a CRI runtime through a pod's life: RunPodSandbox … RemovePodSandbox.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The runtime's CRI socket (containerd's gRPC socket).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    socket: PathBuf,
    /// Image of the workload container.
    #[arg(long, default_value = tests::images::MULTI_REF)]
    image: String,
    /// Pod name.
    #[arg(long, default_value = "oecri-pod")]
    name: String,
    /// Cgroup parent of the pod ("" = the runtime's default).
    #[arg(long, default_value = "")]
    cgroup_parent: String,
    /// Directory for container logs (none if not given).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Limit for each CRI call, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Also check that the pod's processes run on this machine (pid, pid namespace, cgroup).
    #[arg(long)]
    check_local: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut spec = PodSpec::new(&a.socket, &a.name);
    spec.image = a.image;
    spec.cgroup_parent = a.cgroup_parent;
    spec.log_directory = a.log_dir;
    spec.call_timeout = Duration::from_secs(a.timeout);
    let check_local = a.check_local;
    let r = cri::run_pod_lifecycle_blocking(&spec, |r| {
        if check_local {
            cri::check_on_this_host(r)
        } else {
            Ok(())
        }
    })
    .context("pod lifecycle")?;
    println!(
        "runtime: {} {} (CRI {})",
        r.runtime.0, r.runtime.1, r.runtime.2
    );
    println!(
        "sandbox {} pid {}; container {} pid {} ({})",
        r.running.sandbox_id,
        r.running.sandbox_pid,
        r.running.container_id,
        r.running.container_pid,
        r.running.pid_ns_inside
    );
    println!("exec `echo hi`: {:?}", r.exec_echo);
    println!("exec failing: {:?}", r.exec_fail);
    println!(
        "stats: cpu {:?} ns, memory working set {:?} bytes",
        r.stats
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map(|v| v.value),
        r.stats
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value)
    );
    for (step, d) in &r.timings {
        println!("  {step:<18} {:>9.1} ms", d.as_secs_f64() * 1e3);
    }
    let bad = r.problems();
    if !bad.is_empty() {
        bail!("unexpected answers:\n  {}", bad.join("\n  "));
    }
    println!("ok");
    Ok(())
}
