//! proc mode: the caller's own entries (module `procview`) and the HOST mount table read
//! through this mount.

use super::*;

/// proc mode: the caller's own entries (module `procview`). The FUSE methods call these
/// first: each answers a request about a generated node (`None`) or hands the reply back.
impl QtfsFs {
    pub(super) fn view(&self) -> Option<&ProcView> {
        self.inner.proc_view.as_ref()
    }

    /// Replies with a generated node, taking a kernel reference to it.
    pub(super) fn syn_entry(&self, node: SynNode, reply: ReplyEntry) {
        let Some(v) = self.view() else {
            reply.error(Errno::ENOENT);
            return;
        };
        let ino = v.intern(node.clone());
        match v.attr(ino, &node) {
            Ok(a) => reply.entry(&Duration::ZERO, &a, Generation(0)),
            Err(e) => {
                v.forget(ino, 1);
                reply.error(errno(e));
            }
        }
    }

    pub(super) fn syn_lookup(
        &self,
        req: &Request,
        parent: u64,
        name: &[u8],
        reply: ReplyEntry,
    ) -> Option<ReplyEntry> {
        let Some(v) = self.view() else {
            return Some(reply);
        };
        let hand = |reply: ReplyEntry, r: Result<SynNode, i32>| match r {
            Ok(n) => self.syn_entry(n, reply),
            Err(e) => reply.error(errno(e)),
        };
        if parent == ROOT {
            let ino = match name {
                b"self" => SELF_INO,
                b"thread-self" => THREAD_SELF_INO,
                _ => match v.own_root_entry(req.pid(), name) {
                    Some(n) => {
                        hand(reply, Ok(n));
                        return None;
                    }
                    None => return Some(reply),
                },
            };
            reply.entry(&Duration::ZERO, &procview::self_attr(ino), Generation(0));
            return None;
        }
        if !is_syn_ino(parent) {
            return Some(reply);
        }
        match v.node(parent) {
            Some(p) => hand(reply, v.lookup(&p, name)),
            None => reply.error(Errno::ESTALE),
        }
        None
    }

    pub(super) fn syn_getattr(&self, ino: u64, reply: ReplyAttr) -> Option<ReplyAttr> {
        if ino == SELF_INO || ino == THREAD_SELF_INO {
            reply.attr(&Duration::ZERO, &procview::self_attr(ino));
            return None;
        }
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        match self.view().and_then(|v| Some((v, v.node(ino)?))) {
            Some((v, n)) => match v.attr(ino, &n) {
                Ok(a) => reply.attr(&Duration::ZERO, &a),
                Err(e) => reply.error(errno(e)),
            },
            None => reply.error(Errno::ESTALE),
        }
        None
    }

