//! Coherent caching pushed by the HOST: the mount's change feed ([`crate::notify`]) and the
//! cache lifetimes it allows.
//!
//! While the feed is up and the HOST watches a directory, entries in it (positive and
//! negative) and its children's attributes are handed to the kernel with the long
//! `coherent_ttl` (60 s by default) and open files keep their page cache; a HOST-side change
//! arrives as a [`Change`] and is turned into FUSE invalidations (`inval_entry`,
//! `inval_inode`) within milliseconds. Without the feed (an old or unprivileged HOST, a
//! directory on a filesystem the HOST cannot watch, the feed lost) the short `attr_timeout`/
//! `entry_timeout` apply as before, and losing the feed drops everything cached.
//!
//! One race is closed explicitly: a reply that left the HOST before a change but reaches the
//! kernel after its invalidation would be cached for the long lifetime. Every change bumps the
//! mount's change sequence, and a reply to a request sent before the latest change gets the
//! short lifetime.
//!
//! Invalidations are written to `/dev/fuse` by one thread of their own: the kernel may hold a
//! directory's lock while it waits for this daemon to answer another request in it, and a
//! notification blocks until that lock is free.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;

use super::*;
use crate::notify::{self, what, Change, Msg};

/// A kernel cache invalidation.
pub(super) enum Inval {
    /// The name `parent/name` (a positive or negative dentry).
    Entry(u64, Vec<u8>),
    /// An inode's attributes, and its cached pages when `data`.
    Inode(u64, bool),
}

/// A decision about the present rather than about a reply (no change can be newer).
const NOW: u64 = u64::MAX;

/// Which directory's watch covers what is cached.
#[derive(Clone, Copy)]
enum Watched {
    /// Entries in this directory.
    Dir(u64),
    /// Attributes and pages of this inode: its parent's watch reports them (the root's own
    /// watch for the root).
    ParentOf(u64),
}

/// The feed's state shared with the FUSE side.
#[derive(Default)]
pub(super) struct Feed {
    /// The HOST reports changes now.
    pub(super) live: AtomicBool,
    /// Directories the HOST cannot watch (FUSE inodes).
    pub(super) unwatched: Mutex<HashSet<u64>>,
    /// Where invalidations go (set once the mount is live).
    pub(super) tx: std::sync::OnceLock<Mutex<std_mpsc::Sender<Inval>>>,
    /// The first attempt at a feed is over (up, refused or failed): [`Inner::wait_feed`].
    settled: (Mutex<bool>, std::sync::Condvar),
}

impl Feed {
    fn settle(&self) {
        *lock(&self.settled.0) = true;
        self.settled.1.notify_all();
    }
}

impl Inner {
    /// Whether the long lifetime may be used for what a reply says, for a request sent at
    /// change sequence `sent` ([`NOW`] for a decision about the present): the feed is up, no
    /// change arrived since the request left, and the HOST watches the directory `w` names.
    fn coherent(&self, w: Watched, sent: u64) -> bool {
        if self.opts.coherent_ttl.is_zero() || self.opts.pseudo() {
            return false;
        }
        if !self.feed.live.load(Ordering::Acquire) {
            return false;
        }
        let dir = {
            let st = self.st();
            if sent < st.feed_at {
                return false;
            }
            match w {
                Watched::Dir(d) | Watched::ParentOf(d @ ROOT) => d,
                Watched::ParentOf(ino) => st.inodes.get(&ino).map(|i| i.parent).unwrap_or(0),
            }
        };
        !lock(&self.feed.unwatched).contains(&dir)
    }

    /// `coherent_ttl` when `coherent`, else `short`.
    fn lifetime(&self, coherent: bool, short: Duration) -> Duration {
        if coherent {
            self.opts.coherent_ttl
        } else {
            short
        }
    }

    /// Attribute lifetime of `ino` for a reply to a request sent at `sent`.
    pub(super) fn attr_ttl(&self, ino: u64, a: &Attr, sent: u64) -> Duration {
        if is_fifo(a.mode) {
            return Duration::ZERO;
        }
        self.lifetime(self.coherent(Watched::ParentOf(ino), sent), self.ttl())
    }

    /// Entry lifetime of a name in `dir` for a reply to a request sent at `sent`.
    pub(super) fn entry_ttl_in(&self, dir: u64, sent: u64) -> Duration {
        self.lifetime(self.coherent(Watched::Dir(dir), sent), self.entry_ttl())
    }

    /// How long the kernel may remember that `dir/name` does not exist (zero: not at all).
    pub(super) fn negative_ttl_in(&self, dir: u64, sent: u64) -> Duration {
        self.lifetime(self.coherent(Watched::Dir(dir), sent), Duration::ZERO)
    }

    /// How long a directory this mount made is taken to hold only the names it made there:
    /// `negative_timeout`, or the long lifetime while the HOST reports changes in it (a
    /// HOST-side create there ends it within milliseconds).
    pub(super) fn new_dir_ttl(&self, dir: u64) -> Duration {
        let pushed = self.lifetime(self.coherent(Watched::Dir(dir), NOW), Duration::ZERO);
        self.negative_ttl().max(pushed)
    }

