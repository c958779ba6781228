//! Asynchronous directory operations (CephFS's `nowsync`): a create, mkdir, symlink, unlink or
//! setattr in a directory this mount has exclusive knowledge of is answered to the kernel at
//! once and sent to the HOST in order; its failure is reported at the next synchronous point.
//! See "Directory operations" in the `client` module docs for the rules.
//!
//! The new node (and a create's handle) is named by a client-chosen id ([`proto::ALIAS_BIT`],
//! "Client-chosen ids" in [`crate::proto`]) that the HOST maps per session, so requests that
//! follow — writes, setattr, lookups of children, release, forget — are sent behind it without
//! waiting for its answer. Each operation counts as in flight on the node it made or changed
//! and on its directory (the write-behind bookkeeping, [`Unstable`]): `close`, `fsync`,
//! opening or fsyncing the directory and unmounting wait for it and report its failure.

use super::*;

/// An asynchronous operation's bookkeeping ([`Inner::begin_ops`]), ended where its outcome
/// arrives.
struct InFlight {
    trackers: Vec<Arc<Unstable>>,
    /// Inodes kept in the table meanwhile (with their parents, [`Inner::pin`]).
    pinned: Vec<u64>,
}

/// What an asynchronous operation made: the parts its answer and a replay need.
struct Made {
    ino: u64,
    alias: NodeId,
    parent: u64,
    name: Vec<u8>,
    /// The change sequence when it was made.
    sent: u64,
    /// The attributes the kernel is told until the HOST's own arrive.
    attr: Attr,
}

impl Inner {
    /// The session and server instance to send an operation in `dir` asynchronously with, if
    /// it may be: asynchronous directory operations are on, the mount made `dir` (and no
    /// foreign change there was reported since), `dir`'s node is current and a session is live.
    fn async_target(&self, dir: u64) -> Option<(Session, u64)> {
        if !self.opts.async_dirops || self.opts.pseudo() || self.opts.read_only {
            return None;
        }
        let session = self.client.current()?;
        let st = self.st();
        if !st.excl.contains(&dir) {
            return None;
        }
        let n = st.inodes.get(&dir)?;
        (n.epoch == st.epoch).then_some((session, st.instance))
    }

    /// Ends this mount's exclusive knowledge of directory `dir` (FUSE inode): something else
    /// changed it (the HOST reported a foreign change, or an operation there met a name this
    /// mount did not make). Operations there are synchronous from now on, and names it did not
    /// make are looked up again (`negative_timeout`).
    pub(crate) fn foreign_change(&self, dir: u64) {
        let mut st = self.st();
        st.excl.remove(&dir);
        st.new_dirs.remove(&dir);
    }

    /// This mount just made directory `dir`: it knows everything in it (until
    /// [`Inner::foreign_change`]).
    pub(super) fn note_excl(&self, dir: u64) {
        if self.opts.async_dirops && !self.opts.pseudo() {
            self.st().excl.insert(dir);
        }
    }

    /// A fresh client-chosen id.
    fn alias_id(st: &mut State) -> u64 {
        st.next_alias += 1;
        proto::ALIAS_BIT | st.next_alias
    }

    /// Attributes of a node just made in `parent` as the HOST will make it (the caller's
    /// ownership, the exact mode, the parent's setgid group), for the kernel until the HOST's
    /// own arrive; and the parent's as after the operation (times now, a subdirectory's link).
    fn made_attrs(st: &mut State, parent: u64, mode: u32, caller: Caller, size: u64) -> Attr {
        let now = system_to_ts(SystemTime::now());
        let seq = st.seq;
        let pnode = st.inodes.get_mut(&parent);
        let pattr = pnode.and_then(|n| {
            n.local = true;
            n.attr.as_mut()
        });
        let (psgid, pgid, pxattrs) = match pattr {
            Some((a, at, sent)) => {
                a.mtime = now;
                a.ctime = now;
                if mode & libc::S_IFMT == libc::S_IFDIR {
                    a.nlink += 1;
                }
                let r = (a.mode & libc::S_ISGID != 0, a.gid, a.xattrs);
                *at = Instant::now();
                *sent = seq;
                r
            }
            None => (false, caller.gid, true),
        };
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let mut m = mode;
        if dir && psgid {
            m |= libc::S_ISGID;
        }
        Attr {
            ino: 0,
            size,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            mode: m,
            nlink: if dir { 2 } else { 1 },
            uid: caller.uid,
            gid: if psgid { pgid } else { caller.gid },
            rdev: 0,
            blksize: 4096,
            xattrs: pxattrs,
        }
    }

