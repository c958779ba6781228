//! The RDMA link's ring and credit rules, with no verbs, sockets or clocks: a state machine fed
//! with the completions the driver polls and asked what may be posted now (the same model as
//! [`crate::rules`] and [`crate::dispatch`]). The stream driver (`super::stream`) owns the
//! queue pair and the memory and does exactly what this core decides; the unit tests below wire
//! two cores together in memory.
//!
//! # The rules
//! Each side owns a receive ring of `slots` slots of `slot_size` bytes. Data message `k` of a
//! direction is one RDMA write into the peer's slot `k % peer.slots`, staged (when not inline)
//! in local send slot `k % local.slots`. Both directions count, cumulatively and mod 2³²:
//!
//! - **data credit**: a sender has at most `slots` messages the peer has not yet *released*
//!   (read out of its ring). The reader returns releases in the immediate of whatever it sends
//!   next (piggybacked), or in an explicit control message once half the smaller of the two
//!   rings is unreported;
//! - **control credit**: at most `ctrl` control messages the peer has not yet *polled*, reported
//!   back the same way, explicitly once half of `ctrl` are unreported;
//! - **send queue**: at most `slots + ctrl` work requests posted and not yet completed.
//!
//! Reports travel as 8-bit cumulative counters ([`crate::rdma_meta::imm_encode`]); outstanding
//! counts stay below 256 (at most [`crate::rdma_meta::MAX_SLOTS`] each), so each report names
//! one unambiguous advance. A report that releases more than was ever sent, a length that does
//! not fit a slot, a write into a full ring or data after the peer's end-of-stream is a
//! [`RingError`]: the driver ends the link with it, nothing panics.
#![cfg_attr(not(feature = "rdma"), allow(dead_code))]

use std::collections::VecDeque;

use crate::rdma_meta::{advance, imm_decode, imm_encode, RingInfo, FLAG_FIN};

/// The shape of one receive ring: what each side advertises and the other obeys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Data slots.
    pub(crate) slots: u32,
    /// Bytes per slot.
    pub(crate) slot_size: u32,
    /// Receive work requests reserved for control messages.
    pub(crate) ctrl: u32,
}

impl From<&RingInfo> for Geometry {
    fn from(r: &RingInfo) -> Self {
        Geometry {
            slots: r.slots,
            slot_size: r.slot_size,
            ctrl: r.ctrl,
        }
    }
}

/// A peer broke the ring rules (carried by what it sent, so never a panic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RingError {
    /// A write longer than a slot (or of a length no slot holds).
    #[error("peer wrote {len} bytes into a {slot_size}-byte slot")]
    BadLength {
        /// Length the immediate claimed.
        len: u32,
        /// Our slot size.
        slot_size: u32,
    },
    /// A write while every slot still held unread data.
    #[error("peer overran the receive ring (len {len}, queued {queued})")]
    Overrun {
        /// Length of the write.
        len: u32,
        /// Messages already queued.
        queued: u32,
    },
    /// A credit report for more messages than were outstanding.
    #[error(
        "peer reported {claimed} {what} messages released, but only {outstanding} were outstanding"
    )]
    Overclaim {
        /// `data` or `control`.
        what: &'static str,
        /// The advance the report asked for.
        claimed: u32,
        /// Messages sent and not yet reported.
        outstanding: u32,
    },
    /// A write after the peer's end-of-stream.
    #[error("peer sent data after its end-of-stream")]
    DataAfterFin,
}

/// What the reader may take next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readable {
    /// `len` unread bytes of the front message, at byte `at` of the local receive ring.
    Data {
        /// Offset into the receive ring.
        at: usize,
        /// Bytes left in the message.
        len: usize,
    },
    /// The peer finished its direction: end of stream.
    Fin,
}

