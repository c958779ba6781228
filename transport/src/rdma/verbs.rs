//! The librdmacm / libibverbs calls of the RDMA link, each wrapped once: the rdma_cm event
//! channel ([`CmChannel`]), a listening id ([`ListenId`]), the resources of one connection
//! ([`Res`]: PD, CQ, QP, both rings) and the posting and polling verbs. Every `unsafe` of the
//! link lives in this file with the reason it is sound; the rest of [`super`] is safe code that
//! decides (in [`super::ring`]) and drives (in [`super::stream`], [`super::listen`]).

use std::ffi::{c_void, CStr};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use rdma_sys as sys;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{RdmaError, CTRL, DRAIN_ON_DROP, ESTABLISH_TIMEOUT, SLOTS, SLOT_SIZE};
use crate::rdma_meta::RingInfo;

const WR_RECV: u64 = 1;
const WR_DATA: u64 = 2;
const WR_CTRL: u64 = 3;

/// rdma_cm address/route resolution timeout.
const RESOLVE_TIMEOUT_MS: i32 = 3000;

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
/// `sa` must be null or point to a valid sockaddr of the family it names.
unsafe fn sockaddr_to(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: (whole block) the caller guarantees `sa` is a valid sockaddr; its family says
    // which larger structure it is.
    unsafe {
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
}

/// The name librdmacm gives an event kind, for errors and logs.
pub(super) fn event_name(kind: sys::rdma_cm_event_type::Type) -> String {
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
// rdma_cm event channel

/// What we keep of an rdma_cm event; the event itself is acknowledged at once (rdma_destroy_id
/// blocks until every event of an id is acknowledged, so none may be kept around).
pub(super) struct CmEvent {
    /// What happened.
    pub(super) kind: sys::rdma_cm_event_type::Type,
    /// The event's status (an errno or a CM reject reason).
    pub(super) status: i32,
    /// For a connect request: the new id, which the receiver of the event owns.
    id: *mut sys::rdma_cm_id,
    /// The peer's private data (connect requests, established and rejected events).
    pub(super) private: Vec<u8>,
}

// SAFETY: `id` is an opaque librdmacm handle, usable from any thread; the event owns no other
// foreign memory (the private data was copied).
unsafe impl Send for CmEvent {}

/// An rdma_cm event channel with its fd registered with tokio.
pub(super) struct CmChannel {
    afd: Option<AsyncFd<RawFd>>,
    ch: *mut sys::rdma_event_channel,
}

// SAFETY: an event channel is an fd plus librdmacm bookkeeping that is safe to use from any
// thread; reading events through `&self` concurrently is safe (the kernel queues them).
unsafe impl Send for CmChannel {}
// SAFETY: as above.
unsafe impl Sync for CmChannel {}

impl CmChannel {
    /// Opens a channel (fails with [`RdmaError::NoDevice`] where there is no RDMA CM).
    pub(super) fn new() -> Result<Self, RdmaError> {
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

    /// The channel's fd as registered with tokio.
    pub(super) fn afd(&self) -> &AsyncFd<RawFd> {
        // Invariant: afd is Some from construction until Drop.
        self.afd.as_ref().expect("cm channel fd registered")
    }

    /// A new TCP-port-space id reporting to this channel.
    fn create_id(&self) -> Result<*mut sys::rdma_cm_id, RdmaError> {
        let mut id: *mut sys::rdma_cm_id = null_mut();
        // SAFETY: ch is valid; the new id is owned by the caller from here on.
        if unsafe {
            sys::rdma_create_id(
                self.ch,
                &mut id,
                null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        } != 0
        {
            return Err(RdmaError::sys("rdma_create_id"));
        }
        Ok(id)
    }

    /// Non-blocking: the next event if one is queued.
    pub(super) fn try_event(&self) -> Result<Option<CmEvent>, RdmaError> {
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

    /// Waits for the next event.
    pub(super) async fn next_event(&self) -> Result<CmEvent, RdmaError> {
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

    /// The next event within [`ESTABLISH_TIMEOUT`] (`what` names the step for the error).
    pub(super) async fn next_event_within(&self, what: &str) -> Result<CmEvent, RdmaError> {
        tokio::time::timeout(ESTABLISH_TIMEOUT, self.next_event())
            .await
            .map_err(|_| RdmaError::Timeout(what.to_string()))?
    }

    /// The next event, which must be `want`.
    pub(super) async fn expect(
        &self,
        want: sys::rdma_cm_event_type::Type,
        what: &str,
    ) -> Result<CmEvent, RdmaError> {
        let ev = self
            .next_event_within(&format!("waiting for {what}"))
            .await?;
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
// Listening id

/// A bound, listening id and its event channel (owned by the listener's accept task).
pub(super) struct ListenId {
    id: *mut sys::rdma_cm_id,
    cm: Option<CmChannel>,
}

// SAFETY: see `Res`; the id is only used by the task that owns it.
unsafe impl Send for ListenId {}

impl ListenId {
    /// Binds `addr` and listens; returns the id and the port it got.
    pub(super) fn bind(addr: SocketAddr) -> Result<(ListenId, u16), RdmaError> {
        let cm = CmChannel::new()?;
        let id = cm.create_id()?;
        let me = ListenId { id, cm: Some(cm) };
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
        Ok((me, port))
    }

    /// The listening id's event channel (connect requests).
    pub(super) fn channel(&self) -> Option<&CmChannel> {
        self.cm.as_ref()
    }
}

impl Drop for ListenId {
    fn drop(&mut self) {
        // SAFETY: id valid and owned; destroyed before its channel.
        unsafe { sys::rdma_destroy_id(self.id) };
        drop(self.cm.take());
    }
}

// ---------------------------------------------------------------------------------------------
// Work completions, decoded

/// How a work request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WcStatus {
    /// Successfully.
    Ok,
    /// Flushed: the QP went to error (disconnect), outstanding requests are returned.
    Flushed,
    /// Failed; the text says why.
    Failed(String),
}

/// What completed (the verbs-free view the stream acts on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WcKind {
    /// One of our data writes.
    SentData,
    /// One of our control messages.
    SentCtrl,
    /// A peer's RDMA write with immediate landed in our ring.
    RecvData(Option<u32>),
    /// A peer's zero-length control SEND arrived.
    RecvCtrl(Option<u32>),
    /// A receive with an opcode the link never uses.
    RecvOther(u32),
}

impl WcKind {
    /// Whether a receive work request was consumed (and must be reposted).
    pub(super) fn is_recv(self) -> bool {
        !matches!(self, WcKind::SentData | WcKind::SentCtrl)
    }
}

/// One decoded work completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Wc {
    /// What completed.
    pub(super) kind: WcKind,
    /// How.
    pub(super) status: WcStatus,
}

fn decode_wc(w: &sys::ibv_wc) -> Wc {
    let status = match w.status {
        sys::ibv_wc_status::IBV_WC_SUCCESS => WcStatus::Ok,
        sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR => {
            WcStatus::Failed("peer unreachable (transport retries exceeded)".to_string())
        }
        sys::ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => {
            WcStatus::Failed("peer had no receive posted (RNR retries exceeded)".to_string())
        }
        s => WcStatus::Failed(format!(
            "work completion failed with status {s} (vendor error {})",
            w.vendor_err
        )),
    };
    let kind = match w.wr_id {
        WR_DATA => WcKind::SentData,
        WR_CTRL => WcKind::SentCtrl,
        _ => {
            let imm = (w.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0)
                // SAFETY: IBV_WC_WITH_IMM set, so the union holds imm_data (network order).
                .then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data }));
            match w.opcode {
                sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcKind::RecvData(imm),
                sys::ibv_wc_opcode::IBV_WC_RECV => WcKind::RecvCtrl(imm),
                op => WcKind::RecvOther(op),
            }
        }
    };
    Wc { kind, status }
}

// ---------------------------------------------------------------------------------------------
// Verbs resources of one connection

/// Every resource of one connection. Fields are created in order and torn down in reverse by
/// `Drop`, whatever subset exists (so a half-built connection cleans up on any error path).
pub(super) struct Res {
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

    /// A new outgoing id with its own event channel.
    pub(super) fn outgoing() -> Result<Self, RdmaError> {
        let cm = CmChannel::new()?;
        let id = cm.create_id()?;
        Ok(Res::empty(id, Some(cm)))
    }

    /// Takes over the id of a connect request (with the peer's private data); it reports to
    /// the listener's channel until [`Res::migrate`].
    pub(super) fn incoming(ev: CmEvent) -> Option<(Self, Vec<u8>)> {
        if ev.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST || ev.id.is_null() {
            return None;
        }
        Some((Res::empty(ev.id, None), ev.private))
    }

    /// The id's own event channel (set for outgoing ids and after [`Res::migrate`]).
    pub(super) fn channel(&self) -> Option<&CmChannel> {
        self.cm.as_ref()
    }

    /// Starts address resolution towards `addr` (completes with an event).
    pub(super) fn resolve_addr(&mut self, addr: SocketAddr) -> Result<(), RdmaError> {
        let mut dst = sockaddr_of(addr);
        // SAFETY: id valid; dst outlives the call (librdmacm copies the address).
        let rc = unsafe {
            sys::rdma_resolve_addr(
                self.id,
                null_mut(),
                &mut dst as *mut _ as *mut libc::sockaddr,
                RESOLVE_TIMEOUT_MS,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(RdmaError::Unreachable {
                addr,
                reason: format!("rdma_resolve_addr: {e}"),
            });
        }
        Ok(())
    }

    /// Starts route resolution (after the address resolved; completes with an event).
    pub(super) fn resolve_route(&mut self) -> Result<(), RdmaError> {
        // SAFETY: id valid.
        if unsafe { sys::rdma_resolve_route(self.id, RESOLVE_TIMEOUT_MS) } != 0 {
            return Err(RdmaError::sys("rdma_resolve_route"));
        }
        Ok(())
    }

    /// Sends the connect request carrying our ring (after [`Res::build`]).
    pub(super) fn connect(&mut self) -> Result<(), RdmaError> {
        let mine = self.ring_info().encode();
        // SAFETY: id has a QP; the parameters (and `mine`) live for the call.
        if unsafe { sys::rdma_connect(self.id, &mut conn_param(&mine)) } != 0 {
            return Err(RdmaError::sys("rdma_connect"));
        }
        Ok(())
    }

    /// Accepts a connect request, answering with our ring (after [`Res::build`]).
    pub(super) fn accept(&mut self) -> Result<(), RdmaError> {
        let mine = self.ring_info().encode();
        // SAFETY: id has a QP; the parameters (and `mine`) live for the call.
        if unsafe { sys::rdma_accept(self.id, &mut conn_param(&mine)) } != 0 {
            return Err(RdmaError::sys("rdma_accept"));
        }
        self.connected = true;
        Ok(())
    }

    /// Rejects a connect request, with `why` as the reject's private data.
    pub(super) fn reject(&mut self, why: &[u8]) {
        let len = u8::try_from(why.len()).unwrap_or(u8::MAX);
        let ptr = if why.is_empty() {
            std::ptr::null()
        } else {
            why.as_ptr() as *const c_void
        };
        // SAFETY: id valid; the message (at most `len` bytes of `why`) is copied during the call.
        unsafe { sys::rdma_reject(self.id, ptr, len) };
    }

    /// Moves the id's events onto a channel of its own, so they are not mixed into the
    /// listener's.
    pub(super) fn migrate(&mut self) -> Result<(), RdmaError> {
        let cm = CmChannel::new()?;
        // SAFETY: the connect-request event was acknowledged, so the id can migrate.
        if unsafe { sys::rdma_migrate_id(self.id, cm.ch) } != 0 {
            return Err(RdmaError::sys("rdma_migrate_id"));
        }
        self.cm = Some(cm);
        Ok(())
    }

    /// The connection is established (its teardown disconnects).
    pub(super) fn set_connected(&mut self) {
        self.connected = true;
    }

    /// The peer's address as the CM sees it.
    pub(super) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is valid; rdma_get_peer_addr points into it (a sockaddr of the family
        // it names) and is read before the id can go away.
        unsafe { sockaddr_to(sys::rdma_get_peer_addr(&*self.id)) }
    }

    /// Creates PD, completion channel, CQ, QP and both rings on the id's device, and posts the
    /// receives. The id must have a device (`verbs` set: route resolved or connect request).
    pub(super) fn build(&mut self) -> Result<(), RdmaError> {
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
        }
        for _ in 0..SLOTS + CTRL {
            self.post_recv()?;
        }
        self.req_notify()
            .map_err(|rc| RdmaError::errno("ibv_req_notify_cq", rc))
    }

    /// Our receive ring, as the peer needs to know it.
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

    /// The receive ring's bytes (the device writes slots the ring core has not handed out).
    pub(super) fn recv_ring(&self) -> &[u8] {
        &self.recv_buf
    }

    /// Posts one buffer-less receive: it only absorbs a WRITE_WITH_IMM or a zero-length SEND.
    pub(super) fn post_recv(&mut self) -> Result<(), RdmaError> {
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

    /// Posts a zero-length SEND_WITH_IMM (a control message).
    pub(super) fn post_ctrl(&mut self, imm: u32) -> io::Result<()> {
        // SAFETY: zero-length SEND_WITH_IMM; the WR is copied by the provider during the call.
        let rc = unsafe {
            let mut wr: sys::ibv_send_wr = std::mem::zeroed();
            wr.wr_id = WR_CTRL;
            wr.num_sge = 0;
            wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            let mut bad: *mut sys::ibv_send_wr = null_mut();
            sys::ibv_post_send(self.qp_ptr(), &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Posts one RDMA_WRITE_WITH_IMM of `data` to `offset` in the peer's ring `peer`. Small
    /// data goes inline; larger data is first copied into local send slot `slot`, whose
    /// previous write must have completed (the ring core allows at most `SLOTS` writes
    /// uncompleted, so slot `k % SLOTS` is free again when write `k` is allowed).
    ///
    /// The caller guarantees, through the ring core, that `offset + data.len()` lies inside the
    /// ring `peer` advertised: that is what lets the peer's memory be written safely.
    pub(super) fn post_write(
        &mut self,
        data: &[u8],
        slot: usize,
        peer: &RingInfo,
        offset: u64,
        imm: u32,
    ) -> io::Result<()> {
        let inline = data.len() <= self.max_inline as usize;
        let addr = if inline {
            data.as_ptr() as u64
        } else {
            let off = slot * SLOT_SIZE;
            let staging = self
                .send_buf
                .get_mut(off..off + data.len())
                .ok_or_else(|| io::Error::other("write larger than a send slot"))?;
            staging.copy_from_slice(data);
            staging.as_ptr() as u64
        };
        // SAFETY: the SGE points either at `data` (inline: the provider copies it during the call)
        // or at a registered send slot that stays untouched until this write completes; the remote
        // range lies inside the peer's advertised ring (see above).
        let rc = unsafe {
            let mut sge = sys::ibv_sge {
                addr,
                length: data.len() as u32,
                lkey: (*self.send_mr).lkey,
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
                remote_addr: peer.addr + offset,
                rkey: peer.rkey,
            };
            let mut bad: *mut sys::ibv_send_wr = null_mut();
            sys::ibv_post_send(self.qp_ptr(), &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Polls up to 16 completions into `out` (cleared first); false if polling failed.
    pub(super) fn poll_cq(&mut self, out: &mut Vec<Wc>) -> bool {
        out.clear();
        if self.cq.is_null() {
            return true;
        }
        let mut wc: [MaybeUninit<sys::ibv_wc>; 16] = [const { MaybeUninit::uninit() }; 16];
        // SAFETY: cq valid; wc has room for 16; the first n entries are initialised by the call.
        let n = unsafe { sys::ibv_poll_cq(self.cq, 16, wc.as_mut_ptr() as *mut sys::ibv_wc) };
        if n < 0 {
            return false;
        }
        for w in &wc[..n as usize] {
            // SAFETY: the first n entries were written by ibv_poll_cq.
            out.push(decode_wc(unsafe { w.assume_init_ref() }));
        }
        true
    }

    /// Asks for a completion event on the next completion; Err is the provider's errno.
    pub(super) fn req_notify(&mut self) -> Result<(), i32> {
        // SAFETY: cq valid after build().
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(())
    }

    /// The completion channel's fd as registered with tokio.
    pub(super) fn comp_afd(&self) -> Option<&AsyncFd<RawFd>> {
        self.comp_afd.as_ref()
    }

    /// Reads and acknowledges every queued completion event; how many there were.
    pub(super) fn take_cq_events(&mut self) -> u32 {
        let mut n = 0;
        if self.comp.is_null() {
            return 0;
        }
        loop {
            let mut cq: *mut sys::ibv_cq = null_mut();
            let mut ctx: *mut c_void = null_mut();
            // SAFETY: comp valid and non-blocking; each event read is acked at once.
            let rc = unsafe { sys::ibv_get_cq_event(self.comp, &mut cq, &mut ctx) };
            if rc != 0 {
                return n;
            }
            // SAFETY: cq is ours (the only CQ on this channel).
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
    }

    /// Moves the QP to error so outstanding work requests flush (once; later calls do nothing).
    pub(super) fn disconnect(&mut self) {
        if self.connected {
            // SAFETY: id valid and connected.
            unsafe { sys::rdma_disconnect(self.id) };
            self.connected = false;
        }
    }

    /// Blocking drain used only on drop: waits (bounded) until `outstanding` sends completed.
    pub(super) fn drain_sends(&mut self, mut outstanding: u32) {
        if !self.qp || self.cq.is_null() {
            return;
        }
        let start = Instant::now();
        let mut wcs = Vec::with_capacity(16);
        while outstanding > 0 && start.elapsed() < DRAIN_ON_DROP {
            if !self.poll_cq(&mut wcs) {
                return;
            }
            for w in &wcs {
                if !w.kind.is_recv() {
                    outstanding = outstanding.saturating_sub(1);
                    if w.status != WcStatus::Ok {
                        return;
                    }
                }
            }
            if wcs.is_empty() {
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
