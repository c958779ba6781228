//! The passthrough: every [`HostFs`] method as syscalls on the `O_PATH` descriptors of the
//! node table, confined beneath the exports (see the `server` module docs for where each kind
//! of syscall runs).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use super::nodes::DirHandle;
use super::FsService;
use crate::proto::{
    self, op, Attr, Caller, Created, DirEntry, Entry, Fh, FsResult, HostFs, Lock, Made, Mounted,
    NodeId, Opened, OutData, Refusal, StatFs,
};
use crate::sys::{self, Errno};
use transport::sync::lock;

/// A syscall's outcome.
pub(super) type R<T> = Result<T, Errno>;

/// Runs a syscall that completes promptly (metadata, page-cache I/O on a local filesystem)
/// inline on the request's task. A hand-off to a thread pool costs two thread switches, more
/// than the syscall itself; sftp-server and knfsd run these inline too.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    f()
}

/// Runs a syscall that may take long but finishes (fsync, fallocate of a large range) on
/// tokio's blocking pool, so it does not hold an async worker.
async fn pooled<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(libc::EIO))
}

/// Runs `f` on its own thread: for syscalls that may block without bound (FIFO open/read/write,
/// lock waits, poll) so they never hold a slot of a bounded pool.
async fn dedicated<T: Send + 'static>(f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("fs-blocking".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return Err(libc::EAGAIN);
    }
    rx.await.unwrap_or(Err(libc::EIO))
}

pub(super) fn is_type(mode: u32, t: u32) -> bool {
    mode & libc::S_IFMT == t
}

/// FUSE dirent sizes, so the server never returns more than the client's buffer holds.
fn dirent_size(namelen: usize, plus: bool) -> usize {
    let base = 24 + namelen.div_ceil(8) * 8;
    if plus {
        base + 128
    } else {
        base
    }
}

impl FsService {
    /// Applies the caller's ownership (and the exact requested mode, which the server's umask
    /// may have narrowed) to a node the server just created as root.
    fn fixup_new(fd: RawFd, caller: Caller, mode: Option<u32>, parent_mode: u32) -> R<()> {
        let parent_setgid = parent_mode & libc::S_ISGID != 0;
        if caller.uid != 0 || caller.gid != 0 {
            let gid = if parent_setgid { u32::MAX } else { caller.gid };
            sys::chown_fd(fd, caller.uid, gid)?;
        }
        if let Some(mode) = mode {
            let st = sys::fstat(fd)?;
            let mut want = mode & 0o7777;
            if is_type(st.st_mode, libc::S_IFDIR) && parent_setgid {
                want |= libc::S_ISGID;
            }
            if st.st_mode & 0o7777 != want {
                sys::chmod_fd(fd, want)?;
            }
        }
        Ok(())
    }

    async fn create_node(
        &self,
        parent: NodeId,
        name: Vec<u8>,
        caller: Caller,
        mode: Option<u32>,
        make: impl FnOnce(RawFd, &CString) -> R<()> + Send + 'static,
    ) -> R<Made> {
        let (pfd, export, pmode) = self.node(parent)?;
        self.writable(export)?;
        let name = sys::component(&name)?;
        let (fd, st, pattr) = blocking(move || {
            make(pfd.as_raw_fd(), &name)?;
            let fd = sys::lookup(pfd.as_raw_fd(), &name)?;
            Self::fixup_new(fd.as_raw_fd(), caller, mode, pmode)?;
            let st = sys::fstat(fd.as_raw_fd())?;
            Ok((fd, st, post_op_attr(pfd.as_raw_fd())?))
        })
        .await?;
        Ok(Made {
            entry: self.register(fd, export, &st),
            parent: pattr,
        })
    }

