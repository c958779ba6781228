//! Hitless key rotation (docs/OPERATIONS.md, "Key rotation"): a side holding two keys accepts
//! peers with either in the usual single round trip, key files are followed without a
//! restart, and once the old key is retired a peer still holding it is refused with the
//! usual wrong-key error.

mod exec_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use exec_common::{run_with_stdin, Server};
use transport::{
    EncryptPolicy, Endpoint, HandshakeError, Key, Registry, RemoteError, Service, Session,
    SessionConfig, SessionError,
};

struct Echo;

#[transport::async_trait]
impl Service for Echo {
    async fn call(&self, _s: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        Ok(req)
    }
}

fn key(b: u8) -> Key {
    Key::from_bytes(vec![b; 32]).expect("key")
}

fn cfg(k: Key, encrypt: bool) -> SessionConfig {
    SessionConfig {
        handshake_timeout: Duration::from_secs(5),
        encrypt: EncryptPolicy::all(encrypt),
        ..SessionConfig::new(Some(k))
    }
}

async fn serve(kind: &str, c: SessionConfig) -> (Endpoint, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = tests::listen_url(kind, dir.path());
    let l = transport::listen(&url.parse().expect("url"))
        .await
        .expect("listen");
    let ep = tests::connect_url(&l.local_endpoint().to_string())
        .parse()
        .expect("endpoint");
    tokio::spawn(transport::serve(
        l,
        c,
        Registry::new().with("echo", Arc::new(Echo)),
    ));
    (ep, dir)
}

async fn echo_ok(ep: &Endpoint, c: SessionConfig) {
    let s = Session::connect(ep, c, Registry::new())
        .await
        .expect("served");
    // Enough bytes to cross several encrypted records both ways.
    let big = Bytes::from(vec![0x5a; 3 << 20]);
    let r = s.call("echo", big.clone()).await.expect("echo");
    assert!(r == big);
}

async fn wrong_key(ep: &Endpoint, c: SessionConfig) {
    match Session::connect(ep, c, Registry::new()).await {
        Err(SessionError::Handshake {
            source: HandshakeError::Rejected(reason),
            ..
        }) => assert!(reason.contains("wrong key"), "{reason}"),
        Err(other) => panic!("expected the wrong-key refusal, got: {other}"),
        Ok(_) => panic!("a peer without an accepted key was served"),
    }
}

/// Either side may hold both keys: the acceptor picks the dialer's (by its hint), a dialer
/// whose primary key the acceptor no longer has proves the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_key_is_accepted_while_both_are_held() {
    for (kind, encrypt) in [("tcp", true), ("unix", false), ("tcp", false)] {
        let both = || key(1).accepting_bytes(vec![2; 32]).expect("second key");
        // The HOST (acceptor) holds old (1) and new (2).
        let (ep, _d) = serve(kind, cfg(both(), encrypt)).await;
        echo_ok(&ep, cfg(key(1), encrypt)).await;
        echo_ok(&ep, cfg(key(2), encrypt)).await;
        // A dialer holding both, the new one first, also fits.
        echo_ok(
            &ep,
            cfg(key(2).accepting_bytes(vec![1; 32]).expect("k"), encrypt),
        )
        .await;
        wrong_key(&ep, cfg(key(3), encrypt)).await;

        // Acceptor already switched to the new key only, the dialer still leads with old.
        let (ep, _d) = serve(kind, cfg(key(2), encrypt)).await;
        echo_ok(&ep, cfg(both(), encrypt)).await;
        wrong_key(&ep, cfg(key(1), encrypt)).await;
    }
}

fn write_key_file(path: &Path, hex: &str) {
    // As an operator does it: written aside, then renamed over (atomic).
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, hex).expect("write key");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename key");
}

fn rexec_with(server: &Server, key: &Path, args: &[&str]) -> std::process::Output {
    let mut c = server.rexec(args);
    c.env("OFFLOAD_KEY_FILE", key);
    run_with_stdin(c, None)
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_wrong_key(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
    assert!(err.contains("wrong key"), "{what}: {err}");
}

/// The documented procedure against a real daemon that is never restarted: the next key is
/// dropped beside the key, DPUs switch one by one (old and new ones served meanwhile, a
/// session opened before the switch runs on), then the next key is renamed over the key,
/// which retires the old one.
#[test]
fn daemon_follows_the_rotation_without_a_restart() {
    tests::init_tracing();
    for kind in tests::link_kinds() {
        let keys = tempfile::tempdir().expect("tempdir");
        let next = keys.path().join("psk.next");
        let next_arg = next.to_string_lossy().into_owned();
        let mut server = Server::start_with(&kind, &["--accept-key-file", &next_arg]);
        let pid = server.child.id();
        let old = server.key.clone();
        let new_key = tests::write_key(keys.path(), "new");
        let new_hex = std::fs::read_to_string(&new_key).expect("read key");

        assert_ok(&rexec_with(&server, &old, &["/bin/true"]), "old key");
        assert_wrong_key(
            &rexec_with(&server, &new_key, &["/bin/true"]),
            &format!("[{kind}] new key before it is installed"),
        );

        // 1. The next key beside the key: both accepted from the next handshake on.
        write_key_file(&next, &new_hex);
        let mut long = server.rexec(&["/bin/sh", "-c", "sleep 2; echo survived"]);
        long.env("OFFLOAD_KEY_FILE", &old)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let long = long.spawn().expect("spawn rexec");
        assert_ok(&rexec_with(&server, &new_key, &["/bin/true"]), "new key");
        assert_ok(&rexec_with(&server, &old, &["/bin/true"]), "old key");

        // 2. Retire the old key: the next one becomes the key. A DPU not switched yet still
        // holds the old one.
        let dpu_old = keys.path().join("dpu-old");
        write_key_file(&dpu_old, &std::fs::read_to_string(&old).expect("read key"));
        std::fs::rename(&next, &old).expect("rename next over the key");
        assert_ok(
            &rexec_with(&server, &new_key, &["/bin/true"]),
            "new key after the switch",
        );
        assert_wrong_key(
            &rexec_with(&server, &dpu_old, &["/bin/true"]),
            &format!("[{kind}] old key after it was retired"),
        );

        // The session opened before the switch ran to its end.
        let out = long.wait_with_output().expect("wait");
        assert_ok(&out, "session across the switch");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "survived");
        // Same daemon throughout.
        assert!(
            server.child.try_wait().expect("try_wait").is_none(),
            "daemon exited"
        );
        assert_eq!(server.child.id(), pid);
    }
}
