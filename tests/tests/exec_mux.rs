//! rexec_mux itself: rexec finds it at the default path for its address and key, falls back to
//! its own connection when no mux answers (stale socket, mux gone, session down), the socket
//! and its directory are private, callers of another uid are refused, the mux reconnects after
//! the peer restarts, and a mux that dies mid-run takes the remote program with it. The exec
//! behaviours themselves run through the mux in exec_conformance, exec_table, exec_signals and
//! exec_pty.

mod exec_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use exec_common::{alive, wait_file, Mux, Server, DEAD_ADDR};

/// `rexec` with `env` only (nothing of the test's environment that configures rexec), its
/// own log on, stdin from /dev/null.
fn rexec(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(tests::bin("rexec"))
        .args(args)
        .env_remove("CMD_NET_ADDR")
        .env_remove("OFFLOAD_KEY_FILE")
        .env_remove("REXEC_CONTROL")
        .env_remove("REXEC_CONTROL_DIR")
        .env("REXEC_LOG", "debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run rexec")
}

fn through_mux(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("ran through the rexec mux")
}

/// A `rexec_mux` at its default path (under `ctl_dir`), for `url` and `key`.
/// `rexec_mux` for `url` and `key` with its socket in the default place under `ctl_dir`.
fn mux_command(url: &str, key: &Path, ctl_dir: &Path) -> Command {
    let mut c = Command::new(tests::bin("rexec_mux"));
    c.env("CMD_NET_ADDR", url)
        .env("REXEC_CONTROL_DIR", ctl_dir)
        .arg("--key-file")
        .arg(key)
        .stdin(Stdio::null());
    c
}

fn default_mux(url: &str, key: &Path, ctl_dir: &Path) -> Child {
    mux_command(url, key, ctl_dir)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn rexec_mux")
}

/// A mux that must refuse to start, saying `why` on stderr.
fn mux_refuses(url: &str, key: &Path, ctl_dir: &Path, why: &str) {
    let out = mux_command(url, key, ctl_dir)
        .output()
        .expect("run rexec_mux");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "{err}");
}

fn wait_socket(dir: &Path) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(p) = std::fs::read_dir(dir)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path())
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no mux socket in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_mux_default_path_private_socket_and_fallback() {
    tests::init_tracing();
    let server = Server::start("tcp");
    let t = tempfile::Builder::new()
        .prefix("exec4-mux")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let ctl = t.path().join("rexec");
    let key = server.key.to_str().expect("utf8").to_string();
    let ctl_s = ctl.to_str().expect("utf8").to_string();
    let env = [
        ("CMD_NET_ADDR", server.url.as_str()),
        ("OFFLOAD_KEY_FILE", key.as_str()),
        ("REXEC_CONTROL_DIR", ctl_s.as_str()),
    ];

    // No mux yet: rexec connects itself.
    let out = rexec(&["sh", "-c", "echo direct"], &env);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "direct\n");
    assert!(!through_mux(&out));

    let mut mux = default_mux(&server.url, &server.key, &ctl);
    let sock = wait_socket(&ctl);
    // Private: the directory 0700, the socket 0600, both ours.
    let dmd = std::fs::metadata(&ctl).expect("dir");
    assert_eq!(dmd.permissions().mode() & 0o777, 0o700, "control dir mode");
    let smd = std::fs::symlink_metadata(&sock).expect("socket");
    assert_eq!(smd.permissions().mode() & 0o777, 0o600, "socket mode");
    // SAFETY: plain getter.
    assert_eq!(smd.uid(), unsafe { libc::geteuid() });

    // rexec finds the mux by address and key: no REXEC_CONTROL needed.
    let out = rexec(&["sh", "-c", "echo via; exit 5"], &env);
    assert_eq!(out.status.code(), Some(5), "{:?}", out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via\n");
    assert!(
        through_mux(&out),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another key file path is another mux: this one is not used for it.
    let other_key = tests::write_key(t.path(), "other");
    let other = other_key.to_str().expect("utf8");
    let mut env2 = env;
    env2[1] = ("OFFLOAD_KEY_FILE", other);
    let out = rexec(&["true"], &env2);
    assert!(!through_mux(&out), "a mux for another key is not used");
    assert_eq!(out.status.code(), Some(255), "the other key is wrong");
    // REXEC_CONTROL=none: always direct.
    let mut env3 = env.to_vec();
    env3.push(("REXEC_CONTROL", "none"));
    let out = rexec(&["true"], &env3);
    assert_eq!(out.status.code(), Some(0));
    assert!(!through_mux(&out));

    // A second mux on the same path refuses to start (the first one answers there).
    mux_refuses(&server.url, &server.key, &ctl, "already listens");

    // The mux killed outright leaves a stale socket: rexec falls back silently.
    mux.kill().expect("kill mux");
    mux.wait().expect("reap mux");
    assert!(sock.exists(), "SIGKILL leaves the socket behind");
    let out = rexec(&["sh", "-c", "echo again"], &env);
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");
    assert!(!through_mux(&out));
    // A new mux replaces the stale socket; SIGTERM removes it.
    let mut mux = default_mux(&server.url, &server.key, &ctl);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = rexec(&["true"], &env);
        if through_mux(&out) {
            break;
        }
        assert!(Instant::now() < deadline, "new mux not used");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(mux.id() as i32, libc::SIGTERM) };
    let st = mux.wait().expect("reap mux");
    assert!(st.success(), "mux exits 0 on SIGTERM: {st:?}");
    assert!(!sock.exists(), "SIGTERM removes the socket");

    // A directory open to others is refused.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    mux_refuses(&server.url, &server.key, &ctl, "mode 0700");
}

