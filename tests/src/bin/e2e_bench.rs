//! e2e-bench — the issue 11 benchmark: containerd on a separated DPU (tests/src/e2e) against a
//! containerd directly on the HOST (tests/src/scratch_containerd.rs), same run, same images.
//!
//! - `ctr run --rm IMG ID true`, start to exit, issued on the DPU vs on the HOST (median of
//!   `--runs`, default 20; the single-layer busybox image);
//! - `ctr image import` of the multi-layer image with `--payload-mib` (default 48: ~50 MB) on the
//!   DPU over qtfs vs on the HOST (median of `--imports`, each followed by `image rm --sync`).
//!
//! - with `--docker` (issue 12): `docker run --rm IMG true` with dockerd on the DPU (under
//!   `offload run`, overlay2 mounts forwarded to the HOST) vs a private dockerd on the HOST
//!   (tests/src/scratch_dockerd.rs), median of `--runs`, the multi-layer image.
//!
//! Both sides are timed the same way: `date +%s%N` around `ctr` inside one shell. Needs root and
//! the built binaries: `cargo build --workspace --bins && sudo target/debug/e2e-bench`.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use tests::e2e::{image, run_timeout, Lab, LabOptions, Run};
use tests::images;
use tests::scratch_containerd::{ScratchContainerd, ScratchOptions};

#[derive(Parser, Debug)]
#[command(
    name = "e2e-bench",
    about = "containerd on a separated DPU vs directly on the HOST: ctr run --rm latency and image import time"
)]
struct Args {
    /// `ctr run --rm` runs per side (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Imports per side (each followed by `ctr image rm --sync`).
    #[arg(long, default_value_t = 3)]
    imports: usize,
    /// MiB of incompressible payload in the multi-layer image's third layer.
    #[arg(long, default_value_t = 48)]
    payload_mib: u64,
    /// Skip the `ctr run --rm` part.
    #[arg(long)]
    no_run: bool,
    /// Skip the import part.
    #[arg(long)]
    no_import: bool,
    /// Instead: `docker run --rm IMG true`, dockerd on the DPU vs dockerd on the HOST.
    #[arg(long)]
    docker: bool,
    /// Deploy this offload-shim on the DPU instead of the build's own, e.g. the static build
    /// (`cargo static-bins`: `target/<host triple>/release/offload-shim`).
    #[arg(long, value_name = "PATH")]
    shim: Option<std::path::PathBuf>,
    /// Instead: one traced `ctr run --rm` on the DPU (after two warm-up runs): the log lines of
    /// containerd, offload-shim and the HOST offloadd written during it, merged by time, with
    /// milliseconds since the start (run with RUST_LOG=debug for the daemons' detail).
    #[arg(long)]
    trace: bool,
}

const NS: &str = "oe2eb";
const LIMIT: Duration = Duration::from_secs(120);
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Wraps `ctr ARGS` in a shell that prints the nanoseconds it took on its last line.
fn timed_script(ctr: &str) -> String {
    format!("s=$(date +%s%N); {ctr} >/dev/null || exit $?; e=$(date +%s%N); echo $((e - s))")
}

