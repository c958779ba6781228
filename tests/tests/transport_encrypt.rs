//! Confidentiality and integrity of sessions on network links: what an on-path observer sees,
//! what happens when it alters a byte, and the encryption policy both ends must share. Real
//! TCP sockets through a real relaying proxy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{
    CallError, CloseReason, EncryptPolicy, Endpoint, HandshakeError, Key, Registry, RemoteError,
    Service, Session, SessionConfig, SessionError, Stream,
};

/// Echoes calls; a stream gets its header back, then every byte it sends.
struct Echo;

#[transport::async_trait]
impl Service for Echo {
    async fn call(&self, _s: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        Ok(req)
    }

    async fn stream(&self, _s: &Session, header: Bytes, mut stream: Stream) {
        if stream.write_all(&header).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
    }
}

fn key() -> Key {
    Key::from_bytes(vec![5u8; 32]).unwrap()
}

fn cfg(encrypt: EncryptPolicy) -> SessionConfig {
    SessionConfig {
        handshake_timeout: Duration::from_secs(5),
        encrypt,
        ..SessionConfig::new(Some(key()))
    }
}

/// What the proxy saw and may do.
#[derive(Default)]
struct Wire {
    /// Every byte relayed, both directions.
    seen: Mutex<Vec<u8>>,
    /// Flip one bit in the next client → server chunk.
    tamper: AtomicBool,
}

/// A relaying TCP proxy for one connection to `target`: records everything, optionally flips
/// a bit. Returns the address to dial.
async fn proxy(target: std::net::SocketAddr, wire: Arc<Wire>) -> Endpoint {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = format!("tcp://{}", l.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move {
        let Ok((c, _)) = l.accept().await else { return };
        let Ok(up) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let (cr, cw) = c.into_split();
        let (ur, uw) = up.into_split();
        let relay = |mut r: tokio::net::tcp::OwnedReadHalf,
                     mut w: tokio::net::tcp::OwnedWriteHalf,
                     wire: Arc<Wire>,
                     may_tamper: bool| async move {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                wire.seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if may_tamper && wire.tamper.swap(false, Ordering::SeqCst) {
                    buf[n / 2] ^= 0x20;
                }
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        };
        tokio::spawn(relay(ur, cw, wire.clone(), false));
        relay(cr, uw, wire, true).await;
    });
    ep
}

/// A TCP server whose sessions the test can watch: each accepted connection runs the
/// handshake with `server_cfg`; outcomes arrive on the channel.
async fn server(
    server_cfg: SessionConfig,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<Session, HandshakeError>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((c, peer)) = l.accept().await {
            let encrypt = server_cfg.encrypt.tcp;
            let r = Session::start(
                Box::new(c),
                server_cfg.clone(),
                Registry::new().with("echo", Arc::new(Echo)),
                false,
                peer.to_string(),
                encrypt,
            )
            .await;
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    (addr, rx)
}

/// Log lines written by the session (to check what an operator would see).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MARKER: &[u8] = b"MARKER-known-plaintext-7f3a9c";

/// Sends the marker every way a service can: call, reply, stream header and stream data.
async fn send_marker(s: &Session) {
    let mut req = MARKER.to_vec();
    req.extend_from_slice(&[b'x'; 100_000]);
    let r = s.call("echo", Bytes::from(req.clone())).await.unwrap();
    assert!(r[..] == req[..]);
    let mut st = s
        .open_stream("echo", Bytes::from_static(MARKER))
        .await
        .unwrap();
    st.write_all(MARKER).await.unwrap();
    st.shutdown().await.unwrap();
    let mut back = Vec::new();
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, [MARKER, MARKER].concat());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Encrypted by default on tcp: a passive capture of the whole session holds no plaintext of a
/// known marker; the same exchange with encryption off shows it (so the capture is real).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_capture_shows_no_plaintext() {
    tests::init_tracing();
    for encrypt in [true, false] {
        let policy = if encrypt {
            EncryptPolicy::default()
        } else {
            EncryptPolicy::all(false)
        };
        let (addr, mut accepted) = server(cfg(policy)).await;
        let wire = Arc::new(Wire::default());
        let ep = proxy(addr, wire.clone()).await;
        let c = Session::connect(&ep, cfg(policy), Registry::new())
            .await
            .unwrap();
        let s = accepted.recv().await.unwrap().unwrap();
        send_marker(&c).await;
        // And the other direction (the HOST calling the DPU's services runs the same code).
        let r = s.call("nothing", Bytes::from_static(MARKER)).await;
        assert!(matches!(r, Err(CallError::UnknownService(_))), "{r:?}");
        c.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.closed()).await;
        let seen = wire.seen.lock().unwrap().clone();
        assert!(seen.len() > 200_000, "capture too short: {}", seen.len());
        assert_eq!(
            contains(&seen, MARKER),
            !encrypt,
            "encrypt = {encrypt}: marker visible on the wire = {}",
            contains(&seen, MARKER)
        );
        // The 100 000 'x' run is as visible as the marker when clear.
        assert_eq!(contains(&seen, &[b'x'; 64]), !encrypt);
    }
}

