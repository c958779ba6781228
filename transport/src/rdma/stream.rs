//! [`RdmaStream`]: one connection as an `AsyncRead`/`AsyncWrite` byte stream. This is the thin
//! driver: it polls completions and CM events through [`super::verbs`], feeds them to the
//! [`Ring`] core, and posts exactly what the core allows. Waking is the only state of its own:
//! the reader and the writer half may wait in different tasks, and whichever of them makes
//! progress wakes the other.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use rdma_sys as sys;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ring::{CtrlStep, Geometry, Readable, Ring};
use super::verbs::{event_name, Res, Wc, WcKind, WcStatus};
use super::{bump, counters, RdmaError, CTRL, SLOTS, SLOT_SIZE};
use crate::rdma_meta::RingInfo;

/// Our ring's geometry (what [`Res::build`] registers and advertises).
const LOCAL: Geometry = Geometry {
    slots: SLOTS,
    slot_size: SLOT_SIZE as u32,
    ctrl: CTRL,
};

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

/// One RDMA connection as a byte stream (see the module docs of [`super`] for the protocol).
pub struct RdmaStream {
    res: Res,
    peer: RingInfo,
    peer_addr: String,
    ring: Ring,
    wakers: Arc<Wakers>,
    poll_mode: bool,
    armed: bool,
    wcs: Vec<Wc>,
    disconnected: bool,
    dead: Option<String>,
}

impl RdmaStream {
    pub(super) fn new(res: Res, peer: RingInfo, peer_addr: String) -> Self {
        RdmaStream {
            res,
            ring: Ring::new(LOCAL, Geometry::from(&peer)),
            peer,
            peer_addr,
            wakers: Arc::new(Wakers::default()),
            poll_mode: std::env::var("OFFLOAD_RDMA_POLL").is_ok_and(|v| v == "1"),
            armed: true,
            wcs: Vec::with_capacity(16),
            disconnected: false,
            dead: None,
        }
    }

    /// Dials `addr` (an IP address of the peer's RDMA device and its rdma_cm port).
    pub async fn connect(addr: SocketAddr) -> Result<Self, RdmaError> {
        let mut res = Res::outgoing()?;
        res.resolve_addr(addr)?;
        let ev = cm_of(&res)?
            .next_event_within(&format!("resolving {addr}"))
            .await?;
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
        res.resolve_route()?;
        let ev = cm_of(&res)?
            .next_event_within(&format!("resolving a route to {addr}"))
            .await?;
        if ev.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED {
            return Err(RdmaError::Unreachable {
                addr,
                reason: format!("{} (status {})", event_name(ev.kind), ev.status),
            });
        }
        res.build()?;
        res.connect()?;
        let ev = cm_of(&res)?
            .next_event_within(&format!("connecting to {addr}"))
            .await?;
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
        res.set_connected();
        let peer = RingInfo::decode(&ev.private)?;
        Ok(RdmaStream::new(res, peer, format!("rdma:{addr}")))
    }

    /// The peer, for logs.
    pub fn peer_addr(&self) -> &str {
        &self.peer_addr
    }

