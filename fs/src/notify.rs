//! Wire protocol of the change feed: the HOST tells a DPU mount which of the directories and
//! files it holds changed behind its back, so the DPU can cache attributes, entries and
//! pages for long and still show a HOST-side change within milliseconds (NFSv4 delegations'
//! recall, CephFS's capability revocation, in their simplest form: "drop what you cached").
//!
//! The DPU opens one stream per mount on the `fs` service with the header
//! [`STREAM_NOTIFY`] + postcard [`FeedHeader`]. The HOST answers with [`Msg::Ready`] (whether it
//! can watch at all), then sends [`Msg::Changes`] batches as its watcher reports changes to
//! nodes this session holds, [`Msg::Unwatched`] for directories it could not watch (another
//! filesystem without change reporting, such as overlayfs or a pseudo filesystem), and
//! [`Msg::Reset`] when it lost track (its event queue overflowed): the DPU then drops every
//! cached attribute and entry. The DPU never writes on the stream; closing it ends the feed.
//! Each message is a `len: u32 LE` prefix and a postcard body.
//!
//! Changes this session made itself are not reported back (they would only throw away what
//! the DPU already knows); changes made through another session holding the same directory
//! are.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::proto::NodeId;

/// First byte of a change-feed stream header (FIFO tunnels use [`crate::fifo::STREAM_FIFO`]).
pub const STREAM_NOTIFY: u8 = 2;

/// Largest message body accepted (it sizes an allocation the peer chose).
pub const MAX_MSG: usize = 1 << 20;

/// Most changes the HOST puts into one [`Msg::Changes`].
pub const MAX_BATCH: usize = 512;

/// Header of a change-feed stream (after [`STREAM_NOTIFY`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedHeader {
    /// The server instance whose node ids the feed names.
    pub instance: u64,
}

/// What changed (bits of [`Change::what`]).
pub mod what {
    /// A name in the directory appeared, disappeared or was renamed (the directory's listing,
    /// link count and times changed too).
    pub const NAME: u8 = 1;
    /// Attributes (mode, owner, times, size) of the named child, or of the directory itself
    /// when no name is given.
    pub const ATTR: u8 = 2;
    /// File contents of the named child changed: cached pages are stale.
    pub const DATA: u8 = 4;
    /// The directory itself was removed or moved away.
    pub const GONE: u8 = 8;
}

/// One change: in directory `dir` (a node this session holds), to `name` or, without a name,
/// to the directory itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Change {
    /// The directory's node.
    pub dir: NodeId,
    /// The child's name; `None`: the directory itself.
    #[serde(with = "serde_bytes")]
    pub name: Option<Vec<u8>>,
    /// [`what`] bits.
    pub what: u8,
}

/// HOST → DPU messages of a change feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Msg {
    /// First message. `watching: false`: this HOST cannot report changes (no fanotify, or not
    /// privileged); the DPU keeps its short TTLs.
    Ready {
        /// Whether changes will be reported.
        watching: bool,
    },
    /// Changes to nodes this session holds, oldest first.
    Changes(Vec<Change>),
    /// Directories whose changes cannot be reported: entries in them and their children's
    /// attributes must keep short TTLs.
    Unwatched(Vec<NodeId>),
    /// Changes were lost (an overflow): drop everything cached.
    Reset,
}

/// Why a feed message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The stream failed or ended.
    #[error("change feed stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that cannot be decoded.
    #[error("malformed change feed message")]
    Malformed,
}

/// Encodes the stream header of a feed.
pub fn encode_header(h: &FeedHeader) -> Bytes {
    crate::streams::header(STREAM_NOTIFY, h)
}

/// Decodes a feed stream header (`None`: not a feed header).
pub fn decode_header(b: &[u8]) -> Option<FeedHeader> {
    crate::streams::parse_header(STREAM_NOTIFY, b)
}

/// One message as sent on the stream: `len: u32 LE` then the postcard body.
pub fn frame(m: &Msg) -> Bytes {
    crate::streams::frame(m)
}

/// Reads the next message (`None`: the HOST ended the feed).
pub async fn read_msg<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Msg>, FeedError> {
    match crate::streams::read_body(r, MAX_MSG).await {
        Ok(Some(body)) => decode_msg(&body).map(Some),
        Ok(None) => Ok(None),
        Err(crate::streams::BodyError::Io(e)) => Err(e.into()),
        Err(crate::streams::BodyError::TooLong) => Err(FeedError::Malformed),
    }
}

/// Decodes a message body (after its length prefix).
pub fn decode_msg(body: &[u8]) -> Result<Msg, FeedError> {
    postcard::from_bytes(body).map_err(|_| FeedError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let msgs = vec![
            Msg::Ready { watching: true },
            Msg::Changes(vec![
                Change {
                    dir: 7,
                    name: Some(b"init.pid".to_vec()),
                    what: what::NAME,
                },
                Change {
                    dir: 7,
                    name: None,
                    what: what::ATTR,
                },
            ]),
            Msg::Unwatched(vec![9, 10]),
            Msg::Reset,
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&frame(m));
        }
        let mut r = &wire[..];
        for m in &msgs {
            assert_eq!(read_msg(&mut r).await.unwrap().as_ref(), Some(m));
        }
        assert!(read_msg(&mut r).await.unwrap().is_none());
        let h = FeedHeader { instance: 5 };
        assert_eq!(decode_header(&encode_header(&h)), Some(h));
        assert_eq!(decode_header(&[1, 5]), None);
    }

    #[tokio::test]
    async fn refuses_absurd_lengths_and_garbage() {
        let mut r = &[0xff, 0xff, 0xff, 0x7f][..];
        assert!(matches!(read_msg(&mut r).await, Err(FeedError::Malformed)));
        let mut r = &[2, 0, 0, 0, 0xff, 0xff][..];
        assert!(matches!(read_msg(&mut r).await, Err(FeedError::Malformed)));
    }
}