fn nanos(r: &Run, what: &str) -> anyhow::Result<f64> {
    anyhow::ensure!(
        r.code == Some(0),
        "{what}: {}\n{}\n{}",
        r.describe(),
        r.stdout,
        r.stderr
    );
    let last = r.stdout.lines().last().unwrap_or_default();
    Ok(last.trim().parse::<f64>()? / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn host_sh(script: &str) -> Run {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    run_timeout(c, LIMIT)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let res = bench(&args);
    // ctr's default cgroups of the HOST-side runs (`/oe2eb/<id>`); the lab removes its own.
    tests::e2e::remove_namespace_cgroups(NS);
    res
}

/// `docker run --rm IMG true` on the DPU (offloaded dockerd) vs a dockerd on the HOST.
fn bench_docker(args: &Args) -> anyhow::Result<()> {
    let Some(lab) = Lab::start(
        "e2e-bench",
        LabOptions {
            docker: true,
            shim: args.shim.clone(),
            ..LabOptions::default()
        },
    ) else {
        anyhow::bail!("cannot run a lab here (see the SKIPPED line)");
    };
    let host = tests::scratch_dockerd::ScratchDockerd::start()?;
    let work = lab.dir().join("bench");
    std::fs::create_dir_all(&work)?;
    let img = images::build_multi_layer(&work, &images::MultiLayerOptions::default())?;
    std::fs::copy(&img.docker_tar, lab.dpu_root_path("/tmp/multi-docker.tar"))?;
    lab.docker(&["load", "-i", "/tmp/multi-docker.tar"], LIMIT)
        .ok("docker load on the DPU");
    let tar = img.docker_tar.display().to_string();
    host.docker_ok(&["load", "-i", &tar])?;
    let ddk = "docker -H unix:///run/docker.sock";
    let hdk = format!("docker -H unix://{}", host.socket().display());
    let limit = Duration::from_secs(90);
    println!("| measurement | DPU (offloaded) | HOST (direct) | ratio |");
    println!("|---|---|---|---|");
    let (mut d, mut h) = (Vec::new(), Vec::new());
    for i in 0..args.runs + 1 {
        // No network on either side: the DPU's dockerd runs with --bridge=none (networking is
        // not offloaded; `--network none` would add libnetwork's prestart hook, a DPU program
        // runc on the HOST cannot run), the scratch dockerd needs `--network none`.
        let dr = lab.dpu_sh(
            &timed_script(&format!("{ddk} run --rm {} true", img.docker_tag)),
            limit,
        );
        let hr = host_sh(&timed_script(&format!(
            "{hdk} run --rm --network none {} true",
            img.docker_tag
        )));
        let (dm, hm) = (
            nanos(&dr, "docker run --rm on the DPU")?,
            nanos(&hr, "docker run --rm on the HOST")?,
        );
        // The first run of each side warms caches: not counted.
        if i > 0 {
            d.push(dm);
            h.push(hm);
        }
    }
    let (dm, hm) = (median(d), median(h));
    println!(
        "| `docker run --rm IMG true`, median of {} | {dm:.1} ms | {hm:.1} ms | {:.2}x |",
        args.runs,
        dm / hm
    );
    Ok(())
}

/// Seconds since midnight UTC of the first `YYYY-MM-DDTHH:MM:SS.fff…` timestamp in `line`.
fn line_time(line: &str) -> Option<f64> {
    let b = line.as_bytes();
    (0..b.len().saturating_sub(19)).find_map(|i| {
        let t = &line.get(i..)?;
        let ok = t.len() >= 20
            && t.as_bytes()[4] == b'-'
            && t.as_bytes()[10] == b'T'
            && t.as_bytes()[13] == b':'
            && t.as_bytes()[19] == b'.';
        if !ok {
            return None;
        }
        let h: f64 = t.get(11..13)?.parse().ok()?;
        let m: f64 = t.get(14..16)?.parse().ok()?;
        let frac: String = t[20..].chars().take_while(|c| c.is_ascii_digit()).collect();
        let sec: f64 = format!("{}.{frac}", t.get(17..19)?).parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + sec)
    })
}

/// Seconds since midnight UTC of the `date -u +%H:%M:%S.%N` lines in `out`.
fn day_seconds(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let (hms, frac) = l.split_once('.')?;
            let mut p = hms.split(':').map(|x| x.parse::<f64>().ok());
            let (h, m, sec) = (p.next()??, p.next()??, p.next()??);
            Some(h * 3600.0 + m * 60.0 + sec + format!("0.{frac}").parse::<f64>().ok()?)
        })
        .collect()
}

