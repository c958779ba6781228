//! The rexec mux: one authenticated session to the peer's exec service, kept by a local daemon
//! (`rexec_mux`), shared by every `rexec` on this machine through a Unix socket (like ssh's
//! ControlMaster).
//!
//! Why: a `rexec` that dials itself pays a connect, two X25519 operations and an HMAC per side,
//! an extra round trip and its async runtime's start on every call; through the mux it only
//! connects to a local socket, hands over its stdout/stderr descriptors (`SCM_RIGHTS`) and the
//! request, and waits for the exit status ([`client`]: no crypto, no handshake, no tokio).
//!
//! The local protocol (this module, not the wire towards the peer, which is unchanged):
//! frames `[len: u32 LE][postcard]` on a `SOCK_STREAM` Unix socket.
//! * rexec → mux: [`ClientMsg::Hello`] with the descriptors attached to its first byte
//!   (stdout, stderr, and the read end of a pipe rexec copies its stdin into, if stdin is not
//!   empty), then [`ClientMsg::Control`] for each signal rexec receives.
//! * mux → rexec: [`MuxMsg::Unavailable`] (nothing was sent to the peer: rexec connects
//!   itself instead), [`MuxMsg::Accepted`] (the peer has the request: rexec may start reading
//!   its stdin), [`MuxMsg::Stopped`] (a job stop stopped the program: rexec stops itself),
//!   [`MuxMsg::Done`] (last: all output was written and the mux closed its copies of the
//!   descriptors).
//!
//! The mux writes the program's output to the caller's own stdout/stderr (the same open
//! files), so output errors (EPIPE, ENOSPC) happen in the mux's writes exactly as in rexec's
//! and reach the program the same way ([`crate::client`]). If rexec's connection closes before
//! [`MuxMsg::Done`] (rexec was killed), the mux kills the remote program's process group.
//!
//! Security: the socket is the boundary. The mux creates it 0600 in a directory of its own
//! that is 0700 ([`prepare_dir`]), accepts only peers of its own uid or root (`SO_PEERCRED`),
//! and rexec talks only to a mux of its own uid or root. The key stays readable by the mux only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::{ExecRequest, ExitStatus, Sig, WinSize};

pub mod client;
pub mod server;

/// Version of the local rexec ↔ mux protocol; a mux that speaks another answers
/// [`MuxMsg::Unavailable`] and rexec connects itself.
pub const MUX_VERSION: u16 = 1;

/// Environment variable naming the mux socket for `rexec` (`none`: always connect directly).
pub const CONTROL_ENV: &str = "REXEC_CONTROL";

/// Environment variable overriding the directory of the default mux sockets.
pub const CONTROL_DIR_ENV: &str = "REXEC_CONTROL_DIR";

/// Largest local frame accepted (a request carries argv and the environment).
pub const MAX_LOCAL_FRAME: usize = 16 << 20;

/// rexec → mux.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// The exec to run. Descriptors attached: stdout, stderr, then the stdin pipe if `stdin`.
    Hello {
        /// [`MUX_VERSION`].
        version: u16,
        /// The request, as rexec would have sent it itself.
        req: ExecRequest,
        /// rexec runs with `-t` and its terminal in raw mode.
        tty: bool,
        /// A stdin pipe is attached; rexec fills it after [`MuxMsg::Accepted`].
        stdin: bool,
    },
    /// A signal rexec received, or a new window size.
    Control(Control),
}

/// A control message from rexec (see [`crate::client::LocalControl`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Forward this signal (`group`: the kernel sent it to rexec's whole process group).
    Signal {
        /// Which signal.
        sig: Sig,
        /// Sent to the caller's whole process group.
        group: bool,
    },
    /// The local terminal's new size.
    Resize(WinSize),
}

