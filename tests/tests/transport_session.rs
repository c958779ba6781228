//! The session layer over real sockets, for every link kind in `OFFLOAD_TEST_LINKS`
//! (tcp and unix here; vsock and rdma inside the VM tier).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use transport::{
    CallError, Endpoint, Key, Registry, RemoteError, Service, Session, SessionConfig, Stream,
};

/// Echoes calls (a call "big" is answered with [`BIG`] bytes); streams: echoes everything back, then finishes. Header "sink" reads and
/// discards; header "stall" never reads; header "hash" replies with the sha256 of all input.
/// Every session it is attached to is reported on `sessions` (to call back the other way).
struct Echo {
    sessions: mpsc::UnboundedSender<Session>,
}

#[transport::async_trait]
impl Service for Echo {
    async fn call(&self, _s: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        if &req[..] == b"fail" {
            return Err(RemoteError::new(42, "asked to fail"));
        }
        if &req[..] == b"big" {
            return Ok(Bytes::from(vec![1u8; BIG]));
        }
        if req.starts_with(b"sleep") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(req)
    }

    async fn stream(&self, _s: &Session, header: Bytes, stream: Stream) {
        match &header[..] {
            b"stall" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(stream);
            }
            b"burst" => {
                // Send and drop at once: what was sent must still arrive, then EOF.
                let mut stream = stream;
                let _ = stream.send(Bytes::from(vec![5u8; 3 << 20])).await;
                drop(stream);
            }
            b"hash" => {
                let (mut rd, mut wr) = stream.split();
                let mut h = Sha256::new();
                while let Ok(Some(b)) = rd.recv().await {
                    h.update(&b);
                }
                let _ = wr.send(Bytes::copy_from_slice(&h.finalize())).await;
                let _ = wr.finish();
            }
            _ => {
                let (mut rd, mut wr) = stream.split();
                while let Ok(Some(b)) = rd.recv().await {
                    if wr.send(b).await.is_err() {
                        return;
                    }
                }
                let _ = wr.finish();
            }
        }
    }

    fn attached(&self, session: &Session) {
        let _ = self.sessions.send(session.clone());
    }
}

/// Size of the answer to a call "big".
const BIG: usize = 256 << 10;

fn echo_registry() -> (Registry, mpsc::UnboundedReceiver<Session>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Registry::new().with("echo", Arc::new(Echo { sessions: tx })),
        rx,
    )
}

fn key() -> Key {
    Key::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
}

/// Heartbeat timeout for these tests: short here, wider in the emulated VM tier (`IN_TEST_VM`),
/// where a busy guest can stall a task for seconds.
fn heartbeat_timeout() -> Duration {
    if std::env::var_os("IN_TEST_VM").is_some() {
        Duration::from_secs(8)
    } else {
        Duration::from_millis(1500)
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: heartbeat_timeout(),
        handshake_timeout: Duration::from_secs(10),
        ..SessionConfig::new(Some(key()))
    }
}

struct Server {
    ep: Endpoint,
    sessions: mpsc::UnboundedReceiver<Session>,
    _dir: tempfile::TempDir,
}

async fn server(kind: &str, cfg: SessionConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = tests::listen_url(kind, dir.path());
    let listener = transport::listen(&url.parse().unwrap()).await.unwrap();
    let ep: Endpoint = tests::connect_url(&listener.local_endpoint().to_string())
        .parse()
        .unwrap();
    let (reg, sessions) = echo_registry();
    tokio::spawn(transport::serve(listener, cfg, reg));
    Server {
        ep,
        sessions,
        _dir: dir,
    }
}

async fn client(ep: &Endpoint) -> (Session, mpsc::UnboundedReceiver<Session>) {
    let (reg, rx) = echo_registry();
    (Session::connect(ep, cfg(), reg).await.unwrap(), rx)
}