/// One data write the core allows now: the driver posts it and then calls
/// [`Ring::write_posted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Write {
    /// Bytes to take from the caller's buffer (≤ both slot sizes).
    pub(crate) len: usize,
    /// Byte offset of the target slot in the peer's ring.
    pub(crate) peer_offset: u64,
    /// Local send slot to stage the bytes in (when not posted inline).
    pub(crate) local_slot: usize,
    /// Immediate data (length and piggybacked reports).
    pub(crate) imm: u32,
}

/// One control message (credit report, FIN) the core wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ctrl {
    /// Immediate data (reports, and [`FLAG_FIN`] for end-of-stream).
    pub(crate) imm: u32,
    /// Whether this is the FIN.
    pub(crate) fin: bool,
}

/// Whether a control message should go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CtrlStep {
    /// Nothing is due (no FIN asked for, reports below their batch).
    NotDue,
    /// One is due but the peer has no control receive free (or the send queue is full): it
    /// goes out with the next message or once the peer reports our control messages polled.
    Blocked,
    /// Post this, then call [`Ring::ctrl_posted`].
    Post(Ctrl),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxItem {
    Data(u32),
    Fin,
}

/// Both directions' counters of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    local: Geometry,
    peer: Geometry,
    credit_batch: u32,
    ctrl_batch: u32,

    // receive side
    rx: VecDeque<RxItem>,
    rx_queued: u32,
    rx_off: usize,
    rx_data_index: u32,
    released: u32,
    released_reported: u32,
    ctrl_polled: u32,
    ctrl_polled_reported: u32,
    fin_received: bool,

    // send side
    tx_data: u32,
    tx_data_done: u32,
    peer_released: u32,
    ctrl_sent: u32,
    peer_ctrl_polled: u32,
    sq_posted: u32,
    sq_done: u32,
    fin_sent: bool,
}

impl Ring {
    /// A fresh connection: our ring is `local`, the peer's is `peer` (already validated by
    /// [`RingInfo::decode`]).
    pub(crate) fn new(local: Geometry, peer: Geometry) -> Ring {
        Ring {
            local,
            peer,
            // Half of what the peer may have unreleased (its limit is the smaller ring).
            credit_batch: (local.slots.min(peer.slots) / 2).max(1),
            ctrl_batch: (local.ctrl / 2).max(1),
            rx: VecDeque::new(),
            rx_queued: 0,
            rx_off: 0,
            rx_data_index: 0,
            released: 0,
            released_reported: 0,
            ctrl_polled: 0,
            ctrl_polled_reported: 0,
            fin_received: false,
            tx_data: 0,
            tx_data_done: 0,
            peer_released: 0,
            ctrl_sent: 0,
            peer_ctrl_polled: 0,
            sq_posted: 0,
            sq_done: 0,
            fin_sent: false,
        }
    }

    /// Released slots returned explicitly once this many are unreported and no data flows back.
    #[cfg(test)]
    pub(crate) fn credit_batch(&self) -> u32 {
        self.credit_batch
    }

    /// Polled control messages reported explicitly once this many are unreported.
    #[cfg(test)]
    pub(crate) fn ctrl_batch(&self) -> u32 {
        self.ctrl_batch
    }

    // -----------------------------------------------------------------------------------------
    // Completions

    /// A send work request completed (successfully or flushed): `data` for a write.
    pub(crate) fn on_sent(&mut self, data: bool) {
        self.sq_done = self.sq_done.wrapping_add(1);
        if data {
            self.tx_data_done = self.tx_data_done.wrapping_add(1);
        }
    }

    /// The peer's reports carried by any immediate: checked against what we sent, then applied.
    fn on_reports(&mut self, ctrl_polled: u32, released: u32) -> Result<(), RingError> {
        let claim = |full: u32, reported: u32| reported.wrapping_sub(full) & 0xff;
        let data = claim(self.peer_released, released);
        let data_out = self.tx_data.wrapping_sub(self.peer_released);
        if data > data_out {
            return Err(RingError::Overclaim {
                what: "data",
                claimed: data,
                outstanding: data_out,
            });
        }
        let ctrl = claim(self.peer_ctrl_polled, ctrl_polled);
        let ctrl_out = self.ctrl_sent.wrapping_sub(self.peer_ctrl_polled);
        if ctrl > ctrl_out {
            return Err(RingError::Overclaim {
                what: "control",
                claimed: ctrl,
                outstanding: ctrl_out,
            });
        }
        advance(&mut self.peer_released, released);
        advance(&mut self.peer_ctrl_polled, ctrl_polled);
        Ok(())
    }