    async fn open_fd(&self, fd: Arc<OwnedFd>, mode: u32, flags: i32) -> R<(OwnedFd, bool, bool)> {
        // The DPU kernel opens FIFOs itself (a local pipe joined to this one by a tunnel, see
        // [`crate::fifo`]); a FUSE OPEN of one comes only from a client that does not know.
        if is_type(mode, libc::S_IFIFO) {
            return Err(libc::ENXIO);
        }
        let special = is_type(mode, libc::S_IFCHR);
        let seekable = is_type(mode, libc::S_IFREG) || is_type(mode, libc::S_IFBLK);
        let flags = flags & !libc::O_NONBLOCK;
        let f = move || sys::reopen(fd.as_raw_fd(), flags);
        let ofd = if special {
            dedicated(f).await?
        } else {
            blocking(f).await?
        };
        Ok((ofd, seekable, special))
    }

    /// xattr syscalls go through `/proc/self/fd/N`, which would follow a symlink's target on
    /// the HOST: refuse them on symlinks (Linux allows no user xattrs there anyway).
    fn no_symlink_xattr(mode: u32) -> R<()> {
        if is_type(mode, libc::S_IFLNK) {
            Err(libc::EOPNOTSUPP)
        } else {
            Ok(())
        }
    }

    async fn remove(&self, parent: NodeId, name: Vec<u8>, dir: bool) -> R<()> {
        let (pfd, export, _) = self.node(parent)?;
        self.writable(export)?;
        let name = sys::component(&name)?;
        let removed = blocking(move || {
            // What the name is, for [`FsService::unlinked`]; a directory holds no space
            // worth hurrying for and may carry a watch.
            let before = (!dir)
                .then(|| sys::lstatat(pfd.as_raw_fd(), &name).ok())
                .flatten();
            sys::unlinkat(pfd.as_raw_fd(), &name, dir)?;
            Ok(before)
        })
        .await?;
        if let Some(st) = removed {
            self.unlinked((export, st.st_dev, st.st_ino));
        }
        Ok(())
    }

    async fn list_dir(&self, fh: Fh, offset: u64, max_bytes: u32, plus: bool) -> R<Vec<DirEntry>> {
        let d = self.state().dirs.get(&fh).cloned().ok_or(libc::EBADF)?;
        let (fd, export, cached) = {
            let g = lock(&d);
            (g.node_fd.clone(), g.export, g.entries.clone())
        };
        let entries = match cached {
            Some(e) if offset != 0 => e,
            _ => {
                let fd2 = fd.clone();
                let e = Arc::new(blocking(move || sys::read_dir(fd2.as_raw_fd())).await?);
                lock(&d).entries = Some(e.clone());
                e
            }
        };
        let mut out = Vec::new();
        let mut used = 0usize;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let picked: Vec<(usize, Vec<u8>, u32, u64)> = entries
            .iter()
            .enumerate()
            .skip(start)
            .take_while(|(_, (name, _, _))| {
                used += dirent_size(name.len(), plus);
                used <= max_bytes as usize
            })
            .map(|(i, (n, k, ino))| (i, n.clone(), *k, *ino))
            .collect();
        if !plus {
            for (i, name, kind, ino) in picked {
                out.push(DirEntry {
                    name,
                    offset: i as u64 + 1,
                    kind,
                    ino,
                    entry: None,
                });
            }
            return Ok(out);
        }
        let looked = blocking(move || {
            let mut v = Vec::with_capacity(picked.len());
            for (i, name, kind, ino) in picked {
                let res = if name == b"." || name == b".." {
                    None
                } else {
                    match sys::component(&name).and_then(|c| sys::lookup(fd.as_raw_fd(), &c)) {
                        Ok(f) => sys::fstat(f.as_raw_fd()).ok().map(|st| (f, st)),
                        Err(_) => None,
                    }
                };
                v.push((i, name, kind, ino, res));
            }
            Ok(v)
        })
        .await?;
        for (i, name, kind, ino, res) in looked {
            let entry = res.map(|(f, st)| self.register(f, export, &st));
            if entry.is_none() && name != b"." && name != b".." {
                // Vanished since the listing: skip it.
                continue;
            }
            out.push(DirEntry {
                name,
                offset: i as u64 + 1,
                kind,
                ino,
                entry,
            });
        }
        Ok(out)
    }

