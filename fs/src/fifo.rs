//! FIFO tunnels: a FIFO on a qtfs mount behaves like one FIFO shared by both sides.
//!
//! # Why a tunnel
//! A node of type S_IFIFO on a FUSE mount is handled by the DPU kernel itself: opening it makes
//! a *local* pipe (one per inode) and the FUSE server never sees the open, the reads or the
//! writes. The HOST's FIFO is another pipe. So for every FIFO the DPU uses, the mount daemon
//! (DPU) and offloadd (HOST) run a tunnel over one transport stream of the `fs` service: each
//! daemon opens its side's FIFO like any local process would (the DPU daemon through its own
//! mount: an `O_PATH` descriptor of the node re-opened through `/proc/self/fd/N`, from a thread
//! that is not a FUSE thread), mirrors the presence of readers and pumps the bytes.
//!
//! # One cycle
//! - *Readers on side X* are detectable without side effects: `open(O_WRONLY|O_NONBLOCK)` fails
//!   with ENXIO iff X has no reader (the kernel checks before touching any counter). A probe
//!   that succeeds keeps its descriptor as X's *mirror writer* `W` (closing it at once would hand
//!   a reader blocked in `open` an immediate EOF), and X sends [`Msg::Readers`].
//! - The other side Y opens a *mirror reader* `R` (`O_RDONLY|O_NONBLOCK`), so Y's writers can
//!   open (blocking opens complete, non-blocking ones stop failing with ENXIO). Bytes read from
//!   `R` travel as [`Msg::Data`] and X writes them into its pipe through `W`.
//! - EOF: once every writer on Y has closed, `R` reads 0 — Linux reports POLLHUP on `R` only if
//!   a writer opened after `R` did (`pipe_poll` compares `w_counter` with the value at open), so
//!   when a writer was already waiting at `R`'s open, `R` is also checked on a timer. Y sends
//!   [`Msg::Eof`], X closes `W`, and X's readers see EOF unless they hold a writer themselves
//!   (an `O_RDWR` opener such as containerd's log reader never sees EOF, as with a local FIFO).
//! - Readers gone: `W` polls EPOLLERR once X has no reader; X sends [`Msg::Gone`] and Y closes
//!   `R`, so Y's writers get EPIPE (the daemons ignore SIGPIPE, as every Rust program does).
//! - Then both sides are idle again and probe anew. One cycle (one direction) at a time per
//!   FIFO: a FIFO is used one way in practice, and this way neither daemon ever mistakes its
//!   own mirror end for a peer. When both sides find readers at once the DPU's cycle wins (the
//!   HOST closes its probe writer). Cycle ids (odd: started by the DPU, even: by the HOST) let
//!   each side drop messages of a cycle that already ended.
//! - After X's readers were given an EOF, a new mirror writer on X would hide it from a reader
//!   that has not called `read` yet. So X is probed again only after a kick (a new opener) but
//!   not within [`EOF_HOLD_OFF`], or after [`EOF_GRACE`] (which finds readers that stay open
//!   after their EOF, like an `O_RDWR` one waiting for the next writer). A reader that keeps its
//!   descriptor longer than that and reads again blocks instead of reading 0 again.
//!
//! # When to probe
//! There is no hook for "a process is opening a FIFO" (fsnotify's `IN_OPEN` fires only after a
//! blocking open completed). The DPU gives FIFO entries and attributes a TTL of 0, so every
//! path walk to the FIFO is a FUSE LOOKUP and every open (its permission check) a GETATTR:
//! either *arms* the FIFO's tunnel or, when armed, *kicks* it ([`Msg::Kick`] tells the HOST
//! too). After a kick or the end of a cycle both sides probe at once, then after 0.25, 0.5, 1,
//! 2, … ms up to [`PROBE_MAX`] for [`FAST_WINDOW`]; then the DPU stops probing its side (its openers
//! kick), while the HOST keeps probing every [`SLOW_PROBE`] (a HOST reader never kicks). The
//! DPU daemon keeps an `O_PATH` descriptor of the FIFO only during a cycle and the first tenths
//! of a second after a kick (later probes walk the path), so a DPU `umount` is refused as busy
//! only while a FIFO is in use. A tunnel idle for [`DISARM_AFTER`] is closed, as is the tunnel of a FIFO
//! the DPU unlinked, and every tunnel when the session or the mount ends. While armed, a
//! tunnel keeps the FIFO's inode number and HOST node (the kernel forgets a FIFO's inode as
//! soon as its last opener is done, its entries having TTL 0; a tunnel whose inode changed
//! under it would end in the middle of a cycle and hand the HOST's readers an early EOF). An
//! idle tunnel holds no HOST descriptor; probes are transient.
//!
//! # Limits (known, by design)
//! - Who opens is inferred from lookups and getattrs: a DPU writer blocked in `open` longer
//!   than [`DISARM_AFTER`] with no HOST reader and no further DPU activity on the FIFO is not
//!   connected when a HOST reader comes later (until the next DPU lookup of the FIFO).
//! - A HOST reader found by the HOST's slow probes while the tunnel is armed starts a cycle
//!   even when no DPU process has the FIFO open: the two mirror ends (and so a HOST
//!   descriptor) then stay until that HOST reader goes or a DPU writer comes and goes.
//! - A reader that keeps its descriptor after its EOF and reads again past [`EOF_GRACE`]
//!   blocks instead of reading 0 again (see the cycle above).
//! - When both sides have readers at once, the HOST's probe writer was briefly a writer to
//!   them: a HOST reader blocked in `open` may see an empty EOF.
//!
//! # Bounds
//! Flow control is the stream's: a side writes the next chunk into its pipe before it reads
//! the next message, so a slow reader stops the far writer. At most [`INBOX`] decoded messages
//! wait per tunnel. A malformed or unexpected message ends that tunnel only.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, trace};
use transport::{Stream, StreamReader, StreamWriter};

