//! The exec service: runs programs for the peer, streams their stdio, reports their exit.
//!
//! Lifecycle of one exec (one stream):
//! 1. decode the [`ExecRequest`] header, resolve `argv[0]`, check the allow-list, spawn the program
//!    in a new session (pgid = pid) with pipes or a pty → `Started`, or `Failed{126|127}`;
//! 2. pump stdin from the stream into the program, and stdout/stderr into frames on the stream;
//! 3. when the program exits: keep forwarding until stdout and stderr reach EOF, i.e. until every
//!    process holding them (background children included) has closed them — ssh's semantics, and
//!    what a local caller reading a pipe sees: `sh -c '(sleep 1; echo late) & echo started'`
//!    prints `late`. A daemon that keeps the program's stdout open forever therefore keeps the
//!    exec open forever, as over ssh (daemons redirect their stdio; [`ExecConfig::drain_max_ms`]
//!    caps the wait if an operator wants). With a pty the wait ends once the terminal is idle
//!    for [`PTY_DRAIN_IDLE`] after the exit (the exit hangs up the terminal, like ssh -t);
//! 4. send `Exit` (after all output), half-close.
//!
//! If the stream or the session dies before the exit was reported (client killed, link lost,
//! heartbeats timed out) — also while background children still hold the output — the
//! program's process group is killed with SIGKILL at once.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use transport::sync::lock;
use transport::{RemoteError, Service, Session, Stream, StreamReader, StreamWriter};

use crate::proto::{
    event_frame, ControlReply, ControlRequest, ExecRequest, ExitStatus, FrameKind, OutputFd,
    ServerEvent, Sig, FRAME_HEADER, VERSION,
};
use crate::spawn::{self, Policy, SpawnError, StdioPipes};
use crate::sys::{self, AsyncFile, PidFd};

/// How long a finished exec waits for the client to close the stream.
const LINGER: Duration = Duration::from_secs(5);

/// Largest chunk of program output put in one frame: header + chunk fit one transport data
/// frame (256 KiB), so the client can slice frames out of received pieces without copying.
const CHUNK: usize = 256 * 1024 - FRAME_HEADER;

/// Configuration of the exec service (`[exec]` in the daemon's TOML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Executables the peer may run: exact paths, symlinks resolved (at startup for this list,
    /// per request for `argv[0]`). Absent and `allow_any = false` = nothing may run.
    #[serde(default)]
    pub allow: Option<Vec<PathBuf>>,
    /// Let the peer run any executable. Must be set explicitly; excludes `allow`.
    #[serde(default)]
    pub allow_any: bool,
    /// After the main process exited, stop waiting for background processes that still hold its
    /// stdout/stderr after this many milliseconds (their later output is then lost and they get
    /// EPIPE). Absent = wait until they close them, like ssh and like a local pipe.
    #[serde(default)]
    pub drain_max_ms: Option<u64>,
}

/// With a pty, how long the terminal must stay quiet after the program exited before the exec
/// ends (the exit hung the terminal up; only `nohup`-style holders remain).
pub const PTY_DRAIN_IDLE: Duration = Duration::from_millis(50);

/// With a pty, the longest wait for output after the program exited.
const PTY_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Errors building the exec service.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Both an allow-list and allow-any were configured.
    #[error("exec config: `allow` and `allow_any = true` exclude each other")]
    AllowAndAllowAny,
    /// Allow-list entries are matched as absolute paths only.
    #[error("exec config: allow-list entry {0:?} is not an absolute path")]
    RelativeAllowEntry(PathBuf),
}

/// A running exec, reachable by control calls.
struct Running {
    pid: libc::pid_t,
    pidfd: Arc<PidFd>,
    pgroup: bool,
    pty: Option<Arc<AsyncFile>>,
    close_stdout: Notify,
    close_stderr: Notify,
    /// The whole group was stopped by a job stop (group `Tstp`): `Cont` resumes the group.
    group_stopped: AtomicBool,
    /// Stopped by a `Tstp` (its client stopped too: the session's heartbeat is paused).
    stopped: AtomicBool,
}

