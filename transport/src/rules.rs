//! Session rules that do no I/O: the heartbeat's timing and the streams' credit windows, as
//! small state machines fed with events and time and asked what to do next (quinn-proto's
//! model). The tokio driver in [`crate::session`] and [`crate::stream`] owns the sockets, tasks
//! and locks; the rules live here so they can be tested on virtual time without any of them.
//!
//! Here: [`Heartbeat`] (when to ping, when the peer is dead), [`RecvWindow`] and
//! [`SendWindow`] (a stream's flow control). What an incoming frame means is decided in
//! [`crate::dispatch`], the same way.

use std::time::{Duration, Instant};

/// Heartbeat timing for one session: the peer is alive while bytes arrive; an idle link gets
/// a ping every `interval`; `timeout` of silence declares the peer dead.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// How often the rule is checked (fine enough to honour both settings).
    tick: Duration,
    last_seen: Instant,
    next_check: Instant,
    seq: u32,
}

/// What a heartbeat check asks the driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Nothing: the peer spoke recently, or it is not time yet.
    Idle,
    /// Send a Ping with this sequence number (its Pong, like any byte, counts as life).
    Ping(u32),
    /// The peer has been silent this long, over the timeout: end the session.
    Dead(Duration),
}

impl Heartbeat {
    /// Starts the clock at `now` (the handshake just proved the peer alive).
    pub(crate) fn new(interval: Duration, timeout: Duration, now: Instant) -> Heartbeat {
        let tick = interval.min(timeout / 2).max(Duration::from_millis(10));
        Heartbeat {
            interval,
            timeout,
            tick,
            last_seen: now,
            next_check: now + tick,
            seq: 0,
        }
    }

    /// Bytes from the peer arrived at `at` (out-of-order reports are harmless).
    pub(crate) fn on_activity(&mut self, at: Instant) {
        if at > self.last_seen {
            self.last_seen = at;
        }
    }

    /// When the driver must call [`Heartbeat::on_timeout`] next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        self.next_check
    }

    /// Runs the rule at `now`.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Beat {
        if now < self.next_check {
            return Beat::Idle;
        }
        self.next_check = now + self.tick;
        let silent = now.saturating_duration_since(self.last_seen);
        if silent > self.timeout {
            Beat::Dead(silent)
        } else if silent >= self.interval.min(self.tick) {
            self.seq = self.seq.wrapping_add(1);
            Beat::Ping(self.seq)
        } else {
            Beat::Idle
        }
    }
}

/// The receiving side of a stream's flow control: at most `window` bytes buffered and not yet
/// consumed; consumed bytes go back to the sender as credit in batches of a quarter window.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecvWindow {
    window: u64,
    /// Received but not yet consumed by the application.
    buffered: u64,
    /// Consumed but not yet credited back.
    unacked: u64,
}

/// The peer sent more than the window it was given: a protocol violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("exceeded its window of {window} bytes")]
pub(crate) struct WindowExceeded {
    pub window: u64,
}

impl RecvWindow {
    pub(crate) fn new(window: u64) -> RecvWindow {
        RecvWindow {
            window,
            buffered: 0,
            unacked: 0,
        }
    }

    /// `n` bytes of Data arrived for the application.
    pub(crate) fn on_data(&mut self, n: u64) -> Result<(), WindowExceeded> {
        let buffered = self.buffered.saturating_add(n);
        if buffered > self.window {
            return Err(WindowExceeded {
                window: self.window,
            });
        }
        self.buffered = buffered;
        Ok(())
    }

    /// Takes back `n` bytes counted by [`RecvWindow::on_data`] that could not be delivered
    /// (the caller credits them straight back).
    pub(crate) fn undeliverable(&mut self, n: u64) {
        self.buffered = self.buffered.saturating_sub(n);
    }

    /// The application consumed `n` bytes; returns the credit to send now, if any.
    pub(crate) fn on_consumed(&mut self, n: u64) -> Option<u64> {
        self.buffered = self.buffered.saturating_sub(n);
        self.unacked += n;
        (self.unacked >= self.threshold()).then(|| std::mem::take(&mut self.unacked))
    }

    /// The reader is gone: everything buffered is credited back at once so the peer's window
    /// does not stay closed on data nobody will read.
    pub(crate) fn reader_gone(&mut self) -> u64 {
        std::mem::take(&mut self.buffered)
    }

    fn threshold(&self) -> u64 {
        (self.window / 4).max(1)
    }
}

/// The sending side of a stream's flow control: bytes the peer still accepts.
#[derive(Debug, Clone, Default)]
pub(crate) struct SendWindow {
    credit: u64,
}

impl SendWindow {
    pub(crate) fn new(credit: u64) -> SendWindow {
        SendWindow { credit }
    }

