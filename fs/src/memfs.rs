//! An in-memory [`HostFs`] for unit tests of the client without FUSE or root: a tree of
//! directories and regular files, a node-id table that a simulated daemon restart throws away,
//! injectable write failures and a count of the requests each operation received.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use transport::sync::lock;
use transport::{RemoteError, Service, Session};

use crate::proto::{
    op, Attr, Created, DirEntry, Entry, Errno, FsResult, HostFs, Lock, Made, Mounted, NodeId,
    OpCode, Opened, OutData, Refusal, StatFs,
};
use crate::server::dispatch::dispatch;

/// One file or directory ("HOST inode").
#[derive(Debug, Clone)]
struct Inode {
    mode: u32,
    data: Vec<u8>,
    children: BTreeMap<Vec<u8>, u64>,
    nlink: u32,
    mtime: i64,
}

#[derive(Debug, Default)]
struct State {
    /// HOST inodes by inode number; 1 is the root.
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Node ids handed out by this instance → HOST inode.
    nodes: HashMap<NodeId, u64>,
    /// Open handles → HOST inode.
    files: HashMap<u64, u64>,
    next_id: u64,
    /// Writes fail with this errno (after writing `short_by` bytes less than asked, if > 0).
    fail_writes: Option<(Errno, usize)>,
    /// Requests received per operation.
    calls: HashMap<OpCode, u64>,
    /// A logical clock for modification times.
    clock: i64,
}

/// The in-memory filesystem. Serve it with [`MemFs::service`].
#[derive(Debug)]
pub(crate) struct MemFs {
    instance: AtomicU64,
    st: Mutex<State>,
}

impl MemFs {
    /// An empty root directory.
    pub(crate) fn new() -> Arc<MemFs> {
        let mut st = State {
            next_ino: 2,
            next_id: 1,
            ..Default::default()
        };
        st.inodes.insert(1, Inode::dir());
        Arc::new(MemFs {
            instance: AtomicU64::new(0x100),
            st: Mutex::new(st),
        })
    }

    /// The `fs` service over this filesystem.
    pub(crate) fn service(self: &Arc<Self>) -> Arc<dyn Service> {
        Arc::new(Served(self.clone()))
    }

    /// A daemon restart: a new instance, every node id and handle forgotten, the tree kept.
    pub(crate) fn restart(&self) {
        self.instance.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.st);
        st.nodes.clear();
        st.files.clear();
    }

    /// Writes fail with `errno` from now on, after writing all but `short_by` bytes of each.
    pub(crate) fn fail_writes(&self, failure: Option<(Errno, usize)>) {
        lock(&self.st).fail_writes = failure;
    }

    /// Requests received for `code`.
    pub(crate) fn calls(&self, code: OpCode) -> u64 {
        lock(&self.st).calls.get(&code).copied().unwrap_or(0)
    }

    /// The content of the file at `path` (components from the root).
    pub(crate) fn content(&self, path: &[&str]) -> Option<Vec<u8>> {
        let st = lock(&self.st);
        let mut ino = 1;
        for c in path {
            ino = *st.inodes.get(&ino)?.children.get(c.as_bytes())?;
        }
        Some(st.inodes.get(&ino)?.data.clone())
    }

    /// Changes a file's content behind the client's back (a HOST-side writer).
    pub(crate) fn host_write(&self, path: &[&str], data: &[u8]) {
        let mut st = lock(&self.st);
        let mut ino = 1;
        for c in path {
            ino = st.inodes[&ino].children[c.as_bytes()];
        }
        st.clock += 1;
        let now = st.clock;
        if let Some(i) = st.inodes.get_mut(&ino) {
            i.data = data.to_vec();
            i.mtime = now;
        }
    }

    fn count(&self, code: OpCode) -> std::sync::MutexGuard<'_, State> {
        let mut st = lock(&self.st);
        *st.calls.entry(code).or_default() += 1;
        st
    }
}

impl Inode {
    fn dir() -> Inode {
        Inode {
            mode: libc::S_IFDIR | 0o755,
            data: Vec::new(),
            children: BTreeMap::new(),
            nlink: 2,
            mtime: 0,
        }
    }

    fn attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            size: self.data.len() as u64,
            mode: self.mode,
            nlink: self.nlink,
            mtime: crate::proto::Ts {
                sec: self.mtime,
                nsec: 0,
            },
            ..Default::default()
        }
    }
}

impl State {
    fn ino_of(&self, node: NodeId) -> FsResult<u64> {
        self.nodes.get(&node).copied().ok_or(libc::ESTALE)
    }

    fn entry(&mut self, ino: u64) -> Entry {
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(id, ino);
        Entry {
            node: id,
            attr: self.inodes[&ino].attr(ino),
        }
    }

    fn child(&self, parent: NodeId, name: &[u8]) -> FsResult<u64> {
        let p = self.inodes.get(&self.ino_of(parent)?).ok_or(libc::ESTALE)?;
        if p.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        p.children.get(name).copied().ok_or(libc::ENOENT)
    }

