//! Wire protocol of the exec service (postcard).
//!
//! One exec = one stream to service [`SERVICE`] plus occasional calls:
//!
//! * stream header: [`ExecRequest`] (postcard).
//! * client → server stream bytes: the program's stdin, raw. Half-close (`finish`) = stdin EOF.
//!   stdin has the client→server direction of the stream to itself, so a program that never reads
//!   stdin only stalls stdin, never control.
//! * server → client stream bytes: frames `[kind: u8][len: u32 BE][payload]` (see [`FrameKind`]):
//!   stdout and stderr chunks (raw bytes, no copy through postcard) and [`ServerEvent`]s. The
//!   server sends [`ServerEvent::Exit`] only after stdout and stderr were drained, so a client that
//!   has read up to the exit frame has seen all output (Kata Containers lost output there).
//! * control (signals, window size, "my stdout is closed"): `session.call(SERVICE, ControlRequest)`,
//!   so control is never stuck behind flow-controlled data. Calls name the exec by the `id` the
//!   client chose in its [`ExecRequest`]; ids are scoped to the session.

use serde::{Deserialize, Serialize};

/// Service name under which the exec service registers on a session.
pub const SERVICE: &str = "exec";

/// Protocol version carried in every [`ExecRequest`]; the server refuses versions it does not speak.
/// Version 2 added [`ExecRequest::umask`], [`ExecRequest::nice`] and
/// [`ExecRequest::sig_ignored`]; version 3 [`ExecRequest::stdio`] and the `group` flag of
/// [`ControlRequest::Signal`] (with [`ControlReply::Stopped`]).
pub const VERSION: u16 = 3;

/// Largest payload of one server→client frame the client accepts (a peer-controlled length).
pub const MAX_FRAME_PAYLOAD: usize = 4 << 20;

/// Size of the frame header: kind byte + big-endian u32 length.
pub const FRAME_HEADER: usize = 5;

/// Terminal window size (`struct winsize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WinSize {
    /// Character rows.
    pub rows: u16,
    /// Character columns.
    pub cols: u16,
    /// Width in pixels (usually 0).
    pub xpixel: u16,
    /// Height in pixels (usually 0).
    pub ypixel: u16,
}

/// What to run. Strings are raw bytes: argv, environment and paths need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// [`VERSION`] of the client.
    pub version: u16,
    /// Client-chosen id (random), used by control calls to name this exec within the session.
    pub id: u64,
    /// argv verbatim; `argv[0]` is resolved like `execvp` (PATH from `env`, relative to `cwd`).
    pub argv: Vec<Vec<u8>>,
    /// Complete environment of the program (the client decides what to pass).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; `None` = the server's own.
    pub cwd: Option<Vec<u8>>,
    /// Run as this user (name or numeric uid); `None` = the server's user.
    pub user: Option<String>,
    /// Allocate a pty of this size (stdin/stdout/stderr all on the pty; no separate stderr).
    pub pty: Option<WinSize>,
    /// Deliver forwarded signals to the process group instead of the process.
    pub pgroup: bool,
    /// File mode creation mask of the caller; `None` = the server's own. Follows the caller like
    /// the environment does: `(umask 077; rexec touch f)` must not create a world-readable file.
    pub umask: Option<u32>,
    /// Nice value of the caller; `None` = the server's own. Applied best effort: a server
    /// without the privilege to lower its own nice value starts the program at its own.
    pub nice: Option<i32>,
    /// Signals (bit N = Linux signal N, 1..=31) the caller ignores: the program starts with them
    /// ignored too, as it would locally (`nohup rexec …`). Everything else starts at default.
    pub sig_ignored: u64,
    /// What the caller's stdin, stdout and stderr are, where the server can give the program
    /// the very same thing instead of a stream (ignored with `pty`).
    pub stdio: [StdioKind; 3],
}

