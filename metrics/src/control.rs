//! The daemon's control socket: a root-only Unix socket (mode 0600, peers checked with
//! `SO_PEERCRED`) under `/run/offload/`, one request line per connection — `status` answers
//! the [`Snapshot`](crate::Snapshot) as one JSON line, `metrics` the Prometheus text. `offload
//! status` is its client ([`query`]).

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Where daemons put their control sockets by default (`offloadd-host.sock`, `offloadd-dpu.sock`).
pub const DEFAULT_DIR: &str = "/run/offload";

/// Control socket failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating, binding or securing the socket failed.
    #[error("control socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Another live daemon already answers on this path.
    #[error("control socket {0} is in use by another daemon (give each daemon its own --control-socket)")]
    InUse(PathBuf),
    /// The daemon answered something that is not a status.
    #[error("control socket {path}: bad answer: {message}")]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Binds `path` (its directory created 0755 if missing; a stale socket replaced, a live one
/// refused), restricts it to mode 0600 and serves it on the current runtime until the runtime
/// ends. Only root and this daemon's own user are answered.
pub fn serve(path: &Path) -> Result<(), ControlError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err(path, "remove stale socket"))?;
    }
    // Bound under a umask that leaves it private from the first moment, then chmod for sure.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let std_listener = bound.map_err(io_err(path, "bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path, "chmod 0600"))?;
    std_listener
        .set_nonblocking(true)
        .map_err(io_err(path, "set non-blocking"))?;
    let listener =
        tokio::net::UnixListener::from_std(std_listener).map_err(io_err(path, "register"))?;
    let me = nix_euid();
    let shown = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let uid = conn.peer_cred().map(|c| c.uid()).ok();
                    if uid != Some(0) && uid != Some(me) {
                        tracing::warn!(?uid, "control socket: refusing a peer that is neither root nor this daemon's user");
                        continue;
                    }
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(path = %shown.display(), error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

fn nix_euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

async fn answer(conn: tokio::net::UnixStream) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    BufReader::new(r.take(256)).read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" | "" => {
            let mut j = serde_json::to_string(&crate::global().snapshot())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            j.push('\n');
            j
        }
        "metrics" => crate::prometheus_text(),
        other => format!("error: unknown request {other:?} (status, metrics)\n"),
    };
    w.write_all(reply.as_bytes()).await?;
    w.shutdown().await
}

/// Asks the daemon at `path` for `what` (`status` or `metrics`) and returns the raw answer.
pub fn query(path: &Path, what: &str) -> Result<String, ControlError> {
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(io_err(path, "connect"))?;
    let t = Some(Duration::from_secs(10));
    s.set_read_timeout(t).map_err(io_err(path, "set timeout"))?;
    s.write_all(format!("{what}\n").as_bytes())
        .map_err(io_err(path, "send request"))?;
    let mut out = String::new();
    if what == "status" {
        std::io::BufReader::new(s)
            .read_line(&mut out)
            .map_err(io_err(path, "read answer"))?;
    } else {
        s.read_to_string(&mut out)
            .map_err(io_err(path, "read answer"))?;
    }
    Ok(out)
}

/// Asks the daemon at `path` for its [`Snapshot`](crate::Snapshot).
pub fn status(path: &Path) -> Result<crate::Snapshot, ControlError> {
    let text = query(path, "status")?;
    serde_json::from_str(&text).map_err(|e| ControlError::BadAnswer {
        path: path.to_path_buf(),
        message: format!("{e}: {}", text.chars().take(200).collect::<String>()),
    })
}