/// A caller of another uid is refused by the mux (even where the file modes would let it in),
/// and its rexec falls back to a direct connection.
#[test]
fn exec_mux_refuses_other_users() {
    if !tests::is_root() {
        tests::skip(
            "exec_mux_refuses_other_users",
            "needs root to run rexec as nobody",
        );
        return;
    }
    tests::init_tracing();
    let server = Server::start("tcp");
    let t = tempfile::Builder::new()
        .prefix("exec4-mux")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mux = Mux::start(&server.url, &server.key, t.path(), &[]);
    // Open the way on purpose: only SO_PEERCRED stands between nobody and the mux now.
    for p in [t.path(), &t.path().join("ctl")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(&mux.path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(tests::bin("rexec"))
            .arg("true")
            .env("CMD_NET_ADDR", DEAD_ADDR)
            .env("REXEC_CONTROL", &mux.path)
            .env("REXEC_LOG", "debug")
            .env_remove("OFFLOAD_KEY_FILE")
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("rexec as nobody")
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(255),
        "refused, then direct fails: {err}"
    );
    assert!(err.contains("not allowed"), "the mux said why: {err}");
    assert!(!through_mux(&out));
}

/// The session drops (the peer restarts): the next rexec through the mux still works, over a
/// new session.
#[test]
fn exec_mux_reconnects_after_the_peer_restarts() {
    tests::init_tracing();
    let dir = tempfile::Builder::new()
        .prefix("exec4-mux")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let key = tests::write_key(dir.path(), "psk");
    let url = format!("unix://{}/link.sock", dir.path().display());
    let start_server = || -> Child {
        Command::new(tests::bin("rexec_server"))
            .env("CMD_NET_ADDR", &url)
            .env("RUST_LOG", "warn")
            .arg("--key-file")
            .arg(&key)
            .arg("--allow-any")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rexec_server")
    };
    let mut srv = start_server();
    let mux = Mux::start(&url, &key, dir.path(), &[]);
    let run = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = rexec(
                &["sh", "-c", "echo $$"],
                &[
                    ("CMD_NET_ADDR", DEAD_ADDR),
                    ("REXEC_CONTROL", mux.path.to_str().expect("utf8")),
                ],
            );
            if out.status.code() == Some(0) {
                assert!(through_mux(&out), "{what}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    run("first session");
    srv.kill().expect("kill server");
    srv.wait().expect("reap server");
    let _ = std::fs::remove_file(dir.path().join("link.sock"));
    let mut srv = start_server();
    run("after the peer restarted");
    let _ = srv.kill();
    let _ = srv.wait();
}

/// The mux dies while a program runs: rexec reports it in one line (255), and the program ends
/// with the mux's session.
#[test]
fn exec_mux_death_mid_run() {
    tests::init_tracing();
    let mut server = Server::start_setup(&exec_common::Setup {
        kind: "tcp".into(),
        mux: true,
    });
    let pidfile = server.dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 1000", pidfile.display());
    let child = server
        .rexec(&["sh", "-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rexec");
    let pid: i32 = wait_file(&pidfile, Duration::from_secs(10))
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(pid));
    if let Some(m) = server.mux.as_mut() {
        m.child.kill().expect("kill mux");
        m.child.wait().expect("reap mux");
    }
    let out = child.wait_with_output().expect("wait rexec");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("rexec: "), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "remote program survived its mux's session"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With no mux answering, the `rexec` front end hands the call to `rexec-full` after it has
/// already read and changed its own process state (a /dev/null on a closed descriptor,
/// SIGPIPE ignored, signals blocked): the program must still see the caller's closed
/// descriptors and signal dispositions exactly as when `rexec-full` runs straight away.
#[test]
fn exec_mux_fallback_keeps_the_callers_state() {
    tests::init_tracing();
    let server = Server::start("tcp");
    let key = server.key.to_str().expect("utf8").to_string();
    let run = |control: &str, script: &str| -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("REXEC", tests::bin("rexec"))
            .env("CMD_NET_ADDR", &server.url)
            .env("OFFLOAD_KEY_FILE", &key)
            .env("REXEC_CONTROL", control)
            .env_remove("REXEC_CONTROL_DIR")
            .env_remove("REXEC_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("sh")
    };
    for script in [
        // fd 1 closed: closed for the program too (its echo fails with EBADF).
        r#"exec "$REXEC" sh -c 'echo hi; echo rc=$? >&2' >&-"#,
        // SIGPIPE at its default for the caller, and ignored by it: the same for the program.
        r#""$REXEC" sh -c 'grep -E "^Sig(Ign|Blk)" /proc/self/status'"#,
        r#"trap '' PIPE; "$REXEC" sh -c 'grep -E "^Sig(Ign|Blk)" /proc/self/status'"#,
    ] {
        let direct = run("none", script);
        let fallback = run("/nonexistent-rexec-mux/rexec.sock", script);
        let show = |o: &Output| {
            format!(
                "{:?} out {:?} err {:?}",
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert_eq!(show(&direct), show(&fallback), "{script}");
        assert!(
            direct.status.success() || script.contains(">&-"),
            "{}",
            show(&direct)
        );
    }
    // The two SIGPIPE cases differ from each other (the comparison above is not vacuous).
    let dfl = run(
        "/nonexistent-rexec-mux/rexec.sock",
        r#""$REXEC" sh -c 'grep ^SigIgn /proc/self/status'"#,
    );
    let ign = run(
        "/nonexistent-rexec-mux/rexec.sock",
        r#"trap '' PIPE; "$REXEC" sh -c 'grep ^SigIgn /proc/self/status'"#,
    );
    assert_ne!(
        dfl.stdout, ign.stdout,
        "SIGPIPE ignored by the caller shows in SigIgn"
    );
    let closed = run(
        "/nonexistent-rexec-mux/rexec.sock",
        r#"exec "$REXEC" sh -c 'echo hi; echo rc=$? >&2' >&-"#,
    );
    assert!(
        String::from_utf8_lossy(&closed.stderr).contains("rc=1"),
        "closed stdout: {}",
        String::from_utf8_lossy(&closed.stderr)
    );
}
