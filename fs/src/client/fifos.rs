//! FIFO tunnels of one mount (see [`crate::fifo`]): arming on lookups and getattrs, and the
//! DPU's ends, opened through this mount on the opener thread.

use super::*;

/// Most FIFO tunnels armed at once per mount (each is one stream of the session).
pub(super) const MAX_TUNNELS: usize = 1024;

/// The FIFO tunnels of one mount (see [`crate::fifo`]).
#[derive(Default)]
pub(super) struct Fifos {
    /// Where this mount is, as this process sees it (set by [`QtfsFs::mount`]).
    pub(super) mountpoint: std::sync::OnceLock<PathBuf>,
    /// Runs this daemon's opens of FIFOs through the mount; started with the first tunnel.
    pub(super) opener: std::sync::OnceLock<Option<Arc<fifo::Opener>>>,
    /// Armed tunnels by inode.
    pub(super) armed: Mutex<HashMap<u64, Arc<fifo::Control>>>,
}

impl Fifos {
    pub(super) fn armed(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<fifo::Control>>> {
        lock(&self.armed)
    }

    /// True for a request made by this daemon's own opener thread.
    pub(super) fn own(&self, pid: u32) -> bool {
        matches!(self.opener.get(), Some(Some(o)) if o.tid() == pid)
    }

    pub(super) fn opener(&self) -> Option<Arc<fifo::Opener>> {
        let mp = self.mountpoint.get()?.clone();
        self.opener
            .get_or_init(|| match fifo::Opener::start(mp) {
                Ok(o) => Some(Arc::new(o)),
                Err(e) => {
                    warn!(error = %e, "cannot start the FIFO opener thread; FIFOs stay local");
                    None
                }
            })
            .clone()
    }
}

impl Inner {
    /// A DPU process looks up, stats or opens FIFO `ino` (FUSE request from thread `pid`):
    /// arm its tunnel, or make an armed one probe at once. The daemon's own requests are not
    /// hints (they would kick the tunnel in a loop).
    pub(super) fn fifo_hint(self: &Arc<Self>, ino: u64, pid: u32) {
        if self.opts.pseudo() || self.fifos.own(pid) || self.fifos.mountpoint.get().is_none() {
            return;
        }
        let (node, instance) = {
            let st = self.st();
            match st.inodes.get(&ino) {
                Some(n) if n.fifo && n.epoch == st.epoch => (n.node, st.instance),
                _ => return,
            }
        };
        let ctl = {
            let mut armed = self.fifos.armed();
            if let Some(c) = armed.get(&ino) {
                c.kick();
                return;
            }
            if armed.len() >= MAX_TUNNELS {
                warn!(
                    ino,
                    "too many FIFO tunnels; this FIFO stays local to the DPU"
                );
                return;
            }
            let c = Arc::new(fifo::Control::default());
            armed.insert(ino, c.clone());
            c
        };
        // The tunnel keeps its inode (and the HOST node) while it lives: the kernel forgets a
        // FIFO's inode as soon as its last opener is done (entries have TTL 0), and the next
        // lookup must find the same inode, or this tunnel's own opens would see another one
        // and end it in the middle of a HOST cycle.
        let pinned = self.pin(&[ino]);
        let me = self.clone();
        self.rt.spawn(async move {
            match me.fifo_tunnel(ino, node, instance, ctl.clone()).await {
                Ok(()) => debug!(ino, "fifo tunnel closed"),
                Err(e) => debug!(ino, error = %e, "fifo tunnel ended"),
            }
            {
                let mut armed = me.fifos.armed();
                if armed.get(&ino).is_some_and(|c| Arc::ptr_eq(c, &ctl)) {
                    armed.remove(&ino);
                }
            }
            me.unpin(&pinned);
        });
    }

    pub(super) async fn fifo_tunnel(
        self: &Arc<Self>,
        ino: u64,
        node: NodeId,
        instance: u64,
        ctl: Arc<fifo::Control>,
    ) -> Result<(), fifo::TunnelError> {
        let Some(opener) = self.fifos.opener() else {
            return Ok(());
        };
        let session = self
            .client
            .session()
            .await
            .map_err(|e| fifo::TunnelError::Io(std::io::Error::other(e.to_string())))?;
        let header = fifo::encode_header(&fifo::TunnelHeader { instance, node });
        let stream = session
            .open_stream("fs", header)
            .await
            .map_err(|e| fifo::TunnelError::Io(std::io::Error::other(e.to_string())))?;
        debug!(ino, node, "fifo tunnel armed");
        let ends = DpuEnds {
            inner: self.clone(),
            opener,
            ino,
            node_fd: None,
            rel: None,
        };
        fifo::run(fifo::Side::Dpu, ends, stream, ctl).await
    }

    /// `parent/name` was unlinked through this mount: an armed tunnel of that FIFO ends once
    /// no cycle runs (its DPU openers, if any, keep their pipe).
    pub(super) fn fifo_unlinked(&self, parent: u64, name: &[u8]) {
        let st = self.st();
        let armed = self.fifos.armed();
        for (ino, c) in armed.iter() {
            if st
                .inodes
                .get(ino)
                .is_some_and(|i| i.parent == parent && i.name == name)
            {
                c.stop();
            }
        }
    }
}

/// The DPU's side of a FIFO tunnel: opens through this mount, on the opener thread. Holds an
/// `O_PATH` descriptor of the FIFO only while the tunnel probes fast or runs a cycle.
pub(super) struct DpuEnds {
    pub(super) inner: Arc<Inner>,
    pub(super) opener: Arc<fifo::Opener>,
    pub(super) ino: u64,
    pub(super) node_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// The FIFO's path below the mount as last known: its directories may be forgotten by
    /// the kernel while the tunnel (which pins only the FIFO's inode) idles.
    pub(super) rel: Option<PathBuf>,
}

impl DpuEnds {
    async fn open(&mut self, flags: i32) -> Result<std::os::fd::OwnedFd, i32> {
        let fd = match &self.node_fd {
            Some(fd) => fd.clone(),
            None => {
                let rel = self
                    .inner
                    .rel_path(self.ino)
                    .or_else(|| self.rel.clone())
                    .ok_or(libc::ESTALE)?;
                self.rel = Some(rel.clone());
                let ino = self.ino;
                let fd = self
                    .opener
                    .run(move |r| r.open_node(&rel, ino))
                    .await
                    .ok_or(libc::EIO)??;
                let fd = Arc::new(fd);
                self.node_fd = Some(fd.clone());
                fd
            }
        };
        self.opener
            .run(move |_| {
                use std::os::fd::AsRawFd;
                crate::sys::reopen(fd.as_raw_fd(), flags | libc::O_NONBLOCK)
            })
            .await
            .ok_or(libc::EIO)?
    }
}

#[async_trait::async_trait]
impl fifo::Ends for DpuEnds {
    async fn probe(&mut self) -> Result<Option<std::os::fd::OwnedFd>, i32> {
        match self.open(libc::O_WRONLY).await {
            Ok(fd) => Ok(Some(fd)),
            Err(libc::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn reader(&mut self) -> Result<std::os::fd::OwnedFd, i32> {
        self.open(libc::O_RDONLY).await
    }

    fn rest(&mut self) {
        self.node_fd = None;
    }
}
