//! The session: handshake, then calls and streams multiplexed over one connection, with
//! heartbeats and limits. Written once; every service and every link uses it.
//!
//! This module is the tokio driver: it owns the connection, the reader, writer and heartbeat
//! tasks, the call and stream tables and the channels. What the protocol means is decided by
//! I/O-free cores it feeds, each unit-tested without sockets or sleeps: `handshake.rs` (the
//! handshake per role), `dispatch.rs` (what each incoming frame asks for, and which frames
//! break the rules) and `rules.rs` (heartbeat timing, stream credit windows).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::Key;
use crate::crypto::{self, CryptoError, EncryptPolicy, Ephemeral, Opener, Piece, Sealer};
use crate::dispatch::{self, Admission, Delivery, Event, Opening, Rules};
use crate::endpoint::Endpoint;
use crate::handshake::{self, Handshake, Negotiated, Next, Params};
use crate::link::{self, Conn, Listener, TransportError};
use crate::rules::{Beat, Heartbeat};
use crate::service::{Registry, RemoteError};
use crate::stream::{CloseAction, Inbound, Shared, Stream};
use crate::wire::{self, Header, Kind, WireError, HEADER_LEN};

/// Session tunables. The defaults suit a HOST–DPU link.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Pre-shared key; `None` only with an explicit `--allow-unauthenticated`.
    pub key: Option<Key>,
    /// How often an idle session sends a ping.
    pub heartbeat_interval: Duration,
    /// Silence after which the peer is declared dead and pending calls fail.
    pub heartbeat_timeout: Duration,
    /// Deadline for the whole handshake.
    pub handshake_timeout: Duration,
    /// Largest frame accepted (and sent): bounds memory per message.
    pub max_frame: u32,
    /// Most streams open at once per session.
    pub max_streams: usize,
    /// Most incoming calls being handled at once per session.
    pub max_inflight_calls: usize,
    /// Most bytes of answers to the peer's calls queued and not yet written to the link. Above
    /// it the session stops reading the peer's frames until half of it is written: a peer that
    /// sends calls but does not read their answers (a bug, or a hostile client) is slowed to
    /// the link's pace instead of growing this side's memory, and one that stays so for the
    /// heartbeat timeout is dropped ([`CloseReason::PeerNotReading`]).
    pub max_unread_answers: usize,
    /// Per-stream receive window in bytes.
    pub stream_window: u32,
    /// Optional deadline for each call (the heartbeat already bounds calls to a dead peer).
    pub call_timeout: Option<Duration>,
    /// Largest call (bytes) a sending thread writes to the connection itself when nothing is
    /// queued ahead of it, instead of waking the writer task: one hand-off less per call.
    /// Bigger calls (bulk writes) go through the writer task so the caller is not held up
    /// copying them. 0 (the default) turns it off. Applies only on links whose connection
    /// allows writes from any thread ([`crate::AsyncConn::direct_write_ok`]); on others (RDMA)
    /// every call goes through the writer task whatever this says.
    pub direct_send: usize,
    /// Which link kinds encrypt (AES-128-GCM keyed by an ephemeral X25519 exchange inside the
    /// handshake, see [`crate::crypto`]). Both ends must agree for the link used; default: tcp
    /// only.
    pub encrypt: EncryptPolicy,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            key: None,
            heartbeat_interval: Duration::from_secs(3),
            heartbeat_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_frame: 16 << 20,
            max_streams: 4096,
            max_inflight_calls: 8192,
            max_unread_answers: 32 << 20,
            stream_window: 4 << 20,
            call_timeout: None,
            direct_send: 0,
            encrypt: EncryptPolicy::default(),
        }
    }
}

impl SessionConfig {
    /// Defaults with the given key.
    pub fn new(key: Option<Key>) -> Self {
        SessionConfig {
            key,
            ..Default::default()
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the link failed.
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer did not finish within the handshake timeout.
    #[error("handshake not completed within {0:?}")]
    Timeout(Duration),
    /// The first bytes from the peer are not a handshake of ours (some other server answered).
    #[error("not a dpu-offload peer (its first bytes are not a dpu-offload handshake)")]
    NotOffload,
    /// The two builds speak different protocol versions.
    #[error("peer speaks protocol version {theirs}, this side speaks {ours}")]
    Version {
        /// This build's [`wire::VERSION`].
        ours: u16,
        /// The version in the peer's Hello.
        theirs: u16,
    },
    /// The acceptor refused our Auth (wrong key); its reason.
    #[error("authentication failed: the peer rejected our key ({0})")]
    Rejected(String),
    /// The peer's tag did not verify with our key.
    #[error("authentication failed: the peer could not prove it holds the key")]
    PeerNotAuthenticated,
    /// One side has a key and the other none.
    #[error("authentication mismatch: {0}")]
    Mismatch(String),
    /// A handshake frame did not decode.
    #[error("malformed handshake: {0}")]
    Wire(#[from] WireError),
    /// A frame kind that has no place in the handshake.
    #[error("unexpected {0:?} frame during the handshake")]
    Unexpected(Kind),
    /// The connection ended before the handshake completed.
    #[error("peer closed the connection during the handshake (wrong key, or not a dpu-offload endpoint?)")]
    PeerClosed,
    /// The two ends disagree on encrypting this link: refused rather than run with less
    /// protection than either asked for.
    #[error("encryption policy mismatch: this side has encrypt = {ours}, the peer has encrypt = {theirs} for this link; set the same on both ends ([transport.<link kind>] encrypt in the config, or --encrypt)")]
    EncryptionMismatch {
        /// This side's policy for the link kind.
        ours: bool,
        /// The policy in the peer's Hello.
        theirs: bool,
    },
    /// The key exchange or record keys could not be set up.
    #[error("encryption set-up: {0}")]
    Crypto(#[from] CryptoError),
}

/// Why a session could not be established.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The link could not be connected.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The link connected but the handshake failed.
    #[error("{endpoint}: {source}")]
    Handshake {
        /// The endpoint dialled, for the message.
        endpoint: String,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
}

/// Why an established session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The link reached end of file between frames.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The peer sent GoAway and then closed.
    #[error("peer shut the session down")]
    PeerGoAway,
    /// The peer's end reset the connection (it exited with bytes of ours still unread, or its
    /// machine dropped the connection).
    #[error("peer reset the connection")]
    PeerReset,
    /// This side closed the session.
    #[error("closed locally")]
    Local,
    /// No frame from the peer for this long (no Pong either).
    #[error("peer silent for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// The peer did not read this side's answers to its calls for this long
    /// ([`SessionConfig::max_unread_answers`] stayed exceeded; reading was paused meanwhile).
    #[error(
        "peer stopped reading its answers for {0:?} (more than the unread-answer limit queued)"
    )]
    PeerNotReading(Duration),
    /// The peer broke a frame rule (the text says which).
    #[error("protocol violation by peer: {0}")]
    Protocol(String),
    /// Reading or writing the link failed.
    #[error("connection error: {0}")]
    Io(String),
    /// End of file in the middle of a frame.
    #[error("peer closed the connection inside a frame ({0} bytes pending)")]
    Truncated(usize),
    /// An encrypted record failed authentication: the link was tampered with (or corrupted).
    #[error("integrity check failed: {0}")]
    Integrity(String),
}

/// Why a call or stream open failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The service answered with an error.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The session ended before the answer came.
    #[error("session closed: {0}")]
    Closed(CloseReason),
    /// The peer registers no service of this name.
    #[error("peer offers no service {0:?}")]
    UnknownService(String),
    /// The peer refused the call: its limit of calls or streams in flight is reached.
    #[error("peer is overloaded (too many calls or streams in flight)")]
    Busy,
    /// The request does not fit in one frame; nothing was sent.
    #[error("message of {len} bytes exceeds the frame limit of {max}")]
    TooLarge {
        /// Request size.
        len: usize,
        /// The session's frame limit.
        max: usize,
    },
    /// No answer within the call timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One outgoing frame: header (+ small prefix) and a payload passed through without copying.
struct Frame {
    head: BytesMut,
    body: Bytes,
    /// An answer to the peer's call, counted in [`OutBudget`] until written.
    answer: bool,
}

impl Frame {
    /// Wakes the writer task for bytes a direct sender left in [`WriteSide::front`].
    fn marker() -> Frame {
        Frame {
            head: BytesMut::new(),
            body: Bytes::new(),
            answer: false,
        }
    }

