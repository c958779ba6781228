//! Ordered, flow-controlled byte streams multiplexed over a session.
//!
//! Each direction has a credit window: the sender may have at most `window` unconsumed bytes
//! in flight, and the receiver returns credit as the application consumes data. A reader that
//! stalls therefore stops only its own sender; calls and other streams go on.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::rules::{RecvWindow, SendWindow};
use crate::session::Inner;
use crate::wire::Kind;

/// Largest single Data frame; bigger writes are split (zero-copy for `send`).
pub(crate) const MAX_CHUNK: usize = 256 * 1024;

/// What the session's reader task delivers to a stream.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    Eof,
    Reset(String),
}

#[derive(Debug, Default)]
pub(crate) struct StreamState {
    /// Bytes we may still send.
    pub send: SendWindow,
    pub send_waker: Option<Waker>,
    /// Set once the stream is reset (by either side) or the session closed.
    pub reset: Option<String>,
    /// Received and consumed bytes against our window, and the credit owed back.
    pub recv: RecvWindow,
    pub local_fin: bool,
    pub remote_fin: bool,
    pub reader_gone: bool,
    pub writer_gone: bool,
}

/// State shared by the two halves and the session's reader task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub id: u32,
    pub st: Mutex<StreamState>,
}

impl Shared {
    /// A stream that may send `send_credit` bytes (the peer's window) and accepts `window`.
    pub fn new(id: u32, send_credit: u64, window: u64) -> Arc<Shared> {
        Arc::new(Shared {
            id,
            st: Mutex::new(StreamState {
                send: SendWindow::new(send_credit),
                recv: RecvWindow::new(window),
                ..Default::default()
            }),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        crate::sync::lock(&self.st)
    }

    /// Marks the stream reset and wakes a blocked writer.
    pub fn set_reset(&self, reason: &str) {
        let w = {
            let mut st = self.lock();
            if st.reset.is_none() {
                st.reset = Some(reason.to_string());
            }
            st.send_waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    pub fn add_credit(&self, n: u64) {
        let w = {
            let mut st = self.lock();
            st.send.add(n);
            st.send_waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

fn reset_err(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset: {reason}"),
    )
}

/// The receiving half of a [`Stream`].
pub struct StreamReader {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    /// Leftover of a chunk partially handed out through `AsyncRead`.
    pending: Bytes,
    eof: bool,
}

/// The sending half of a [`Stream`].
pub struct StreamWriter {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
}

/// A bidirectional byte stream opened by either side of a session.
pub struct Stream {
    reader: StreamReader,
    writer: StreamWriter,
}

impl Stream {
    pub(crate) fn new(
        shared: Arc<Shared>,
        inner: Arc<Inner>,
        rx: mpsc::UnboundedReceiver<Inbound>,
    ) -> Stream {
        Stream {
            reader: StreamReader {
                shared: shared.clone(),
                inner: inner.clone(),
                rx,
                pending: Bytes::new(),
                eof: false,
            },
            writer: StreamWriter { shared, inner },
        }
    }

    /// The stream id (unique within its session), for logs.
    pub fn id(&self) -> u32 {
        self.writer.shared.id
    }

    /// Sends bytes, waiting for flow-control credit; large buffers are split without copying.
    pub async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.writer.send(data).await
    }

    /// Next chunk from the peer; `None` once the peer finished its direction.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        self.reader.recv().await
    }

    /// Half-close: the peer sees EOF; receiving goes on.
    pub async fn finish(&mut self) -> io::Result<()> {
        self.writer.finish()
    }

    /// Aborts both directions; the peer's reads and writes fail.
    pub fn reset(self) {
        self.writer.reset_with("reset by peer");
    }

    /// Aborts both directions with a reason the peer sees.
    pub fn reset_with(self, reason: &str) {
        self.writer.reset_with(reason);
    }

    /// Splits into halves usable from two tasks.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }
}

impl StreamReader {
    /// Next chunk from the peer; `None` once the peer finished its direction.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            let b = std::mem::take(&mut self.pending);
            // Already accounted when it was first received.
            return Ok(Some(b));
        }
        if self.eof {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Inbound::Data(b)) => {
                self.consumed(b.len());
                Ok(Some(b))
            }
            Some(Inbound::Eof) => {
                self.eof = true;
                Ok(None)
            }
            Some(Inbound::Reset(r)) => Err(reset_err(&r)),
            None => {
                let reason = self
                    .shared
                    .lock()
                    .reset
                    .clone()
                    .unwrap_or_else(|| "session closed".into());
                Err(reset_err(&reason))
            }
        }
    }

    /// Returns credit for `n` consumed bytes, batching small amounts.
    fn consumed(&self, n: usize) {
        let grant = self.shared.lock().recv.on_consumed(n as u64);
        if let Some(grant) = grant {
            self.inner.send_credit(self.shared.id, grant);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Inbound::Data(b))) => {
                self.consumed(b.len());
                Poll::Ready(Ok(Some(b)))
            }
            Poll::Ready(Some(Inbound::Eof)) => {
                self.eof = true;
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Some(Inbound::Reset(r))) => Poll::Ready(Err(reset_err(&r))),
            Poll::Ready(None) => Poll::Ready(Err(reset_err("session closed"))),
        }
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut chunk = match self.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(Some(c))) => c,
            };
            if chunk.is_empty() {
                continue;
            }
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            self.pending = chunk;
            return Poll::Ready(Ok(()));
        }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        let (undelivered, action) = {
            let mut st = self.shared.lock();
            st.reader_gone = true;
            let undelivered = st.recv.reader_gone();
            (undelivered, close_action(&mut st))
        };
        // Data nobody will read must not keep the peer's window closed.
        if undelivered > 0 && action == CloseAction::None {
            self.inner.send_credit(self.shared.id, undelivered);
        }
        self.inner.stream_closed(&self.shared, action);
    }
}

