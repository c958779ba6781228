//! A session to one endpoint that is redialed on demand after the peer goes away, so a
//! long-lived user (a mount) survives a daemon restart.

use std::time::Duration;

use tokio::sync::Mutex;

use crate::endpoint::Endpoint;
use crate::service::Registry;
use crate::session::{Session, SessionConfig, SessionError};

/// Keeps one live session to `endpoint`, redialing when the current one has closed.
pub struct Client {
    endpoint: Endpoint,
    cfg: SessionConfig,
    registry: Registry,
    current: Mutex<Option<Session>>,
}

impl Client {
    /// A client that dials `endpoint` on first use, offering `registry` to the peer.
    pub fn new(endpoint: Endpoint, cfg: SessionConfig, registry: Registry) -> Client {
        Client {
            endpoint,
            cfg,
            registry,
            current: Mutex::new(None),
        }
    }

    /// The endpoint this client dials.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The live session if there is one and no dial is under way; never waits (for callers
    /// on threads outside the runtime, such as FUSE threads).
    pub fn current(&self) -> Option<Session> {
        let cur = self.current.try_lock().ok()?;
        cur.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The live session, dialing once if there is none. Concurrent callers share one dial.
    pub async fn session(&self) -> Result<Session, SessionError> {
        let mut cur = self.current.lock().await;
        if let Some(s) = cur.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let s = Session::connect(&self.endpoint, self.cfg.clone(), self.registry.clone()).await?;
        *cur = Some(s.clone());
        Ok(s)
    }

    /// Like [`Client::session`], retrying every `every` until `deadline` passes (`None`: forever).
    pub async fn session_retry(
        &self,
        every: Duration,
        deadline: Option<Duration>,
    ) -> Result<Session, SessionError> {
        let start = std::time::Instant::now();
        loop {
            match self.session().await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Some(d) = deadline {
                        if start.elapsed() + every > d {
                            return Err(e);
                        }
                    }
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "redial failed; retrying");
                    tokio::time::sleep(every).await;
                }
            }
        }
    }

    /// Drops the current session (e.g. after a call saw it die) so the next use redials.
    pub async fn invalidate(&self) {
        if let Some(s) = self.current.lock().await.take() {
            s.close();
        }
    }
}