    fn new(kind: Kind, id: u32, prefix: &[u8], body: Bytes) -> Frame {
        let mut head = BytesMut::with_capacity(HEADER_LEN + prefix.len());
        Header {
            len: (prefix.len() + body.len()) as u32,
            kind,
            id,
        }
        .put(&mut head);
        head.extend_from_slice(prefix);
        Frame {
            head,
            body,
            answer: false,
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// Bytes of answers queued for the writer and not yet written ([`SessionConfig::max_unread_answers`]).
#[derive(Default)]
struct OutBudget {
    bytes: AtomicUsize,
    /// Woken each time the writer wrote answers.
    written: tokio::sync::Notify,
}

impl OutBudget {
    fn queued(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        if n > 0 {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            self.written.notify_waiters();
        }
    }
}

struct StreamEntry {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Inbound>,
}

/// Who receives a call's outcome.
enum Pending {
    /// A task awaiting [`Session::start_call`]'s future.
    Task(oneshot::Sender<Result<Bytes, CallError>>),
    /// [`Session::call_then`]'s function, run where the outcome arrives.
    Then(Box<dyn FnOnce(Result<Bytes, CallError>) + Send>),
}

impl Pending {
    fn finish(self, res: Result<Bytes, CallError>) {
        match self {
            Pending::Task(tx) => {
                let _ = tx.send(res);
            }
            Pending::Then(f) => f(res),
        }
    }
}

/// The connection's write side, shared by the writer task and threads that write a call
/// themselves ([`SessionConfig::direct_send`]). Frames stay in order: a thread writes only when
/// the writer task is idle and no control frame is queued; what it cannot write at once goes to
/// `front`, which the writer task sends before anything else.
struct WriteSide {
    w: WriteHalf<Conn>,
    /// The writer task holds bytes not yet written (from the start until the dialer's Auth is out).
    busy: bool,
    /// Control frames on the channel that the writer task has not taken yet.
    queued: usize,
    /// The rest of a frame a thread could only partly write.
    front: VecDeque<Bytes>,
    /// The writer task has ended.
    done: bool,
    /// Seals outgoing bytes on an encrypted session; whoever writes (writer task or a direct
    /// sender) seals under this lock, so records reach the link in nonce order.
    seal: Option<Sealer>,
}

fn lock_ws(ws: &Mutex<WriteSide>) -> std::sync::MutexGuard<'_, WriteSide> {
    crate::sync::lock(ws)
}

/// Drops the first `n` bytes of `chunks`.
fn advance(chunks: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = chunks.front_mut() else {
            break;
        };
        if n >= front.len() {
            n -= front.len();
            chunks.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

#[derive(Default)]
struct State {
    calls: HashMap<u32, Pending>,
    streams: HashMap<u32, StreamEntry>,
    closed: Option<CloseReason>,
    going_away: bool,
}

/// Source of process-unique session ids.
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) struct Inner {
    id: u64,
    ctl_tx: mpsc::UnboundedSender<Frame>,
    ws: Arc<Mutex<WriteSide>>,
    data_tx: mpsc::UnboundedSender<Frame>,
    state: Mutex<State>,
    /// What incoming frames mean (the I/O-free core the reader executes).
    rules: Rules,
    /// [`SessionConfig::direct_send`] where the link allows direct writes, else 0.
    direct_send: usize,
    next_call: AtomicU32,
    next_stream: AtomicU32,
    inflight_calls: AtomicU32,
    registry: Registry,
    cfg: SessionConfig,
    peer_services: Vec<String>,
    peer_window: u32,
    peer_max_frame: u32,
    peer: String,
    started: Instant,
    last_seen_ms: AtomicU64,
    /// Set by [`Session::expect_silence`]: no heartbeat timeout while set.
    silence_ok: AtomicBool,
    /// Answers queued and not yet written.
    out: Arc<OutBudget>,
    /// The reader waits for the peer to read its answers ([`SessionConfig::max_unread_answers`]).
    reading_paused: AtomicBool,
    closed_tx: watch::Sender<Option<CloseReason>>,
    /// This session in the metrics registry (`offload status`): bytes, round trips.
    stats: Arc<offload_metrics::SessionStats>,
}

/// A live, authenticated session. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.inner.peer)
            .field("peer_services", &self.inner.peer_services)
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Queues a control frame for the writer task.
    fn send_ctl(&self, f: Frame) -> Result<(), mpsc::error::SendError<Frame>> {
        let mut ws = lock_ws(&self.ws);
        ws.queued += 1;
        let r = self.ctl_tx.send(f);
        if r.is_err() {
            ws.queued -= 1;
        }
        r
    }

    /// Queues the answer to the peer's call `id`, counted until written.
    fn send_answer(&self, id: u32, (kind, body): (Kind, Bytes)) {
        let mut f = Frame::new(kind, id, &[], body);
        f.answer = true;
        let n = f.len();
        self.out.add(n);
        if self.send_ctl(f).is_err() {
            self.out.sub(n);
        }
    }

    /// Waits, when more than [`SessionConfig::max_unread_answers`] bytes of answers are
    /// queued, until the writer got them down to half of it: the peer's next frames stay
    /// unread meanwhile (its link fills up and its writes block). The peer counts as alive
    /// while it reads; one that reads nothing is dropped by the heartbeat.
    async fn room_for_answers(
        &self,
        closed: &mut watch::Receiver<Option<CloseReason>>,
    ) -> Result<(), CloseReason> {
        let max = self.cfg.max_unread_answers;
        if self.out.queued() <= max {
            return Ok(());
        }
        tracing::debug!(peer = %self.peer, queued = self.out.queued(), "peer is not reading its answers: pausing reads");
        self.reading_paused.store(true, Ordering::Relaxed);
        let mut last = self.out.queued();
        let res = loop {
            let written = self.out.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let now = self.out.queued();
            if now < last {
                // The peer is reading: alive, however slowly.
                self.touch();
                last = now;
            }
            if now <= max / 2 {
                break Ok(());
            }
            tokio::select! {
                _ = written => {}
                _ = closed.wait_for(|c| c.is_some()) => break Err(CloseReason::Local),
            }
        };
        self.reading_paused.store(false, Ordering::Relaxed);
        self.touch();
        res
    }

    /// Sends a call's frame: written here and now when [`SessionConfig::direct_send`] and the
    /// link allow and nothing is ahead of it, else queued. Err: the session is gone.
    fn send_call_frame(&self, f: Frame) -> Result<(), ()> {
        if f.len() <= self.direct_send {
            let mut ws = lock_ws(&self.ws);
            if !ws.busy && ws.queued == 0 && !ws.done {
                let mut chunks: VecDeque<Bytes> = VecDeque::new();
                if let Some(seal) = ws.seal.as_mut() {
                    let Frame { mut head, body, .. } = f;
                    let pieces = if body.len() <= COPY_THRESHOLD {
                        // One record for a small call.
                        head.extend_from_slice(&body);
                        vec![Piece::Owned(head)]
                    } else {
                        vec![Piece::Owned(head), Piece::Shared(body)]
                    };
                    if let Err(e) = seal.seal_pieces(pieces, &mut chunks) {
                        // Out of nonces: nothing more can be sent on this session.
                        drop(ws);
                        self.close(CloseReason::Io(e.to_string()));
                        return Err(());
                    }
                } else {
                    chunks.extend(
                        [f.head.freeze(), f.body]
                            .into_iter()
                            .filter(|b| !b.is_empty()),
                    );
                }
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                while !chunks.is_empty() {
                    let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
                    match std::pin::Pin::new(&mut ws.w).poll_write_vectored(&mut cx, &slices) {
                        std::task::Poll::Ready(Ok(n)) if n > 0 => advance(&mut chunks, n),
                        // Full socket buffer, or an error the writer task will meet and report.
                        _ => break,
                    }
                }
                if chunks.is_empty() {
                    return Ok(());
                }
                ws.front = chunks;
                ws.busy = true;
                ws.queued += 1;
                return self.ctl_tx.send(Frame::marker()).map_err(|_| ());
            }
        }
        self.send_ctl(f).map_err(|_| ())
    }

    fn touch(&self) {
        self.last_seen_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn closed_err(&self) -> io::Error {
        let reason = self.lock().closed.clone().unwrap_or(CloseReason::Local);
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("session closed: {reason}"),
        )
    }

    pub(crate) fn send_stream_frame(&self, kind: Kind, id: u32, body: Bytes) -> io::Result<()> {
        self.data_tx
            .send(Frame::new(kind, id, &[], body))
            .map_err(|_| self.closed_err())
    }

    pub(crate) fn send_credit(&self, id: u32, n: u64) {
        let n = n.min(u32::MAX as u64) as u32;
        let _ = self.send_ctl(Frame::new(Kind::Credit, id, &n.to_le_bytes(), Bytes::new()));
    }

    pub(crate) fn send_reset(&self, id: u32, reason: &str) {
        let _ = self.send_ctl(Frame::new(
            Kind::Reset,
            id,
            &[],
            Bytes::copy_from_slice(reason.as_bytes()),
        ));
    }

    /// The shared state and inbound queue of a live stream.
    fn stream_entry(&self, id: u32) -> Option<(Arc<Shared>, mpsc::UnboundedSender<Inbound>)> {
        self.lock()
            .streams
            .get(&id)
            .map(|e| (e.shared.clone(), e.tx.clone()))
    }

    pub(crate) fn stream_closed(&self, shared: &Shared, action: CloseAction) {
        match action {
            CloseAction::None => {}
            CloseAction::Remove => {
                self.lock().streams.remove(&shared.id);
            }
            CloseAction::ResetAndRemove => {
                // Behind the stream's data and EOF (data channel), so what was sent before
                // the drop still arrives.
                let _ = self.send_stream_frame(
                    Kind::Reset,
                    shared.id,
                    Bytes::from_static(b"stream dropped by the application"),
                );
                self.lock().streams.remove(&shared.id);
            }
        }
    }

    /// Ends the session once: fails pending calls, resets streams, wakes `closed()` waiters.
    fn close(&self, reason: CloseReason) {
        let (calls, streams) = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(reason.clone());
            (
                std::mem::take(&mut st.calls),
                std::mem::take(&mut st.streams),
            )
        };
        // Outside the state lock (the registry's snapshot reads it through the gauges).
        self.stats.closed();
        // A peer that exits while sending (a killed rexec) is routine, not a warning; so is one
        // that exits with our last frames unread (its kernel resets the connection), unless
        // work was still in flight.
        let routine = match &reason {
            CloseReason::Local
            | CloseReason::PeerClosed
            | CloseReason::PeerGoAway
            | CloseReason::Truncated(_) => true,
            CloseReason::PeerReset => calls.is_empty() && streams.is_empty(),
            _ => false,
        };
        if routine {
            tracing::debug!(peer = %self.peer, %reason, "session closed")
        } else {
            tracing::warn!(peer = %self.peer, %reason, "session closed")
        }
        for (_, p) in calls {
            p.finish(Err(CallError::Closed(reason.clone())));
        }
        let msg = format!("session closed: {reason}");
        for (_, e) in streams {
            e.shared.set_reset(&msg);
            let _ = e.tx.send(Inbound::Reset(msg.clone()));
        }
        let _ = self.closed_tx.send(Some(reason));
    }
}

async fn read_hs_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Kind, Vec<u8>), HandshakeError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::PeerClosed)
        }
        Err(e) => return Err(e.into()),
    }
    let h = handshake::parse_header(&h)?;
    let mut body = vec![0u8; h.len as usize];
    match r.read_exact(&mut body).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::PeerClosed)
        }
        Err(e) => return Err(e.into()),
    }
    Ok((h.kind, body))
}

