//! fs requests as the HOST decodes them: the full op decoder and the raw write fast path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_fs::proto::{self, Op, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::decode::<Request>(data) {
        let enc = proto::encode(&req).expect("encodes");
        let again: Request = proto::decode(&enc).expect("own encoding decodes");
        assert_eq!(again, req);
        if let Op::Write {
            fh,
            offset,
            data: d,
        } = &req.op
        {
            assert_eq!(
                proto::decode_write(&enc),
                Some((req.instance, *fh, *offset, &d[..]))
            );
        }
    }
    // The fast path accepts only what the full decoder accepts, with the same meaning.
    if let Some((instance, fh, offset, d)) = proto::decode_write(data) {
        let req: Request =
            proto::decode(data).expect("fast path accepted what the decoder refuses");
        let want = Request {
            instance,
            op: Op::Write {
                fh,
                offset,
                data: d.to_vec(),
            },
        };
        assert_eq!(req, want);
        let enc = proto::encode_write(instance, fh, offset, d).expect("encodes");
        assert_eq!(enc, proto::encode(&want).expect("encodes"));
    }
});