    /// The peer's RDMA write with immediate `imm` landed in our next slot.
    pub(crate) fn on_recv_data(&mut self, imm: u32) -> Result<(), RingError> {
        let (ctrl_polled, released, low) = imm_decode(imm);
        self.on_reports(ctrl_polled, released)?;
        let len = low + 1;
        if len > self.local.slot_size {
            return Err(RingError::BadLength {
                len,
                slot_size: self.local.slot_size,
            });
        }
        if self.rx_queued >= self.local.slots {
            return Err(RingError::Overrun {
                len,
                queued: self.rx_queued,
            });
        }
        if self.fin_received {
            return Err(RingError::DataAfterFin);
        }
        self.rx.push_back(RxItem::Data(len));
        self.rx_queued += 1;
        Ok(())
    }

    /// The peer's control message with immediate `imm` arrived. The driver then asks
    /// [`Ring::next_ctrl`] (the poll may have made a report due).
    pub(crate) fn on_recv_ctrl(&mut self, imm: u32) -> Result<(), RingError> {
        let (ctrl_polled, released, low) = imm_decode(imm);
        self.on_reports(ctrl_polled, released)?;
        self.ctrl_polled = self.ctrl_polled.wrapping_add(1);
        if low & FLAG_FIN != 0 && !self.fin_received {
            self.fin_received = true;
            self.rx.push_back(RxItem::Fin);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Reading

    /// What the reader may take now (`None`: wait for the peer).
    pub(crate) fn readable(&self) -> Option<Readable> {
        match self.rx.front()? {
            RxItem::Data(len) => {
                let slot = (self.rx_data_index % self.local.slots) as usize;
                Some(Readable::Data {
                    at: slot * self.local.slot_size as usize + self.rx_off,
                    len: *len as usize - self.rx_off,
                })
            }
            RxItem::Fin => Some(Readable::Fin),
        }
    }

    /// The reader copied `n` bytes (≤ the `len` of [`Ring::readable`]) out of the front
    /// message. True when that emptied the message and so released its slot: the driver then
    /// asks [`Ring::next_ctrl`] whether the credits are due.
    pub(crate) fn consume(&mut self, n: usize) -> bool {
        let Some(RxItem::Data(len)) = self.rx.front() else {
            return false;
        };
        let len = *len as usize;
        self.rx_off = (self.rx_off + n).min(len);
        if self.rx_off < len {
            return false;
        }
        self.rx.pop_front();
        self.rx_queued -= 1;
        self.rx_off = 0;
        self.rx_data_index = self.rx_data_index.wrapping_add(1);
        self.released = self.released.wrapping_add(1);
        true
    }

    // -----------------------------------------------------------------------------------------
    // Sending

    fn sq_room(&self) -> bool {
        self.sq_posted.wrapping_sub(self.sq_done) < self.local.slots + self.local.ctrl
    }

    fn ctrl_room(&self) -> bool {
        self.ctrl_sent.wrapping_sub(self.peer_ctrl_polled) < self.peer.ctrl && self.sq_room()
    }

    fn data_room(&self) -> bool {
        let slots = self.peer.slots.min(self.local.slots);
        self.tx_data.wrapping_sub(self.peer_released) < slots
            && self.tx_data.wrapping_sub(self.tx_data_done) < self.local.slots
            && self.sq_room()
    }

    /// Whether a control message is due now, and if so whether it may be posted; `fin` asks
    /// for the end-of-stream.
    pub(crate) fn next_ctrl(&self, fin: bool) -> CtrlStep {
        let due = fin
            || self.released.wrapping_sub(self.released_reported) >= self.credit_batch
            || self.ctrl_polled.wrapping_sub(self.ctrl_polled_reported) >= self.ctrl_batch;
        if !due {
            CtrlStep::NotDue
        } else if !self.ctrl_room() {
            CtrlStep::Blocked
        } else {
            let low = if fin { FLAG_FIN } else { 0 };
            CtrlStep::Post(Ctrl {
                imm: imm_encode(self.ctrl_polled, self.released, low),
                fin,
            })
        }
    }

    /// The control message from [`Ring::next_ctrl`] was posted.
    pub(crate) fn ctrl_posted(&mut self, c: Ctrl) {
        self.sq_posted = self.sq_posted.wrapping_add(1);
        self.ctrl_sent = self.ctrl_sent.wrapping_add(1);
        self.reported();
        if c.fin {
            self.fin_sent = true;
        }
    }

    /// The write of up to `want` (> 0) bytes that may be posted now, if any.
    pub(crate) fn next_write(&self, want: usize) -> Option<Write> {
        if want == 0 || !self.data_room() {
            return None;
        }
        let len = want
            .min(self.local.slot_size as usize)
            .min(self.peer.slot_size as usize);
        Some(Write {
            len,
            peer_offset: u64::from(self.tx_data % self.peer.slots) * u64::from(self.peer.slot_size),
            local_slot: (self.tx_data % self.local.slots) as usize,
            imm: imm_encode(self.ctrl_polled, self.released, len as u32 - 1),
        })
    }

    /// The write from [`Ring::next_write`] was posted.
    pub(crate) fn write_posted(&mut self, w: Write) {
        debug_assert_eq!(w.local_slot, (self.tx_data % self.local.slots) as usize);
        self.sq_posted = self.sq_posted.wrapping_add(1);
        self.tx_data = self.tx_data.wrapping_add(1);
        self.reported();
    }

    /// The message just posted carried our counters as they are (nothing changes between
    /// [`Ring::next_write`] / [`Ring::next_ctrl`] and the matching `*_posted`).
    fn reported(&mut self) {
        self.released_reported = self.released;
        self.ctrl_polled_reported = self.ctrl_polled;
    }

    /// Whether our end-of-stream was posted.
    pub(crate) fn fin_sent(&self) -> bool {
        self.fin_sent
    }

    /// Send work requests posted and not yet completed.
    pub(crate) fn sends_outstanding(&self) -> u32 {
        self.sq_posted.wrapping_sub(self.sq_done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        slots: 8,
        slot_size: 64,
        ctrl: 4,
    };

    /// A message on the wire from one core to the other.
    #[derive(Debug, Clone)]
    enum Msg {
        Data {
            offset: u64,
            bytes: Vec<u8>,
            imm: u32,
        },
        Ctrl {
            imm: u32,
        },
    }

    /// One side: its core, its receive ring memory, and what it has read so far.
    struct Side {
        ring: Ring,
        mem: Vec<u8>,
        got: Vec<u8>,
        eof: bool,
        ctrl_posted: u32,
        writes_posted: u32,
    }

    impl Side {
        fn new(local: Geometry, peer: Geometry) -> Side {
            Side {
                ring: Ring::new(local, peer),
                mem: vec![0; (local.slots * local.slot_size) as usize],
                got: Vec::new(),
                eof: false,
                ctrl_posted: 0,
                writes_posted: 0,
            }
        }
    }

    /// Two cores joined by two in-order queues (RC delivery); sends complete when delivered.
    struct Pair {
        a: Side,
        b: Side,
        to_b: VecDeque<Msg>,
        to_a: VecDeque<Msg>,
    }

    impl Pair {
        fn new(ga: Geometry, gb: Geometry) -> Pair {
            Pair {
                a: Side::new(ga, gb),
                b: Side::new(gb, ga),
                to_b: VecDeque::new(),
                to_a: VecDeque::new(),
            }
        }

        fn sides(&mut self, a_to_b: bool) -> (&mut Side, &mut Side, &mut VecDeque<Msg>) {
            if a_to_b {
                (&mut self.a, &mut self.b, &mut self.to_b)
            } else {
                (&mut self.b, &mut self.a, &mut self.to_a)
            }
        }

        /// The receiver-not-ready guarantee: messages on the wire towards a side plus the data
        /// it has not yet released never exceed the receives it posts (`slots` for data,
        /// `ctrl` for control messages, which are polled, i.e. done, on delivery).
        fn check_no_rnr(&mut self, a_to_b: bool) {
            let (_, recv, wire) = self.sides(a_to_b);
            let data = wire
                .iter()
                .filter(|m| matches!(m, Msg::Data { .. }))
                .count() as u32;
            let ctrl = wire.len() as u32 - data;
            assert!(
                data + recv.ring.rx_queued <= recv.ring.local.slots,
                "data overrun"
            );
            assert!(ctrl <= recv.ring.local.ctrl, "control overrun");
        }

        /// Like the driver's `maybe_send_ctrl`: post a due control message if allowed.
        fn ctrl(&mut self, a_side: bool, fin: bool) -> CtrlStep {
            let (me, _, wire) = self.sides(a_side);
            let step = me.ring.next_ctrl(fin);
            if let CtrlStep::Post(c) = step {
                me.ring.ctrl_posted(c);
                me.ctrl_posted += 1;
                wire.push_back(Msg::Ctrl { imm: c.imm });
                self.check_no_rnr(a_side);
            }
            step
        }

        /// Like `poll_write`: deferred reports first, then one write; bytes taken, if any.
        fn write(&mut self, a_side: bool, data: &[u8]) -> Option<usize> {
            self.ctrl(a_side, false);
            let (me, _, wire) = self.sides(a_side);
            let w = me.ring.next_write(data.len())?;
            wire.push_back(Msg::Data {
                offset: w.peer_offset,
                bytes: data[..w.len].to_vec(),
                imm: w.imm,
            });
            me.ring.write_posted(w);
            me.writes_posted += 1;
            self.check_no_rnr(a_side);
            Some(w.len)
        }

        /// Delivers up to `max` messages in flight towards one side; each completes its send.
        fn deliver(&mut self, to_b: bool, max: usize) -> Result<usize, RingError> {
            let mut n = 0;
            while n < max {
                let (sender, recv, wire) = self.sides(to_b);
                let Some(m) = wire.pop_front() else { break };
                n += 1;
                match m {
                    Msg::Data { offset, bytes, imm } => {
                        let at = offset as usize;
                        recv.mem[at..at + bytes.len()].copy_from_slice(&bytes);
                        sender.ring.on_sent(true);
                        recv.ring.on_recv_data(imm)?;
                    }
                    Msg::Ctrl { imm } => {
                        sender.ring.on_sent(false);
                        recv.ring.on_recv_ctrl(imm)?;
                        // The driver asks after every polled control message.
                        self.ctrl(!to_b, false);
                    }
                }
            }
            Ok(n)
        }

        /// Like `poll_read` with a `buf`-byte buffer, until nothing is readable.
        fn read(&mut self, a_side: bool, buf: usize) {
            loop {
                let me = if a_side { &mut self.a } else { &mut self.b };
                match me.ring.readable() {
                    Some(Readable::Data { at, len }) => {
                        let n = len.min(buf);
                        me.got.extend_from_slice(&me.mem[at..at + n]);
                        if me.ring.consume(n) {
                            self.ctrl(a_side, false);
                        }
                    }
                    Some(Readable::Fin) => {
                        me.eof = true;
                        return;
                    }
                    None => return,
                }
            }
        }
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 31 + seed * 7) % 251) as u8)
            .collect()
    }

