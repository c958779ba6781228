//! shim-bridge over real sessions (every link kind of `tests::link_kinds()`): two bridge
//! services in this process — one serving as HOST, one dialing as DPU — with real Unix sockets,
//! FIFOs and processes. HOST and DPU share one machine here, so DPU paths are mapped
//! (`[[bridge.map]]`) into their own directory instead of colliding with the originals.

use sha2::{Digest, Sha256};
use shim_bridge::{BridgeConfig, BridgeService, ForwardRule, PathMap, Role};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use transport::{Registry, Session, SessionConfig};

struct Pair {
    dpu: Session,
    host_svc: BridgeService,
    dpu_svc: BridgeService,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.dpu.close();
        self.server.abort();
    }
}

async fn pair(kind: &str, dir: &Path, host: BridgeConfig, dpu: BridgeConfig) -> Pair {
    tests::init_tracing();
    let key = transport::Key::load(&tests::write_key(dir, "psk")).expect("key");
    let host_svc = BridgeService::new(BridgeConfig {
        role: Some(Role::Host),
        ..host
    })
    .expect("host svc");
    let dpu_svc = BridgeService::new(BridgeConfig {
        role: Some(Role::Dpu),
        ..dpu
    })
    .expect("dpu svc");
    let listen: transport::Endpoint = tests::listen_url(kind, dir).parse().expect("listen url");
    let listener = transport::listen(&listen).await.expect("listen");
    let connect: transport::Endpoint = tests::connect_url(&listen.to_string())
        .parse()
        .expect("connect url");
    let reg = Registry::new().with("bridge", Arc::new(host_svc.clone()));
    let server = tokio::spawn(transport::serve(
        listener,
        SessionConfig::new(Some(key.clone())),
        reg,
    ));
    let reg = Registry::new().with("bridge", Arc::new(dpu_svc.clone()));
    let dpu = Session::connect(&connect, SessionConfig::new(Some(key)), reg)
        .await
        .expect("connect");
    Pair {
        dpu,
        host_svc,
        dpu_svc,
        server,
    }
}