    /// Reserves up to `want` bytes (at most `max_chunk`); 0 means wait for credit.
    pub(crate) fn take(&mut self, want: usize, max_chunk: usize) -> usize {
        let n = (self.credit.min(usize::MAX as u64) as usize)
            .min(want)
            .min(max_chunk);
        self.credit -= n as u64;
        n
    }

    /// The peer returned `n` bytes of credit.
    pub(crate) fn add(&mut self, n: u64) {
        self.credit = self.credit.saturating_add(n);
    }

    /// Whether nothing may be sent until credit arrives.
    pub(crate) fn is_empty(&self) -> bool {
        self.credit == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MS: Duration = Duration::from_millis(1);

    /// Two heartbeat cores wired back to back over a link with latency that can be cut: every
    /// frame (ping, pong, data) that arrives counts as activity, a ping is answered with a
    /// pong. Time is virtual: the loop jumps to the next event.
    struct Pair {
        now: Instant,
        hb: [Heartbeat; 2],
        latency: Duration,
        /// In flight: (arrival time, receiving side, is it a ping that needs a pong).
        wire: VecDeque<(Instant, usize, bool)>,
        link_up: bool,
        dead: [Option<(Instant, Duration)>; 2],
        pings: [u32; 2],
    }

    impl Pair {
        fn new(interval: Duration, timeout: Duration, latency: Duration) -> Pair {
            let now = Instant::now();
            Pair {
                now,
                hb: [
                    Heartbeat::new(interval, timeout, now),
                    Heartbeat::new(interval, timeout, now),
                ],
                latency,
                wire: VecDeque::new(),
                link_up: true,
                dead: [None, None],
                pings: [0, 0],
            }
        }

        fn send(&mut self, from: usize, ping: bool) {
            if self.link_up {
                self.wire
                    .push_back((self.now + self.latency, 1 - from, ping));
            }
        }

        /// Runs until `until`, processing deliveries and timeouts in time order.
        fn run_until(&mut self, until: Instant) {
            loop {
                let next_timer = (0..2)
                    .filter(|i| self.dead[*i].is_none())
                    .map(|i| (self.hb[i].poll_timeout(), i))
                    .min();
                let next_wire = self.wire.front().map(|w| w.0);
                let t = match (next_timer, next_wire) {
                    (Some((t, _)), Some(w)) => t.min(w),
                    (Some((t, _)), None) => t,
                    (None, Some(w)) => w,
                    (None, None) => return,
                };
                if t > until {
                    self.now = until;
                    return;
                }
                self.now = t;
                if next_wire == Some(t) {
                    let (_, to, ping) = self.wire.pop_front().expect("front");
                    if self.dead[to].is_none() {
                        self.hb[to].on_activity(t);
                        if ping {
                            self.send(to, false);
                        }
                    }
                    continue;
                }
                let (_, i) = next_timer.expect("timer");
                match self.hb[i].on_timeout(t) {
                    Beat::Idle => {}
                    Beat::Ping(_) => {
                        self.pings[i] += 1;
                        self.send(i, true);
                    }
                    Beat::Dead(silent) => self.dead[i] = Some((t, silent)),
                }
            }
        }
    }

    #[test]
    fn idle_link_stays_up_on_pings_alone() {
        let mut p = Pair::new(3000 * MS, 10_000 * MS, 5 * MS);
        let start = p.now;
        p.run_until(start + Duration::from_secs(600));
        assert_eq!(p.dead, [None, None]);
        // A ping when a check finds `interval` of silence: every one or two intervals (the
        // peer's pong resets the silence just after a check), never a flood.
        for n in p.pings {
            assert!((95..=205).contains(&n), "{n} pings in 600 s");
        }
    }

    #[test]
    fn cut_link_is_detected_within_timeout_plus_a_tick() {
        let (interval, timeout) = (3000 * MS, 10_000 * MS);
        let mut p = Pair::new(interval, timeout, 5 * MS);
        let start = p.now;
        p.run_until(start + Duration::from_secs(60));
        let cut = p.now;
        p.link_up = false;
        p.wire.clear();
        p.run_until(cut + Duration::from_secs(60));
        for side in 0..2 {
            let (at, silent) = p.dead[side].expect("declared dead");
            assert!(silent > timeout, "{silent:?}");
            let after_cut = at - cut;
            // Last activity was at most two intervals before the cut (pings go out after an
            // interval of silence, checked once per tick); detection at most one tick after
            // the timeout.
            assert!(after_cut > timeout - 2 * interval, "{after_cut:?}");
            assert!(after_cut <= timeout + interval, "{after_cut:?}");
        }
    }

    #[test]
    fn traffic_suppresses_pings_and_silence_boundary_is_strict() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(3000 * MS, 10_000 * MS, t0);
        // Data every second: never a ping.
        let mut t = t0;
        for _ in 0..100 {
            t += 1000 * MS;
            hb.on_activity(t);
            while hb.poll_timeout() <= t {
                let at = hb.poll_timeout();
                assert_eq!(hb.on_timeout(at), Beat::Idle);
            }
        }
        // Exactly `timeout` of silence is still alive; beyond it is dead.
        let last = t;
        let mut hb2 = Heartbeat::new(1000 * MS, 4000 * MS, last);
        assert_eq!(
            hb2.on_timeout(last + 500 * MS),
            Beat::Idle,
            "before the tick"
        );
        assert_eq!(hb2.on_timeout(last + 1000 * MS), Beat::Ping(1));
        assert_eq!(hb2.on_timeout(last + 4000 * MS), Beat::Ping(2));
        assert_eq!(
            hb2.on_timeout(last + 4001 * MS),
            Beat::Idle,
            "checks are paced by the tick"
        );
        assert_eq!(hb2.on_timeout(last + 5000 * MS), Beat::Dead(5000 * MS));
        // Stale activity reports do not move the clock back.
        let mut hb3 = Heartbeat::new(1000 * MS, 4000 * MS, last);
        hb3.on_activity(last + 3000 * MS);
        hb3.on_activity(last + 1000 * MS);
        assert_eq!(hb3.on_timeout(last + 3500 * MS), Beat::Idle);
    }