    /// Creates and opens a regular file (the work of [`HostFs::create`]).
    async fn create_file(&self, a: op::Create) -> R<Created> {
        let op::Create {
            parent,
            name,
            mode,
            flags,
            caller,
            ..
        } = a;
        let (pfd, export, pmode) = self.node(parent)?;
        self.writable(export)?;
        let cname = sys::component(&name)?;
        let (fd, ofd, st, pattr) = blocking(move || {
            let oflags = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_NOFOLLOW;
            let how_flags = oflags;
            // openat2 refuses a mode with O_CREAT through our helper (mode 0), so
            // create with openat relative to the parent O_PATH fd (single component,
            // O_NOFOLLOW: cannot leave the directory).
            // SAFETY: valid C string, checked result.
            let rc = unsafe {
                libc::openat(
                    pfd.as_raw_fd(),
                    cname.as_ptr(),
                    how_flags | libc::O_CLOEXEC,
                    (mode & 0o7777) as libc::c_uint,
                )
            };
            if rc < 0 {
                return Err(sys::last());
            }
            // SAFETY: fresh descriptor.
            let ofd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(rc) };
            let fd = sys::lookup(pfd.as_raw_fd(), &cname)?;
            Self::fixup_new(fd.as_raw_fd(), caller, Some(mode), pmode)?;
            let st = sys::fstat(fd.as_raw_fd())?;
            Ok((fd, ofd, st, post_op_attr(pfd.as_raw_fd())?))
        })
        .await?;
        let entry = self.register(fd, export, &st);
        let fh = self.add_file(ofd, (export, st.st_dev, st.st_ino), true, false);
        Ok(Created {
            entry,
            opened: Opened { fh, direct: false },
            parent: pattr,
        })
    }
}

impl HostFs for FsService {
    fn instance(&self) -> u64 {
        self.inner.instance
    }

    async fn mount(&self, a: op::Mount) -> FsResult<Result<Mounted, Refusal>> {
        Ok(self.resolve_mount(a.version, a.path).await)
    }

    async fn lookup(&self, a: op::Lookup) -> FsResult<Entry> {
        let op::Lookup { parent, name } = a;
        let (pfd, export, _) = self.node(parent)?;
        let name = sys::component(&name)?;
        let (fd, st) = blocking(move || {
            let fd = sys::lookup(pfd.as_raw_fd(), &name)?;
            let st = sys::fstat(fd.as_raw_fd())?;
            Ok((fd, st))
        })
        .await?;
        Ok(self.register(fd, export, &st))
    }

    async fn forget(&self, a: op::Forget) -> FsResult<()> {
        let op::Forget { nodes } = a;
        for (id, n) in nodes {
            self.forget_refs(id, n);
        }
        Ok(())
    }

    async fn getattr(&self, a: op::GetAttr) -> FsResult<Attr> {
        let op::GetAttr { node, fh } = a;
        if let Some(fh) = fh {
            if let Ok(f) = self.file(fh) {
                let fd = f.fd.as_raw_fd();
                let st = blocking(move || sys::fstat(fd)).await?;
                return Ok(sys::attr_of_node(fd, &st));
            }
        }
        let (fd, _, _) = self.node(node)?;
        let raw = fd.as_raw_fd();
        let st = blocking(move || sys::fstat(raw)).await?;
        self.update_mode(node, st.st_mode);
        Ok(sys::attr_of_node(raw, &st))
    }

