//! `rexec -t`: the remote program gets a pty of the local terminal's size, window changes are
//! propagated, and the local terminal's mode is restored on exit. rexec runs on a pty the test
//! opens (its controlling terminal), like in an interactive shell.

mod exec_common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use exec_common::Server;

fn open_pty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-pointers; the fds are wrapped right away.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0, "openpty");
    // SAFETY: fresh fds from openpty.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: valid out-parameter.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t
    }
}

#[test]
fn exec_tty_size_and_restore() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let (master, slave) = open_pty(33, 101);
        let before = termios(&slave);
        let script = "tty; stty size; read l; stty size; echo \"line=$l\"; exit 5";
        let mut cmd = server.rexec(&["-t", "sh", "-c", script]);
        let s0 = slave.try_clone().expect("dup");
        let s1 = slave.try_clone().expect("dup");
        let s2 = slave.try_clone().expect("dup");
        cmd.stdin(Stdio::from(s0))
            .stdout(Stdio::from(s1))
            .stderr(Stdio::from(s2));
        // SAFETY: async-signal-safe calls only: new session with the pty as controlling tty.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn rexec -t");

        let mut reader = std::fs::File::from(master.try_clone().expect("dup master"));
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut seen = String::new();
        let mut wait_for = |needle: &str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !seen.contains(needle) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                    Err(_) => panic!("[{kind}] {needle:?} not seen; output so far: {seen:?}"),
                }
            }
            seen.clone()
        };
        let out = wait_for("33 101");
        assert!(
            out.contains("/dev/pts/"),
            "[{kind}] remote stdin is a pty: {out:?}"
        );

        // Resize the local terminal: rexec gets SIGWINCH and propagates the size.
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: valid winsize on our pty master.
        assert_eq!(
            // SAFETY: TIOCSWINSZ reads a winsize from the pointer; `ws` lives across the call and `master` is open.
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
        std::thread::sleep(Duration::from_millis(500));
        let mut w = std::fs::File::from(master.try_clone().expect("dup master"));
        w.write_all(b"hello\r").expect("type a line");
        let out = wait_for("line=hello");
        assert!(
            out.contains("40 120"),
            "[{kind}] new window size propagated: {out:?}"
        );

        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(5), "[{kind}] exit code through the pty");
        let after = termios(&slave);
        assert_eq!(
            after.c_lflag, before.c_lflag,
            "[{kind}] local terminal mode restored"
        );
        assert_eq!(
            after.c_iflag, before.c_iflag,
            "[{kind}] local terminal mode restored"
        );
        assert_eq!(
            after.c_oflag, before.c_oflag,
            "[{kind}] local terminal mode restored"
        );
    }
}
