//! Session frame header and the control-message payloads the session reader decodes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use transport::wire::{self, Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN + 4 {
        return;
    }
    let (lim, data) = data.split_at(4);
    let max = u32::from_le_bytes([lim[0], lim[1], lim[2], lim[3]]);
    let (head, rest) = data.split_at(HEADER_LEN);
    let head: &[u8; HEADER_LEN] = head.try_into().unwrap();
    if let Ok(h) = Header::parse(head, max) {
        assert!(h.len <= max);
        // Re-encoding gives the same bytes except the ignored flags/reserved bytes.
        let mut out = BytesMut::new();
        h.put(&mut out);
        let mut expect = *head;
        expect[5..8].fill(0);
        assert_eq!(&out[..], &expect[..]);
        assert_eq!(Header::parse(&expect, max), Ok(h));
    }
    let payload = Bytes::copy_from_slice(rest);
    if let Ok((name, body)) = wire::split_service(payload) {
        let mut again = BytesMut::new();
        wire::put_service_prefix(&name, &mut again);
        again.extend_from_slice(&body);
        assert_eq!(&again[..], rest);
    }
    if let Ok(e) = wire::decode::<wire::ErrorBody>("error", rest) {
        let enc = wire::encode(&e);
        assert_eq!(wire::decode::<wire::ErrorBody>("error", &enc), Ok(e));
    }
    let _ = wire::decode::<wire::Refuse>("refuse", rest);
    let _ = wire::decode::<wire::Hello>("hello", rest);
    if let Some(v) = transport::session::fuzz_u32_payload(rest) {
        assert_eq!(rest, v.to_le_bytes());
    }
});
