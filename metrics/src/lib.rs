//! dpu-offload metrics: what the link and its services are doing, for `offload status` and a
//! Prometheus endpoint.
//!
//! One process-wide registry ([`global`]): a daemon is one role, and the instrumentation points
//! in the services stay one call each (the fs server's dispatch calls [`fs_op`], the session
//! records its calls, streams, bytes and round trips through [`SessionStats`] and
//! [`ServiceStats`], the bridge counts its connections and bytes in [`bridge`]). Recording is a
//! few relaxed atomic adds; names are looked up under a read lock.
//!
//! Reading: [`Metrics::snapshot`] (serializable, what the control socket returns as JSON),
//! [`prometheus_text`] (the text exposition format, encoded by `prometheus-client`), served by
//! [`serve_http`] and [`control::serve`].

pub mod control;
mod hist;
mod prom;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use hist::{HistSnapshot, Histogram, BUCKETS_SECONDS};
pub use prom::{prometheus_text, serve_http};

/// Count, errors and latency of one kind of operation.
#[derive(Debug, Default)]
pub struct OpStats {
    count: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

impl OpStats {
    /// Records one finished operation.
    pub fn record(&self, took: Duration, ok: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.observe(took);
    }

    fn snapshot(&self, name: &str) -> OpSnapshot {
        let latency = self.latency.snapshot();
        OpSnapshot {
            name: name.to_string(),
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            p50_seconds: latency.quantile(0.5),
            p99_seconds: latency.quantile(0.99),
            latency,
        }
    }
}

/// What one service served for its peers: calls (request/response) and streams (an exec, a
/// bridged connection, a FIFO tunnel), with the streams still open.
#[derive(Debug, Default)]
pub struct ServiceStats {
    calls: OpStats,
    streams: OpStats,
    open_streams: AtomicI64,
}

impl ServiceStats {
    /// Records one call this side served.
    pub fn call_done(&self, took: Duration, ok: bool) {
        self.calls.record(took, ok);
    }

    /// Marks a served stream open; dropping the guard records its lifetime.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            stats: self.clone(),
            started: Instant::now(),
        }
    }
}

/// An open served stream (see [`ServiceStats::stream_opened`]).
#[derive(Debug)]
pub struct StreamGuard {
    stats: Arc<ServiceStats>,
    started: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.stats.streams.record(self.started.elapsed(), true);
    }
}

/// Connections and bytes through the shim bridge (proxied Unix sockets and stdio FIFOs).
#[derive(Debug, Default)]
pub struct BridgeStats {
    connections: AtomicU64,
    open_connections: AtomicI64,
    socket_bytes_out: AtomicU64,
    socket_bytes_in: AtomicU64,
    fifo_bytes_out: AtomicU64,
    fifo_bytes_in: AtomicU64,
}

/// Which way bridged bytes went, seen from this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read locally, sent to the peer.
    ToPeer,
    /// Received from the peer, written locally.
    FromPeer,
}