/// mux → rexec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MuxMsg {
    /// The mux cannot run it (no session to the peer, refused caller, other version); nothing
    /// reached the peer.
    Unavailable(String),
    /// The peer has the request; rexec may read its stdin into the pipe now.
    Accepted,
    /// The program was stopped by a job stop: rexec stops itself (SIGTSTP).
    Stopped,
    /// How it ended. Last message; all output is written.
    Done(Ended),
}

/// How an exec run by the mux ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ended {
    /// The program ran and ended so.
    Exited(ExitStatus),
    /// It did not start (126/127 and why).
    NotStarted {
        /// Shell-style code.
        code: i32,
        /// Why.
        message: String,
    },
    /// The mux lost the session (or the protocol broke) while it ran.
    Error(String),
}

/// Errors of the local protocol.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// Socket I/O.
    #[error("mux socket: {0}")]
    Io(#[from] io::Error),
    /// A frame that does not decode or is too large.
    #[error("mux protocol: {0}")]
    Protocol(String),
    /// The control directory or socket is not private to its owner.
    #[error("{0}")]
    Insecure(String),
}

/// Encodes one local frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, MuxError> {
    encode_into(msg, Vec::new())
}

/// [`encode`] into `buf` (emptied first; its capacity is reused): one buffer, no copy.
pub fn encode_into<T: Serialize>(msg: &T, mut buf: Vec<u8>) -> Result<Vec<u8>, MuxError> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    let mut v = postcard::to_extend(msg, buf).map_err(|e| MuxError::Protocol(e.to_string()))?;
    let len = u32::try_from(v.len() - 4)
        .ok()
        .filter(|&l| l as usize <= MAX_LOCAL_FRAME)
        .ok_or_else(|| MuxError::Protocol(format!("frame of {} bytes", v.len() - 4)))?;
    v[..4].copy_from_slice(&len.to_le_bytes());
    Ok(v)
}

/// Splits one whole frame off the front of `buf`, if there is one.
pub fn decode<T: for<'de> Deserialize<'de>>(buf: &mut Vec<u8>) -> Result<Option<T>, MuxError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_LOCAL_FRAME {
        return Err(MuxError::Protocol(format!("frame of {len} bytes")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = postcard::from_bytes(&buf[4..4 + len]).map_err(|e| MuxError::Protocol(e.to_string()));
    buf.drain(..4 + len);
    msg.map(Some)
}

/// The default mux socket for a peer address and key file: `<dir>/<hash>.sock`, where dir is
/// `$REXEC_CONTROL_DIR`, else `/run/dpu-offload/rexec` for root, else
/// `$XDG_RUNTIME_DIR/dpu-offload-rexec`, else `/tmp/dpu-offload-rexec-<uid>`. The hash (FNV-1a,
/// not a secret: the directory's permissions are the protection) names the address and key
/// path, so rexec and the mux find each other with nothing configured but what rexec needs
/// anyway.
pub fn default_control_path(addr: &str, key_file: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in addr
        .as_bytes()
        .iter()
        .chain(b"\0")
        .chain(key_file.as_os_str().as_encoded_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    control_dir().join(format!("{h:016x}.sock"))
}

/// The key file a link with `explicit` (`--key-file`) uses, for [`default_control_path`]:
/// `explicit`, else `$OFFLOAD_KEY_FILE`, else `/etc/offload/psk` (as the transport resolves it).
/// A relative path is made absolute against the working directory (lexically: no symlinks
/// resolved), so `--key-file psk` and `--key-file $PWD/psk` name the same mux.
pub fn key_file_path(explicit: Option<&Path>) -> PathBuf {
    let p = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(transport::auth::KEY_FILE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(transport::auth::DEFAULT_KEY_FILE));
    std::path::absolute(&p).unwrap_or(p)
}

/// The directory of the default mux sockets (see [`default_control_path`]).
pub fn control_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CONTROL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: plain getter.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/dpu-offload/rexec");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("dpu-offload-rexec");
    }
    PathBuf::from(format!("/tmp/dpu-offload-rexec-{uid}"))
}

/// Creates (parents 0755, itself 0700) or checks the directory that holds a mux socket: it
/// must be a directory owned by this user with no access for group or others, else a local
/// user could replace the socket.
pub fn prepare_dir(dir: &Path) -> Result<(), MuxError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let md = std::fs::symlink_metadata(dir)?;
    // SAFETY: plain getter.
    let uid = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != uid || md.mode() & 0o077 != 0 {
        return Err(MuxError::Insecure(format!(
            "{}: must be a directory owned by uid {uid} with mode 0700 (is {:o}, uid {})",
            dir.display(),
            md.mode() & 0o7777,
            md.uid()
        )));
    }
    Ok(())
}

