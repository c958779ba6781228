//! rexec's side of the mux: plain system calls on the calling thread, no async runtime, no
//! crypto. Signals are blocked and read from a `signalfd` while the exec runs, so none is lost
//! between connecting and the mux taking the request.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use tracing::debug;

use super::{decode, encode, encode_into, peer_uid, send_with_fds, uid_allowed};
use super::{ClientMsg, Control, Ended, MuxError, MuxMsg, MUX_VERSION};
use crate::client::{local_winsize, pgrp_orphaned};
use crate::proto::{ExecRequest, Sig};

/// What happened to an attempt through the mux.
#[derive(Debug)]
pub enum Attempt {
    /// The mux ran the exec (or lost it while running: [`Ended::Error`]).
    Ran(Ended),
    /// No mux, or it could not take the exec; nothing reached the peer: connect directly.
    Fallback(String),
}

/// The exec to hand to the mux.
pub struct Call<'a> {
    /// The request, as rexec would send it itself.
    pub req: &'a ExecRequest,
    /// `-t` with the local terminal in raw mode.
    pub tty: bool,
    /// stdin is not empty (not closed, not `/dev/null`): rexec copies it into a pipe.
    pub stdin: bool,
}

/// Runs `call` through the mux listening on `path`, with this process's stdio and signals.
/// Falls back (returns [`Attempt::Fallback`]) when nothing answers on `path`, the mux is not
/// of this user or root, or the mux cannot take the exec.
pub fn try_run(path: &Path, call: Call<'_>) -> Attempt {
    // Everything is ready before connecting: the mux wakes on the connection, and a request
    // that is not there yet would cost it (and, on the same CPU, this process) a wasted
    // wake-up and a second one for the request.
    let blocked = match BlockedSignals::new(call.req.sig_ignored) {
        Ok(b) => b,
        Err(e) => return Attempt::Fallback(format!("signalfd: {e}")),
    };
    let attempt = match Prepared::new(&call) {
        Ok(p) => connect(path).and_then(|sock| drive(sock, p, &call, &blocked)),
        Err(e) => Err(Sent::No(e)),
    };
    match attempt {
        Ok(a) => {
            if let Attempt::Fallback(_) = a {
                blocked.restore();
            }
            a
        }
        Err(Sent::No(e)) => {
            blocked.restore();
            Attempt::Fallback(e.to_string())
        }
        Err(Sent::Yes(e)) => Attempt::Ran(Ended::Error(format!("rexec mux: {e}"))),
    }
}

/// Connects to the mux on `path` and checks that it runs as this user or root.
fn connect(path: &Path) -> Result<UnixStream, Sent> {
    let sock = UnixStream::connect(path).map_err(|e| {
        Sent::No(MuxError::Io(io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )))
    })?;
    match peer_uid(sock.as_raw_fd()) {
        Ok(uid) if uid_allowed(uid) => Ok(sock),
        Ok(uid) => Err(Sent::No(MuxError::Insecure(format!(
            "{}: served by uid {uid}, not this user or root",
            path.display()
        )))),
        Err(e) => Err(Sent::No(MuxError::Io(io::Error::new(
            e.kind(),
            format!("{}: SO_PEERCRED: {e}", path.display()),
        )))),
    }
}

/// An error, and whether the request may have reached the mux (then no fallback).
enum Sent {
    No(MuxError),
    Yes(MuxError),
}

/// [`ClientMsg::Hello`] with the request borrowed: the same bytes (same variant index, same
/// fields in the same order; see the test), without cloning the request to encode it.
#[derive(serde::Serialize)]
enum HelloRef<'a> {
    Hello {
        version: u16,
        req: &'a ExecRequest,
        tty: bool,
        stdin: bool,
    },
}

/// The Hello frame and the stdin pipe, made before connecting.
struct Prepared {
    hello: Vec<u8>,
    pipe_r: Option<OwnedFd>,
    pipe_w: Option<OwnedFd>,
}

