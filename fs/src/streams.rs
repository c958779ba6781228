//! What the `fs` service's stream protocols ([`crate::fifo`], [`crate::notify`]) share: a
//! stream header is a kind byte followed by a postcard body, and each message a `len: u32 LE`
//! prefix followed by a postcard body.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A stream header: `kind`, then `h` in postcard.
pub(crate) fn header<T: Serialize>(kind: u8, h: &T) -> Bytes {
    let mut v = vec![kind];
    v.extend(postcard::to_allocvec(h).unwrap_or_default());
    Bytes::from(v)
}

/// The header body if `b` is a header of `kind` that decodes.
pub(crate) fn parse_header<T: DeserializeOwned>(kind: u8, b: &[u8]) -> Option<T> {
    match b.split_first() {
        Some((&k, rest)) if k == kind => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// One message as sent: `len: u32 LE` then the postcard body.
pub(crate) fn frame<T: Serialize>(m: &T) -> Bytes {
    let body = postcard::to_allocvec(m).unwrap_or_default();
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(&body);
    Bytes::from(v)
}

/// Why a message body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The stream failed (or ended inside a message).
    Io(std::io::Error),
    /// The prefix announced more than the protocol's largest message.
    TooLong,
}

/// The body length a prefix announces, if at most `max` (it sizes an allocation, and the
/// peer chose it).
pub(crate) fn body_len(prefix: [u8; 4], max: usize) -> Option<usize> {
    let n = u32::from_le_bytes(prefix) as usize;
    (n <= max).then_some(n)
}

/// Reads one message body (`None`: the peer ended the stream between messages).
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, BodyError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(BodyError::Io(e)),
    }
    let n = body_len(len, max).ok_or(BodyError::TooLong)?;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await.map_err(BodyError::Io)?;
    Ok(Some(buf))
}
