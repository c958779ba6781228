//! The calling side of an exec: open the stream, pump local stdio, forward signals, return the
//! remote status.
//!
//! Local stdio is handled by two plain threads (a blocking reader of fd 0 and a blocking writer
//! of fds 1/2) so inherited descriptors are never switched to non-blocking mode (that would leak
//! into every other process sharing them) and a stalled consumer never blocks signal forwarding.

use std::io;
use std::os::fd::RawFd;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::debug;
use transport::{CallError, Session};

use crate::proto::{
    ControlReply, ControlRequest, ExecRequest, ExitStatus, Frame, FrameDecoder, OutputFd,
    ServerEvent, Sig, WinSize, SERVICE,
};
use crate::sys;

/// Errors that are rexec's own (not the program's); the `rexec` tool exits 255 on them.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot start the exec: {0}")]
    Open(CallError),
    #[error("connection to the server lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("local I/O: {0}")]
    Local(#[from] io::Error),
}

/// How a remote execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program ran and ended with this status (all its output has been written locally).
    Exited(ExitStatus),
    /// The program did not start; `code` is the shell-style code (126/127) and `message` why.
    NotStarted { code: i32, message: String },
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

/// Sends one control request; errors are logged only (the exec itself reports what matters).
async fn control(session: &Session, req: ControlRequest) {
    let Ok(body) = postcard::to_allocvec(&req) else {
        return;
    };
    match session.call(SERVICE, Bytes::from(body)).await {
        Ok(r) => {
            if let Ok(ControlReply::UnknownId) = postcard::from_bytes::<ControlReply>(&r) {
                debug!(?req, "exec control: program already finished");
            }
        }
        Err(e) => debug!(?req, error = %e, "exec control failed"),
    }
}

/// Runs `req` on the peer of `session` with this process's stdio, forwarding the signals the
/// caller receives (INT, TERM, HUP, QUIT, USR1, USR2, WINCH, CONT, TSTP). Returns once the
/// program ended and all of its output was written locally.
pub async fn run(
    session: &Session,
    req: ExecRequest,
    opts: RunOptions,
) -> Result<Outcome, ClientError> {
    let id = req.id;
    let signals = Signals::new(opts.ignored)?;
    let stream = session
        .open_stream(SERVICE, encode_request(&req))
        .await
        .map_err(ClientError::Open)?;
    let (mut rd, mut wr) = stream.split();

    // stdin: thread → channel → stream. EOF → half-close.
    let stdin_task = if stdin_is_empty() {
        // EOF right away: no thread, no task, and the Eof leaves in the same write as the request.
        let _ = wr.finish();
        None
    } else {
        let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(4);
        spawn_stdin_reader(in_tx)?;
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
        tokio::spawn(signals.forward(session, id, started_rx, opts.tty))
    };

    let mut out = Output::new();
    let mut dec = FrameDecoder::default();
    let result = loop {
        let chunk = match rd.recv().await {
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
                        close_output(session, id, fd).await;
                    }
                }
                Ok(Some(Frame::Stderr(b))) => {
                    if let Some(fd) = out.write(2, b).await {
                        close_output(session, id, fd).await;
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
    control(session, ControlRequest::CloseOutput { id, fd }).await;
}

/// True if fd 0 is closed or is /dev/null: stdin is at EOF and needs no reader thread.
fn stdin_is_empty() -> bool {
    // SAFETY: fstat into a valid struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(0, &mut st) < 0 {
            return true;
        }
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
    }
}

/// Reads fd 0 in a thread (blocking reads; works for files, pipes and terminals alike).
fn spawn_stdin_reader(tx: mpsc::Sender<Bytes>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("rexec-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                // SAFETY: reading into a valid buffer.
                let n = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if n < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return; // EBADF (closed stdin) etc.: EOF
                }
                if n == 0 {
                    return;
                }
                if tx
                    .blocking_send(Bytes::copy_from_slice(&buf[..n as usize]))
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Writes stdout/stderr chunks in order from a thread, started on first output.
struct Output {
    tx: Option<mpsc::Sender<(RawFd, Bytes)>>,
    broken: mpsc::UnboundedReceiver<RawFd>,
    broken_tx: Option<mpsc::UnboundedSender<RawFd>>,
    closed: [bool; 3],
    thread: Option<JoinHandle<()>>,
}

impl Output {
    fn new() -> Self {
        let (broken_tx, broken) = mpsc::unbounded_channel();
        Self {
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
        if self.tx.is_none() {
            let (tx, mut rx) = mpsc::channel::<(RawFd, Bytes)>(8);
            let broken_tx = self.broken_tx.take()?;
            match std::thread::Builder::new()
                .name("rexec-out".into())
                .spawn(move || {
                    let mut dead = [false; 3];
                    while let Some((fd, data)) = rx.blocking_recv() {
                        let i = fd as usize;
                        if dead[i] {
                            continue;
                        }
                        if write_all_blocking(fd, &data).is_err() {
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

/// Handlers for the forwarded signals, installed before the exec starts so none is lost.
struct Signals {
    streams: Vec<(Sig, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new(ignored: u64) -> io::Result<Self> {
        let mut streams = Vec::with_capacity(Sig::ALL.len());
        // Every forwardable signal except SIGKILL, which cannot be caught, and those the caller
        // ignores (they stay ignored here, and the program inherits that).
        for s in Sig::ALL
            .into_iter()
            .filter(|s| *s != Sig::Kill && ignored & (1 << s.number()) == 0)
        {
            let kind = tokio::signal::unix::SignalKind::from_raw(s.number());
            streams.push((s, tokio::signal::unix::signal(kind)?));
        }
        Ok(Self { streams })
    }

    async fn next(&mut self) -> Sig {
        std::future::poll_fn(|cx| {
            for (s, st) in self.streams.iter_mut() {
                if let std::task::Poll::Ready(Some(())) = st.poll_recv(cx) {
                    return std::task::Poll::Ready(*s);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    async fn forward(
        mut self,
        session: Session,
        id: u64,
        mut started: watch::Receiver<bool>,
        tty: bool,
    ) {
        let mut queued: Vec<Sig> = Vec::new();
        loop {
            tokio::select! {
                sig = self.next() => {
                    if !*started.borrow() {
                        queued.push(sig);
                        continue;
                    }
                    deliver(&session, id, sig, tty).await;
                }
                r = started.changed(), if !*started.borrow() => {
                    if r.is_err() { return; }
                    for sig in queued.drain(..) {
                        deliver(&session, id, sig, tty).await;
                    }
                }
            }
        }
    }
}

async fn deliver(session: &Session, id: u64, sig: Sig, tty: bool) {
    if tty && sig == Sig::Winch {
        if let Some(size) = local_winsize() {
            control(session, ControlRequest::Resize { id, size }).await;
        }
        return;
    }
    control(session, ControlRequest::Signal { id, sig }).await;
    if sig == Sig::Tstp && !tty {
        // Stop like the local program would, so a job-control shell sees us stop; SIGCONT
        // (forwarded too) resumes both.
        // SAFETY: raising a signal on ourselves.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
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