/// Runs `f` once per link kind under test.
async fn for_each_link<F, Fut>(f: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    tests::init_tracing();
    for kind in tests::link_kinds() {
        eprintln!("--- link {kind}");
        f(kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_streams_in_both_directions() {
    for_each_link(|kind| async move {
        let mut srv = server(&kind, cfg()).await;
        let (c, _) = client(&srv.ep).await;
        assert_eq!(c.peer_services(), ["echo".to_string()]);
        // client -> server
        let r = c.call("echo", Bytes::from_static(b"ping")).await.unwrap();
        assert_eq!(&r[..], b"ping");
        let err = c
            .call("echo", Bytes::from_static(b"fail"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            CallError::Remote(RemoteError::new(42, "asked to fail"))
        );
        let err = c.call("nope", Bytes::new()).await.unwrap_err();
        assert_eq!(err, CallError::UnknownService("nope".into()));
        // server -> client, on the same session
        let s = srv.sessions.recv().await.unwrap();
        let r = s.call("echo", Bytes::from_static(b"back")).await.unwrap();
        assert_eq!(&r[..], b"back");
        // streams opened by each side
        for opener in [&c, &s] {
            let mut st = opener.open_stream("echo", Bytes::new()).await.unwrap();
            st.write_all(b"hello ").await.unwrap();
            st.send(Bytes::from_static(b"world")).await.unwrap();
            st.finish().await.unwrap();
            let mut got = Vec::new();
            st.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello world");
        }
        // a stream to an unknown service is reset
        let mut st = c.open_stream("nope", Bytes::new()).await.unwrap();
        let e = st.recv().await.unwrap_err();
        assert!(e.to_string().contains("no service"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_on_one_session() {
    for_each_link(|kind| async move {
        let srv = server(&kind, cfg()).await;
        let (c, _) = client(&srv.ep).await;
        let mut tasks = Vec::new();
        for i in 0..1000u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let body = Bytes::from(format!("call-{i}").into_bytes());
                let r = c.call("echo", body.clone()).await.unwrap();
                assert_eq!(r, body);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_blocks_neither_calls_nor_other_streams() {
    for_each_link(|kind| async move {
        let srv = server(&kind, cfg()).await;
        let (c, _) = client(&srv.ep).await;
        let mut stalled = c
            .open_stream("echo", Bytes::from_static(b"stall"))
            .await
            .unwrap();
        // Fill the stalled stream's window (4 MiB by default) and more: the writer must block.
        let filler = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; 1 << 20]);
            for _ in 0..16 {
                if stalled.send(chunk.clone()).await.is_err() {
                    break;
                }
            }
            stalled
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !filler.is_finished(),
            "a stalled reader must stop its sender"
        );
        // Calls and another stream still flow, with a generous liveness bound.
        let live = async {
            for _ in 0..100 {
                c.call("echo", Bytes::from_static(b"x")).await.unwrap();
            }
            let st = c.open_stream("echo", Bytes::new()).await.unwrap();
            let data = Bytes::from(vec![1u8; 8 << 20]);
            let (mut rd, mut wr) = st.split();
            let send = async {
                wr.send(data.clone()).await.unwrap();
                wr.finish().unwrap();
            };
            let recv = async {
                let mut n = 0;
                while let Some(b) = rd.recv().await.unwrap() {
                    n += b.len();
                }
                n
            };
            let ((), n) = tokio::join!(send, recv);
            assert_eq!(n, data.len());
        };
        tokio::time::timeout(Duration::from_secs(20), live)
            .await
            .expect("calls and other streams must proceed while one stream is stalled");
        filler.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_arrive_intact() {
    for_each_link(|kind| async move {
        let srv = server(&kind, cfg()).await;
        let (c, _) = client(&srv.ep).await;
        let mut data = vec![0u8; 64 << 20];
        let mut x = 0x12345678u32;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let want = Sha256::digest(&data).to_vec();
        let st = c
            .open_stream("echo", Bytes::from_static(b"hash"))
            .await
            .unwrap();
        let (mut rd, mut wr) = st.split();
        let data = Bytes::from(data);
        wr.send(data.clone()).await.unwrap();
        wr.finish().unwrap();
        let got = rd.recv().await.unwrap().unwrap();
        assert_eq!(got.to_vec(), want, "sha256 of 64 MiB through a stream");
        // And echoed back through AsyncRead/AsyncWrite, both directions at once.
        let st = c.open_stream("echo", Bytes::new()).await.unwrap();
        let (mut rd, mut wr) = st.split();
        let w = tokio::spawn(async move {
            for part in data.chunks(1 << 20) {
                wr.write_all(part).await.unwrap();
            }
            wr.shutdown().await.unwrap();
        });
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            h.update(&buf[..n]);
        }
        w.await.unwrap();
        assert_eq!(total, 64 << 20);
        assert_eq!(h.finalize().to_vec(), want);
        // A 8 MiB call (within the frame limit) round-trips too.
        let big = Bytes::from(vec![9u8; 8 << 20]);
        assert_eq!(c.call("echo", big.clone()).await.unwrap(), big);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_and_reset() {
    for_each_link(|kind| async move {
        let srv = server(&kind, cfg()).await;
        let (c, _) = client(&srv.ep).await;
        // After our finish, the echo side still sends what it had.
        let mut st = c.open_stream("echo", Bytes::new()).await.unwrap();
        st.send(Bytes::from_static(b"abc")).await.unwrap();
        st.finish().await.unwrap();
        assert!(
            st.send(Bytes::from_static(b"late")).await.is_err(),
            "write after finish"
        );
        assert_eq!(&st.recv().await.unwrap().unwrap()[..], b"abc");
        assert!(
            st.recv().await.unwrap().is_none(),
            "EOF after the peer finished"
        );
        // A service that sends and drops the stream at once: every byte arrives, then EOF.
        for _ in 0..20 {
            let mut st = c
                .open_stream("echo", Bytes::from_static(b"burst"))
                .await
                .unwrap();
            let mut got = Vec::new();
            st.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), 3 << 20);
        }
        // A reset reaches the service's reader as an error, and the session goes on.
        let st = c
            .open_stream("echo", Bytes::from_static(b"stall"))
            .await
            .unwrap();
        st.reset();
        assert_eq!(
            &c.call("echo", Bytes::from_static(b"ok")).await.unwrap()[..],
            b"ok"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_calls_fail_when_the_peer_dies_or_goes_silent() {
    tests::init_tracing();
    // A peer whose connection drops mid-call: the call fails at once with a clear error.
    let srv = server("tcp", cfg()).await;
    let (c, _) = client(&srv.ep).await;
    let c2 = c.clone();
    let pending = tokio::spawn(async move { c2.call("echo", Bytes::from_static(b"sleep")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut srv = srv;
    let s = srv.sessions.recv().await.unwrap();
    s.close();
    let err = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("call must fail, not hang")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::Closed(_)), "{err}");

    // A silent peer (a TCP proxy that stops forwarding): heartbeats fail the call within the
    // configured timeout (1.5 s; 8 s in the VM) — bounded generously for a loaded machine.
    let srv = server("tcp", cfg()).await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = proxy.local_addr().unwrap();
    let target = srv.ep.to_string().trim_start_matches("tcp://").to_string();
    let (freeze_tx, freeze_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (mut a, _) = proxy.accept().await.unwrap();
        let mut b = tokio::net::TcpStream::connect(target).await.unwrap();
        let mut frozen = freeze_rx;
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let mut x = [0u8; 65536];
        let mut y = [0u8; 65536];
        loop {
            // Biased, freeze first: bytes that arrive after the freeze are never forwarded,
            // even when they are ready in the same poll.
            tokio::select! {
                biased;
                _ = frozen.changed() => { tokio::time::sleep(Duration::from_secs(3600)).await; }
                n = ar.read(&mut x) => { let n = n.unwrap(); if n == 0 { break } bw.write_all(&x[..n]).await.unwrap(); }
                n = br.read(&mut y) => { let n = n.unwrap(); if n == 0 { break } aw.write_all(&y[..n]).await.unwrap(); }
            }
        }
    });
    let pep: Endpoint = format!("tcp://{paddr}").parse().unwrap();
    let (c, _) = client(&pep).await;
    assert_eq!(
        &c.call("echo", Bytes::from_static(b"1")).await.unwrap()[..],
        b"1"
    );
    freeze_tx.send(true).unwrap();
    let t0 = Instant::now();
    let err = tokio::time::timeout(
        heartbeat_timeout() + Duration::from_secs(8),
        c.call("echo", Bytes::from_static(b"2")),
    )
    .await
    .expect("heartbeat must fail the call")
    .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Closed(transport::CloseReason::HeartbeatTimeout(_))
        ),
        "{err}"
    );
    eprintln!("silent peer detected after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_is_enforced_per_session() {
    let srv = server(
        "tcp",
        SessionConfig {
            max_streams: 4,
            ..cfg()
        },
    )
    .await;
    let (c, _) = client(&srv.ep).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            c.open_stream("echo", Bytes::from_static(b"stall"))
                .await
                .unwrap(),
        );
    }
    let mut extra = c.open_stream("echo", Bytes::new()).await.unwrap();
    let e = extra.recv().await.unwrap_err();
    assert!(e.to_string().contains("too many streams"), "{e}");
    assert_eq!(
        &c.call("echo", Bytes::from_static(b"alive")).await.unwrap()[..],
        b"alive"
    );
}

/// Checks that the calls of each sender arrive in the order they were sent: bodies are
/// `sender:seq:padding`; a call out of order fails with code 1.
#[derive(Default)]
struct Order {
    last: std::sync::Mutex<std::collections::HashMap<u32, u32>>,
}

#[transport::async_trait]
impl Service for Order {
    async fn call(&self, _s: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let text = String::from_utf8_lossy(&req[..req.len().min(32)]).into_owned();
        let mut it = text.split(':');
        let (Some(Ok(sender)), Some(Ok(seq))) = (
            it.next().map(str::parse::<u32>),
            it.next().map(str::parse::<u32>),
        ) else {
            return Err(RemoteError::new(2, "malformed"));
        };
        let mut last = self.last.lock().unwrap();
        let prev = last.insert(sender, seq);
        if prev.is_some_and(|p| p + 1 != seq) || (prev.is_none() && seq != 0) {
            return Err(RemoteError::new(
                1,
                format!("{sender}: {prev:?} then {seq}"),
            ));
        }
        Ok(Bytes::copy_from_slice(&req[req.len().saturating_sub(8)..]))
    }
}

/// `direct_send`: plain threads (no runtime) write calls themselves when nothing is queued
/// ahead, and queue them otherwise (large bodies fill the socket and leave the rest to the
/// writer task), alongside a bulk stream on the data channel. Every call of a thread must
/// arrive in order, intact, and be answered exactly once, through `call_then` or `start_call`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_sends_from_plain_threads_stay_in_order() {
    for_each_link(|kind| async move {
        let dir = tempfile::tempdir().unwrap();
        let url = tests::listen_url(&kind, dir.path());
        let listener = transport::listen(&url.parse().unwrap()).await.unwrap();
        let ep: Endpoint = tests::connect_url(&listener.local_endpoint().to_string())
            .parse()
            .unwrap();
        let (reg, _) = echo_registry();
        let reg = reg.with("order", Arc::new(Order::default()));
        tokio::spawn(transport::serve(listener, cfg(), reg));
        let direct = SessionConfig {
            // Large enough that the 3 MiB calls are tried directly and left half-written
            // (on links that allow it: RDMA's connection says no and the session queues all).
            direct_send: 8 << 20,
            ..cfg()
        };
        let c = Session::connect(&ep, direct, echo_registry().0)
            .await
            .unwrap();

        // Bulk data on a stream meanwhile.
        let s = c
            .open_stream("echo", Bytes::from_static(b""))
            .await
            .unwrap();
        let bulk = tokio::spawn(async move {
            let (mut rd, mut wr) = s.split();
            let reader = tokio::spawn(async move {
                let mut n = 0usize;
                while let Ok(Some(b)) = rd.recv().await {
                    n += b.len();
                }
                n
            });
            for _ in 0..64 {
                wr.send(Bytes::from(vec![9u8; 256 << 10])).await.unwrap();
            }
            wr.finish().unwrap();
            reader.await.unwrap()
        });

        let rt = tokio::runtime::Handle::current();
        let threads: Vec<_> = (0..6u32)
            .map(|t| {
                let c = c.clone();
                let rt = rt.clone();
                std::thread::spawn(move || {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let n = 200u32;
                    for seq in 0..n {
                        let pad = if seq % 50 == 7 {
                            3 << 20
                        } else {
                            (seq as usize * 37) % 4096
                        };
                        let mut body = format!("{t}:{seq}:").into_bytes();
                        body.resize(body.len() + pad, b'.');
                        body.extend_from_slice(format!("{:08}", seq).as_bytes());
                        let want = Bytes::copy_from_slice(&body[body.len() - 8..]);
                        let body = Bytes::from(body);
                        if seq % 3 == 0 {
                            let fut = c.start_call("order", body).unwrap();
                            let tx = tx.clone();
                            rt.spawn(async move {
                                let _ = tx.send((fut.await, want));
                            });
                        } else {
                            let tx = tx.clone();
                            c.call_then("order", body, move |r| {
                                let _ = tx.send((r, want));
                            });
                        }
                    }
                    drop(tx);
                    let mut answered = 0;
                    for (r, want) in rx {
                        assert_eq!(r.expect("call failed"), want);
                        answered += 1;
                    }
                    assert_eq!(answered, n);
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            for t in threads {
                t.join().unwrap();
            }
        })
        .await
        .unwrap();
        assert_eq!(bulk.await.unwrap(), 64 * (256 << 10));
        // The session is still healthy afterwards.
        assert_eq!(
            c.call("echo", Bytes::from_static(b"after")).await.unwrap(),
            Bytes::from_static(b"after")
        );
    })
    .await;
}

/// This process's resident set in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A peer that keeps sending calls but never reads their answers (a proxy between it and the
/// server stops forwarding the server's bytes): the server stops reading once
/// `max_unread_answers` are queued, so its memory stays bounded however many calls the peer
/// sends (unbounded, the 4 000 calls below queue 1 GiB of answers); it drops the peer after the
/// heartbeat timeout as not reading, and serves another client meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_its_answers_is_paused_then_dropped() {
    for_each_link(|kind| async move {
        let mut srv = server(
            &kind,
            SessionConfig {
                max_unread_answers: 4 << 20,
                ..cfg()
            },
        )
        .await;
        // The proxy: the peer's bytes always go to the server; the server's go back until
        // `stop`, then stay unread.
        let dir = tempfile::tempdir().unwrap();
        let url = tests::listen_url(&kind, dir.path());
        let mut proxy = transport::listen(&url.parse().unwrap()).await.unwrap();
        let proxy_ep: Endpoint = tests::connect_url(&proxy.local_endpoint().to_string())
            .parse()
            .unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let target = srv.ep.clone();
        tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let s = transport::connect(&target).await.unwrap();
            let (mut cr, mut cw) = tokio::io::split(c);
            let (mut sr, mut sw) = tokio::io::split(s);
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = async { let _ = stopped.wait_for(|s| *s).await; } => break,
                    n = sr.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    },
                }
            }
            // Both connections stay open, the server's side unread.
            std::future::pending::<()>().await;
            drop((sr, cw));
        });
        // The peer does not give up on its own (long heartbeat timeout).
        let peer = Session::connect(
            &proxy_ep,
            SessionConfig {
                heartbeat_timeout: Duration::from_secs(600),
                ..cfg()
            },
            Registry::new(),
        )
        .await
        .unwrap();
        let on_server = srv.sessions.recv().await.unwrap();
        assert_eq!(
            peer.call("echo", Bytes::from_static(b"big"))
                .await
                .unwrap()
                .len(),
            BIG
        );
        let base = rss_kib();
        stop.send(true).unwrap();
        let mut waiting = Vec::new();
        for _ in 0..4000 {
            waiting.push(peer.start_call("echo", Bytes::from_static(b"big")).unwrap());
        }
        // Meanwhile another client is served, and the server's memory is sampled.
        let (other, _) = client(&srv.ep).await;
        let t0 = Instant::now();
        let mut peak = base;
        let reason = loop {
            assert_eq!(
                &other.call("echo", Bytes::from_static(b"hi")).await.unwrap()[..],
                b"hi"
            );
            peak = peak.max(rss_kib());
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), on_server.closed()).await
            {
                break r;
            }
            assert!(
                t0.elapsed() < heartbeat_timeout() * 10,
                "[{kind}] the server kept a peer that reads nothing"
            );
        };
        let grown_mib = peak.saturating_sub(base) / 1024;
        eprintln!(
            "[{kind}] dropped after {:?}: {reason}; RSS grew {grown_mib} MiB",
            t0.elapsed()
        );
        assert!(
            matches!(reason, transport::CloseReason::PeerNotReading(_)),
            "[{kind}] {reason}"
        );
        assert!(
            grown_mib < 256,
            "[{kind}] RSS grew {grown_mib} MiB while the peer read nothing"
        );
        drop(waiting);
    })
    .await;
}
