//! The calling side of an exec: open the stream, pump local stdio, forward signals, return the
//! remote status.
//!
//! Local stdio is handled by two plain threads (a blocking reader of fd 0 and a blocking writer
//! of fds 1/2) so inherited descriptors are never switched to non-blocking mode (that would leak
//! into every other process sharing them) and a stalled consumer never blocks signal forwarding.
//!
//! Output errors reach the program as they would locally, as far as that is cheap:
//! * a closed stdout/stderr, or one on `/dev/full`, is reproduced on the server
//!   ([`StdioKind`]): the program gets EBADF / ENOSPC at the same write as locally;
//! * a stdout/stderr pipe whose reader went away is noticed at once (epoll reports an error on
//!   a pipe's write end without readers), before anything is written to it, and the server then
//!   closes its end of the program's pipe: the program's next write gets EPIPE/SIGPIPE;
//! * any other write error (ENOSPC on a full disk, EIO) closes the program's pipe the same way:
//!   the program sees EPIPE (or dies of SIGPIPE) where it would have seen ENOSPC/EIO. What the
//!   program wrote before the server closed its pipe (up to the pipe's 1 MiB and what is in
//!   flight) is accepted, where locally the write would already have failed.
//!
//! Signals: a signal the kernel sent to the caller's whole process group (the terminal's ^C,
//! ^\, ^Z, hangup: `si_code == SI_KERNEL`) goes to the program's whole process group, as it
//! would have reached every local process the program started. SIGTSTP stops the program (its
//! group, if from the terminal) and then rexec, unless rexec's own process group is orphaned,
//! where the kernel would have discarded it for a local program too.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::debug;
use transport::{CallError, Session};

use crate::proto::{
    ControlReply, ControlRequest, ExecRequest, ExitStatus, Frame, FrameDecoder, OutputFd,
    ServerEvent, Sig, StdioKind, WinSize, SERVICE,
};
use crate::sys;

/// Errors that are rexec's own (not the program's); the `rexec` tool exits 255 on them.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The exec stream could not be opened (no session, service missing, busy).
    #[error("cannot start the exec: {0}")]
    Open(CallError),
    /// The session ended before the program's exit status arrived.
    #[error("connection to the server lost: {0}")]
    Lost(String),
    /// The server sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading our stdin or writing our stdout/stderr failed.
    #[error("local I/O: {0}")]
    Local(#[from] io::Error),
}

/// How a remote execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program ran and ended with this status (all its output has been written locally).
    Exited(ExitStatus),
    /// The program did not start; `code` is the shell-style code (126/127) and `message` why.
    NotStarted {
        /// 126 (refused, not executable) or 127 (not found).
        code: i32,
        /// Why, for stderr.
        message: String,
    },
}

impl Outcome {
    /// The exit code a local shell would report.
    pub fn shell_code(&self) -> i32 {
        match self {
            Outcome::Exited(s) => s.shell_code(),
            Outcome::NotStarted { code, .. } => *code,
        }
    }
}

/// Client-side behaviour switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// `req.pty` is set and the local stdin is a terminal: WINCH becomes a window-size update.
    pub tty: bool,
    /// Signals the caller ignores (bit N = signal N, as in [`ExecRequest::sig_ignored`]): they
    /// are not caught and forwarded (with `nohup rexec …` a SIGHUP must not end the program).
    pub ignored: u64,
}

/// The signals (1..=31) this process ignores, as a bit mask. Call before installing handlers.
pub fn ignored_signals() -> u64 {
    let mut mask = 0u64;
    for sig in 1..32 {
        // SAFETY: querying a disposition into a zeroed struct.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                mask |= 1 << sig;
            }
        }
    }
    mask
}

/// What this process's fds 0–2 are, for [`ExecRequest::stdio`]. Call before anything opens
/// replacements for closed descriptors.
pub fn stdio_kinds() -> [StdioKind; 3] {
    std::array::from_fn(|fd| {
        // SAFETY: fstat into a valid struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd as RawFd, &mut st) < 0 {
                return StdioKind::Closed;
            }
            if fd > 0
                && st.st_mode & libc::S_IFMT == libc::S_IFCHR
                && st.st_rdev == libc::makedev(1, 7)
            {
                return StdioKind::DevFull;
            }
        }
        StdioKind::Stream
    })
}

/// A fresh random exec id (from the OS: one id per process needs no userspace CSPRNG).
pub fn new_id() -> u64 {
    rand::RngCore::next_u64(&mut rand::rngs::OsRng)
}