impl Prepared {
    fn new(call: &Call<'_>) -> Result<Prepared, MuxError> {
        let (pipe_r, pipe_w) = if call.stdin {
            let (r, w) = crate::sys::pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        // Sized once (argv and the environment are most of it): the request is not copied.
        let size = 64
            + call.req.argv.iter().map(|a| a.len() + 2).sum::<usize>()
            + call
                .req
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + call.req.cwd.as_ref().map_or(0, Vec::len);
        let hello = encode_into(
            &HelloRef::Hello {
                version: MUX_VERSION,
                req: call.req,
                tty: call.tty,
                stdin: call.stdin,
            },
            Vec::with_capacity(size),
        )?;
        Ok(Prepared {
            hello,
            pipe_r,
            pipe_w,
        })
    }
}

fn drive(
    mut sock: UnixStream,
    prepared: Prepared,
    call: &Call<'_>,
    blocked: &BlockedSignals,
) -> Result<Attempt, Sent> {
    let Prepared {
        hello,
        pipe_r,
        mut pipe_w,
    } = prepared;
    let mut fds: Vec<RawFd> = vec![1, 2];
    if let Some(r) = &pipe_r {
        fds.push(r.as_raw_fd());
    }
    let n = send_with_fds(sock.as_raw_fd(), &hello, &fds).map_err(|e| Sent::No(e.into()))?;
    drop(pipe_r);
    sock.write_all(&hello[n..])
        .map_err(|e| Sent::Yes(e.into()))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: blocked.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two valid pollfds.
        let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Sent::Yes(e.into()));
        }
        if pfd[1].revents != 0 {
            if let Some(ctl) = blocked.read(call.tty) {
                if let Ok(b) = encode(&ClientMsg::Control(ctl)) {
                    // A mux that went away shows up as EOF on the read side below.
                    let _ = sock.write_all(&b);
                }
            }
        }
        if pfd[0].revents == 0 {
            continue;
        }
        let n = match sock.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Sent::Yes(e.into())),
        };
        if n == 0 {
            return Ok(Attempt::Ran(Ended::Error(
                "rexec mux: connection closed before the exit status".into(),
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(msg) = decode::<MuxMsg>(&mut buf).map_err(Sent::Yes)? {
            match msg {
                MuxMsg::Unavailable(why) => return Ok(Attempt::Fallback(why)),
                MuxMsg::Accepted => {
                    if let Some(w) = pipe_w.take() {
                        spawn_stdin_copier(w).map_err(|e| Sent::Yes(e.into()))?;
                    }
                }
                MuxMsg::Stopped => blocked.stop_self(),
                MuxMsg::Done(e) => return Ok(Attempt::Ran(e)),
            }
        }
    }
}

/// Copies fd 0 into the pipe the mux reads, in a thread (blocking reads: files, pipes and
/// terminals alike). Like the direct client, with SIGTTIN blocked a read from the terminal
/// while rexec is in the background fails with EIO instead of stopping rexec; the thread
/// waits until rexec is in the foreground again.
fn spawn_stdin_copier(pipe: OwnedFd) -> io::Result<()> {
    std::thread::Builder::new()
        .name("rexec-stdin".into())
        .spawn(move || {
            crate::client::block_sigttin();
            let mut out = std::fs::File::from(pipe);
            let mut buf = vec![0u8; 128 * 1024];
            loop {
                let n = match crate::client::read_input(0, &mut buf) {
                    Some(0) | None => return,
                    Some(n) => n,
                };
                if out.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// `si_code` of signals the kernel generates itself (tty job control keys, hangup).
const SI_KERNEL: i32 = 0x80;

/// The forwarded signals, blocked in this process and read from a signalfd.
struct BlockedSignals {
    fd: OwnedFd,
    set: libc::sigset_t,
    old: libc::sigset_t,
}

impl BlockedSignals {
    /// Blocks every forwarded signal the caller does not ignore (those stay ignored).
    fn new(ignored: u64) -> io::Result<Self> {
        // SAFETY: sigset and signalfd calls on valid structs; the fd is owned from here on.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in Sig::ALL {
                let n = s.number();
                if s != Sig::Kill && ignored & (1 << n) == 0 {
                    libc::sigaddset(&mut set, n);
                }
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                let e = io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(e);
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
                set,
                old,
            })
        }
    }

    /// Back to the mask before (for the direct path after a fallback).
    fn restore(&self) {
        // SAFETY: restoring a mask saved by `new`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }

    /// Reads one signal and turns it into what the mux forwards (`None`: nothing to forward).
    fn read(&self, tty: bool) -> Option<Control> {
        // SAFETY: reading one signalfd_siginfo into a zeroed struct of its size.
        let info = unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                return None;
            }
            info
        };
        let sig = Sig::from_number(info.ssi_signo as i32)?;
        let group = info.ssi_code == SI_KERNEL;
        if tty && sig == Sig::Winch {
            return local_winsize().map(Control::Resize);
        }
        if sig == Sig::Tstp && (tty || pgrp_orphaned()) {
            // As the direct client: ^Z is a byte for the remote terminal with -t, and a
            // program in an orphaned process group would not stop locally either.
            debug!("SIGTSTP not forwarded (terminal mode or orphaned process group)");
            return None;
        }
        Some(Control::Signal { sig, group })
    }

    /// Stops this process by SIGTSTP (a job-control shell reports "Stopped"); returns once
    /// continued. The SIGCONT stays pending on the signalfd and is forwarded next.
    fn stop_self(&self) {
        // SAFETY: SIGTSTP's action is the default here (blocked, never caught); unblocking it
        // around a raise() stops this process, then the mask is put back.
        unsafe {
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, libc::SIGTSTP);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::raise(libc::SIGTSTP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &self.set, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{StdioKind, VERSION};

    #[test]
    fn borrowed_hello_encodes_like_the_owned_one() {
        let req = ExecRequest {
            version: VERSION,
            id: 7,
            argv: vec![b"/bin/echo".to_vec(), b"hi".to_vec()],
            env: vec![(b"PATH".to_vec(), b"/bin".to_vec())],
            cwd: Some(b"/tmp".to_vec()),
            user: Some("nobody".into()),
            pty: None,
            pgroup: true,
            umask: Some(0o22),
            nice: Some(3),
            sig_ignored: 1 << 13,
            stdio: [StdioKind::Stream, StdioKind::Closed, StdioKind::DevFull],
        };
        for (tty, stdin) in [(false, false), (true, true)] {
            let owned = encode(&ClientMsg::Hello {
                version: MUX_VERSION,
                req: req.clone(),
                tty,
                stdin,
            })
            .expect("encode");
            let borrowed = encode_into(
                &HelloRef::Hello {
                    version: MUX_VERSION,
                    req: &req,
                    tty,
                    stdin,
                },
                Vec::new(),
            )
            .expect("encode");
            assert_eq!(owned, borrowed);
        }
    }
}