/// What one of the caller's standard descriptors is, as far as the server reproduces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StdioKind {
    /// Streamed over the exec stream (pipes, files, terminals, sockets, /dev/null, ...).
    #[default]
    Stream,
    /// Closed: the program starts with this descriptor closed (EBADF at its first use).
    Closed,
    /// `/dev/full` (an output only): the program writes to the server's `/dev/full` and gets
    /// ENOSPC at the same write as locally.
    DevFull,
}

/// Kind byte of a server→client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Payload is bytes the program wrote to its stdout (or the pty).
    Stdout = 1,
    /// Payload is bytes the program wrote to its stderr.
    Stderr = 2,
    /// Payload is a postcard [`ServerEvent`].
    Event = 3,
}

impl FrameKind {
    /// Parses a kind byte; `None` for unknown kinds (a protocol error).
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            3 => Some(Self::Event),
            _ => None,
        }
    }
}

/// How the remote program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Normal exit with this code (0..=255).
    Code(i32),
    /// Killed by this signal (Linux numbering).
    Signal {
        /// Signal number.
        signal: i32,
        /// Whether it left a core dump.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The exit code a shell reports for this status: N, or 128+S for signal S.
    pub fn shell_code(&self) -> i32 {
        match *self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal { signal, .. } => 128 + signal,
        }
    }
}

/// Events the server sends inside [`FrameKind::Event`] frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerEvent {
    /// The program runs (control calls for this id are accepted from now on).
    Started {
        /// The program's pid on the server side.
        pid: u32,
    },
    /// The program ended; sent after all of its output. Last frame of the stream.
    Exit(ExitStatus),
    /// The program could not be started; `code` is what a shell would return (126 refused or not
    /// executable, 127 not found). Last frame of the stream.
    Failed {
        /// 126 or 127, as a shell would return.
        code: i32,
        /// Why, for the client's stderr.
        message: String,
    },
}

/// Signals the client forwards. Named rather than numbered so both ends map them with their own
/// libc (the HOST and DPU may differ in architecture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sig {
    /// SIGINT.
    Int,
    /// SIGTERM.
    Term,
    /// SIGHUP.
    Hup,
    /// SIGQUIT.
    Quit,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
    /// SIGWINCH.
    Winch,
    /// SIGCONT.
    Cont,
    /// SIGTSTP (with `group`: stop like a job, see [`ControlRequest::Signal`]).
    Tstp,
    /// SIGKILL.
    Kill,
}

impl Sig {
    /// Every forwardable signal.
    pub const ALL: [Sig; 10] = [
        Sig::Int,
        Sig::Term,
        Sig::Hup,
        Sig::Quit,
        Sig::Usr1,
        Sig::Usr2,
        Sig::Winch,
        Sig::Cont,
        Sig::Tstp,
        Sig::Kill,
    ];

    /// The local signal number.
    pub fn number(self) -> i32 {
        match self {
            Sig::Int => libc::SIGINT,
            Sig::Term => libc::SIGTERM,
            Sig::Hup => libc::SIGHUP,
            Sig::Quit => libc::SIGQUIT,
            Sig::Usr1 => libc::SIGUSR1,
            Sig::Usr2 => libc::SIGUSR2,
            Sig::Winch => libc::SIGWINCH,
            Sig::Cont => libc::SIGCONT,
            Sig::Tstp => libc::SIGTSTP,
            Sig::Kill => libc::SIGKILL,
        }
    }

    /// Maps a local signal number back to a [`Sig`].
    pub fn from_number(n: i32) -> Option<Sig> {
        Sig::ALL.into_iter().find(|s| s.number() == n)
    }
}

/// Which output of the remote program a [`ControlRequest::CloseOutput`] closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFd {
    /// The program's stdout.
    Stdout,
    /// The program's stderr.
    Stderr,
}