/// Builds the stream header.
pub fn encode_request(req: &ExecRequest) -> Bytes {
    postcard::to_allocvec(req)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// Sends one control request and returns the reply; errors are logged only (the exec itself
/// reports what matters).
async fn control(session: &Session, req: ControlRequest) -> Option<ControlReply> {
    let body = postcard::to_allocvec(&req).ok()?;
    match session.call(SERVICE, Bytes::from(body)).await {
        Ok(r) => {
            let reply = postcard::from_bytes::<ControlReply>(&r).ok();
            if let Some(ControlReply::UnknownId) = reply {
                debug!(?req, "exec control: program already finished");
            }
            reply
        }
        Err(e) => {
            debug!(?req, error = %e, "exec control failed");
            None
        }
    }
}

/// Runs `req` on the peer of `session` with this process's stdio, forwarding the signals the
/// caller receives (INT, TERM, HUP, QUIT, USR1, USR2, WINCH, CONT, TSTP; see the module docs for
/// group delivery and job stops). Returns once the program ended, every holder of its output
/// closed it, and all of that output was written locally.
pub async fn run(
    session: &Session,
    req: ExecRequest,
    opts: RunOptions,
) -> Result<Outcome, ClientError> {
    let stdin = if stdin_is_empty() {
        StdinSource::Empty
    } else {
        StdinSource::Process
    };
    let io = LocalIo {
        stdout: 1,
        stderr: 2,
        stdin,
        control: None,
        events: None,
    };
    run_with(session, req, opts, io).await
}

/// Where the local side of an exec lives: this process's stdio and signals ([`run`]), or
/// descriptors and control messages handed over by another process (the rexec mux, which
/// runs execs for local `rexec` processes over its one session).
pub struct LocalIo {
    /// Descriptor the program's stdout is written to (borrowed: open until [`run_with`] returns).
    pub stdout: RawFd,
    /// Descriptor the program's stderr is written to (borrowed, like `stdout`).
    pub stderr: RawFd,
    /// Where the program's stdin comes from.
    pub stdin: StdinSource,
    /// `None`: this process's signals are caught and forwarded (see [`run`]). `Some`: control
    /// comes from this channel instead (the caller decides about terminal mode and orphaned
    /// process groups, and turns SIGWINCH into [`LocalControl::Resize`] itself).
    pub control: Option<mpsc::UnboundedReceiver<LocalControl>>,
    /// Told about [`LocalEvent`]s; with `control`, a job stop is reported here instead of
    /// stopping this process.
    pub events: Option<mpsc::UnboundedSender<LocalEvent>>,
}

/// Source of the program's stdin for [`LocalIo`].
pub enum StdinSource {
    /// Empty: EOF right away (stdin closed or `/dev/null`).
    Empty,
    /// This process's fd 0 (read in a thread; see the module docs).
    Process,
    /// This descriptor, read in a thread until EOF and then closed.
    Fd(std::os::fd::OwnedFd),
}

/// A control message for a running exec, from whoever holds the caller's signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalControl {
    /// Forward this signal; `group`: the caller's whole process group got it.
    Signal {
        /// Which signal.
        sig: Sig,
        /// Sent by the kernel to the caller's whole process group.
        group: bool,
    },
    /// The caller's terminal has this size now (with a remote pty).
    Resize(WinSize),
}

/// Progress of an exec that [`run_with`] reports through [`LocalIo::events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEvent {
    /// The exec stream is open: the server has the request (stdin may flow from now on).
    Opened,
    /// A job stop ([`Sig::Tstp`] from the caller's group) stopped the program: the caller
    /// should stop itself the same way.
    Stopped,
}

