//! fs replies as the DPU decodes them: the full reply decoder and the raw read fast path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_fs::proto::{self, Reply, DATA_HEADROOM};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::decode::<Reply>(data) {
        let enc = proto::encode(&r).expect("encodes");
        assert_eq!(
            proto::decode::<Reply>(&enc).expect("own encoding decodes"),
            r
        );
    }
    if let Some(d) = proto::decode_data(data) {
        let full =
            proto::decode::<Reply>(data).expect("fast path accepted what the decoder refuses");
        assert_eq!(full, Reply::Data(d.to_vec()));
    }
    // The in-place reply builder round-trips arbitrary data.
    let mut buf = vec![0u8; DATA_HEADROOM];
    buf.extend_from_slice(data);
    let built = proto::data_reply(buf).expect("builds");
    assert_eq!(proto::decode_data(&built), Some(data));
});