    pub(super) fn syn_readlink(
        &self,
        req: &Request,
        ino: u64,
        reply: ReplyData,
    ) -> Option<ReplyData> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let Some(v) = self.view() else {
            reply.error(Errno::ESTALE);
            return None;
        };
        let r = match ino {
            SELF_INO => Ok(v.self_target(req.pid(), false)),
            THREAD_SELF_INO => Ok(v.self_target(req.pid(), true)),
            _ => match v.node(ino) {
                Some(n) => v.readlink(&n),
                None => Err(libc::ESTALE),
            },
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    pub(super) fn syn_opendir(&self, ino: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let r = match self.view().and_then(|v| Some((v, v.node(ino)?))) {
            Some((v, n)) => v.opendir(&n),
            None => Err(libc::ESTALE),
        };
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    pub(super) fn syn_readdir(
        &self,
        fh: u64,
        offset: u64,
        mut reply: ReplyDirectory,
    ) -> Option<ReplyDirectory> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        let Some(v) = self.view() else {
            reply.error(Errno::EBADF);
            return None;
        };
        match v.readdir(fh, offset) {
            Ok(list) => {
                for (i, (name, kind, next)) in list.into_iter().enumerate() {
                    // d_ino only: any stable non-zero number.
                    let ino = INodeNo(procview::SYN_BASE - 1 - (next + i as u64) % 1024);
                    if reply.add(ino, next, kind, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
        None
    }

    /// Releases a generated handle (directory or file).
    pub(super) fn syn_release(&self, fh: u64, reply: ReplyEmpty) -> Option<ReplyEmpty> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        if let Some(v) = self.view() {
            v.release(fh);
        }
        reply.ok();
        None
    }

    /// Opens a generated `mountinfo`/`mounts`: its content is made now, with the HOST's
    /// mount table fetched through this mount (at most once a second).
    pub(super) fn syn_open(&self, ino: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !is_syn_ino(ino) {
            return Some(reply);
        }
        let node = self.view().and_then(|v| v.node(ino));
        let node = match node {
            Some(n @ SynNode::File { .. }) => n,
            Some(SynNode::Link { .. }) => {
                reply.error(Errno::ELOOP);
                return None;
            }
            Some(_) => {
                reply.error(Errno::EISDIR);
                return None;
            }
            None => {
                reply.error(Errno::ESTALE);
                return None;
            }
        };
        let me = self.inner.clone();
        self.inner.rt.spawn(async move {
            let host = match me.host_mountinfo().await {
                Ok(h) => h,
                Err(e) => {
                    // Still the caller's own table, only without HOST cgroup lines.
                    debug!(error = ?e, "HOST mountinfo unavailable");
                    Arc::new(String::new())
                }
            };
            let Some(v) = me.proc_view.as_ref() else {
                reply.error(Errno::ESTALE);
                return;
            };
            match v.render(&node, &host) {
                Ok(data) => {
                    reply.opened(FileHandle(v.open_file(data)), FopenFlags::FOPEN_DIRECT_IO)
                }
                Err(e) => reply.error(errno(e)),
            }
        });
        None
    }

    /// A generated file is always ready, like a regular file. (An error here would read as
    /// EPOLLERR, and Go's runtime, which polls every file it opens, then fails its reads with
    /// "not pollable".)
    pub(super) fn syn_poll(
        &self,
        fh: u64,
        events: PollEvents,
        reply: ReplyPoll,
    ) -> Option<ReplyPoll> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        let ready = (libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32;
        reply.poll(PollEvents::from_bits_retain(events.bits() & ready));
        None
    }

    pub(super) fn syn_read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) -> Option<ReplyData> {
        if !is_syn_fh(fh) {
            return Some(reply);
        }
        match self.view().map(|v| v.read(fh, offset, size)) {
            Some(Ok(d)) => reply.data(&d),
            Some(Err(e)) => reply.error(errno(e)),
            None => reply.error(Errno::EBADF),
        }
        None
    }
}

impl Inner {
    /// The HOST's `/proc/1/mountinfo`, read through this (proc) mount's source; reused for
    /// [`procview::HOST_MOUNTS_TTL`].
    pub(super) async fn host_mountinfo(self: &Arc<Self>) -> R<Arc<String>> {
        let Some(v) = self.proc_view.as_ref() else {
            return Err(OpError::Errno(libc::EINVAL));
        };
        if let Some(s) = v.cached_host_mounts() {
            return Ok(s);
        }
        // Bounded: a management plane reads its mountinfo often, and an outage must not stall
        // each read for the mount's whole timeout. The last table fetched stands in meanwhile.
        let fetch = self.with(|| async { self.read_host_file(&[b"1", b"mountinfo"]).await });
        match tokio::time::timeout(procview::HOST_MOUNTS_WAIT, fetch).await {
            Ok(Ok(text)) => {
                let s = Arc::new(String::from_utf8_lossy(&text).into_owned());
                v.store_host_mounts(s.clone());
                Ok(s)
            }
            Ok(Err(e)) => v.last_host_mounts().ok_or(e),
            Err(_) => v.last_host_mounts().ok_or(OpError::Errno(libc::ETIMEDOUT)),
        }
    }

    /// Reads the HOST file at `path` (components below the mount's root) to its end without
    /// involving the kernel's view of the mount; every reference taken is dropped again.
    pub(super) async fn read_host_file(self: &Arc<Self>, path: &[&[u8]]) -> R<Vec<u8>> {
        const LIMIT: usize = 16 << 20;
        let mut node = self.node_of(ROOT).await?;
        let mut taken: Vec<(NodeId, u64)> = Vec::new();
        let res = async {
            for name in path {
                let e = self
                    .call(op::Lookup {
                        parent: node,
                        name: name.to_vec(),
                    })
                    .await?;
                taken.push((e.node, 1));
                node = e.node;
            }
            let open = op::Open {
                node,
                flags: libc::O_RDONLY,
            };
            let fh = self.call(open).await?.fh;
            let mut out = Vec::new();
            let read = async {
                loop {
                    let read = op::Read {
                        fh,
                        offset: out.len() as u64,
                        size: 64 << 10,
                    };
                    let (_, d) = self.call_data(read).await?;
                    if d.is_empty() || out.len() + d.len() > LIMIT {
                        return Ok(());
                    }
                    out.extend_from_slice(&d);
                }
            }
            .await;
            let _ = self
                .call(op::Release {
                    fh,
                    lock_owner: None,
                })
                .await;
            read.map(|()| out)
        }
        .await;
        if !taken.is_empty() && res != Err(OpError::Stale) {
            let _ = self.call(op::Forget { nodes: taken }).await;
        }
        res
    }
}
