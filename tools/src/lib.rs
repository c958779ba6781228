//! Pieces shared by the dpu-offload binaries: link and key options, logging set-up, and the
//! `offload run` mount-forwarding supervisor ([`run`]).

pub mod run;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use transport::{Endpoint, SessionConfig};

/// Link options every daemon and tool takes.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// Pre-shared key file (default: $OFFLOAD_KEY_FILE, then /etc/offload/psk). Must not be
    /// readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Run without a key when none is configured (trusted test links only; logs a warning).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Seconds between heartbeats on an idle link.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which the peer is declared dead and pending calls fail.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub heartbeat_timeout: f64,
}

impl KeyArgs {
    /// Session settings from these options (key resolved and checked).
    pub fn session_config(&self) -> anyhow::Result<SessionConfig> {
        let key = transport::resolve_key(self.key_file.as_deref(), self.allow_unauthenticated)?;
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "--{what} must be a positive number of seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        Ok(SessionConfig {
            heartbeat_interval: secs(self.heartbeat_interval, "heartbeat-interval")?,
            heartbeat_timeout: secs(self.heartbeat_timeout, "heartbeat-timeout")?,
            ..SessionConfig::new(key)
        })
    }
}

/// Parses `--transport T` + an address (or a full URL) into an endpoint.
pub fn endpoint(transport: Option<&str>, addr: &str) -> anyhow::Result<Endpoint> {
    Endpoint::from_parts(transport, addr).with_context(|| format!("bad address {addr:?}"))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info` for daemons, `warn` for tools).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub mod man;
pub mod rootfs;
pub mod status;