/// Exec ids are random 64-bit values chosen by clients; they are unguessable, so one table
/// serves all sessions (every peer is authenticated with the same key anyway).
type Key = u64;

/// The exec service (`"exec"`). Cheap to clone through `Arc`.
pub struct ExecService {
    policy: Policy,
    drain_max: Option<Duration>,
    running: Arc<Mutex<HashMap<Key, Arc<Running>>>>,
}

impl ExecService {
    /// Builds the service; allow-list entries are canonicalized now (missing ones are kept
    /// verbatim with a warning, so installing the binary later needs a restart to match links).
    pub fn new(config: ExecConfig) -> Result<Self, ExecError> {
        let policy = match (config.allow, config.allow_any) {
            (Some(_), true) => return Err(ExecError::AllowAndAllowAny),
            (None, true) => Policy::Any,
            (list, false) => {
                let mut set = HashSet::new();
                for p in list.unwrap_or_default() {
                    if !p.is_absolute() {
                        return Err(ExecError::RelativeAllowEntry(p));
                    }
                    match std::fs::canonicalize(&p) {
                        Ok(c) => {
                            set.insert(c);
                        }
                        Err(e) => {
                            warn!(path = %p.display(), error = %e, "exec allow-list entry does not resolve; kept verbatim");
                            set.insert(p);
                        }
                    }
                }
                if set.is_empty() {
                    warn!("exec: empty allow-list, every exec will be refused (set `allow` or `allow_any`)");
                }
                Policy::Only(set)
            }
        };
        Ok(Self {
            policy,
            drain_max: config.drain_max_ms.map(Duration::from_millis),
            running: Arc::default(),
        })
    }

    fn lookup(&self, key: Key) -> Option<Arc<Running>> {
        lock(&self.running).get(&key).cloned()
    }

    fn control(&self, session: &Session, req: ControlRequest) -> Result<ControlReply, RemoteError> {
        let id = match &req {
            ControlRequest::Signal { id, .. }
            | ControlRequest::Resize { id, .. }
            | ControlRequest::CloseOutput { id, .. } => *id,
        };
        let Some(r) = self.lookup(id) else {
            return Ok(ControlReply::UnknownId);
        };
        match req {
            ControlRequest::Signal { sig, group, .. } => {
                let mut reply = ControlReply::Ok;
                let mut n = sig.number();
                let stopped = r.group_stopped.load(Ordering::Relaxed);
                let to_group = r.pgroup || group || (sig == Sig::Cont && stopped);
                if sig == Sig::Tstp {
                    // A job stop. The program's group is orphaned here (its session leader's
                    // parent is this server, outside the session), where the kernel discards a
                    // SIGTSTP whose action is the default: stop with SIGSTOP instead.
                    if sys::signal_action(r.pid, libc::SIGTSTP) == sys::SigAction::Default {
                        n = libc::SIGSTOP;
                        reply = ControlReply::Stopped;
                        if to_group {
                            r.group_stopped.store(true, Ordering::Relaxed);
                        }
                        // The client stops too and answers no heartbeat until continued.
                        r.stopped.store(true, Ordering::Relaxed);
                        session.expect_silence(true);
                    }
                }
                let res = if to_group {
                    sys::kill(-r.pid, n)
                } else {
                    r.pidfd.signal(n).or_else(|e| {
                        if e.raw_os_error() == Some(libc::ESRCH) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                };
                if sig == Sig::Cont {
                    r.group_stopped.store(false, Ordering::Relaxed);
                    if r.stopped.swap(false, Ordering::Relaxed) {
                        session.expect_silence(false);
                    }
                }
                debug!(
                    pid = r.pid,
                    ?sig,
                    signo = n,
                    to_group,
                    "exec: forwarding signal"
                );
                res.map_err(|e| {
                    RemoteError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
                })?;
                return Ok(reply);
            }
            ControlRequest::Resize { size, .. } => {
                if let Some(m) = &r.pty {
                    sys::set_winsize(m.raw(), size).map_err(|e| {
                        RemoteError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
                    })?;
                }
            }
            ControlRequest::CloseOutput { fd, .. } => match fd {
                OutputFd::Stdout => r.close_stdout.notify_one(),
                OutputFd::Stderr => r.close_stderr.notify_one(),
            },
        }
        Ok(ControlReply::Ok)
    }
}

/// Removes a running exec from the table when its handler ends, whatever the path.
struct Registration {
    table: Arc<Mutex<HashMap<Key, Arc<Running>>>>,
    key: Key,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.table).remove(&self.key);
    }
}

