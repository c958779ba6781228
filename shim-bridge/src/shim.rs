//! The DPU-side `containerd-shim-runc-v2` replacement's library half: run the real shim's
//! action on the HOST through the exec service and capture its output byte for byte.

use crate::BridgeError;
use bytes::Bytes;
use offload_exec::proto::{ExecRequest, Frame, FrameDecoder, ServerEvent, SERVICE, VERSION};
use std::path::PathBuf;
use transport::Session;

/// Default path of the real shim on the HOST.
pub const REAL_SHIM: &str = "/usr/bin/containerd-shim-runc-v2";

/// What the remote run produced, in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// `(1, bytes)` for stdout, `(2, bytes)` for stderr, in the order the HOST read them.
    pub output: Vec<(u8, Bytes)>,
    /// Exit code a shell would report (128+S for signal S; 126/127 when it did not start).
    pub code: i32,
    /// Why the program did not start, if it did not.
    pub not_started: Option<String>,
}

impl Captured {
    /// All stdout bytes concatenated.
    pub fn stdout(&self) -> Vec<u8> {
        self.output
            .iter()
            .filter(|(fd, _)| *fd == 1)
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }
}

/// Runs `argv` on the HOST with exactly `env` and `cwd`, feeding `stdin`, and captures the
/// output. Returns once the exit status arrived (the exec service sends it after all output).
pub async fn run_capture(
    session: &Session,
    argv: Vec<Vec<u8>>,
    env: Vec<(Vec<u8>, Vec<u8>)>,
    cwd: Option<Vec<u8>>,
    stdin: Bytes,
) -> Result<Captured, BridgeError> {
    let req = ExecRequest {
        version: VERSION,
        id: offload_exec::client::new_id(),
        argv,
        env,
        cwd,
        user: None,
        pty: None,
        pgroup: false,
        // The real shim runs with the exec service's own umask and nice value.
        umask: None,
        nice: None,
        sig_ignored: 0,
        stdio: Default::default(),
    };
    let stream = session
        .open_stream(SERVICE, offload_exec::client::encode_request(&req))
        .await?;
    let (mut rd, mut wr) = stream.split();
    if !stdin.is_empty() {
        wr.send(stdin).await?;
    }
    wr.finish()?;
    let mut dec = FrameDecoder::default();
    let mut out = Captured::default();
    loop {
        let Some(chunk) = rd.recv().await? else {
            return Err(BridgeError::Unexpected(
                "exec stream ended before the exit status".into(),
            ));
        };
        dec.push(&chunk);
        while let Some(f) = dec
            .next_frame()
            .map_err(|e| BridgeError::Unexpected(format!("exec frame: {e}")))?
        {
            match f {
                Frame::Stdout(b) => out.output.push((1, b)),
                Frame::Stderr(b) => out.output.push((2, b)),
                Frame::Event(ServerEvent::Started { .. }) => {}
                Frame::Event(ServerEvent::Exit(st)) => {
                    out.code = st.shell_code();
                    return Ok(out);
                }
                Frame::Event(ServerEvent::Failed { code, message }) => {
                    out.code = code;
                    out.not_started = Some(message);
                    return Ok(out);
                }
            }
        }
    }
}

/// The socket path in a shim `start` output (`unix:///run/containerd/s/<hash>`), if any.
pub fn socket_of_start_output(stdout: &[u8]) -> Option<PathBuf> {
    let s = std::str::from_utf8(stdout).ok()?.trim();
    let p = s.strip_prefix("unix://")?;
    p.starts_with('/').then(|| PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_start_output() {
        assert_eq!(
            socket_of_start_output(b"unix:///run/containerd/s/ab12"),
            Some(PathBuf::from("/run/containerd/s/ab12"))
        );
        assert_eq!(
            socket_of_start_output(b"unix:///x\n"),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(socket_of_start_output(b"ttrpc://x"), None);
        assert_eq!(socket_of_start_output(b"unix://rel"), None);
    }
}
