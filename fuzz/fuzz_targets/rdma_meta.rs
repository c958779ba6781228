//! RDMA link metadata: the ring description in the connection private data and the
//! immediate data of every message (the counters it advances).
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::rdma_meta::{advance, imm_decode, imm_encode, RingInfo, MAX_SLOTS, MAX_SLOT_SIZE};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = RingInfo::decode(data) {
        assert!((1..=MAX_SLOTS).contains(&r.slots) && (1..=MAX_SLOTS).contains(&r.ctrl));
        assert!(r.slot_size >= 1 && r.slot_size <= MAX_SLOT_SIZE);
        assert_eq!(&r.encode()[..], &data[..RingInfo::LEN]);
    }
    if data.len() >= 8 {
        let imm = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mut full = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        let (c, r, low) = imm_decode(imm);
        assert!(c < 256 && r < 256 && low < 65536);
        assert_eq!(imm_encode(c, r, low), imm);
        let before = full;
        advance(&mut full, r);
        assert_eq!(full & 0xff, r);
        assert!(full.wrapping_sub(before) < 256);
    }
});