/// Kills the process group (and the process itself, in case it left its group).
fn kill_group(pid: libc::pid_t, pidfd: &PidFd) {
    let _ = sys::kill(-pid, libc::SIGKILL);
    let _ = pidfd.signal(libc::SIGKILL);
}

/// Reports a program that did not start, then waits (bounded) for the client to close: dropping
/// our reader first would reset the stream, and a reset may overtake the report.
async fn send_failed(mut rd: StreamReader, mut wr: StreamWriter, code: i32, message: String) {
    if wr
        .send(event_frame(&ServerEvent::Failed { code, message }))
        .await
        .is_ok()
        && wr.finish().is_ok()
    {
        let _ = tokio::time::timeout(LINGER, async { while let Ok(Some(_)) = rd.recv().await {} })
            .await;
    }
}

#[async_trait]
impl Service for ExecService {
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let req: ControlRequest = postcard::from_bytes(&req).map_err(|e| {
            RemoteError::new(libc::EINVAL, format!("bad exec control request: {e}"))
        })?;
        let reply = self.control(session, req)?;
        postcard::to_allocvec(&reply)
            .map(Bytes::from)
            .map_err(|e| RemoteError::new(libc::EIO, e.to_string()))
    }

    async fn stream(&self, session: &Session, header: Bytes, stream: Stream) {
        let (mut rd, wr) = stream.split();
        let req: ExecRequest = match postcard::from_bytes(&header) {
            Ok(r) => r,
            Err(e) => {
                return send_failed(rd, wr, 126, format!("bad exec request: {e}")).await;
            }
        };
        if req.version != VERSION {
            return send_failed(
                rd,
                wr,
                126,
                format!(
                    "exec protocol version {} not supported (server speaks {VERSION})",
                    req.version
                ),
            )
            .await;
        }
        let key = req.id;
        if self.lookup(key).is_some() {
            return send_failed(rd, wr, 126, format!("exec id {} already in use", req.id)).await;
        }

        // Without a user switch, resolving (a few stats) and posix_spawn (vfork + exec) take well
        // under a millisecond: done inline, a hand-off to the blocking pool would cost more than
        // it saves. A user switch (NSS lookups, fork) goes to the blocking pool.
        let spawned = if req.user.is_none() {
            Ok(spawn::spawn(&req, &self.policy))
        } else {
            let policy = self.policy.clone();
            let r2 = req.clone();
            tokio::task::spawn_blocking(move || spawn::spawn(&r2, &policy)).await
        };
        let spawned = match spawned {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(argv0 = %String::from_utf8_lossy(req.argv.first().map(|v| v.as_slice()).unwrap_or(b"")), error = %e, "exec refused");
                let code = e.exit_code();
                return send_failed(rd, wr, code, e.to_string()).await;
            }
            Err(e) => {
                let e = SpawnError::Os("spawn".into(), std::io::Error::other(e.to_string()));
                return send_failed(rd, wr, 126, e.to_string()).await;
            }
        };
        let pid = spawned.pid;
        let pidfd = match PidFd::open(pid) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                let _ = sys::kill(-pid, libc::SIGKILL);
                return send_failed(rd, wr, 126, format!("pidfd_open: {e}")).await;
            }
        };
        // From here on the child exists: every early return kills it.
        let io = match setup_io(spawned.pipes, spawned.pty_master) {
            Ok(io) => io,
            Err(e) => {
                kill_group(pid, &pidfd);
                let _ = pidfd.wait().await;
                return send_failed(rd, wr, 126, format!("exec stdio setup: {e}")).await;
            }
        };
        let running = Arc::new(Running {
            pid,
            pidfd: pidfd.clone(),
            pgroup: req.pgroup,
            pty: io.pty.clone(),
            close_stdout: Notify::new(),
            close_stderr: Notify::new(),
            group_stopped: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        lock(&self.running).insert(key, running.clone());
        let _reg = Registration {
            table: self.running.clone(),
            key,
        };
        debug!(pid, id = req.id, "exec started");
        let mut wr = wr;
        if wr
            .send(event_frame(&ServerEvent::Started { pid: pid as u32 }))
            .await
            .is_err()
        {
            kill_group(pid, &pidfd);
            let _ = pidfd.wait().await;
            return;
        }

        let gone = Arc::new(Notify::new());
        // stdin pump: stream → program. Ends at stdin EOF or when the stream dies (→ `gone`).
        let stdin_task = {
            let gone = gone.clone();
            let stdin = io.stdin;
            let pty = io.pty.clone();
            tokio::spawn(async move {
                let mut sink = stdin;
                loop {
                    match rd.recv().await {
                        Ok(Some(data)) => {
                            if let Some(f) = &sink {
                                if f.write_all(&data).await.is_err() {
                                    // EPIPE: the program closed stdin; discard the rest.
                                    sink = None;
                                }
                            } else if let Some(m) = &pty {
                                let _ = m.write_all(&data).await;
                            }
                        }
                        Ok(None) => {
                            drop(sink); // close the pipe: the program sees EOF
                            if let Some(m) = &pty {
                                if let Some(c) = sys::canonical_eof_char(m.raw()) {
                                    let _ = m.write_all(&[c]).await;
                                }
                            }
                            // Nothing more comes this way; a dead client is noticed through
                            // the session (and failed sends).
                            return;
                        }
                        Err(_) => {
                            gone.notify_one();
                            return;
                        }
                    }
                }
            })
        };

        let outcome = pump_output(
            &mut wr,
            session,
            io.stdout,
            io.stderr,
            &running,
            &gone,
            self.drain_max,
        )
        .await;
        match outcome {
            Some(status) => {
                debug!(pid, ?status, "exec finished");
                if wr
                    .send(event_frame(&ServerEvent::Exit(status)))
                    .await
                    .is_ok()
                {
                    let _ = wr.finish();
                }
                // Keep reading (and discarding) stdin until the client closes, bounded.
                let _ = tokio::time::timeout(LINGER, stdin_task).await;
            }
            None => {
                info!(pid, "exec client went away; killed the process group");
                stdin_task.abort();
            }
        }
    }
}