/// One flipped bit on the wire ends the session on the side that receives it, with an
/// integrity error in its log; pending work fails on both sides. Current-thread runtime: the
/// log subscriber is per thread, and every task of the test runs on this one.
#[tokio::test]
async fn tampered_byte_ends_the_session() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (addr, mut accepted) = server(cfg(EncryptPolicy::default())).await;
    let wire = Arc::new(Wire::default());
    let ep = proxy(addr, wire.clone()).await;
    let c = Session::connect(&ep, cfg(EncryptPolicy::default()), Registry::new())
        .await
        .unwrap();
    let s = accepted.recv().await.unwrap().unwrap();
    let r = c.call("echo", Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(&r[..], b"before");
    wire.tamper.store(true, Ordering::SeqCst);
    let r = c.call("echo", Bytes::from(vec![7u8; 4096])).await;
    assert!(matches!(r, Err(CallError::Closed(_))), "{r:?}");
    let reason = tokio::time::timeout(Duration::from_secs(5), s.closed())
        .await
        .expect("the receiving side ends the session");
    assert!(
        matches!(&reason, CloseReason::Integrity(m) if m.contains("authentication")),
        "{reason:?}"
    );
    assert!(!wire.tamper.load(Ordering::SeqCst), "the bit was flipped");
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("WARN") && text.contains("integrity check failed"),
        "log: {text}"
    );
    // The session stays dead: no call gets through after the tampering.
    let r = c.call("echo", Bytes::from_static(b"after")).await;
    assert!(matches!(r, Err(CallError::Closed(_))), "{r:?}");
}

fn handshake_err(e: SessionError) -> HandshakeError {
    match e {
        SessionError::Handshake { source, .. } => source,
        other => panic!("expected a handshake error, got {other}"),
    }
}

/// A peer asking for less (or more) encryption than the local policy is refused, with an error
/// naming both settings on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_mismatch_is_refused_on_both_sides() {
    tests::init_tracing();
    for (server_on, client_on) in [(true, false), (false, true)] {
        let (addr, mut accepted) = server(cfg(EncryptPolicy::all(server_on))).await;
        let ep: Endpoint = format!("tcp://{addr}").parse().unwrap();
        let e = Session::connect(&ep, cfg(EncryptPolicy::all(client_on)), Registry::new())
            .await
            .unwrap_err();
        let e = handshake_err(e);
        assert!(
            matches!(e, HandshakeError::EncryptionMismatch { ours, theirs } if ours == client_on && theirs == server_on),
            "client: {e}"
        );
        assert!(e.to_string().contains("encrypt"), "{e}");
        let se = accepted.recv().await.unwrap().unwrap_err();
        assert!(
            matches!(se, HandshakeError::EncryptionMismatch { ours, theirs } if ours == server_on && theirs == client_on),
            "server: {se}"
        );
    }
    // Matching policies on the same server work (the refusal is about policy, not the port).
    let (addr, mut accepted) = server(cfg(EncryptPolicy::all(false))).await;
    let ep: Endpoint = format!("tcp://{addr}").parse().unwrap();
    let c = Session::connect(&ep, cfg(EncryptPolicy::all(false)), Registry::new())
        .await
        .unwrap();
    assert!(accepted.recv().await.unwrap().is_ok());
    assert_eq!(
        &c.call("echo", Bytes::from_static(b"ok")).await.unwrap()[..],
        b"ok"
    );
}

