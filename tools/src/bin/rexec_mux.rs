//! rexec_mux: keeps one authenticated session to the peer's exec service and runs every local
//! `rexec` over it (ssh's ControlMaster, as a daemon). A `rexec` that finds the mux's socket
//! sends it the request and its stdout/stderr descriptors and waits: no connect to the peer, no
//! handshake, no crypto of its own (offload_exec::mux). Without a mux, rexec connects itself.
//!
//! The socket is the security boundary: created 0600 in a 0700 directory owned by the mux's
//! user, callers of the same uid (or root) only; the key file is read by the mux alone.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use offload_exec::mux::{self, server::SessionSource};
use tracing::{info, warn};
use transport::{Endpoint, Registry, Session, SessionConfig};

#[derive(Parser, Debug)]
#[command(
    name = "rexec_mux",
    version,
    about = "Keep one session to the exec service and run local rexec calls over it",
    long_about = "Holds one authenticated session to the peer's exec service (offloadd or \
rexec_server), reconnecting when it drops, and listens on a local Unix socket. rexec with the \
same CMD_NET_ADDR and key file finds the socket by itself (or through REXEC_CONTROL=PATH) and \
runs its program over the mux's session: no handshake per call. rexec falls back to its own \
connection when no mux answers; REXEC_CONTROL=none makes it always connect itself.",
    after_help = "Default socket: <dir>/<hash of address and key file>.sock, dir = \
$REXEC_CONTROL_DIR, else /run/dpu-offload/rexec for root, else $XDG_RUNTIME_DIR/dpu-offload-rexec, \
else /tmp/dpu-offload-rexec-<uid>. The directory is created 0700 (an existing one must be \
owned by this user and closed to group and others), the socket 0600; only callers of this \
uid or root are served.\n\
Logging: RUST_LOG (default info).\n\
Example: CMD_NET_ADDR=tcp://10.0.0.1:7000 rexec_mux --key-file /etc/offload/psk"
)]
struct Args {
    // The same address, link type and key file as rexec's.
    #[command(flatten)]
    peer: tools::PeerArgs,
    /// Listen here instead of the default path for the address and key file (rexec then needs
    /// REXEC_CONTROL=PATH). Its directory must be private to this user (created 0700).
    #[arg(long, value_name = "PATH")]
    control_path: Option<PathBuf>,
}

/// The session to the peer, reconnected on demand.
struct Dialer {
    endpoint: Endpoint,
    cfg: SessionConfig,
    current: tokio::sync::Mutex<Option<Session>>,
}

#[transport::async_trait]
impl SessionSource for Dialer {
    async fn session(&self) -> Result<Session, String> {
        let mut cur = self.current.lock().await;
        if let Some(s) = cur.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        match Session::connect(&self.endpoint, self.cfg.clone(), Registry::new()).await {
            Ok(s) => {
                info!(peer = %self.endpoint, "session established");
                *cur = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                *cur = None;
                Err(format!("{}: {e}", self.endpoint))
            }
        }
    }
}

/// Keeps the session up between calls, so the first rexec after a drop does not pay the
/// handshake (retrying every few seconds while the peer is away).
async fn keep_up(dialer: Arc<Dialer>) {
    loop {
        match dialer.session().await {
            Ok(s) => {
                let why = s.closed().await;
                warn!(reason = ?why, "session to the peer lost; reconnecting");
            }
            Err(e) => {
                warn!(error = %e, "cannot reach the peer; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Binds the socket 0600 in its checked directory; a stale socket (nothing listening) is
/// replaced, a live one is an error.
fn bind(path: &std::path::Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    mux::prepare_dir(dir).context("control directory")?;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            md.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "a mux already listens on {}",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // SAFETY: umask has no memory effects; still single-threaded here, restored at once.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn main() -> anyhow::Result<()> {
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    tools::init_tracing("info");
    let peer = &args.peer;
    let endpoint = Endpoint::from_parts(peer.transport.as_deref(), &peer.addr)
        .with_context(|| format!("bad address {:?}", peer.addr))?;
    let cfg = peer.link.session_config().context("session settings")?;
    let path = match &args.control_path {
        Some(p) => p.clone(),
        None => tools::rexec::default_control_path(&endpoint, peer.link.key_file.as_deref()),
    };
    tools::raise_nofile_limit();
    let listener = bind(&path)?;
    listener.set_nonblocking(true)?;
    info!(socket = %path.display(), peer = %endpoint, "rexec mux listening");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let dialer = Arc::new(Dialer {
            endpoint,
            cfg,
            current: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(keep_up(dialer.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = mux::server::serve(listener, dialer) => r.context("accepting rexec connections"),
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    let _ = std::fs::remove_file(&path);
    info!("rexec mux stopped");
    result
}