    /// Moves `data` from a to b with b reading in `rbuf`-byte pieces; returns bytes received.
    fn pump(p: &mut Pair, data: &[u8], wsize: usize, rbuf: usize) {
        let mut sent = 0;
        let mut idle = 0;
        while p.b.got.len() < data.len() {
            let mut moved = false;
            if sent < data.len() {
                let end = (sent + wsize).min(data.len());
                if let Some(n) = p.write(true, &data[sent..end]) {
                    sent += n;
                    moved = true;
                }
            }
            moved |= p.deliver(true, 3).expect("conforming peer") > 0;
            p.read(false, rbuf);
            moved |= p.deliver(false, usize::MAX).expect("conforming peer") > 0;
            idle = if moved { 0 } else { idle + 1 };
            assert!(
                idle < 3,
                "stalled at {sent} sent, {} received",
                p.b.got.len()
            );
        }
    }

    #[test]
    fn data_of_many_sizes_arrives_in_order() {
        for (wsize, rbuf) in [(1, 1), (7, 3), (63, 64), (64, 10), (65, 200), (500, 17)] {
            let mut p = Pair::new(G, G);
            let data = pattern(5000 + wsize, wsize);
            pump(&mut p, &data, wsize, rbuf);
            assert_eq!(p.b.got, data, "write {wsize}, read {rbuf}");
            // No write ever exceeded one slot, so there are at least len/slot writes.
            assert!(p.a.writes_posted as usize >= data.len() / G.slot_size as usize);
        }
    }

