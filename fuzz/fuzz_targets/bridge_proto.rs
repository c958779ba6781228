//! Bridge control calls, replies and stream headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shim_bridge::proto::{self, Reply, Request, StreamHeader};

fn roundtrip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = proto::decode::<T>(data) {
        let enc = proto::encode(&v).expect("encodes");
        assert_eq!(proto::decode::<T>(&enc).expect("own encoding decodes"), v);
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<Request>(data);
    roundtrip::<Reply>(data);
    roundtrip::<StreamHeader>(data);
});
