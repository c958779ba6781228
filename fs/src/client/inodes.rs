//! This mount's inodes and handles: FUSE inode numbers mapped to the HOST's node ids of the
//! current server instance, re-resolved by name (parent, name) after a HOST restart; names
//! made in directories this mount created (`negative_timeout`).

use super::*;

impl Inner {
    /// The current server node of an inode, re-resolving it by name after a restart.
    pub(super) fn node_of<'a>(
        self: &'a Arc<Self>,
        ino: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = R<NodeId>> + Send + 'a>> {
        Box::pin(async move {
            if self.stale_epoch(ino) {
                // Made asynchronously and not answered yet: its creation is replayed first.
                self.wait_created(ino).await;
            }
            let (parent, name) = {
                let st = self.st();
                let n = st.inodes.get(&ino).ok_or(libc::ESTALE)?;
                if n.epoch == st.epoch {
                    return Ok(n.node);
                }
                if ino == ROOT {
                    return Err(OpError::Stale);
                }
                (n.parent, n.name.clone())
            };
            let pnode = self.node_of(parent).await?;
            let e = self
                .call(op::Lookup {
                    parent: pnode,
                    name,
                })
                .await?;
            let mut st = self.st();
            let epoch = st.epoch;
            if let Some(n) = st.inodes.get_mut(&ino) {
                if n.epoch != epoch {
                    n.node = e.node;
                    n.real = None;
                    n.epoch = epoch;
                    n.server_lookups = 1;
                } else {
                    n.server_lookups += 1;
                }
            }
            st.by_node.insert(e.node, ino);
            Ok(e.node)
        })
    }

    /// The current server handle of an open file, re-opening it after a restart.
    pub(super) async fn fh_of(self: &Arc<Self>, fh: u64) -> R<Fh> {
        let ino = {
            let st = self.st();
            let h = st.handles.get(&fh).ok_or(libc::EBADF)?;
            if h.epoch == st.epoch {
                return Ok(h.fh);
            }
            h.ino
        };
        // A create's handle is made again by the replay of the create.
        self.wait_created(ino).await;
        let (ino, flags, dir) = {
            let st = self.st();
            let h = st.handles.get(&fh).ok_or(libc::EBADF)?;
            if h.epoch == st.epoch {
                return Ok(h.fh);
            }
            (h.ino, h.flags, h.dir)
        };
        let node = self.node_of(ino).await?;
        let opened = if dir {
            self.call(op::OpenDir { node }).await?
        } else {
            let flags = flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
            self.call(op::Open { node, flags }).await?
        };
        let sfh = opened.fh;
        let mut st = self.st();
        let epoch = st.epoch;
        if let Some(h) = st.handles.get_mut(&fh) {
            h.fh = sfh;
            h.epoch = epoch;
        }
        debug!(fh, "re-opened handle after HOST restart");
        Ok(sfh)
    }

    /// Records an entry the server returned for `parent/name`: one kernel lookup reference.
    /// `sent`: [`Inner::attr_seq`] before the request went out.
    pub(super) fn add_entry(&self, parent: u64, name: &[u8], e: &Entry, sent: u64) -> u64 {
        let mut st = self.st();
        let epoch = st.epoch;
        if let Some(&ino) = st.by_node.get(&e.node) {
            if let Some(n) = st.inodes.get_mut(&ino) {
                n.kernel_lookups += 1;
                n.server_lookups += 1;
                n.fifo = is_fifo(e.attr.mode);
                n.attr = Some((e.attr, Instant::now(), sent));
                n.local = false;
                if ino != ROOT {
                    Inner::set_name(&mut st, ino, parent, name);
                }
                drop(st);
                self.note_xattrs(ino, &e.attr);
                return ino;
            }
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(
            ino,
            Inode {
                kernel_lookups: 1,
                parent,
                name: name.to_vec(),
                node: e.node,
                epoch,
                server_lookups: 1,
                fifo: is_fifo(e.attr.mode),
                attr: Some((e.attr, Instant::now(), sent)),
                stale_at: 0,
                real: None,
                local: false,
                pins: 0,
            },
        );
        st.by_node.insert(e.node, ino);
        Inner::set_name(&mut st, ino, parent, name);
        drop(st);
        self.note_xattrs(ino, &e.attr);
        ino
    }

    /// Drops `n` kernel references; forgets the server node when none remain.
    pub(super) fn forget(self: &Arc<Self>, ino: u64, n: u64) {
        if ino == ROOT || is_syn_ino(ino) {
            return;
        }
        let release = {
            let mut st = self.st();
            match st.inodes.get_mut(&ino) {
                Some(i) => i.kernel_lookups = i.kernel_lookups.saturating_sub(n),
                None => return,
            }
            self.release_unused(&mut st, ino)
        };
        self.forget_node(release);
    }

    /// Keeps each inode of `inos`, and the directories above it, in the table while an
    /// asynchronous operation naming it is in flight (see [`Inode::pins`]): after a HOST
    /// restart it is re-resolved by name through its parents, which the kernel may have
    /// forgotten meanwhile (their entries invalidated when the change feed came back).
    /// Returns what was pinned, for [`Inner::unpin`] (the parents then, not after a rename).
    pub(super) fn pin(&self, inos: &[u64]) -> Vec<u64> {
        let mut st = self.st();
        let mut pinned = Vec::with_capacity(inos.len() + 4);
        for &i in inos {
            let mut cur = i;
            // A chain longer than the table is a cycle (it cannot be); stop there.
            for _ in 0..=st.inodes.len() {
                let Some(n) = st.inodes.get_mut(&cur) else {
                    break;
                };
                n.pins += 1;
                pinned.push(cur);
                if cur == ROOT {
                    break;
                }
                cur = n.parent;
            }
        }
        pinned
    }

    /// The asynchronous operation that pinned `inos` is done: an inode the kernel forgot
    /// meanwhile is forgotten now.
    pub(super) fn unpin(self: &Arc<Self>, inos: &[u64]) {
        for &ino in inos {
            let release = {
                let mut st = self.st();
                match st.inodes.get_mut(&ino) {
                    Some(n) => n.pins = n.pins.saturating_sub(1),
                    None => continue,
                }
                self.release_unused(&mut st, ino)
            };
            self.forget_node(release);
        }
    }

    /// Removes `ino` from the table when neither the kernel nor an operation in flight uses
    /// it; the HOST node and lookup count to forget there, if it is of this server instance.
    fn release_unused(&self, st: &mut State, ino: u64) -> Option<(NodeId, u64)> {
        if ino == ROOT {
            return None;
        }
        let epoch = st.epoch;
        let i = st.inodes.get(&ino)?;
        if i.kernel_lookups > 0 || i.pins > 0 {
            return None;
        }
        if let Some(c) = self.fifos.armed().get(&ino) {
            c.stop();
        }
        st.excl.remove(&ino);
        let i = st.inodes.remove(&ino)?;
        Inner::unname(st, ino, i.parent, &i.name);
        if i.epoch != epoch {
            return None;
        }
        if st.by_node.get(&i.node) == Some(&ino) {
            st.by_node.remove(&i.node);
        }
        if let Some(real) = i.real {
            if st.by_node.get(&real) == Some(&ino) {
                st.by_node.remove(&real);
            }
        }
        Some((i.node, i.server_lookups))
    }

    /// Tells the HOST that this mount no longer uses `node` (`count` lookups).
    fn forget_node(self: &Arc<Self>, release: Option<(NodeId, u64)>) {
        if let Some((node, count)) = release {
            let me = self.clone();
            self.rt.spawn(async move {
                // Best effort: a lost forget only keeps an O_PATH fd open on the HOST.
                let _ = me
                    .call(op::Forget {
                        nodes: vec![(node, count)],
                    })
                    .await;
            });
        }
    }

    pub(super) fn new_handle(&self, ino: u64, flags: i32, dir: bool, fh: Fh) -> u64 {
        // Failures of writes before this open are not this handle's to report.
        let err_seen = self.write_failures(ino);
        let mut st = self.st();
        let id = st.next_fh;
        st.next_fh += 1;
        let epoch = st.epoch;
        st.handles.insert(
            id,
            Handle {
                ino,
                flags,
                dir,
                fh,
                epoch,
                append_end: None,
                err_seen,
            },
        );
        id
    }

    /// True when `ino`'s HOST node is from an earlier server instance (to be re-resolved).
    pub(super) fn stale_epoch(&self, ino: u64) -> bool {
        let st = self.st();
        st.inodes.get(&ino).is_some_and(|n| n.epoch != st.epoch)
    }

    pub(super) fn is_fifo_ino(&self, ino: u64) -> bool {
        self.st().inodes.get(&ino).is_some_and(|i| i.fifo)
    }

    /// The path of `ino` below the mount root, from the names this mount knows.
    pub(super) fn rel_path(&self, ino: u64) -> Option<PathBuf> {
        let st = self.st();
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = st.inodes.get(&cur)?;
            if parts.len() > 4096 || n.name.is_empty() {
                return None;
            }
            parts.push(&n.name);
            cur = n.parent;
        }
        let mut p = PathBuf::new();
        for c in parts.iter().rev() {
            p.push(OsStr::from_bytes(c));
        }
        Some(p)
    }

    /// Records what an operation that made `dir/name` returned about `dir`.
    pub(super) fn made_in(&self, dir: u64, name: &[u8], dir_attr: &Attr, sent: u64) {
        self.note_attr(dir, dir_attr, sent);
        self.note_new_name(dir, name);
    }

    /// Sends an operation that makes a name in directory `dir` (mkdir, mknod, symlink, link):
    /// the new entry and the directory's attributes after it.
    pub(super) async fn make<O: Operation<Reply = proto::Made>>(
        &self,
        dir: u64,
        op: O,
    ) -> R<(Entry, Attr)> {
        let made = self.call(op).await.map_err(|e| self.make_failed(dir, e))?;
        Ok((made.entry, made.parent))
    }

    /// An operation making a name in `dir` failed with `e`: EEXIST means the directory holds
    /// a name this mount did not make, so it is no longer "known to hold only ours".
    pub(super) fn make_failed(&self, dir: u64, e: OpError) -> OpError {
        if e == OpError::Errno(libc::EEXIST) {
            self.foreign_change(dir);
        }
        e
    }

    /// Starts tracking a directory this mount just made (see [`NewDir`]).
    pub(super) fn note_new_dir(&self, ino: u64) {
        let ttl = self.new_dir_ttl(ino);
        if ttl.is_zero() {
            return;
        }
        let mut st = self.st();
        if st.new_dirs.len() >= 1024 {
            st.new_dirs.retain(|_, d| d.made.elapsed() < ttl);
        }
        st.new_dirs.insert(
            ino,
            NewDir {
                made: Instant::now(),
                names: HashSet::new(),
            },
        );
    }

    /// Records that `name` now exists in `dir`, if `dir` is a tracked new directory.
    pub(super) fn note_new_name(&self, dir: u64, name: &[u8]) {
        let ttl = self.new_dir_ttl(dir);
        let mut st = self.st();
        let drop_it = match st.new_dirs.get_mut(&dir) {
            None => return,
            Some(d) if d.made.elapsed() >= ttl || d.names.len() >= NEW_DIR_MAX_NAMES => true,
            Some(d) => {
                d.names.insert(name.to_vec());
                false
            }
        };
        if drop_it {
            st.new_dirs.remove(&dir);
        }
    }

    /// True when `dir/name` is taken not to exist: `dir` was made by this mount less than
    /// `negative_timeout` ago and `name` was never made in it.
    pub(super) fn known_absent(&self, dir: u64, name: &[u8]) -> bool {
        let ttl = self.new_dir_ttl(dir);
        let mut st = self.st();
        let Some(d) = st.new_dirs.get(&dir) else {
            return false;
        };
        if d.made.elapsed() >= ttl {
            st.new_dirs.remove(&dir);
            return false;
        }
        !d.names.contains(name)
    }
}