    #[test]
    fn writes_are_cut_to_the_smaller_slot() {
        let small = Geometry { slot_size: 16, ..G };
        let mut p = Pair::new(G, small);
        let w = p.a.ring.next_write(1000).expect("room");
        assert_eq!(w.len, 16);
        assert_eq!(imm_decode(w.imm).2, 15);
        let data = pattern(1000, 1);
        pump(&mut p, &data, 1000, 1000);
        assert_eq!(p.b.got, data);
        assert_eq!(p.a.writes_posted, 1000 / 16 + 1);
    }

    #[test]
    fn sender_stops_at_slots_unreleased_and_resumes_on_credit() {
        let mut p = Pair::new(G, G);
        for i in 0..G.slots {
            assert_eq!(p.write(true, &[i as u8; 10]), Some(10), "message {i}");
        }
        // Delivered and completed, but nothing read: the peer's ring is full.
        p.deliver(true, usize::MAX).expect("conforming");
        assert_eq!(p.write(true, b"x"), None);
        assert_eq!(p.a.ring.next_write(1), None);
        // Reading below the batch releases slots but sends no credit yet.
        let Some(Readable::Data { at, len }) = p.b.ring.readable() else {
            panic!("message 0 not readable")
        };
        assert_eq!(len, 10);
        let first = p.b.mem[at..at + len].to_vec();
        p.b.got.extend_from_slice(&first);
        assert!(p.b.ring.consume(len));
        assert_eq!(p.b.ring.next_ctrl(false), CtrlStep::NotDue);
        p.deliver(false, usize::MAX).expect("conforming");
        assert_eq!(p.write(true, b"x"), None, "no credit returned yet");
        // The batch completes: one control message returns the credits.
        p.read(false, 64);
        assert_eq!(p.b.ctrl_posted, G.slots / p.b.ring.credit_batch());
        p.deliver(false, usize::MAX).expect("conforming");
        assert_eq!(p.write(true, b"y"), Some(1));
        let want: Vec<u8> = (0..G.slots).flat_map(|i| [i as u8; 10]).collect();
        assert_eq!(p.b.got, want);
    }