/// Fuzzing entries of the handshake core, where the fuzz targets have always found them.
pub use crate::handshake::{fuzz_decode_hello, fuzz_handshake};

/// Writes handshake frames (one buffer, one write) and flushes.
async fn hs_send(conn: &mut Conn, frames: &[u8]) -> io::Result<()> {
    conn.write_all(frames).await?;
    conn.flush().await
}

/// The handshake ([`crate::handshake`] decides; this reads its frames and writes its answers).
async fn handshake(
    conn: &mut Conn,
    cfg: &SessionConfig,
    registry: &Registry,
    dialer: bool,
    encrypt: bool,
) -> Result<Negotiated, HandshakeError> {
    // Straight from the OS: a fresh nonce per handshake needs no userspace CSPRNG, whose
    // set-up (ChaCha, CPU feature probing) costs more than the one getrandom(2) call.
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let eph = if encrypt {
        Some(Ephemeral::generate()?)
    } else {
        None
    };
    let params = Params {
        dialer,
        encrypt,
        secrets: cfg.key.as_ref().map(Key::secrets).unwrap_or_default(),
        services: registry.names(),
        stream_window: cfg.stream_window,
        max_frame: cfg.max_frame,
    };
    let (mut hs, first) = Handshake::new(params, nonce, eph);
    if !first.is_empty() {
        hs_send(conn, &first).await?;
    }
    loop {
        let (kind, body) = match read_hs_frame(conn).await {
            Ok(f) => f,
            Err(e) => return Err(hs.on_read_error(e)),
        };
        let out = hs.on_frame(kind, &body);
        match out.next {
            Next::More => {
                if !out.send.is_empty() {
                    hs_send(conn, &out.send).await?;
                }
            }
            Next::Done(negotiated) => {
                if !out.send.is_empty() {
                    hs_send(conn, &out.send).await?;
                }
                return Ok(negotiated);
            }
            Next::Failed(e) => {
                // The Refuse tells the peer why; it may be gone already.
                if !out.send.is_empty() {
                    let _ = hs_send(conn, &out.send).await;
                }
                return Err(e);
            }
        }
    }
}

impl Session {
    /// Dials `ep`, runs the handshake and starts the session.
    pub async fn connect(
        ep: &Endpoint,
        cfg: SessionConfig,
        registry: Registry,
    ) -> Result<Session, SessionError> {
        let conn = link::connect(ep).await?;
        let encrypt = cfg.encrypt.for_endpoint(ep);
        Session::start(conn, cfg, registry, true, ep.to_string(), encrypt)
            .await
            .map_err(|source| SessionError::Handshake {
                endpoint: ep.to_string(),
                source,
            })
    }

    /// Runs the handshake over an established connection. `dialer` picks the role (the side
    /// that connected is the dialer) and the stream-id parity; `encrypt` is this side's policy
    /// for the link ([`EncryptPolicy::for_endpoint`]), which the peer must share.
    pub async fn start(
        mut conn: Conn,
        cfg: SessionConfig,
        registry: Registry,
        dialer: bool,
        peer: String,
        encrypt: bool,
    ) -> Result<Session, HandshakeError> {
        let limit = cfg.handshake_timeout;
        let neg = tokio::time::timeout(
            limit,
            handshake(&mut conn, &cfg, &registry, dialer, encrypt),
        )
        .await
        .map_err(|_| HandshakeError::Timeout(limit))??;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::unbounded_channel();
        let (closed_tx, _) = watch::channel(None);
        let stats = offload_metrics::session_opened(&peer, dialer);
        // The link says whether callers may write on it from their own threads.
        let direct_send = if conn.direct_write_ok() {
            cfg.direct_send
        } else {
            0
        };
        let (r, w) = tokio::io::split(crate::stats::counted(conn, stats.clone()));
        let (seal, open) = neg.cipher.map_or((None, None), |(s, o)| (Some(s), Some(o)));
        let ws = Arc::new(Mutex::new(WriteSide {
            w,
            busy: true,
            queued: 0,
            front: VecDeque::new(),
            done: false,
            seal,
        }));
        let out = Arc::new(OutBudget::default());
        let inner = Arc::new(Inner {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            ctl_tx,
            ws: ws.clone(),
            rules: Rules {
                dialer,
                max_streams: cfg.max_streams,
                max_inflight_calls: cfg.max_inflight_calls,
                max_reply: neg.peer_max_frame.min(cfg.max_frame) as usize,
            },
            direct_send,
            data_tx,
            state: Mutex::new(State::default()),
            next_call: AtomicU32::new(1),
            next_stream: AtomicU32::new(if dialer { 1 } else { 2 }),
            inflight_calls: AtomicU32::new(0),
            registry,
            cfg,
            peer_services: neg.peer_services,
            peer_window: neg.peer_window,
            peer_max_frame: neg.peer_max_frame,
            peer,
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            silence_ok: AtomicBool::new(false),
            out: out.clone(),
            reading_paused: AtomicBool::new(false),
            closed_tx,
            stats,
        });
        let weak = Arc::downgrade(&inner);
        inner.stats.set_gauges(Box::new(move || {
            weak.upgrade().map_or((0, 0), |i| {
                let calls = i.inflight_calls.load(Ordering::Relaxed) as usize;
                (i.lock().streams.len(), calls)
            })
        }));
        tokio::spawn(writer_task(
            ws,
            neg.auth.map(|head| Frame {
                head,
                body: Bytes::new(),
                answer: false,
            }),
            ctl_rx,
            data_rx,
            out,
            Arc::downgrade(&inner),
            inner.closed_tx.subscribe(),
        ));
        tokio::spawn(reader_task(r, inner.clone(), open));
        tokio::spawn(heartbeat_task(Arc::downgrade(&inner)));
        let session = Session { inner };
        for svc in session.inner.registry.all() {
            svc.attached(&session);
        }
        tracing::debug!(peer = %session.inner.peer, services = ?session.inner.peer_services, "session established");
        Ok(session)
    }