    /// Whether the kernel may keep `dir`'s listing (the HOST reports names changing there).
    pub(super) fn cache_listing(&self, dir: u64) -> bool {
        self.coherent(Watched::Dir(dir), NOW)
    }

    /// How long "no such xattr" answers for `ino` may be reused.
    pub(super) fn xattr_ttl(&self, ino: u64) -> Duration {
        self.lifetime(self.coherent(Watched::ParentOf(ino), NOW), self.ttl())
    }

    /// Whether an open file of `ino` may keep its cached pages (the HOST reports writes).
    pub(super) fn keep_cache(&self, ino: u64) -> bool {
        self.coherent(Watched::ParentOf(ino), NOW)
    }

    /// Records that `ino` is now known as `parent/name` (the index the feed's names are
    /// resolved with).
    pub(super) fn set_name(st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        if let Some(i) = st.inodes.get_mut(&ino) {
            if i.parent == parent && i.name == name {
                st.names.insert((parent, name.to_vec()), ino);
                return;
            }
            let old = (i.parent, std::mem::replace(&mut i.name, name.to_vec()));
            i.parent = parent;
            if st.names.get(&old) == Some(&ino) {
                st.names.remove(&old);
            }
        }
        st.names.insert((parent, name.to_vec()), ino);
    }

    /// Drops `ino` from the name index.
    pub(super) fn unname(st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if st.names.get(&key) == Some(&ino) {
            st.names.remove(&key);
        }
    }

    /// A change arrived (or may have been missed): replies to requests sent before now get the
    /// short lifetime. The new change sequence.
    fn changed(st: &mut State) -> u64 {
        st.seq += 1;
        st.feed_at = st.seq;
        st.seq
    }

    fn inval(&self, v: Vec<Inval>) {
        if v.is_empty() {
            return;
        }
        if let Some(tx) = self.feed.tx.get() {
            let tx = lock(tx);
            for i in v {
                let _ = tx.send(i);
            }
        }
    }

    /// Applies a batch of HOST-side changes: forget what this mount recorded, then have the
    /// kernel drop its copies.
    fn apply(&self, changes: Vec<Change>) {
        let mut out = Vec::new();
        let mut foreign = Vec::new();
        let mut xattrs = Vec::new();
        {
            let mut st = self.st();
            let seq = Inner::changed(&mut st);
            for c in changes {
                let Some(&dir) = st.by_node.get(&c.dir) else {
                    continue;
                };
                match c.name {
                    Some(name) => {
                        let child = st.names.get(&(dir, name.clone())).copied();
                        if c.what & what::NAME != 0 {
                            foreign.push(dir);
                            if let Some(d) = st.inodes.get_mut(&dir) {
                                d.stale_at = seq;
                            }
                            out.push(Inval::Entry(dir, name));
                            // Its cached listing too.
                            out.push(Inval::Inode(dir, true));
                        }
                        if let Some(child) = child {
                            if let Some(i) = st.inodes.get_mut(&child) {
                                i.stale_at = seq;
                            }
                            if c.what & what::ATTR != 0 {
                                xattrs.push(child);
                            }
                            out.push(Inval::Inode(child, c.what & what::DATA != 0));
                        }
                    }
                    None => {
                        if let Some(d) = st.inodes.get_mut(&dir) {
                            d.stale_at = seq;
                        }
                        out.push(Inval::Inode(dir, false));
                        if c.what & what::GONE != 0 && dir != ROOT {
                            if let Some(i) = st.inodes.get(&dir) {
                                out.push(Inval::Entry(i.parent, i.name.clone()));
                            }
                        }
                    }
                }
            }
        }
        if !xattrs.is_empty() {
            // An xattr change is an attribute change: forget the "has none" answers.
            let mut cache = lock(&self.no_xattr);
            cache.retain(|(i, _), _| !xattrs.contains(i));
        }
        foreign.sort_unstable();
        foreign.dedup();
        for d in foreign {
            self.foreign_change(d);
        }
        self.inval(out);
    }

    /// Everything cached may be stale (the feed was lost or overflowed): drop it all.
    fn drop_all(&self) {
        let out = {
            let mut st = self.st();
            st.removal_at = Inner::changed(&mut st);
            st.new_dirs.clear();
            lock(&self.no_xattr).clear();
            // Changes while the feed was down are unknown: no directory is known whole.
            st.excl.clear();
            let mut out: Vec<Inval> = st
                .names
                .keys()
                .map(|(p, n)| Inval::Entry(*p, n.clone()))
                .collect();
            out.extend(st.inodes.keys().map(|i| Inval::Inode(*i, true)));
            out
        };
        self.inval(out);
    }

    /// Directories the HOST cannot watch: short lifetimes there from now on, and what was
    /// cached about their entries is dropped.
    fn unwatched(&self, nodes: Vec<NodeId>) {
        let dirs: Vec<u64> = {
            let st = self.st();
            nodes
                .iter()
                .filter_map(|n| st.by_node.get(n).copied())
                .collect()
        };
        lock(&self.feed.unwatched).extend(dirs.iter().copied());
        let out = {
            let mut st = self.st();
            Inner::changed(&mut st);
            let mut out = Vec::new();
            for ((p, n), ino) in st.names.iter() {
                if dirs.contains(p) {
                    out.push(Inval::Entry(*p, n.clone()));
                    out.push(Inval::Inode(*ino, true));
                }
            }
            out
        };
        self.inval(out);
    }