    /// Registers a node made asynchronously in `parent` under a new alias: one kernel
    /// reference, the attributes the kernel is told.
    fn add_made(&self, parent: u64, name: &[u8], mode: u32, caller: Caller, size: u64) -> Made {
        let mut st = self.st();
        let alias = Self::alias_id(&mut st);
        let attr = Self::made_attrs(&mut st, parent, mode, caller, size);
        let ino = st.next_ino;
        st.next_ino += 1;
        let (epoch, seq) = (st.epoch, st.seq);
        st.inodes.insert(
            ino,
            Inode {
                kernel_lookups: 1,
                parent,
                name: name.to_vec(),
                node: alias,
                epoch,
                server_lookups: 1,
                fifo: false,
                attr: Some((attr, Instant::now(), seq)),
                stale_at: 0,
                real: None,
                local: true,
                pins: 0,
            },
        );
        st.by_node.insert(alias, ino);
        drop(st);
        self.note_xattrs(ino, &attr);
        self.note_new_name(parent, name);
        Made {
            ino,
            alias,
            parent,
            name: name.to_vec(),
            sent: seq,
            attr,
        }
    }

    /// Counts one more operation in flight on each inode of `inos` (their failure is
    /// reported by the next close, fsync or listing) and keeps them in the table until it is
    /// done; `creating`: also on `inos[0]`'s creation, which re-resolving it after a HOST
    /// restart waits for.
    fn begin_ops(&self, inos: &[u64], creating: bool) -> InFlight {
        let pinned = self.pin(inos);
        let mut out = Vec::with_capacity(inos.len() + 1);
        {
            let mut map = self.unstable_map();
            for &i in inos {
                let u = map.entry(i).or_default().clone();
                u.lock().0 += 1;
                out.push(u);
            }
        }
        if creating {
            let mut map = lock(&self.creating);
            let u = map.entry(inos[0]).or_default().clone();
            u.lock().0 += 1;
            out.push(u);
        }
        InFlight {
            trackers: out,
            pinned,
        }
    }

    /// The inode `parent/name` names when its asynchronous creation is not answered yet.
    pub(super) fn creating_named(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = *self.st().names.get(&(parent, name.to_vec()))?;
        let map = lock(&self.creating);
        map.get(&ino).is_some_and(|u| u.lock().0 > 0).then_some(ino)
    }

    /// Waits until the asynchronous creation of `ino` (if any) is answered or replayed.
    pub(super) async fn wait_created(&self, ino: u64) {
        let u = lock(&self.creating).get(&ino).cloned();
        if let Some(u) = u {
            u.settle_keep().await;
            let mut map = lock(&self.creating);
            if map.get(&ino).is_some_and(|u| u.lock().0 == 0) {
                map.remove(&ino);
            }
        }
    }