impl BridgeStats {
    /// A bridged socket connection started; dropping the guard marks it closed.
    pub fn connection(&'static self) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }

    /// Bytes moved over a bridged socket.
    pub fn socket_bytes(&self, dir: Direction, n: usize) {
        match dir {
            Direction::ToPeer => &self.socket_bytes_out,
            Direction::FromPeer => &self.socket_bytes_in,
        }
        .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes moved through a bridged FIFO.
    pub fn fifo_bytes(&self, dir: Direction, n: usize) {
        match dir {
            Direction::ToPeer => &self.fifo_bytes_out,
            Direction::FromPeer => &self.fifo_bytes_in,
        }
        .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An open bridged connection (see [`BridgeStats::connection`]).
#[derive(Debug)]
pub struct ConnectionGuard(&'static BridgeStats);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gauges only the session itself can read (streams open, calls in flight).
pub type SessionGauges = Box<dyn Fn() -> (usize, usize) + Send + Sync>;

/// Facts about one live session: who, over what, since when, bytes, round-trip time.
pub struct SessionStats {
    id: u64,
    peer: String,
    dialer: bool,
    started: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Last heartbeat round trip in nanoseconds; 0 before the first pong.
    rtt_ns: AtomicU64,
    ping: Mutex<Option<(u32, Instant)>>,
    gauges: OnceLock<SessionGauges>,
    closed: AtomicBool,
}

impl std::fmt::Debug for SessionStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStats")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish()
    }
}

impl SessionStats {
    /// Bytes read from the link (frames, headers included).
    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes written to the link.
    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A heartbeat ping with `seq` left now.
    pub fn ping_sent(&self, seq: u32) {
        *lock(&self.ping) = Some((seq, Instant::now()));
    }

    /// A pong for `seq` arrived: the round trip is the time since its ping.
    pub fn pong(&self, seq: u32) {
        let sent = lock(&self.ping).take_if(|(s, _)| *s == seq);
        if let Some((_, at)) = sent {
            let ns = at.elapsed().as_nanos().clamp(1, u64::MAX as u128) as u64;
            self.rtt_ns.store(ns, Ordering::Relaxed);
        }
    }

    /// Lets the session report its open streams and calls in flight.
    pub fn set_gauges(&self, f: SessionGauges) {
        let _ = self.gauges.set(f);
    }

    /// The session ended: it leaves the live list, its bytes stay in the totals.
    pub fn closed(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let m = global();
        m.closed_bytes_in
            .fetch_add(self.bytes_in.load(Ordering::Relaxed), Ordering::Relaxed);
        m.closed_bytes_out
            .fetch_add(self.bytes_out.load(Ordering::Relaxed), Ordering::Relaxed);
        lock(&m.sessions).remove(&self.id);
    }

    fn snapshot(&self) -> SessionSnapshot {
        let (streams, calls) = self.gauges.get().map(|g| g()).unwrap_or((0, 0));
        let rtt = self.rtt_ns.load(Ordering::Relaxed);
        SessionSnapshot {
            peer: self.peer.clone(),
            transport: transport_of(&self.peer).to_string(),
            role: if self.dialer { "dialer" } else { "acceptor" }.into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            rtt_seconds: (rtt > 0).then(|| rtt as f64 / 1e9),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            open_streams: streams as u64,
            calls_in_flight: calls as u64,
        }
    }
}

/// The link kind of a session peer string (`tcp:1.2.3.4:5`, `unix:pid=…`, `tcp://h:p`, …).
fn transport_of(peer: &str) -> &str {
    peer.split(':').next().unwrap_or("")
}

/// This daemon's identity, shown by `offload status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// `host` (listens) or `dpu` (dials).
    pub role: String,
    /// The address it listens on or dials.
    pub address: String,
    /// Services it offers its peer.
    pub services: Vec<String>,
}

/// The process-wide registry (see [`global`]).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    info: Mutex<DaemonInfo>,
    fs: RwLock<BTreeMap<&'static str, Arc<OpStats>>>,
    services: RwLock<BTreeMap<String, Arc<ServiceStats>>>,
    bridge: BridgeStats,
    sessions: Mutex<BTreeMap<u64, Arc<SessionStats>>>,
    next_session: AtomicU64,
    sessions_total: AtomicU64,
    reconnects: AtomicU64,
    closed_bytes_in: AtomicU64,
    closed_bytes_out: AtomicU64,
}

/// The registry every instrumentation point records into.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        started: Instant::now(),
        info: Mutex::default(),
        fs: RwLock::default(),
        services: RwLock::default(),
        bridge: BridgeStats::default(),
        sessions: Mutex::default(),
        next_session: AtomicU64::new(1),
        sessions_total: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        closed_bytes_in: AtomicU64::new(0),
        closed_bytes_out: AtomicU64::new(0),
    })
}

/// Records one fs request the server handled: the hook at the fs server's dispatch point.
pub fn fs_op(op: &'static str, took: Duration, ok: bool) {
    let m = global();
    let found = read(&m.fs).get(op).cloned();
    let stats = match found {
        Some(s) => s,
        None => write(&m.fs).entry(op).or_default().clone(),
    };
    stats.record(took, ok);
}

