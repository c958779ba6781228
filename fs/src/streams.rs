//! What the `fs` service's stream protocols ([`crate::fifo`], [`crate::notify`]) share: a
//! stream header is a kind byte followed by a postcard body, and each message a `len: u32 LE`
//! prefix followed by a postcard body.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

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
