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
    /// TOML configuration with one section per service (`[fs]`, `[mount]`, `[exec]`, `[bridge]`) and
    /// `[metrics]` (listen = "127.0.0.1:9464" for a Prometheus endpoint).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Root-only control socket that `offload status` asks (default
    /// /run/offload/offloadd-host.sock with --listen, /run/offload/offloadd-dpu.sock with
    /// --connect, in $OFFLOAD_CONTROL_DIR when set; `[metrics] control_socket` in the config
    /// also sets it).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Run without a control socket (`offload status` cannot reach this daemon).
    #[arg(long, conflicts_with = "control_socket")]
    no_control_socket: bool,
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
    /// Observability: the Prometheus endpoint and the control socket.
    #[serde(default)]
    metrics: MetricsConfig,
}

/// `[metrics]`: where this daemon reports what it does.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsConfig {
    /// Prometheus text endpoint (`GET /metrics`), e.g. "127.0.0.1:9464"; off when unset.
    listen: Option<String>,
    /// Control socket path for `offload status` (`--control-socket` wins).
    control_socket: Option<PathBuf>,
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

/// On SIGTERM/SIGINT: removes the control socket (so `offload status` does not list a dead
/// daemon) and exits 0, as a systemd stop expects.
fn remove_on_signal(path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        let sig = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        let _ = std::fs::remove_file(&path);
        tracing::info!(signal = sig, "stopping");
        std::process::exit(0);
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    transport::tune_allocator();
    tools::init_tracing("info");
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    tools::raise_nofile_limit();
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
    let role = if args.listen.is_some() { "host" } else { "dpu" };
    // (path, explicitly chosen): a default path another daemon holds only costs a warning.
    let control = if args.no_control_socket {
        None
    } else {
        match args
            .control_socket
            .clone()
            .or_else(|| cfg.metrics.control_socket.clone())
        {
            Some(p) => Some((p, true)),
            None => Some((
                std::env::var_os("OFFLOAD_CONTROL_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(offload_metrics::control::DEFAULT_DIR))
                    .join(format!("offloadd-{role}.sock")),
                false,
            )),
        }
    };
    let metrics_listen = cfg.metrics.listen.take();
    let reg = registry(cfg, session_cfg.key.is_some())?;
    offload_metrics::global().set_info(offload_metrics::DaemonInfo {
        role: role.into(),
        address: args
            .listen
            .clone()
            .or_else(|| args.connect.clone())
            .unwrap_or_default(),
        services: reg.names(),
    });
    if reg.names().is_empty() {
        tracing::warn!("no service configured: peers can connect but there is nothing to use");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The pool runs fsyncs, user-switching spawns and mount decisions, all of which end;
        // capped so that a burst of them cannot grow the daemon by a thread stack each (the
        // soak's slow RSS rise followed the pool's thread count, docs/RELIABILITY.md).
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Everything that can fail to bind comes first, so a daemon that exits on an error
        // never leaves a control socket behind (nor removes another daemon's).
        let listener = match &args.listen {
            Some(addr) => {
                let ep = tools::endpoint(args.transport.as_deref(), addr)?;
                Some(transport::listen(&ep).await?)
            }
            None => None,
        };
        if let Some(addr) = &metrics_listen {
            let bound = offload_metrics::serve_http(addr).await?;
            tracing::info!(%bound, "metrics endpoint ready (GET /metrics)");
            println!("offloadd metrics on http://{bound}/metrics");
        }
        if let Some((path, explicit)) = &control {
            match offload_metrics::control::serve(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "control socket ready (offload status)");
                    remove_on_signal(path.clone())?;
                }
                Err(e) if *explicit => return Err(e.into()),
                Err(e) => tracing::warn!(
                    error = %e,
                    "no control socket: `offload status` cannot reach this daemon (give --control-socket PATH)"
                ),
            }
        }
        if let Some(listener) = listener {
            // Readiness line for scripts and tests: the bound address (port 0 resolved).
            println!("offloadd listening on {}", listener.local_endpoint());
            transport::serve(listener, session_cfg, reg).await;
            Ok(())
        } else if let Some(addr) = &args.connect {
            let ep = tools::endpoint(args.transport.as_deref(), addr)?;
            let client = Arc::new(Client::new(ep.clone(), session_cfg, reg));
            let mut backoff = Duration::from_millis(200);
            let mut had_session = false;
            loop {
                match client.session().await {
                    Ok(s) => {
                        backoff = Duration::from_millis(200);
                        if std::mem::replace(&mut had_session, true) {
                            offload_metrics::global().reconnected();
                        }
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
