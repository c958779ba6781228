//! Pieces shared by the dpu-offload binaries: link and key options, logging set-up, and the
//! `offload run` mount-forwarding supervisor ([`run`]; feature `seccomp`, on by default).

#[cfg(feature = "seccomp")]
pub mod run;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use transport::{EncryptPolicy, Endpoint, SessionConfig, TransportConfig};

/// Default of `--heartbeat-interval`, seconds.
pub const HEARTBEAT_INTERVAL_SECS: f64 = 3.0;
/// Default of `--heartbeat-timeout`, seconds.
pub const HEARTBEAT_TIMEOUT_SECS: f64 = 10.0;

/// Where a DPU-side exec client reaches its peer: the address, its link type and the link
/// options. One struct for `rexec` and `rexec_mux`, which must read them alike (the mux's
/// socket is named after the address and key file, [`rexec::default_control_path`]).
#[derive(clap::Args, Debug, Clone)]
pub struct PeerArgs {
    /// Peer address (the exec service of offloadd or rexec_server): URL (tcp://H:P,
    /// unix:///path, vsock://CID:PORT, vsock-uds:///path:PORT, rdma://IP:PORT), or a bare
    /// address with --transport.
    #[arg(long, env = "CMD_NET_ADDR", value_name = "ADDR")]
    pub addr: String,
    /// Link type for a bare --addr (tcp, unix, vsock, vsock-uds, rdma).
    #[arg(long, value_name = "T")]
    pub transport: Option<String>,
    /// The key and link options.
    #[command(flatten)]
    pub link: KeyArgs,
}

/// Link options every daemon and tool takes.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// Pre-shared key file (default: $OFFLOAD_KEY_FILE, then /etc/offload/psk). Must not be
    /// readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// During a key rotation: another key file whose key is accepted from peers besides the
    /// --key-file one (repeatable). The file may be absent; it is re-read at each handshake,
    /// so creating, replacing or removing it needs no restart (docs/OPERATIONS.md, "Key
    /// rotation"). This side still proves with the --key-file key unless a dialing peer's
    /// hint names the other one.
    #[arg(long, value_name = "FILE")]
    pub accept_key_file: Vec<PathBuf>,
    /// Run without a key when none is configured (trusted test links only; logs a warning).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Seconds between heartbeats on an idle link.
    #[arg(long, value_name = "SECS", default_value_t = HEARTBEAT_INTERVAL_SECS)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which the peer is declared dead and pending calls fail.
    #[arg(long, value_name = "SECS", default_value_t = HEARTBEAT_TIMEOUT_SECS)]
    pub heartbeat_timeout: f64,
    /// Encrypt the link (AES-128-GCM keyed by a forward-secret X25519 exchange inside the
    /// authenticated handshake), overriding `[transport.<kind>] encrypt` in the config. Default:
    /// on for tcp, off for unix, vsock, vsock-uds and rdma. Both ends must agree, else the
    /// handshake is refused.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub encrypt: Option<bool>,
}

/// What a command line with none of these options gives (for callers that skip clap, such as
/// rexec's common call).
impl Default for KeyArgs {
    fn default() -> KeyArgs {
        KeyArgs {
            key_file: None,
            accept_key_file: Vec::new(),
            allow_unauthenticated: false,
            heartbeat_interval: HEARTBEAT_INTERVAL_SECS,
            heartbeat_timeout: HEARTBEAT_TIMEOUT_SECS,
            encrypt: None,
        }
    }
}

impl KeyArgs {
    /// Session settings from these options (key resolved and checked), with the encryption
    /// policy of the DPU config file's `[transport]` section ([`dpu_transport_config`]).
    pub fn session_config(&self) -> anyhow::Result<SessionConfig> {
        self.session_config_with(dpu_transport_config()?.as_ref())
    }

    /// Session settings from these options over a config file's `[transport]` section.
    pub fn session_config_with(
        &self,
        file: Option<&TransportConfig>,
    ) -> anyhow::Result<SessionConfig> {
        let key = transport::resolve_key(self.key_file.as_deref(), self.allow_unauthenticated)?;
        let key = match key {
            Some(k) => Some(k.accepting_files(&self.accept_key_file)?),
            None if !self.accept_key_file.is_empty() => {
                anyhow::bail!("--accept-key-file needs a key (--key-file) to go with it")
            }
            None => None,
        };
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
            encrypt: encrypt_policy(file, self.encrypt),
            ..SessionConfig::new(key)
        })
    }
}

/// The encryption policy: `--encrypt` for every link kind when given, else the config's
/// `[transport]` section over the defaults.
pub fn encrypt_policy(file: Option<&TransportConfig>, flag: Option<bool>) -> EncryptPolicy {
    match (flag, file) {
        (Some(on), _) => EncryptPolicy::all(on),
        (None, Some(f)) => f.encrypt_policy(),
        (None, None) => EncryptPolicy::default(),
    }
}

/// The DPU tools' config file: `$OFFLOAD_DPU_CONFIG`, else `/etc/offload/dpu.toml`.
pub fn dpu_config_path() -> PathBuf {
    std::env::var_os("OFFLOAD_DPU_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/offload/dpu.toml"))
}

/// The `[transport]` section of the DPU config file, if the file exists and has one, so the
/// DPU tools (rexec, mount.qtfs) follow the same per-link encryption setting as offloadd.
pub fn dpu_transport_config() -> anyhow::Result<Option<TransportConfig>> {
    transport_config_in(&dpu_config_path())
}

/// The `[transport]` section of a TOML file (missing file or section: `None`).
pub fn transport_config_in(path: &std::path::Path) -> anyhow::Result<Option<TransportConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    match table.remove("transport") {
        Some(t) => {
            Ok(Some(t.try_into().with_context(|| {
                format!("{} [transport]", path.display())
            })?))
        }
        None => Ok(None),
    }
}

/// The HOST address a DPU tool uses when none is given: `$QTFS_SERVER_ADDR`, else `[qtfs]`
/// (`addr`, `connect`, `host_addr` or `server`, also accepted at the top level) in
/// `/etc/offload/dpu.toml`. Shared by mount.qtfs and `offload run`; each names its own flag
/// when this finds nothing.
pub fn configured_host_addr() -> anyhow::Result<Option<String>> {
    if let Ok(a) = std::env::var("QTFS_SERVER_ADDR") {
        if !a.is_empty() {
            return Ok(Some(a));
        }
    }
    let path = std::path::Path::new("/etc/offload/dpu.toml");
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let v: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let pick = |t: &toml::Value| -> Option<String> {
        ["addr", "connect", "host_addr", "server"]
            .iter()
            .find_map(|k| t.get(k).and_then(|x| x.as_str()).map(str::to_string))
    };
    Ok(v.get("qtfs").and_then(pick).or_else(|| pick(&v)))
}

/// Parses `--transport T` + an address (or a full URL) into an endpoint.
pub fn endpoint(transport: Option<&str>, addr: &str) -> anyhow::Result<Endpoint> {
    Endpoint::from_parts(transport, addr).with_context(|| format!("bad address {addr:?}"))
}

/// Raises the soft open-file limit to the hard one: every peer connection, open file handle,
/// FIFO tunnel and bridged socket is a descriptor, and the usual soft limit (1024) is far below
/// what a HOST serving several DPUs (or a mux serving many
/// concurrent rexecs: a socket and two or three passed descriptors each) holds.
pub fn raise_nofile_limit() {
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
pub mod rexec;
pub mod rootfs;
pub mod status;
