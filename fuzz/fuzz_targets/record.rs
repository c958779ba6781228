//! The encrypted record layer an authenticated peer (or anyone on the path) feeds after the
//! handshake: record lengths, tags, nonce order (`transport::crypto::fuzz_records`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    transport::crypto::fuzz_records(data);
});