/// Line-based echo server: answers "pong <x>" to each "ping <x>"; returns its task.
fn pong_server(path: &Path) -> tokio::task::JoinHandle<()> {
    let l = UnixListener::bind(path).expect("bind server");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let reply = format!("pong {}\n", l.trim_start_matches("ping "));
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

async fn ping(path: &Path, n: usize, tag: &str) {
    let s = UnixStream::connect(path)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    for i in 0..n {
        w.write_all(format!("ping {tag}-{i}\n").as_bytes())
            .await
            .expect("write");
        let l = lines
            .next_line()
            .await
            .expect("read")
            .expect("reply before EOF");
        assert_eq!(l, format!("pong {tag}-{i}"));
    }
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A socket file at `p`. The bridge binds and listens under a temporary name and renames the
/// socket into place, so the file appears only once it accepts connections.
fn is_sock(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

fn dirs(t: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    let h = t.path().join("host");
    let d = t.path().join("dpu");
    std::fs::create_dir_all(&h).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    (h, d)
}

/// Static rules in both directions, one rule placed on the socket-owning side and one on the
/// listening side; request/response over each, then 100 connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_static_rules_both_directions_and_100_connections() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        let host_cfg = BridgeConfig {
            forward: vec![
                // HOST socket, DPU listener; the rule sits on the owner (HOST) side.
                ForwardRule {
                    listen_side: Role::Dpu,
                    path: d.join("h.proxy"),
                    target: Some(h.join("h.sock")),
                },
                // DPU socket, HOST listener; the rule sits on the listening (HOST) side.
                ForwardRule {
                    listen_side: Role::Host,
                    path: h.join("d.proxy"),
                    target: Some(d.join("d.sock")),
                },
            ],
            allow_listen: vec![h.clone()],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            allow_listen: vec![d.clone()],
            allow_connect: vec![d.clone()],
            ..Default::default()
        };
        let _srv_h = pong_server(&h.join("h.sock"));
        let _srv_d = pong_server(&d.join("d.sock"));
        let p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        wait_for("DPU proxy", Duration::from_secs(5), || {
            is_sock(&d.join("h.proxy"))
        })
        .await;
        wait_for("HOST proxy", Duration::from_secs(5), || {
            is_sock(&h.join("d.proxy"))
        })
        .await;
        // Registered right after listen(2): wait for that too, then compare exactly.
        wait_for("proxies registered", Duration::from_secs(5), || {
            !p.dpu_svc.proxies().is_empty() && !p.host_svc.proxies().is_empty()
        })
        .await;
        assert_eq!(p.dpu_svc.proxies(), vec![d.join("h.proxy")]);
        assert_eq!(p.host_svc.proxies(), vec![h.join("d.proxy")]);

        ping(&d.join("h.proxy"), 50, "dpu->host").await;
        ping(&h.join("d.proxy"), 50, "host->dpu").await;

        let mut tasks = Vec::new();
        for i in 0..100 {
            let path = if i % 2 == 0 {
                d.join("h.proxy")
            } else {
                h.join("d.proxy")
            };
            tasks.push(tokio::spawn(async move {
                ping(&path, 10, &format!("c{i}")).await
            }));
        }
        for t in tasks {
            t.await.expect("connection task");
        }
        eprintln!("{kind}: static rules, both directions, 100 concurrent connections ok");
    }
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// 64 MiB each way at the same time, checked by sha256, plus half-close both ways: each side
/// keeps reading after the other finished writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_64mib_each_way_and_half_close() {
    const N: usize = 64 << 20;
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        let host_cfg = BridgeConfig {
            forward: vec![ForwardRule {
                listen_side: Role::Dpu,
                path: d.join("p"),
                target: Some(h.join("s")),
            }],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            allow_listen: vec![d.clone()],
            ..Default::default()
        };
        let l = UnixListener::bind(h.join("s")).unwrap();
        let _p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        wait_for("DPU proxy", Duration::from_secs(5), || {
            is_sock(&d.join("p"))
        })
        .await;

        let server_out = pseudo_random(7, N);
        let want_down = hex(&Sha256::digest(&server_out));
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&server_out).await.unwrap();
                w.shutdown().await.unwrap(); // half-close: we still read
                w
            });
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                total += n;
                hasher.update(&buf[..n]);
            }
            let _w = writer.await.unwrap();
            (total, hex(&hasher.finalize()))
        });
        let client_out = pseudo_random(11, N);
        let want_up = hex(&Sha256::digest(&client_out));
        let s = UnixStream::connect(d.join("p")).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let up = tokio::spawn(async move {
            w.write_all(&client_out).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            hasher.update(&buf[..n]);
        }
        up.await.unwrap();
        let (got_up, up_hash) = server.await.unwrap();
        assert_eq!(total, N);
        assert_eq!(hex(&hasher.finalize()), want_down);
        assert_eq!(got_up, N);
        assert_eq!(up_hash, want_up);

        eprintln!("{kind}: 64 MiB each way intact");
    }
}

/// Request after EOF: the client half-closes, the server replies after reading EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_half_close_reply_after_eof() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        let host_cfg = BridgeConfig {
            forward: vec![ForwardRule {
                listen_side: Role::Dpu,
                path: d.join("p"),
                target: Some(h.join("s")),
            }],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            allow_listen: vec![d.clone()],
            ..Default::default()
        };
        let l = UnixListener::bind(h.join("s")).unwrap();
        let _p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        wait_for("DPU proxy", Duration::from_secs(5), || {
            is_sock(&d.join("p"))
        })
        .await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap(); // returns only at the client's half-close
            s.write_all(format!("got {} bytes: ", req.len()).as_bytes())
                .await
                .unwrap();
            s.write_all(&req).await.unwrap();
        });
        let mut s = UnixStream::connect(d.join("p")).await.unwrap();
        s.write_all(b"question").await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
            .await
            .expect("reply within 10 s")
            .unwrap();
        assert_eq!(reply, b"got 8 bytes: question");
        server.await.unwrap();
        eprintln!("{kind}: half-close ok");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Watched HOST dir: a socket appearing there shows up on the DPU within 1 s and goes within