    /// Unique within this process: lets services scope per-session state (exec ids, proxies).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Services the peer offers.
    pub fn peer_services(&self) -> &[String] {
        &self.inner.peer_services
    }

    /// Describes the peer (address, pid or CID) for logs.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// `true`: do not declare the peer dead for its silence until called with `false` (which
    /// counts silence from now on). For job control: a stopped process answers no heartbeat,
    /// so both sides of its session call this around the stop (the stopped side too: when it
    /// is continued, its heartbeat may run before its reader has seen what arrived meanwhile).
    /// A link that really breaks is still noticed by the link itself (reset, EOF).
    pub fn expect_silence(&self, yes: bool) {
        if !yes {
            self.inner.touch();
        }
        self.inner.silence_ok.store(yes, Ordering::Relaxed);
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// Waits until the session ends and says why.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.inner.closed_tx.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return CloseReason::Local;
            }
        }
    }

    /// Ends the session now: pending calls and open streams fail on both sides.
    pub fn close(&self) {
        let _ = self
            .inner
            .send_ctl(Frame::new(Kind::GoAway, 0, &[], Bytes::new()));
        self.inner.lock().going_away = true;
        self.inner.close(CloseReason::Local);
    }

    /// Graceful shutdown: stops new calls, waits (up to `grace`) for calls already in flight
    /// in either direction, then closes.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.lock().going_away = true;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            let busy = !self.inner.lock().calls.is_empty()
                || self.inner.inflight_calls.load(Ordering::Relaxed) > 0;
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.close();
    }

    fn check_open(&self) -> Result<(), CallError> {
        let st = self.inner.lock();
        if let Some(r) = &st.closed {
            return Err(CallError::Closed(r.clone()));
        }
        if st.going_away {
            return Err(CallError::Closed(CloseReason::Local));
        }
        Ok(())
    }

    /// Calls `service` on the peer with an opaque request and waits for its reply.
    pub async fn call(&self, service: &str, req: Bytes) -> Result<Bytes, CallError> {
        self.start_call(service, req)?.await
    }

    /// Sends a call now and returns the wait for its reply. The request is queued behind every
    /// frame sent before it when this returns, so a caller may acknowledge something that must
    /// stay ordered after it (qtfs write-behind) before awaiting the reply. Dropping the future
    /// forgets the call.
    pub fn start_call(
        &self,
        service: &str,
        req: Bytes,
    ) -> Result<impl Future<Output = Result<Bytes, CallError>> + Send + 'static, CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self
            .send_call(service, req, Pending::Task(tx))
            .map_err(|(e, _)| e)?;
        // Forget the pending entry if the caller gives up (dropped future or timeout).
        struct Guard(Arc<Inner>, u32);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.lock().calls.remove(&self.1);
            }
        }
        let guard = Guard(self.inner.clone(), id);
        let timeout = self.inner.cfg.call_timeout;
        Ok(async move {
            let res = match timeout {
                Some(t) => match tokio::time::timeout(t, rx).await {
                    Ok(r) => r,
                    Err(_) => return Err(CallError::Timeout(t)),
                },
                None => rx.await,
            };
            match res {
                Ok(r) => r,
                Err(_) => Err(CallError::Closed(
                    guard.0.lock().closed.clone().unwrap_or(CloseReason::Local),
                )),
            }
        })
    }

    /// Sends a call and runs `done` with its outcome where the outcome arrives (on the
    /// session's reader, or wherever the session ends) instead of returning a future: no task
    /// waits per call. `done` must be quick (it delays the session's next frame) and runs
    /// exactly once, inline here if the call cannot be sent. The session's `call_timeout` does
    /// not apply; the heartbeat bounds a dead peer. Ordered like [`Session::start_call`].
    pub fn call_then(
        &self,
        service: &str,
        req: Bytes,
        done: impl FnOnce(Result<Bytes, CallError>) + Send + 'static,
    ) {
        if let Err((e, Some(p))) = self.send_call(service, req, Pending::Then(Box::new(done))) {
            p.finish(Err(e));
        }
    }

    /// Registers `pending` under a fresh call id and sends the request. On failure the pending
    /// entry comes back unless the session's end already finished it.
    fn send_call(
        &self,
        service: &str,
        req: Bytes,
        pending: Pending,
    ) -> Result<u32, (CallError, Option<Pending>)> {
        let max = self.inner.peer_max_frame.min(self.inner.cfg.max_frame) as usize;
        let len = req.len() + 1 + service.len();
        if len > max {
            return Err((CallError::TooLarge { len, max }, Some(pending)));
        }
        let id = self.inner.next_call.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.inner.lock();
            if let Some(r) = &st.closed {
                return Err((CallError::Closed(r.clone()), Some(pending)));
            }
            if st.going_away {
                return Err((CallError::Closed(CloseReason::Local), Some(pending)));
            }
            st.calls.insert(id, pending);
        }
        let mut prefix = BytesMut::new();
        wire::put_service_prefix(service, &mut prefix);
        if self
            .inner
            .send_call_frame(Frame::new(Kind::Request, id, &prefix, req))
            .is_err()
        {
            let p = self.inner.lock().calls.remove(&id);
            return Err((CallError::Closed(CloseReason::Local), p));
        }
        Ok(id)
    }

    /// Opens a stream to `service` on the peer; `header` tells it what the stream is for.
    pub async fn open_stream(&self, service: &str, header: Bytes) -> Result<Stream, CallError> {
        self.check_open()?;
        let max = self.inner.peer_max_frame.min(self.inner.cfg.max_frame) as usize;
        let len = header.len() + 1 + service.len();
        if len > max {
            return Err(CallError::TooLarge { len, max });
        }
        let id = self.inner.next_stream.fetch_add(2, Ordering::Relaxed);
        let shared = Shared::new(
            id,
            self.inner.peer_window as u64,
            self.inner.cfg.stream_window as u64,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.inner.lock();
            if let Some(r) = &st.closed {
                return Err(CallError::Closed(r.clone()));
            }
            if st.streams.len() >= self.inner.cfg.max_streams {
                return Err(CallError::Busy);
            }
            st.streams.insert(
                id,
                StreamEntry {
                    shared: shared.clone(),
                    tx,
                },
            );
        }
        let mut prefix = BytesMut::new();
        wire::put_service_prefix(service, &mut prefix);
        self.inner
            .data_tx
            .send(Frame::new(Kind::Open, id, &prefix, header))
            .map_err(|_| CallError::Closed(CloseReason::Local))?;
        Ok(Stream::new(shared, self.inner.clone(), rx))
    }
}

