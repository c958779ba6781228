//! The handshake a peer drives before it is authenticated: frames, Hello, Welcome/Auth/Refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::session::{fuzz_decode_hello, fuzz_handshake};
use transport::wire::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the handshake core's role; the rest is what the peer sends.
    fuzz_handshake(data);
    let stream = data.get(1..).unwrap_or_default();
    let body = stream.get(HEADER_LEN..).unwrap_or(stream);
    if let Some(enc) = fuzz_decode_hello(body) {
        // decode -> encode -> decode is stable.
        assert_eq!(fuzz_decode_hello(&enc).as_ref(), Some(&enc));
    }
});