    /// Sends `op` behind everything queued on `session` and gives its outcome to `done` where
    /// the reply arrives; after a lost session or a HOST restart, `replay` does it again on
    /// the runtime (re-resolving by name) and `done` gets that outcome. `in_flight` then
    /// records it (and unpins); a failure also ends the exclusive knowledge of `dir`.
    #[allow(clippy::too_many_arguments)]
    fn send_async<O, D, F, Fut>(
        self: &Arc<Self>,
        session: &Session,
        instance: u64,
        op: O,
        dir: u64,
        in_flight: InFlight,
        done: D,
        replay: F,
    ) where
        O: Operation,
        D: FnOnce(&Arc<Inner>, &R<O::Reply>) + Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = R<O::Reply>> + Send + 'static,
    {
        let what = O::CODE.name();
        let finish = move |me: &Arc<Inner>, r: R<O::Reply>| {
            done(me, &r);
            let res = r.map(|_| ());
            if let Err(e) = res {
                warn!(
                    op = what,
                    dir,
                    error = ?e,
                    "asynchronous operation failed on the HOST; reported at close/fsync/listing"
                );
                // The directory is no longer known whole, and the kernel forgets the names and
                // attributes it was given for it (a failed create's size-0 entry).
                me.refresh_dir(dir);
            }
            for t in in_flight.trackers {
                t.finish(res);
            }
            me.unpin(&in_flight.pinned);
        };
        let me = self.clone();
        self.call_then(session, instance, op, move |r| match r {
            Some(r) => finish(&me, r),
            None => {
                let rt = me.rt.clone();
                rt.spawn(async move {
                    debug!(op = what, "replaying an asynchronous operation");
                    let r = replay(me.clone()).await;
                    finish(&me, r);
                });
            }
        });
    }

    /// The HOST answered the creation of `m` (or its replay): its own id joins the alias, so
    /// its later lookups find the same inode. A failure leaves the alias standing for the
    /// errno on the HOST and the recorded attributes unused.
    /// The HOST's attributes of the node and of its directory replace those worked out here
    /// unless something since changed them (or more is in flight in the directory).
    fn created(&self, m: &Made, r: R<(Entry, Option<Attr>)>) {
        if let Ok((e, pattr)) = &r {
            self.note_attr_since(m.ino, &e.attr, m.sent);
            let alone = self
                .unstable_map()
                .get(&m.parent)
                .is_some_and(|u| u.lock().0 <= 1);
            if let (Some(pa), true) = (pattr, alone) {
                self.note_attr_since(m.parent, pa, m.sent);
            }
        }
        let mut st = self.st();
        match r.map(|(e, _)| e.node) {
            Ok(real) => {
                let mut joined = false;
                if let Some(n) = st.inodes.get_mut(&m.ino) {
                    if n.node == m.alias {
                        n.real = Some(real);
                        joined = true;
                    }
                }
                if joined {
                    st.by_node.entry(real).or_insert(m.ino);
                }
            }
            Err(_) => {
                // Not made: the inode is looked up by name when used again (what holds the
                // name on the HOST, if anything; an EEXIST's file is then seen).
                st.seq += 1;
                let seq = st.seq;
                if let Some(n) = st.inodes.get_mut(&m.ino) {
                    n.stale_at = seq;
                    if n.node == m.alias {
                        n.epoch = 0;
                    }
                }
                if st.by_node.get(&m.alias) == Some(&m.ino) {
                    st.by_node.remove(&m.alias);
                }
                if let Some(d) = st.new_dirs.get_mut(&m.parent) {
                    d.names.remove(&m.name);
                }
            }
        }
    }

    /// Replays a creation after a lost session or HOST restart: made again under the HOST's
    /// own id (accepting what the first attempt made if it did land), the inode and handle
    /// then current in the new epoch.
    async fn replayed<T>(
        self: &Arc<Self>,
        m: &Made,
        fh: Option<u64>,
        make: impl Fn(
            NodeId,
        )
            -> std::pin::Pin<Box<dyn Future<Output = R<(Entry, Option<Fh>, T)>> + Send>>,
    ) -> R<T> {
        let (e, sfh, v) = self
            .with(|| async {
                let p = self.node_of(m.parent).await?;
                make(p).await
            })
            .await?;
        let mut st = self.st();
        let epoch = st.epoch;
        if let Some(n) = st.inodes.get_mut(&m.ino) {
            n.node = e.node;
            n.real = None;
            n.epoch = epoch;
            n.server_lookups = 1;
        }
        st.by_node.insert(e.node, m.ino);
        if let (Some(fh), Some(sfh)) = (fh, sfh) {
            if let Some(h) = st.handles.get_mut(&fh) {
                h.fh = sfh;
                h.epoch = epoch;
            }
        }
        Ok(v)
    }