/// Unix links default to clear; both ends may turn encryption on, and bulk data of every size
/// crosses intact (frames spanning several records, records holding many frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_on_a_unix_link_and_bulk_integrity() {
    tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let url: Endpoint = format!("unix://{}/enc.sock", dir.path().display())
        .parse()
        .unwrap();
    assert!(!EncryptPolicy::default().for_endpoint(&url));
    let l = transport::listen(&url).await.unwrap();
    tokio::spawn(transport::serve(
        l,
        cfg(EncryptPolicy::all(true)),
        Registry::new().with("echo", Arc::new(Echo)),
    ));
    // The default (clear) client is refused by this server...
    let e = Session::connect(&url, cfg(EncryptPolicy::default()), Registry::new())
        .await
        .unwrap_err();
    assert!(matches!(
        handshake_err(e),
        HandshakeError::EncryptionMismatch {
            ours: false,
            theirs: true
        }
    ));
    // ...an encrypting one is served.
    let c = Session::connect(&url, cfg(EncryptPolicy::all(true)), Registry::new())
        .await
        .unwrap();
    for len in [0usize, 1, 4095, 65_536, 1 << 20, (3 << 20) + 17] {
        let body: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let r = c.call("echo", Bytes::from(body.clone())).await.unwrap();
        assert!(r[..] == body[..], "call of {len} bytes");
    }
    // Many concurrent small calls share records.
    let calls: Vec<_> = (0..200u32)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let r = c.call("echo", Bytes::from(i.to_le_bytes().to_vec())).await;
                assert_eq!(&r.unwrap()[..], &i.to_le_bytes());
            })
        })
        .collect();
    for t in calls {
        t.await.unwrap();
    }
    send_marker(&c).await;
}

/// The binaries follow the policy from their config and flags, with the seed's conventions
/// (`CMD_NET_ADDR=tcp://…`): a HOST `rexec_server` with `[transport.tcp] encrypt = false`
/// refuses a default (encrypting) `rexec` with a message naming both settings on both sides,
/// serves one started with `--encrypt false`, and one whose DPU config says the same.
#[test]
fn binaries_follow_config_and_flag() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let key = tests::write_key(dir.path(), "psk");
    let cfg = dir.path().join("host.toml");
    std::fs::write(
        &cfg,
        "[exec]\nallow = [\"/bin/echo\"]\n[transport.tcp]\nencrypt = false\n",
    )
    .unwrap();
    let listen = tests::listen_url("tcp", dir.path());
    let log = dir.path().join("server.log");
    let server = Command::new(tests::bin("rexec_server"))
        .env("CMD_NET_ADDR", &listen)
        .arg("--key-file")
        .arg(&key)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = tests::KillOnDrop(vec![server]);
    // A DPU config file that does not exist: the defaults apply (tcp encrypted).
    let no_dpu_cfg = dir.path().join("absent-dpu.toml");
    let rexec = |extra: &[&str], dpu_cfg: &std::path::Path| {
        Command::new(tests::bin("rexec"))
            .env("CMD_NET_ADDR", &listen)
            .env("OFFLOAD_KEY_FILE", &key)
            .env("OFFLOAD_DPU_CONFIG", dpu_cfg)
            .args(extra)
            .args(["/bin/echo", "through"])
            .output()
            .unwrap()
    };
    // Clear on both ends works (retried while the server starts).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = rexec(&["--encrypt", "false"], &no_dpu_cfg);
        if out.status.success() {
            assert_eq!(out.stdout, b"through\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rexec_server did not come up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The default asks for encryption: refused, and the error says why.
    let out = rexec(&[], &no_dpu_cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("encryption policy mismatch")
            && err.contains("encrypt = true")
            && err.contains("encrypt = false"),
        "rexec: {err}"
    );
    // The same setting in the DPU config file is honoured without a flag.
    let dpu_cfg = dir.path().join("dpu.toml");
    std::fs::write(&dpu_cfg, "[transport.tcp]\nencrypt = false\n").unwrap();
    let out = rexec(&[], &dpu_cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"through\n");
    // The server logged the refusal too.
    tests::wait_until("server logs the mismatch", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("encryption policy mismatch")
    });
}
