//! Attributes the HOST just sent (NFS's post-op attributes) and xattrs known absent: what the
//! kernel may be told again without a round trip (see the module docs of `client`).

use super::*;

impl Inner {
    pub(super) fn xattr_known_absent(&self, ino: u64, name: &[u8]) -> bool {
        let cache = lock(&self.no_xattr);
        let now = Instant::now();
        let fresh = |k: (u64, Vec<u8>)| cache.get(&k).is_some_and(|until| now < *until);
        fresh((ino, Vec::new())) || fresh((ino, name.to_vec()))
    }

    /// The change sequence now; taken before a request whose reply carries attributes.
    pub(super) fn attr_seq(&self) -> u64 {
        self.st().seq
    }

    /// Records attributes just received from the HOST and handed to the kernel with the
    /// attribute TTL; `sent`: [`Inner::attr_seq`] before the request went out.
    pub(super) fn note_attr(&self, ino: u64, a: &Attr, sent: u64) {
        if let Some(n) = self.st().inodes.get_mut(&ino) {
            n.attr = Some((*a, Instant::now(), sent));
            n.local = false;
        }
        self.note_xattrs(ino, a);
    }

    /// Marks the recorded attributes of `ino`: an operation changed them (size, times,
    /// link count) and the HOST did not say how.
    pub(super) fn stale_attr(&self, ino: u64) {
        let mut st = self.st();
        st.seq += 1;
        let seq = st.seq;
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.stale_at = seq;
        }
    }

    /// Forgets every recorded attribute: after removals and renames, whose effect on other
    /// inodes (link counts, ctime) the HOST does not report.
    pub(super) fn stale_all_attrs(&self) {
        let mut st = self.st();
        st.seq += 1;
        st.removal_at = st.seq;
    }

    /// Attributes the kernel may be given again without asking the HOST, with their remaining
    /// lifetime: received less than one attribute TTL ago, and nothing this mount did since has
    /// changed them. The kernel drops its own copy after every change it makes (a create in a
    /// directory, a write, a `chown`'s suid check right after a `utimes`), and re-reading
    /// attributes the HOST has just sent would cost a round trip each (two per file when a tree
    /// is unpacked). HOST-side changes show up after the same bound as the kernel's own cache.
    /// "Nothing since" is judged from when the request was sent, so a reply that overtook
    /// a change in this mount (a write acknowledged while a getattr was in flight) is not reused.
    ///
    /// Writes still in flight do not matter: the HOST applies calls in arrival order, so a
    /// reply to a request sent after a write has seen it.
    ///
    /// Attributes worked out here for an asynchronous operation are handed out with TTL 0 and
    /// only while an operation on the node is in flight; then the HOST is asked.
    pub(super) fn fresh_attr(&self, ino: u64) -> Option<(Attr, Duration)> {
        let (a, left, local) = self.known_attr(ino)?;
        if !local {
            return Some((a, left));
        }
        let busy = self
            .unstable_map()
            .get(&ino)
            .is_some_and(|u| u.lock().0 > 0);
        busy.then_some((a, Duration::ZERO))
    }

    /// The recorded attributes of `ino` if nothing since changed them (see
    /// [`Inner::fresh_attr`]), with their remaining lifetime and whether they were worked out
    /// here.
    pub(super) fn known_attr(&self, ino: u64) -> Option<(Attr, Duration, bool)> {
        if self.ttl().is_zero() {
            return None;
        }
        let (a, at, sent, local) = {
            let st = self.st();
            if st.resending > 0 {
                return None;
            }
            let n = st.inodes.get(&ino)?;
            let (a, at, sent) = n.attr?;
            if sent < n.stale_at || sent < st.removal_at {
                return None;
            }
            (a, at, sent, n.local)
        };
        let ttl = self.attr_ttl(ino, &a, sent);
        let left = ttl.checked_sub(at.elapsed())?;
        (!left.is_zero()).then_some((a, left, local))
    }

    pub(super) fn begin_resend(&self) {
        self.st().resending += 1;
    }

    pub(super) fn end_resend(&self, ino: u64) {
        self.st().resending -= 1;
        self.stale_attr(ino);
    }

    /// Records what fresh attributes say: an inode with no xattrs at all answers every xattr
    /// probe here for one attribute TTL (the empty name stands for all names).
    pub(super) fn note_xattrs(&self, ino: u64, a: &Attr) {
        if a.xattrs {
            let mut cache = lock(&self.no_xattr);
            cache.remove(&(ino, Vec::new()));
        } else {
            self.remember_no_xattr(ino, Vec::new());
        }
    }

    pub(super) fn remember_no_xattr(&self, ino: u64, name: Vec<u8>) {
        let ttl = self.xattr_ttl(ino);
        if ttl.is_zero() {
            return;
        }
        let mut cache = lock(&self.no_xattr);
        if cache.len() > 65536 {
            let now = Instant::now();
            cache.retain(|_, until| *until > now);
            if cache.len() > 65536 {
                cache.clear();
            }
        }
        cache.insert((ino, name), Instant::now() + ttl);
    }

    pub(super) fn forget_xattrs(&self, ino: u64) {
        self.stale_attr(ino);
        let mut cache = lock(&self.no_xattr);
        cache.retain(|(i, _), _| *i != ino);
    }
}
