//! rexec_server: serves only the exec service, seed-compatible:
//! `CMD_NET_ADDR=tcp://0.0.0.0:PORT rexec_server`. `offloadd` serves the same service next to
//! the others; use this where only remote execution is wanted.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use offload_exec::{ExecConfig, ExecService};
use serde::Deserialize;
use transport::{Endpoint, Registry};

#[derive(Parser, Debug)]
#[command(
    name = "rexec_server",
    version,
    about = "Serve the exec service (rexec) on one listening address",
    after_help = "Config file (TOML), same [exec] section as offloadd's:\n\
  [exec]\n  allow = [\"/usr/bin/containerd-shim\", \"/usr/bin/kill\"]   # exact paths, symlinks resolved\n  \
# allow_any = true                                        # instead of allow: run anything\n\
Without an allow-list (and without --allow-any) every exec is refused with exit 126."
)]
struct Args {
    /// Listen address URL (tcp://0.0.0.0:PORT, unix:///path, vsock://any:PORT, ...), or a bare
    /// address with --transport.
    #[arg(long = "listen", env = "CMD_NET_ADDR", value_name = "ADDR")]
    listen: String,
    /// Link type for a bare --listen address.
    #[arg(long, value_name = "T")]
    transport: Option<String>,
    #[command(flatten)]
    link: tools::KeyArgs,
    /// TOML config with an `[exec]` section (allow-list).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Allow running any executable (no allow-list). Not with `allow` in the config.
    #[arg(long)]
    allow_any: bool,
    /// Runtime worker threads; 0 = a single-threaded runtime (lowest exec latency: all the work is
    /// I/O and posix_spawn, and no wake-up has to cross threads).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    exec: Option<ExecConfig>,
    /// Per link kind settings (`[transport.tcp] encrypt = true`); `--encrypt` overrides.
    #[serde(default)]
    transport: Option<transport::TransportConfig>,
}

fn main() -> anyhow::Result<()> {
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    tools::init_tracing("info");
    let (mut cfg, link_cfg) = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            let f: ConfigFile =
                toml::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?;
            (f.exec.unwrap_or_default(), f.transport)
        }
        None => (ExecConfig::default(), None),
    };
    if args.allow_any {
        cfg.allow_any = true;
    }
    let service = ExecService::new(cfg).context("exec service")?;
    let endpoint = Endpoint::from_parts(args.transport.as_deref(), &args.listen)
        .with_context(|| format!("bad listen address {:?}", args.listen))?;
    let session_cfg = args
        .link
        .session_config_with(link_cfg.as_ref())
        .context("session settings")?;
    let registry = Registry::new().with(offload_exec::proto::SERVICE, Arc::new(service));
    let rt = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("tokio runtime")?;
    rt.block_on(async move {
        let listener = transport::listen(&endpoint)
            .await
            .with_context(|| format!("listening on {endpoint}"))?;
        transport::serve(listener, session_cfg, registry).await;
        Ok(())
    })
}