    /// An asynchronous create (see the module docs), or the reply back when it must be
    /// synchronous.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn async_create(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
        reply: ReplyCreate,
    ) -> Option<ReplyCreate> {
        let Some((session, instance)) = self.async_target(parent) else {
            return Some(reply);
        };
        let no = libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT;
        if flags & no != 0 || mode & libc::S_IFMT & !libc::S_IFREG != 0 {
            return Some(reply);
        }
        let Some(pnode) = self.ready(parent).map(|r| r.0) else {
            return Some(reply);
        };
        let mode = libc::S_IFREG | (mode & 0o7777);
        let m = self.add_made(parent, name, mode, caller, 0);
        let afh = Self::alias_id(&mut self.st());
        let fh = self.new_handle(m.ino, flags, false, afh);
        let op = op::Create {
            parent: pnode,
            name: name.to_vec(),
            mode,
            flags,
            caller,
            alias: Some((m.alias, afh)),
        };
        let in_flight = self.begin_ops(&[m.ino, parent], true);
        let m = Arc::new(m);
        let (m1, m2) = (m.clone(), m.clone());
        let name = name.to_vec();
        self.send_async(
            &session,
            instance,
            op,
            parent,
            in_flight,
            move |me, r| me.created(&m1, r.map(|c| (c.entry, Some(c.parent)))),
            move |me| async move {
                let flags = flags & !(libc::O_EXCL | libc::O_TRUNC);
                let me2 = me.clone();
                me2.replayed(&m2, Some(fh), move |p| {
                    let (me, name) = (me.clone(), name.clone());
                    Box::pin(async move {
                        let c = me
                            .call(op::Create {
                                parent: p,
                                name,
                                mode,
                                flags,
                                caller,
                                alias: None,
                            })
                            .await?;
                        Ok((c.entry, Some(c.opened.fh), c))
                    })
                })
                .await
            },
        );
        reply.created(
            &self.entry_ttl(),
            &fuse_attr(m.ino, &m.attr),
            Generation(0),
            FileHandle(fh),
            self.open_flags(m.ino, false),
        );
        None
    }

    /// An asynchronous mkdir or symlink (see the module docs), or the reply back when it must
    /// be synchronous. `target`: the symlink's; `None` for mkdir.
    pub(super) fn async_make(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
        mode: u32,
        target: Option<&[u8]>,
        caller: Caller,
        reply: ReplyEntry,
    ) -> Option<ReplyEntry> {
        let Some((session, instance)) = self.async_target(parent) else {
            return Some(reply);
        };
        let Some(pnode) = self.ready(parent).map(|r| r.0) else {
            return Some(reply);
        };
        let (mode, size) = match target {
            None => (libc::S_IFDIR | (mode & 0o7777), 4096),
            Some(t) => (libc::S_IFLNK | 0o777, t.len() as u64),
        };
        let m = self.add_made(parent, name, mode, caller, size);
        let in_flight = self.begin_ops(&[m.ino, parent], true);
        let ino = m.ino;
        let m = Arc::new(m);
        let (m1, m2) = (m.clone(), m.clone());
        let name = name.to_vec();
        let target = target.map(|t| t.to_vec());
        let op_target = target.clone();
        let done = move |me: &Arc<Inner>, r: &R<proto::Made>| {
            // A replay that found its node made has no post-op attributes (mode 0).
            me.created(
                &m1,
                r.map(|c| (c.entry, (c.parent.mode != 0).then_some(c.parent))),
            )
        };
        let replay = move |me: Arc<Inner>| async move {
            let replay_target = target.clone();
            let me2 = me.clone();
            me2.replayed(&m2, None, move |p| {
                let (me, name, target) = (me.clone(), name.clone(), replay_target.clone());
                Box::pin(async move {
                    let made = match target {
                        None => {
                            me.call(op::Mkdir {
                                parent: p,
                                name: name.clone(),
                                mode,
                                caller,
                                alias: None,
                            })
                            .await
                        }
                        Some(target) => {
                            me.call(op::Symlink {
                                parent: p,
                                name: name.clone(),
                                target,
                                caller,
                                alias: None,
                            })
                            .await
                        }
                    };
                    let made = match made {
                        // The first attempt landed before the session was lost.
                        Err(OpError::Errno(libc::EEXIST)) => {
                            let e = me.call(op::Lookup { parent: p, name }).await?;
                            proto::Made {
                                entry: e,
                                parent: Attr::default(),
                            }
                        }
                        other => other?,
                    };
                    Ok((made.entry, None, made))
                })
            })
            .await
        };
        match op_target {
            None => {
                let op = op::Mkdir {
                    parent: pnode,
                    name: m.name.clone(),
                    mode,
                    caller,
                    alias: Some(m.alias),
                };
                self.send_async(&session, instance, op, parent, in_flight, done, replay);
                self.note_excl(ino);
                self.note_new_dir(ino);
            }
            Some(target) => {
                let op = op::Symlink {
                    parent: pnode,
                    name: m.name.clone(),
                    target,
                    caller,
                    alias: Some(m.alias),
                };
                self.send_async(&session, instance, op, parent, in_flight, done, replay);
            }
        }
        reply.entry_with_ttls(
            &Duration::ZERO,
            &self.entry_ttl(),
            &fuse_attr(ino, &m.attr),
            Generation(0),
        );
        None
    }

    /// An asynchronous unlink (see the module docs), or the reply back when it must be
    /// synchronous. Its failure is reported by the next listing or fsync of `parent`.
    pub(super) fn async_unlink(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
        reply: ReplyEmpty,
    ) -> Option<ReplyEmpty> {
        let Some((session, instance)) = self.async_target(parent) else {
            return Some(reply);
        };
        let Some(pnode) = self.ready(parent).map(|r| r.0) else {
            return Some(reply);
        };
        // Link counts and ctimes of the file change in ways the HOST does not report.
        self.stale_all_attrs();
        let in_flight = self.begin_ops(&[parent], false);
        let name = name.to_vec();
        let again = name.clone();
        self.send_async(
            &session,
            instance,
            op::Unlink {
                parent: pnode,
                name: name.clone(),
            },
            parent,
            in_flight,
            |me, _| me.stale_all_attrs(),
            move |me| async move {
                me.with(|| async {
                    let p = me.node_of(parent).await?;
                    let unlink = op::Unlink {
                        parent: p,
                        name: again.clone(),
                    };
                    match me.call(unlink).await {
                        // The first attempt landed before the session was lost.
                        Err(OpError::Errno(libc::ENOENT)) => Ok(()),
                        r => r,
                    }
                })
                .await
            },
        );
        self.fifo_unlinked(parent, &name);
        reply.ok();
        None
    }

    /// An asynchronous setattr of a node in a directory this mount knows (see the module
    /// docs), answered with the attributes it will have; or the reply back when it must be
    /// synchronous: the current attributes are not known here, or the change touches
    /// set-user/group-id bits (which the HOST's kernel may clear on its own).
    pub(super) fn async_setattr(
        self: &Arc<Self>,
        ino: u64,
        fh: Option<u64>,
        a: op::SetAttr,
        reply: ReplyAttr,
    ) -> Option<ReplyAttr> {
        let parent = self.st().inodes.get(&ino).map(|n| n.parent)?;
        let Some((session, instance)) = self.async_target(parent) else {
            return Some(reply);
        };
        let Some((base, _, _)) = self.known_attr(ino) else {
            return Some(reply);
        };
        let (Some((node, _, _)), Some(sfh)) = (self.ready(ino), self.fh_ready(fh)) else {
            return Some(reply);
        };
        let suid = libc::S_ISUID | libc::S_ISGID;
        let mode = a
            .mode
            .map_or(base.mode, |m| (base.mode & libc::S_IFMT) | (m & 0o7777));
        let regular = base.mode & libc::S_IFMT == libc::S_IFREG;
        if mode & suid != 0 || (a.size.is_some() && !regular) || is_fifo(base.mode) {
            return Some(reply);
        }
        let now = system_to_ts(SystemTime::now());
        let at = |t: Option<SetTime>, old: Ts| match t {
            None => old,
            Some(SetTime::Now) => now,
            Some(SetTime::At(ts)) => ts,
        };
        let new = Attr {
            mode,
            uid: a.uid.unwrap_or(base.uid),
            gid: a.gid.unwrap_or(base.gid),
            size: a.size.unwrap_or(base.size),
            atime: at(a.atime, base.atime),
            mtime: at(a.mtime, base.mtime),
            ctime: now,
            ..base
        };
        // Replies to requests sent before this one predate it.
        self.stale_attr(ino);
        let sent = self.attr_seq();
        self.note_attr(ino, &new, sent);
        if let Some(n) = self.st().inodes.get_mut(&ino) {
            n.local = true;
        }
        let in_flight = self.begin_ops(&[ino, parent], false);
        let op = op::SetAttr {
            node,
            fh: sfh,
            ..a.clone()
        };
        self.send_async(
            &session,
            instance,
            op,
            parent,
            in_flight,
            move |me, r| match r {
                Ok(attr) => me.note_attr_since(ino, attr, sent),
                Err(_) => me.stale_attr(ino),
            },
            move |me| async move {
                me.with(|| async {
                    let node = me.node_of(ino).await?;
                    let sfh = match fh {
                        Some(h) => me.fh_of(h).await.ok(),
                        None => None,
                    };
                    me.call(op::SetAttr {
                        node,
                        fh: sfh,
                        ..a.clone()
                    })
                    .await
                })
                .await
            },
        );
        reply.attr(&Duration::ZERO, &fuse_attr(ino, &new));
        None
    }

    /// Records attributes the HOST sent for a request sent at change sequence `sent`, unless
    /// this mount changed the node since (its own view is newer).
    fn note_attr_since(&self, ino: u64, a: &Attr, sent: u64) {
        let newer = self
            .st()
            .inodes
            .get(&ino)
            .is_some_and(|n| n.stale_at > sent);
        if !newer {
            self.note_attr(ino, a, sent);
        }
    }

    /// An acknowledged write of `ino` up to byte `end` changed its attributes: in a directory
    /// this mount knows, with the attributes current, they are carried forward here (size,
    /// times) instead of asked for again; otherwise they are marked stale
    /// ([`Inner::stale_attr`]).
    pub(super) fn write_changed(&self, ino: u64, end: u64) {
        let ttl = self.ttl();
        let mut st = self.st();
        let local = self.opts.async_dirops && st.resending == 0 && !ttl.is_zero();
        let removal_at = st.removal_at;
        st.seq += 1;
        let seq = st.seq;
        let excl = st
            .inodes
            .get(&ino)
            .is_some_and(|n| st.excl.contains(&n.parent));
        let Some(n) = st.inodes.get_mut(&ino) else {
            return;
        };
        let current = n.attr.is_some_and(|(_, at, sent)| {
            sent >= n.stale_at && sent >= removal_at && at.elapsed() < ttl
        });
        n.stale_at = seq;
        if !(local && excl && current) {
            return;
        }
        n.local = true;
        if let Some((a, at, sent)) = n.attr.as_mut() {
            let now = system_to_ts(SystemTime::now());
            a.size = a.size.max(end);
            a.mtime = now;
            a.ctime = now;
            *at = Instant::now();
            *sent = seq;
        }
    }
}
