//! The encrypted record layer an authenticated peer (or anyone on the path) feeds after the
//! handshake: record lengths, tags, nonce order (`transport::crypto::fuzz_records`), and the
//! frames decoded across the decrypted records (`transport::session::fuzz_deframe`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    transport::crypto::fuzz_records(data);
    transport::session::fuzz_deframe(data);
});
