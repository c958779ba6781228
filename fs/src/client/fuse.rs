//! The FUSE filesystem: fuser's callbacks, each answered from what is known here or through
//! the typed calls of `rpc`.

use super::*;

pub(super) fn ts_to_system(t: Ts) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

pub(super) fn system_to_ts(t: SystemTime) -> Ts {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Ts {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Ts { sec, nsec }
        }
    }
}

pub(super) fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(system_to_ts(t)),
    })
}

pub(super) fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub(super) fn is_fifo(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFIFO
}

pub(super) fn fuse_attr(ino: u64, a: &Attr) -> FileAttr {
    let fifo = is_fifo(a.mode);
    FileAttr {
        ino: INodeNo(ino),
        size: if fifo { 0 } else { a.size },
        blocks: a.blocks,
        atime: ts_to_system(a.atime),
        mtime: ts_to_system(a.mtime),
        ctime: ts_to_system(a.ctime),
        crtime: ts_to_system(a.ctime),
        kind: kind_of(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: if a.blksize == 0 { 4096 } else { a.blksize },
        flags: 0,
    }
}

/// The errno of a failure (an [`OpError`], or a plain errno of the local proc view) for the
/// kernel.
pub(super) fn errno(e: impl Into<OpError>) -> Errno {
    Errno::from_i32(e.into().errno())
}

pub(super) fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// [`spawn_reply!`] for one operation on inode `$ino`'s HOST node (re-resolved after a
/// HOST restart): `on_node!(self, reply, me, ino => |node| op, |result| answer)`.
macro_rules! on_node {
    ($self:ident, $reply:ident, $me:ident, $ino:expr => |$node:ident| $op:expr, |$v:ident| $ok:expr) => {
        spawn_reply!(
            $self,
            $reply,
            |$me| {
                let $node = $me.node_of($ino).await?;
                $me.call($op).await
            },
            |$v| $ok
        )
    };
}

/// [`spawn_reply!`] for one operation on open handle `$fh`'s HOST handle (re-opened after a
/// HOST restart): `on_handle!(self, reply, me, fh => |sfh| op, |result| answer)`.
macro_rules! on_handle {
    ($self:ident, $reply:ident, $me:ident, $fh:expr => |$sfh:ident| $op:expr, |$v:ident| $ok:expr) => {
        spawn_reply!(
            $self,
            $reply,
            |$me| {
                let $sfh = $me.fh_of($fh).await?;
                $me.call($op).await
            },
            |$v| $ok
        )
    };
}

/// Runs `$body` (an operation's calls) on the runtime — waiting out outages, re-mounting and
/// retrying after a HOST restart — and answers with `$ok` or the failure's errno.
macro_rules! spawn_reply {
    ($self:ident, $reply:ident, |$me:ident| $body:expr, |$v:ident| $ok:expr) => {{
        let $me = $self.inner.clone();
        $self.inner.rt.spawn(async move {
            let res = $me.with(|| async { $body }).await;
            match res {
                Ok($v) => $ok,
                Err(e) => $reply.error(errno(e)),
            }
        });
    }};
}

impl QtfsFs {
    /// Answers with attributes the HOST returned for `ino`.
    pub(super) fn attr_reply(me: &Inner, ino: u64, r: R<Attr>, sent: u64, reply: ReplyAttr) {
        match r {
            Ok(a) => {
                me.note_attr(ino, &a, sent);
                reply.attr(&me.attr_ttl(ino, &a, sent), &fuse_attr(ino, &a))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Answers with an entry the HOST returned; the kernel's new inode number. `pid`: the
    /// caller, whose lookup of a FIFO arms or kicks its tunnel (0: no hint).
    pub(super) fn entry_reply(
        inner: &Arc<Inner>,
        parent: u64,
        name: &[u8],
        e: Entry,
        sent: u64,
        pid: u32,
        reply: ReplyEntry,
    ) -> u64 {
        let ino = inner.add_entry(parent, name, &e, sent);
        let fifo = is_fifo(e.attr.mode);
        let (ttl, entry_ttl) = if fifo {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (
                inner.attr_ttl(ino, &e.attr, sent),
                inner.entry_ttl_in(parent, sent),
            )
        };
        reply.entry_with_ttls(&ttl, &entry_ttl, &fuse_attr(ino, &e.attr), Generation(0));
        if fifo && pid != 0 {
            inner.fifo_hint(ino, pid);
        }
        ino
    }
}

impl QtfsFs {
    /// Looks `parent/name` up on the HOST and answers the kernel.
    fn lookup_on_host(
        inner: &Arc<Inner>,
        parent: u64,
        name: Vec<u8>,
        pid: u32,
        sent: u64,
        reply: ReplyEntry,
    ) {
        let build = {
            let name = name.clone();
            move |p, _| op::Lookup {
                parent: p,
                name: name.clone(),
            }
        };
        inner.request(parent, None, build, move |me, r| match r {
            Ok(e) => {
                QtfsFs::entry_reply(me, parent, &name, e, sent, pid, reply);
            }
            Err(OpError::Errno(libc::ENOENT)) => QtfsFs::absent_reply(me, parent, sent, reply),
            Err(e) => reply.error(errno(e)),
        });
    }

    /// Answers "no such entry": as a negative entry the kernel remembers while the HOST
    /// reports changes in `parent` (a HOST-side create invalidates it), else as ENOENT.
    pub(super) fn absent_reply(inner: &Inner, parent: u64, sent: u64, reply: ReplyEntry) {
        let ttl = inner.negative_ttl_in(parent, sent);
        if ttl.is_zero() {
            return reply.error(Errno::ENOENT);
        }
        let none = fuse_attr(0, &Attr::default());
        reply.entry_with_ttls(&Duration::ZERO, &ttl, &none, Generation(0));
    }
}

impl Filesystem for QtfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let mut want = InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        if !self.inner.opts.pseudo() {
            want |= InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        }
        if self.inner.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(want & caps);
        let _ = config.set_max_write(proto::MAX_IO);
        let _ = config.set_max_readahead(proto::MAX_IO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    /// Unmounting: acknowledged writes and asynchronous directory operations still in flight
    /// are delivered before the process ends (bounded by the mount's timeout unless `hard`);
    /// failures not reported yet are logged.
    fn destroy(&mut self) {
        for c in self.inner.fifos.armed().values() {
            c.stop();
        }
        let pending: Vec<u64> = self.inner.unstable_map().keys().copied().collect();
        if pending.is_empty() {
            return;
        }
        let me = self.inner.clone();
        let drain = async move {
            for ino in pending {
                if let Err(e) = me.settle(ino).await {
                    warn!(
                        ino,
                        error = ?e,
                        "write or directory operation failed (reported while unmounting)"
                    );
                }
            }
        };
        if self.inner.opts.hard {
            self.inner.rt.block_on(drain);
        } else if self
            .inner
            .rt
            // The timer is made inside the runtime (`timeout` needs its context).
            .block_on(async { tokio::time::timeout(self.inner.opts.timeout, drain).await })
            .is_err()
        {
            warn!("HOST unreachable while unmounting; acknowledged writes lost");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let pid = req.pid();
        let name = name.as_bytes().to_vec();
        let Some(reply) = self.syn_lookup(req, parent, &name, reply) else {
            return;
        };
        let sent = self.inner.attr_seq();
        if self.inner.known_absent(parent, &name) {
            QtfsFs::absent_reply(&self.inner, parent, sent, reply);
            return;
        }
        if let Some(ino) = self.inner.creating_named(parent, &name) {
            // Made asynchronously and not on the HOST yet (a replay after a restart, the
            // kernel's entry dropped meanwhile): asked once it is.
            let me = self.inner.clone();
            self.inner.rt.spawn(async move {
                me.wait_created(ino).await;
                QtfsFs::lookup_on_host(&me, parent, name, pid, sent, reply);
            });
            return;
        }
        QtfsFs::lookup_on_host(&self.inner, parent, name, pid, sent, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if is_syn_ino(ino.0) {
            if let Some(v) = self.view() {
                v.forget(ino.0, nlookup);
            }
            return;
        }
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        let Some(reply) = self.syn_getattr(ino, reply) else {
            return;
        };
        if self.inner.is_fifo_ino(ino) {
            // Someone stats or opens the FIFO (its attributes have TTL 0).
            self.inner.fifo_hint(ino, req.pid());
        }
        if let Some((a, left)) = self.inner.fresh_attr(ino) {
            let left = if is_fifo(a.mode) {
                Duration::ZERO
            } else {
                left
            };
            reply.attr(&left, &fuse_attr(ino, &a));
            return;
        }
        let sent = self.inner.attr_seq();
        self.inner.request(
            ino,
            fh.map(|h| h.0),
            |node, fh| op::GetAttr { node, fh },
            move |me, r| QtfsFs::attr_reply(me, ino, r, sent, reply),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        let (atime, mtime) = (set_time(atime), set_time(mtime));
        let sent = self.inner.attr_seq();
        let build = move |node, fh| op::SetAttr {
            node,
            fh,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        let fh = fh.map(|h| h.0);
        let Some(reply) = self.inner.async_setattr(ino, fh, build(0, None), reply) else {
            return;
        };
        self.inner.request(ino, fh, build, move |me, r| {
            QtfsFs::attr_reply(me, ino, r, sent, reply)
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = ino.0;
        let Some(reply) = self.syn_readlink(req, ino, reply) else {
            return;
        };
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                Ok(me.call_data(op::ReadLink { node }).await?.1)
            },
            |d| reply.data(&d)
        )
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let pid = req.pid();
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Mknod {
                        parent: p,
                        name: name.clone(),
                        mode,
                        rdev: rdev as u64,
                        caller,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                // A FIFO made here is about to be opened: arm its tunnel.
                QtfsFs::entry_reply(&me, parent, &name, e, sent, pid, reply);
            }
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let Some(reply) = self
            .inner
            .async_make(parent, &name, mode, None, caller, reply)
        else {
            return;
        };
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Mkdir {
                        parent: p,
                        name: name.clone(),
                        mode,
                        caller,
                        alias: None,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                let ino = QtfsFs::entry_reply(&me, parent, &name, e, sent, 0, reply);
                me.note_new_dir(ino);
                me.note_excl(ino);
            }
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let Some(reply) = self.inner.async_unlink(parent, &name, reply) else {
            return;
        };
        self.inner.stale_all_attrs();
        on_node!(
            self,
            reply,
            me,
            parent => |p| op::Unlink {
                parent: p,
                name: name.clone(),
            },
            |_r| {
                me.stale_all_attrs();
                me.fifo_unlinked(parent, &name);
                reply.ok()
            }
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        self.inner.stale_all_attrs();
        on_node!(
            self,
            reply,
            me,
            parent => |p| op::Rmdir {
                parent: p,
                name: name.clone(),
            },
            |_r| {
                me.stale_all_attrs();
                reply.ok()
            }
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = parent.0;
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        let caller = caller(req);
        let Some(reply) = self
            .inner
            .async_make(parent, &name, 0o777, Some(&target), caller, reply)
        else {
            return;
        };
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.make(
                    parent,
                    op::Symlink {
                        parent: p,
                        name: name.clone(),
                        target: target.clone(),
                        caller,
                        alias: None,
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(parent, &name, &pattr, sent);
                QtfsFs::entry_reply(&me, parent, &name, e, sent, 0, reply);
            }
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, newparent) = (parent.0, newparent.0);
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        let flags = flags.bits();
        self.inner.stale_all_attrs();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                let np = me.node_of(newparent).await?;
                me.call(op::Rename {
                    parent: p,
                    name: name.clone(),
                    newparent: np,
                    newname: newname.clone(),
                    flags,
                })
                .await
                .map_err(|e| me.make_failed(newparent, e))
            },
            |_r| {
                // Keep the re-resolution names current.
                let mut st = me.st();
                let moved = st.names.get(&(parent, name.clone())).copied();
                let other = st.names.get(&(newparent, newname.clone())).copied();
                if let Some(k) = other {
                    Inner::unname(&mut st, k, newparent, &newname);
                }
                if let Some(k) = moved {
                    Inner::set_name(&mut st, k, newparent, &newname);
                }
                if flags & libc::RENAME_EXCHANGE != 0 {
                    if let Some(k) = other {
                        Inner::set_name(&mut st, k, parent, &name);
                    }
                }
                drop(st);
                me.stale_all_attrs();
                me.note_new_name(newparent, &newname);
                if flags & libc::RENAME_EXCHANGE != 0 {
                    me.note_new_name(parent, &name);
                }
                reply.ok()
            }
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (ino, newparent) = (ino.0, newparent.0);
        let newname = newname.as_bytes().to_vec();
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                let np = me.node_of(newparent).await?;
                me.make(
                    newparent,
                    op::Link {
                        node,
                        newparent: np,
                        newname: newname.clone(),
                    },
                )
                .await
            },
            |v| {
                let (e, pattr) = v;
                me.made_in(newparent, &newname, &pattr, sent);
                QtfsFs::entry_reply(&me, newparent, &newname, e, sent, 0, reply);
            }
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        let Some(reply) = self.syn_open(ino, reply) else {
            return;
        };
        let flags = flags.0;
        let truncates = flags & libc::O_TRUNC != 0;
        if truncates {
            self.inner.stale_attr(ino);
        }
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                let o = me.call(op::Open { node, flags }).await?;
                Ok((o.fh, o.direct))
            },
            |v| {
                let (sfh, direct) = v;
                if truncates {
                    me.stale_attr(ino);
                }
                let fh = me.new_handle(ino, flags, false, sfh);
                reply.opened(FileHandle(fh), me.open_flags(ino, direct))
            }
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(reply) = self.syn_read(fh.0, offset, size, reply) else {
            return;
        };
        // A read may update the access time.
        self.inner.stale_attr(ino.0);
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                let read = op::Read {
                    fh: sfh,
                    offset,
                    size,
                };
                Ok(me.call_data(read).await?.1)
            },
            |data| reply.data(&data)
        )
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.inner.start_write(ino.0, fh.0, offset, data) {
            WriteStart::Done(res) => reply_write(reply, res),
            WriteStart::Later(res) => {
                self.inner
                    .rt
                    .spawn(async move { reply_write(reply, res.await) });
            }
        }
    }

    /// Waits for the inode's acknowledged writes still in flight and reports a failure this
    /// open file was not told of (close(2) returns it, as on NFS), without taking it: the flush
    /// may come from a child's implicit close of an inherited descriptor at exec, and the
    /// writer's own close or fsync must still see it (see `Unstable`). Nothing else is
    /// buffered here, so with no write in flight it is answered at once and close never waits
    /// for the HOST during an outage.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        if !self.inner.has_unstable(ino) {
            reply.ok();
            return;
        }
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            match me.settle_handle(ino, fh.0, false).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(reply) = self.syn_release(fh.0, reply) else {
            return;
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            // Writes still in flight need the handle (re-opened after a HOST restart). A failure
            // was reported by the close before this (flush), unless it came later.
            if let Err(e) = me.settle_handle(ino.0, fh.0, true).await {
                debug!(
                    ino = ino.0,
                    error = ?e,
                    "write failure reported at the last close"
                );
            }
            let h = me.st().handles.remove(&fh.0);
            let Some(h) = h else {
                reply.ok();
                return;
            };
            if h.epoch == me.st().epoch {
                let _ = me
                    .call(op::Release {
                        fh: h.fh,
                        lock_owner: lock_owner.map(|l| l.0),
                    })
                    .await;
            }
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                me.settle_handle(ino.0, fh.0, true).await?;
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::Fsync { fh: sfh, datasync }).await
            },
            |_r| reply.ok()
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        let Some(reply) = self.syn_opendir(ino, reply) else {
            return;
        };
        let flags = flags.0;
        // A listing shows what the HOST holds: names must not be denied that it lists. And
        // reading the directory may update its access time.
        self.inner.st().new_dirs.remove(&ino);
        self.inner.stale_attr(ino);
        spawn_reply!(
            self,
            reply,
            |me| {
                // A listing reports what asynchronous operations here failed.
                me.settle(ino).await?;
                let node = me.node_of(ino).await?;
                Ok(me.call(op::OpenDir { node }).await?.fh)
            },
            |sfh| {
                let fh = me.new_handle(ino, flags, true, sfh);
                // While the HOST reports changes here, the kernel keeps the listing (a
                // HOST-side change in the directory drops it).
                let flags = if me.cache_listing(ino) {
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), flags)
            }
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let Some(mut reply) = self.syn_readdir(fh.0, offset, reply) else {
            return;
        };
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::ReadDir {
                fh: sfh,
                offset,
                max_bytes: 64 * 1024,
                plus: false,
            },
            |entries| {
                for e in entries {
                    let kind = kind_of(if e.kind == 0 { libc::S_IFREG } else { e.kind });
                    if reply.add(
                        INodeNo(e.ino.max(1)),
                        e.offset,
                        kind,
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
        )
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir_ino = ino.0;
        let sent = self.inner.attr_seq();
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::ReadDir {
                fh: sfh,
                offset,
                max_bytes: 64 * 1024,
                plus: true,
            },
            |entries| {
                let ttl = me.entry_ttl_in(dir_ino, sent);
                let mut leftovers: Vec<(NodeId, u64)> = Vec::new();
                let mut full = false;
                for DirEntry {
                    name,
                    offset,
                    entry,
                    kind,
                    ..
                } in entries
                {
                    match entry {
                        Some(e) if !full => {
                            let ino = me.add_entry(dir_ino, &name, &e, sent);
                            let attr = fuse_attr(ino, &e.attr);
                            let ttl = if is_fifo(e.attr.mode) {
                                Duration::ZERO
                            } else {
                                ttl
                            };
                            if reply.add(
                                INodeNo(ino),
                                offset,
                                OsStr::from_bytes(&name),
                                &ttl,
                                &attr,
                                Generation(0),
                            ) {
                                full = true;
                                me.forget(ino, 1);
                            }
                        }
                        Some(e) => leftovers.push((e.node, 1)),
                        None if !full => {
                            // `.` and `..`: the kernel takes no reference for them.
                            let a = Attr {
                                mode: if kind == 0 { libc::S_IFDIR } else { kind },
                                ..Default::default()
                            };
                            let attr = fuse_attr(dir_ino, &a);
                            if reply.add(
                                INodeNo(dir_ino),
                                offset,
                                OsStr::from_bytes(&name),
                                &Duration::ZERO,
                                &attr,
                                Generation(0),
                            ) {
                                full = true;
                            }
                        }
                        None => {}
                    }
                }
                if !leftovers.is_empty() {
                    let me2 = me.clone();
                    me.rt.spawn(async move {
                        let _ = me2.call(op::Forget { nodes: leftovers }).await;
                    });
                }
                reply.ok()
            }
        )
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let Some(reply) = self.syn_release(fh.0, reply) else {
            return;
        };
        let h = self.inner.st().handles.remove(&fh.0);
        let Some(h) = h else {
            reply.ok();
            return;
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            if h.epoch == me.st().epoch {
                let _ = me.call(op::ReleaseDir { fh: h.fh }).await;
            }
            reply.ok();
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        spawn_reply!(
            self,
            reply,
            |me| {
                me.settle(ino.0).await?;
                let sfh = me.fh_of(fh.0).await?;
                me.call(op::FsyncDir { fh: sfh, datasync }).await
            },
            |_r| reply.ok()
        )
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let ino = if is_syn_ino(ino.0) { ROOT } else { ino.0 };
        on_node!(
            self,
            reply,
            me,
            ino => |node| op::StatFs { node },
            |s| reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize
            )
        )
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        let name = name.as_bytes().to_vec();
        if name == crate::client::REFRESH_XATTR.as_bytes() {
            // Not an xattr: a local tool says this directory changed on the HOST (a mount
            // forwarded onto it). Handled before answering, so the caller's next step sees it.
            self.inner.refresh_dir(ino);
            reply.ok();
            return;
        }
        let value = value.to_vec();
        self.inner.stale_attr(ino);
        on_node!(
            self,
            reply,
            me,
            ino => |node| op::SetXattr {
                node,
                name: name.clone(),
                value: value.clone(),
                flags,
            },
            |_r| {
                me.forget_xattrs(ino);
                reply.ok()
            }
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.error(Errno::ENODATA);
            return;
        }
        let name = name.as_bytes().to_vec();
        if self.inner.xattr_known_absent(ino, &name) {
            reply.error(Errno::ENODATA);
            return;
        }
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            let res = me
                .with(|| async {
                    let node = me.node_of(ino).await?;
                    me.call_data(op::GetXattr {
                        node,
                        name: name.clone(),
                        size,
                    })
                    .await
                })
                .await;
            match res {
                Ok((n, _)) if size == 0 => reply.size(n),
                Ok((_, d)) => reply.data(&d),
                Err(e) => {
                    if e == OpError::Errno(libc::ENODATA) {
                        me.remember_no_xattr(ino, name);
                    }
                    reply.error(errno(e))
                }
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.size(0);
            return;
        }
        if self.inner.xattr_known_absent(ino, b"") {
            if size == 0 {
                reply.size(0);
            } else {
                reply.data(&[]);
            }
            return;
        }
        spawn_reply!(
            self,
            reply,
            |me| {
                let node = me.node_of(ino).await?;
                me.call_data(op::ListXattr { node, size }).await
            },
            |r| match r {
                (n, _) if size == 0 => reply.size(n),
                (_, d) => reply.data(&d),
            }
        )
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let ino = ino.0;
        let name = name.as_bytes().to_vec();
        self.inner.stale_attr(ino);
        on_node!(
            self,
            reply,
            me,
            ino => |node| op::RemoveXattr {
                node,
                name: name.clone(),
            },
            |_r| {
                me.forget_xattrs(ino);
                reply.ok()
            }
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ino = ino.0;
        if is_syn_ino(ino) {
            reply.ok();
            return;
        }
        let caller = caller(req);
        let mask = mask.bits();
        on_node!(
            self,
            reply,
            me,
            ino => |node| op::Access { node, mask, caller },
            |_r| reply.ok()
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = parent.0;
        let name = name.as_bytes().to_vec();
        let caller = caller(req);
        let Some(reply) = self
            .inner
            .async_create(parent, &name, mode, flags, caller, reply)
        else {
            return;
        };
        let sent = self.inner.attr_seq();
        spawn_reply!(
            self,
            reply,
            |me| {
                let p = me.node_of(parent).await?;
                me.call(op::Create {
                    parent: p,
                    name: name.clone(),
                    mode,
                    flags,
                    caller,
                    alias: None,
                })
                .await
                .map_err(|e| me.make_failed(parent, e))
            },
            |c| {
                let proto::Created {
                    entry,
                    opened: proto::Opened { fh: sfh, direct },
                    parent: pattr,
                } = c;
                me.made_in(parent, &name, &pattr, sent);
                let ino = me.add_entry(parent, &name, &entry, sent);
                let fh = me.new_handle(ino, flags, false, sfh);
                reply.created(
                    &me.entry_ttl_in(parent, sent),
                    &fuse_attr(ino, &entry.attr),
                    Generation(0),
                    FileHandle(fh),
                    me.open_flags(ino, direct),
                )
            }
        )
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::GetLk {
                fh: sfh,
                owner: lock_owner.0,
                start,
                end,
                typ,
                pid,
            },
            |l| reply.locked(l.start, l.end, l.typ, l.pid)
        )
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::SetLk {
                fh: sfh,
                owner: lock_owner.0,
                start,
                end,
                typ,
                pid,
                sleep,
            },
            |_r| reply.ok()
        )
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        events: PollEvents,
        flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let Some(reply) = self.syn_poll(fh.0, events, reply) else {
            return;
        };
        let ev = events.bits();
        let notify = flags.contains(PollFlags::FUSE_POLL_SCHEDULE_NOTIFY);
        spawn_reply!(
            self,
            reply,
            |me| {
                let sfh = me.fh_of(fh.0).await?;
                let poll = op::Poll {
                    fh: sfh,
                    events: ev,
                    wait_ms: 0,
                };
                Ok((sfh, me.call(poll).await?))
            },
            |v| {
                let (sfh, revents) = v;
                reply.poll(PollEvents::from_bits_retain(revents));
                if revents == 0 && notify {
                    // Wait on the HOST (dedicated thread there) and wake the kernel when ready.
                    let me2 = me.clone();
                    me.rt.spawn(async move {
                        loop {
                            let still_open = me2.st().handles.contains_key(&fh.0);
                            if !still_open {
                                return;
                            }
                            match me2
                                .call(op::Poll {
                                    fh: sfh,
                                    events: ev,
                                    wait_ms: 5000,
                                })
                                .await
                            {
                                Ok(0) => continue,
                                _ => {
                                    let _ = ph.notify();
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        )
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let ino = ino.0;
        self.inner.stale_attr(ino);
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::Fallocate {
                fh: sfh,
                offset,
                length,
                mode,
            },
            |_r| {
                me.stale_attr(ino);
                reply.ok()
            }
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        on_handle!(
            self,
            reply,
            me,
            fh.0 => |sfh| op::Lseek {
                fh: sfh,
                offset,
                whence,
            },
            |o| reply.offset(o)
        )
    }
}

impl Inner {
    /// How the kernel treats an open file of `ino`: direct I/O for pseudo files and what the
    /// HOST asks for; cached pages kept across opens while the HOST reports writes to it.
    pub(super) fn open_flags(&self, ino: u64, direct: bool) -> FopenFlags {
        let mut f = FopenFlags::empty();
        if direct || self.opts.pseudo() {
            f |= FopenFlags::FOPEN_DIRECT_IO;
        } else if self.keep_cache(ino) {
            f |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        f
    }
}
