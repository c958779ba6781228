//! The mux's side: accept local `rexec` connections and run each exec over the one session
//! ([`crate::client::run_with`] with the caller's descriptors and control messages).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use transport::Session;

use super::{decode, encode, peer_uid, recv_with_fds, uid_allowed};
use super::{ClientMsg, Control, Ended, MuxError, MuxMsg, MUX_VERSION};
use crate::client::{
    run_with, ClientError, LocalControl, LocalEvent, LocalIo, Outcome, RunOptions, StdinSource,
};
use crate::proto::Sig;

/// How long a connected rexec may take to send its request (rexec sends it at once).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an exec whose rexec died may take to end after the kill before the mux lets go.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// Gives the mux a live session to the peer.
#[async_trait::async_trait]
pub trait SessionSource: Send + Sync {
    /// A live session (connecting a new one if the last one dropped), or why there is none.
    async fn session(&self) -> Result<Session, String>;
}

/// Serves rexec connections on `listener` until it fails.
pub async fn serve(
    listener: tokio::net::UnixListener,
    sessions: Arc<dyn SessionSource>,
) -> std::io::Result<()> {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            // Out of descriptors or memory, or a caller that gave up while queued: the mux
            // stays up (its end would reset every queued caller) and tries again.
            Err(e) if accept_error_is_transient(&e) => {
                warn!(error = %e, "accepting a rexec connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let sessions = sessions.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(sock, sessions).await {
                warn!(error = %e, "rexec connection ended with an error");
            }
        });
    }
}

/// Errors of `accept` that say nothing about the listener itself.
fn accept_error_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
        )
    )
}

/// Reads the Hello and the descriptors attached to it.
async fn read_hello(
    sock: &UnixStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(ClientMsg, Vec<OwnedFd>)>, MuxError> {
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        sock.readable().await?;
        let n = match sock.try_io(Interest::READABLE, || {
            recv_with_fds(sock.as_raw_fd(), &mut chunk, &mut fds)
        }) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(m) = decode::<ClientMsg>(buf)? {
            return Ok(Some((m, fds)));
        }
    }
}

async fn send(wr: &mut tokio::net::unix::OwnedWriteHalf, msg: &MuxMsg) -> Result<(), MuxError> {
    wr.write_all(&encode(msg)?).await?;
    Ok(())
}

/// One rexec connection: one exec.
async fn handle(sock: UnixStream, sessions: Arc<dyn SessionSource>) -> Result<(), MuxError> {
    let uid = peer_uid(sock.as_raw_fd())?;
    let mut buf = Vec::new();
    // The Hello is read (and its descriptors closed unused) even from a refused caller: a
    // socket closed with unread data would reset, and the caller would not learn why.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&sock, &mut buf)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(MuxError::Protocol(format!(
                "no request within {HELLO_TIMEOUT:?}"
            )))
        }
    };
    let Some((hello, fds)) = hello else {
        return Ok(());
    };
    let (mut rd, mut wr) = sock.into_split();
    if !uid_allowed(uid) {
        warn!(uid, "rexec connection from another user refused");
        drop(fds);
        return send(
            &mut wr,
            &MuxMsg::Unavailable(format!("uid {uid} not allowed")),
        )
        .await;
    }
    let ClientMsg::Hello {
        version,
        req,
        tty,
        stdin,
    } = hello
    else {
        return send(&mut wr, &MuxMsg::Unavailable("expected a Hello".into())).await;
    };
    if version != MUX_VERSION {
        return send(
            &mut wr,
            &MuxMsg::Unavailable(format!(
                "mux protocol version {version}, this mux speaks {MUX_VERSION}"
            )),
        )
        .await;
    }
    let want = if stdin { 3 } else { 2 };
    if fds.len() != want {
        return send(
            &mut wr,
            &MuxMsg::Unavailable(format!("{} descriptors, expected {want}", fds.len())),
        )
        .await;
    }
    let session = match sessions.session().await {
        Ok(s) => s,
        Err(e) => return send(&mut wr, &MuxMsg::Unavailable(e)).await,
    };
    let mut fds = fds.into_iter();
    let (Some(out), Some(err)) = (fds.next(), fds.next()) else {
        return Ok(());
    };
    let stdin_src = match fds.next() {
        Some(p) => StdinSource::Fd(p),
        None => StdinSource::Empty,
    };
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let id = req.id;
    let opts = RunOptions {
        tty,
        ignored: req.sig_ignored,
    };
    let io = LocalIo {
        stdout: out.as_raw_fd(),
        stderr: err.as_raw_fd(),
        stdin: stdin_src,
        control: Some(ctl_rx),
        events: Some(ev_tx),
    };
    debug!(id, uid, "exec for a local rexec");
    let run = run_with(&session, req, opts, io);
    tokio::pin!(run);
    let mut chunk = vec![0u8; 4096];
    let mut caller_gone = false;
    let result = loop {
        tokio::select! {
            r = &mut run => break Some(r),
            Some(ev) = ev_rx.recv() => {
                let msg = match ev {
                    LocalEvent::Opened if stdin => MuxMsg::Accepted,
                    LocalEvent::Opened => continue,
                    LocalEvent::Stopped => MuxMsg::Stopped,
                };
                let _ = send(&mut wr, &msg).await;
            }
            n = rd.read(&mut chunk), if !caller_gone => {
                match n {
                    Ok(0) | Err(_) => {
                        // rexec is gone (killed): end the program like its death would have
                        // locally, and let the exec finish on its own.
                        info!(id, "rexec went away: killing the remote program");
                        caller_gone = true;
                        let _ = ctl_tx.send(LocalControl::Signal { sig: Sig::Kill, group: true });
                    }
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(m) = decode::<ClientMsg>(&mut buf)? {
                            let ctl = match m {
                                ClientMsg::Control(Control::Signal { sig, group }) => {
                                    LocalControl::Signal { sig, group }
                                }
                                ClientMsg::Control(Control::Resize(s)) => LocalControl::Resize(s),
                                ClientMsg::Hello { .. } => continue,
                            };
                            let _ = ctl_tx.send(ctl);
                        }
                    }
                }
            }
            _ = tokio::time::sleep(KILL_GRACE), if caller_gone => break None,
        }
    };
    // The caller's descriptors are closed before it hears the end (a reader of its stdout
    // sees EOF no later than the caller's exit).
    drop(out);
    drop(err);
    let msg = match result {
        None => return Ok(()),
        Some(Ok(Outcome::Exited(st))) => MuxMsg::Done(Ended::Exited(st)),
        Some(Ok(Outcome::NotStarted { code, message })) => {
            MuxMsg::Done(Ended::NotStarted { code, message })
        }
        // Nothing reached the peer: the caller may try on its own.
        Some(Err(ClientError::Open(e))) => MuxMsg::Unavailable(e.to_string()),
        Some(Err(e)) => MuxMsg::Done(Ended::Error(e.to_string())),
    };
    if !caller_gone {
        send(&mut wr, &msg).await?;
    }
    Ok(())
}