struct Io {
    stdin: Option<AsyncFile>,
    stdout: Option<AsyncFile>,
    stderr: Option<AsyncFile>,
    pty: Option<Arc<AsyncFile>>,
}

fn setup_io(pipes: Option<StdioPipes>, pty: Option<OwnedFd>) -> std::io::Result<Io> {
    let wrap = |fd: Option<OwnedFd>| fd.map(AsyncFile::new).transpose();
    match (pipes, pty) {
        (Some((i, o, e)), _) => Ok(Io {
            stdin: wrap(i)?,
            stdout: wrap(o)?,
            stderr: wrap(e)?,
            pty: None,
        }),
        (None, Some(m)) => Ok(Io {
            stdin: None,
            stdout: None,
            stderr: None,
            pty: Some(Arc::new(AsyncFile::new(m)?)),
        }),
        (None, None) => Err(std::io::Error::other("no stdio")),
    }
}

/// Output source: an owned pipe or the shared pty master.
enum Src {
    Pipe(AsyncFile),
    Pty(Arc<AsyncFile>),
}

impl Src {
    fn file(&self) -> &AsyncFile {
        match self {
            Src::Pipe(f) => f,
            Src::Pty(f) => f,
        }
    }
}

async fn read_opt(src: &Option<Src>) -> std::io::Result<Option<bytes::BytesMut>> {
    match src {
        Some(s) => s.file().read_chunk(FRAME_HEADER, CHUNK).await,
        None => std::future::pending().await,
    }
}