use crate::proto::NodeId;

/// First byte of an `fs` stream header: what the stream is for.
pub const STREAM_FIFO: u8 = 1;

/// Header of a FIFO tunnel stream (after [`STREAM_FIFO`]): which node, of which server instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunnelHeader {
    /// The server instance the node id belongs to.
    pub instance: u64,
    /// The FIFO's node.
    pub node: NodeId,
}

/// Messages of a FIFO tunnel, both directions (length-prefixed postcard frames).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Msg {
    /// DPU → HOST: a DPU process is looking the FIFO up or opening it: probe now.
    Kick,
    /// The sender's side has readers and the sender holds a mirror writer there: open a mirror
    /// reader on your side and send what your writers write.
    Readers {
        /// Cycle id chosen by the sender.
        cycle: u32,
    },
    /// The readers of the sender's side are gone: close your mirror reader.
    Gone {
        /// The cycle.
        cycle: u32,
    },
    /// The sender does not take this cycle (busy with another, or its FIFO is gone).
    Decline {
        /// The cycle.
        cycle: u32,
    },
    /// Bytes the sender's writers wrote.
    Data {
        /// The cycle.
        cycle: u32,
        /// At most [`CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Every writer on the sender's side has closed: close your mirror writer.
    Eof {
        /// The cycle.
        cycle: u32,
    },
}

/// Largest [`Msg::Data`] payload (one pipe read).
pub const CHUNK: usize = 64 * 1024;
/// Largest encoded message accepted.
const MAX_MSG: usize = CHUNK + 64;
/// Decoded messages waiting per tunnel.
pub const INBOX: usize = 8;
/// First pause between two probes after a kick (doubling up to [`PROBE_MAX`]): the opener
/// that kicked usually reaches the pipe within this.
pub const FIRST_STEP: Duration = Duration::from_micros(250);
/// Longest pause between two probes while a side probes fast.
pub const PROBE_MAX: Duration = Duration::from_millis(100);
/// How long after a kick or a cycle both sides probe fast.
pub const FAST_WINDOW: Duration = Duration::from_secs(3);
/// HOST probe interval outside the fast window.
pub const SLOW_PROBE: Duration = Duration::from_millis(500);
/// An idle tunnel with no kick for this long is closed by the DPU.
pub const DISARM_AFTER: Duration = Duration::from_secs(30);
/// After a side's readers were given an EOF, kicks (new openers) wait this long before that
/// side is probed again.
pub const EOF_HOLD_OFF: Duration = Duration::from_millis(100);
/// After a side's readers were given an EOF, timers wait this long before probing that side
/// again (a reader that stays open after its EOF, e.g. an `O_RDWR` one, is found then).
pub const EOF_GRACE: Duration = Duration::from_secs(1);
/// Longest pause between two checks for the EOF of a writer that was already there when the
/// mirror reader opened (no POLLHUP for it).
const EOF_CHECK_MAX: Duration = Duration::from_millis(100);

