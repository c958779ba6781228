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

/// Default config file of the DPU side, read for `connect` / `key_file` when neither flags nor
/// environment name the HOST.
pub const DPU_CONFIG: &str = "/etc/offload/dpu.toml";

/// Where the HOST's offloadd is and how to authenticate: flags, then `CMD_NET_ADDR` /
/// `OFFLOAD_HOST_ADDR`, then `connect`/`transport`/`key_file` in [`DPU_CONFIG`].
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
}

#[derive(serde::Deserialize, Default)]
struct DpuFile {
    connect: Option<String>,
    transport: Option<String>,
    key_file: Option<PathBuf>,
}

impl HostLink {
    /// Fills unset fields from the environment and the DPU config file.
    pub fn resolve(mut self, config: &Path) -> Result<HostLink, BridgeError> {
        if self.addr.is_none() {
            self.addr = ["CMD_NET_ADDR", "OFFLOAD_HOST_ADDR"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        }
        if self.addr.is_none() || self.key_file.is_none() {
            if let Ok(text) = std::fs::read_to_string(config) {
                // Only the keys we need; the rest of the file belongs to offloadd.
                let v: toml::Table = toml::from_str(&text)
                    .map_err(|e| BridgeError::Config(format!("{}: {e}", config.display())))?;
                let f = DpuFile {
                    connect: v.get("connect").and_then(|x| x.as_str()).map(String::from),
                    transport: v
                        .get("transport")
                        .and_then(|x| x.as_str())
                        .map(String::from),
                    key_file: v
                        .get("key_file")
                        .and_then(|x| x.as_str())
                        .map(PathBuf::from),
                };
                if self.addr.is_none() {
                    self.addr = f.connect;
                    self.transport = self.transport.or(f.transport);
                }
                self.key_file = self.key_file.or(f.key_file);
            }
        }
        Ok(self)
    }

    /// Opens a short session to the HOST offering no services.
    pub async fn connect(&self) -> Result<Session, BridgeError> {
        let addr = self.addr.as_deref().ok_or_else(|| {
            BridgeError::Config(format!(
                "no HOST address: pass --addr, set CMD_NET_ADDR, or put connect = \"...\" in {DPU_CONFIG}"
            ))
        })?;
        let ep = Endpoint::from_parts(self.transport.as_deref(), addr)?;
        let key = transport::resolve_key(self.key_file.as_deref(), self.allow_unauthenticated)?;
        Ok(Session::connect(&ep, SessionConfig::new(key), Registry::new()).await?)
    }
}
