//! Write-behind: writes acknowledged once queued to the HOST, in order, with their failures
//! reported by the next write, `close` or `fsync`; a budget bounds what is in flight, and an
//! acknowledged write is sent again from its kept payload after a lost session or restart.

use super::*;

/// Write-behind budget of one mount.
pub(super) const WB_BUDGET_KIB: usize = 32 * 1024;

/// Budget permits (KiB) an acknowledged write of `n` bytes holds while in flight.
pub(super) fn wb_kib(n: u32) -> u32 {
    (n as usize).div_ceil(1024).clamp(1, WB_BUDGET_KIB) as u32
}

/// Acknowledged writes of one inode still on their way to the HOST.
///
/// Failures are reported per open file, like the kernel's `errseq_t` for local files: each
/// counts once in the inode's failure count, and each handle remembers how many it was told
/// of ([`Handle::err_seen`]). A close reports a failure the handle was not told of without
/// taking it (so every close of that open file does, as on NFS), an `fsync` or a later write
/// reports it and takes it for that handle. So the implicit close of an inherited descriptor
/// in a child that execs (FUSE sends it as a flush of the same open file) cannot swallow the
/// failure the writer's own `fsync` or `close` must see, and another open of the file never
/// sees it. Directory operations take failures per inode ([`Unstable::settle`]).
#[derive(Default)]
pub(super) struct Unstable {
    /// (writes in flight, first failure not yet taken, failures so far)
    pub(super) state: Mutex<(usize, Option<OpError>, u64)>,
    pub(super) idle: tokio::sync::Notify,
}

impl Unstable {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<OpError>, u64)> {
        lock(&self.state)
    }

    pub(super) fn finish(&self, res: R<()>) {
        let mut st = self.lock();
        st.0 -= 1;
        if let Err(e) = res {
            st.1.get_or_insert(e);
            st.2 += 1;
        }
        if st.0 == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until nothing is in flight, leaving a pending failure for [`Unstable::settle`].
    pub(super) async fn settle_keep(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.lock().0 == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Waits until no write is in flight, then hands out (and clears) a pending failure.
    async fn settle(&self) -> R<()> {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut st = self.lock();
                if st.0 == 0 {
                    return st.1.take().map_or(Ok(()), Err);
                }
            }
            idle.await;
        }
    }
}

impl Inner {
    /// The HOST handle and instance to write through handle `fh` with write-behind, if its
    /// writes may be acknowledged before the HOST answers: not for pseudo filesystems,
    /// files opened for synchronous or appending writes, or a handle not re-opened yet after a
    /// HOST restart.
    pub(super) fn write_behind_target(&self, fh: u64) -> Option<(Fh, u64)> {
        if !self.opts.write_behind || self.opts.pseudo() {
            return None;
        }
        let st = self.st();
        let h = st.handles.get(&fh)?;
        let no = libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT;
        let ok = h.epoch == st.epoch && !h.dir && h.flags & no == 0;
        ok.then_some((h.fh, st.instance))
    }

    pub(super) fn unstable_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Unstable>>> {
        lock(&self.unstable)
    }

    /// Counts one more acknowledged write of `ino` in flight.
    pub(super) fn begin_write(&self, ino: u64, end: u64) -> Arc<Unstable> {
        // Called once the write is queued and before it is acknowledged: a reply to any request
        // queued before it (its attributes may already be recorded, or on their way) predates
        // the write; requests queued after it see it.
        self.write_changed(ino, end);
        self.count_write(ino)
    }

    /// Counts one more acknowledged write of `ino` in flight.
    fn count_write(&self, ino: u64) -> Arc<Unstable> {
        let mut map = self.unstable_map();
        let u = map.entry(ino).or_default().clone();
        u.lock().0 += 1;
        u
    }

    /// A failure of an acknowledged write of `ino` that handle `fh` was not told of yet; it
    /// is told now (a write reports it, see [`Unstable`]).
    pub(super) fn take_write_error(&self, ino: u64, fh: u64) -> Option<OpError> {
        let u = self.unstable_map().get(&ino)?.clone();
        self.unseen_failure(&u, fh, true)
    }

    /// A failure recorded in `u` that handle `fh` was not told of; `take`: it is told now.
    fn unseen_failure(&self, u: &Unstable, fh: u64, take: bool) -> Option<OpError> {
        let (err, failures) = {
            let st = u.lock();
            (st.1, st.2)
        };
        let mut st = self.st();
        let h = st.handles.get_mut(&fh)?;
        if failures <= h.err_seen {
            return None;
        }
        if take {
            h.err_seen = failures;
        }
        Some(err.unwrap_or(OpError::Errno(libc::EIO)))
    }

    /// Waits for the acknowledged writes of `ino`; returns the first one that failed.
    pub(super) async fn settle(&self, ino: u64) -> R<()> {
        let Some(u) = self.unstable_map().get(&ino).cloned() else {
            return Ok(());
        };
        let res = u.settle().await;
        self.forget_settled(ino);
        res
    }