/// Why a tunnel ended (for logs).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The stream failed or the peer closed it.
    #[error("tunnel stream: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that cannot be decoded.
    #[error("malformed tunnel message")]
    Malformed,
    /// The FIFO cannot be opened on this side any more.
    #[error("FIFO unavailable: errno {0}")]
    Gone(i32),
}

/// Encodes the stream header of a tunnel.
pub fn encode_header(h: &TunnelHeader) -> Bytes {
    crate::streams::header(STREAM_FIFO, h)
}

/// Decodes a tunnel stream header.
pub fn decode_header(b: &[u8]) -> Option<TunnelHeader> {
    crate::streams::parse_header(STREAM_FIFO, b)
}

/// One message as sent on the stream: `len: u32 LE` then the postcard body.
pub fn frame(m: &Msg) -> Bytes {
    crate::streams::frame(m)
}

/// Reads the next message (`None`: the peer finished its direction).
pub async fn read_msg(r: &mut StreamReader) -> Result<Option<Msg>, TunnelError> {
    match crate::streams::read_body(r, MAX_MSG).await {
        Ok(Some(body)) => decode_msg(&body).map(Some),
        Ok(None) => Ok(None),
        Err(crate::streams::BodyError::Io(e)) => Err(e.into()),
        Err(crate::streams::BodyError::TooLong) => Err(TunnelError::Malformed),
    }
}

/// The body length a message's prefix announces, refused above the largest message (it sizes
/// an allocation, and the peer chose it).
pub fn msg_len(prefix: [u8; 4]) -> Result<usize, TunnelError> {
    crate::streams::body_len(prefix, MAX_MSG).ok_or(TunnelError::Malformed)
}

/// Decodes a message body (after its length prefix).
pub fn decode_msg(body: &[u8]) -> Result<Msg, TunnelError> {
    postcard::from_bytes(body).map_err(|_| TunnelError::Malformed)
}

/// What one side's daemon can do with its side of the FIFO.
#[async_trait]
pub trait Ends: Send {
    /// Opens a mirror writer if this side has readers: `Ok(None)` when it has none (ENXIO).
    async fn probe(&mut self) -> Result<Option<OwnedFd>, i32>;
    /// Opens a mirror reader (`O_RDONLY|O_NONBLOCK`).
    async fn reader(&mut self) -> Result<OwnedFd, i32>;
    /// The tunnel is idle and probes slowly (or not at all): release what is held between
    /// probes.
    fn rest(&mut self) {}
}

/// Which daemon runs the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The mount daemon: wins conflicts, numbers cycles odd, kicks the HOST, disarms.
    Dpu,
    /// offloadd: numbers cycles even, keeps probing slowly outside the fast window.
    Host,
}

/// Outside control of a DPU tunnel: kicks and the request to stop.
#[derive(Default)]
pub struct Control {
    kick: tokio::sync::Notify,
    stop: std::sync::atomic::AtomicBool,
    stop_notify: tokio::sync::Notify,
}

impl Control {
    /// Probe now (a DPU process looks the FIFO up or opens it).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Stop once no cycle is running (unlinked); at once with `now` (unmount).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop_notify.notify_one();
    }

    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A non-blocking pipe end registered with the runtime.
struct Pipe(AsyncFd<OwnedFd>);

enum Got {
    Data(Vec<u8>),
    /// EAGAIN: empty, writers present.
    Empty,
    /// 0: empty, no writer.
    NoWriter,
}

impl Pipe {
    fn new(fd: OwnedFd) -> Result<Pipe, i32> {
        set_nonblock(fd.as_raw_fd());
        // SAFETY: the AsyncFd owns the descriptor for its whole life.
        unsafe { AsyncFd::register(fd) }
            .map(Pipe)
            .map_err(|e| io::Error::from(e).raw_os_error().unwrap_or(libc::EIO))
    }

