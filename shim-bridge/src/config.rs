//! `[bridge]` section of the offloadd configuration.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Which end of the link this daemon is. Rules name the side that listens; the other side owns
/// the real socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The machine running the containers (`offloadd --listen`).
    Host,
    /// The machine running the management plane (`offloadd --connect`).
    Dpu,
}

impl Role {
    /// The other side.
    pub fn peer(self) -> Role {
        match self {
            Role::Host => Role::Dpu,
            Role::Dpu => Role::Host,
        }
    }
}

/// A static forwarding rule: a listener at `path` on `listen_side`, connections go to `target`
/// (default: the same path) on the other side. The rule may sit in either side's config: the
/// listening side binds directly; the socket-owning side exports `target` and asks the peer to
/// listen (the peer must allow `path` via `allow_listen`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    /// Side that gets the proxy listener.
    pub listen_side: Role,
    /// Listener path on `listen_side`.
    pub path: PathBuf,
    /// Real socket path on the other side; defaults to `path`.
    #[serde(default)]
    pub target: Option<PathBuf>,
}

impl ForwardRule {
    /// Path of the real socket.
    pub fn target(&self) -> &Path {
        self.target.as_deref().unwrap_or(&self.path)
    }
}

/// Rewrites paths named by the peer (`from` prefix) to local ones (`to` prefix), for a DPU whose
/// management plane lives under another root (`/another_rootfs`) or tests running both sides on
/// one machine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMap {
    /// Prefix as the peer names it.
    pub from: PathBuf,
    /// Local prefix it stands for.
    pub to: PathBuf,
}

/// Configuration of the bridge service (`[bridge]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// This daemon's side; offloadd fills it from `--listen` (host) / `--connect` (dpu) when unset.
    pub role: Option<Role>,
    /// Static forwarding rules (`[[bridge.forward]]`).
    pub forward: Vec<ForwardRule>,
    /// Directories whose Unix sockets are mirrored on every bridge peer (e.g. `/run/containerd/s`
    /// on the HOST): a proxy appears at the same path on the peer and goes when the socket goes.
    pub watch: Vec<PathBuf>,
    /// Stdio FIFO directories mirrored to the peer (DPU: `/run/containerd/fifo`). FIFOs named
    /// `*-stdin` are pumped to the peer, `*-stdout`/`*-stderr` from it. The receiving side only
    /// accepts FIFOs under its own `fifo_dirs`.
    pub fifo_dirs: Vec<PathBuf>,
    /// Path prefix rewriting for paths the peer names (`[[bridge.map]]`).
    pub map: Vec<PathMap>,
    /// Prefixes under which the peer may ask for proxy listeners (after mapping).
    pub allow_listen: Vec<PathBuf>,
    /// Prefixes of local sockets the peer may connect to besides exported ones (rules in the
    /// peer's config that name our sockets).
    pub allow_connect: Vec<PathBuf>,
    /// Accept `Kill` requests from the peer (needed on the HOST for containerd on the DPU).
    pub allow_kill: bool,
    /// Full rescan period of watched directories in milliseconds (inotify triggers rescans
    /// immediately; this is the fallback).
    pub rescan_interval_ms: u64,
    /// Size of one read from a local socket (bytes); larger reads mean fewer, bigger frames.
    pub read_chunk: usize,
    /// Settings of `offload-shim` (the DPU's `containerd-shim-runc-v2`), read by that tool
    /// from the DPU config file; offloadd ignores them.
    pub shim: Option<ShimConfig>,
}

/// `[bridge.shim]`: how `offload-shim` reaches the HOST and which shim it runs there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    /// HOST endpoint (`tcp://H:P`, `vsock://2:P`, ...); `CMD_NET_ADDR` overrides it.
    pub connect: Option<String>,
    /// Transport for a bare `connect` address.
    pub transport: Option<String>,
    /// Pre-shared key file (default: `OFFLOAD_KEY_FILE`, then `/etc/offload/psk`).
    pub key_file: Option<PathBuf>,
    /// The real shim on the HOST (default `/usr/bin/containerd-shim-runc-v2`).
    pub real: Option<PathBuf>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            role: None,
            forward: Vec::new(),
            watch: Vec::new(),
            fifo_dirs: Vec::new(),
            map: Vec::new(),
            allow_listen: vec![PathBuf::from("/run/containerd")],
            allow_connect: Vec::new(),
            allow_kill: true,
            rescan_interval_ms: 1000,
            read_chunk: 256 * 1024,
            shim: None,
        }
    }
}

/// Replaces a leading `from` with `to`; `None` when `p` is not under `from`.
fn rebase(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    p.strip_prefix(from).ok().map(|rest| {
        if rest.as_os_str().is_empty() {
            to.to_path_buf()
        } else {
            to.join(rest)
        }
    })
}

impl BridgeConfig {
    /// Local path for a path the peer named.
    pub fn to_local(&self, peer_path: &Path) -> PathBuf {
        self.map
            .iter()
            .find_map(|m| rebase(peer_path, &m.from, &m.to))
            .unwrap_or_else(|| peer_path.to_path_buf())
    }

    /// The peer's name for a local path (inverse of [`Self::to_local`]).
    pub fn to_peer(&self, local: &Path) -> PathBuf {
        self.map
            .iter()
            .find_map(|m| rebase(local, &m.to, &m.from))
            .unwrap_or_else(|| local.to_path_buf())
    }
}

/// True when `p` is absolute, has no `..` and lies under one of `prefixes`. Public (hidden)
/// for fuzzing the rule check on peer-named paths.
#[doc(hidden)]
pub fn under_any(p: &Path, prefixes: &[PathBuf]) -> bool {
    p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && prefixes.iter().any(|pre| p.starts_with(pre))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_map() {
        let cfg: BridgeConfig = toml::from_str(
            r#"
            role = "dpu"
            watch = ["/run/containerd/s"]
            [[forward]]
            listen_side = "host"
            path = "/run/containerd/containerd.sock.ttrpc"
            [[map]]
            from = "/run/containerd"
            to = "/another_rootfs/run/containerd"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.role, Some(Role::Dpu));
        assert_eq!(
            cfg.forward[0].target(),
            Path::new("/run/containerd/containerd.sock.ttrpc")
        );
        assert_eq!(
            cfg.to_local(Path::new("/run/containerd/s/ab")),
            PathBuf::from("/another_rootfs/run/containerd/s/ab")
        );
        assert_eq!(
            cfg.to_peer(Path::new("/another_rootfs/run/containerd/s/ab")),
            PathBuf::from("/run/containerd/s/ab")
        );
        assert_eq!(cfg.to_local(Path::new("/tmp/x")), PathBuf::from("/tmp/x"));
        assert!(toml::from_str::<BridgeConfig>("bogus = 1").is_err());
        assert!(under_any(
            Path::new("/run/containerd/s/x"),
            &cfg.allow_listen
        ));
        assert!(!under_any(
            Path::new("/run/containerd/../etc/x"),
            &cfg.allow_listen
        ));
        assert!(!under_any(Path::new("/run/containerdx"), &cfg.allow_listen));
    }
}