/// The stats of the served service `name` (created on first use).
pub fn service(name: &str) -> Arc<ServiceStats> {
    let m = global();
    if let Some(s) = read(&m.services).get(name) {
        return s.clone();
    }
    write(&m.services)
        .entry(name.to_string())
        .or_default()
        .clone()
}

/// The shim bridge's counters.
pub fn bridge() -> &'static BridgeStats {
    &global().bridge
}

/// A session was established with `peer`; it stays listed until [`SessionStats::closed`].
pub fn session_opened(peer: &str, dialer: bool) -> Arc<SessionStats> {
    let m = global();
    m.sessions_total.fetch_add(1, Ordering::Relaxed);
    let s = Arc::new(SessionStats {
        id: m.next_session.fetch_add(1, Ordering::Relaxed),
        peer: peer.to_string(),
        dialer,
        started: Instant::now(),
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        rtt_ns: AtomicU64::new(0),
        ping: Mutex::new(None),
        gauges: OnceLock::new(),
        closed: AtomicBool::new(false),
    });
    lock(&m.sessions).insert(s.id, s.clone());
    s
}

impl Metrics {
    /// Sets what `offload status` shows about this daemon.
    pub fn set_info(&self, info: DaemonInfo) {
        *lock(&self.info) = info;
    }

    /// A dialer re-established its session after losing it.
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything at this moment, for `offload status` and the exporters.
    pub fn snapshot(&self) -> Snapshot {
        // Snapshotted outside the registry's lock: a session's gauges take the session's own
        // lock, which a closing session holds while it leaves the registry.
        let live: Vec<Arc<SessionStats>> = lock(&self.sessions).values().cloned().collect();
        let sessions: Vec<SessionSnapshot> = live.iter().map(|s| s.snapshot()).collect();
        let live_in: u64 = sessions.iter().map(|s| s.bytes_in).sum();
        let live_out: u64 = sessions.iter().map(|s| s.bytes_out).sum();
        let b = &self.bridge;
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            info: lock(&self.info).clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            sessions_total: self.sessions_total.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            link_bytes_in: self.closed_bytes_in.load(Ordering::Relaxed) + live_in,
            link_bytes_out: self.closed_bytes_out.load(Ordering::Relaxed) + live_out,
            sessions,
            services: read(&self.services)
                .iter()
                .map(|(name, s)| ServiceSnapshot {
                    name: name.clone(),
                    calls: s.calls.snapshot("call"),
                    streams: s.streams.snapshot("stream"),
                    open_streams: s.open_streams.load(Ordering::Relaxed).max(0) as u64,
                })
                .collect(),
            fs_ops: read(&self.fs)
                .iter()
                .map(|(name, s)| s.snapshot(name))
                .collect(),
            bridge: BridgeSnapshot {
                connections: b.connections.load(Ordering::Relaxed),
                open_connections: b.open_connections.load(Ordering::Relaxed).max(0) as u64,
                socket_bytes_out: b.socket_bytes_out.load(Ordering::Relaxed),
                socket_bytes_in: b.socket_bytes_in.load(Ordering::Relaxed),
                fifo_bytes_out: b.fifo_bytes_out.load(Ordering::Relaxed),
                fifo_bytes_in: b.fifo_bytes_in.load(Ordering::Relaxed),
            },
        }
    }
}

/// One operation kind's totals and latency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpSnapshot {
    /// Operation (fs op name such as `lookup`, or `call`/`stream` for a service).
    pub name: String,
    /// Finished operations.
    pub count: u64,
    /// Of which failed (for fs: any errno, ENOENT included).
    pub errors: u64,
    /// Median latency (seconds), interpolated within its histogram bucket.
    pub p50_seconds: Option<f64>,
    /// 99th percentile latency (seconds).
    pub p99_seconds: Option<f64>,
    /// The histogram itself.
    pub latency: HistSnapshot,
}

/// A served service's calls and streams.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    /// Service name on the wire (`fs`, `exec`, `bridge`, `mount`).
    pub name: String,
    /// Request/response calls served.
    pub calls: OpSnapshot,
    /// Streams served (latency = how long each stayed open).
    pub streams: OpSnapshot,
    /// Streams open now.
    pub open_streams: u64,
}