    fn make(&mut self, parent: NodeId, name: &[u8], node: Inode) -> FsResult<Made> {
        let pino = self.ino_of(parent)?;
        if self.inodes[&pino].children.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, node);
        self.clock += 1;
        let now = self.clock;
        let p = self.inodes.get_mut(&pino).ok_or(libc::ESTALE)?;
        p.children.insert(name.to_vec(), ino);
        p.mtime = now;
        let parent = p.attr(pino);
        Ok(Made {
            entry: self.entry(ino),
            parent,
        })
    }

    fn handle(&mut self, ino: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.files.insert(id, ino);
        id
    }

    fn file(&mut self, fh: u64) -> FsResult<&mut Inode> {
        let ino = *self.files.get(&fh).ok_or(libc::EBADF)?;
        self.inodes.get_mut(&ino).ok_or(libc::ESTALE)
    }
}

impl HostFs for MemFs {
    fn instance(&self) -> u64 {
        self.instance.load(Ordering::Relaxed)
    }

    async fn mount(&self, a: op::Mount) -> FsResult<Result<Mounted, Refusal>> {
        let mut st = self.count(OpCode::Mount);
        if a.path != "/" {
            return Ok(Err(Refusal {
                errno: libc::EACCES,
                message: format!("{} is not exported", a.path),
            }));
        }
        Ok(Ok(Mounted {
            instance: self.instance(),
            root: st.entry(1),
            read_only: false,
        }))
    }

    async fn lookup(&self, a: op::Lookup) -> FsResult<Entry> {
        let mut st = self.count(OpCode::Lookup);
        let ino = st.child(a.parent, &a.name)?;
        Ok(st.entry(ino))
    }

    async fn forget(&self, _a: op::Forget) -> FsResult<()> {
        drop(self.count(OpCode::Forget));
        Ok(())
    }

    async fn getattr(&self, a: op::GetAttr) -> FsResult<Attr> {
        let st = self.count(OpCode::GetAttr);
        let ino = st.ino_of(a.node)?;
        Ok(st.inodes[&ino].attr(ino))
    }

    async fn setattr(&self, a: op::SetAttr) -> FsResult<Attr> {
        let mut st = self.count(OpCode::SetAttr);
        let ino = st.ino_of(a.node)?;
        let i = st.inodes.get_mut(&ino).ok_or(libc::ESTALE)?;
        if let Some(m) = a.mode {
            i.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
        }
        if let Some(s) = a.size {
            i.data.resize(s as usize, 0);
        }
        Ok(i.attr(ino))
    }

    async fn readlink(&self, _a: op::ReadLink) -> FsResult<((), OutData)> {
        drop(self.count(OpCode::ReadLink));
        Err(libc::EINVAL)
    }

    async fn symlink(&self, _a: op::Symlink) -> FsResult<Made> {
        Err(libc::ENOSYS)
    }

    async fn mknod(&self, _a: op::Mknod) -> FsResult<Made> {
        Err(libc::ENOSYS)
    }

    async fn mkdir(&self, a: op::Mkdir) -> FsResult<Made> {
        let mut st = self.count(OpCode::Mkdir);
        let mut d = Inode::dir();
        d.mode = libc::S_IFDIR | (a.mode & 0o7777);
        st.make(a.parent, &a.name, d)
    }

    async fn unlink(&self, a: op::Unlink) -> FsResult<()> {
        let mut st = self.count(OpCode::Unlink);
        let pino = st.ino_of(a.parent)?;
        st.child(a.parent, &a.name)?;
        if let Some(p) = st.inodes.get_mut(&pino) {
            p.children.remove(&a.name);
        }
        Ok(())
    }

    async fn rmdir(&self, _a: op::Rmdir) -> FsResult<()> {
        Err(libc::ENOSYS)
    }

    async fn rename(&self, _a: op::Rename) -> FsResult<()> {
        Err(libc::ENOSYS)
    }

    async fn link(&self, _a: op::Link) -> FsResult<Made> {
        Err(libc::ENOSYS)
    }

    async fn open(&self, a: op::Open) -> FsResult<Opened> {
        let mut st = self.count(OpCode::Open);
        let ino = st.ino_of(a.node)?;
        Ok(Opened {
            fh: st.handle(ino),
            direct: false,
        })
    }

    async fn create(&self, a: op::Create) -> FsResult<Created> {
        let mut st = self.count(OpCode::Create);
        let file = Inode {
            mode: libc::S_IFREG | (a.mode & 0o7777),
            nlink: 1,
            ..Inode::dir()
        };
        let made = st.make(a.parent, &a.name, file)?;
        let ino = st.ino_of(made.entry.node)?;
        Ok(Created {
            entry: made.entry,
            opened: Opened {
                fh: st.handle(ino),
                direct: false,
            },
            parent: made.parent,
        })
    }

