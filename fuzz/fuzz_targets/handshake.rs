//! The handshake a peer drives before it is authenticated: frames, Hello, Welcome/Auth/Refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::session::{fuzz_decode_hello, fuzz_handshake};
use transport::wire::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    fuzz_handshake(data);
    let body = data.get(HEADER_LEN..).unwrap_or(data);
    if let Some(enc) = fuzz_decode_hello(body) {
        // decode -> encode -> decode is stable.
        assert_eq!(fuzz_decode_hello(&enc).as_ref(), Some(&enc));
    }
});
