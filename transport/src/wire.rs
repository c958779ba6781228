//! The session wire format: a fixed 12-byte frame header, postcard-encoded control messages,
//! and raw payload bytes for calls and stream data (never re-encoded, never copied again).
//!
//! ```text
//! 0      4     5       6        8          12
//! | len  | kind| flags | rsvd   | id       | payload (len bytes) ...
//! ```
//! `len` and `id` are little endian. `id` is a call id (Request/Response/Error) or a stream id
//! (Open/Data/Eof/Reset/Credit); stream ids are odd when opened by the dialing side, even when
//! opened by the accepting side, so both can open streams without coordination.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build. 2: the acceptor proves the key first (1-RTT handshake).
/// 3: the Hello carries an encryption policy and an ephemeral X25519 key; encrypted sessions
/// run over AES-128-GCM records after the handshake ([`crate::crypto`]).
pub const VERSION: u16 = 3;
/// First bytes of every Hello, so a wrong peer (HTTP, SSH, garbage) is recognised at once.
pub const MAGIC: [u8; 8] = *b"DPUOFFL\x01";
/// Size of the frame header.
pub const HEADER_LEN: usize = 12;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: each side's [`Hello`] (version, nonce, services, policy).
    Hello = 1,
    /// Handshake: the dialer's [`Auth`] tag over both Hellos.
    Auth = 2,
    /// Handshake: the acceptor's [`Welcome`] tag over both Hellos.
    Welcome = 3,
    /// Handshake: the acceptor's [`Refuse`] reason before it closes.
    Refuse = 4,
    /// A call: service prefix and request bytes; `id` is the call id.
    Request = 5,
    /// A call's successful reply, matched by call id.
    Response = 6,
    /// A call's failure ([`ErrorBody`]), matched by call id.
    Error = 7,
    /// Opens a stream to a service; `id` is the new stream id.
    Open = 8,
    /// Stream bytes, counted against the receiver's credit.
    Data = 9,
    /// The sender will write no more on this stream (half close).
    Eof = 10,
    /// The stream is aborted in both directions; the payload says why.
    Reset = 11,
    /// The receiver consumed this many bytes (u32 LE): the sender may send as many more.
    Credit = 12,
    /// Heartbeat probe; the peer answers with a Pong of the same id.
    Ping = 13,
    /// Heartbeat answer to the Ping of the same id.
    Pong = 14,
    /// The sender opens no new calls or streams; existing ones finish.
    GoAway = 15,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Auth,
            3 => Welcome,
            4 => Refuse,
            5 => Request,
            6 => Response,
            7 => Error,
            8 => Open,
            9 => Data,
            10 => Eof,
            11 => Reset,
            12 => Credit,
            13 => Ping,
            14 => Pong,
            15 => GoAway,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length after the header (at most the session's frame limit).
    pub len: u32,
    /// What the payload is.
    pub kind: Kind,
    /// Call id or stream id (see the module docs); 0 for session-wide frames.
    pub id: u32,
}

/// Malformed input from the peer; always closes that one connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The kind byte names no [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The header announces more than the frame limit; nothing is allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced payload length.
        len: u32,
        /// The local frame limit.
        max: u32,
    },
    /// A control message's postcard bytes do not decode.
    #[error("undecodable {what}: {reason}")]
    Decode {
        /// Which message was being decoded.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
}

impl Header {
    /// Parses a header from the first [`HEADER_LEN`] bytes, enforcing `max_frame`.
    pub fn parse(b: &[u8; HEADER_LEN], max_frame: u32) -> Result<Header, WireError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let kind = Kind::from_u8(b[4]).ok_or(WireError::UnknownKind(b[4]))?;
        let id = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if len > max_frame {
            return Err(WireError::TooLarge {
                len,
                max: max_frame,
            });
        }
        Ok(Header { len, kind, id })
    }

    /// Appends the encoded header.
    pub fn put(&self, out: &mut BytesMut) {
        out.put_u32_le(self.len);
        out.put_u8(self.kind as u8);
        out.put_u8(0);
        out.put_u16_le(0);
        out.put_u32_le(self.id);
    }
}

