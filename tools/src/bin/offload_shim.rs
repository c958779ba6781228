//! offload-shim — installed on the DPU as `containerd-shim-runc-v2`.
//!
//! containerd on the DPU runs `containerd-shim-runc-v2 -namespace NS -address A
//! -publish-binary B -id ID start` (and later `... delete`). This binary runs the *real* shim on
//! the HOST with the same arguments, working directory (the bundle dir, shared by the fs
//! service), environment and stdin, through the exec service; after `start` it asks the HOST's
//! bridge to expose the shim's new socket on this DPU (and waits until the proxy exists here),
//! then prints exactly what the real shim printed, stdout and stderr, and exits with its code.
//!
//! containerd reads the combined output of `start` as the shim address, so this program never
//! logs to stdout/stderr: set `OFFLOAD_SHIM_LOG=/path/file` (and `RUST_LOG`) to get logs.
//!
//! HOST address: `CMD_NET_ADDR` (or `OFFLOAD_HOST_ADDR`), else `[bridge.shim] connect` in
//! `/etc/offload/dpu.toml` (`OFFLOAD_DPU_CONFIG` overrides the path). Key: `OFFLOAD_KEY_FILE`,
//! `[bridge.shim] key_file`, `/etc/offload/psk`. Real shim on the HOST: `OFFLOAD_REAL_SHIM`,
//! `[bridge.shim] real`, `/usr/bin/containerd-shim-runc-v2`.

use anyhow::Context;
use bytes::Bytes;
use shim_bridge::client::{expose, HostLink, DPU_CONFIG};
use shim_bridge::shim::{run_capture, socket_of_start_output, REAL_SHIM};
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long to wait for the proxy of a fresh shim socket to appear on this side.
const PROXY_WAIT: Duration = Duration::from_secs(5);

fn init_log() {
    let Some(path) = std::env::var_os("OFFLOAD_SHIM_LOG") else {
        return;
    };
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

fn main() {
    tools::man::generate_if_asked(|| {
        clap::Command::new("offload-shim")
            .version(env!("CARGO_PKG_VERSION"))
            .about("The DPU's containerd-shim-runc-v2: runs the real shim on the HOST")
            .long_about(HELP)
    });
    init_log();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") && args.len() == 1 {
        print!("{}", HELP);
        return;
    }
    // Its own version (containerd's `-v` still goes to the real shim on the HOST).
    if args.len() == 1 && args[0] == "--version" {
        println!("offload-shim {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "offload-shim failed");
            // Only reached when the real shim never ran: containerd shows this in its error.
            eprintln!("offload-shim: {e:#}");
            std::process::exit(1);
        }
    }
}

const HELP: &str =
    "offload-shim: the DPU's containerd-shim-runc-v2; runs the real shim on the HOST.
Install as containerd-shim-runc-v2 in containerd's PATH on the DPU.
Environment: CMD_NET_ADDR (HOST endpoint), OFFLOAD_KEY_FILE, OFFLOAD_REAL_SHIM,
OFFLOAD_DPU_CONFIG (default /etc/offload/dpu.toml, section [bridge.shim]), OFFLOAD_SHIM_LOG.
";

fn run(args: Vec<OsString>) -> anyhow::Result<i32> {
    let config = std::env::var_os("OFFLOAD_DPU_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DPU_CONFIG));
    let link = HostLink {
        allow_unauthenticated: std::env::var_os("OFFLOAD_ALLOW_UNAUTHENTICATED").is_some(),
        ..Default::default()
    }
    .resolve(&config)?;
    let real = std::env::var_os("OFFLOAD_REAL_SHIM")
        .map(PathBuf::from)
        .or(link.real_shim.clone())
        .unwrap_or_else(|| PathBuf::from(REAL_SHIM));
    let action = args.last().cloned().unwrap_or_default();

    let mut argv = vec![real.as_os_str().as_bytes().to_vec()];
    argv.extend(args.into_iter().map(OsString::into_vec));
    let env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(k, v)| (k.into_vec(), v.into_vec()))
        .collect();
    let cwd = std::env::current_dir().context("current directory")?;
    // `start` gets the runtime options protobuf (or /dev/null) on stdin; it is small and finite.
    let mut stdin = Vec::new();
    if !std::io::stdin().is_terminal() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let out = rt.block_on(async {
        let session = link.connect().await.context("connecting to the HOST")?;
        tracing::info!(action = ?action, cwd = %cwd.display(), "running the real shim on the HOST");
        let out = run_capture(
            &session,
            argv,
            env,
            Some(cwd.as_os_str().as_bytes().to_vec()),
            Bytes::from(stdin),
        )
        .await
        .context("running the shim on the HOST")?;
        if action == "start" && out.code == 0 {
            if let Some(sock) = socket_of_start_output(&out.stdout()) {
                make_reachable(&session, &sock).await;
            }
        }
        session.close();
        anyhow::Ok(out)
    })?;
    if let Some(why) = &out.not_started {
        tracing::error!(
            why,
            code = out.code,
            "the real shim did not start on the HOST"
        );
        eprintln!(
            "offload-shim: {} did not start on the HOST: {why}",
            real.display()
        );
    }
    let (mut o, mut e) = (std::io::stdout().lock(), std::io::stderr().lock());
    for (fd, b) in &out.output {
        let r = if *fd == 1 {
            o.write_all(b).and_then(|_| o.flush())
        } else {
            e.write_all(b)
        };
        if r.is_err() {
            break;
        }
    }
    Ok(out.code)
}

/// Asks the HOST to expose `sock` on every bridge peer and waits until it exists here.
async fn make_reachable(session: &transport::Session, sock: &std::path::Path) {
    let name = sock.display().to_string();
    match expose(session, &name).await {
        Ok(n) => tracing::info!(sock = name, peers = n, "shim socket exposed"),
        Err(e) => {
            tracing::warn!(sock = name, error = %e, "HOST could not expose the shim socket; relying on the watched dir")
        }
    }
    let start = Instant::now();
    while start.elapsed() < PROXY_WAIT {
        if std::fs::symlink_metadata(sock).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::warn!(
        sock = name,
        "no proxy for the shim socket on this side; containerd will fail to connect"
    );
}
