//! What a service implements to be reachable over a session, and the registry naming them.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::session::Session;
use crate::stream::Stream;

/// An application-level failure returned by a service to its caller. `code` is the service's
/// own (the fs service uses errno values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RemoteError {
    /// The service's code (≥ 0; the fs service uses errno values).
    pub code: i32,
    /// Human-readable detail for logs.
    pub message: String,
}

impl RemoteError {
    /// An error with `code` and a message.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
        }
    }
}

/// A service offered to the peer. A call's handler runs on the session's reader up to its first
/// `.await` that waits, then on its own task; every stream runs on its own task. So a handler may
/// wait as long as it needs without holding up the session, but must not block before it first
/// waits (prompt syscalls only): calls that complete without waiting take effect in the order
/// the peer sent them.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Answers one request.
    async fn call(&self, session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        let _ = (session, req);
        Err(RemoteError::new(
            libc::ENOSYS,
            "this service takes no calls",
        ))
    }

    /// Takes ownership of a stream the peer opened; `header` says what it is for. Dropping the
    /// stream resets it.
    async fn stream(&self, session: &Session, header: Bytes, stream: Stream) {
        let _ = (session, header);
        stream.reset_with("this service takes no streams");
    }

    /// Called once for every new session, after the handshake, e.g. to start watchers that
    /// live as long as the session (see [`Session::closed`]).
    fn attached(&self, session: &Session) {
        let _ = session;
    }
}

/// The services one side offers, by name.
#[derive(Clone, Default)]
pub struct Registry {
    services: HashMap<String, Arc<dyn Service>>,
}

impl Registry {
    /// No services (a pure client side).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a service under `name`.
    pub fn with(mut self, name: &str, service: Arc<dyn Service>) -> Self {
        self.services.insert(name.to_string(), service);
        self
    }

    /// Adds (or replaces) a service under `name`.
    pub fn insert(&mut self, name: &str, service: Arc<dyn Service>) {
        self.services.insert(name.to_string(), service);
    }

    /// The service registered as `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Service>> {
        self.services.get(name)
    }

    /// Names offered, sorted (sent in the handshake).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.services.keys().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<dyn Service>> {
        self.services.values()
    }
}
