//! fs replies as the DPU decodes them: the status, the result and the raw payload.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use offload_fs::proto::{self, DirEntry, Mounted, OutData, Refusal};
use serde::{de::DeserializeOwned, Serialize};

/// Decodes the reply with result type `T` and checks that it re-encodes to the same reply.
fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(reply: &Bytes) {
    match proto::decode_reply::<T>(reply) {
        Ok(Ok((v, payload))) => {
            let enc = proto::encode_ok(&v, OutData::from_slice(&payload)).expect("encodes");
            let (back, p2) = proto::decode_reply::<T>(&enc)
                .expect("own encoding decodes")
                .expect("still a success");
            assert_eq!((back, p2), (v, payload));
        }
        Ok(Err(status)) => {
            let enc = proto::encode_status(status).expect("encodes");
            assert_eq!(proto::decode_reply::<T>(&enc).expect("decodes"), Err(status));
        }
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let reply = Bytes::copy_from_slice(data);
    check::<()>(&reply);
    check::<u32>(&reply);
    check::<i64>(&reply);
    check::<proto::Entry>(&reply);
    check::<proto::Attr>(&reply);
    check::<Vec<DirEntry>>(&reply);
    check::<Result<Mounted, Refusal>>(&reply);
    // The in-place reply builder round-trips arbitrary data behind its reserved head.
    let mut out = OutData::with_capacity(data.len());
    out.buf_mut().extend_from_slice(data);
    let built = proto::encode_ok(&(data.len() as u32), out).expect("builds");
    let (n, payload) = proto::decode_reply::<u32>(&built)
        .expect("decodes")
        .expect("a success");
    assert_eq!((n as usize, &payload[..]), (data.len(), data));
});
