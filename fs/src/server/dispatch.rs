//! The one entry point of every fs request: envelope, server instance, operation table.

use bytes::Bytes;
use tracing::debug;
use transport::RemoteError;

use crate::proto::{self, HostFs, OpCode, Status};

/// Handles one encoded request against `fs` and encodes its reply. Failures of the operation
/// travel in the reply's [`Status`]; only a request that cannot be decoded (a peer bug or a
/// protocol version mismatch) fails the call itself, with `EPROTO` and the reason.
pub async fn dispatch<H: HostFs>(fs: &H, req: &[u8]) -> Result<Bytes, RemoteError> {
    let t0 = std::time::Instant::now();
    let (label, ok, reply) = handle(fs, req).await;
    // The metrics hook (`offload status`, Prometheus): one per request, failures included.
    offload_metrics::fs_op(label, t0.elapsed(), ok);
    reply
}

/// [`dispatch`] without the metrics: the operation's label, whether it succeeded, the reply.
async fn handle<H: HostFs>(fs: &H, req: &[u8]) -> (&'static str, bool, Result<Bytes, RemoteError>) {
    let protocol = |e: proto::ProtoError| RemoteError::new(libc::EPROTO, e.to_string());
    let req = match proto::parse_request(req) {
        Ok(r) => r,
        Err(e) => return ("invalid", false, Err(protocol(e))),
    };
    let label = req.code.label();
    if req.code != OpCode::Mount && req.instance != fs.instance() {
        return (
            label,
            false,
            proto::encode_status(Status::StaleInstance).map_err(protocol),
        );
    }
    debug!(op = req.code.name(), "fs op");
    match proto::call_op(fs, req.code, req.args, req.payload).await {
        Ok(Ok(reply)) => (label, true, Ok(reply)),
        Ok(Err(errno)) => (
            label,
            false,
            proto::encode_status(Status::Errno(errno)).map_err(protocol),
        ),
        Err(e) => (label, false, Err(protocol(e))),
    }
}