    /// Drops `ino`'s record once nothing is in flight and no failure is kept.
    fn forget_settled(&self, ino: u64) {
        let mut map = self.unstable_map();
        if map
            .get(&ino)
            // A record with past failures stays: handles count them (`Handle::err_seen`).
            .is_some_and(|u| matches!(*u.lock(), (0, None, 0)))
        {
            map.remove(&ino);
        }
    }

    /// How many acknowledged writes of `ino` failed so far (what a new handle starts from).
    pub(super) fn write_failures(&self, ino: u64) -> u64 {
        self.unstable_map().get(&ino).map_or(0, |u| u.lock().2)
    }

    /// Waits for the acknowledged writes of `ino`, then reports a failure handle `fh` was not
    /// told of yet; `take`: and marks it told (fsync, release), else leaves it for the next
    /// close of the same open file too (flush). See [`Unstable`].
    pub(super) async fn settle_handle(&self, ino: u64, fh: u64, take: bool) -> R<()> {
        let Some(u) = self.unstable_map().get(&ino).cloned() else {
            return Ok(());
        };
        u.settle_keep().await;
        self.unseen_failure(&u, fh, take).map_or(Ok(()), Err)
    }

    pub(super) fn has_unstable(&self, ino: u64) -> bool {
        self.unstable_map().contains_key(&ino)
    }

    /// One write through handle `fh`, answered by the HOST.
    pub(super) async fn write_sync(self: &Arc<Self>, fh: u64, offset: u64, data: &[u8]) -> R<u32> {
        if let Some(known) = self.append_handle(fh) {
            return self.append(fh, known, data).await;
        }
        self.with(|| async {
            let sfh = self.fh_of(fh).await?;
            self.call_with(op::Write { fh: sfh, offset }, data).await
        })
        .await
    }

    /// For a handle opened with `O_APPEND` (and no kernel write-back, whose writes carry the
    /// kernel's own offsets): where the file ended after the last append through it, if known.
    fn append_handle(&self, fh: u64) -> Option<Option<u64>> {
        // Pseudo files (`>> cgroup.procs`) take writes as they come, wherever they land.
        if self.opts.writeback_cache || self.opts.pseudo() {
            return None;
        }
        let st = self.st();
        let h = st.handles.get(&fh)?;
        (h.flags & libc::O_APPEND != 0 && !h.dir).then_some(h.append_end)
    }

