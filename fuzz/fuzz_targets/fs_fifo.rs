//! The fs FIFO tunnel: stream header and the length-prefixed message stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_fs::fifo;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = fifo::decode_header(data) {
        assert_eq!(fifo::decode_header(&fifo::encode_header(&h)), Some(h));
    }
    // The message stream, as read_msg consumes it.
    let mut rest = data;
    while rest.len() >= 4 {
        let (prefix, tail) = rest.split_at(4);
        let Ok(n) = fifo::msg_len([prefix[0], prefix[1], prefix[2], prefix[3]]) else {
            break;
        };
        assert!(n <= fifo::CHUNK + 64);
        let Some((body, tail)) = tail.split_at_checked(n) else {
            break;
        };
        rest = tail;
        let Ok(m) = fifo::decode_msg(body) else {
            break;
        };
        let framed = fifo::frame(&m);
        let len = fifo::msg_len([framed[0], framed[1], framed[2], framed[3]]).expect("own length");
        assert_eq!(len, framed.len() - 4);
        assert_eq!(
            fifo::decode_msg(&framed[4..]).expect("own frame decodes"),
            m
        );
    }
});