/// Forwards program output until the program exited and its output is drained (→ its status),
/// or until the client went away (→ `None`, process group killed).
#[allow(clippy::too_many_arguments)]
async fn pump_output(
    wr: &mut StreamWriter,
    session: &Session,
    stdout: Option<AsyncFile>,
    stderr: Option<AsyncFile>,
    running: &Running,
    gone: &Notify,
    drain_max: Option<Duration>,
) -> Option<ExitStatus> {
    let pty = running.pty.is_some();
    let mut out: Option<Src> = match (&running.pty, stdout) {
        (Some(m), _) => Some(Src::Pty(m.clone())),
        (None, o) => o.map(Src::Pipe),
    };
    let mut err: Option<Src> = stderr.map(Src::Pipe);
    let mut status: Option<ExitStatus> = None;
    let mut exited_at = Instant::now();
    let mut last_data = Instant::now();
    let closed = session.closed();
    tokio::pin!(closed);

    loop {
        if status.is_some() && out.is_none() && err.is_none() {
            break;
        }
        // After the exit: a pty ends when quiet; pipes end at EOF (or at the configured cap).
        let far = exited_at + Duration::from_secs(86400 * 365);
        let deadline = if pty {
            (last_data + PTY_DRAIN_IDLE).min(exited_at + PTY_DRAIN_MAX)
        } else {
            drain_max.map_or(far, |m| exited_at + m)
        };
        let (kind, res) = tokio::select! {
            biased;
            _ = &mut closed => return client_gone(running, status),
            _ = gone.notified() => return client_gone(running, status),
            r = read_opt(&out) => (FrameKind::Stdout, r),
            r = read_opt(&err) => (FrameKind::Stderr, r),
            _ = running.close_stdout.notified() => { out = None; continue; }
            _ = running.close_stderr.notified() => { err = None; continue; }
            st = running.pidfd.wait(), if status.is_none() => {
                let st = match st {
                    Ok(raw) => sys::exit_status(raw),
                    Err(e) => {
                        warn!(pid = running.pid, error = %e, "exec: waiting for the program failed");
                        ExitStatus::Code(255)
                    }
                };
                status = Some(st);
                exited_at = Instant::now();
                last_data = exited_at;
                continue;
            }
            _ = tokio::time::sleep_until(deadline), if status.is_some() => break,
        };
        match res {
            Ok(Some(buf)) => {
                last_data = Instant::now();
                let frame = sys::finish_frame(buf, kind);
                tokio::select! {
                    biased;
                    r = wr.send(frame) => if r.is_err() {
                        return client_gone(running, status);
                    },
                    _ = &mut closed => return client_gone(running, status),
                }
            }
            Ok(None) | Err(_) => {
                if kind == FrameKind::Stdout {
                    out = None;
                } else {
                    err = None;
                }
            }
        }
    }
    status
}

/// The client is gone before the exit was reported: kill the process group (and reap the
/// program in the background if it still runs). This includes background children still
/// holding the output after the program exited: the caller that waited for them is gone.
/// Returns `None` (nothing to report to anyone).
fn client_gone(running: &Running, status: Option<ExitStatus>) -> Option<ExitStatus> {
    // The group id stays reserved while any member lives, so this cannot hit a stranger's group.
    let _ = sys::kill(-running.pid, libc::SIGKILL);
    if status.is_none() {
        let _ = running.pidfd.signal(libc::SIGKILL);
        reap_later(running.pidfd.clone());
    }
    None
}

/// Reaps a killed child in the background (no zombie left behind).
fn reap_later(pidfd: Arc<PidFd>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), pidfd.wait()).await;
    });
}

impl ExecService {
    /// Number of execs currently running on all sessions.
    pub fn running_count(&self) -> usize {
        lock(&self.running).len()
    }
}
