//! Container stdio FIFOs across the link.
//!
//! `ctr`/dockerd on the DPU create `<dir>/<rand>/<id>-stdin|-stdout|-stderr` FIFOs and hand the
//! paths to the shim, which runs on the HOST and opens the same paths there. The DPU bridge
//! watches its `fifo_dirs`; for every FIFO that appears it opens a stream; the HOST creates the
//! same path as a FIFO (before the shim's `Create` can arrive: the client creates FIFOs before
//! asking containerd for a task) and pumps bytes: `-stdin` DPU→HOST, `-stdout`/`-stderr`
//! HOST→DPU. When the DPU FIFO goes, the stream is reset and the HOST FIFO removed.

use crate::config::under_any;
use crate::proto::{self, FifoDirection, StreamHeader};
use crate::service::{Inner, SERVICE};
use crate::watch::{list, DirWatcher};
use offload_metrics::Direction;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;
use transport::{Session, Stream, StreamReader, StreamWriter};

const CHUNK: usize = 64 * 1024;

/// How long the HOST waits for the shim to open a stdin FIFO before giving up.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// Direction for a FIFO name, seen from the DPU (the stream opener); `None` = not stdio.
fn direction_of(p: &Path) -> Option<FifoDirection> {
    let name = p.file_name()?.to_str()?;
    if name.ends_with("-stdin") {
        Some(FifoDirection::ToReceiver)
    } else if name.ends_with("-stdout") || name.ends_with("-stderr") {
        Some(FifoDirection::FromReceiver)
    } else {
        None
    }
}

/// FIFOs directly in `dir` and one level below (`<dir>/<rand>/<id>-stdout`).
fn scan(dir: &Path, w: &DirWatcher) -> Vec<PathBuf> {
    let mut out = list(dir, |t| t.is_fifo());
    for sub in list(dir, |t| t.is_dir()) {
        w.watch(&sub);
        out.extend(list(&sub, |t| t.is_fifo()));
    }
    out
}

/// DPU side: mirrors FIFOs of `fifo_dirs` to the peer until `cancel`.
pub(crate) async fn watch_fifos(inner: Arc<Inner>, session: Session, cancel: CancellationToken) {
    let mut w = DirWatcher::new(Duration::from_millis(inner.cfg.rescan_interval_ms.max(50)));
    let mut active: HashMap<PathBuf, CancellationToken> = HashMap::new();
    // Create the dirs now so inotify sees the client's first FIFOs (ctr creates the dir lazily).
    for d in &inner.cfg.fifo_dirs {
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
        {
            tracing::warn!(dir = %d.display(), error = %e, "cannot create FIFO dir; polling for it");
        }
    }
    loop {
        let mut now = Vec::new();
        for d in &inner.cfg.fifo_dirs {
            w.watch(d);
            now.extend(scan(d, &w));
        }
        active.retain(|p, tok| {
            let keep = now.contains(p) && !tok.is_cancelled();
            if !keep {
                tok.cancel();
            }
            keep
        });
        for p in now {
            if active.contains_key(&p) {
                continue;
            }
            let Some(direction) = direction_of(&p) else {
                continue;
            };
            let tok = cancel.child_token();
            active.insert(p.clone(), tok.clone());
            let peer_path = inner.cfg.to_peer(&p).display().to_string();
            let session = session.clone();
            tokio::spawn(async move {
                if let Err(e) = open_side(&session, &p, &peer_path, direction, &tok).await {
                    tracing::warn!(fifo = %p.display(), error = %e, "stdio FIFO bridge ended with an error");
                }
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = w.changed() => {}
        }
    }
}

/// The opener (DPU) side of one FIFO.
async fn open_side(
    session: &Session,
    local: &Path,
    peer_path: &str,
    direction: FifoDirection,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let header = proto::encode(&StreamHeader::Fifo {
        path: peer_path.to_string(),
        direction,
    })
    .map_err(io::Error::other)?;
    let stream = session
        .open_stream(SERVICE, header)
        .await
        .map_err(io::Error::other)?;
    tracing::debug!(fifo = %local.display(), ?direction, "stdio FIFO bridged");
    let (mut rx, mut tx) = stream.split();
    let r = tokio::select! {
        _ = cancel.cancelled() => {
            // The client removed its FIFOs (normal end of a task, or stdin never used).
            tx.reset_with("FIFO removed on the DPU");
            return Ok(());
        }
        r = pump_one_way(true, direction, local, &mut rx, &mut tx, cancel) => r,
    };
    if let Err(e) = &r {
        // The peer then removes its FIFO at once.
        tx.reset_with(&format!("stdio FIFO bridge ended: {e}"));
    }
    r
}

/// Receiver (HOST) side of one FIFO stream.
pub(crate) async fn serve_fifo(
    inner: &Inner,
    path: String,
    direction: FifoDirection,
    stream: Stream,
) {
    let local = inner.cfg.to_local(Path::new(&path));
    if !under_any(&local, &inner.cfg.fifo_dirs) || direction_of(&local).is_none() {
        tracing::warn!(
            path,
            "peer asked for a FIFO outside bridge.fifo_dirs; refused"
        );
        stream.reset();
        return;
    }
    if let Err(e) = make_fifo(&local) {
        tracing::warn!(fifo = %local.display(), error = %e, "cannot create FIFO");
        stream.reset();
        return;
    }
    // The shim opens its end right after `Create`; do not wait for it forever.
    let deadline = CancellationToken::new();
    let d2 = deadline.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(OPEN_DEADLINE).await;
        d2.cancel();
    });
    let (mut rx, mut tx) = stream.split();
    let r = pump_one_way(false, direction, &local, &mut rx, &mut tx, &deadline).await;
    timer.abort();
    if let Err(e) = r {
        tracing::debug!(fifo = %local.display(), error = %e, "FIFO pump ended");
        tx.reset_with(&format!("FIFO pump ended: {e}"));
    }
    let _ = std::fs::remove_file(&local);
    if let Some(d) = local.parent() {
        if !inner.cfg.fifo_dirs.iter().any(|f| f == d) {
            let _ = std::fs::remove_dir(d); // only succeeds once empty
        }
    }
}