/// [`run`] with the local side described by `io`.
pub async fn run_with(
    session: &Session,
    req: ExecRequest,
    opts: RunOptions,
    io: LocalIo,
) -> Result<Outcome, ClientError> {
    let id = req.id;
    let req_stdio = req.stdio;
    let LocalIo {
        stdout,
        stderr,
        stdin,
        control,
        events,
    } = io;
    let signals = match control {
        None => SignalSource::Process(Signals::new(opts.ignored)?),
        Some(rx) => SignalSource::Channel(rx),
    };
    let stream = session
        .open_stream(SERVICE, encode_request(&req))
        .await
        .map_err(ClientError::Open)?;
    if let Some(ev) = &events {
        let _ = ev.send(LocalEvent::Opened);
    }
    let (mut rd, mut wr) = stream.split();

    // stdin: thread → channel → stream. EOF → half-close.
    let stdin_task = if let StdinSource::Empty = stdin {
        // EOF right away: no thread, no task, and the Eof leaves in the same write as the request.
        let _ = wr.finish();
        None
    } else {
        let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(4);
        spawn_stdin_reader(stdin, in_tx)?;
        Some(tokio::spawn(async move {
            while let Some(b) = in_rx.recv().await {
                if wr.send(b).await.is_err() {
                    return;
                }
            }
            let _ = wr.finish();
            // Keep the writer alive: dropping it now is fine (EOF already sent).
        }))
    };

    // Signals are forwarded once the program runs (the server registers it before `Started`).
    let (started_tx, started_rx) = watch::channel(false);
    let sig_task = {
        let session = session.clone();
        tokio::spawn(forward(
            signals,
            session,
            id,
            started_rx.clone(),
            opts.tty,
            events,
        ))
    };
    // A stdout/stderr pipe whose reader is gone: tell the server before the program writes.
    let streamed = |fd: usize| req_stdio[fd] == StdioKind::Stream && !opts.tty;
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<RawFd>();
    let targets = [-1, stdout, stderr];
    let watchers: Vec<_> = [1, 2]
        .into_iter()
        .filter(|&fd| streamed(fd as usize))
        .filter_map(|fd| watch_reader_gone(fd, targets[fd as usize], gone_tx.clone()))
        .collect();
    drop(gone_tx);

    let mut out = Output::new(targets);
    let mut dec = FrameDecoder::default();
    let mut reported = [false; 3];
    let mut watching = !watchers.is_empty();
    let result = loop {
        let received = tokio::select! {
            biased;
            fd = gone_rx.recv(), if watching && *started_rx.borrow() => {
                match fd {
                    Some(fd) => {
                        out.mark_closed(fd);
                        if !std::mem::replace(&mut reported[fd as usize], true) {
                            close_output(session, id, fd).await;
                        }
                    }
                    None => watching = false,
                }
                continue;
            }
            r = rd.recv() => r,
        };
        let chunk = match received {
            Ok(Some(c)) => c,
            Ok(None) => {
                break Err(ClientError::Lost(
                    "stream ended before the exit status".into(),
                ))
            }
            Err(e) => break Err(ClientError::Lost(e.to_string())),
        };
        dec.push_bytes(chunk);
        let mut done = None;
        loop {
            match dec.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Stdout(b))) => {
                    if let Some(fd) = out.write(1, b).await {
                        if !std::mem::replace(&mut reported[1], true) {
                            close_output(session, id, fd).await;
                        }
                    }
                }
                Ok(Some(Frame::Stderr(b))) => {
                    if let Some(fd) = out.write(2, b).await {
                        if !std::mem::replace(&mut reported[2], true) {
                            close_output(session, id, fd).await;
                        }
                    }
                }
                Ok(Some(Frame::Event(ServerEvent::Started { pid }))) => {
                    debug!(pid, "remote program started");
                    let _ = started_tx.send(true);
                }
                Ok(Some(Frame::Event(ServerEvent::Exit(st)))) => {
                    done = Some(Ok(Outcome::Exited(st)));
                    break;
                }
                Ok(Some(Frame::Event(ServerEvent::Failed { code, message }))) => {
                    done = Some(Ok(Outcome::NotStarted { code, message }));
                    break;
                }
                Err(e) => {
                    done = Some(Err(ClientError::Protocol(e.to_string())));
                    break;
                }
            }
        }
        if let Some(d) = done {
            break d;
        }
    };
    sig_task.abort();
    for w in watchers {
        w.abort();
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    // All output received before the status is written out before we return.
    out.finish();
    result
}

async fn close_output(session: &Session, id: u64, fd: RawFd) {
    let fd = if fd == 1 {
        OutputFd::Stdout
    } else {
        OutputFd::Stderr
    };
    let _ = control(session, ControlRequest::CloseOutput { id, fd }).await;
}

/// Borrowed view of an inherited fd for epoll (never closed, never made non-blocking).
struct Borrowed(RawFd);

