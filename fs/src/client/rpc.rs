//! Calls to the HOST: the typed stub of every operation ([`Inner::call`] and its payload
//! variants), retries across outages, re-mounting after a HOST restart, and the one place the
//! fast path (sent from the FUSE thread) or the slow path (on the runtime) is chosen.

use super::*;

impl Inner {
    /// One operation on the HOST with the current instance, retrying across session loss
    /// until the mount's timeout (or forever for `hard`): the typed client stub of every
    /// operation without payloads. [`OpError::Stale`] on an instance change.
    pub(super) async fn call<O: Operation>(&self, op: O) -> R<O::Reply> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, &[]).await?;
        Ok(decode_reply::<O::Reply>(&reply)?.0)
    }

    /// [`Inner::call`] for an operation whose reply carries a payload (a slice of the
    /// received frame: read data is used where it lies).
    pub(super) async fn call_data<O: DataOut>(&self, op: O) -> R<(O::Reply, Bytes)> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, &[]).await?;
        decode_reply::<O::Reply>(&reply)
    }

    /// [`Inner::call`] for an operation whose request carries a payload.
    pub(super) async fn call_with<O: DataIn>(&self, op: O, payload: &[u8]) -> R<O::Reply> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let reply = self.send(&args, payload).await?;
        Ok(decode_reply::<O::Reply>(&reply)?.0)
    }

    /// [`Inner::call_with`] for an operation that must not simply be sent twice: `again` is
    /// what goes out instead of `op` once the session was lost with `op` unanswered (see
    /// [`op::Append`]).
    pub(super) async fn call_once<O: DataIn>(
        &self,
        op: O,
        again: O,
        payload: &[u8],
    ) -> R<O::Reply> {
        let args = EncodedArgs::new(&op).map_err(|_| OpError::Protocol)?;
        let again = EncodedArgs::new(&again).map_err(|_| OpError::Protocol)?;
        let reply = self.send_then(&args, Some(&again), payload).await?;
        Ok(decode_reply::<O::Reply>(&reply)?.0)
    }

    /// Sends encoded arguments and a payload; the reply as received.
    pub(super) async fn send(&self, args: &EncodedArgs, payload: &[u8]) -> R<Bytes> {
        self.send_then(args, None, payload).await
    }

    /// [`Inner::send`]; after a lost session the request is sent again as `again` (the same
    /// request when `None`).
    async fn send_then(
        &self,
        args: &EncodedArgs,
        again: Option<&EncodedArgs>,
        payload: &[u8],
    ) -> R<Bytes> {
        let instance = self.st().instance;
        let encode = |a: &EncodedArgs| {
            a.request(instance, payload)
                .map(Bytes::from)
                .map_err(|_| OpError::Protocol)
        };
        let mut body = encode(args)?;
        let start = Instant::now();
        let deadline = if self.opts.hard {
            None
        } else {
            Some(self.opts.timeout)
        };
        loop {
            let remaining = deadline.map(|d| d.saturating_sub(start.elapsed()));
            if remaining == Some(Duration::ZERO) {
                return Err(OpError::Unreachable);
            }
            let session = match self
                .client
                .session_retry(Duration::from_millis(100), remaining)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "HOST unreachable");
                    return Err(OpError::Unreachable);
                }
            };
            match session.call("fs", body.clone()).await {
                Ok(reply) => return Ok(reply),
                // The request itself was refused (a protocol mismatch).
                Err(CallError::Remote(e)) => return Err(OpError::Errno(e.code)),
                Err(CallError::Closed(reason)) => {
                    debug!(%reason, "session lost; redialing");
                    if let Some(a) = again {
                        body = encode(a)?;
                    }
                    self.client.invalidate().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(CallError::Busy) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    warn!(error = %e, "fs call failed");
                    return Err(OpError::Unreachable);
                }
            }
        }
    }

    /// The HOST node of `ino`, the server instance and the live session, when all are at hand
    /// without waiting (the common case): the request can then leave from the FUSE thread.
    pub(super) fn ready(&self, ino: u64) -> Option<(NodeId, u64, Session)> {
        let session = self.client.current()?;
        let st = self.st();
        let n = st.inodes.get(&ino)?;
        (n.epoch == st.epoch).then_some((n.node, st.instance, session))
    }

    /// The HOST handle of open handle `fh` when it is current: `Some(None)` for an unknown
    /// handle (the call goes without one, as on the async path), `None` when it must first be
    /// re-opened after a HOST restart.
    pub(super) fn fh_ready(&self, fh: Option<u64>) -> Option<Option<Fh>> {
        let Some(fh) = fh else { return Some(None) };
        let st = self.st();
        match st.handles.get(&fh) {
            Some(h) if h.epoch == st.epoch => Some(Some(h.fh)),
            Some(_) => None,
            None => Some(None),
        }
    }

    /// Sends `op` from the calling thread (see [`transport::Session::call_then`]) and gives
    /// `done` the outcome where it arrives. `None`: the session was lost or the HOST restarted;
    /// the caller then takes the async path, which waits, re-resolves and retries.
    pub(super) fn call_then<O: Operation>(
        &self,
        session: &Session,
        instance: u64,
        op: O,
        done: impl FnOnce(Option<R<O::Reply>>) + Send + 'static,
    ) {
        let Ok(body) = proto::encode_request(instance, &op, &[]) else {
            return done(Some(Err(OpError::Protocol)));
        };
        session.call_then("fs", Bytes::from(body), move |res| {
            done(match res {
                Ok(b) => match decode_reply::<O::Reply>(&b) {
                    Err(OpError::Stale) => None,
                    r => Some(r.map(|(v, _)| v)),
                },
                Err(CallError::Remote(e)) => Some(Err(OpError::Errno(e.code))),
                Err(_) => None,
            })
        });
    }

    /// Sends `build(node, handle)` for inode `ino` (and open handle `fh`): from this FUSE
    /// thread when the node, the handle and the session are at hand, else (or after a lost
    /// session) on the runtime, which waits out outages and re-resolves after a HOST restart.
    /// The one place the fast/slow choice is made; `done` gets the outcome either way.
    pub(super) fn request<O, B, D>(self: &Arc<Self>, ino: u64, fh: Option<u64>, build: B, done: D)
    where
        O: Operation,
        B: Fn(NodeId, Option<Fh>) -> O + Send + Sync + 'static,
        D: FnOnce(&Arc<Inner>, R<O::Reply>) + Send + 'static,
    {
        let fast = match (self.ready(ino), self.fh_ready(fh)) {
            (Some((node, instance, session)), Some(sfh)) => {
                Some((build(node, sfh), instance, session))
            }
            _ => None,
        };
        let slow = move |me: Arc<Inner>, done: D| {
            me.rt.clone().spawn(async move {
                let res = me
                    .with(|| async {
                        let node = me.node_of(ino).await?;
                        let sfh = match fh {
                            Some(h) => me.fh_of(h).await.ok(),
                            None => None,
                        };
                        me.call(build(node, sfh)).await
                    })
                    .await;
                done(&me, res);
            });
        };
        let me = self.clone();
        match fast {
            Some((op, instance, session)) => {
                self.call_then(&session, instance, op, move |r| match r {
                    Some(r) => done(&me, r),
                    None => slow(me, done),
                })
            }
            None => slow(me, done),
        }
    }

    /// Mounts the source again on a restarted server and starts a new epoch.
    pub(super) async fn remount(&self, seen_epoch: u64) -> R<()> {
        let _g = self.remount_lock.lock().await;
        if self.st().epoch != seen_epoch {
            return Ok(());
        }
        let mounted = self
            .call(op::Mount {
                version: proto::VERSION,
                path: self.opts.source.clone(),
            })
            .await?;
        let Ok(proto::Mounted { instance, root, .. }) = mounted else {
            return Err(OpError::Errno(libc::EIO));
        };
        let mut st = self.st();
        st.instance = instance;
        st.epoch += 1;
        let epoch = st.epoch;
        st.by_node.clear();
        st.by_node.insert(root.node, ROOT);
        if let Some(r) = st.inodes.get_mut(&ROOT) {
            r.node = root.node;
            r.epoch = epoch;
            r.server_lookups = 1;
        }
        info!(epoch, "HOST fs service restarted; re-resolving inodes");
        Ok(())
    }

    /// Runs `f`, re-mounting and retrying when the server instance changed underneath.
    pub(super) async fn with<T, F, Fut>(self: &Arc<Self>, f: F) -> R<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = R<T>>,
    {
        for _ in 0..4 {
            let epoch = self.st().epoch;
            match f().await {
                Err(OpError::Stale) => self.remount(epoch).await?,
                other => return other,
            }
        }
        Err(OpError::Errno(libc::EIO))
    }
}

/// A reply's result and payload, or why it failed: a stale instance, or ESTALE (the server
/// released this mount's nodes when its previous session ended while the daemon stayed up),
/// is re-resolved like a restart.
pub(super) fn decode_reply<T: serde::de::DeserializeOwned>(reply: &Bytes) -> R<(T, Bytes)> {
    match proto::decode_reply::<T>(reply) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(Status::StaleInstance | Status::Errno(libc::ESTALE))) => Err(OpError::Stale),
        Ok(Err(Status::Errno(e))) => Err(OpError::Errno(e)),
        Ok(Err(Status::Ok)) | Err(_) => Err(OpError::Protocol),
    }
}
