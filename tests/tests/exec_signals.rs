//! Signals reach the remote program; a dead client takes its remote program with it; many
//! rexecs run at once; seed-style wrapper scripts behave like the binary; rexec's own errors
//! exit 255 with one line.

mod exec_common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exec_common::{alive, run_with_stdin, wait_file, Server};

fn send(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill");
}

#[test]
fn exec_forwards_term_and_usr1() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        for pgroup in [false, true] {
            let ready = server.dir.path().join(format!("ready-{pgroup}"));
            let script = format!(
                "trap 'echo got USR1' USR1; trap 'echo got TERM; exit 3' TERM; echo up > {}; \
                 while :; do sleep 0.05; done",
                ready.display()
            );
            let mut args = vec![];
            if pgroup {
                args.push("--pgroup");
            }
            args.extend(["sh", "-c", script.as_str()]);
            let mut child = server
                .rexec(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn rexec");
            wait_file(&ready, Duration::from_secs(10));
            send(&child, libc::SIGUSR1);
            // The trap runs after the current `sleep`; give it time before TERM.
            std::thread::sleep(Duration::from_millis(300));
            send(&child, libc::SIGTERM);
            let status = child.wait().expect("wait");
            let mut out = String::new();
            child
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out)
                .expect("read");
            assert_eq!(
                status.code(),
                Some(3),
                "[{kind} pgroup={pgroup}] exit after TERM"
            );
            assert_eq!(out, "got USR1\ngot TERM\n", "[{kind} pgroup={pgroup}]");
        }
    }
}

#[test]
fn exec_client_sigkill_kills_remote_group() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let pidfile = server.dir.path().join("pids");
        // The main process and a background child of it (same process group).
        let script = format!("sleep 1000 & echo $$ $! > {}; wait", pidfile.display());
        let mut child = server
            .rexec(&["sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rexec");
        let pids: Vec<i32> = wait_file(&pidfile, Duration::from_secs(10))
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect();
        assert_eq!(pids.len(), 2);
        assert!(
            pids.iter().all(|&p| alive(p)),
            "[{kind}] remote processes run"
        );
        child.kill().expect("SIGKILL rexec");
        child.wait().expect("reap rexec");
        let killed = Instant::now();
        while pids.iter().any(|&p| alive(p)) {
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "[{kind}] remote processes {pids:?} still alive 1 s after the client was killed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "[{kind}] remote group gone {:?} after client SIGKILL",
            killed.elapsed()
        );
    }
}

#[test]
fn exec_hundred_concurrent() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let children: Vec<_> = (0..100)
            .map(|i| {
                server
                    .rexec(&[
                        "sh",
                        "-c",
                        "echo $1; exit $(($1 % 7))",
                        "sh",
                        &i.to_string(),
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn rexec")
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().expect("wait");
            assert_eq!(
                out.status.code(),
                Some((i % 7) as i32),
                "[{kind}] #{i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{i}\n"),
                "[{kind}] #{i}"
            );
        }
    }
}

#[test]
fn exec_seed_style_wrapper_script() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let wrapper = server.dir.path().join("sh-wrapper");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} /bin/sh \"$@\"\n",
                tests::bin("rexec").display()
            ),
        )
        .expect("write wrapper");
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let args = [
            "-c",
            "echo \"$0:$#:$*\"; echo oops >&2; read l; echo \"in:$l\"; exit 42",
            "zero",
            "a b",
            "-x",
        ];
        let run = |prog: &std::path::Path| {
            let mut c = Command::new(prog);
            c.args(args)
                .envs(server.rexec_env())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut ch = c.spawn().expect("spawn");
            use std::io::Write;
            ch.stdin
                .take()
                .expect("stdin")
                .write_all(b"line\n")
                .expect("write stdin");
            ch.wait_with_output().expect("wait")
        };
        let l = run(std::path::Path::new("/bin/sh"));
        let r = run(&wrapper);
        assert_eq!(r.status.code(), l.status.code(), "[{kind}] status");
        assert_eq!(r.stdout, l.stdout, "[{kind}] stdout");
        assert_eq!(r.stderr, l.stderr, "[{kind}] stderr");
        assert_eq!(l.status.code(), Some(42));
    }
}

fn one_line_255(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(255),
        "{what}: exit 255, stderr: {err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: exactly one line on stderr: {err:?}"
    );
    assert!(err.starts_with("rexec: "), "{what}: {err}");
}

#[test]
fn exec_errors_exit_255_with_one_line() {
    tests::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = tests::write_key(dir.path(), "k");
    // Nobody listens on this port.
    let out = Command::new(tests::bin("rexec"))
        .env(
            "CMD_NET_ADDR",
            format!("tcp://127.0.0.1:{}", tests::free_port()),
        )
        .env("OFFLOAD_KEY_FILE", &key)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    one_line_255(&out, "unreachable server");

    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        if !kind.mux {
            // (Through a mux rexec reads no key: the mux's is the one that counts.)
            let wrong = tests::write_key(dir.path(), "wrong");
            let out = run_with_stdin(
                {
                    let mut c = server.rexec(&["true"]);
                    c.env("OFFLOAD_KEY_FILE", &wrong);
                    c
                },
                None,
            );
            one_line_255(&out, &format!("[{kind}] wrong key"));
        }

        // The daemon dies mid-run.
        let mut server = server;
        let child = server
            .rexec(&["sleep", "30"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(300));
        server.child.kill().expect("kill server");
        server.child.wait().expect("reap server");
        let out = child.wait_with_output().expect("wait");
        one_line_255(&out, &format!("[{kind}] server killed mid-run"));
    }
}

/// Issue 14 item 1: like a local pipe and like ssh, rexec returns once every holder of the
/// program's stdout/stderr closed them: a background child's late output arrives, and the exit
/// status (the main process's) comes after it. A background child that redirected its stdio
/// does not hold rexec up.
#[test]
fn exec_background_child_output_is_waited_for() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let started = Instant::now();
        let out = run_with_stdin(
            server.rexec(&[
                "sh",
                "-c",
                "(sleep 0.5; echo late; echo late-err >&2) & echo main; echo err >&2; exit 4",
            ]),
            None,
        );
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(4), "[{kind}] main process status");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "main\nlate\n",
            "[{kind}]"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "err\nlate-err\n",
            "[{kind}]"
        );
        assert!(
            took >= Duration::from_millis(500),
            "[{kind}] returned after {took:?}, before the background child closed its output"
        );

        let started = Instant::now();
        let out = run_with_stdin(
            server.rexec(&["sh", "-c", "sleep 5 >/dev/null 2>&1 & echo main"]),
            None,
        );
        assert_eq!(out.status.code(), Some(0), "[{kind}]");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "main\n", "[{kind}]");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "[{kind}] waited for a background child that does not hold the output"
        );
    }
}

/// While rexec waits for a background child that holds the output (the main process has
/// exited), killing rexec still kills the remote process group.
#[test]
fn exec_client_death_kills_background_holders() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let pidfile = server.dir.path().join("bgpid");
        let script = format!("sleep 1000 & echo $! > {}; exit 0", pidfile.display());
        let mut child = server
            .rexec(&["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn rexec");
        let bg: i32 = wait_file(&pidfile, Duration::from_secs(10))
            .trim()
            .parse()
            .expect("pid");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "[{kind}] rexec waits while the background child holds stdout"
        );
        assert!(alive(bg), "[{kind}] background child runs");
        child.kill().expect("SIGKILL rexec");
        child.wait().expect("reap rexec");
        let killed = Instant::now();
        while alive(bg) {
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "[{kind}] background child {bg} still alive 1 s after the client was killed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