/// Handshakes in progress at once, in all and from one source (an IP address, a vsock CID).
/// Beyond them a new connection is closed at once: half-open connections from one place cannot
/// keep the real peer (another source) out, and cost no more than their sockets. The per-source
/// cap leaves room for a DPU's own bursts (100 rexec calls dialled at once, tests/exec_signals).
const MAX_PENDING: usize = 4096;
const MAX_PENDING_PER_SOURCE: usize = 256;

/// Where a peer connects from, for [`MAX_PENDING_PER_SOURCE`]: the address without its port
/// (`tcp:10.0.0.2:4711` → `tcp:10.0.0.2`); other kinds as named.
fn source_of(peer: &str) -> &str {
    match peer.split_once(':') {
        Some(("tcp" | "vsock" | "rdma", _)) => peer.rsplit_once(':').map_or(peer, |(a, _)| a),
        Some((kind, _)) => kind,
        None => peer,
    }
}

/// Counts the handshakes in progress, per source and in all.
#[derive(Default)]
struct Handshakes {
    by_source: HashMap<String, usize>,
    total: usize,
}

/// One admitted handshake; releases its slot when dropped.
struct PendingSlot {
    pending: Arc<Mutex<Handshakes>>,
    source: String,
}

impl PendingSlot {
    fn admit(pending: &Arc<Mutex<Handshakes>>, peer: &str) -> Option<PendingSlot> {
        let source = source_of(peer).to_string();
        let mut p = crate::sync::lock(pending);
        let n = p.by_source.get(&source).copied().unwrap_or(0);
        if p.total >= MAX_PENDING || n >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        p.total += 1;
        p.by_source.insert(source.clone(), n + 1);
        Some(PendingSlot {
            pending: pending.clone(),
            source,
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut p = crate::sync::lock(&self.pending);
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                p.by_source.remove(&self.source);
            }
        }
    }
}

/// Accepts connections forever, running each handshake in its own task so a slow or hostile
/// peer never delays anyone else. Failed handshakes are logged and dropped; connections beyond
/// the pending-handshake limits are closed unread.
pub async fn serve(mut listener: Box<dyn Listener>, cfg: SessionConfig, registry: Registry) {
    let local = listener.local_endpoint();
    let encrypt = cfg.encrypt.for_endpoint(&local);
    tracing::info!(%local, services = ?registry.names(), encrypt, "listening");
    let pending = Arc::new(Mutex::new(Handshakes::default()));
    let mut refused: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let Some(slot) = PendingSlot::admit(&pending, &peer) else {
                    refused += 1;
                    // Once per 1 000 refusals: a flood must not flood the log too.
                    if refused % 1000 == 1 {
                        tracing::warn!(%peer, refused, "too many handshakes in progress; connection closed");
                    }
                    drop(conn);
                    continue;
                };
                let cfg = cfg.clone();
                let registry = registry.clone();
                tokio::spawn(async move {
                    let started =
                        Session::start(conn, cfg, registry, false, peer.clone(), encrypt).await;
                    drop(slot);
                    match started {
                        Ok(s) => {
                            tracing::info!(%peer, "peer authenticated");
                            let reason = s.closed().await;
                            tracing::info!(%peer, %reason, "peer gone");
                        }
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "handshake failed; connection dropped")
                        }
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Batch limits for one vectored write.
const MAX_BATCH_BYTES: usize = 1 << 20;
const MAX_BATCH_FRAMES: usize = 128;
/// Payloads up to this size are copied into the batch buffer; larger ones are written in place.
const COPY_THRESHOLD: usize = 16 * 1024;

async fn write_chunks(ws: &Mutex<WriteSide>, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !chunks.is_empty() {
        let slices: Vec<IoSlice<'_>> = chunks.iter().take(64).map(|c| IoSlice::new(c)).collect();
        let n = std::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut lock_ws(ws).w).poll_write_vectored(cx, &slices)
        })
        .await?;
        drop(slices);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(chunks, n);
    }
    Ok(())
}

/// Appends a frame to the batch: small payloads are copied next to their header, large ones
/// are queued as they are (their own piece, so an encrypted session seals them into records
/// of their own, in place when nobody else holds them). Returns whether it was a GoAway (the
/// last frame to write). `answers` counts the bytes of answers to the peer's calls.
fn stage(
    f: Frame,
    staging: &mut BytesMut,
    pieces: &mut Vec<Piece>,
    bytes: &mut usize,
    answers: &mut usize,
) -> bool {
    let go_away = f.head.len() >= 5 && f.head[4] == Kind::GoAway as u8;
    *bytes += f.len();
    if f.answer {
        *answers += f.len();
    }
    staging.extend_from_slice(&f.head);
    if f.body.len() <= COPY_THRESHOLD {
        staging.extend_from_slice(&f.body);
    } else {
        pieces.push(Piece::Owned(staging.split()));
        pieces.push(Piece::Shared(f.body));
    }
    go_away
}

/// Puts `pieces` on `chunks` in wire form: sealed into records on an encrypted session, as
/// they are otherwise.
fn to_wire(
    seal: Option<&mut Sealer>,
    pieces: impl IntoIterator<Item = Piece>,
    chunks: &mut VecDeque<Bytes>,
) -> Result<(), CryptoError> {
    match seal {
        Some(seal) => seal.seal_pieces(pieces, chunks),
        None => {
            chunks.extend(
                pieces
                    .into_iter()
                    .map(|p| match p {
                        Piece::Owned(b) => b.freeze(),
                        Piece::Shared(b) => b,
                    })
                    .filter(|b| !b.is_empty()),
            );
            Ok(())
        }
    }
}

async fn writer_task(
    ws: Arc<Mutex<WriteSide>>,
    mut lead: Option<Frame>,
    mut ctl: mpsc::UnboundedReceiver<Frame>,
    mut data: mpsc::UnboundedReceiver<Frame>,
    out: Arc<OutBudget>,
    inner: std::sync::Weak<Inner>,
    mut closed: watch::Receiver<Option<CloseReason>>,
) {
    let mut staging = BytesMut::with_capacity(64 * 1024);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut data_open = true;
    let mut go_away = false;
    if lock_ws(&ws).seal.is_some() {
        // Encrypted: the dialer's Auth is the last clear frame, so it goes out on its own.
        if let Some(f) = lead.take() {
            let mut auth: VecDeque<Bytes> = [f.head.freeze()].into();
            if let Err(e) = write_chunks(&ws, &mut auth).await {
                lock_ws(&ws).done = true;
                if let Some(inner) = inner.upgrade() {
                    inner.close(CloseReason::Io(e.to_string()));
                }
                return;
            }
        }
    }
    loop {
        // The dialer's Auth goes first, batched with whatever the caller queued meanwhile.
        // Then control frames (calls, replies, credit, pings) go before bulk data.
        let (first, from_ctl) = if let Some(f) = lead.take() {
            (Some(f), false)
        } else {
            // Idle: threads may write calls themselves until the next frame is taken.
            lock_ws(&ws).busy = false;
            tokio::select! {
                biased;
                f = ctl.recv() => (f, true),
                _ = closed.changed() => (None, false),
                f = data.recv(), if data_open => match f {
                    Some(f) => (Some(f), false),
                    None => { data_open = false; continue; }
                },
            }
        };
        let Some(first) = first else { break };
        {
            // Busy from here until written; the rest of a frame a thread left goes first.
            let mut g = lock_ws(&ws);
            g.busy = true;
            g.queued -= usize::from(from_ctl);
            chunks.extend(g.front.drain(..));
        }
        let mut batch_bytes = 0usize;
        let mut answers = 0usize;
        let mut frames = 1usize;
        let mut from_ctl = 0usize;
        go_away |= stage(
            first,
            &mut staging,
            &mut pieces,
            &mut batch_bytes,
            &mut answers,
        );
        while frames < MAX_BATCH_FRAMES && batch_bytes < MAX_BATCH_BYTES {
            let next = match ctl.try_recv() {
                Ok(f) => {
                    from_ctl += 1;
                    Some(f)
                }
                Err(_) if data_open => data.try_recv().ok(),
                Err(_) => None,
            };
            let Some(f) = next else { break };
            go_away |= stage(f, &mut staging, &mut pieces, &mut batch_bytes, &mut answers);
            frames += 1;
        }
        lock_ws(&ws).queued -= from_ctl;
        if !staging.is_empty() {
            pieces.push(Piece::Owned(staging.split()));
        }
        // Encrypted: the batch (after what a direct sender left, already in wire form)
        // becomes records. The task is busy, so no direct sender seals in between.
        let sealed = to_wire(lock_ws(&ws).seal.as_mut(), pieces.drain(..), &mut chunks);
        if let Err(e) = sealed {
            lock_ws(&ws).done = true;
            if let Some(inner) = inner.upgrade() {
                inner.close(CloseReason::Io(e.to_string()));
            }
            return;
        }
        if let Err(e) = write_chunks(&ws, &mut chunks).await {
            lock_ws(&ws).done = true;
            if let Some(inner) = inner.upgrade() {
                inner.close(CloseReason::Io(e.to_string()));
            }
            return;
        }
        out.sub(answers);
        if go_away {
            break;
        }
    }
    {
        let mut g = lock_ws(&ws);
        g.done = true;
        g.busy = true;
    }
    let _ = std::future::poll_fn(|cx| std::pin::Pin::new(&mut lock_ws(&ws).w).poll_flush(cx)).await;
    let _ =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut lock_ws(&ws).w).poll_shutdown(cx)).await;
}