fn make_fifo(p: &Path) -> io::Result<()> {
    if let Some(d) = p.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_fifo() => Ok(()),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
        Err(_) => nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o700))
            .map_err(io::Error::from),
    }
}

/// Pumps one direction of a FIFO stream. The unused direction carries the ordering: it is
/// finished (EOF) by the side that is ready, and each side waits for the other's EOF before it
/// drops the stream (dropping a stream the peer still sends on would reset it).
///
/// stdin: the HOST opens its write end once the shim has opened the FIFO for reading, and only
/// then finishes its direction; the DPU opens its read end after that. So `ctr`'s writes into
/// its FIFO block exactly as long as they would with a local shim (ctr only sends `CloseIO`
/// once its task exists; a DPU reader opened early would let ctr see EOF too soon).
async fn pump_one_way(
    opener: bool,
    direction: FifoDirection,
    path: &Path,
    rx: &mut StreamReader,
    tx: &mut StreamWriter,
    cancel: &CancellationToken,
) -> io::Result<()> {
    match (opener, direction) {
        (true, FifoDirection::ToReceiver) => {
            while rx.recv().await?.is_some() {}
            fifo_to_stream(path, tx).await
        }
        (true, FifoDirection::FromReceiver) => {
            tx.finish()?;
            stream_to_fifo(path, rx, None, cancel).await
        }
        (false, FifoDirection::ToReceiver) => {
            // The DPU sends nothing before our EOF; anything from it here is a reset.
            let w = tokio::select! {
                w = open_writer(path, cancel) => w?,
                r = rx.recv() => {
                    return Err(r.err().unwrap_or_else(|| io::Error::other("stdin data before the HOST was ready")))
                }
            };
            tx.finish()?;
            stream_to_fifo(path, rx, Some(w), cancel).await
        }
        (false, FifoDirection::FromReceiver) => {
            fifo_to_stream(path, tx).await?;
            while rx.recv().await?.is_some() {}
            Ok(())
        }
    }
}

/// Reads `path` (opened now, before any writer, so nothing written later is lost) until every
/// writer closed it, sending the bytes; then finishes the stream.
async fn fifo_to_stream(path: &Path, tx: &mut StreamWriter) -> io::Result<()> {
    let rx = pipe::OpenOptions::new().open_receiver(path)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Linux reports no hang-up to a reader that has not seen a writer yet, so waiting for
        // readiness (instead of read() returning 0 at once) keeps us open until the writer comes.
        rx.readable().await?;
        match rx.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                offload_metrics::bridge().fifo_bytes(Direction::ToPeer, n);
                tx.send(bytes::Bytes::copy_from_slice(&buf[..n])).await?
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    tx.finish()
}

/// Writes the stream's bytes into `path` (opened once a reader exists); closes it at EOF so
/// the reader sees EOF too.
async fn stream_to_fifo(
    path: &Path,
    rx: &mut StreamReader,
    opened: Option<pipe::Sender>,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let mut w = opened;
    loop {
        let data = rx.recv().await?;
        if w.is_none() {
            w = Some(open_writer(path, cancel).await?);
        }
        let Some(wr) = w.as_mut() else { break };
        match data {
            Some(b) => {
                wr.write_all(&b).await?;
                offload_metrics::bridge().fifo_bytes(Direction::FromPeer, b.len());
            }
            None => break,
        }
    }
    if let Some(mut wr) = w {
        wr.flush().await?;
    }
    Ok(())
}

/// Opens the write end, waiting (bounded by `cancel`) for a reader: O_NONBLOCK writers get
/// ENXIO while nobody reads.
async fn open_writer(path: &Path, cancel: &CancellationToken) -> io::Result<pipe::Sender> {
    loop {
        match pipe::OpenOptions::new().open_sender(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(io::Error::other("cancelled")),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}
