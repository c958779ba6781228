//! exec: the stream header and control calls the HOST decodes, and the server->client frame
//! stream the DPU decodes (in arbitrary pieces: the result must not depend on the split).
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_exec::proto::{
    ControlReply, ControlRequest, ExecRequest, Frame, FrameDecoder, FrameError, ServerEvent,
};

fn roundtrip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let enc = postcard::to_allocvec(&v).expect("encodes");
        assert_eq!(
            postcard::from_bytes::<T>(&enc).expect("own encoding decodes"),
            v
        );
    }
}

/// Every frame until the input runs out or an error.
fn drain(d: &mut FrameDecoder, out: &mut Vec<Frame>) -> Result<(), FrameError> {
    while let Some(f) = d.next_frame()? {
        out.push(f);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    roundtrip::<ExecRequest>(stream);
    roundtrip::<ControlRequest>(stream);
    roundtrip::<ControlReply>(stream);
    roundtrip::<ServerEvent>(stream);

    let mut whole = FrameDecoder::default();
    whole.push(stream);
    let mut a = Vec::new();
    let ra = drain(&mut whole, &mut a);

    let step = usize::from(ctl % 31) + 1;
    let mut pieces = FrameDecoder::default();
    let mut b = Vec::new();
    let mut rb = Ok(());
    for chunk in stream.chunks(step) {
        pieces.push(chunk);
        rb = drain(&mut pieces, &mut b);
        if rb.is_err() {
            break;
        }
        assert!(pieces.pending() <= stream.len());
    }
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    if ra.is_ok() {
        assert_eq!(whole.pending(), pieces.pending());
    }
});