    /// [`REFRESH_XATTR`] on `dir`, or an asynchronous operation there failed: what this mount
    /// assumed about the directory's contents ends now (it is no longer "made here, holding
    /// only our names"), and the kernel's entries below it are dropped.
    pub(super) fn refresh_dir(&self, dir: u64) {
        self.foreign_change(dir);
        let out = {
            let mut st = self.st();
            Inner::changed(&mut st);
            let mut out: Vec<Inval> = st
                .names
                .iter()
                .filter(|((p, _), _)| *p == dir)
                .map(|((p, n), _)| Inval::Entry(*p, n.clone()))
                .collect();
            out.push(Inval::Inode(dir, true));
            out
        };
        self.inval(out);
    }

    // `foreign_change(dir)` (this directory changed behind the mount's back) is in
    // `async_ops`: it also ends the mount's exclusive knowledge there.

    /// Starts the change feed of a live mount: the invalidation thread and the task that keeps
    /// a feed open across lost sessions and HOST restarts.
    pub(super) fn start_feed(self: &Arc<Self>, notifier: fuser::Notifier) {
        if self.opts.coherent_ttl.is_zero() || self.opts.pseudo() {
            self.feed.settle();
            return;
        }
        let (tx, rx) = std_mpsc::channel::<Inval>();
        if self.feed.tx.set(Mutex::new(tx)).is_err() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("qtfs-inval".into())
            .spawn(move || {
                while let Ok(i) = rx.recv() {
                    // ENOENT: the kernel has nothing cached for it, which is fine.
                    let _ = match i {
                        Inval::Entry(p, n) => {
                            notifier.inval_entry(INodeNo(p), OsStr::from_bytes(&n))
                        }
                        Inval::Inode(ino, data) => {
                            notifier.inval_inode(INodeNo(ino), if data { 0 } else { -1 }, 0)
                        }
                    };
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the invalidation thread: short cache lifetimes");
            self.feed.settle();
            return;
        }
        let me = Arc::downgrade(self);
        self.rt.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let Some(inner) = me.upgrade() else { return };
                let started = Instant::now();
                let r = inner.feed_once().await;
                inner.feed.settle();
                if inner.feed.live.swap(false, Ordering::AcqRel) {
                    inner.drop_all();
                }
                match r {
                    Ok(false) => {
                        info!("the HOST does not report changes: short cache lifetimes");
                        return;
                    }
                    Ok(true) => debug!("change feed ended"),
                    Err(e) => debug!(error = %e, "change feed lost"),
                }
                if started.elapsed() > Duration::from_secs(5) {
                    backoff = Duration::from_millis(50);
                }
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Waits (at most `max`) until the first attempt at a change feed is over, so a mount is
    /// coherent from the moment it is reported: a feed coming up later drops what was
    /// cached, and with it the exclusive knowledge of directories made meanwhile (their
    /// operations would turn synchronous for no reason a user could see).
    pub(super) fn wait_feed(&self, max: Duration) {
        let (m, cv) = &self.feed.settled;
        let g = lock(m);
        let (g, timeout) = cv
            .wait_timeout_while(g, max, |settled| !*settled)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && !*g {
            debug!(?max, "change feed not up yet; mounted without it");
        }
    }

    /// One feed until it ends. `Ok(false)`: the HOST cannot watch (do not ask again).
    async fn feed_once(self: &Arc<Self>) -> Result<bool, notify::FeedError> {
        let io = |e: transport::SessionError| {
            notify::FeedError::Io(std::io::Error::other(e.to_string()))
        };
        let session = self.client.session().await.map_err(io)?;
        let instance = self.st().instance;
        let header = notify::encode_header(&notify::FeedHeader { instance });
        let mut stream = session
            .open_stream("fs", header)
            .await
            .map_err(|e| notify::FeedError::Io(std::io::Error::other(e.to_string())))?;
        match notify::read_msg(&mut stream).await? {
            Some(Msg::Ready { watching: true }) => {}
            Some(Msg::Ready { watching: false }) => return Ok(false),
            _ => return Err(notify::FeedError::Malformed),
        }
        // The HOST watches from now on. What was cached before (under the short lifetimes) may
        // have missed a change made before the watch began: drop it; replies to requests sent
        // before now get the short lifetime.
        lock(&self.feed.unwatched).clear();
        self.feed.live.store(true, Ordering::Release);
        self.drop_all();
        self.feed.settle();
        debug!("change feed up");
        loop {
            match notify::read_msg(&mut stream).await? {
                None => return Ok(true),
                Some(Msg::Changes(c)) => self.apply(c),
                Some(Msg::Unwatched(n)) => self.unwatched(n),
                Some(Msg::Reset) => self.drop_all(),
                Some(Msg::Ready { .. }) => return Err(notify::FeedError::Malformed),
            }
        }
    }
}