    fn raw(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }

    fn read(&self) -> Result<Got, i32> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            // SAFETY: buf is valid for CHUNK bytes; the fd is owned by self.
            let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                buf.truncate(n as usize);
                return Ok(Got::Data(buf));
            }
            if n == 0 {
                return Ok(Got::NoWriter);
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(Got::Empty),
                e => return Err(e),
            }
        }
    }

    fn write(&self, data: &[u8]) -> Result<usize, i32> {
        loop {
            // SAFETY: data is a valid slice; the fd is owned by self.
            let n = unsafe { libc::write(self.raw(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            match errno() {
                libc::EINTR => continue,
                e => return Err(e),
            }
        }
    }

    /// The pipe's poll events right now (level-triggered check).
    fn revents(&self, events: i16) -> i16 {
        let mut p = libc::pollfd {
            fd: self.raw(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        if rc > 0 {
            p.revents
        } else {
            0
        }
    }

    /// Writes all of `data`, waiting for room; `false` when the readers are gone.
    async fn write_all(&self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match self.write(data) {
                Ok(n) => data = &data[n..],
                Err(libc::EAGAIN) => {
                    let Ok(mut g) = self.0.writable().await else {
                        return false;
                    };
                    if self.revents(libc::POLLOUT) & libc::POLLERR != 0 {
                        return false;
                    }
                    g.clear_ready();
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Waits until this mirror writer's side has no reader any more.
    async fn readers_gone(&self) {
        loop {
            let Ok(mut g) = self.0.writable().await else {
                return;
            };
            if self.revents(libc::POLLOUT) & libc::POLLERR != 0 {
                return;
            }
            g.clear_ready();
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn set_nonblock(fd: i32) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 && fl & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

enum Cycle {
    Idle,
    /// This side has readers; holds the mirror writer.
    Writer {
        id: u32,
        w: Pipe,
    },
    /// The peer has readers; holds the mirror reader and pumps what this side's writers write.
    Reader {
        id: u32,
        r: Pipe,
        /// A writer was seen since `r` opened.
        seen: bool,
        /// No check made yet.
        first: bool,
        /// A writer was already there when `r` opened (its close raises no POLLHUP): check
        /// again after this long.
        check: Option<Duration>,
    },
}

/// Probe timing (see the module docs).
struct Schedule {
    side: Side,
    last_event: Instant,
    step: Duration,
    next: Option<Instant>,
    /// Kicks before this instant are deferred to it (this side's readers just got an EOF).
    hold: Option<Instant>,
}

impl Schedule {
    fn new(side: Side) -> Schedule {
        let now = Instant::now();
        Schedule {
            side,
            last_event: now,
            step: FIRST_STEP,
            next: Some(now),
            hold: None,
        }
    }

    /// Probe at once and fast from now on (or once the EOF hold-off is over).
    fn kick(&mut self) {
        let now = Instant::now();
        match self.hold {
            Some(h) if now < h => {
                self.last_event = now;
                self.step = FIRST_STEP;
                self.next = Some(self.next.map_or(h, |n| n.min(h)));
            }
            _ => {
                self.hold = None;
                self.after(Duration::ZERO);
            }
        }
    }

    /// This side's readers were just given an EOF (our mirror writer closed): a new mirror
    /// writer must not hide it from a reader that did not get to `read` yet. A probe comes
    /// after a kick (a new opener) but not within [`EOF_HOLD_OFF`], else after [`EOF_GRACE`].
    fn eof(&mut self) {
        let now = Instant::now();
        self.after(EOF_GRACE);
        self.hold = Some(now + EOF_HOLD_OFF);
    }

    /// Probe fast again, the first time after `d`.
    fn after(&mut self, d: Duration) {
        let now = Instant::now();
        self.last_event = now;
        self.step = FIRST_STEP;
        self.next = Some(now + d);
    }

    fn fast(&self) -> bool {
        self.last_event.elapsed() < FAST_WINDOW
    }

    /// A probe found nobody: when to probe next.
    fn advance(&mut self) {
        let now = Instant::now();
        if self.fast() {
            self.next = Some(now + self.step);
            self.step = (self.step * 2).min(PROBE_MAX);
        } else {
            self.next = match self.side {
                Side::Dpu => None,
                Side::Host => Some(now + SLOW_PROBE),
            };
        }
    }
}

/// Sends one message; a failed send ends the tunnel.
async fn send(tx: &mut StreamWriter, m: &Msg) -> Result<(), TunnelError> {
    trace!(?m, "fifo tunnel send");
    tx.send(frame(m)).await.map_err(TunnelError::from)
}

/// Runs one side of a tunnel over `stream` until the peer closes it, the stream fails, the
/// FIFO cannot be opened any more, or (DPU) `ctl` stops it or it idled for [`DISARM_AFTER`].
pub async fn run(
    side: Side,
    mut ends: impl Ends,
    stream: Stream,
    ctl: std::sync::Arc<Control>,
) -> Result<(), TunnelError> {
    let (mut rd, mut tx) = stream.split();
    let (in_tx, mut inbox) = mpsc::channel::<Result<Msg, TunnelError>>(INBOX);
    let reader = tokio::spawn(async move {
        loop {
            let m = read_msg(&mut rd).await;
            let end = !matches!(m, Ok(Some(_)));
            let item = match m {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(TunnelError::Io(io::ErrorKind::UnexpectedEof.into())),
                Err(e) => Err(e),
            };
            if in_tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    let res = engine(side, &mut ends, &mut tx, &mut inbox, &ctl).await;
    // Dropping both halves resets the stream: the peer's side of the tunnel ends too.
    reader.abort();
    res
}

async fn engine(
    side: Side,
    ends: &mut impl Ends,
    tx: &mut StreamWriter,
    inbox: &mut mpsc::Receiver<Result<Msg, TunnelError>>,
    ctl: &Control,
) -> Result<(), TunnelError> {
    let dpu = side == Side::Dpu;
    let mut next_id: u32 = if dpu { 1 } else { 2 };
    let mut cycle = Cycle::Idle;
    let mut sched = Schedule::new(side);
    let mut rested = false;
    loop {
        match &mut cycle {
            Cycle::Idle => {
                if dpu && ctl.stopping() {
                    return Ok(());
                }
                // Between probes at the slowest pace (a few tenths of a second after a kick) a
                // side holds nothing of the FIFO: a DPU `umount` is not refused as busy.
                if (!sched.fast() || sched.step >= PROBE_MAX) && !rested {
                    ends.rest();
                    rested = true;
                }
                let disarm_at = sched.last_event + DISARM_AFTER;
                let probe_at = sched.next;
                tokio::select! {
                    m = inbox.recv() => {
                        let m = m.unwrap_or(Err(TunnelError::Malformed))?;
                        match m {
                            Msg::Kick => sched.kick(),
                            Msg::Readers { cycle: id } => {
                                rested = false;
                                match join_cycle(ends, tx, id).await? {
                                    Ok(c) => cycle = c,
                                    // Out of descriptors: stay idle, the peer was told.
                                    Err(e) if e == libc::EMFILE || e == libc::ENFILE => {}
                                    Err(e) => return Err(TunnelError::Gone(e)),
                                }
                            }
                            // Stale messages of a cycle that ended.
                            _ => {}
                        }
                    }
                    _ = ctl.kick.notified(), if dpu => {
                        sched.kick();
                        send(tx, &Msg::Kick).await?;
                    }
                    _ = ctl.stop_notify.notified(), if dpu => {}
                    _ = sleep_until(probe_at), if probe_at.is_some() => {
                        rested = false;
                        match ends.probe().await {
                            Ok(Some(fd)) => {
                                let w = Pipe::new(fd).map_err(TunnelError::Gone)?;
                                let id = next_id;
                                next_id = next_id.wrapping_add(2);
                                debug!(cycle = id, ?side, "fifo tunnel: readers here");
                                send(tx, &Msg::Readers { cycle: id }).await?;
                                cycle = Cycle::Writer { id, w };
                            }
                            Ok(None) => sched.advance(),
                            Err(e) => return Err(TunnelError::Gone(e)),
                        }
                    }
                    _ = tokio::time::sleep_until(disarm_at.into()), if dpu => {
                        if !sched.fast() && sched.last_event.elapsed() >= DISARM_AFTER {
                            debug!("fifo tunnel idle: disarming");
                            return Ok(());
                        }
                    }
                }
            }
            Cycle::Writer { id, w } => {
                let id = *id;
                tokio::select! {
                    m = inbox.recv() => {
                        let m = m.unwrap_or(Err(TunnelError::Malformed))?;
                        match m {
                            Msg::Data { cycle: c, data } if c == id => {
                                let delivered = w.write_all(&data).await;
                                if !delivered {
                                    send(tx, &Msg::Gone { cycle: id }).await?;
                                    cycle = Cycle::Idle;
                                    sched.kick();
                                }
                            }
                            Msg::Eof { cycle: c } | Msg::Decline { cycle: c } if c == id => {
                                cycle = Cycle::Idle;
                                sched.eof();
                            }
                            Msg::Readers { cycle: other } => {
                                if dpu {
                                    send(tx, &Msg::Decline { cycle: other }).await?;
                                } else {
                                    // Both sides found readers at once: the DPU's cycle wins.
                                    // Our probe writer goes first.
                                    drop(std::mem::replace(&mut cycle, Cycle::Idle));
                                    cycle = join_cycle(ends, tx, other)
                                        .await?
                                        .map_err(TunnelError::Gone)?;
                                }
                            }
                            Msg::Kick => sched.kick(),
                            _ => {}
                        }
                    }
                    _ = w.readers_gone() => {
                        debug!(cycle = id, ?side, "fifo tunnel: readers gone");
                        send(tx, &Msg::Gone { cycle: id }).await?;
                        cycle = Cycle::Idle;
                        sched.kick();
                    }
                    _ = ctl.kick.notified(), if dpu => {
                        send(tx, &Msg::Kick).await?;
                    }
                }
            }
            Cycle::Reader { id, r, check, .. } => {
                let id = *id;
                let check_in = *check;
                let mut pump = false;
                tokio::select! {
                    m = inbox.recv() => {
                        let m = m.unwrap_or(Err(TunnelError::Malformed))?;
                        match m {
                            Msg::Gone { cycle: c } | Msg::Decline { cycle: c } if c == id => {
                                cycle = Cycle::Idle;
                                sched.kick();
                            }
                            Msg::Readers { cycle: other } => {
                                // The peer moved on without us seeing the end: follow it.
                                drop(std::mem::replace(&mut cycle, Cycle::Idle));
                                cycle = join_cycle(ends, tx, other)
                                    .await?
                                    .map_err(TunnelError::Gone)?;
                            }
                            Msg::Kick => sched.kick(),
                            _ => {}
                        }
                    }
                    g = r.0.readable() => {
                        if let Ok(mut g) = g {
                            // Edge-triggered: the pump below reads until EAGAIN or EOF.
                            g.clear_ready();
                        }
                        pump = true;
                    }
                    _ = tokio::time::sleep(check_in.unwrap_or(EOF_CHECK_MAX)), if check_in.is_some() => {
                        pump = true;
                    }
                    _ = ctl.kick.notified(), if dpu => {
                        send(tx, &Msg::Kick).await?;
                    }
                }
                if pump {
                    if let Cycle::Reader {
                        r,
                        seen,
                        first,
                        check,
                        ..
                    } = &mut cycle
                    {
                        let mut ended = false;
                        loop {
                            match r.read() {
                                Ok(Got::Data(d)) => {
                                    *seen = true;
                                    *first = false;
                                    if let Some(c) = check {
                                        *c = Duration::from_millis(5);
                                    }
                                    send(tx, &Msg::Data { cycle: id, data: d }).await?;
                                }
                                Ok(Got::Empty) => {
                                    *seen = true;
                                    *first = false;
                                    if let Some(c) = check {
                                        *c =
                                            (*c * 2).clamp(Duration::from_millis(5), EOF_CHECK_MAX);
                                    }
                                    break;
                                }
                                Ok(Got::NoWriter) => {
                                    // A writer that opened after `r` and closed without
                                    // writing shows only as POLLHUP.
                                    let hup = r.revents(libc::POLLIN) & libc::POLLHUP != 0;
                                    if *first {
                                        // Nobody was waiting: every later writer opens after
                                        // `r`, so its last close raises POLLHUP.
                                        *check = None;
                                        *first = false;
                                    }
                                    ended = *seen || hup;
                                    break;
                                }
                                Err(_) => {
                                    ended = true;
                                    break;
                                }
                            }
                        }
                        if ended {
                            debug!(cycle = id, ?side, "fifo tunnel: writers closed");
                            send(tx, &Msg::Eof { cycle: id }).await?;
                            cycle = Cycle::Idle;
                            sched.kick();
                        }
                    }
                }
            }
        }
    }
}

/// A mirror reader just opened. Whether a writer was already waiting is not known yet: the
/// first check comes at once and tells (EAGAIN or data: yes, 0: no).
/// Joins the peer's cycle `id` as the side its writers need: opens this side's mirror reader,
/// or, when that fails, declines the cycle and hands the errno back for the caller to judge.
async fn join_cycle(
    ends: &mut impl Ends,
    tx: &mut StreamWriter,
    id: u32,
) -> Result<Result<Cycle, i32>, TunnelError> {
    match ends.reader().await {
        Ok(fd) => Ok(Ok(start_reader(
            id,
            Pipe::new(fd).map_err(TunnelError::Gone)?,
        ))),
        Err(e) => {
            send(tx, &Msg::Decline { cycle: id }).await?;
            Ok(Err(e))
        }
    }
}

fn start_reader(id: u32, r: Pipe) -> Cycle {
    debug!(cycle = id, "fifo tunnel: mirror reader open");
    Cycle::Reader {
        id,
        r,
        seen: false,
        first: true,
        check: Some(Duration::ZERO),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The DPU daemon's opens of FIFOs through its own mount run on this one thread: never on a
/// FUSE thread (the open's GETATTR must be served) nor on the runtime (whose reader task
/// delivers that GETATTR's answer). Its thread id lets the FUSE handlers tell the daemon's own
/// lookups and opens from other processes' (those kick tunnels; these must not).
pub struct Opener {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    tid: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

type Job = Box<dyn FnOnce(&mut OpenerRoot) + Send>;

/// State of the opener thread: where the mount is.
pub struct OpenerRoot {
    mountpoint: std::path::PathBuf,
}

impl OpenerRoot {
    /// An `O_PATH` descriptor of the FIFO at `rel` below the mount root, checked to be the
    /// FUSE inode `ino` and a FIFO (ESTALE otherwise).
    pub fn open_node(&mut self, rel: &std::path::Path, ino: u64) -> Result<OwnedFd, i32> {
        use std::os::fd::FromRawFd;
        // By path each time, no descriptor of the root kept: it would keep a lazily unmounted
        // mount (and this daemon) alive. Once unmounted, the path names something else and the
        // inode check below fails.
        let full = self.mountpoint.join(rel);
        let c = std::ffi::CString::new(full.as_os_str().as_encoded_bytes())
            .map_err(|_| libc::EINVAL)?;
        // SAFETY: valid C string; result checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: libc::stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(errno());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFIFO || st.st_ino != ino {
            return Err(libc::ESTALE);
        }
        Ok(fd)
    }
}

impl Opener {
    /// Starts the thread for the mount at `mountpoint` (as this process sees it).
    pub fn start(mountpoint: std::path::PathBuf) -> io::Result<Opener> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let tid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (t2, ready) = (tid.clone(), std::sync::mpsc::channel::<()>());
        std::thread::Builder::new()
            .name("qtfs-fifo".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let me = unsafe { libc::gettid() } as u32;
                t2.store(me, std::sync::atomic::Ordering::Relaxed);
                let _ = ready.0.send(());
                let mut root = OpenerRoot { mountpoint };
                while let Ok(job) = rx.recv() {
                    job(&mut root);
                }
            })?;
        let _ = ready.1.recv();
        Ok(Opener {
            tx: std::sync::Mutex::new(tx),
            tid,
        })
    }

    /// The thread's id (as FUSE requests report it).
    pub fn tid(&self) -> u32 {
        self.tid.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on the opener thread; `None` if the thread is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut OpenerRoot) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |r| {
            let _ = tx.send(f(r));
        });
        {
            let s = transport::sync::lock(&self.tx);
            s.send(job).ok()?;
        }
        rx.await.ok()
    }
}