/// 1 s after removal; connections through it work; when the far socket goes, existing bridged
/// connections close and new connects fail at once. A static proxy whose target is missing
/// closes connections at once instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_watched_dir_and_far_side_gone() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        std::fs::create_dir_all(h.join("s")).unwrap();
        let host_cfg = BridgeConfig {
            watch: vec![h.join("s")],
            forward: vec![ForwardRule {
                listen_side: Role::Dpu,
                path: d.join("missing.proxy"),
                target: Some(h.join("missing")),
            }],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            map: vec![PathMap {
                from: h.clone(),
                to: d.clone(),
            }],
            allow_listen: vec![d.clone()],
            ..Default::default()
        };
        let _p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;

        // Far side gone on a static rule: the connection closes at once (EOF or reset).
        wait_for("static proxy", Duration::from_secs(5), || {
            is_sock(&d.join("missing.proxy"))
        })
        .await;
        let mut s = UnixStream::connect(d.join("missing.proxy")).await.unwrap();
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("closed, not hanging");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "got data from a missing socket: {r:?}"
        );

        // Dynamic rule.
        let orig = h.join("s").join("shim-abc");
        let mirror = d.join("s").join("shim-abc");
        let srv = pong_server(&orig);
        wait_for("mirror appears", Duration::from_secs(1), || {
            is_sock(&mirror)
        })
        .await;
        ping(&mirror, 5, "dyn").await;
        let held = UnixStream::connect(&mirror).await.unwrap();
        ping(&mirror, 1, "before-removal").await;

        // The original goes: server stops and its socket file is removed.
        srv.abort();
        let _ = srv.await;
        std::fs::remove_file(&orig).unwrap();
        wait_for("mirror disappears", Duration::from_secs(1), || {
            !mirror.exists()
        })
        .await;
        let start = Instant::now();
        let e = UnixStream::connect(&mirror)
            .await
            .expect_err("connect after removal must fail");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "connect failed slowly: {e}"
        );
        let mut held = held;
        let r = tokio::time::timeout(Duration::from_secs(5), held.read(&mut b))
            .await
            .expect("existing connection closed");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "existing connection still open: {r:?}"
        );

        // A second socket with the same name comes back: mirrored again.
        let srv = pong_server(&orig);
        wait_for("mirror reappears", Duration::from_secs(1), || {
            is_sock(&mirror)
        })
        .await;
        ping(&mirror, 2, "again").await;
        srv.abort();
        eprintln!("{kind}: watched dir ok");
    }
}

/// Session end removes the proxies of that session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_session_close_removes_proxies() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        std::fs::create_dir_all(h.join("s")).unwrap();
        let _srv = pong_server(&h.join("s").join("x"));
        let host_cfg = BridgeConfig {
            watch: vec![h.join("s")],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            map: vec![PathMap {
                from: h.clone(),
                to: d.clone(),
            }],
            allow_listen: vec![d.clone()],
            ..Default::default()
        };
        let p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        let mirror = d.join("s").join("x");
        wait_for("mirror appears", Duration::from_secs(2), || {
            is_sock(&mirror)
        })
        .await;
        p.dpu.close();
        wait_for(
            "mirror removed after session end",
            Duration::from_secs(2),
            || !mirror.exists(),
        )
        .await;
        assert!(p.dpu_svc.proxies().is_empty());
    }
}

/// Remote kill: a HOST child dies of the signal sent from the DPU; bad pids are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_remote_kill() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let p = pair(
            &kind,
            t.path(),
            BridgeConfig::default(),
            BridgeConfig::default(),
        )
        .await;
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        shim_bridge::client::remote_kill(&p.dpu, child.id() as i32, libc::SIGTERM)
            .await
            .expect("kill");
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGTERM));
        for bad in [0, -1] {
            let e = shim_bridge::client::remote_kill(&p.dpu, bad, libc::SIGTERM)
                .await
                .expect_err("refused");
            assert!(e.to_string().contains("refusing"), "{e}");
        }
        let e = shim_bridge::client::remote_kill(&p.dpu, child.id() as i32, 0)
            .await
            .expect_err("gone");
        assert!(e.to_string().contains("kill"), "{e}");
    }
}