/// Runs `ctr` (a `ctr … run --rm …` command line) through `sh` twice to warm up and once traced,
/// then prints the lines of `logs()` written during the traced run, merged by time.
fn traced_run(
    side: &str,
    sh: &dyn Fn(&str) -> Run,
    ctr: &dyn Fn(&str) -> String,
    logs: &dyn Fn() -> Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    for i in 0..2 {
        sh(&format!("{} >/dev/null", ctr(&format!("w{i}")))).ok("warm-up run");
    }
    let r = sh(&format!(
        "date -u +%H:%M:%S.%N; {} >/dev/null; date -u +%H:%M:%S.%N",
        ctr("traced")
    ));
    let stamps = day_seconds(&r.stdout);
    anyhow::ensure!(stamps.len() == 2, "traced run: {}", r.describe());
    let (t0, t1) = (stamps[0], stamps[1]);
    let mut lines: Vec<(f64, &str, String)> = Vec::new();
    let sources = logs();
    for (name, text) in &sources {
        for l in text.lines() {
            if let Some(t) = line_time(l) {
                if t >= t0 - 0.001 && t <= t1 + 0.05 {
                    lines.push((t, name, l.chars().take(220).collect()));
                }
            }
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!(
        "\n## traced `ctr run --rm IMG true` on the {side}: {:.1} ms\n",
        (t1 - t0) * 1e3
    );
    for (t, name, l) in lines {
        println!("{:8.1} {name:<10} {l}", (t - t0) * 1e3);
    }
    Ok(())
}

/// One traced `ctr run --rm` on the DPU and one on a HOST containerd, for a phase comparison.
fn trace(lab: &Lab, dctr: &str) -> anyhow::Result<()> {
    let tar = lab.dir().join("bbox.tar");
    image::busybox(lab.dir(), &tar);
    std::fs::copy(&tar, lab.dpu_root_path("/tmp/bbox.tar"))?;
    lab.ctr(&["image", "import", "/tmp/bbox.tar"], LIMIT)
        .ok("import on the DPU");
    // OE2E_STRACE=FILE: a syscall summary of the DPU's containerd (all threads) during the runs.
    let strace = std::env::var_os("OE2E_STRACE").and_then(|out| {
        let pid = lab.containerd_pid()?;
        Command::new("strace")
            .args(["-f", "-T", "-e", "trace=openat,newfstatat,unlinkat,mkdirat,renameat,fdatasync,readlinkat,getdents64,statx", "-o"])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .spawn()
            .ok()
    });
    if strace.is_some() {
        std::thread::sleep(Duration::from_millis(500));
    }
    traced_run(
        "DPU",
        &|script| lab.dpu_sh(script, RUN_LIMIT),
        &|id| format!("{dctr} run --rm {} {id} true", image::BBOX),
        &|| {
            vec![
                ("containerd", lab.dpu_log("containerd.log")),
                ("shim", lab.dpu_log("shim.log")),
                ("host", lab.host_log()),
            ]
        },
    )?;
    if let Some(mut st) = strace {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(st.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = st.wait();
    }
    let host = ScratchContainerd::start(&ScratchOptions {
        namespaces: vec![NS.into()],
        log_level: "debug".into(),
        ..Default::default()
    })?;
    host.import(NS, &tar)?;
    let hctr = format!("ctr --address {} -n {NS}", host.socket().display());
    let fifo = host.fifo_dir();
    traced_run(
        "HOST",
        &|script| host_sh(script),
        &|id| {
            format!(
                "{hctr} run --rm --fifo-dir {} {} {id} true",
                fifo.display(),
                image::BBOX
            )
        },
        &|| vec![("containerd", host.log())],
    )
}

fn bench(args: &Args) -> anyhow::Result<()> {
    let opts = || LabOptions {
        shim: args.shim.clone(),
        ..LabOptions::default()
    };
    if args.docker {
        return bench_docker(args);
    }
    if args.trace {
        let Some(lab) = Lab::start("e2e-bench", opts()) else {
            anyhow::bail!("cannot run a lab here (see the SKIPPED line)");
        };
        let dctr = format!(
            "ctr --address {} -n {}",
            tests::e2e::CONTAINERD_SOCK,
            tests::e2e::NS
        );
        return trace(&lab, &dctr);
    }
    let Some(lab) = Lab::start("e2e-bench", opts()) else {
        anyhow::bail!("cannot run a lab here (see the SKIPPED line)");
    };
    let host = ScratchContainerd::start(&ScratchOptions {
        namespaces: vec![NS.into()],
        ..Default::default()
    })?;
    let hctr = format!("ctr --address {} -n {NS}", host.socket().display());
    let dctr = format!(
        "ctr --address {} -n {}",
        tests::e2e::CONTAINERD_SOCK,
        tests::e2e::NS
    );
    let work = lab.dir().join("bench");
    std::fs::create_dir_all(&work)?;
    println!("| measurement | DPU (offloaded) | HOST (direct) | ratio |");
    println!("|---|---|---|---|");
    if !args.no_run {
        let tar = work.join("bbox.tar");
        image::busybox(&work, &tar);
        std::fs::copy(&tar, lab.dpu_root_path("/tmp/bbox.tar"))?;
        lab.ctr(&["image", "import", "/tmp/bbox.tar"], LIMIT)
            .ok("import on the DPU");
        host.import(NS, &tar)?;
        let fifo = host.fifo_dir();
        let (mut d, mut h) = (Vec::new(), Vec::new());
        for i in 0..args.runs + 1 {
            let dr = lab.dpu_sh(
                &timed_script(&format!("{dctr} run --rm {} b{i} true", image::BBOX)),
                RUN_LIMIT,
            );
            let hr = host_sh(&timed_script(&format!(
                "{hctr} run --rm --fifo-dir {} {} b{i} true",
                fifo.display(),
                image::BBOX
            )));
            let (dm, hm) = (
                nanos(&dr, "ctr run --rm on the DPU")?,
                nanos(&hr, "ctr run --rm on the HOST")?,
            );
            // The first run of each side warms caches (binaries, the shim lookup): not counted.
            if i > 0 {
                d.push(dm);
                h.push(hm);
            }
        }
        let (dm, hm) = (median(d), median(h));
        println!(
            "| `ctr run --rm IMG true`, median of {} | {dm:.1} ms | {hm:.1} ms | {:.2}x |",
            args.runs,
            dm / hm
        );
    }
    if !args.no_import {
        let img = images::build_multi_layer(
            &work,
            &images::MultiLayerOptions {
                payload_bytes: args.payload_mib << 20,
                ..Default::default()
            },
        )?;
        let size = std::fs::metadata(&img.oci_tar)?.len();
        std::fs::copy(&img.oci_tar, lab.dpu_root_path("/tmp/multi.tar"))?;
        let (mut d, mut h) = (Vec::new(), Vec::new());
        for _ in 0..args.imports {
            let dr = lab.dpu_sh(
                &timed_script(&format!("{dctr} image import /tmp/multi.tar")),
                LIMIT,
            );
            d.push(nanos(&dr, "import on the DPU")?);
            lab.dpu_sh(&format!("{dctr} image rm --sync {}", img.reference), LIMIT)
                .ok("image rm on the DPU");
            let hr = host_sh(&timed_script(&format!(
                "{hctr} image import {}",
                img.oci_tar.display()
            )));
            h.push(nanos(&hr, "import on the HOST")?);
            host_sh(&format!("{hctr} image rm --sync {}", img.reference))
                .ok("image rm on the HOST");
        }
        let (dm, hm) = (median(d), median(h));
        println!(
            "| `ctr image import` {:.1} MB, {} layers, median of {} | {dm:.0} ms | {hm:.0} ms | {:.2}x |",
            size as f64 / 1e6,
            img.layers.len(),
            args.imports,
            dm / hm
        );
    }
    Ok(())
}