    #[test]
    fn credits_return_in_batches_or_piggybacked() {
        // One direction only: a control message per credit_batch released slots.
        let mut p = Pair::new(G, G);
        let data = pattern(64 * 400, 3);
        pump(&mut p, &data, 64, 64);
        let batch = p.b.ring.credit_batch();
        assert_eq!(batch, G.slots / 2);
        assert_eq!(p.a.writes_posted, 400);
        assert_eq!(p.b.ctrl_posted, 400 / batch);

        // Both directions: every write carries the reports, no control message is needed.
        let mut p = Pair::new(G, G);
        for round in 0..300 {
            let x = pattern(40, round);
            assert_eq!(p.write(true, &x), Some(40), "a, round {round}");
            assert_eq!(p.write(false, &x), Some(40), "b, round {round}");
            p.deliver(true, usize::MAX).expect("conforming");
            p.deliver(false, usize::MAX).expect("conforming");
            p.read(true, 64);
            p.read(false, 64);
        }
        assert_eq!(p.a.got.len(), 300 * 40);
        assert_eq!(p.a.got, p.b.got);
        assert_eq!((p.a.ctrl_posted, p.b.ctrl_posted), (0, 0));
    }

    #[test]
    fn control_messages_are_bounded_by_the_peers_ctrl() {
        let mut p = Pair::new(G, G);
        // a asks for FINs repeatedly (the only way to force control messages) while b polls
        // nothing: a stops after the peer's `ctrl` receives are used.
        for _ in 0..G.ctrl {
            assert!(matches!(p.ctrl(true, true), CtrlStep::Post(_)));
        }
        assert_eq!(p.ctrl(true, true), CtrlStep::Blocked);
        assert_eq!(p.to_b.len() as u32, G.ctrl);
        // b polls them; once ctrl_batch are polled it reports, and a may send again.
        p.deliver(true, usize::MAX).expect("conforming");
        assert_eq!(p.b.ctrl_posted, G.ctrl / p.b.ring.ctrl_batch());
        p.deliver(false, usize::MAX).expect("conforming");
        assert!(matches!(p.ctrl(true, true), CtrlStep::Post(_)));
    }