/// The uid of the process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    // SAFETY: getsockopt into a correctly sized ucred.
    unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
}

/// True if a peer of uid `uid` may use (or serve) this process's execs: the same user or root.
pub fn uid_allowed(uid: u32) -> bool {
    // SAFETY: plain getter.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`); returns the bytes sent (maybe fewer).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let space = cmsg_space(fds.len());
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr over valid buffers; CMSG macros stay within `cbuf` (sized by CMSG_SPACE).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                std::mem::size_of_val(fds),
            );
        }
        loop {
            let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn cmsg_space(n: usize) -> usize {
    // SAFETY: pure size computation.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Most descriptors one Hello carries.
pub const MAX_FDS: usize = 3;

/// One `recvmsg`: bytes into `buf`, received descriptors appended to `fds` (owned, close on
/// exec). `Ok(0)` is EOF. Non-blocking sockets give `WouldBlock` as usual.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let space = cmsg_space(MAX_FDS);
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr over valid buffers; the kernel fills at most `space` control bytes; each
    // received descriptor is new and owned by us from here on.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("too many descriptors attached"));
        }
        Ok(n as usize)
    }
}

/// A raw descriptor number of an owned one (for logs and syscalls).
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_split() {
        let m = MuxMsg::Done(Ended::Exited(ExitStatus::Signal {
            signal: 15,
            core_dumped: false,
        }));
        let mut b = encode(&m).expect("encode");
        b.extend(encode(&MuxMsg::Accepted).expect("encode"));
        let mut part = b[..3].to_vec();
        assert_eq!(decode::<MuxMsg>(&mut part).expect("decode"), None);
        assert_eq!(decode::<MuxMsg>(&mut b).expect("decode"), Some(m));
        assert_eq!(
            decode::<MuxMsg>(&mut b).expect("decode"),
            Some(MuxMsg::Accepted)
        );
        assert!(b.is_empty());
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        assert!(decode::<MuxMsg>(&mut huge).is_err());
    }

    #[test]
    fn fds_pass_over_a_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (r, w) = crate::sys::pipe().expect("pipe");
        let n = send_with_fds(a.as_raw_fd(), b"hello", &[w.as_raw_fd()]).expect("send");
        assert_eq!(n, 5);
        drop(w);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received write end is the same pipe: what goes in comes out of `r`.
        let mut f = std::fs::File::from(fds.remove(0));
        std::io::Write::write_all(&mut f, b"x").expect("write");
        drop(f);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut got).expect("read");
        assert_eq!(got, b"x");
    }

    #[test]
    fn default_paths_differ_by_address_and_key() {
        let a = default_control_path("tcp://127.0.0.1:1", Path::new("/k"));
        let b = default_control_path("tcp://127.0.0.1:2", Path::new("/k"));
        let c = default_control_path("tcp://127.0.0.1:1", Path::new("/k2"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            default_control_path("tcp://127.0.0.1:1", Path::new("/k"))
        );
    }

    #[test]
    fn prepare_dir_refuses_an_open_directory() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("a/b");
        prepare_dir(&d).expect("create");
        let mode = std::fs::metadata(&d).expect("md").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(matches!(prepare_dir(&d), Err(MuxError::Insecure(_))));
    }
}