/// Stdio FIFOs: `ctr` on the DPU creates `<fifo>/<rand>/<id>-stdin|stdout`; the bridge creates
/// them on the HOST; bytes flow stdin DPU→HOST and stdout HOST→DPU with EOF; removing the DPU
/// directory removes the HOST FIFOs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_stdio_fifos() {
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        std::fs::create_dir_all(h.join("fifo")).unwrap();
        std::fs::create_dir_all(d.join("fifo")).unwrap();
        let host_cfg = BridgeConfig {
            fifo_dirs: vec![h.join("fifo")],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            fifo_dirs: vec![d.join("fifo")],
            map: vec![PathMap {
                from: h.clone(),
                to: d.clone(),
            }],
            ..Default::default()
        };
        let _p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        // What ctr does: a random dir, FIFOs, its stdout reader open.
        let dd = d.join("fifo").join("123");
        std::fs::create_dir(&dd).unwrap();
        let mk = |p: &Path| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o700)).unwrap()
        };
        mk(&dd.join("c1-stdout"));
        mk(&dd.join("c1-stdin"));
        let out_rx = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(dd.join("c1-stdout"))
            .unwrap();

        let hd = h.join("fifo").join("123");
        let host_fifo = |n: &str| {
            let p = hd.join(n);
            move || {
                std::fs::symlink_metadata(&p)
                    .map(|m| m.file_type().is_fifo())
                    .unwrap_or(false)
            }
        };
        wait_for(
            "HOST stdout FIFO",
            Duration::from_secs(1),
            host_fifo("c1-stdout"),
        )
        .await;
        wait_for(
            "HOST stdin FIFO",
            Duration::from_secs(1),
            host_fifo("c1-stdin"),
        )
        .await;

        // What the shim does on the HOST: write stdout, read stdin.
        let hout = hd.join("c1-stdout");
        let hin = hd.join("c1-stdin");
        let shim = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut w = std::fs::OpenOptions::new().write(true).open(&hout).unwrap();
            w.write_all(b"hello from the container\n").unwrap();
            drop(w);
            let mut r = std::fs::File::open(&hin).unwrap();
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        });
        // ctr writing stdin (blocking open: the bridge is the reader on the DPU).
        let din = dd.join("c1-stdin");
        let ctr_in = std::thread::spawn(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new().write(true).open(&din).unwrap();
            w.write_all(b"typed input\n").unwrap();
        });
        let mut out = Vec::new();
        let mut out_rx = out_rx;
        // Wait for data (a reader without writers reads EOF at once; retry until data came).
        let start = Instant::now();
        loop {
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(200), out_rx.read(&mut buf)).await {
                Ok(Ok(0)) if !out.is_empty() => break,
                Ok(Ok(0)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("read stdout: {e}"),
                Err(_) => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "stdout did not arrive"
            );
        }
        assert_eq!(out, b"hello from the container\n");
        ctr_in.join().unwrap();
        assert_eq!(shim.join().unwrap(), "typed input\n");

        std::fs::remove_dir_all(&dd).unwrap();
        wait_for("HOST FIFOs removed", Duration::from_secs(2), || {
            !hd.join("c1-stdout").exists() && !hd.join("c1-stdin").exists()
        })
        .await;
        eprintln!("{kind}: stdio FIFOs ok");
    }
}

/// SCM_RIGHTS cannot cross machines: the bytes of a message carrying fds still arrive in order,
/// the fds are dropped (and logged), the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_scm_rights_bytes_pass_fds_dropped() {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    for kind in tests::link_kinds() {
        let t = tempfile::tempdir().unwrap();
        let (h, d) = dirs(&t);
        let host_cfg = BridgeConfig {
            forward: vec![ForwardRule {
                listen_side: Role::Dpu,
                path: d.join("p"),
                target: Some(h.join("s")),
            }],
            ..Default::default()
        };
        let dpu_cfg = BridgeConfig {
            allow_listen: vec![d.clone()],
            ..Default::default()
        };
        let l = UnixListener::bind(h.join("s")).unwrap();
        let _p = pair(&kind, t.path(), host_cfg, dpu_cfg).await;
        wait_for("DPU proxy", Duration::from_secs(5), || {
            is_sock(&d.join("p"))
        })
        .await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"ok").await.unwrap();
            got
        });
        let path = d.join("p");
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            c.write_all(b"a").unwrap();
            let f = std::fs::File::open("/dev/null").unwrap();
            let fds = [f.as_raw_fd()];
            let iov = [std::io::IoSlice::new(b"with-fd")];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(c.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            c.write_all(b"b").unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut r = Vec::new();
            c.read_to_end(&mut r).unwrap();
            r
        })
        .await
        .unwrap();
        assert_eq!(server.await.unwrap(), b"awith-fdb");
        assert_eq!(reply, b"ok");
    }
}