/// Drives the [`Heartbeat`] rule: sleeps until its next check, tells it when the reader last
/// saw bytes, and does what it says.
async fn heartbeat_task(inner: std::sync::Weak<Inner>) {
    let mut hb = match inner.upgrade() {
        Some(i) => Heartbeat::new(
            i.cfg.heartbeat_interval,
            i.cfg.heartbeat_timeout,
            Instant::now(),
        ),
        None => return,
    };
    loop {
        tokio::time::sleep_until(hb.poll_timeout().into()).await;
        let Some(i) = inner.upgrade() else { return };
        if i.lock().closed.is_some() {
            return;
        }
        hb.on_activity(i.started + Duration::from_millis(i.last_seen_ms.load(Ordering::Relaxed)));
        // Session::expect_silence: a stopped peer's silence is not its death.
        if i.silence_ok.load(Ordering::Relaxed) {
            hb.on_activity(Instant::now());
        }
        match hb.on_timeout(Instant::now()) {
            Beat::Idle => {}
            Beat::Ping(seq) => {
                i.stats.ping_sent(seq);
                let _ = i.send_ctl(Frame::new(Kind::Ping, seq, &[], Bytes::new()));
            }
            Beat::Dead(silent) => {
                i.close(if i.reading_paused.load(Ordering::Relaxed) {
                    CloseReason::PeerNotReading(silent)
                } else {
                    CloseReason::HeartbeatTimeout(silent)
                });
                return;
            }
        }
    }
}

/// Initial read buffer; frames larger than the free space grow it.
const READ_BUF: usize = 256 * 1024;

async fn reader_task(mut r: ReadHalf<Conn>, inner: Arc<Inner>, open: Option<Opener>) {
    let reason = read_loop(&mut r, &inner, open).await;
    inner.close(reason);
}

/// Frames at least this large are read straight into their own buffer instead of through the
/// shared read buffer, so bulk payloads are copied once (socket → payload) and never moved.
const DIRECT_READ: usize = 64 * 1024;

/// Reads more bytes into `buf` (at most `limit`), or says why the session ended.
async fn fill(
    r: &mut ReadHalf<Conn>,
    buf: &mut BytesMut,
    limit: usize,
    inner: &Inner,
    closed: &mut watch::Receiver<Option<CloseReason>>,
) -> Result<(), CloseReason> {
    let mut limited = (&mut *r).take(limit as u64);
    let read = tokio::select! {
        n = limited.read_buf(buf) => n,
        _ = closed.wait_for(|c| c.is_some()) => return Err(CloseReason::Local),
    };
    match read {
        Ok(0) if buf.is_empty() => Err(if inner.lock().going_away {
            CloseReason::PeerGoAway
        } else {
            CloseReason::PeerClosed
        }),
        Ok(0) => Err(CloseReason::Truncated(buf.len())),
        Ok(_) => {
            inner.touch();
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(CloseReason::PeerReset),
        Err(e) => Err(CloseReason::Io(e.to_string())),
    }
}

/// Reads frames until the session ends. On an encrypted session ([`read_records`]) only
/// authenticated plaintext reaches the frame decoder.
async fn read_loop(
    r: &mut ReadHalf<Conn>,
    inner: &Arc<Inner>,
    open: Option<Opener>,
) -> CloseReason {
    if let Some(open) = open {
        return read_records(r, inner, open).await;
    }
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut closed = inner.closed_tx.subscribe();
    inner.touch();
    loop {
        while buf.len() >= HEADER_LEN {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&buf[..HEADER_LEN]);
            let header = match Header::parse(&h, inner.cfg.max_frame) {
                Ok(h) => h,
                Err(e) => return CloseReason::Protocol(e.to_string()),
            };
            let len = header.len as usize;
            let payload = if buf.len() >= HEADER_LEN + len {
                buf.advance(HEADER_LEN);
                buf.split_to(len).freeze()
            } else if len >= DIRECT_READ {
                buf.advance(HEADER_LEN);
                let mut frame = BytesMut::with_capacity(len);
                frame.extend_from_slice(&buf.split());
                while frame.len() < len {
                    let want = len - frame.len();
                    if let Err(reason) = fill(r, &mut frame, want, inner, &mut closed).await {
                        return reason;
                    }
                }
                frame.freeze()
            } else {
                break;
            };
            if let Err(reason) = inner.room_for_answers(&mut closed).await {
                return reason;
            }
            if let Err(reason) = dispatch(inner, header, payload) {
                return reason;
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(READ_BUF);
        }
        if let Err(reason) = fill(r, &mut buf, usize::MAX, inner, &mut closed).await {
            return reason;
        }
    }
}

/// Frames out of decrypted records. Frames are a byte stream across records; a payload that
/// starts a record (the writer seals bulk payloads as records of their own) is handed on as
/// a slice of that record, so bulk bytes are decrypted in the buffer they were read into and
/// never copied again. Only a payload split over records is assembled by copying.
#[derive(Default)]
struct Deframer {
    /// Bytes of a header split over records.
    head: BytesMut,
    /// A parsed header whose payload is incomplete, and the payload bytes so far.
    pending: Option<(Header, BytesMut)>,
    /// What is left of the last record fed.
    rec: BytesMut,
}

impl Deframer {
    /// Bytes held that do not make a whole frame yet.
    fn held(&self) -> usize {
        self.head.len()
            + self
                .pending
                .as_ref()
                .map_or(0, |(_, p)| HEADER_LEN + p.len())
    }

    /// Decodes every frame `rec` completes and hands each to `deliver`.
    fn push(
        &mut self,
        rec: BytesMut,
        max_frame: u32,
        mut deliver: impl FnMut(Header, Bytes) -> Result<(), CloseReason>,
    ) -> Result<(), CloseReason> {
        self.feed(rec);
        while let Some((h, payload)) = self.next_frame(max_frame)? {
            deliver(h, payload)?;
        }
        Ok(())
    }

    /// Takes the next record's plaintext; call once [`Deframer::next_frame`] gave `None`.
    fn feed(&mut self, rec: BytesMut) {
        debug_assert!(self.rec.is_empty());
        self.rec = rec;
    }

    /// The next frame the bytes fed so far complete, if any.
    fn next_frame(&mut self, max_frame: u32) -> Result<Option<(Header, Bytes)>, CloseReason> {
        let rec = &mut self.rec;
        loop {
            if let Some((h, mut acc)) = self.pending.take() {
                let need = h.len as usize - acc.len();
                let payload = if acc.is_empty() && rec.len() >= need {
                    rec.split_to(need)
                } else {
                    let take = need.min(rec.len());
                    if acc.capacity() < h.len as usize {
                        acc.reserve(h.len as usize - acc.len());
                    }
                    acc.extend_from_slice(&rec.split_to(take));
                    if acc.len() < h.len as usize {
                        self.pending = Some((h, acc));
                        // All of it taken: let go of the record's buffer (the reader reuses
                        // its read buffer only when nothing else holds it).
                        *rec = BytesMut::new();
                        return Ok(None);
                    }
                    acc
                };
                return Ok(Some((h, payload.freeze())));
            }
            let mut h = [0u8; HEADER_LEN];
            if self.head.is_empty() && rec.len() >= HEADER_LEN {
                h.copy_from_slice(&rec.split_to(HEADER_LEN));
            } else {
                let take = (HEADER_LEN - self.head.len()).min(rec.len());
                self.head.extend_from_slice(&rec.split_to(take));
                if self.head.len() < HEADER_LEN {
                    *rec = BytesMut::new();
                    return Ok(None);
                }
                h.copy_from_slice(&self.head);
                self.head.clear();
            }
            let header =
                Header::parse(&h, max_frame).map_err(|e| CloseReason::Protocol(e.to_string()))?;
            self.pending = Some((header, BytesMut::new()));
        }
    }
}

/// Fuzzing entry: the frame decoder over decrypted records (what an authenticated peer
/// controls on an encrypted session). The first byte picks the record size; whatever frames
/// come out must be exactly the ones the bytes hold.
#[doc(hidden)]
pub fn fuzz_deframe(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let mut d = Deframer::default();
    let mut whole = 0usize;
    for rec in data.chunks(cut) {
        let res = d.push(BytesMut::from(rec), 1 << 16, |_, p| {
            whole += HEADER_LEN + p.len();
            Ok(())
        });
        if res.is_err() {
            return;
        }
    }
    assert_eq!(whole + d.held(), data.len());
}

/// [`read_loop`] on an encrypted session: the socket's bytes go to `raw`, each authenticated
/// record's plaintext to the [`Deframer`].
async fn read_records(r: &mut ReadHalf<Conn>, inner: &Arc<Inner>, mut open: Opener) -> CloseReason {
    let mut raw = BytesMut::new();
    let mut frames = Deframer::default();
    let mut closed = inner.closed_tx.subscribe();
    inner.touch();
    loop {
        loop {
            let rec = match open.open_record(&mut raw) {
                Ok(Some(rec)) => rec,
                Ok(None) => break,
                Err(e) => return CloseReason::Integrity(e.to_string()),
            };
            frames.feed(rec);
            loop {
                let (h, payload) = match frames.next_frame(inner.cfg.max_frame) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(reason) => return reason,
                };
                if let Err(reason) = inner.room_for_answers(&mut closed).await {
                    return reason;
                }
                if let Err(reason) = dispatch(inner, h, payload) {
                    return reason;
                }
            }
        }
        // Bulk records are read up to their end and no further, into a buffer of their own
        // size: the next one then starts a fresh buffer instead of being moved out of a
        // buffer whose front is still held as payloads. During bulk transfer (recent records
        // big) the next header is read on its own for that.
        let bulk = open.size_hint() >= DIRECT_READ;
        let limit = if raw.len() >= 4 {
            let want = match crypto::record_len([raw[0], raw[1], raw[2], raw[3]]) {
                Ok(len) => 4 + len - raw.len(),
                Err(e) => return CloseReason::Integrity(e.to_string()),
            };
            if bulk || raw.len() + want >= DIRECT_READ {
                raw.reserve(want);
                want
            } else {
                if raw.capacity() - raw.len() < 16 * 1024 {
                    raw.reserve(READ_BUF);
                }
                usize::MAX
            }
        } else if bulk {
            raw.reserve(4);
            4 - raw.len()
        } else {
            if raw.capacity() - raw.len() < 16 * 1024 {
                raw.reserve(READ_BUF);
            }
            usize::MAX
        };
        if let Err(reason) = fill(r, &mut raw, limit, inner, &mut closed).await {
            return match reason {
                CloseReason::PeerClosed | CloseReason::PeerGoAway if frames.held() > 0 => {
                    CloseReason::Truncated(frames.held())
                }
                other => other,
            };
        }
    }
}