/// Control calls (`session.call(SERVICE, ..)`), answered with [`ControlReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Deliver a signal to the program (or its process group if the exec asked for `pgroup`, or
    /// if `group`: the caller's whole process group got it, e.g. from the terminal's ^C).
    /// [`Sig::Tstp`] with `group` means "stop like a job": the program's group is stopped
    /// (SIGSTOP where SIGTSTP has its default action, which the kernel would discard in the
    /// program's orphaned group; SIGTSTP where the program handles it). A later [`Sig::Cont`]
    /// resumes the whole group.
    Signal {
        /// The exec: its [`ExecRequest::id`].
        id: u64,
        /// Which signal.
        sig: Sig,
        /// The caller's whole process group received it.
        group: bool,
    },
    /// New pty window size (the kernel then sends SIGWINCH to the pty's foreground group).
    Resize {
        /// The exec: its [`ExecRequest::id`].
        id: u64,
        /// The new size.
        size: WinSize,
    },
    /// The client's stdout/stderr went away (EPIPE): close the server's read end so the remote
    /// program gets SIGPIPE/EPIPE like it would locally.
    CloseOutput {
        /// The exec: its [`ExecRequest::id`].
        id: u64,
        /// Which output went away.
        fd: OutputFd,
    },
}

/// Answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// Done.
    Ok,
    /// Answer to a group [`Sig::Tstp`]: the program was stopped (its SIGTSTP action is the
    /// default); the caller stops too. Plain `Ok` means the program handles (or ignores) SIGTSTP.
    Stopped,
    /// No running exec with that id on this session (already finished, or never started).
    UnknownId,
}

/// Encodes a frame header for `len` payload bytes of `kind`.
pub fn frame_header(kind: FrameKind, len: usize) -> [u8; FRAME_HEADER] {
    let l = (len as u32).to_be_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// Error decoding the server→client frame stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The kind byte is not a [`FrameKind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The length is above the frame limit (refused before buffering).
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// An event frame's postcard does not decode.
    #[error("bad event frame: {0}")]
    BadEvent(String),
}

/// A decoded server→client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Program stdout bytes.
    Stdout(bytes::Bytes),
    /// Program stderr bytes.
    Stderr(bytes::Bytes),
    /// A lifecycle event.
    Event(ServerEvent),
}

/// Incremental decoder for the server→client frame stream (input arrives in arbitrary pieces).
/// A frame that arrives whole in one piece is sliced out without copying; only frames split
/// across pieces are reassembled (each byte copied once).
#[derive(Default)]
pub struct FrameDecoder {
    /// Unparsed bytes of the latest piece (starts at a frame boundary).
    pending: bytes::Bytes,
    /// Reassembly buffer for a frame split across pieces (starts at a frame boundary).
    partial: bytes::BytesMut,
}

/// Parses a frame header: (kind, payload length).
fn parse_header(b: &[u8]) -> Result<(FrameKind, usize), FrameError> {
    let kind = FrameKind::from_u8(b[0]).ok_or(FrameError::UnknownKind(b[0]))?;
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

fn make_frame(kind: FrameKind, payload: bytes::Bytes) -> Result<Frame, FrameError> {
    Ok(match kind {
        FrameKind::Stdout => Frame::Stdout(payload),
        FrameKind::Stderr => Frame::Stderr(payload),
        FrameKind::Event => Frame::Event(
            postcard::from_bytes(&payload).map_err(|e| FrameError::BadEvent(e.to_string()))?,
        ),
    })
}

impl FrameDecoder {
    /// Appends received bytes (copied; see [`FrameDecoder::push_bytes`]).
    pub fn push(&mut self, data: &[u8]) {
        self.push_bytes(bytes::Bytes::copy_from_slice(data));
    }

    /// Appends a received piece without copying it.
    pub fn push_bytes(&mut self, data: bytes::Bytes) {
        if self.partial.is_empty() && self.pending.is_empty() {
            self.pending = data;
        } else {
            self.partial.extend_from_slice(&self.pending);
            self.pending = bytes::Bytes::new();
            self.partial.extend_from_slice(&data);
        }
    }

    /// Bytes received but not yet decoded (non-zero at EOF means a truncated stream).
    pub fn pending(&self) -> usize {
        self.pending.len() + self.partial.len()
    }

    /// Next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if !self.partial.is_empty() {
            if self.partial.len() < FRAME_HEADER {
                return Ok(None);
            }
            let (kind, len) = parse_header(&self.partial)?;
            if self.partial.len() < FRAME_HEADER + len {
                self.partial
                    .reserve(FRAME_HEADER + len - self.partial.len());
                return Ok(None);
            }
            let _ = self.partial.split_to(FRAME_HEADER);
            let payload = self.partial.split_to(len).freeze();
            return make_frame(kind, payload).map(Some);
        }
        if self.pending.len() >= FRAME_HEADER {
            let (kind, len) = parse_header(&self.pending)?;
            if self.pending.len() >= FRAME_HEADER + len {
                let mut frame = self.pending.split_to(FRAME_HEADER + len);
                let payload = frame.split_off(FRAME_HEADER);
                return make_frame(kind, payload).map(Some);
            }
        }
        // Incomplete frame: move it to the reassembly buffer.
        if !self.pending.is_empty() {
            self.partial.extend_from_slice(&self.pending);
            self.pending = bytes::Bytes::new();
        }
        Ok(None)
    }
}

