//! offloadd — the dpu-offload daemon. On the HOST it listens and serves the configured
//! services (fs exports, exec, the shim bridge) over one authenticated session per peer; on the
//! DPU it dials the HOST and serves its own services over that same session, redialing when
//! the link drops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;
use tools::KeyArgs;
use transport::{Client, Registry};

#[derive(Parser, Debug)]
#[command(
    name = "offloadd",
    version,
    about = "dpu-offload daemon: serves fs, exec and the shim bridge over one authenticated link",
    after_help = "HOST:  offloadd --listen tcp://0.0.0.0:7000 --key-file /etc/offload/psk --config /etc/offload/host.toml\n\
DPU:   offloadd --connect tcp://HOST:7000 --key-file /etc/offload/psk --config /etc/offload/dpu.toml\n\
Addresses: tcp://H:P, unix:///path, vsock://CID:PORT (vsock://any:PORT to listen),\n\
vsock-uds:///path:PORT, rdma://IP:PORT; or a bare address with --transport."
)]
struct Args {
    /// Listen here and serve every peer that authenticates (the HOST side).
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "connect",
        required_unless_present = "connect"
    )]
    listen: Option<String>,
    /// Dial this peer and serve it over the resulting session (the DPU side).
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Link type for a bare address: tcp, unix, vsock, vsock-uds or rdma.
    #[arg(long, value_name = "T")]
    transport: Option<String>,
    /// TOML configuration with one section per service ([fs], [mount], [exec], [bridge]).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    link: KeyArgs,
}

/// The daemon's configuration file: one optional section per service; a missing section
/// leaves that service off.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// DPU mount settings (`[qtfs] addr = "URL"`), read by mount.qtfs from the same file;
    /// offloadd ignores them.
    #[allow(dead_code)]
    qtfs: Option<toml::Table>,
    /// The management plane's root, read by `offload dpu setup`; offloadd ignores it.
    #[allow(dead_code)]
    rootfs: Option<toml::Table>,
    /// qtfs exports served to the DPU.
    fs: Option<offload_fs::FsConfig>,
    /// Mount forwarding: which mounts a DPU may make on the HOST inside the fs exports.
    mount: Option<offload_fs::mount::MountConfig>,
    /// Shim bridge: proxied Unix sockets, stdio FIFOs, remote signals.
    bridge: Option<shim_bridge::BridgeConfig>,
    /// Remote execution (rexec) for the peer; `allow` lists the executables it may run.
    exec: Option<offload_exec::ExecConfig>,
    /// Per link kind settings (`[transport.tcp] encrypt = true`); `--encrypt` overrides.
    transport: Option<transport::TransportConfig>,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

/// The services this daemon offers: one per configured section.
fn registry(cfg: Config, authenticated: bool) -> anyhow::Result<Registry> {
    let mut reg = Registry::new();
    if let Some(c) = cfg.fs {
        let fs = offload_fs::FsService::new(c)?;
        if let Some(m) = cfg.mount {
            // A mount is root on the HOST: never for a peer that proved no key.
            anyhow::ensure!(
                authenticated,
                "[mount] needs an authenticated link (a pre-shared key)"
            );
            reg.insert(
                offload_fs::mount::proto::SERVICE,
                Arc::new(offload_fs::mount::MountService::new(m, fs.clone())?),
            );
        }
        reg.insert("fs", Arc::new(fs));
    } else if cfg.mount.is_some() {
        anyhow::bail!("[mount] needs an [fs] section: mounts are made inside its exports");
    }
    if let Some(c) = cfg.exec {
        reg.insert(
            offload_exec::proto::SERVICE,
            Arc::new(offload_exec::ExecService::new(c)?),
        );
    }
    if let Some(c) = cfg.bridge {
        reg.insert("bridge", Arc::new(shim_bridge::BridgeService::new(c)?));
    }
    Ok(reg)
}

/// Raises the soft open-file limit to the hard one: every peer connection, open file handle,
/// FIFO tunnel and bridged socket is a descriptor, and the usual soft limit (1024) is far below
/// what a HOST serving several DPUs holds.
fn raise_nofile_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    transport::tune_allocator();
    tools::init_tracing("info");
    raise_nofile_limit();
    let args = Args::parse();
    let mut cfg = load_config(args.config.as_ref())?;
    let session_cfg = args
        .link
        .session_config_with(cfg.transport.take().as_ref())?;
    if let Some(b) = cfg.bridge.as_mut() {
        // The bridge's side follows the daemon's: --listen is the HOST, --connect the DPU.
        let side = match args.listen {
            Some(_) => shim_bridge::Role::Host,
            None => shim_bridge::Role::Dpu,
        };
        b.role.get_or_insert(side);
    }
    let reg = registry(cfg, session_cfg.key.is_some())?;
    if reg.names().is_empty() {
        tracing::warn!("no service configured: peers can connect but there is nothing to use");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        if let Some(addr) = &args.listen {
            let ep = tools::endpoint(args.transport.as_deref(), addr)?;
            let listener = transport::listen(&ep).await?;
            // Readiness line for scripts and tests: the bound address (port 0 resolved).
            println!("offloadd listening on {}", listener.local_endpoint());
            transport::serve(listener, session_cfg, reg).await;
            Ok(())
        } else if let Some(addr) = &args.connect {
            let ep = tools::endpoint(args.transport.as_deref(), addr)?;
            let client = Arc::new(Client::new(ep.clone(), session_cfg, reg));
            let mut backoff = Duration::from_millis(200);
            loop {
                match client.session().await {
                    Ok(s) => {
                        backoff = Duration::from_millis(200);
                        println!("offloadd connected to {ep}");
                        tracing::info!(%ep, services = ?s.peer_services(), "session up");
                        let reason = s.closed().await;
                        tracing::warn!(%ep, %reason, "session lost; redialing");
                    }
                    Err(e) => {
                        tracing::warn!(%ep, error = %e, retry_in = ?backoff, "dial failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        } else {
            anyhow::bail!("give --listen ADDR (HOST) or --connect ADDR (DPU)")
        }
    })
}
