//! Glue between the session and the metrics registry (`offload-metrics`): a connection
//! wrapper that counts the bytes the link moves, so the session itself needs no counting code.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use offload_metrics::SessionStats;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::link::Conn;

/// Wraps `conn` so every byte read or written is added to `stats`.
pub(crate) fn counted(conn: Conn, stats: Arc<SessionStats>) -> Conn {
    Box::new(Counted { conn, stats })
}

struct Counted {
    conn: Conn,
    stats: Arc<SessionStats>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.conn).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.stats.add_in(buf.filled().len() - before);
        }
        r
    }
}

impl crate::link::AsyncConn for Counted {
    fn direct_write_ok(&self) -> bool {
        self.conn.direct_write_ok()
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.conn).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.add_out(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.conn).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.add_out(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}
