//! [`RdmaListener`]: a bound rdma_cm listener whose connection requests are completed by
//! background tasks, so a slow or broken peer does not hold up the others.

use std::io;
use std::net::SocketAddr;

use async_trait::async_trait;
use rdma_sys as sys;

use super::stream::RdmaStream;
use super::verbs::{event_name, ListenId, Res};
use super::RdmaError;
use crate::endpoint::Endpoint;
use crate::link::{Conn, Listener, TransportError};
use crate::rdma_meta::RingInfo;

/// A bound rdma_cm listener. Connection requests are completed concurrently by background
/// tasks (a slow or broken peer does not hold up the others); `accept` hands out the ones that
/// are established.
pub struct RdmaListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<Result<RdmaStream, RdmaError>>,
    task: tokio::task::JoinHandle<()>,
}

impl RdmaListener {
    /// Binds `addr` (the IP of a local RDMA device, or unspecified; port 0 picks one) and starts
    /// accepting in the background. Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        let (id, port) = ListenId::bind(addr)?;
        let mut local = addr;
        local.set_port(port);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(Self::accept_loop(id, tx));
        Ok(RdmaListener { local, ready, task })
    }

    async fn accept_loop(
        id: ListenId,
        tx: tokio::sync::mpsc::Sender<Result<RdmaStream, RdmaError>>,
    ) {
        loop {
            let ev = match id.channel() {
                Some(cm) => cm.next_event().await,
                None => return,
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let kind = ev.kind;
            // The new id is ours now: `res` destroys it on any error.
            let Some((res, private)) = Res::incoming(ev) else {
                tracing::debug!(event = %event_name(kind), "rdma listener event");
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match Self::complete(res, private).await {
                    // If the listener is gone, the stream is dropped (and torn down) here.
                    Ok(s) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "rdma: incoming connection failed"),
                }
            });
        }
    }

    /// The bound address (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next established connection. Requests that cannot be set up (bad private data,
    /// resource exhaustion, a peer that never completes) are rejected and logged, not returned.
    pub async fn accept_stream(&mut self) -> Result<RdmaStream, RdmaError> {
        match self.ready.recv().await {
            Some(r) => r,
            None => Err(RdmaError::Sys {
                op: "accept",
                source: io::Error::other("the RDMA listener's accept task ended"),
            }),
        }
    }

    async fn complete(mut res: Res, private: Vec<u8>) -> Result<RdmaStream, RdmaError> {
        let peer = res
            .peer_addr()
            .map(|a| format!("rdma:{a}"))
            .unwrap_or_else(|| "rdma:?".into());
        let theirs = match RingInfo::decode(&private) {
            Ok(r) => r,
            Err(e) => {
                res.reject(b"dpu-offload: bad private data");
                return Err(e.into());
            }
        };
        // Give the connection its own event channel so its events (established, disconnected)
        // are not mixed into the listener's.
        res.migrate()?;
        if let Err(e) = res.build() {
            // Tell the peer instead of letting it time out.
            res.reject(&[]);
            return Err(e);
        }
        res.accept()?;
        let Some(cm) = res.channel() else {
            return Err(RdmaError::Sys {
                op: "rdma_migrate_id",
                source: io::Error::other("accepted connection has no event channel"),
            });
        };
        cm.expect(
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            "connection establishment",
        )
        .await?;
        Ok(RdmaStream::new(res, theirs, peer))
    }
}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        // The accept task owns the listening id; aborting it drops (and destroys) it.
        self.task.abort();
    }
}

#[async_trait]
impl Listener for RdmaListener {
    async fn accept(&mut self) -> Result<(Conn, String), TransportError> {
        let s = self.accept_stream().await?;
        let peer = s.peer_addr().to_string();
        Ok((Box::new(s), peer))
    }

    fn local_endpoint(&self) -> Endpoint {
        Endpoint::Rdma {
            host: self.local.ip().to_string(),
            port: self.local.port(),
        }
    }
}