/// Encodes an event as a complete frame.
pub fn event_frame(ev: &ServerEvent) -> bytes::Bytes {
    // Serializing these plain enums into a Vec cannot fail.
    let payload = postcard::to_allocvec(ev).unwrap_or_default();
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&frame_header(FrameKind::Event, payload.len()));
    out.extend_from_slice(&payload);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_in_pieces() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&frame_header(FrameKind::Stdout, 3));
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&frame_header(FrameKind::Stderr, 0));
        wire.extend_from_slice(&event_frame(&ServerEvent::Exit(ExitStatus::Signal {
            signal: 9,
            core_dumped: false,
        })));
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        for b in wire.chunks(2) {
            d.push_bytes(bytes::Bytes::copy_from_slice(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::Stdout(bytes::Bytes::from_static(b"abc")),
                Frame::Stderr(bytes::Bytes::new()),
                Frame::Event(ServerEvent::Exit(ExitStatus::Signal {
                    signal: 9,
                    core_dumped: false
                })),
            ]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn whole_pieces_decode_without_copy() {
        let mut piece = Vec::new();
        piece.extend_from_slice(&frame_header(FrameKind::Stdout, 4));
        piece.extend_from_slice(b"wxyz");
        piece.extend_from_slice(&frame_header(FrameKind::Stderr, 1));
        let piece = bytes::Bytes::from(piece);
        let mut d = FrameDecoder::default();
        d.push_bytes(piece.clone());
        match d.next_frame().unwrap() {
            Some(Frame::Stdout(b)) => {
                assert_eq!(&b[..], b"wxyz");
                assert_eq!(
                    b.as_ptr(),
                    piece[FRAME_HEADER..].as_ptr(),
                    "sliced, not copied"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(d.next_frame().unwrap(), None);
        d.push_bytes(bytes::Bytes::from_static(b"!"));
        assert_eq!(
            d.next_frame().unwrap(),
            Some(Frame::Stderr(bytes::Bytes::from_static(b"!")))
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut d = FrameDecoder::default();
        d.push_bytes(bytes::Bytes::from_static(&[9, 0, 0, 0, 0]));
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut d = FrameDecoder::default();
        d.push_bytes(bytes::Bytes::copy_from_slice(&frame_header(
            FrameKind::Stdout,
            MAX_FRAME_PAYLOAD + 1,
        )));
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
        let mut d = FrameDecoder::default();
        d.push_bytes(bytes::Bytes::copy_from_slice(&frame_header(
            FrameKind::Event,
            2,
        )));
        d.push_bytes(bytes::Bytes::from_static(&[0xff, 0xff]));
        assert!(matches!(d.next_frame(), Err(FrameError::BadEvent(_))));
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(
            ExitStatus::Signal {
                signal: 15,
                core_dumped: false
            }
            .shell_code(),
            143
        );
        for s in Sig::ALL {
            assert_eq!(Sig::from_number(s.number()), Some(s));
        }
    }
}