    /// Polls the CQ and the CM channel, processes everything, and leaves both fds armed with the
    /// shared waker so whichever half waits is woken. Fatal errors end up in `dead`.
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
                // Arm, then poll again to catch completions that raced the arm.
                if let Err(rc) = self.res.req_notify() {
                    self.fail(format!(
                        "ibv_req_notify_cq: {}",
                        io::Error::from_raw_os_error(rc)
                    ));
                    break;
                }
                self.armed = true;
                continue;
            }
            let Some(afd) = self.res.comp_afd() else {
                break;
            };
            match afd.poll_read_ready(&mut scx) {
                Poll::Ready(Ok(mut guard)) => {
                    // Clear first, then drain: an event arriving after the drain re-triggers.
                    guard.clear_ready();
                    let events = self.res.take_cq_events();
                    if events > 0 {
                        bump(&counters::CQ_EVENTS, u64::from(events));
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
                let ready = match self.res.channel() {
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
            let ev = match self.res.channel().map(|c| c.try_event()) {
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
            self.res.disconnect();
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
        let mut wcs = std::mem::take(&mut self.wcs);
        loop {
            let ok = self.res.poll_cq(&mut wcs);
            bump(&counters::CQ_POLLS, 1);
            if !ok {
                self.fail("ibv_poll_cq failed".into());
                break;
            }
            if wcs.is_empty() {
                break;
            }
            any = true;
            bump(&counters::COMPLETIONS, wcs.len() as u64);
            for w in wcs.drain(..) {
                self.on_completion(w);
            }
        }
        self.wcs = wcs;
        any
    }

    fn on_completion(&mut self, w: Wc) {
        match w.kind {
            WcKind::SentData => self.ring.on_sent(true),
            WcKind::SentCtrl => self.ring.on_sent(false),
            _ => {}
        }
        match w.status {
            WcStatus::Ok => {}
            WcStatus::Flushed => {
                // The QP went to error (disconnect): outstanding requests are flushed.
                self.on_disconnect();
                return;
            }
            WcStatus::Failed(why) => {
                self.fail(why);
                self.on_disconnect();
                return;
            }
        }
        if !w.kind.is_recv() {
            return;
        }
        // A receive: repost at once (the credit scheme bounds how many can be outstanding).
        if let Err(e) = self.res.post_recv() {
            self.fail(e.to_string());
            return;
        }
        let result = match w.kind {
            WcKind::RecvData(Some(imm)) => self.ring.on_recv_data(imm),
            WcKind::RecvCtrl(Some(imm)) => self.ring.on_recv_ctrl(imm).map(|()| {
                self.maybe_send_ctrl(false);
            }),
            WcKind::RecvData(None) | WcKind::RecvCtrl(None) => {
                self.fail("receive without immediate data".into());
                return;
            }
            WcKind::RecvOther(op) => {
                self.fail(format!("unexpected receive opcode {op}"));
                return;
            }
            WcKind::SentData | WcKind::SentCtrl => Ok(()),
        };
        if let Err(e) = result {
            self.fail(e.to_string());
        }
    }

    /// Sends a control message if credits or polled-control reports are due (or `fin`).
    /// Returns false if one was due but could not be sent yet.
    fn maybe_send_ctrl(&mut self, fin: bool) -> bool {
        if self.disconnected || self.dead.is_some() {
            return true;
        }
        match self.ring.next_ctrl(fin) {
            CtrlStep::NotDue => true,
            CtrlStep::Blocked => false,
            CtrlStep::Post(c) => {
                match self.res.post_ctrl(c.imm) {
                    Ok(()) => {
                        self.ring.ctrl_posted(c);
                        bump(&counters::CTRL, 1);
                    }
                    Err(e) => self.fail(format!("ibv_post_send(control): {e}")),
                }
                true
            }
        }
    }

    fn dead_error(&self) -> Option<io::Error> {
        self.dead
            .as_ref()
            .map(|d| io::Error::new(io::ErrorKind::ConnectionReset, format!("rdma: {d}")))
    }
}

/// The CM channel an outgoing connection owns (always set by [`Res::outgoing`]).
fn cm_of(res: &Res) -> Result<&super::verbs::CmChannel, RdmaError> {
    res.channel().ok_or_else(|| RdmaError::Sys {
        op: "rdma_cm",
        source: io::Error::other("connection has no event channel"),
    })
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
        match me.ring.readable() {
            Some(Readable::Data { at, len }) => {
                let n = len.min(buf.remaining());
                // The device wrote this slot before the completion we polled; the sender will not
                // write it again until we report it released below.
                buf.put_slice(&me.res.recv_ring()[at..at + n]);
                if me.ring.consume(n) && !me.maybe_send_ctrl(false) {
                    // No control credit right now; the report goes out with the next
                    // message or once the peer reports our control messages polled.
                    tracing::trace!("credit return deferred");
                }
                Poll::Ready(Ok(()))
            }
            Some(Readable::Fin) => Poll::Ready(Ok(())),
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
        if me.disconnected || me.ring.fin_sent() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("rdma: connection to {} is closed", me.peer_addr),
            )));
        }
        // Deferred credit reports first, so the peer never waits on us.
        me.maybe_send_ctrl(false);
        let Some(w) = me.ring.next_write(buf.len()) else {
            return Poll::Pending;
        };
        if let Err(e) =
            me.res
                .post_write(&buf[..w.len], w.local_slot, &me.peer, w.peer_offset, w.imm)
        {
            me.fail(format!("ibv_post_send(write): {e}"));
            return Poll::Ready(Err(e));
        }
        me.ring.write_posted(w);
        bump(&counters::WRITES, 1);
        Poll::Ready(Ok(w.len))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write is posted immediately; nothing is buffered in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.progress(cx, Side::Write);
        if me.ring.fin_sent() {
            // Wait until the peer acknowledged everything we posted (including the FIN).
            if me.ring.sends_outstanding() == 0 || me.disconnected || me.dead.is_some() {
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
        if me.maybe_send_ctrl(true) && me.ring.fin_sent() {
            // Re-poll to wait for the acknowledgement (woken by the completion).
            me.progress(cx, Side::Write);
            if me.ring.sends_outstanding() == 0 {
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
            let outstanding = self.ring.sends_outstanding();
            self.res.drain_sends(outstanding);
        }
    }
}