/// Fuzzing entry: the Credit frame's payload decoder.
#[doc(hidden)]
pub fn fuzz_u32_payload(p: &[u8]) -> Option<u32> {
    dispatch::u32_payload(p).ok()
}

/// Executes what an incoming frame means ([`Rules::decode`] and the rules after it decide).
fn dispatch(inner: &Arc<Inner>, h: Header, payload: Bytes) -> Result<(), CloseReason> {
    match inner.rules.decode(h, payload)? {
        Event::Request { id, service, body } => {
            let svc = inner.registry.get(&service).cloned();
            let running = inner.inflight_calls.fetch_add(1, Ordering::Relaxed) as usize;
            let svc = match (
                inner.rules.admit_call(&service, svc.is_some(), running),
                svc,
            ) {
                (Admission::Run, Some(svc)) => svc,
                (admission, _) => {
                    inner.inflight_calls.fetch_sub(1, Ordering::Relaxed);
                    let (code, message) = match admission {
                        Admission::Refuse { code, message } => (code, message),
                        // Unreachable: admitted means the service exists.
                        Admission::Run => (dispatch::CODE_UNKNOWN_SERVICE, service),
                    };
                    inner.send_answer(id, dispatch::error_payload(code, message));
                    return Ok(());
                }
            };
            let session = Session {
                inner: inner.clone(),
            };
            let (metrics, t0) = (offload_metrics::service(&service), Instant::now());
            let mut call = Box::pin(async move {
                let res = svc.call(&session, body).await;
                metrics.call_done(t0.elapsed(), res.is_ok());
                session.inner.inflight_calls.fetch_sub(1, Ordering::Relaxed);
                let answer = session.inner.rules.answer(res);
                session.inner.send_answer(id, answer);
            });
            // The handler runs up to its first wait right here, before the next frame is
            // read: a call that never waits costs no task hand-off, and such calls take
            // effect in arrival order (qtfs relies on it). One that waits continues on its
            // own task; spawning polls it again at once with the task's waker, so the no-op
            // waker of this first poll loses nothing.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if call.as_mut().poll(&mut cx).is_pending() {
                tokio::spawn(call);
            }
        }
        Event::Answer { id, answer } => {
            let pending = inner.lock().calls.remove(&id);
            // None: the caller gave up; the answer is dropped unread.
            if let Some(pending) = pending {
                pending.finish(answer.outcome()?);
            }
        }
        Event::Open {
            id,
            service,
            header,
        } => {
            let svc = inner.registry.get(&service).cloned();
            let shared = Shared::new(id, inner.peer_window as u64, inner.cfg.stream_window as u64);
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut st = inner.lock();
                let opening = inner.rules.on_open(
                    id,
                    st.streams.contains_key(&id),
                    &service,
                    svc.is_some(),
                    st.streams.len(),
                )?;
                if let Opening::Refuse(why) = opening {
                    drop(st);
                    inner.send_reset(id, &why);
                    return Ok(());
                }
                st.streams.insert(
                    id,
                    StreamEntry {
                        shared: shared.clone(),
                        tx,
                    },
                );
            }
            let Some(svc) = svc else { return Ok(()) };
            let session = Session {
                inner: inner.clone(),
            };
            let stream = Stream::new(shared, inner.clone(), rx);
            let open = offload_metrics::service(&service).stream_opened();
            tokio::spawn(async move {
                svc.stream(&session, header, stream).await;
                drop(open);
            });
        }
        Event::Data { id, payload } => {
            let entry = inner.stream_entry(id);
            let n = payload.len() as u64;
            let delivery = {
                let mut st = entry.as_ref().map(|(shared, _)| shared.lock());
                dispatch::on_data(id, st.as_deref_mut(), n)?
            };
            // Bytes nobody will read go back to the peer as credit at once.
            let credit_back = match (delivery, entry) {
                (Delivery::Discard, _) => true,
                (Delivery::Deliver, Some((shared, tx))) => {
                    let lost = tx.send(Inbound::Data(payload)).is_err();
                    if lost {
                        shared.lock().recv.undeliverable(n);
                    }
                    lost
                }
                _ => false,
            };
            if credit_back {
                inner.send_credit(id, n);
            }
        }
        Event::Eof { id } => {
            let Some((shared, tx)) = inner.stream_entry(id) else {
                return Ok(());
            };
            let remove = dispatch::on_eof(&mut shared.lock());
            let _ = tx.send(Inbound::Eof);
            if remove {
                inner.lock().streams.remove(&id);
            }
        }
        Event::Reset { id, reason } => {
            let entry = inner.lock().streams.remove(&id);
            if let Some(e) = entry {
                e.shared.set_reset(&reason);
                let _ = e.tx.send(Inbound::Reset(reason));
            }
        }
        Event::Grant { id, n } => {
            let shared = inner.lock().streams.get(&id).map(|e| e.shared.clone());
            if let Some(s) = shared {
                s.add_credit(n as u64);
            }
        }
        Event::SendPong(seq) => {
            let _ = inner.send_ctl(Frame::new(Kind::Pong, seq, &[], Bytes::new()));
        }
        Event::Pong(seq) => inner.stats.pong(seq),
        Event::GoAway => {
            inner.lock().going_away = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod pending_tests {
    use super::*;

    #[test]
    fn sources_and_limits() {
        assert_eq!(source_of("tcp:10.0.0.2:4711"), "tcp:10.0.0.2");
        assert_eq!(source_of("tcp:[::1]:4711"), "tcp:[::1]");
        assert_eq!(source_of("vsock:3:1024"), "vsock:3");
        assert_eq!(source_of("unix:pid=Some(1),uid=0"), "unix");
        let p = Arc::new(Mutex::new(Handshakes::default()));
        let held: Vec<_> = (0..MAX_PENDING_PER_SOURCE)
            .map(|i| PendingSlot::admit(&p, &format!("tcp:10.0.0.9:{i}")).unwrap())
            .collect();
        assert!(
            PendingSlot::admit(&p, "tcp:10.0.0.9:1").is_none(),
            "per-source cap"
        );
        let other = PendingSlot::admit(&p, "tcp:10.0.0.2:5").expect("another source still gets in");
        drop(held);
        drop(other);
        let p = p.lock().unwrap();
        assert_eq!(p.total, 0);
        assert!(p.by_source.is_empty());
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;
    use crate::crypto::MAX_RECORD;

    fn frame(kind: Kind, id: u32, body: &[u8]) -> BytesMut {
        let f = Frame::new(kind, id, &[], Bytes::copy_from_slice(body));
        let mut out = f.head;
        out.extend_from_slice(&f.body);
        out
    }

    /// Runs plaintext records through a [`Deframer`] and returns the frames it delivered.
    fn deframe(records: Vec<BytesMut>) -> (Vec<(u32, Bytes)>, usize) {
        let mut d = Deframer::default();
        let mut got = Vec::new();
        for r in records {
            d.push(r, 16 << 20, |h, p| {
                got.push((h.id, p));
                Ok(())
            })
            .unwrap();
        }
        (got, d.held())
    }

    #[test]
    fn frames_across_record_boundaries() {
        let mut stream = BytesMut::new();
        let bodies: Vec<Vec<u8>> = (0..20u32)
            .map(|i| vec![i as u8; (i as usize * 977) % 5000])
            .collect();
        for (i, b) in bodies.iter().enumerate() {
            stream.extend_from_slice(&frame(Kind::Data, i as u32, b));
        }
        // Every split size, including ones that cut headers in two.
        for cut in [1usize, 5, 12, 13, 700, 4096, stream.len()] {
            let records: Vec<BytesMut> = stream.chunks(cut).map(BytesMut::from).collect();
            let (got, held) = deframe(records);
            assert_eq!(held, 0, "cut {cut}");
            assert_eq!(got.len(), bodies.len(), "cut {cut}");
            for ((id, p), (i, b)) in got.iter().zip(bodies.iter().enumerate()) {
                assert_eq!(*id, i as u32);
                assert_eq!(&p[..], &b[..], "cut {cut} frame {i}");
            }
        }
        // A frame cut short stays held (the reader reports it as truncated).
        let (got, held) = deframe(vec![BytesMut::from(&stream[..30])]);
        assert_eq!(got.len(), 1);
        assert_eq!(held, 30 - HEADER_LEN);
    }

    #[test]
    fn fuzz_deframe_runs_on_its_edge_cases() {
        let mut f = vec![5u8];
        f.extend_from_slice(&frame(Kind::Data, 1, b"hello"));
        f.extend_from_slice(&frame(Kind::Eof, 1, b""));
        f.extend_from_slice(&frame(Kind::Data, 2, &[1; 300])[..40]);
        for data in [&b""[..], &[0u8][..], &[1, 0xff, 0xff][..], &f[..]] {
            fuzz_deframe(data);
        }
    }

    #[test]
    fn bulk_payload_in_its_own_record_is_not_copied() {
        // As the writer seals it: the header ends one record, the payload is the next.
        let (mut seal, mut open) = {
            let a = Ephemeral::generate().unwrap();
            let b = Ephemeral::generate().unwrap();
            let (pa, pb) = (a.public(), b.public());
            let (s, _) = a.derive(&pb, Some(&[5; 32]), &[], true).unwrap();
            let (_, o) = b.derive(&pa, Some(&[5; 32]), &[], false).unwrap();
            (s, o)
        };
        let body = Bytes::from(vec![7u8; 1 << 20]);
        let mut staging = BytesMut::new();
        let mut pieces = Vec::new();
        let mut n = 0;
        stage(
            Frame::new(Kind::Data, 3, &[], body.clone()),
            &mut staging,
            &mut pieces,
            &mut n,
            &mut 0,
        );
        stage(
            Frame::new(Kind::Eof, 3, &[], Bytes::new()),
            &mut staging,
            &mut pieces,
            &mut n,
            &mut 0,
        );
        pieces.push(Piece::Owned(staging.split()));
        let mut chunks = VecDeque::new();
        to_wire(Some(&mut seal), pieces, &mut chunks).unwrap();
        let mut raw = BytesMut::new();
        for c in chunks {
            raw.extend_from_slice(&c);
        }
        let mut records = Vec::new();
        while let Some(r) = open.open_record(&mut raw).unwrap() {
            records.push(r);
        }
        assert_eq!(records.len(), 3, "header, payload, eof: one record each");
        let at = records[1].as_ptr();
        let (got, held) = deframe(records);
        assert_eq!(held, 0);
        assert_eq!(got.len(), 2);
        assert!(got[0].1 == body);
        assert_eq!(
            got[0].1.as_ptr(),
            at,
            "the payload is the decrypted record itself"
        );
        assert!(got[1].1.is_empty());
    }

    #[test]
    fn owned_pieces_are_sealed_in_place_and_big_ones_split() {
        let (mut seal, mut open) = {
            let a = Ephemeral::generate().unwrap();
            let b = Ephemeral::generate().unwrap();
            let (pa, pb) = (a.public(), b.public());
            let (s, _) = a.derive(&pb, None, &[], true).unwrap();
            let (_, o) = b.derive(&pa, None, &[], false).unwrap();
            (s, o)
        };
        let owned = BytesMut::from(&vec![1u8; 4096][..]);
        let at = owned.as_ptr();
        let unique = Bytes::from(vec![2u8; MAX_RECORD + 10]);
        let unique_at = unique.as_ptr();
        let shared = Bytes::from(vec![3u8; 100]);
        let keep = shared.clone();
        let mut out = VecDeque::new();
        seal.seal_pieces(
            [
                Piece::Owned(owned),
                Piece::Shared(unique),
                Piece::Shared(shared),
            ],
            &mut out,
        )
        .unwrap();
        assert!(out.iter().any(|c| c.as_ptr() == at), "owned: no copy");
        assert!(
            out.iter().any(|c| c.as_ptr() == unique_at),
            "unique: no copy"
        );
        assert!(
            !out.iter().any(|c| c.as_ptr() == keep.as_ptr()),
            "shared: copied, the other holder's bytes untouched"
        );
        assert_eq!(&keep[..], &[3u8; 100][..]);
        let mut raw = BytesMut::new();
        for c in out {
            raw.extend_from_slice(&c);
        }
        let mut lens = Vec::new();
        while let Some(r) = open.open_record(&mut raw).unwrap() {
            lens.push(r.len());
        }
        assert_eq!(lens, vec![4096, MAX_RECORD, 10, 100]);
        assert!(raw.is_empty());
    }
}