    async fn read(&self, a: op::Read) -> FsResult<((), OutData)> {
        let mut st = self.count(OpCode::Read);
        let f = st.file(a.fh)?;
        let start = (a.offset as usize).min(f.data.len());
        let end = (start + a.size as usize).min(f.data.len());
        Ok(((), OutData::from_slice(&f.data[start..end])))
    }

    async fn write(&self, a: op::Write, data: &[u8]) -> FsResult<u32> {
        let mut st = self.count(OpCode::Write);
        let fail = st.fail_writes;
        st.clock += 1;
        let now = st.clock;
        let f = st.file(a.fh)?;
        let n = match fail {
            Some((e, 0)) => return Err(e),
            Some((e, short)) if data.len() <= short => return Err(e),
            Some((_, short)) => data.len() - short,
            None => data.len(),
        };
        let end = a.offset as usize + n;
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[a.offset as usize..end].copy_from_slice(&data[..n]);
        f.mtime = now;
        Ok(n as u32)
    }

    async fn append(&self, a: op::Append, data: &[u8]) -> FsResult<crate::proto::Appended> {
        let mut st = self.count(OpCode::Append);
        st.clock += 1;
        let now = st.clock;
        let f = st.file(a.fh)?;
        let len = data.len();
        if let Some(e) = a.end {
            let e = e as usize;
            if len > 0 && f.data.len() == e + len && f.data[e..] == *data {
                return Ok(crate::proto::Appended {
                    written: len as u32,
                    end: f.data.len() as u64,
                });
            }
        }
        f.data.extend_from_slice(data);
        f.mtime = now;
        Ok(crate::proto::Appended {
            written: len as u32,
            end: f.data.len() as u64,
        })
    }

    async fn flush(&self, _a: op::Flush) -> FsResult<()> {
        Ok(())
    }

    async fn release(&self, a: op::Release) -> FsResult<()> {
        self.count(OpCode::Release).files.remove(&a.fh);
        Ok(())
    }

    async fn fsync(&self, a: op::Fsync) -> FsResult<()> {
        self.count(OpCode::Fsync).file(a.fh).map(|_| ())
    }

    async fn opendir(&self, a: op::OpenDir) -> FsResult<Opened> {
        let mut st = self.count(OpCode::OpenDir);
        let ino = st.ino_of(a.node)?;
        Ok(Opened {
            fh: st.handle(ino),
            direct: false,
        })
    }

    async fn readdir(&self, a: op::ReadDir) -> FsResult<Vec<DirEntry>> {
        let mut st = self.count(OpCode::ReadDir);
        let d = st.file(a.fh)?;
        Ok(d.children
            .iter()
            .enumerate()
            .skip(a.offset as usize)
            .map(|(i, (name, ino))| DirEntry {
                name: name.clone(),
                offset: i as u64 + 1,
                kind: 0,
                ino: *ino,
                entry: None,
            })
            .collect())
    }

    async fn releasedir(&self, a: op::ReleaseDir) -> FsResult<()> {
        lock(&self.st).files.remove(&a.fh);
        Ok(())
    }

    async fn fsyncdir(&self, _a: op::FsyncDir) -> FsResult<()> {
        Ok(())
    }

    async fn statfs(&self, _a: op::StatFs) -> FsResult<StatFs> {
        Ok(StatFs::default())
    }

    async fn setxattr(&self, _a: op::SetXattr) -> FsResult<()> {
        Err(libc::ENOTSUP)
    }

    async fn getxattr(&self, _a: op::GetXattr) -> FsResult<(u32, OutData)> {
        drop(self.count(OpCode::GetXattr));
        Err(libc::ENODATA)
    }

    async fn listxattr(&self, _a: op::ListXattr) -> FsResult<(u32, OutData)> {
        Ok((0, OutData::none()))
    }

    async fn removexattr(&self, _a: op::RemoveXattr) -> FsResult<()> {
        Err(libc::ENODATA)
    }

    async fn access(&self, _a: op::Access) -> FsResult<()> {
        Ok(())
    }

    async fn fallocate(&self, _a: op::Fallocate) -> FsResult<()> {
        Err(libc::EOPNOTSUPP)
    }

    async fn lseek(&self, _a: op::Lseek) -> FsResult<i64> {
        Err(libc::ENXIO)
    }

    async fn getlk(&self, a: op::GetLk) -> FsResult<Lock> {
        Ok(Lock {
            start: a.start,
            end: a.end,
            typ: libc::F_UNLCK,
            pid: 0,
        })
    }

    async fn setlk(&self, _a: op::SetLk) -> FsResult<()> {
        Ok(())
    }

    async fn poll(&self, a: op::Poll) -> FsResult<u32> {
        Ok(a.events)
    }
}

/// A [`HostFs`] registered as a transport service.
struct Served(Arc<MemFs>);

#[async_trait]
impl Service for Served {
    async fn call(&self, _session: &Session, req: Bytes) -> Result<Bytes, RemoteError> {
        dispatch(&*self.0, &req).await
    }
}
