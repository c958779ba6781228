//! Wire protocol of the "bridge" service (postcard). Control calls go through `session.call`;
//! forwarded connections and FIFO pumps are session streams whose header says what they carry.

use serde::{Deserialize, Serialize};

/// Protocol version carried in [`Request::Hello`] so mismatched peers fail loudly, not subtly.
pub const PROTO_VERSION: u32 = 1;

/// Control calls on service `"bridge"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness/capability probe sent once per session before any rule is pushed, so sessions
    /// whose peer does not run a bridge (short `rexec` sessions) are left alone.
    Hello {
        /// The sender's protocol version.
        version: u32,
    },
    /// "Listen at `path` on your side; forward every connection to my socket `target`."
    AddProxy {
        /// Socket path to listen at, on the receiver's side.
        path: String,
        /// The sender's socket that connections go to.
        target: String,
    },
    /// Remove the proxy listener at `path` (the original went away) and close its connections.
    RemoveProxy {
        /// The proxy listener's path on the receiver's side.
        path: String,
    },
    /// Deliver signal `signal` to process `pid` on the receiving side (`kill(2)` semantics, pid > 0).
    Kill {
        /// Target process on the receiving side (> 0).
        pid: i32,
        /// Signal number (`kill(2)`'s `sig`).
        signal: i32,
    },
    /// Make `path` (a socket in one of the receiver's watched dirs) reachable on every bridge
    /// peer now; the reply comes once every peer confirmed its listener. Used by `offload-shim`
    /// so containerd never connects before the proxy exists.
    Expose {
        /// The socket to expose.
        path: String,
    },
}

/// Replies to [`Request`]s. Failures travel as `RemoteError` (code = errno where one applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The receiver's protocol version.
        version: u32,
    },
    /// The request was carried out.
    Done,
    /// Answer to [`Request::Expose`]: how many bridge peers now listen on the path.
    Exposed {
        /// Peers listening on the path.
        peers: u32,
    },
}

/// Header of a stream opened on service `"bridge"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// A forwarded Unix connection: connect to the receiver's socket `path` and pump both ways.
    Connect {
        /// The socket to connect to, on the receiver's side.
        path: String,
    },
    /// A container stdio FIFO: create `path` as a FIFO on the receiver's side and pump data.
    Fifo {
        /// FIFO path, on the receiver's side.
        path: String,
        /// Which way the bytes flow.
        direction: FifoDirection,
    },
}

/// Which way bytes flow through a bridged FIFO, seen from the stream opener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FifoDirection {
    /// Opener reads its FIFO and sends; the receiver writes into its FIFO (stdin).
    ToReceiver,
    /// Receiver reads its FIFO and sends; the opener writes into its FIFO (stdout/stderr).
    FromReceiver,
}

/// Encodes a protocol value (cannot fail for these types except on allocation).
pub fn encode<T: Serialize>(v: &T) -> Result<bytes::Bytes, postcard::Error> {
    postcard::to_allocvec(v).map(bytes::Bytes::from)
}

/// Decodes a protocol value sent by the peer.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let reqs = [
            Request::Hello {
                version: PROTO_VERSION,
            },
            Request::AddProxy {
                path: "/run/a".into(),
                target: "/run/b".into(),
            },
            Request::RemoveProxy {
                path: "/run/a".into(),
            },
            Request::Kill {
                pid: 42,
                signal: 15,
            },
            Request::Expose {
                path: "/run/containerd/s/x".into(),
            },
        ];
        for r in reqs {
            let b = encode(&r).unwrap();
            assert_eq!(decode::<Request>(&b).unwrap(), r);
        }
        let h = StreamHeader::Fifo {
            path: "/f".into(),
            direction: FifoDirection::FromReceiver,
        };
        assert_eq!(decode::<StreamHeader>(&encode(&h).unwrap()).unwrap(), h);
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
    }
}
