//! Small Linux helpers: non-blocking fds driven by tokio, pipes, ptys, pidfds and waiting.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;

use crate::proto::{WinSize, FRAME_HEADER};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets O_NONBLOCK on `fd` (only on fds we created, never on inherited stdio).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh fds we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Grows a pipe's buffer (fewer wakeups when streaming); failure is harmless.
pub fn grow_pipe(fd: RawFd, size: i32) {
    // SAFETY: fcntl on an fd we own; errors ignored on purpose.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, size);
    }
}

/// Opens a new pty pair (master, slave, slave path), both close-on-exec, with the given window
/// size.
pub fn open_pty(size: WinSize) -> io::Result<(OwnedFd, OwnedFd, std::ffi::CString)> {
    // SAFETY: plain libc calls; every returned fd is wrapped in an OwnedFd immediately.
    unsafe {
        let m = cvt(libc::posix_openpt(
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let master = OwnedFd::from_raw_fd(m);
        cvt(libc::grantpt(m))?;
        cvt(libc::unlockpt(m))?;
        let mut name = [0 as libc::c_char; 128];
        let r = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let s = cvt(libc::open(
            CStr::from_ptr(name.as_ptr()).as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let slave = OwnedFd::from_raw_fd(s);
        set_winsize(m, size)?;
        Ok((master, slave, CStr::from_ptr(name.as_ptr()).to_owned()))
    }
}

/// TIOCSWINSZ on a terminal fd.
pub fn set_winsize(fd: RawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: size.xpixel,
        ws_ypixel: size.ypixel,
    };
    // SAFETY: ws is a valid winsize.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// TIOCGWINSZ on a terminal fd; `None` if `fd` is not a terminal.
pub fn get_winsize(fd: RawFd) -> Option<WinSize> {
    // SAFETY: ws is a valid out-parameter.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) < 0 {
            return None;
        }
        Some(WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
            xpixel: ws.ws_xpixel,
            ypixel: ws.ws_ypixel,
        })
    }
}

/// The terminal's EOF character if the terminal is in canonical mode (where it means EOF).
pub fn canonical_eof_char(fd: RawFd) -> Option<u8> {
    // SAFETY: t is a valid out-parameter.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) < 0 || t.c_lflag & libc::ICANON == 0 {
            return None;
        }
        Some(t.c_cc[libc::VEOF])
    }
}

/// An owned non-blocking fd registered with tokio.
pub struct AsyncFile(AsyncFd<OwnedFd>);

impl AsyncFile {
    /// Makes `fd` non-blocking and registers it with the current runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: OwnedFd is a valid open fd that stays the same until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self(fd))
    }

    /// The raw fd (for ioctls).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reads up to `max` bytes into a fresh buffer that starts with `headroom` spare bytes
    /// (so a frame header can be written in place). `None` = EOF (EIO on a pty master counts as
    /// EOF: the last slave fd was closed).
    pub async fn read_chunk(&self, headroom: usize, max: usize) -> io::Result<Option<BytesMut>> {
        let mut buf = None;
        loop {
            let mut guard = self.0.readable().await?;
            // Allocated only once the fd is readable: callers select! over several sources and
            // drop the losing futures every round, so an up-front buffer would be churn.
            let buf = buf.get_or_insert_with(|| {
                let mut b = BytesMut::with_capacity(headroom + max);
                b.resize(headroom, 0);
                b
            });
            let r = guard.try_io(|fd| {
                let spare = buf.spare_capacity_mut();
                // SAFETY: reading into the spare capacity of buf, at most its length.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        spare.as_mut_ptr() as *mut libc::c_void,
                        spare.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised n bytes after the current length.
                    unsafe { buf.set_len(headroom + n) };
                    return Ok(Some(std::mem::take(buf)));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(None),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` (waits for room; EPIPE is returned as an error).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| {
                // SAFETY: writing from a valid slice.
                let n = unsafe {
                    libc::write(
                        fd.as_raw_fd(),
                        data.as_ptr() as *const libc::c_void,
                        data.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// Frames a chunk read with [`AsyncFile::read_chunk`] (headroom = [`FRAME_HEADER`]) in place.
pub fn finish_frame(mut buf: BytesMut, kind: crate::proto::FrameKind) -> Bytes {
    let len = buf.len() - FRAME_HEADER;
    buf[..FRAME_HEADER].copy_from_slice(&crate::proto::frame_header(kind, len));
    buf.freeze()
}

/// A pidfd for a child we spawned and have not reaped: becomes readable when the child exits.
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: libc::pid_t,
}

impl PidFd {
    /// pidfd_open(2) for `pid`.
    pub fn open(pid: libc::pid_t) -> io::Result<Self> {
        // SAFETY: pidfd_open takes (pid, flags) and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        // SAFETY: OwnedFd is a valid open fd that stays the same until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd, pid })
    }

    /// Sends `sig` to exactly this process (no pid-reuse race).
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(pidfd, sig, NULL, 0).
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Waits for the child to exit and reaps it. Returns the raw wait status.
    pub async fn wait(&self) -> io::Result<i32> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                return Ok(status);
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            guard.clear_ready();
        }
    }
}

/// Converts a raw wait status to the protocol's exit status.
pub fn exit_status(status: i32) -> crate::proto::ExitStatus {
    if libc::WIFSIGNALED(status) {
        crate::proto::ExitStatus::Signal {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        crate::proto::ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

/// kill(2) returning io::Result; ESRCH (already gone) is success.
pub fn kill(pid: libc::pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// What a process does with a signal (from `/proc/<pid>/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAction {
    /// SIG_DFL.
    Default,
    /// SIG_IGN.
    Ignored,
    /// A handler is installed.
    Caught,
}

/// The action process `pid` has for `sig` now; `Default` if it cannot be read (gone, no /proc).
pub fn signal_action(pid: libc::pid_t, sig: i32) -> SigAction {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return SigAction::Default;
    };
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let bit = 1u64 << (sig - 1);
    if mask("SigIgn:") & bit != 0 {
        SigAction::Ignored
    } else if mask("SigCgt:") & bit != 0 {
        SigAction::Caught
    } else {
        SigAction::Default
    }
}