impl StreamWriter {
    fn poll_credit(&self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(r) = &st.reset {
            return Poll::Ready(Err(reset_err(r)));
        }
        if st.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after finish",
            )));
        }
        if st.send.is_empty() {
            st.send_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(st.send.take(want, MAX_CHUNK)))
    }

    /// Sends bytes, waiting for flow-control credit; large buffers are split without copying.
    pub async fn send(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_credit(cx, data.len())).await?;
            let chunk = data.split_to(n);
            self.inner
                .send_stream_frame(Kind::Data, self.shared.id, chunk)?;
        }
        Ok(())
    }

    /// Half-close: the peer sees EOF. Idempotent.
    pub fn finish(&mut self) -> io::Result<()> {
        let action = {
            let mut st = self.shared.lock();
            if let Some(r) = &st.reset {
                return Err(reset_err(r));
            }
            if st.local_fin {
                return Ok(());
            }
            st.local_fin = true;
            self.inner
                .send_stream_frame(Kind::Eof, self.shared.id, Bytes::new())?;
            close_action(&mut st)
        };
        self.inner.stream_closed(&self.shared, action);
        Ok(())
    }

    /// Aborts the stream in both directions with a reason the peer sees.
    pub fn reset_with(self, reason: &str) {
        let first = self.shared.lock().reset.is_none();
        if first {
            self.shared.set_reset(reason);
            self.inner.send_reset(self.shared.id, reason);
        }
        self.inner.stream_closed(&self.shared, CloseAction::Remove);
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.poll_credit(cx, buf.len()) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => {
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                self.inner
                    .send_stream_frame(Kind::Data, self.shared.id, chunk)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to the session writer in order; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        // Dropping the writer without finish() ends the direction gracefully, like close(2).
        let action = {
            let mut st = self.shared.lock();
            st.writer_gone = true;
            if !st.local_fin && st.reset.is_none() {
                st.local_fin = true;
                let _ = self
                    .inner
                    .send_stream_frame(Kind::Eof, self.shared.id, Bytes::new());
            }
            close_action(&mut st)
        };
        self.inner.stream_closed(&self.shared, action);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// What to do with the session's entry for a stream after a half closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseAction {
    /// Still in use.
    None,
    /// Both directions are done: forget the stream.
    Remove,
    /// The application dropped both halves while the peer may still send: reset it.
    ResetAndRemove,
}

fn close_action(st: &mut StreamState) -> CloseAction {
    if st.reset.is_some() {
        return if st.reader_gone && st.writer_gone {
            CloseAction::Remove
        } else {
            CloseAction::None
        };
    }
    let out_done = st.local_fin;
    let in_done = st.remote_fin;
    if out_done && in_done && st.reader_gone && st.writer_gone {
        CloseAction::Remove
    } else if st.reader_gone && st.writer_gone && !in_done {
        st.reset = Some("stream dropped by the application".into());
        CloseAction::ResetAndRemove
    } else if st.reader_gone && st.writer_gone {
        CloseAction::Remove
    } else {
        CloseAction::None
    }
}
