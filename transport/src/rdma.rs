//! RDMA link (`rdma://IP:PORT`): a reliable, ordered byte stream over one reliable-connected (RC)
//! queue pair, set up with librdmacm and driven by tokio without a polling thread.
//!
//! # Data path
//! Each side registers a receive ring of [`SLOTS`] slots of [`SLOT_SIZE`] bytes and tells the peer
//! its address and rkey in the connection's private data. A `poll_write` becomes one
//! `RDMA_WRITE_WITH_IMM` of up to one slot straight into the peer's next ring slot (message `k`
//! goes to slot `k % slots`): the payload is placed by the NIC, no bounce buffer on the receive
//! side. Small payloads (up to the QP's inline limit) are posted `IBV_SEND_INLINE`, larger ones are
//! copied once into a registered send slot. The 32-bit immediate carries the length and piggybacks
//! credit returns. Control messages (credit returns when no data flows back, end-of-stream) are
//! zero-length `SEND_WITH_IMM`s.
//!
//! Small data is not sent as a SEND into separate bounce buffers on purpose: writes of every
//! size land in one ordered ring with one receive path and one credit type, and a small inline
//! write costs the same as an inline SEND.
//!
//! Copies per message: one on the sending side (user buffer into the inline WQE or the registered
//! send slot), one on the receiving side (ring slot into the reader's buffer) — the minimum for
//! the `AsyncRead`/`AsyncWrite` byte-stream interface.
//!
//! # Flow control (no RNR by construction)
//! Receive work requests carry no buffer; each side posts `slots + ctrl` of them and reposts one
//! as soon as it polls a receive completion. A sender may have at most `slots` data messages that
//! the peer has not yet *released* (read out of its ring), and at most `ctrl` control messages the
//! peer has not yet *polled*. Both counters travel back cumulatively (mod 256) in every immediate,
//! so at most `slots + ctrl` receives are ever consumed and not yet reposted: the receive queue
//! never runs dry and the QP never sees receiver-not-ready.
//!
//! # Completions
//! One CQ for sends and receives with a completion channel whose fd is registered with tokio
//! ([`AsyncFd`]); the rdma_cm event channel fd (peer disconnects) likewise. `OFFLOAD_RDMA_POLL=1`
//! switches a connection to busy polling (lower latency, one core spinning while it waits).

use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::ptr::null_mut;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdma_sys as sys;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::endpoint::Endpoint;
use crate::link::{Conn, Listener, Transport, TransportError};
use crate::rdma_meta::{advance, imm_decode, imm_encode, MetaError, RingInfo, FLAG_FIN};

/// Bytes per receive-ring slot, i.e. the largest single RDMA write.
pub const SLOT_SIZE: usize = 32 * 1024;
/// Receive-ring slots per direction (at most 128 so the mod-256 credit counters stay unambiguous).
pub const SLOTS: u32 = 32;
/// Receive work requests reserved for control messages.
const CTRL: u32 = 8;
/// Return credits explicitly once this many slots were released and no data flowed back.
const CREDIT_BATCH: u32 = SLOTS / 2;
/// Report polled control messages explicitly once this many are unreported.
const CTRL_BATCH: u32 = CTRL / 2;
/// rdma_cm address/route resolution timeout.
const RESOLVE_TIMEOUT_MS: i32 = 3000;
/// Bound on connection establishment (peer accepts, or the CM gives up).
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long dropping a connection waits for its posted writes to be acknowledged.
const DRAIN_ON_DROP: Duration = Duration::from_millis(500);

/// Process-wide event counters (cheap relaxed atomics), for benchmarks and diagnosis.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Calls into the progress engine (each poll_read / poll_write / poll_shutdown).
    pub progress: u64,
    /// `ibv_poll_cq` calls.
    pub cq_polls: u64,
    /// Work completions processed.
    pub completions: u64,
    /// Completion-channel events (idle -> busy wakeups).
    pub cq_events: u64,
    /// Data messages (RDMA writes) posted.
    pub writes: u64,
    /// Control messages (credit returns, FIN) posted.
    pub ctrl: u64,
}

mod counters {
    use std::sync::atomic::AtomicU64;
    pub static PROGRESS: AtomicU64 = AtomicU64::new(0);
    pub static CQ_POLLS: AtomicU64 = AtomicU64::new(0);
    pub static COMPLETIONS: AtomicU64 = AtomicU64::new(0);
    pub static CQ_EVENTS: AtomicU64 = AtomicU64::new(0);
    pub static WRITES: AtomicU64 = AtomicU64::new(0);
    pub static CTRL: AtomicU64 = AtomicU64::new(0);
}

fn bump(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// The counters summed over every RDMA connection of this process so far.
pub fn counters() -> Counters {
    use std::sync::atomic::Ordering::Relaxed;
    Counters {
        progress: counters::PROGRESS.load(Relaxed),
        cq_polls: counters::CQ_POLLS.load(Relaxed),
        completions: counters::COMPLETIONS.load(Relaxed),
        cq_events: counters::CQ_EVENTS.load(Relaxed),
        writes: counters::WRITES.load(Relaxed),
        ctrl: counters::CTRL.load(Relaxed),
    }
}

const WR_RECV: u64 = 1;
const WR_DATA: u64 = 2;
const WR_CTRL: u64 = 3;

/// Why an RDMA connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device (or none for the address).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs or RDMA CM call failed.
    #[error("{op}: {source}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// errno as an I/O error.
        #[source]
        source: io::Error,
    },
    /// Another RDMA CM listener holds the address.
    #[error("{addr} is already in use by another RDMA listener")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Address or route resolution failed.
    #[error("cannot reach {addr} over RDMA: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: SocketAddr,
        /// The CM event that said so.
        reason: String,
    },
    /// The peer's CM rejected the connection.
    #[error("connection to {addr} refused (nothing listens there over RDMA)")]
    Refused {
        /// The peer's address.
        addr: SocketAddr,
    },
    /// A CM step did not complete in time (the text says which).
    #[error("timed out {0}")]
    Timeout(String),
    /// The peer's ring metadata or immediate data broke the link rules.
    #[error("peer violated the RDMA link protocol: {0}")]
    Protocol(String),
    /// The endpoint's host is not an IP address (RDMA CM needs one).
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
}

impl RdmaError {
    fn sys(op: &'static str) -> Self {
        RdmaError::Sys {
            op,
            source: io::Error::last_os_error(),
        }
    }
    /// For calls that return a positive errno instead of setting `errno` (the posting verbs).
    fn errno(op: &'static str, rc: i32) -> Self {
        RdmaError::Sys {
            op,
            source: io::Error::from_raw_os_error(rc.abs()),
        }
    }
}