/// One live session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// The peer as the link names it.
    pub peer: String,
    /// Link kind (`tcp`, `unix`, `vsock`, `rdma`, …).
    pub transport: String,
    /// `dialer` (this side connected) or `acceptor`.
    pub role: String,
    /// Seconds since the handshake.
    pub uptime_seconds: f64,
    /// Last heartbeat round trip (seconds); none before the first idle-link ping.
    pub rtt_seconds: Option<f64>,
    /// Bytes received over the link.
    pub bytes_in: u64,
    /// Bytes sent over the link.
    pub bytes_out: u64,
    /// Streams open in either direction.
    pub open_streams: u64,
    /// Calls this side is serving now.
    pub calls_in_flight: u64,
}

/// The bridge's totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BridgeSnapshot {
    /// Bridged socket connections so far.
    pub connections: u64,
    /// Bridged socket connections open now.
    pub open_connections: u64,
    /// Socket bytes sent to the peer.
    pub socket_bytes_out: u64,
    /// Socket bytes received from the peer.
    pub socket_bytes_in: u64,
    /// FIFO bytes sent to the peer.
    pub fifo_bytes_out: u64,
    /// FIFO bytes received from the peer.
    pub fifo_bytes_in: u64,
}

/// Everything `offload status` shows, as the control socket returns it (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Daemon version.
    pub version: String,
    /// Daemon pid.
    pub pid: u32,
    /// Role, address, services.
    pub info: DaemonInfo,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// Sessions established since start.
    pub sessions_total: u64,
    /// Times a dialer re-established a lost session.
    pub reconnects: u64,
    /// Link bytes received, all sessions.
    pub link_bytes_in: u64,
    /// Link bytes sent, all sessions.
    pub link_bytes_out: u64,
    /// Live sessions.
    pub sessions: Vec<SessionSnapshot>,
    /// Served services.
    pub services: Vec<ServiceSnapshot>,
    /// fs requests served, per operation.
    pub fs_ops: Vec<OpSnapshot>,
    /// Shim bridge totals.
    pub bridge: BridgeSnapshot,
}

// Poison-tolerant access, as `transport::sync::lock` (this crate sits below transport, so it
// keeps its own three; a panicked scrape must not stop the counters).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_in_snapshot() {
        fs_op("lookup", Duration::from_micros(30), true);
        fs_op("lookup", Duration::from_micros(50), false);
        let svc = service("exec");
        svc.call_done(Duration::from_millis(2), true);
        {
            let _g = svc.stream_opened();
            assert_eq!(
                global()
                    .snapshot()
                    .services
                    .iter()
                    .find(|s| s.name == "exec")
                    .map(|s| s.open_streams),
                Some(1)
            );
        }
        let s = session_opened("tcp:127.0.0.1:1", true);
        s.add_in(10);
        s.add_out(20);
        s.ping_sent(7);
        s.pong(6); // not ours: ignored
        assert!(s.snapshot().rtt_seconds.is_none());
        s.pong(7);
        assert!(s.snapshot().rtt_seconds.is_some_and(|r| r > 0.0));
        let snap = global().snapshot();
        let l = snap.fs_ops.iter().find(|o| o.name == "lookup").unwrap();
        assert!(l.count >= 2 && l.errors >= 1);
        let exec = snap.services.iter().find(|s| s.name == "exec").unwrap();
        assert_eq!(exec.open_streams, 0);
        assert!(exec.streams.count >= 1 && exec.calls.count >= 1);
        assert_eq!(snap.sessions.len(), 1);
        assert_eq!(snap.sessions[0].transport, "tcp");
        s.closed();
        let snap = global().snapshot();
        assert!(snap.sessions.is_empty());
        assert!(snap.link_bytes_in >= 10 && snap.link_bytes_out >= 20);
        // JSON round trip, as `offload status` reads it.
        let text = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back.fs_ops.len(), snap.fs_ops.len());
    }
}