    #[test]
    fn a_full_send_queue_blocks_both_kinds() {
        let mut p = Pair::new(G, G);
        for i in 0..G.slots {
            assert!(p.write(true, &[1]).is_some(), "{i}");
        }
        for _ in 0..G.ctrl {
            assert!(matches!(p.ctrl(true, true), CtrlStep::Post(_)));
        }
        // Nothing completed yet: slots + ctrl work requests outstanding.
        assert_eq!(p.a.ring.sends_outstanding(), G.slots + G.ctrl);
        assert_eq!(p.a.ring.next_ctrl(true), CtrlStep::Blocked);
        assert_eq!(p.a.ring.next_write(1), None);
        p.deliver(true, usize::MAX).expect("conforming");
        assert_eq!(p.a.ring.sends_outstanding(), 0);
    }

    #[test]
    fn counters_wrap_past_256_over_thousands_of_messages() {
        for (ga, gb) in [
            (G, G),
            (
                Geometry {
                    slots: 128,
                    slot_size: 8,
                    ctrl: 128,
                },
                Geometry {
                    slots: 3,
                    slot_size: 5,
                    ctrl: 1,
                },
            ),
        ] {
            let mut p = Pair::new(ga, gb);
            let data = pattern(5 * 3000, 9);
            pump(&mut p, &data, 5, 3);
            assert_eq!(p.b.got, data);
            assert!(p.a.writes_posted >= 3000);
            // And back the other way on the same connection.
            let back = pattern(8 * 1100, 4);
            let mut sent = 0;
            while p.a.got.len() < back.len() {
                if sent < back.len() {
                    if let Some(n) = p.write(false, &back[sent..(sent + 8).min(back.len())]) {
                        sent += n;
                    }
                }
                p.deliver(false, 2).expect("conforming");
                p.read(true, 8);
                p.deliver(true, usize::MAX).expect("conforming");
            }
            assert_eq!(p.a.got, back);
        }
    }

