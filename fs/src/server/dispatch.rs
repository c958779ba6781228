//! The one entry point of every fs request: envelope, server instance, operation table.

use bytes::Bytes;
use tracing::debug;
use transport::RemoteError;

use crate::proto::{self, HostFs, OpCode, Status};

/// Handles one encoded request against `fs` and encodes its reply. Failures of the operation
/// travel in the reply's [`Status`]; only a request that cannot be decoded (a peer bug or a
/// protocol version mismatch) fails the call itself, with `EPROTO` and the reason.
pub async fn dispatch<H: HostFs>(fs: &H, req: &[u8]) -> Result<Bytes, RemoteError> {
    let protocol = |e: proto::ProtoError| RemoteError::new(libc::EPROTO, e.to_string());
    let req = proto::parse_request(req).map_err(protocol)?;
    if req.code != OpCode::Mount && req.instance != fs.instance() {
        return proto::encode_status(Status::StaleInstance).map_err(protocol);
    }
    debug!(op = req.code.name(), "fs op");
    match proto::call_op(fs, req.code, req.args, req.payload).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(errno)) => proto::encode_status(Status::Errno(errno)).map_err(protocol),
        Err(e) => Err(protocol(e)),
    }
}
