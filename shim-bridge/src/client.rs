//! What tools on the DPU call on the HOST's bridge, and how they find the HOST.

use crate::proto::{Reply, Request};
use crate::service::call;
use crate::BridgeError;
use std::path::{Path, PathBuf};
use transport::{Endpoint, Registry, Session, SessionConfig};

/// Sends signal `signal` to `pid` on the peer (the HOST): what containerd's `kill` of a shim or
/// container pid must become when the processes live on the other machine.
pub async fn remote_kill(session: &Session, pid: i32, signal: i32) -> Result<(), BridgeError> {
    match call(session, &Request::Kill { pid, signal }).await? {
        Reply::Done => Ok(()),
        other => Err(BridgeError::Unexpected(format!("{other:?}"))),
    }
}

/// Asks the peer to make its socket `path` reachable on every bridge peer now; returns the
/// number of peers that confirmed a listener.
pub async fn expose(session: &Session, path: &str) -> Result<u32, BridgeError> {
    match call(
        session,
        &Request::Expose {
            path: path.to_string(),
        },
    )
    .await?
    {
        Reply::Exposed { peers } => Ok(peers),
        other => Err(BridgeError::Unexpected(format!("{other:?}"))),
    }
}

/// Default config file of the DPU side, read for `[bridge.shim]` when neither flags nor
/// environment name the HOST.
pub const DPU_CONFIG: &str = "/etc/offload/dpu.toml";

/// Where the HOST's offloadd is and how to authenticate: flags, then `CMD_NET_ADDR` /
/// `OFFLOAD_HOST_ADDR`, then `[bridge.shim]` in [`DPU_CONFIG`].
#[derive(Debug, Clone, Default)]
pub struct HostLink {
    /// Endpoint URL (`tcp://H:P`, `vsock://2:P`, ...).
    pub addr: Option<String>,
    /// Transport name when `addr` is a bare address.
    pub transport: Option<String>,
    /// Pre-shared key file.
    pub key_file: Option<PathBuf>,
    /// Allow an unauthenticated link (tests only).
    pub allow_unauthenticated: bool,
    /// The real shim on the HOST (from `[bridge.shim] real`).
    pub real_shim: Option<PathBuf>,
    /// Which link kinds encrypt (from `[transport]` of the DPU config; default: tcp only).
    pub encrypt: transport::EncryptPolicy,
}

#[derive(serde::Deserialize, Default)]
struct DpuFile {
    #[serde(default)]
    bridge: Option<toml::Table>,
    #[serde(default)]
    transport: Option<transport::TransportConfig>,
}

impl HostLink {
    /// Fills unset fields from the environment and the DPU config file (missing file: fine).
    pub fn resolve(mut self, config: &Path) -> Result<HostLink, BridgeError> {
        if self.addr.is_none() {
            self.addr = ["CMD_NET_ADDR", "OFFLOAD_HOST_ADDR"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        }
        let text = match std::fs::read_to_string(config) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self),
            Err(e) => return Err(BridgeError::Config(format!("{}: {e}", config.display()))),
        };
        // Only [bridge] is ours; other sections belong to other services.
        let f: DpuFile = toml::from_str::<toml::Table>(&text)
            .and_then(|t| toml::Value::Table(t).try_into())
            .map_err(|e| BridgeError::Config(format!("{}: {e}", config.display())))?;
        if let Some(t) = &f.transport {
            self.encrypt = t.encrypt_policy();
        }
        let cfg: crate::BridgeConfig = match f.bridge {
            Some(b) => toml::Value::Table(b)
                .try_into()
                .map_err(|e| BridgeError::Config(format!("{} [bridge]: {e}", config.display())))?,
            None => return Ok(self),
        };
        if let Some(s) = cfg.shim {
            if self.addr.is_none() {
                self.addr = s.connect;
                self.transport = self.transport.or(s.transport);
            }
            self.key_file = self.key_file.or(s.key_file);
            self.real_shim = self.real_shim.or(s.real);
        }
        Ok(self)
    }

    /// Opens a short session to the HOST offering no services.
    pub async fn connect(&self) -> Result<Session, BridgeError> {
        let addr = self.addr.as_deref().ok_or_else(|| {
            BridgeError::Config(format!(
                "no HOST address: set CMD_NET_ADDR or [bridge.shim] connect in {DPU_CONFIG}"
            ))
        })?;
        let ep = Endpoint::from_parts(self.transport.as_deref(), addr)?;
        let key = transport::resolve_key(self.key_file.as_deref(), self.allow_unauthenticated)?;
        let cfg = SessionConfig {
            encrypt: self.encrypt,
            ..SessionConfig::new(key)
        };
        Ok(Session::connect(&ep, cfg, Registry::new()).await?)
    }
}