    #[test]
    fn tiny_settings_are_clamped_to_a_sane_tick() {
        let t0 = Instant::now();
        let hb = Heartbeat::new(Duration::ZERO, Duration::ZERO, t0);
        assert_eq!(hb.poll_timeout(), t0 + 10 * MS);
    }

    /// A sender and a receiver wired back to back: Data frames one way, Credit the other, with
    /// a reader that consumes at its own pace. Checks the window invariant at every step.
    fn run_stream(window: u64, chunk: usize, total: u64, read_per_step: u64) -> (u64, u64) {
        let mut send = SendWindow::new(window);
        let mut recv = RecvWindow::new(window);
        let mut data: VecDeque<u64> = VecDeque::new();
        let mut credit: VecDeque<u64> = VecDeque::new();
        let (mut sent, mut read, mut readable) = (0u64, 0u64, 0u64);
        let mut steps = 0;
        while read < total {
            steps += 1;
            assert!(steps < 10_000_000, "no progress: sent {sent} read {read}");
            // Sender: as much as credit allows.
            while sent < total {
                let n = send.take((total - sent) as usize, chunk);
                if n == 0 {
                    break;
                }
                sent += n as u64;
                data.push_back(n as u64);
            }
            // Link: one frame each way per step.
            if let Some(n) = data.pop_front() {
                recv.on_data(n)
                    .expect("the sender never exceeds the window");
                readable += n;
            }
            if let Some(c) = credit.pop_front() {
                send.add(c);
            }
            // Reader.
            let n = readable.min(read_per_step);
            if n > 0 {
                readable -= n;
                read += n;
                if let Some(c) = recv.on_consumed(n) {
                    credit.push_back(c);
                }
            }
            assert!(recv.buffered <= window);
        }
        (sent, read)
    }

    #[test]
    fn credit_pair_moves_everything_and_never_overruns() {
        for (window, chunk, per_step) in [
            (4 << 20, 256 << 10, 1 << 20),
            (4 << 20, 256 << 10, 1000),
            (1000, 300, 7),
            (1, 1, 1),
            (64 << 10, 256 << 10, 64 << 10),
        ] {
            let total = 10 * window + 17;
            assert_eq!(
                run_stream(window, chunk, total, per_step),
                (total, total),
                "window {window} chunk {chunk} reader {per_step}/step"
            );
        }
    }

    #[test]
    fn stalled_reader_stops_the_sender_at_the_window() {
        let window = 1000;
        let mut send = SendWindow::new(window);
        let mut recv = RecvWindow::new(window);
        let mut sent = 0;
        loop {
            let n = send.take(usize::MAX, 300);
            if n == 0 {
                break;
            }
            recv.on_data(n as u64).unwrap();
            sent += n;
        }
        assert_eq!(sent, 1000);
        assert!(send.is_empty());
        // One byte more is a violation.
        assert_eq!(recv.on_data(1), Err(WindowExceeded { window: 1000 }));
        // Consuming less than a quarter window returns nothing yet; crossing it returns all.
        assert_eq!(recv.on_consumed(249), None);
        assert_eq!(recv.on_consumed(1), Some(250));
        // A reader that leaves gives back everything still buffered.
        assert_eq!(recv.reader_gone(), 750);
        recv.on_data(1000).unwrap();
        recv.undeliverable(1000);
        assert_eq!(recv.reader_gone(), 0);
    }
}