    async fn setattr(&self, a: op::SetAttr) -> FsResult<Attr> {
        let op::SetAttr {
            node,
            fh,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = a;
        let (fd, export, nmode) = self.node(node)?;
        self.writable(export)?;
        if is_type(nmode, libc::S_IFLNK) {
            // chmod/truncate would go through /proc/self/fd: never on a symlink.
            if mode.is_some() {
                return Err(libc::EOPNOTSUPP);
            }
            if size.is_some() {
                return Err(libc::EINVAL);
            }
        }
        let file = fh.and_then(|fh| self.file(fh).ok());
        let st = blocking(move || {
            let raw = fd.as_raw_fd();
            if uid.is_some() || gid.is_some() {
                sys::chown_fd(raw, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
            }
            if let Some(mode) = mode {
                sys::chmod_fd(raw, mode)?;
            }
            if let Some(size) = size {
                match &file {
                    Some(f) => sys::ftruncate(f.fd.as_raw_fd(), size)?,
                    None => {
                        let w = sys::reopen(raw, libc::O_WRONLY | libc::O_NONBLOCK)?;
                        sys::ftruncate(w.as_raw_fd(), size)?;
                    }
                }
            }
            if atime.is_some() || mtime.is_some() {
                sys::utimens_fd(raw, atime, mtime)?;
            }
            Ok(sys::attr_of_node(raw, &sys::fstat(raw)?))
        })
        .await?;
        Ok(st)
    }

    async fn readlink(&self, a: op::ReadLink) -> FsResult<((), OutData)> {
        let op::ReadLink { node } = a;
        let (fd, _, _) = self.node(node)?;
        let t = blocking(move || sys::readlink(fd.as_raw_fd())).await?;
        Ok(((), OutData::from_slice(&t)))
    }

    async fn symlink(&self, a: op::Symlink) -> FsResult<Made> {
        let op::Symlink {
            parent,
            name,
            target,
            caller,
            alias,
        } = a;
        let made = match CString::new(target) {
            Ok(target) => {
                self.create_node(parent, name, caller, None, move |d, n| {
                    sys::symlinkat(&target, d, n)
                })
                .await
            }
            Err(_) => Err(libc::EINVAL),
        };
        self.set_alias(alias, made.map(|m| m.entry.node));
        made
    }

    async fn mknod(&self, a: op::Mknod) -> FsResult<Made> {
        let op::Mknod {
            parent,
            name,
            mode,
            rdev,
            caller,
        } = a;
        let t = mode & libc::S_IFMT;
        // A character device 0/0 is an overlayfs whiteout (image layers unpack them):
        // it opens nothing, so it is allowed without `allow_devices`.
        let whiteout = t == libc::S_IFCHR && rdev == 0;
        if (t == libc::S_IFCHR || t == libc::S_IFBLK) && !whiteout && !self.inner.allow_devices {
            return Err(libc::EPERM);
        }
        if t == libc::S_IFDIR || t == libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        self.create_node(parent, name, caller, Some(mode), move |d, n| {
            sys::mknodat(d, n, mode, rdev)
        })
        .await
    }

    async fn mkdir(&self, a: op::Mkdir) -> FsResult<Made> {
        let op::Mkdir {
            parent,
            name,
            mode,
            caller,
            alias,
        } = a;
        let made = self
            .create_node(parent, name, caller, Some(mode), move |d, n| {
                sys::mkdirat(d, n, mode)
            })
            .await;
        self.set_alias(alias, made.map(|m| m.entry.node));
        made
    }

    async fn unlink(&self, a: op::Unlink) -> FsResult<()> {
        let op::Unlink { parent, name } = a;
        self.remove(parent, name, false).await
    }

    async fn rmdir(&self, a: op::Rmdir) -> FsResult<()> {
        let op::Rmdir { parent, name } = a;
        self.remove(parent, name, true).await
    }

    async fn rename(&self, a: op::Rename) -> FsResult<()> {
        let op::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
        } = a;
        let (pfd, export, _) = self.node(parent)?;
        let (npfd, nexport, _) = self.node(newparent)?;
        self.writable(export)?;
        if export != nexport {
            return Err(libc::EXDEV);
        }
        let name = sys::component(&name)?;
        let newname = sys::component(&newname)?;
        let replaced = blocking(move || {
            // The inode a plain rename replaces loses that name (see `remove`).
            let before = (flags & libc::RENAME_EXCHANGE == 0)
                .then(|| sys::lstatat(npfd.as_raw_fd(), &newname).ok())
                .flatten();
            sys::renameat2(pfd.as_raw_fd(), &name, npfd.as_raw_fd(), &newname, flags)?;
            Ok(before)
        })
        .await?;
        if let Some(st) = replaced {
            self.unlinked((export, st.st_dev, st.st_ino));
        }
        Ok(())
    }

    async fn link(&self, a: op::Link) -> FsResult<Made> {
        let op::Link {
            node,
            newparent,
            newname,
        } = a;
        let (fd, export, _) = self.node(node)?;
        let (npfd, nexport, _) = self.node(newparent)?;
        self.writable(nexport)?;
        if export != nexport {
            return Err(libc::EXDEV);
        }
        let newname = sys::component(&newname)?;
        let (fd2, st, pattr) = blocking(move || {
            sys::link_fd(fd.as_raw_fd(), npfd.as_raw_fd(), &newname)?;
            let fd2 = sys::lookup(npfd.as_raw_fd(), &newname)?;
            let st = sys::fstat(fd2.as_raw_fd())?;
            Ok((fd2, st, post_op_attr(npfd.as_raw_fd())?))
        })
        .await?;
        Ok(Made {
            entry: self.register(fd2, export, &st),
            parent: pattr,
        })
    }

    async fn open(&self, a: op::Open) -> FsResult<Opened> {
        let op::Open { node, flags } = a;
        let (fd, export, mode, key) = self.node_key(node)?;
        if is_type(mode, libc::S_IFLNK) {
            return Err(libc::ELOOP);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.writable(export)?;
        }
        let (ofd, seekable, special) = self.open_fd(fd, mode, flags).await?;
        let fh = self.add_file(ofd, key, seekable, special);
        Ok(Opened {
            fh,
            direct: special || !seekable,
        })
    }

    async fn create(&self, a: op::Create) -> FsResult<Created> {
        let alias = a.alias;
        let made = self.create_file(a).await;
        self.set_alias(alias.map(|a| a.0), made.map(|c| c.entry.node));
        self.set_alias(alias.map(|a| a.1), made.map(|c| c.opened.fh));
        made
    }

    /// Regular files are read straight into the reply's buffer (inline: page-cache I/O);
    /// pipes and devices on a dedicated thread.
    async fn read(&self, a: op::Read) -> FsResult<((), OutData)> {
        let op::Read { fh, offset, size } = a;
        let f = self.file(fh)?;
        let size = size.min(proto::MAX_IO);
        if f.seekable {
            let mut out = OutData::with_capacity(size as usize);
            sys::pread_append(f.fd.as_raw_fd(), offset, size, out.buf_mut())?;
            return Ok(((), out));
        }
        let data = dedicated(move || sys::pread(f.fd.as_raw_fd(), offset, size, false)).await?;
        Ok(((), OutData::from_slice(&data)))
    }

    /// Regular files are written straight from the received frame; pipes and devices from a
    /// copy on a dedicated thread.
    async fn write(&self, a: op::Write, data: &[u8]) -> FsResult<u32> {
        let op::Write { fh, offset } = a;
        let f = self.file(fh)?;
        self.writable(f.export)?;
        if f.seekable {
            return sys::pwrite(f.fd.as_raw_fd(), offset, data, true).map(|n| n as u32);
        }
        let data = data.to_vec();
        let n = dedicated(move || sys::pwrite(f.fd.as_raw_fd(), offset, &data, false)).await?;
        Ok(n as u32)
    }

    /// Appends through the handle's `O_APPEND` descriptor; a resend whose first attempt landed
    /// (see [`op::Append`]) is answered without writing again.
    async fn append(&self, a: op::Append, data: &[u8]) -> FsResult<proto::Appended> {
        let op::Append { fh, end } = a;
        let f = self.file(fh)?;
        self.writable(f.export)?;
        if !f.seekable {
            let data = data.to_vec();
            let n = dedicated(move || sys::pwrite(f.fd.as_raw_fd(), 0, &data, false)).await?;
            return Ok(proto::Appended {
                written: n as u32,
                end: 0,
            });
        }
        let fd = f.fd.as_raw_fd();
        let len = data.len() as u64;
        if let Some(e) = end {
            let size = sys::fstat(fd)?.st_size as u64;
            if len > 0 && size == e.saturating_add(len) {
                let mut there = Vec::new();
                // Appending handles are usually write-only (`>>`, O_WRONLY|O_APPEND): read the
                // bytes through a descriptor of our own for reading.
                let read = match sys::pread_append(fd, e, len as u32, &mut there) {
                    Err(libc::EBADF) => sys::reopen(fd, libc::O_RDONLY).and_then(|r| {
                        there.clear();
                        sys::pread_append(r.as_raw_fd(), e, len as u32, &mut there)
                    }),
                    other => other,
                };
                if read.is_ok() && there == data {
                    return Ok(proto::Appended {
                        written: len as u32,
                        end: size,
                    });
                }
            }
        }
        // The descriptor is O_APPEND: the kernel appends whatever the offset says.
        let n = sys::pwrite(fd, 0, data, true)?;
        let end = sys::fstat(fd)?.st_size as u64;
        Ok(proto::Appended {
            written: n as u32,
            end,
        })
    }

    async fn flush(&self, a: op::Flush) -> FsResult<()> {
        let op::Flush { fh, .. } = a;
        // Data is written through on every write; nothing is buffered here.
        self.file(fh)?;
        Ok(())
    }

    async fn release(&self, a: op::Release) -> FsResult<()> {
        let op::Release { fh, .. } = a;
        let f = self.take_file(fh);
        if let Some(f) = f {
            // close(2) of a FIFO or device may block; never on the async workers.
            if f.blocking {
                let _ = dedicated(move || {
                    drop(f);
                    Ok(())
                })
                .await;
            } else {
                let _ = blocking(move || {
                    drop(f);
                    Ok(())
                })
                .await;
            }
        }
        Ok(())
    }

    async fn fsync(&self, a: op::Fsync) -> FsResult<()> {
        let op::Fsync { fh, datasync } = a;
        let f = self.file(fh)?;
        pooled(move || sys::fsync(f.fd.as_raw_fd(), datasync)).await?;
        Ok(())
    }

    async fn opendir(&self, a: op::OpenDir) -> FsResult<Opened> {
        let op::OpenDir { node } = a;
        let (fd, export, mode) = self.node(node)?;
        if !is_type(mode, libc::S_IFDIR) {
            return Err(libc::ENOTDIR);
        }
        let fh = self.id();
        self.state().dirs.insert(
            fh,
            Arc::new(Mutex::new(DirHandle {
                node_fd: fd,
                export,
                entries: None,
            })),
        );
        Ok(Opened { fh, direct: false })
    }

    async fn readdir(&self, a: op::ReadDir) -> FsResult<Vec<DirEntry>> {
        let op::ReadDir {
            fh,
            offset,
            max_bytes,
            plus,
        } = a;
        self.list_dir(fh, offset, max_bytes, plus).await
    }

    async fn releasedir(&self, a: op::ReleaseDir) -> FsResult<()> {
        let op::ReleaseDir { fh } = a;
        self.state().dirs.remove(&fh);
        Ok(())
    }

    async fn fsyncdir(&self, a: op::FsyncDir) -> FsResult<()> {
        let op::FsyncDir { fh, datasync } = a;
        let d = self.state().dirs.get(&fh).cloned().ok_or(libc::EBADF)?;
        let fd = lock(&d).node_fd.clone();
        pooled(move || {
            let r = sys::reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
            sys::fsync(r.as_raw_fd(), datasync)
        })
        .await?;
        Ok(())
    }

    async fn statfs(&self, a: op::StatFs) -> FsResult<StatFs> {
        let op::StatFs { node } = a;
        let (fd, _, _) = self.node(node)?;
        let s = blocking(move || sys::statfs(fd.as_raw_fd())).await?;
        Ok(s)
    }

    async fn setxattr(&self, a: op::SetXattr) -> FsResult<()> {
        let op::SetXattr {
            node,
            name,
            value,
            flags,
        } = a;
        let (fd, export, nmode) = self.node(node)?;
        Self::no_symlink_xattr(nmode)?;
        self.writable(export)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        blocking(move || sys::setxattr(fd.as_raw_fd(), &name, &value, flags)).await?;
        Ok(())
    }

    async fn getxattr(&self, a: op::GetXattr) -> FsResult<(u32, OutData)> {
        let op::GetXattr { node, name, size } = a;
        let (fd, _, nmode) = self.node(node)?;
        Self::no_symlink_xattr(nmode)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        let size = size.min(proto::MAX_IO);
        let (n, data) = blocking(move || sys::getxattr(fd.as_raw_fd(), &name, size)).await?;
        Ok(if size == 0 {
            (n as u32, OutData::none())
        } else {
            (n as u32, OutData::from_slice(&data))
        })
    }

    async fn listxattr(&self, a: op::ListXattr) -> FsResult<(u32, OutData)> {
        let op::ListXattr { node, size } = a;
        let (fd, _, nmode) = self.node(node)?;
        Self::no_symlink_xattr(nmode)?;
        let size = size.min(proto::MAX_IO);
        let (n, data) = blocking(move || sys::listxattr(fd.as_raw_fd(), size)).await?;
        Ok(if size == 0 {
            (n as u32, OutData::none())
        } else {
            (n as u32, OutData::from_slice(&data))
        })
    }

    async fn removexattr(&self, a: op::RemoveXattr) -> FsResult<()> {
        let op::RemoveXattr { node, name } = a;
        let (fd, export, nmode) = self.node(node)?;
        Self::no_symlink_xattr(nmode)?;
        self.writable(export)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        blocking(move || sys::removexattr(fd.as_raw_fd(), &name)).await?;
        Ok(())
    }

    async fn access(&self, a: op::Access) -> FsResult<()> {
        let op::Access { node, mask, caller } = a;
        let (fd, export, _) = self.node(node)?;
        if mask & libc::W_OK != 0 {
            self.writable(export)?;
        }
        blocking(move || sys::access_as(fd.as_raw_fd(), mask, caller.uid, caller.gid)).await?;
        Ok(())
    }

    async fn fallocate(&self, a: op::Fallocate) -> FsResult<()> {
        let op::Fallocate {
            fh,
            offset,
            length,
            mode,
        } = a;
        let f = self.file(fh)?;
        self.writable(f.export)?;
        pooled(move || sys::fallocate(f.fd.as_raw_fd(), mode, offset, length)).await?;
        Ok(())
    }

    async fn lseek(&self, a: op::Lseek) -> FsResult<i64> {
        let op::Lseek { fh, offset, whence } = a;
        let f = self.file(fh)?;
        let r = blocking(move || sys::lseek(f.fd.as_raw_fd(), offset, whence)).await?;
        Ok(r)
    }

    async fn getlk(&self, a: op::GetLk) -> FsResult<Lock> {
        let op::GetLk {
            fh,
            start,
            end,
            typ,
            ..
        } = a;
        let f = self.file(fh)?;
        let (s, e, t, p) = blocking(move || sys::getlk(f.fd.as_raw_fd(), start, end, typ)).await?;
        Ok(Lock {
            start: s,
            end: e,
            typ: t,
            pid: p,
        })
    }

    async fn setlk(&self, a: op::SetLk) -> FsResult<()> {
        let op::SetLk {
            fh,
            start,
            end,
            typ,
            sleep,
            ..
        } = a;
        let f = self.file(fh)?;
        let run = move || sys::setlk(f.fd.as_raw_fd(), start, end, typ, sleep);
        if sleep {
            dedicated(run).await?;
        } else {
            blocking(run).await?;
        }
        Ok(())
    }

    async fn poll(&self, a: op::Poll) -> FsResult<u32> {
        let op::Poll {
            fh,
            events,
            wait_ms,
        } = a;
        let f = self.file(fh)?;
        let run = move || sys::poll(f.fd.as_raw_fd(), events, wait_ms);
        let r = if wait_ms > 0 {
            dedicated(run).await?
        } else {
            blocking(run).await?
        };
        Ok(r)
    }
}

/// A directory's attributes right after an operation in it made a new entry.
fn post_op_attr(dir: RawFd) -> R<Attr> {
    Ok(sys::attr_of_node(dir, &sys::fstat(dir)?))
}