    /// An append, exactly once across a lost session or a HOST restart while the file has
    /// one writer: a resend names where the file ended before the first attempt
    /// (`known`, from the previous append's answer), and the HOST does not write again when
    /// that attempt landed ([`op::Append`]). Without a known end (the first append through a
    /// handle) a resend may append twice, as any retried write to an appending file does.
    async fn append(self: &Arc<Self>, fh: u64, known: Option<u64>, data: &[u8]) -> R<u32> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let r = self
            .with(|| async {
                let sfh = self.fh_of(fh).await?;
                // After a HOST restart the whole call is made again: a resend too.
                let first = !sent.swap(true, std::sync::atomic::Ordering::Relaxed);
                let again = op::Append {
                    fh: sfh,
                    end: known,
                };
                let op = op::Append {
                    fh: sfh,
                    end: if first { None } else { known },
                };
                self.call_once(op, again, data).await
            })
            .await;
        let mut st = self.st();
        if let Some(h) = st.handles.get_mut(&fh) {
            h.append_end = r.as_ref().ok().map(|a| a.end);
        }
        r.map(|a| a.written)
    }

    /// Write-behind: queues the write to the HOST, acknowledges it, then collects the answer.
    /// The session keeps frames in order and the HOST applies prompt calls in arrival order,
    /// so every later request (getattr, read, fsync, ...) sees this write; a failure is
    /// reported by the next write, `close` (flush) or `fsync` of the inode.
    async fn write_behind(self: &Arc<Self>, w: PendingWrite, body: Bytes) -> R<u32> {
        let n = w.data.len() as u32;
        let Ok(permit) = self.wb_budget.clone().acquire_many_owned(wb_kib(n)).await else {
            return Err(OpError::Errno(libc::EIO));
        };
        if let Some(e) = self.take_write_error(w.ino, w.fh) {
            return Err(e);
        }
        let session = self
            .client
            .session_retry(Duration::from_millis(100), Some(Duration::ZERO))
            .await;
        let call = match session.map(|s| s.start_call("fs", body.clone())) {
            Ok(Ok(call)) => call,
            _ => {
                // No live session: write synchronously (waits out the outage).
                drop(permit);
                let res = self.write_sync(w.fh, w.offset, &w.data).await;
                self.stale_attr(w.ino);
                return res;
            }
        };
        let unstable = self.begin_write(w.ino, w.offset + u64::from(n));
        let me = self.clone();
        self.rt
            .spawn(async move { me.collect_write(w, call, unstable, permit).await });
        Ok(n)
    }

    /// One write of `data` through handle `fh` of `ino` at `offset`, from the FUSE thread:
    /// acknowledged at once when it may go behind (budget left, a live session: queued here,
    /// the runtime only collects the answer), refused at once with a failure not reported
    /// yet, or left to the runtime (waiting for budget or a session, or a synchronous write).
    pub(super) fn start_write(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> WriteStart {
        let me = self.clone();
        let Some((sfh, instance)) = self.write_behind_target(fh) else {
            let data = data.to_vec();
            return WriteStart::Later(Box::pin(async move {
                let res = me.write_sync(fh, offset, &data).await;
                me.stale_attr(ino);
                res
            }));
        };
        // Encoded here, straight from the kernel's buffer: the only copy of the data, kept
        // (as a slice of the request) until the HOST answered.
        let args = op::Write { fh: sfh, offset };
        let Ok(body) = proto::encode_request(instance, &args, data) else {
            return WriteStart::Done(Err(OpError::Protocol));
        };
        let (body, n) = (Bytes::from(body), data.len() as u32);
        let w = PendingWrite {
            ino,
            fh,
            offset,
            data: body.slice(body.len() - data.len()..),
        };
        if let Some(e) = self.take_write_error(ino, fh) {
            return WriteStart::Done(Err(e));
        }
        let permit = self.wb_budget.clone().try_acquire_many_owned(wb_kib(n));
        if let (Ok(permit), Some(session)) = (permit, self.client.current()) {
            // Counted in flight before it is sent: its answer may arrive before this returns.
            let unstable = self.count_write(ino);
            let rt = self.rt.clone();
            // The answer is taken where it arrives; only a failure (a resend after a lost
            // session, a short write) needs a task.
            session.call_then("fs", body, move |res| {
                if let Ok(r) = &res {
                    if matches!(decode_reply::<u32>(r), Ok((w, _)) if w >= n) {
                        unstable.finish(Ok(()));
                        drop(permit);
                        return;
                    }
                }
                rt.spawn(async move { me.collect_write(w, async { res }, unstable, permit).await });
            });
            // Queued: replies to requests queued before it predate it.
            self.write_changed(ino, offset + u64::from(n));
            return WriteStart::Done(Ok(n));
        }
        WriteStart::Later(Box::pin(async move { me.write_behind(w, body).await }))
    }

    /// Waits for the HOST's answer to an acknowledged write and records a failure for the
    /// application's next write, close or fsync.
    pub(super) async fn collect_write(
        self: &Arc<Self>,
        w: PendingWrite,
        call: impl Future<Output = Result<Bytes, CallError>>,
        unstable: Arc<Unstable>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let PendingWrite {
            ino,
            fh,
            offset,
            data,
        } = w;
        let n = data.len() as u32;
        let answer = match call.await.map_err(|e| match e {
            CallError::Remote(e) => OpError::Errno(e.code),
            _ => OpError::Stale,
        }) {
            Ok(r) => decode_reply::<u32>(&r).map(|(w, _)| w),
            Err(e) => Err(e),
        };
        let answer = match answer {
            // Session lost or HOST restarted: send the kept payload again (same offset, the
            // handle re-opened). Replies to requests sent after the first attempt may now
            // predate the write.
            Err(OpError::Stale) => {
                self.begin_resend();
                let r = self.write_sync(fh, offset, &data).await;
                self.end_resend(ino);
                r
            }
            other => other,
        };
        let res = match answer {
            Ok(w) if w >= n => Ok(()),
            // Short write (the HOST ran out of space mid-way): the rest says why.
            Ok(w) => {
                let rest = data.slice((w as usize).min(data.len())..);
                self.begin_resend();
                let r = self.write_sync(fh, offset + u64::from(w), &rest).await;
                self.end_resend(ino);
                r.and_then(|r| {
                    if r as usize == rest.len() {
                        Ok(())
                    } else {
                        Err(OpError::Errno(libc::EIO))
                    }
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            // Attributes carried forward by the write are wrong now.
            self.stale_attr(ino);
            warn!(
                ino,
                offset,
                error = ?e,
                "acknowledged write failed on the HOST; reported at close/fsync"
            );
        }
        unstable.finish(res);
        drop(permit);
    }
}

pub(super) fn reply_write(reply: ReplyWrite, res: R<u32>) {
    match res {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(e)),
    }
}

/// An acknowledged write on its way to the HOST: enough to send it again after a lost session
/// or HOST restart without decoding the request (the payload is a slice of the request sent).
/// What [`Inner::start_write`] made of a write.
pub(super) enum WriteStart {
    /// Answered now: acknowledged (written behind) or refused.
    Done(R<u32>),
    /// Answered once this completes on the runtime.
    Later(std::pin::Pin<Box<dyn Future<Output = R<u32>> + Send>>),
}

pub(super) struct PendingWrite {
    pub(super) ino: u64,
    /// This mount's handle (re-opened on the HOST after a restart).
    pub(super) fh: u64,
    pub(super) offset: u64,
    pub(super) data: Bytes,
}