impl From<RdmaError> for TransportError {
    fn from(e: RdmaError) -> Self {
        TransportError::Rdma(e.to_string())
    }
}

/// The `rdma://` [`Transport`].
pub struct Rdma;

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, RdmaError> {
    if let Ok(ip) = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| RdmaError::Address(host.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| RdmaError::Address(host.to_string(), "no address".into()))
}

#[async_trait]
impl Transport for Rdma {
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, TransportError> {
        let Endpoint::Rdma { host, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not rdma")));
        };
        let addr = resolve(host, *port).await?;
        Ok(Box::new(RdmaStream::connect(addr).await?))
    }

    async fn listen(&self, ep: &Endpoint) -> Result<Box<dyn Listener>, TransportError> {
        let Endpoint::Rdma { host, port } = ep else {
            return Err(TransportError::Unsupported(format!("{ep} is not rdma")));
        };
        let addr = resolve(host, *port).await?;
        Ok(Box::new(RdmaListener::bind(addr)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Small FFI helpers

/// Registers a librdmacm/libibverbs fd (read interest) with tokio.
///
/// # Safety
/// `fd` must stay open until the returned `AsyncFd` is dropped: the owners below drop it before
/// destroying the channel that owns the fd.
unsafe fn register(fd: RawFd, what: &'static str) -> Result<AsyncFd<RawFd>, RdmaError> {
    set_nonblocking(fd)?;
    AsyncFd::register_with_interest(fd, Interest::READABLE).map_err(|e| RdmaError::Sys {
        op: what,
        source: e.into_parts().1,
    })
}

fn set_nonblocking(fd: RawFd) -> Result<(), RdmaError> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: fcntl on an fd we own; no memory is passed.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(RdmaError::sys("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

/// A `sockaddr_storage` holding `addr`, as librdmacm wants it.
fn sockaddr_of(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
        }
    }
    ss
}

/// Decodes a sockaddr written by the kernel/librdmacm (IPv4 or IPv6 only).
///
/// # Safety
/// `sa` must point to a valid sockaddr of the family it names.
unsafe fn sockaddr_to(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    match (*sa).sa_family as i32 {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

fn event_name(kind: sys::rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a pointer to a static NUL-terminated string for any value.
    unsafe {
        let s = sys::rdma_event_str(kind);
        if s.is_null() {
            format!("event {kind}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rdma_cm event channel

/// What we keep of an rdma_cm event; the event itself is acknowledged at once (rdma_destroy_id
/// blocks until every event of an id is acknowledged, so none may be kept around).
struct CmEvent {
    kind: sys::rdma_cm_event_type::Type,
    status: i32,
    id: *mut sys::rdma_cm_id,
    private: Vec<u8>,
}

// SAFETY: `id` is an opaque librdmacm handle, usable from any thread; the event owns no other
// foreign memory (the private data was copied).
unsafe impl Send for CmEvent {}

/// An rdma_cm event channel with its fd registered with tokio.
struct CmChannel {
    afd: Option<AsyncFd<RawFd>>,
    ch: *mut sys::rdma_event_channel,
}

// SAFETY: an event channel is an fd plus librdmacm bookkeeping that is safe to use from any
// thread; reading events through `&self` concurrently is safe (the kernel queues them).
unsafe impl Send for CmChannel {}
// SAFETY: as above.
unsafe impl Sync for CmChannel {}

impl CmChannel {
    fn new() -> Result<Self, RdmaError> {
        // SAFETY: plain constructor; null on failure with errno set.
        let ch = unsafe { sys::rdma_create_event_channel() };
        if ch.is_null() {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => RdmaError::NoDevice(
                    format!("cannot open /dev/infiniband/rdma_cm ({e}); is rdma_ucm loaded?"),
                ),
                _ => RdmaError::Sys {
                    op: "rdma_create_event_channel",
                    source: e,
                },
            });
        }
        let mut me = CmChannel { afd: None, ch };
        // SAFETY: ch is a valid channel until we destroy it in Drop.
        let fd = unsafe { (*ch).fd };
        // SAFETY: the fd belongs to `ch`, destroyed only after `afd` is dropped (see Drop).
        me.afd = Some(unsafe { register(fd, "register rdma_cm fd")? });
        Ok(me)
    }

    fn afd(&self) -> &AsyncFd<RawFd> {
        // Invariant: afd is Some from construction until Drop.
        self.afd.as_ref().expect("cm channel fd registered")
    }

    /// Non-blocking: the next event if one is queued.
    fn try_event(&self) -> Result<Option<CmEvent>, RdmaError> {
        let mut ev: *mut sys::rdma_cm_event = null_mut();
        // SAFETY: ch is valid; the fd is non-blocking so this returns EAGAIN when empty.
        let rc = unsafe { sys::rdma_get_cm_event(self.ch, &mut ev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(RdmaError::Sys {
                op: "rdma_get_cm_event",
                source: e,
            });
        }
        // SAFETY: on success ev points to a valid event until rdma_ack_cm_event. The private data
        // pointer/len are valid for connect requests and established/rejected events.
        unsafe {
            let kind = (*ev).event;
            let mut private = Vec::new();
            if matches!(
                kind,
                sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST
                    | sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED
                    | sys::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED
            ) {
                let conn = &(*ev).param.conn;
                if !conn.private_data.is_null() && conn.private_data_len > 0 {
                    private = std::slice::from_raw_parts(
                        conn.private_data as *const u8,
                        conn.private_data_len as usize,
                    )
                    .to_vec();
                }
            }
            let out = CmEvent {
                kind,
                status: (*ev).status,
                id: (*ev).id,
                private,
            };
            sys::rdma_ack_cm_event(ev);
            Ok(Some(out))
        }
    }

    async fn next_event(&self) -> Result<CmEvent, RdmaError> {
        loop {
            let mut guard = self.afd().readable().await.map_err(|e| RdmaError::Sys {
                op: "wait for rdma_cm event",
                source: e,
            })?;
            match self.try_event()? {
                Some(ev) => return Ok(ev),
                None => guard.clear_ready(),
            }
        }
    }

    async fn expect(
        &self,
        want: sys::rdma_cm_event_type::Type,
        what: &str,
    ) -> Result<CmEvent, RdmaError> {
        let ev = tokio::time::timeout(ESTABLISH_TIMEOUT, self.next_event())
            .await
            .map_err(|_| RdmaError::Timeout(format!("waiting for {what}")))??;
        if ev.kind == want {
            Ok(ev)
        } else {
            Err(RdmaError::Sys {
                op: "rdma_cm",
                source: io::Error::other(format!(
                    "expected {} during {what}, got {} (status {})",
                    event_name(want),
                    event_name(ev.kind),
                    ev.status
                )),
            })
        }
    }
}

impl Drop for CmChannel {
    fn drop(&mut self) {
        // Deregister from tokio before the fd is closed by librdmacm.
        drop(self.afd.take());
        // SAFETY: every id on this channel was destroyed or migrated before (owners drop ids
        // before their channel).
        unsafe { sys::rdma_destroy_event_channel(self.ch) };
    }
}

// ---------------------------------------------------------------------------------------------
// Private data: where our receive ring is

// (RingInfo, its encoding and validation live in `rdma_meta`: pure, fuzzed without verbs.)

impl From<MetaError> for RdmaError {
    fn from(e: MetaError) -> Self {
        RdmaError::Protocol(e.0)
    }
}

/// Connection parameters carrying our ring description. RNR retries are few on purpose: the
/// credit scheme makes RNR impossible, so one would be a bug to surface, not to wait out.
fn conn_param(private: &[u8; RingInfo::LEN]) -> sys::rdma_conn_param {
    // SAFETY: rdma_conn_param is plain data; all-zero is valid.
    let mut p: sys::rdma_conn_param = unsafe { std::mem::zeroed() };
    p.private_data = private.as_ptr() as *const c_void;
    p.private_data_len = private.len() as u8;
    p.retry_count = 7;
    p.rnr_retry_count = 3;
    p.flow_control = 1;
    p
}

// ---------------------------------------------------------------------------------------------
// Immediate data: [ctrl polled mod 256 | slots released mod 256 | len-1 or flags]

// (imm_encode, imm_decode and advance live in `rdma_meta`.)

// ---------------------------------------------------------------------------------------------
// Verbs resources of one connection

/// Every resource of one connection. Fields are created in order and torn down in reverse by
/// `Drop`, whatever subset exists (so a half-built connection cleans up on any error path).
struct Res {
    id: *mut sys::rdma_cm_id,
    pd: *mut sys::ibv_pd,
    comp: *mut sys::ibv_comp_channel,
    comp_afd: Option<AsyncFd<RawFd>>,
    cq: *mut sys::ibv_cq,
    qp: bool,
    recv_mr: *mut sys::ibv_mr,
    send_mr: *mut sys::ibv_mr,
    /// Registered memory: never resized or moved while an MR covers it (boxed slices don't move).
    recv_buf: Box<[u8]>,
    send_buf: Box<[u8]>,
    max_inline: u32,
    connected: bool,
    /// Owns the channel `id` reports to; dropped after `id` is destroyed.
    cm: Option<CmChannel>,
}

// SAFETY: the verbs/rdma_cm objects are thread-safe handles (libibverbs and librdmacm lock
// internally); this struct is only ever used through `&mut` (one thread at a time).
unsafe impl Send for Res {}
// SAFETY: as above; shared references never touch the raw handles.
unsafe impl Sync for Res {}

impl Res {
    fn empty(id: *mut sys::rdma_cm_id, cm: Option<CmChannel>) -> Self {
        Res {
            id,
            pd: null_mut(),
            comp: null_mut(),
            comp_afd: None,
            cq: null_mut(),
            qp: false,
            recv_mr: null_mut(),
            send_mr: null_mut(),
            recv_buf: Box::new([]),
            send_buf: Box::new([]),
            max_inline: 0,
            connected: false,
            cm,
        }
    }

    /// Creates PD, completion channel, CQ, QP and both rings on the id's device, and posts the
    /// receives. The id must have a device (`verbs` set: route resolved or connect request).
    fn build(&mut self) -> Result<(), RdmaError> {
        // SAFETY: id is a valid cm id; its verbs context is set after route resolution/request.
        let verbs = unsafe { (*self.id).verbs };
        if verbs.is_null() {
            return Err(RdmaError::NoDevice(
                "the address is not bound to an RDMA device".into(),
            ));
        }
        // SAFETY: (whole block) each call gets valid handles created just before; failures are
        // null/non-zero returns with errno set, and the partial state is torn down by Drop.
        unsafe {
            self.pd = sys::ibv_alloc_pd(verbs);
            if self.pd.is_null() {
                return Err(RdmaError::sys("ibv_alloc_pd"));
            }
            self.comp = sys::ibv_create_comp_channel(verbs);
            if self.comp.is_null() {
                return Err(RdmaError::sys("ibv_create_comp_channel"));
            }
            let fd = (*self.comp).fd;
            // The fd belongs to `comp`, destroyed only after comp_afd is dropped (see Drop).
            self.comp_afd = Some(register(fd, "register completion channel fd")?);
            let cqe = (2 * (SLOTS + CTRL) + 16) as i32;
            self.cq = sys::ibv_create_cq(verbs, cqe, null_mut(), self.comp, 0);
            if self.cq.is_null() {
                return Err(RdmaError::sys("ibv_create_cq"));
            }
            let mut attr: sys::ibv_qp_init_attr = std::mem::zeroed();
            attr.send_cq = self.cq;
            attr.recv_cq = self.cq;
            attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
            attr.sq_sig_all = 0;
            attr.cap.max_send_wr = SLOTS + CTRL + 2;
            attr.cap.max_recv_wr = SLOTS + CTRL;
            attr.cap.max_send_sge = 1;
            attr.cap.max_recv_sge = 1;
            attr.cap.max_inline_data = 256;
            if sys::rdma_create_qp(self.id, self.pd, &mut attr) != 0 {
                // Some devices have no inline support: retry without.
                attr.cap.max_inline_data = 0;
                if sys::rdma_create_qp(self.id, self.pd, &mut attr) != 0 {
                    return Err(RdmaError::sys("rdma_create_qp"));
                }
            }
            self.qp = true;
            self.max_inline = attr.cap.max_inline_data;

            self.recv_buf = vec![0u8; SLOTS as usize * SLOT_SIZE].into_boxed_slice();
            self.send_buf = vec![0u8; SLOTS as usize * SLOT_SIZE].into_boxed_slice();
            let local = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
            let remote = sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            self.recv_mr = sys::ibv_reg_mr(
                self.pd,
                self.recv_buf.as_mut_ptr() as *mut c_void,
                self.recv_buf.len(),
                (local | remote) as i32,
            );
            if self.recv_mr.is_null() {
                return Err(RdmaError::sys("ibv_reg_mr(receive ring)"));
            }
            self.send_mr = sys::ibv_reg_mr(
                self.pd,
                self.send_buf.as_mut_ptr() as *mut c_void,
                self.send_buf.len(),
                local as i32,
            );
            if self.send_mr.is_null() {
                return Err(RdmaError::sys("ibv_reg_mr(send slots)"));
            }
            for _ in 0..SLOTS + CTRL {
                self.post_recv()?;
            }
            let rc = sys::ibv_req_notify_cq(self.cq, 0);
            if rc != 0 {
                return Err(RdmaError::errno("ibv_req_notify_cq", rc));
            }
        }
        Ok(())
    }

    fn ring_info(&self) -> RingInfo {
        RingInfo {
            addr: self.recv_buf.as_ptr() as u64,
            // SAFETY: recv_mr is valid after build().
            rkey: unsafe { (*self.recv_mr).rkey },
            slots: SLOTS,
            slot_size: SLOT_SIZE as u32,
            ctrl: CTRL,
        }
    }

    fn qp_ptr(&self) -> *mut sys::ibv_qp {
        // SAFETY: id valid; qp set by rdma_create_qp.
        unsafe { (*self.id).qp }
    }

    /// Posts one buffer-less receive: it only absorbs a WRITE_WITH_IMM or a zero-length SEND.
    fn post_recv(&mut self) -> Result<(), RdmaError> {
        // SAFETY: the WR lives on the stack for the duration of the call (the provider copies it);
        // no SGE, so no memory is handed to the device.
        unsafe {
            let mut wr: sys::ibv_recv_wr = std::mem::zeroed();
            wr.wr_id = WR_RECV;
            wr.num_sge = 0;
            let mut bad: *mut sys::ibv_recv_wr = null_mut();
            let rc = sys::ibv_post_recv(self.qp_ptr(), &mut wr, &mut bad);
            if rc != 0 {
                return Err(RdmaError::errno("ibv_post_recv", rc));
            }
        }
        Ok(())
    }

    /// Blocking drain used only on drop: waits (bounded) until `outstanding` sends completed.
    fn drain_sends(&mut self, mut outstanding: u32) {
        if !self.qp || self.cq.is_null() {
            return;
        }
        let start = Instant::now();
        let mut wc: [MaybeUninit<sys::ibv_wc>; 16] = [const { MaybeUninit::uninit() }; 16];
        while outstanding > 0 && start.elapsed() < DRAIN_ON_DROP {
            // SAFETY: cq valid; wc has room for 16 entries; poll_cq initialises what it returns.
            let n = unsafe { sys::ibv_poll_cq(self.cq, 16, wc.as_mut_ptr() as *mut sys::ibv_wc) };
            if n < 0 {
                return;
            }
            for w in &wc[..n as usize] {
                // SAFETY: the first n entries were written by ibv_poll_cq.
                let w = unsafe { w.assume_init_ref() };
                if w.wr_id != WR_RECV {
                    outstanding -= 1;
                    if w.status != sys::ibv_wc_status::IBV_WC_SUCCESS {
                        return;
                    }
                }
            }
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl Drop for Res {
    fn drop(&mut self) {
        // SAFETY: teardown in reverse creation order; each handle is either null/false (never
        // created) or valid and owned solely by us. Completion events are acknowledged as they
        // are read, so ibv_destroy_cq cannot block on unacknowledged events.
        unsafe {
            if self.connected {
                sys::rdma_disconnect(self.id);
            }
            if self.qp {
                sys::rdma_destroy_qp(self.id);
            }
            if !self.send_mr.is_null() {
                sys::ibv_dereg_mr(self.send_mr);
            }
            if !self.recv_mr.is_null() {
                sys::ibv_dereg_mr(self.recv_mr);
            }
            if !self.cq.is_null() {
                sys::ibv_destroy_cq(self.cq);
            }
            drop(self.comp_afd.take());
            if !self.comp.is_null() {
                sys::ibv_destroy_comp_channel(self.comp);
            }
            if !self.pd.is_null() {
                sys::ibv_dealloc_pd(self.pd);
            }
            if !self.id.is_null() {
                sys::rdma_destroy_id(self.id);
            }
        }
        drop(self.cm.take());
    }
}

// ---------------------------------------------------------------------------------------------
// Waking: the reader and the writer half may wait in different tasks

#[derive(Default)]
struct Wakers {
    read: Mutex<Option<Waker>>,
    write: Mutex<Option<Waker>>,
}

impl Wakers {
    fn set(slot: &Mutex<Option<Waker>>, w: &Waker) {
        let mut g = crate::sync::lock(slot);
        match &*g {
            Some(old) if old.will_wake(w) => {}
            _ => *g = Some(w.clone()),
        }
    }
    fn wake(slot: &Mutex<Option<Waker>>) {
        let w = crate::sync::lock(slot).take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        Wakers::wake(&self.read);
        Wakers::wake(&self.write);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Read,
    Write,
}

enum RxItem {
    Data(u32),
    Fin,
}

// ---------------------------------------------------------------------------------------------
// The stream

/// One RDMA connection as a byte stream (see the module docs for the protocol).
pub struct RdmaStream {
    res: Res,
    peer: RingInfo,
    peer_addr: String,
    wakers: Arc<Wakers>,
    poll_mode: bool,
    armed: bool,

    // receive side
    rx: VecDeque<RxItem>,
    rx_off: usize,
    rx_data_index: u32,
    released: u32,
    released_reported: u32,
    ctrl_polled: u32,
    ctrl_polled_reported: u32,

    // send side
    tx_data: u32,
    tx_data_done: u32,
    peer_released: u32,
    ctrl_sent: u32,
    peer_ctrl_polled: u32,
    sq_posted: u32,
    sq_done: u32,
    fin_sent: bool,

    disconnected: bool,
    dead: Option<String>,
}

impl RdmaStream {
    fn new(res: Res, peer: RingInfo, peer_addr: String) -> Self {
        RdmaStream {
            res,
            peer,
            peer_addr,
            wakers: Arc::new(Wakers::default()),
            poll_mode: std::env::var("OFFLOAD_RDMA_POLL").is_ok_and(|v| v == "1"),
            armed: true,
            rx: VecDeque::new(),
            rx_off: 0,
            rx_data_index: 0,
            released: 0,
            released_reported: 0,
            ctrl_polled: 0,
            ctrl_polled_reported: 0,
            tx_data: 0,
            tx_data_done: 0,
            peer_released: 0,
            ctrl_sent: 0,
            peer_ctrl_polled: 0,
            sq_posted: 0,
            sq_done: 0,
            fin_sent: false,
            disconnected: false,
            dead: None,
        }
    }

    /// Dials `addr` (an IP address of the peer's RDMA device and its rdma_cm port).
    pub async fn connect(addr: SocketAddr) -> Result<Self, RdmaError> {
        let mut res = {
            let cm = CmChannel::new()?;
            let mut id: *mut sys::rdma_cm_id = null_mut();
            // SAFETY: cm.ch is valid; the new id is owned by `res` from here on.
            if unsafe {
                sys::rdma_create_id(
                    cm.ch,
                    &mut id,
                    null_mut(),
                    sys::rdma_port_space::RDMA_PS_TCP,
                )
            } != 0
            {
                return Err(RdmaError::sys("rdma_create_id"));
            }
            Res::empty(id, Some(cm))
        };
        let rc = {
            let mut dst = sockaddr_of(addr);
            // SAFETY: id valid; dst outlives the call (librdmacm copies the address).
            unsafe {
                sys::rdma_resolve_addr(
                    res.id,
                    null_mut(),
                    &mut dst as *mut _ as *mut libc::sockaddr,
                    RESOLVE_TIMEOUT_MS,
                )
            }
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(RdmaError::Unreachable {
                addr,
                reason: format!("rdma_resolve_addr: {e}"),
            });
        }
        let cmch = res.cm.as_ref().expect("connect owns its channel");
        let ev = tokio::time::timeout(ESTABLISH_TIMEOUT, cmch.next_event())
            .await
            .map_err(|_| RdmaError::Timeout(format!("resolving {addr}")))??;
        if ev.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED {
            return Err(RdmaError::Unreachable {
                addr,
                reason: format!(
                    "{} ({}): no RDMA device routes to this address",
                    event_name(ev.kind),
                    io::Error::from_raw_os_error(ev.status.abs())
                ),
            });
        }
        // SAFETY: id valid.
        if unsafe { sys::rdma_resolve_route(res.id, RESOLVE_TIMEOUT_MS) } != 0 {
            return Err(RdmaError::sys("rdma_resolve_route"));
        }
        let ev = tokio::time::timeout(ESTABLISH_TIMEOUT, cmch.next_event())
            .await
            .map_err(|_| RdmaError::Timeout(format!("resolving a route to {addr}")))??;
        if ev.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED {
            return Err(RdmaError::Unreachable {
                addr,
                reason: format!("{} (status {})", event_name(ev.kind), ev.status),
            });
        }
        res.build()?;
        let mine = res.ring_info().encode();
        // SAFETY: id has a QP; the parameters (and `mine`) live for the call.
        if unsafe { sys::rdma_connect(res.id, &mut conn_param(&mine)) } != 0 {
            return Err(RdmaError::sys("rdma_connect"));
        }
        let cmch = res.cm.as_ref().expect("connect owns its channel");
        let ev = tokio::time::timeout(ESTABLISH_TIMEOUT, cmch.next_event())
            .await
            .map_err(|_| RdmaError::Timeout(format!("connecting to {addr}")))??;
        match ev.kind {
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => {}
            sys::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED => {
                // A consumer reject carries our message; an empty (all-zero) one means no
                // listener on that port.
                let msg = String::from_utf8_lossy(&ev.private)
                    .trim_end_matches('\0')
                    .to_string();
                return Err(if msg.is_empty() {
                    RdmaError::Refused { addr }
                } else {
                    RdmaError::Unreachable {
                        addr,
                        reason: format!("rejected by the peer: {msg}"),
                    }
                });
            }
            other => {
                return Err(RdmaError::Unreachable {
                    addr,
                    reason: format!("{} (status {})", event_name(other), ev.status),
                })
            }
        }
        res.connected = true;
        let peer = RingInfo::decode(&ev.private)?;
        Ok(RdmaStream::new(res, peer, format!("rdma:{addr}")))
    }

    /// The peer, for logs.
    pub fn peer_addr(&self) -> &str {
        &self.peer_addr
    }

    /// Polls the CQ and the CM channel, processes everything, and leaves both fds armed with the
    /// shared waker so whichever half waits is woken. Returns Err only for fatal local errors.
    fn progress(&mut self, cx: &mut Context<'_>, side: Side) {
        match side {
            Side::Read => Wakers::set(&self.wakers.read, cx.waker()),
            Side::Write => Wakers::set(&self.wakers.write, cx.waker()),
        }
        bump(&counters::PROGRESS, 1);
        let shared = Waker::from(self.wakers.clone());
        let mut scx = Context::from_waker(&shared);
        let mut worked = false;
        loop {
            worked |= self.drain_cq();
            if self.poll_mode {
                self.poll_cm();
                if !worked {
                    cx.waker().wake_by_ref();
                }
                break;
            }
            if !self.armed {
                // SAFETY: cq valid. Arm, then poll again to catch completions that raced the arm.
                let rc = unsafe { sys::ibv_req_notify_cq(self.res.cq, 0) };
                if rc != 0 {
                    self.fail(format!(
                        "ibv_req_notify_cq: {}",
                        io::Error::from_raw_os_error(rc)
                    ));
                    break;
                }
                self.armed = true;
                continue;
            }
            let comp = self.res.comp;
            let Some(afd) = self.res.comp_afd.as_ref() else {
                break;
            };
            match afd.poll_read_ready(&mut scx) {
                Poll::Ready(Ok(mut guard)) => {
                    // Clear first, then drain: an event arriving after the drain re-triggers.
                    guard.clear_ready();
                    loop {
                        let mut cq: *mut sys::ibv_cq = null_mut();
                        let mut ctx: *mut c_void = null_mut();
                        // SAFETY: comp valid and non-blocking; each event read is acked at once.
                        let rc = unsafe { sys::ibv_get_cq_event(comp, &mut cq, &mut ctx) };
                        if rc != 0 {
                            break;
                        }
                        // SAFETY: cq is ours (the only CQ on this channel).
                        unsafe { sys::ibv_ack_cq_events(cq, 1) };
                        bump(&counters::CQ_EVENTS, 1);
                        self.armed = false;
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    self.fail(format!("completion channel: {e}"));
                    break;
                }
                Poll::Pending => {}
            }
            // CQ drained and armed: look at the CM channel (disconnects) last, so completions of
            // data that arrived before the peer went away are processed first.
            let mut cm_changed = false;
            loop {
                let ready = match self.res.cm.as_ref() {
                    Some(cm) => match cm.afd().poll_read_ready(&mut scx) {
                        Poll::Ready(Ok(mut g)) => {
                            g.clear_ready();
                            true
                        }
                        _ => false,
                    },
                    None => false,
                };
                if !ready {
                    break;
                }
                let before = self.disconnected;
                self.poll_cm();
                cm_changed |= self.disconnected != before;
            }
            if cm_changed {
                worked = true;
                continue;
            }
            break;
        }
        if worked {
            // The other half may be waiting for exactly what was just processed.
            match side {
                Side::Read => Wakers::wake(&self.wakers.write),
                Side::Write => Wakers::wake(&self.wakers.read),
            }
        }
    }

    fn poll_cm(&mut self) {
        loop {
            let ev = match self.res.cm.as_ref().map(|c| c.try_event()) {
                Some(Ok(Some(ev))) => ev,
                Some(Ok(None)) | None => return,
                Some(Err(e)) => {
                    self.fail(e.to_string());
                    return;
                }
            };
            match ev.kind {
                sys::rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED
                | sys::rdma_cm_event_type::RDMA_CM_EVENT_DEVICE_REMOVAL
                | sys::rdma_cm_event_type::RDMA_CM_EVENT_TIMEWAIT_EXIT => {
                    tracing::debug!(peer = %self.peer_addr, event = %event_name(ev.kind), "rdma peer gone");
                    self.on_disconnect();
                }
                other => {
                    tracing::debug!(peer = %self.peer_addr, event = %event_name(other), "rdma cm event")
                }
            }
        }
    }

    fn on_disconnect(&mut self) {
        if !self.disconnected {
            self.disconnected = true;
            if self.res.connected {
                // SAFETY: id valid; moves the QP to error so outstanding WRs flush.
                unsafe { sys::rdma_disconnect(self.res.id) };
                self.res.connected = false;
            }
        }
    }

    fn fail(&mut self, why: String) {
        if self.dead.is_none() {
            tracing::debug!(peer = %self.peer_addr, %why, "rdma link failed");
            self.dead = Some(why);
        }
    }

    /// Polls every available completion; true if any was processed.
    fn drain_cq(&mut self) -> bool {
        let mut any = false;
        let mut wc: [MaybeUninit<sys::ibv_wc>; 16] = [const { MaybeUninit::uninit() }; 16];
        loop {
            // SAFETY: cq valid; wc has room for 16; the first n entries are initialised by the call.
            let n =
                unsafe { sys::ibv_poll_cq(self.res.cq, 16, wc.as_mut_ptr() as *mut sys::ibv_wc) };
            bump(&counters::CQ_POLLS, 1);
            if n < 0 {
                self.fail("ibv_poll_cq failed".into());
                return any;
            }
            if n == 0 {
                return any;
            }
            any = true;
            bump(&counters::COMPLETIONS, n as u64);
            for w in &wc[..n as usize] {
                // SAFETY: initialised by ibv_poll_cq (see above).
                let w = unsafe { w.assume_init_ref() };
                self.on_completion(w);
            }
        }
    }

    fn on_completion(&mut self, w: &sys::ibv_wc) {
        if w.wr_id != WR_RECV {
            self.sq_done = self.sq_done.wrapping_add(1);
            if w.wr_id == WR_DATA {
                self.tx_data_done = self.tx_data_done.wrapping_add(1);
            }
        }
        if w.status != sys::ibv_wc_status::IBV_WC_SUCCESS {
            if w.status == sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                // The QP went to error (disconnect): outstanding requests are flushed.
                self.on_disconnect();
            } else {
                let why = match w.status {
                    sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR => {
                        "peer unreachable (transport retries exceeded)".to_string()
                    }
                    sys::ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => {
                        "peer had no receive posted (RNR retries exceeded)".to_string()
                    }
                    s => format!(
                        "work completion failed with status {s} (vendor error {})",
                        w.vendor_err
                    ),
                };
                self.fail(why);
                self.on_disconnect();
            }
            return;
        }
        if w.wr_id != WR_RECV {
            return;
        }
        // A receive: repost at once (the credit scheme bounds how many can be outstanding).
        if let Err(e) = self.res.post_recv() {
            self.fail(e.to_string());
            return;
        }
        if w.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 == 0 {
            self.fail("receive without immediate data".into());
            return;
        }
        // SAFETY: IBV_WC_WITH_IMM set, so the union holds imm_data (network byte order).
        let imm = u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data });
        let (ctrl_polled, released, low) = imm_decode(imm);
        advance(&mut self.peer_ctrl_polled, ctrl_polled);
        advance(&mut self.peer_released, released);
        match w.opcode {
            sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => {
                let len = low + 1;
                let queued = self
                    .rx
                    .iter()
                    .filter(|i| matches!(i, RxItem::Data(_)))
                    .count() as u32;
                if len as usize > SLOT_SIZE || queued >= SLOTS {
                    self.fail(format!(
                        "peer overran the receive ring (len {len}, queued {queued})"
                    ));
                    return;
                }
                self.rx.push_back(RxItem::Data(len));
            }
            sys::ibv_wc_opcode::IBV_WC_RECV => {
                self.ctrl_polled = self.ctrl_polled.wrapping_add(1);
                if low & FLAG_FIN != 0 {
                    self.rx.push_back(RxItem::Fin);
                }
                self.maybe_send_ctrl(false);
            }
            op => self.fail(format!("unexpected receive opcode {op}")),
        }
    }

    fn sq_room(&self) -> bool {
        self.sq_posted.wrapping_sub(self.sq_done) < SLOTS + CTRL
    }

    fn ctrl_room(&self) -> bool {
        self.ctrl_sent.wrapping_sub(self.peer_ctrl_polled) < self.peer.ctrl && self.sq_room()
    }

    fn data_room(&self) -> bool {
        let slots = self.peer.slots.min(SLOTS);
        self.tx_data.wrapping_sub(self.peer_released) < slots
            && self.tx_data.wrapping_sub(self.tx_data_done) < SLOTS
            && self.sq_room()
    }

    /// Sends a control message if credits or polled-control reports are due (or `fin`).
    /// Returns false if one was due but could not be sent yet.
    fn maybe_send_ctrl(&mut self, fin: bool) -> bool {
        let due = fin
            || self.released.wrapping_sub(self.released_reported) >= CREDIT_BATCH
            || self.ctrl_polled.wrapping_sub(self.ctrl_polled_reported) >= CTRL_BATCH;
        if !due || self.disconnected || self.dead.is_some() {
            return true;
        }
        if !self.ctrl_room() {
            return false;
        }
        let imm = imm_encode(
            self.ctrl_polled,
            self.released,
            if fin { FLAG_FIN } else { 0 },
        );
        // SAFETY: zero-length SEND_WITH_IMM; the WR is copied by the provider during the call.
        let rc = unsafe {
            let mut wr: sys::ibv_send_wr = std::mem::zeroed();
            wr.wr_id = WR_CTRL;
            wr.num_sge = 0;
            wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            let mut bad: *mut sys::ibv_send_wr = null_mut();
            sys::ibv_post_send(self.res.qp_ptr(), &mut wr, &mut bad)
        };
        if rc != 0 {
            self.fail(format!(
                "ibv_post_send(control): {}",
                io::Error::from_raw_os_error(rc)
            ));
            return true;
        }
        self.sq_posted = self.sq_posted.wrapping_add(1);
        self.ctrl_sent = self.ctrl_sent.wrapping_add(1);
        bump(&counters::CTRL, 1);
        self.released_reported = self.released;
        self.ctrl_polled_reported = self.ctrl_polled;
        if fin {
            self.fin_sent = true;
        }
        true
    }

    /// Posts one RDMA_WRITE_WITH_IMM of `data` (≤ one slot) into the peer's next slot.
    fn send_data(&mut self, data: &[u8]) -> io::Result<()> {
        let peer_slot = (self.tx_data % self.peer.slots) as u64;
        let local_slot = (self.tx_data % SLOTS) as usize;
        let inline = data.len() <= self.res.max_inline as usize;
        let imm = imm_encode(self.ctrl_polled, self.released, data.len() as u32 - 1);
        let addr = if inline {
            data.as_ptr() as u64
        } else {
            let off = local_slot * SLOT_SIZE;
            // Only this staging slot's previous write is complete (data_room checked
            // tx_data - tx_data_done < SLOTS), so the device no longer reads it.
            self.res.send_buf[off..off + data.len()].copy_from_slice(data);
            self.res.send_buf[off..].as_ptr() as u64
        };
        // SAFETY: the SGE points either at `data` (inline: the provider copies it during the call)
        // or at a registered send slot that stays untouched until this write completes; the remote
        // range lies inside the peer's advertised ring (slot < peer.slots, len ≤ slot_size).
        let rc = unsafe {
            let mut sge = sys::ibv_sge {
                addr,
                length: data.len() as u32,
                lkey: (*self.res.send_mr).lkey,
            };
            let mut wr: sys::ibv_send_wr = std::mem::zeroed();
            wr.wr_id = WR_DATA;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0
                | if inline {
                    sys::ibv_send_flags::IBV_SEND_INLINE.0
                } else {
                    0
                };
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            wr.wr.rdma = sys::rdma_t {
                remote_addr: self.peer.addr + peer_slot * self.peer.slot_size as u64,
                rkey: self.peer.rkey,
            };
            let mut bad: *mut sys::ibv_send_wr = null_mut();
            sys::ibv_post_send(self.res.qp_ptr(), &mut wr, &mut bad)
        };
        if rc != 0 {
            let e = io::Error::from_raw_os_error(rc);
            self.fail(format!("ibv_post_send(write): {e}"));
            return Err(e);
        }
        self.sq_posted = self.sq_posted.wrapping_add(1);
        self.tx_data = self.tx_data.wrapping_add(1);
        bump(&counters::WRITES, 1);
        self.released_reported = self.released;
        self.ctrl_polled_reported = self.ctrl_polled;
        Ok(())
    }

    fn dead_error(&self) -> Option<io::Error> {
        self.dead
            .as_ref()
            .map(|d| io::Error::new(io::ErrorKind::ConnectionReset, format!("rdma: {d}")))
    }
}

impl AsyncRead for RdmaStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        me.progress(cx, Side::Read);
        match me.rx.front() {
            Some(RxItem::Data(len)) => {
                let len = *len as usize;
                let slot = (me.rx_data_index % SLOTS) as usize;
                let start = slot * SLOT_SIZE + me.rx_off;
                let n = (len - me.rx_off).min(buf.remaining());
                // The device wrote this slot before the completion we polled; the sender will not
                // write it again until we report it released below.
                buf.put_slice(&me.res.recv_buf[start..start + n]);
                me.rx_off += n;
                if me.rx_off == len {
                    me.rx.pop_front();
                    me.rx_off = 0;
                    me.rx_data_index = me.rx_data_index.wrapping_add(1);
                    me.released = me.released.wrapping_add(1);
                    if !me.maybe_send_ctrl(false) {
                        // No control credit right now; the report goes out with the next
                        // message or once the peer reports our control messages polled.
                        tracing::trace!("credit return deferred");
                    }
                }
                Poll::Ready(Ok(()))
            }
            Some(RxItem::Fin) => Poll::Ready(Ok(())),
            None => {
                if let Some(e) = me.dead_error() {
                    return Poll::Ready(Err(e));
                }
                if me.disconnected {
                    // Peer closed: end of stream.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for RdmaStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        me.progress(cx, Side::Write);
        if let Some(e) = me.dead_error() {
            return Poll::Ready(Err(e));
        }
        if me.disconnected || me.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("rdma: connection to {} is closed", me.peer_addr),
            )));
        }
        // Deferred credit reports first, so the peer never waits on us.
        me.maybe_send_ctrl(false);
        if !me.data_room() {
            return Poll::Pending;
        }
        let n = buf.len().min(SLOT_SIZE).min(me.peer.slot_size as usize);
        me.send_data(&buf[..n])?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write is posted immediately; nothing is buffered in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.progress(cx, Side::Write);
        if me.fin_sent {
            // Wait until the peer acknowledged everything we posted (including the FIN).
            if me.sq_posted == me.sq_done || me.disconnected || me.dead.is_some() {
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
        if let Some(e) = me.dead_error() {
            return Poll::Ready(Err(e));
        }
        if me.disconnected {
            return Poll::Ready(Ok(()));
        }
        if me.maybe_send_ctrl(true) && me.fin_sent {
            // Re-poll to wait for the acknowledgement (woken by the completion).
            me.progress(cx, Side::Write);
            if me.sq_posted == me.sq_done {
                return Poll::Ready(Ok(()));
            }
        }
        Poll::Pending
    }
}

/// The queue pair's send path (slots, credits, completions) is driven by the runtime only: a
/// session does not let callers write on it from their own threads.
impl crate::link::AsyncConn for RdmaStream {
    fn direct_write_ok(&self) -> bool {
        false
    }
}

impl Drop for RdmaStream {
    fn drop(&mut self) {
        // Give posted writes a moment to be acknowledged before the disconnect flushes them, so a
        // writer that drops right after its last write does not lose the tail.
        if !self.disconnected && self.dead.is_none() {
            let outstanding = self.sq_posted.wrapping_sub(self.sq_done);
            self.res.drain_sends(outstanding);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Listener

/// The bound listening id and its event channel (owned by the listener's accept task).
struct ListenCore {
    id: *mut sys::rdma_cm_id,
    cm: Option<CmChannel>,
}

// SAFETY: see `Res`; the id is only used by the task that owns the core.
unsafe impl Send for ListenCore {}

impl Drop for ListenCore {
    fn drop(&mut self) {
        // SAFETY: id valid and owned; destroyed before its channel.
        unsafe { sys::rdma_destroy_id(self.id) };
        drop(self.cm.take());
    }
}

/// A bound rdma_cm listener. Connection requests are completed concurrently by background
/// tasks (a slow or broken peer does not hold up the others); `accept` hands out the ones that
/// are established.
pub struct RdmaListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<Result<RdmaStream, RdmaError>>,
    task: tokio::task::JoinHandle<()>,
}

impl RdmaListener {
    /// Binds `addr` (the IP of a local RDMA device, or unspecified; port 0 picks one) and starts
    /// accepting in the background. Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        let cm = CmChannel::new()?;
        let mut id: *mut sys::rdma_cm_id = null_mut();
        // SAFETY: cm.ch valid; id is owned by the core from here on.
        if unsafe {
            sys::rdma_create_id(
                cm.ch,
                &mut id,
                null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        } != 0
        {
            return Err(RdmaError::sys("rdma_create_id"));
        }
        let core = ListenCore { id, cm: Some(cm) };
        let mut local = addr;
        let mut sa = sockaddr_of(addr);
        // SAFETY: id valid; sa outlives the call.
        if unsafe { sys::rdma_bind_addr(id, &mut sa as *mut _ as *mut libc::sockaddr) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EADDRINUSE) => RdmaError::AddrInUse { addr },
                Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV) => RdmaError::NoDevice(format!(
                    "no RDMA device has the address {} ({e})",
                    addr.ip()
                )),
                _ => RdmaError::Sys {
                    op: "rdma_bind_addr",
                    source: e,
                },
            });
        }
        // SAFETY: id bound.
        if unsafe { sys::rdma_listen(id, 128) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EADDRINUSE) => RdmaError::AddrInUse { addr },
                _ => RdmaError::Sys {
                    op: "rdma_listen",
                    source: e,
                },
            });
        }
        // SAFETY: id valid; returns the bound port in network order.
        let port = u16::from_be(unsafe { sys::rdma_get_src_port(id) });
        local.set_port(port);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(Self::accept_loop(core, tx));
        Ok(RdmaListener { local, ready, task })
    }

    async fn accept_loop(
        core: ListenCore,
        tx: tokio::sync::mpsc::Sender<Result<RdmaStream, RdmaError>>,
    ) {
        loop {
            let ev = match core.cm.as_ref() {
                Some(cm) => cm.next_event().await,
                None => return,
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if ev.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                tracing::debug!(event = %event_name(ev.kind), "rdma listener event");
                continue;
            }
            // The new id is ours now: `res` destroys it on any error.
            let (res, private) = {
                let CmEvent { id, private, .. } = ev;
                (Res::empty(id, None), private)
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match Self::complete(res, private).await {
                    // If the listener is gone, the stream is dropped (and torn down) here.
                    Ok(s) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "rdma: incoming connection failed"),
                }
            });
        }
    }

    /// The bound address (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next established connection. Requests that cannot be set up (bad private data,
    /// resource exhaustion, a peer that never completes) are rejected and logged, not returned.
    pub async fn accept_stream(&mut self) -> Result<RdmaStream, RdmaError> {
        match self.ready.recv().await {
            Some(r) => r,
            None => Err(RdmaError::Sys {
                op: "accept",
                source: io::Error::other("the RDMA listener's accept task ended"),
            }),
        }
    }

    async fn complete(mut res: Res, private: Vec<u8>) -> Result<RdmaStream, RdmaError> {
        // SAFETY: the new id is valid; rdma_get_peer_addr points into it.
        let peer = unsafe { sockaddr_to(sys::rdma_get_peer_addr(&*res.id)) }
            .map(|a| format!("rdma:{a}"))
            .unwrap_or_else(|| "rdma:?".into());
        let theirs = match RingInfo::decode(&private) {
            Ok(r) => r,
            Err(e) => {
                let e = RdmaError::from(e);
                let why = b"dpu-offload: bad private data";
                // SAFETY: id valid; the reject message is copied.
                unsafe { sys::rdma_reject(res.id, why.as_ptr() as *const c_void, why.len() as u8) };
                return Err(e);
            }
        };
        // Give the connection its own event channel so its events (established, disconnected)
        // are not mixed into the listener's.
        let cm = CmChannel::new()?;
        // SAFETY: the connect-request event was acknowledged, so the id can migrate.
        if unsafe { sys::rdma_migrate_id(res.id, cm.ch) } != 0 {
            return Err(RdmaError::sys("rdma_migrate_id"));
        }
        res.cm = Some(cm);
        if let Err(e) = res.build() {
            // SAFETY: id valid; tell the peer instead of letting it time out.
            unsafe { sys::rdma_reject(res.id, null_mut(), 0) };
            return Err(e);
        }
        let mine = res.ring_info().encode();
        // SAFETY: id has a QP; the parameters (and `mine`) live for the call.
        if unsafe { sys::rdma_accept(res.id, &mut conn_param(&mine)) } != 0 {
            return Err(RdmaError::sys("rdma_accept"));
        }
        res.connected = true;
        res.cm
            .as_ref()
            .expect("set above")
            .expect(
                sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
                "connection establishment",
            )
            .await?;
        Ok(RdmaStream::new(res, theirs, peer))
    }
}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        // The accept task owns the listening id; aborting it drops (and destroys) it.
        self.task.abort();
    }
}

#[async_trait]
impl Listener for RdmaListener {
    async fn accept(&mut self) -> Result<(Conn, String), TransportError> {
        let s = self.accept_stream().await?;
        let peer = s.peer_addr().to_string();
        Ok((Box::new(s), peer))
    }

    fn local_endpoint(&self) -> Endpoint {
        Endpoint::Rdma {
            host: self.local.ip().to_string(),
            port: self.local.port(),
        }
    }
}

// Unit tests of the ring description and immediate data: see `rdma_meta`.