/// First message of each side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`]: anything else is not a dpu-offload peer.
    pub magic: [u8; 8],
    /// The sender's [`VERSION`]; both must be equal.
    pub version: u16,
    /// Fresh random bytes, so every handshake's tags differ (no replay).
    pub nonce: [u8; 32],
    /// Services this side serves to the peer.
    pub services: Vec<String>,
    /// Whether this side holds a pre-shared key and demands authentication.
    pub authenticated: bool,
}

/// The dialer's proof of the key (empty when unauthenticated).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Auth {
    /// HMAC-SHA256 with the pre-shared key over the role and both Hellos.
    pub tag: Vec<u8>,
}

/// The acceptor's proof of the key; the session is open once the dialer has checked it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// HMAC-SHA256 with the pre-shared key over the role and both Hellos.
    pub tag: Vec<u8>,
}

/// Why the acceptor refused the handshake (sent before it closes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refuse {
    /// Human-readable reason, logged by the dialer.
    pub reason: String,
}

/// An application error carried back to the caller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Service-defined code (an errno for fs, negative values are the session's own).
    pub code: i32,
    /// Human-readable detail.
    pub message: String,
}

/// Encodes a control message.
pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    // Serializing plain structs into a Vec cannot fail.
    Bytes::from(postcard::to_allocvec(msg).unwrap_or_default())
}

/// Decodes a control message, naming it in the error.
pub fn decode<'a, T: Deserialize<'a>>(what: &'static str, b: &'a [u8]) -> Result<T, WireError> {
    postcard::from_bytes(b).map_err(|e| WireError::Decode {
        what,
        reason: e.to_string(),
    })
}

/// Payload of Request and Open: a length-prefixed service name followed by the body, so the
/// body itself is passed on as a zero-copy slice.
pub fn put_service_prefix(service: &str, out: &mut BytesMut) {
    let name = service.as_bytes();
    out.put_u8(name.len().min(255) as u8);
    out.put_slice(&name[..name.len().min(255)]);
}

/// Splits a Request/Open payload into the service name and the body.
pub fn split_service(mut payload: Bytes) -> Result<(String, Bytes), WireError> {
    if payload.is_empty() {
        return Err(WireError::Decode {
            what: "service name",
            reason: "empty payload".into(),
        });
    }
    let n = payload.get_u8() as usize;
    if payload.len() < n {
        return Err(WireError::Decode {
            what: "service name",
            reason: "truncated".into(),
        });
    }
    let name = payload.split_to(n);
    let name = std::str::from_utf8(&name)
        .map_err(|_| WireError::Decode {
            what: "service name",
            reason: "not UTF-8".into(),
        })?
        .to_string();
    Ok((name, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_limits() {
        let h = Header {
            len: 42,
            kind: Kind::Data,
            id: 7,
        };
        let mut b = BytesMut::new();
        h.put(&mut b);
        let arr: [u8; HEADER_LEN] = b[..].try_into().unwrap();
        assert_eq!(Header::parse(&arr, 100).unwrap(), h);
        assert_eq!(
            Header::parse(&arr, 10).unwrap_err(),
            WireError::TooLarge { len: 42, max: 10 }
        );
        let mut bad = arr;
        bad[4] = 200;
        assert_eq!(
            Header::parse(&bad, 100).unwrap_err(),
            WireError::UnknownKind(200)
        );
    }

    #[test]
    fn service_prefix() {
        let mut b = BytesMut::new();
        put_service_prefix("fs", &mut b);
        b.put_slice(b"body");
        let (s, body) = split_service(b.freeze()).unwrap();
        assert_eq!(s, "fs");
        assert_eq!(&body[..], b"body");
        assert!(split_service(Bytes::from_static(&[5, b'a'])).is_err());
    }
}