impl std::os::fd::AsRawFd for Borrowed {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Watches output descriptor `target` (the program's `fd`) if it is a pipe: epoll reports an
/// error on a pipe's write end once it has no reader left (also right away if it has none now).
/// Sends `fd` on `tx` then.
fn watch_reader_gone(
    fd: RawFd,
    target: RawFd,
    tx: mpsc::UnboundedSender<RawFd>,
) -> Option<tokio::task::JoinHandle<()>> {
    // SAFETY: fstat into a valid struct.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(target, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if !is_pipe {
        return None;
    }
    // SAFETY: the output descriptors stay open (and the same) for the whole run (LocalIo's
    // contract); the task owning the registration is aborted before `run_with` returns.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            Borrowed(target),
            tokio::io::Interest::ERROR,
        )
    }
    .ok()?;
    Some(tokio::spawn(async move {
        if afd.ready(tokio::io::Interest::ERROR).await.is_ok() {
            debug!(fd, "the reader of this output went away");
            let _ = tx.send(fd);
        }
        // Deregister before the fd could be reused: dropping `afd` does that.
        drop(afd);
    }))
}

/// True if fd 0 is closed or is /dev/null: stdin is at EOF and needs no reader thread.
pub fn stdin_is_empty() -> bool {
    // SAFETY: fstat into a valid struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(0, &mut st) < 0 {
            return true;
        }
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
    }
}

