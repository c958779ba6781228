//! Pumping one local Unix connection through one session stream, both ways, half-close kept.

use bytes::{Bytes, BytesMut};
use offload_metrics::Direction;
use std::io;
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use transport::Stream;

/// How much buffer space is allocated at once; reads carve chunks out of it so a fresh
/// allocation happens once every few reads, not per read.
const SLAB_FACTOR: usize = 4;

/// Outcome of one `recvmsg` on the local socket.
struct Received {
    bytes: usize,
    /// File descriptors that arrived as SCM_RIGHTS (already closed: they cannot cross the link).
    dropped_fds: usize,
    /// Control data was truncated (MSG_CTRUNC) or of another kind (credentials...).
    other_control: bool,
}

/// `recvmsg(2)` into the spare capacity of `buf` (at most `max` bytes), detecting ancillary data.
fn recv_with_cmsg(fd: i32, buf: &mut BytesMut, max: usize) -> io::Result<Received> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    // Room for 64 fds; more arrive truncated and are reported as such.
    let mut cbuf = [0u64; 40];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: fd is a live socket owned by the caller; iov points into `buf`'s spare capacity,
    // which the kernel only writes to.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    let mut out = Received {
        bytes: n,
        dropped_fds: 0,
        other_control: msg.msg_flags & libc::MSG_CTRUNC != 0,
    };
    if msg.msg_controllen > 0 {
        // SAFETY: standard CMSG traversal over the buffer the kernel filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let hdr = &*c;
                if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const i32;
                    let bytes = hdr.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / std::mem::size_of::<i32>() {
                        libc::close(std::ptr::read_unaligned(data.add(i)));
                        out.dropped_fds += 1;
                    }
                } else {
                    out.other_control = true;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    Ok(out)
}

/// Reads the next chunk from the local socket; `Ok(None)` on EOF.
async fn read_chunk(
    sock: &UnixStream,
    buf: &mut BytesMut,
    chunk: usize,
    label: &str,
    warned: &mut bool,
) -> io::Result<Option<Bytes>> {
    if buf.capacity() - buf.len() < chunk {
        buf.reserve(chunk * SLAB_FACTOR);
    }
    let fd = sock.as_raw_fd();
    let r = loop {
        sock.readable().await?;
        match sock.try_io(Interest::READABLE, || recv_with_cmsg(fd, buf, chunk)) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    if (r.dropped_fds > 0 || r.other_control) && !*warned {
        *warned = true;
        tracing::warn!(
            path = label,
            fds = r.dropped_fds,
            other_control = r.other_control,
            "ancillary data (SCM_RIGHTS/credentials) cannot cross the bridge: dropped; \
             the bytes were forwarded, received fds were closed"
        );
    }
    if r.bytes == 0 {
        return Ok(None);
    }
    Ok(Some(buf.split().freeze()))
}

async fn write_all(sock: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        sock.writable().await?;
        match sock.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pumps `sock` ⇄ `stream` until both directions finished, one fails, or `cancel` fires.
/// Local EOF → stream finish; stream EOF → `shutdown(SHUT_WR)` on the socket. Errors and
/// cancellation reset the stream so the far side closes its connection at once.
pub(crate) async fn pump(
    sock: UnixStream,
    stream: Stream,
    chunk: usize,
    cancel: CancellationToken,
    label: String,
) {
    let (mut rx, mut tx) = stream.split();
    let (counters, _open) = (
        offload_metrics::bridge(),
        offload_metrics::bridge().connection(),
    );
    let result: io::Result<()> = {
        let up = async {
            let mut buf = BytesMut::with_capacity(chunk * SLAB_FACTOR);
            let mut warned = false;
            loop {
                match read_chunk(&sock, &mut buf, chunk, &label, &mut warned).await? {
                    Some(b) => {
                        counters.socket_bytes(Direction::ToPeer, b.len());
                        tx.send(b).await?
                    }
                    None => return tx.finish(),
                }
            }
        };
        let down = async {
            while let Some(b) = rx.recv().await? {
                write_all(&sock, &b).await?;
                counters.socket_bytes(Direction::FromPeer, b.len());
            }
            // Peer finished: half-close our write side, keep reading.
            nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                .map_err(io::Error::from)
        };
        tokio::pin!(up);
        tokio::pin!(down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break Err(io::Error::other("proxy removed")),
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Err(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Err(e),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    match result {
        Ok(()) => tracing::debug!(path = %label, "bridged connection closed"),
        Err(e) => {
            tracing::debug!(path = %label, error = %e, "bridged connection aborted");
            tx.reset_with(&format!("bridged connection aborted: {e}"));
        }
    }
    drop(rx);
}