    #[test]
    fn fin_arrives_after_the_data() {
        let mut p = Pair::new(G, G);
        let data = pattern(300, 2);
        let mut sent = 0;
        while sent < data.len() {
            sent += p.write(true, &data[sent..]).expect("room for 5 slots");
        }
        let CtrlStep::Post(_) = p.ctrl(true, true) else {
            panic!("FIN not posted")
        };
        assert!(p.a.ring.fin_sent());
        assert!(p.a.ring.sends_outstanding() > 0);
        p.deliver(true, usize::MAX).expect("conforming");
        assert_eq!(p.a.ring.sends_outstanding(), 0);
        p.read(false, 7);
        assert_eq!(p.b.got, data);
        assert!(p.b.eof);
        // End of stream stays: the reader sees it again, nothing more is consumed.
        assert_eq!(p.b.ring.readable(), Some(Readable::Fin));
        assert!(!p.b.ring.consume(1));
    }

    #[test]
    fn data_after_fin_is_a_protocol_error() {
        let mut b = Ring::new(G, G);
        b.on_recv_ctrl(imm_encode(0, 0, FLAG_FIN)).expect("fin");
        assert_eq!(
            b.on_recv_data(imm_encode(0, 0, 9)),
            Err(RingError::DataAfterFin)
        );
    }

    #[test]
    fn impossible_immediates_are_typed_errors() {
        // A length beyond the slot.
        let mut b = Ring::new(G, G);
        assert_eq!(
            b.on_recv_data(imm_encode(0, 0, G.slot_size)),
            Err(RingError::BadLength {
                len: G.slot_size + 1,
                slot_size: G.slot_size
            })
        );
        assert_eq!(
            b.on_recv_data(imm_encode(0, 0, 0xffff)),
            Err(RingError::BadLength {
                len: 0x10000,
                slot_size: G.slot_size
            })
        );
        // More writes than slots, none read.
        let mut b = Ring::new(G, G);
        for _ in 0..G.slots {
            b.on_recv_data(imm_encode(0, 0, 0)).expect("fits");
        }
        assert_eq!(
            b.on_recv_data(imm_encode(0, 0, 0)),
            Err(RingError::Overrun {
                len: 1,
                queued: G.slots
            })
        );
        // Credit for data never sent.
        let mut a = Ring::new(G, G);
        let w = a.next_write(5).expect("room");
        a.write_posted(w);
        a.on_recv_ctrl(imm_encode(0, 1, 0))
            .expect("one released of one sent");
        assert_eq!(
            a.on_recv_ctrl(imm_encode(0, 3, 0)),
            Err(RingError::Overclaim {
                what: "data",
                claimed: 2,
                outstanding: 0
            })
        );
        // Polled control messages never sent.
        let mut a = Ring::new(G, G);
        assert_eq!(
            a.on_recv_data(imm_encode(200, 0, 0)),
            Err(RingError::Overclaim {
                what: "control",
                claimed: 200,
                outstanding: 0
            })
        );
        // A rejected report changes nothing: a still has full credit.
        for _ in 0..G.slots {
            let w = a.next_write(1).expect("full credit");
            a.write_posted(w);
        }
        assert_eq!(a.next_write(1), None);
    }

    #[test]
    fn every_immediate_is_decided_without_panicking() {
        // Arbitrary peer immediates against a core in a busy state: each is accepted or a
        // typed error, and the core's invariants hold afterwards.
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut r = Ring::new(G, G);
            for _ in 0..3 {
                let w = r.next_write(9).expect("room");
                r.write_posted(w);
            }
            let _ = if x & 1 == 0 {
                r.on_recv_data(x)
            } else {
                r.on_recv_ctrl(x)
            };
            assert!(r.tx_data.wrapping_sub(r.peer_released) <= 3);
            assert!(r.ctrl_sent.wrapping_sub(r.peer_ctrl_polled) == 0);
            assert!(r.rx_queued <= G.slots);
            if let Some(Readable::Data { at, len }) = r.readable() {
                assert!(at + len <= (G.slots * G.slot_size) as usize);
            }
        }
    }
}
