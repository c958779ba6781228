//! Change notification for watched directories: inotify where possible, periodic rescans always.
//! Callers rescan the directory on every wake-up, so a missed or overflowed event only delays a
//! change until the next rescan instead of losing it.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Wakes up when something changes in a set of directories (or when the rescan period ends).
pub(crate) struct DirWatcher {
    fd: Option<AsyncFd<InotifyFd>>,
    period: Duration,
}

const FLAGS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_ATTRIB);

impl DirWatcher {
    /// A watcher with rescan period `period`; falls back to pure polling when inotify is
    /// unavailable (logged once).
    pub(crate) fn new(period: Duration) -> DirWatcher {
        let fd = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(std::io::Error::from)
            .and_then(|i| {
                // SAFETY: InotifyFd owns the fd and returns the same one until dropped.
                unsafe { AsyncFd::register(InotifyFd(i)) }.map_err(|e| e.into_parts().1)
            }) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; watching directories by polling");
                None
            }
        };
        DirWatcher { fd, period }
    }

    /// Watches `dir` (idempotent). Returns false when the directory cannot be watched yet
    /// (e.g. it does not exist); the caller retries on the next rescan.
    pub(crate) fn watch(&self, dir: &Path) -> bool {
        match &self.fd {
            Some(fd) => fd.get_ref().0.add_watch(dir, FLAGS).is_ok(),
            None => dir.is_dir(),
        }
    }

    /// Waits for a change or the rescan period, whichever comes first.
    pub(crate) async fn changed(&mut self) {
        let period = self.period;
        let Some(fd) = &self.fd else {
            tokio::time::sleep(period.min(Duration::from_millis(200))).await;
            return;
        };
        let wait = async {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    std::future::pending::<()>().await;
                    return;
                };
                // Drain all queued events; their content does not matter (we rescan).
                match guard.try_io(|inner| {
                    inner
                        .get_ref()
                        .0
                        .read_events()
                        .map_err(std::io::Error::from)
                }) {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Ok(Err(_)) => return,
                    Err(_would_block) => continue,
                }
            }
        };
        let _ = tokio::time::timeout(period, wait).await;
        // Coalesce bursts (a shim creating its socket, containerd creating 3 FIFOs).
        if let Some(fd) = &self.fd {
            while let Ok(Ok(mut g)) =
                tokio::time::timeout(Duration::from_millis(2), fd.readable()).await
            {
                let _ = g.try_io(|i| i.get_ref().0.read_events().map_err(std::io::Error::from));
            }
        }
    }
}

/// Name prefix of the bridge's own half-made listeners (bound, not yet renamed into place);
/// never mirrored.
pub(crate) const TMP_PREFIX: &str = ".sbtmp";

/// Entries of `dir` whose file type satisfies `pred` (missing dir → empty), skipping the
/// bridge's temporary names.
pub(crate) fn list(dir: &Path, pred: impl Fn(&std::fs::FileType) -> bool) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| !e.file_name().as_bytes().starts_with(TMP_PREFIX.as_bytes()))
        .filter(|e| e.file_type().map(|t| pred(&t)).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}