/// Reads fd 0 (or the given descriptor) in a thread (blocking reads; works for files, pipes and
/// terminals alike).
fn spawn_stdin_reader(src: StdinSource, tx: mpsc::Sender<Bytes>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("rexec-stdin".into())
        .spawn(move || {
            let (fd, _owned) = match src {
                StdinSource::Fd(o) => (std::os::fd::AsRawFd::as_raw_fd(&o), Some(o)),
                _ => (0, None),
            };
            // rexec reads its stdin ahead of the program, also as a background job.
            block_sigttin();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match read_input(fd, &mut buf) {
                    Some(0) | None => return,
                    Some(n) => n,
                };
                if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Blocks SIGTTIN in the calling thread, a reader of the caller's stdin: a read while rexec
/// is in the background would stop rexec with SIGTTIN although the program may never read;
/// with it blocked the read fails with EIO instead, and [`read_input`] waits until rexec is
/// in the foreground again.
pub(crate) fn block_sigttin() {
    // SAFETY: changing this thread's own signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTIN);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// One read of the caller's input `fd` into `buf` (after [`block_sigttin`]): the byte count,
/// 0 at end of file, `None` on an error that ends the input (EBADF for a closed stdin, a
/// hung-up terminal, ...). Retries interrupted reads, and waits while a read of stdin from
/// the background fails with EIO.
pub(crate) fn read_input(fd: i32, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: reading into a valid buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n >= 0 {
            return Some(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if fd == 0 && e.raw_os_error() == Some(libc::EIO) && background_on_tty() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        return None;
    }
}

/// True if fd 0 is a terminal whose foreground process group is not ours.
fn background_on_tty() -> bool {
    // SAFETY: plain queries.
    unsafe {
        let fg = libc::tcgetpgrp(0);
        fg > 0 && fg != libc::getpgrp()
    }
}

/// Writes stdout/stderr chunks in order from a thread, started on first output.
struct Output {
    /// Where the program's fd N is written (index 1 and 2).
    targets: [RawFd; 3],
    tx: Option<mpsc::Sender<(RawFd, Bytes)>>,
    broken: mpsc::UnboundedReceiver<RawFd>,
    broken_tx: Option<mpsc::UnboundedSender<RawFd>>,
    closed: [bool; 3],
    thread: Option<JoinHandle<()>>,
}

impl Output {
    fn new(targets: [RawFd; 3]) -> Self {
        let (broken_tx, broken) = mpsc::unbounded_channel();
        Self {
            targets,
            tx: None,
            broken,
            broken_tx: Some(broken_tx),
            closed: [false; 3],
            thread: None,
        }
    }

    /// Queues a chunk (waits while the writer is behind: back-pressure). Returns an fd that just
    /// turned out to be broken (EPIPE), once.
    async fn write(&mut self, fd: RawFd, data: Bytes) -> Option<RawFd> {
        if self.closed[fd as usize] {
            return None;
        }
        if self.tx.is_none() {
            let (tx, mut rx) = mpsc::channel::<(RawFd, Bytes)>(8);
            let broken_tx = self.broken_tx.take()?;
            let targets = self.targets;
            match std::thread::Builder::new()
                .name("rexec-out".into())
                .spawn(move || {
                    let mut dead = [false; 3];
                    while let Some((fd, data)) = rx.blocking_recv() {
                        let i = fd as usize;
                        if dead[i] {
                            continue;
                        }
                        if write_all_blocking(targets[i], &data).is_err() {
                            dead[i] = true;
                            let _ = broken_tx.send(fd);
                        }
                    }
                }) {
                Ok(h) => self.thread = Some(h),
                Err(_) => return None,
            }
            self.tx = Some(tx);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send((fd, data)).await;
        }
        let mut first = None;
        while let Ok(b) = self.broken.try_recv() {
            let i = b as usize;
            if !self.closed[i] {
                self.closed[i] = true;
                first = Some(b);
            }
        }
        first
    }

    /// Drops further output for `fd` (its reader is gone; the server was told).
    fn mark_closed(&mut self, fd: RawFd) {
        self.closed[fd as usize] = true;
    }

    /// Flushes everything queued and stops the writer thread.
    fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

fn write_all_blocking(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: writing from a valid slice.
        let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Per signal number: was the latest delivery sent by the kernel to the whole process group
/// (`si_code == SI_KERNEL`: the terminal's ^C, ^\\, ^Z, a hangup)? Set in the signal handler.
static FROM_KERNEL: [AtomicBool; 32] = [const { AtomicBool::new(false) }; 32];

/// `si_code` of signals the kernel generates itself (tty job control keys, hangup).
const SI_KERNEL: i32 = 0x80;

/// Handlers for the forwarded signals, installed before the exec starts so none is lost.
struct Signals {
    streams: Vec<(Sig, tokio::signal::unix::Signal)>,
    /// Our siginfo actions, removed on drop (tokio's own stay registered, as always).
    actions: Vec<signal_hook_registry::SigId>,
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.actions.drain(..) {
            signal_hook_registry::unregister(id);
        }
    }
}

impl Signals {
    fn new(ignored: u64) -> io::Result<Self> {
        let mut streams = Vec::with_capacity(Sig::ALL.len());
        let mut actions = Vec::with_capacity(Sig::ALL.len());
        // Every forwardable signal except SIGKILL, which cannot be caught, and those the caller
        // ignores (they stay ignored here, and the program inherits that).
        for s in Sig::ALL
            .into_iter()
            .filter(|s| *s != Sig::Kill && ignored & (1 << s.number()) == 0)
        {
            let n = s.number();
            // Registered first: runs before tokio's action for the same delivery, so the flag is
            // set by the time the stream below yields it.
            // SAFETY: the action only stores into an atomic (async-signal-safe).
            let id = unsafe {
                signal_hook_registry::register_sigaction(n, move |info: &libc::siginfo_t| {
                    if let Some(f) = FROM_KERNEL.get(n as usize) {
                        f.store(info.si_code == SI_KERNEL, Ordering::Relaxed);
                    }
                })
            }
            .map_err(io::Error::other)?;
            actions.push(id);
            let kind = tokio::signal::unix::SignalKind::from_raw(n);
            streams.push((s, tokio::signal::unix::signal(kind)?));
        }
        Ok(Self { streams, actions })
    }

    /// The next signal, and whether the kernel sent it to the whole process group.
    async fn next(&mut self) -> (Sig, bool) {
        let sig = std::future::poll_fn(|cx| {
            for (s, st) in self.streams.iter_mut() {
                if let std::task::Poll::Ready(Some(())) = st.poll_recv(cx) {
                    return std::task::Poll::Ready(*s);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        let group = FROM_KERNEL
            .get(sig.number() as usize)
            .is_some_and(|f| f.swap(false, Ordering::Relaxed));
        (sig, group)
    }
}

/// Where forwarded signals come from.
enum SignalSource {
    /// This process's own (handlers installed).
    Process(Signals),
    /// Another process's, as control messages.
    Channel(mpsc::UnboundedReceiver<LocalControl>),
}

impl SignalSource {
    /// The next control message; `None` once the channel is closed.
    async fn next(&mut self) -> Option<LocalControl> {
        match self {
            SignalSource::Process(s) => {
                let (sig, group) = s.next().await;
                Some(LocalControl::Signal { sig, group })
            }
            SignalSource::Channel(rx) => rx.recv().await,
        }
    }
}

async fn forward(
    mut source: SignalSource,
    session: Session,
    id: u64,
    mut started: watch::Receiver<bool>,
    tty: bool,
    events: Option<mpsc::UnboundedSender<LocalEvent>>,
) {
    let own = matches!(source, SignalSource::Process(_));
    let mut queued: Vec<LocalControl> = Vec::new();
    loop {
        tokio::select! {
            msg = source.next() => {
                let Some(msg) = msg else {
                    // The caller is gone; the exec ends through its own path.
                    std::future::pending::<()>().await;
                    return;
                };
                if !*started.borrow() {
                    queued.push(msg);
                    continue;
                }
                deliver(&session, id, msg, tty, own, events.as_ref()).await;
            }
            r = started.changed(), if !*started.borrow() => {
                if r.is_err() { return; }
                for msg in queued.drain(..) {
                    deliver(&session, id, msg, tty, own, events.as_ref()).await;
                }
            }
        }
    }
}

/// Delivers one control message. `own`: the signals are this process's (terminal mode, the
/// orphaned-group rule and the stop are handled here); else the caller handled those and a
/// job stop is reported through `events`.
async fn deliver(
    session: &Session,
    id: u64,
    msg: LocalControl,
    tty: bool,
    own: bool,
    events: Option<&mpsc::UnboundedSender<LocalEvent>>,
) {
    let (sig, group) = match msg {
        LocalControl::Resize(size) => {
            let _ = control(session, ControlRequest::Resize { id, size }).await;
            return;
        }
        LocalControl::Signal { sig, group } => (sig, group),
    };
    if own && tty && sig == Sig::Winch {
        if let Some(size) = local_winsize() {
            let _ = control(session, ControlRequest::Resize { id, size }).await;
        }
        return;
    }
    if sig == Sig::Tstp {
        // With -t the terminal's ^Z is a byte for the remote terminal; a SIGTSTP sent to rexec
        // does not stop anything. Without -t: a local program in an orphaned process group
        // would not stop (the kernel discards SIGTSTP there), so neither does the remote one.
        if own && (tty || pgrp_orphaned()) {
            debug!("SIGTSTP not forwarded (terminal mode or orphaned process group)");
            return;
        }
        let reply = control(session, ControlRequest::Signal { id, sig, group }).await;
        if reply == Some(ControlReply::Stopped) {
            if !own {
                if let Some(ev) = events {
                    let _ = ev.send(LocalEvent::Stopped);
                }
                return;
            }
            // The program stopped: stop like it would have, by SIGTSTP (a job-control shell
            // reports "Stopped"); SIGCONT resumes us and is forwarded, resuming it. Neither
            // side hears heartbeats meanwhile.
            session.expect_silence(true);
            stop_self();
            session.expect_silence(false);
        }
        return;
    }
    let _ = control(session, ControlRequest::Signal { id, sig, group }).await;
}

/// Stops this process with SIGTSTP's default action, then puts the handler back.
fn stop_self() {
    // SAFETY: swapping this process's SIGTSTP disposition around a raise(); the saved action
    // (signal-hook's handler) is restored unchanged.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTSTP, &dfl, &mut old) < 0 {
            return;
        }
        libc::raise(libc::SIGTSTP);
        libc::sigaction(libc::SIGTSTP, &old, std::ptr::null_mut());
    }
}

/// Is this process's group orphaned (POSIX: no member has a parent in another group of the same
/// session)? The kernel's rule for discarding SIGTSTP, checked through /proc on the rare SIGTSTP.
pub fn pgrp_orphaned() -> bool {
    // (pid, ppid, pgrp, session) from /proc/<pid>/stat.
    fn stat(pid: &str) -> Option<(i32, i32, i32, i32)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = s.rsplit_once(") ")?.1;
        let f: Vec<&str> = rest.split(' ').collect();
        Some((
            pid.parse().ok()?,
            f.get(1)?.parse().ok()?,
            f.get(2)?.parse().ok()?,
            f.get(3)?.parse().ok()?,
        ))
    }
    // SAFETY: plain getters.
    let (pgrp, sid) = unsafe { (libc::getpgrp(), libc::getsid(0)) };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, ppid, pg, _)) = stat(name) else {
            continue;
        };
        if pg != pgrp {
            continue;
        }
        if let Some((_, _, ppg, psid)) = stat(&ppid.to_string()) {
            if ppg != pgrp && psid == sid {
                return false;
            }
        }
    }
    true
}

/// Window size of the local terminal (stdin, else stdout).
pub fn local_winsize() -> Option<WinSize> {
    sys::get_winsize(0).or_else(|| sys::get_winsize(1))
}

/// Puts the local terminal (fd 0) in raw mode; restores it on drop.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// `None` if stdin is not a terminal.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: termios calls on fd 0 with valid structs.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) < 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSADRAIN, &t) < 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes saved by enter().
        unsafe {
            libc::tcsetattr(0, libc::TCSADRAIN, &self.saved);
        }
    }
}
