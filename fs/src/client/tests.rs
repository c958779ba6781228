//! The client's rules against an in-memory HOST ([`crate::memfs::MemFs`]) over a real session
//! on a Unix socket: no FUSE, no root. Inode and handle re-resolution after a HOST restart,
//! write-behind failure reporting and resends, and when attributes may be reused.

use std::time::Duration;

use transport::{auth::Key, Endpoint, Registry, SessionConfig};

use super::*;
use crate::memfs::MemFs;
use crate::proto::OpCode;

/// A mount of a fresh [`MemFs`] and the runtime its client runs on.
struct Rig {
    rt: tokio::runtime::Runtime,
    fs: Arc<MemFs>,
    inner: Arc<Inner>,
    _dir: tempfile::TempDir,
}

fn rig(opts: MountOptions) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fs = MemFs::new();
    let ep = Endpoint::Unix {
        path: dir.path().join("fs.sock"),
    };
    let key = Key::from_bytes(vec![7u8; 32]).expect("key");
    let q = rt.block_on(async {
        let l = transport::listen(&ep).await.expect("listen");
        let reg = Registry::new().with("fs", fs.service());
        tokio::spawn(transport::serve(
            l,
            SessionConfig::new(Some(key.clone())),
            reg,
        ));
        let client = transport::Client::new(ep, SessionConfig::new(Some(key)), Registry::new());
        let opts = MountOptions {
            source: "/".into(),
            timeout: Duration::from_secs(5),
            ..opts
        };
        QtfsFs::connect(client, opts).await.expect("connect")
    });
    Rig {
        rt,
        fs,
        inner: q.inner,
        _dir: dir,
    }
}

impl Rig {
    /// Looks `name` up in `parent` the way FUSE LOOKUP does (one kernel reference).
    fn lookup(&self, parent: u64, name: &str) -> R<u64> {
        let me = self.inner.clone();
        self.rt.block_on(async {
            let sent = me.attr_seq();
            let e = me
                .with(|| async {
                    let p = me.node_of(parent).await?;
                    let name = name.as_bytes().to_vec();
                    me.call(op::Lookup { parent: p, name }).await
                })
                .await?;
            Ok(me.add_entry(parent, name.as_bytes(), &e, sent))
        })
    }

    fn mkdir(&self, parent: u64, name: &str) -> u64 {
        let me = self.inner.clone();
        self.rt.block_on(async {
            let sent = me.attr_seq();
            let p = me.node_of(parent).await.expect("parent");
            let mkdir = op::Mkdir {
                parent: p,
                name: name.as_bytes().to_vec(),
                mode: 0o755,
                caller: Caller::default(),
                alias: None,
            };
            let (e, pattr) = me.make(parent, mkdir).await.expect("mkdir");
            me.made_in(parent, name.as_bytes(), &pattr, sent);
            let ino = me.add_entry(parent, name.as_bytes(), &e, sent);
            me.note_new_dir(ino);
            ino
        })
    }

    /// Creates and opens `parent/name` read-write: (inode, this mount's handle).
    fn create(&self, parent: u64, name: &str) -> (u64, u64) {
        let me = self.inner.clone();
        self.rt.block_on(async {
            let sent = me.attr_seq();
            let p = me.node_of(parent).await.expect("parent");
            let c = me
                .call(op::Create {
                    parent: p,
                    name: name.as_bytes().to_vec(),
                    mode: 0o644,
                    flags: libc::O_RDWR,
                    caller: Caller::default(),
                    alias: None,
                })
                .await
                .expect("create");
            let ino = me.add_entry(parent, name.as_bytes(), &c.entry, sent);
            (ino, me.new_handle(ino, libc::O_RDWR, false, c.opened.fh))
        })
    }

    /// GETATTR of `ino` as FUSE sends it (fast path from this thread when possible).
    fn getattr(&self, ino: u64) -> R<Attr> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.inner.attr_seq();
        self.inner.request(
            ino,
            None,
            |node, fh| op::GetAttr { node, fh },
            move |me, r| {
                if let Ok(a) = &r {
                    me.note_attr(ino, a, sent);
                }
                let _ = tx.send(r);
            },
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("getattr answered")
    }

    fn settle(&self, ino: u64) -> R<()> {
        self.rt.block_on(self.inner.settle(ino))
    }

    /// What a close of open file `fh` reports (FUSE FLUSH).
    fn close(&self, ino: u64, fh: u64) -> R<()> {
        self.rt.block_on(self.inner.settle_handle(ino, fh, false))
    }

    /// What an fsync of open file `fh` reports before it asks the HOST.
    fn fsync(&self, ino: u64, fh: u64) -> R<()> {
        self.rt.block_on(self.inner.settle_handle(ino, fh, true))
    }

    /// Starts a write as FUSE WRITE does; its outcome once known.
    fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> R<u32> {
        match self.inner.start_write(ino, fh, offset, data) {
            WriteStart::Done(r) => r,
            WriteStart::Later(f) => self.rt.block_on(f),
        }
    }

    /// Waits until no acknowledged write of `ino` is in flight (without taking a failure).
    fn drain(&self, ino: u64) {
        for _ in 0..1000 {
            let busy = self
                .inner
                .unstable_map()
                .get(&ino)
                .is_some_and(|u| u.lock().0 > 0);
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("writes of {ino} never finished");
    }
}

#[test]
fn inodes_and_handles_are_re_resolved_after_a_host_restart() {
    let r = rig(MountOptions::default());
    let d = r.mkdir(ROOT, "d");
    let (f, fh) = r.create(d, "f");
    assert_eq!(r.write(f, fh, 0, b"hello"), Ok(5));
    assert_eq!(r.settle(f), Ok(()));
    let (gone, _) = r.create(d, "gone");
    let (lookups, mounts, opens) = (
        r.fs.calls(OpCode::Lookup),
        r.fs.calls(OpCode::Mount),
        r.fs.calls(OpCode::Open),
    );

    r.fs.restart();
    // The first call meets the new instance: the client mounts again and re-resolves `f`
    // by name (d, then f) — two lookups — and the same file answers.
    let a = r.getattr(f).expect("getattr after restart");
    assert_eq!(a.size, 5);
    assert_eq!(r.fs.calls(OpCode::Mount), mounts + 1);
    assert_eq!(r.fs.calls(OpCode::Lookup), lookups + 2);
    // The open handle is re-opened on first use, and writes through it land.
    assert_eq!(r.write(f, fh, 5, b" world"), Ok(6));
    assert_eq!(r.settle(f), Ok(()));
    assert_eq!(r.fs.calls(OpCode::Open), opens + 1);
    assert_eq!(
        r.fs.content(&["d", "f"]).as_deref(),
        Some(&b"hello world"[..])
    );
    // `d` was re-resolved on the way to `f`: it is not looked up again.
    let before = r.fs.calls(OpCode::Lookup);
    r.getattr(d).expect("getattr d");
    assert_eq!(r.fs.calls(OpCode::Lookup), before);

    // A file removed on the HOST meanwhile cannot be re-resolved.
    let me = r.inner.clone();
    r.rt.block_on(async {
        let p = me.node_of(d).await.expect("d");
        me.call(op::Unlink {
            parent: p,
            name: b"gone".to_vec(),
        })
        .await
        .expect("unlink");
    });
    r.fs.restart();
    assert_eq!(r.getattr(gone), Err(OpError::Errno(libc::ENOENT)));
    assert_eq!(r.getattr(f).map(|a| a.size), Ok(11));
}

#[test]
fn write_behind_failures_are_reported_to_each_open_file_by_its_next_write_close_or_fsync() {
    let enospc = Err(OpError::Errno(libc::ENOSPC));
    let r = rig(MountOptions::default());
    let (f, fh) = r.create(ROOT, "f");
    r.fs.fail_writes(Some((libc::ENOSPC, 0)));
    // Acknowledged at once (behind); every close of the open file reports the failure (a
    // child's implicit close of an inherited descriptor at exec is one, and must not swallow
    // it) ...
    assert_eq!(r.write(f, fh, 0, b"abc"), Ok(3));
    assert_eq!(r.close(f, fh), enospc);
    assert_eq!(r.close(f, fh), enospc);
    // ... until an fsync reports it, once.
    assert_eq!(r.fsync(f, fh), enospc);
    assert_eq!(r.fsync(f, fh), Ok(()));
    assert_eq!(r.close(f, fh), Ok(()));
    // Or the next write, which is then refused.
    assert_eq!(r.write(f, fh, 0, b"abc"), Ok(3));
    r.drain(f);
    assert_eq!(r.write(f, fh, 0, b"def"), Err(OpError::Errno(libc::ENOSPC)));
    assert_eq!(r.fsync(f, fh), Ok(()), "reported by the write already");

    // Another open of the file is not told of failures from before it was opened, but of
    // those while it is open, on its own account.
    let sfh = r.inner.st().handles[&fh].fh;
    let fh2 = r.inner.new_handle(f, libc::O_WRONLY, false, sfh);
    assert_eq!(r.close(f, fh2), Ok(()));
    assert_eq!(r.write(f, fh, 0, b"x"), Ok(1));
    r.drain(f);
    assert_eq!(r.close(f, fh2), enospc);
    assert_eq!(r.fsync(f, fh), enospc);
    assert_eq!(r.fsync(f, fh2), enospc);
    assert_eq!(r.fsync(f, fh2), Ok(()));

    // A short write: the rest is sent again and says why.
    r.fs.fail_writes(Some((libc::ENOSPC, 2)));
    assert_eq!(r.write(f, fh, 0, b"123456"), Ok(6));
    assert_eq!(r.fsync(f, fh), enospc);
    assert_eq!(r.fs.content(&["f"]).as_deref(), Some(&b"1234"[..]));

    // A HOST restart under an acknowledged write: it is sent again from its kept payload
    // through the re-opened handle.
    r.fs.fail_writes(None);
    r.fs.restart();
    assert_eq!(r.write(f, fh, 0, b"after restart"), Ok(13));
    assert_eq!(r.fsync(f, fh), Ok(()));
    assert_eq!(r.fs.content(&["f"]).as_deref(), Some(&b"after restart"[..]));
}

#[test]
fn attributes_are_reused_only_while_fresh_and_unchanged() {
    let r = rig(MountOptions {
        attr_timeout: Duration::from_millis(300),
        ..MountOptions::default()
    });
    let (f, fh) = r.create(ROOT, "f");
    // Attributes from the create are fresh: a GETATTR is answered here.
    assert!(r.inner.fresh_attr(f).is_some());
    let getattrs = r.fs.calls(OpCode::GetAttr);
    r.getattr(f).expect("getattr");
    assert_eq!(
        r.fs.calls(OpCode::GetAttr),
        getattrs + 1,
        "request() always asks"
    );

    // A write makes them stale; a reply to a request sent before the write is not reused,
    // one sent after it is.
    let before = r.inner.attr_seq();
    assert_eq!(r.write(f, fh, 0, b"data"), Ok(4));
    assert!(r.inner.fresh_attr(f).is_none());
    let a = r.getattr(f).expect("getattr");
    assert_eq!(a.size, 4, "the HOST applied the write before the getattr");
    r.inner.note_attr(f, &a, before);
    assert!(
        r.inner.fresh_attr(f).is_none(),
        "reply overtaken by the write"
    );
    r.inner.note_attr(f, &a, r.inner.attr_seq());
    assert_eq!(r.inner.fresh_attr(f).map(|(a, _)| a.size), Some(4));
    assert_eq!(r.settle(f), Ok(()));

    // HOST-side changes show up after the TTL at most.
    r.fs.host_write(&["f"], b"changed on the host");
    assert_eq!(r.inner.fresh_attr(f).map(|(a, _)| a.size), Some(4));
    std::thread::sleep(Duration::from_millis(350));
    assert!(r.inner.fresh_attr(f).is_none(), "expired");
    assert_eq!(r.getattr(f).map(|a| a.size), Ok(19));

    // Removals and renames change attributes the HOST does not report: nothing is reused.
    r.inner.note_attr(f, &a, r.inner.attr_seq());
    assert!(r.inner.fresh_attr(f).is_some());
    r.inner.stale_all_attrs();
    assert!(r.inner.fresh_attr(f).is_none());
    // Neither while acknowledged writes are being sent again.
    r.inner.note_attr(f, &a, r.inner.attr_seq());
    r.inner.begin_resend();
    assert!(r.inner.fresh_attr(f).is_none());
    r.inner.end_resend(f);
    r.inner.note_attr(f, &a, r.inner.attr_seq());
    assert!(r.inner.fresh_attr(f).is_some());

    // Directories get the attributes a create in them returned.
    let d = r.mkdir(ROOT, "d");
    assert!(
        r.inner.fresh_attr(ROOT).is_some(),
        "post-op attributes of /"
    );
    assert!(r.inner.fresh_attr(d).is_some());
}

#[test]
fn pseudo_mounts_never_reuse_attributes() {
    let r = rig(MountOptions {
        sys_fs: true,
        ..MountOptions::default()
    });
    let d = r.mkdir(ROOT, "d");
    assert!(r.inner.fresh_attr(d).is_none());
    let n = r.fs.calls(OpCode::GetAttr);
    assert!(r.getattr(d).is_ok());
    assert!(r.inner.fresh_attr(d).is_none());
    assert_eq!(r.fs.calls(OpCode::GetAttr), n + 1);
    // Pseudo files are written synchronously: a failure comes back with the write itself.
    let (f, fh) = r.create(ROOT, "f");
    r.fs.fail_writes(Some((libc::EINVAL, 0)));
    assert_eq!(r.write(f, fh, 0, b"1"), Err(OpError::Errno(libc::EINVAL)));
    assert!(!r.inner.has_unstable(f));
}

#[test]
fn negative_lookups_only_in_directories_this_mount_made() {
    let r = rig(MountOptions {
        negative_timeout: Duration::from_secs(30),
        ..MountOptions::default()
    });
    let d = r.mkdir(ROOT, "d");
    assert!(
        r.inner.known_absent(d, b"x"),
        "new directory: nothing but ours"
    );
    let (_f, _) = r.create(d, "f");
    r.inner.note_new_name(d, b"f");
    assert!(!r.inner.known_absent(d, b"f"));
    assert!(!r.inner.known_absent(ROOT, b"x"), "not made here");
    // EEXIST shows the directory holds names this mount did not make.
    let me = r.inner.clone();
    let e = r.rt.block_on(async {
        let p = me.node_of(d).await.expect("d");
        let mkdir = op::Mkdir {
            parent: p,
            name: b"f".to_vec(),
            mode: 0o755,
            caller: Caller::default(),
            alias: None,
        };
        me.make(d, mkdir).await
    });
    assert_eq!(e.err(), Some(OpError::Errno(libc::EEXIST)));
    assert!(!r.inner.known_absent(d, b"x"));
    assert_eq!(r.lookup(d, "x"), Err(OpError::Errno(libc::ENOENT)));
}

/// The kernel may forget a directory (its entry invalidated when the change feed comes back)
/// while an asynchronous operation in it waits to be replayed: the inode, and the directories
/// above it that re-resolving it by name goes through, stay resolvable until that operation
/// is done, and are forgotten then.
#[test]
fn an_inode_named_by_an_operation_in_flight_outlives_the_kernels_forget() {
    let r = rig(MountOptions::default());
    let top = r.mkdir(ROOT, "top");
    let d = r.mkdir(top, "d");
    let e = r.mkdir(ROOT, "e");
    let pinned = r.inner.pin(&[d]);
    assert_eq!(pinned, vec![d, top, ROOT]);
    r.inner.forget(d, 1);
    r.inner.forget(top, 1);
    // Without a pin, the kernel's forget ends an inode at once.
    r.inner.forget(e, 1);
    assert!(!r.inner.st().inodes.contains_key(&e));
    r.fs.restart();
    let me = r.inner.clone();
    let node = r.rt.block_on(async { me.with(|| me.node_of(d)).await });
    assert!(node.is_ok(), "{node:?}");
    r.inner.unpin(&pinned);
    assert!(!r.inner.st().inodes.contains_key(&d));
    assert!(!r.inner.st().inodes.contains_key(&top));
}

/// Appends through an `O_APPEND` handle go as `Append`; a resend of one that landed (its
/// answer lost with the session, the HOST then restarted) names the end the file had before
/// it, and the HOST does not write it twice — while a different payload at that end, or the
/// same one after another writer's bytes, is appended.
#[test]
fn an_append_resent_after_it_landed_is_not_written_twice() {
    let r = rig(MountOptions::default());
    let (_, fh) = r.create(ROOT, "log");
    let me = r.inner.clone();
    let sfh = me.st().handles.get(&fh).map(|h| h.fh).expect("handle");
    if let Some(h) = me.st().handles.get_mut(&fh) {
        h.flags |= libc::O_APPEND;
    }
    let write = |data: &[u8]| r.rt.block_on(me.write_sync(fh, 0, data));
    assert_eq!(write(b"one\n"), Ok(4));
    assert_eq!(write(b"two\n"), Ok(4));
    assert_eq!(r.fs.content(&["log"]).as_deref(), Some(&b"one\ntwo\n"[..]));
    // The handle knows where the file ends: what a resend of the next append would name.
    let end = me.st().handles.get(&fh).and_then(|h| h.append_end);
    assert_eq!(end, Some(8));
    let append = |end: Option<u64>, data: &[u8]| {
        r.rt.block_on(me.call_with(op::Append { fh: sfh, end }, data))
    };
    // "two\n" landed at 4: its resend is answered without writing again.
    let a = append(Some(4), b"two\n").expect("resend");
    assert_eq!((a.written, a.end), (4, 8));
    assert_eq!(r.fs.content(&["log"]).as_deref(), Some(&b"one\ntwo\n"[..]));
    // Not what is there: the first attempt did not land, so this one appends.
    assert_eq!(append(Some(4), b"2\n").map(|a| a.end), Ok(10));
    assert_eq!(append(Some(10), b"x\n").map(|a| a.end), Ok(12));
    assert_eq!(
        r.fs.content(&["log"]).as_deref(),
        Some(&b"one\ntwo\n2\nx\n"[..])
    );
    assert!(r.fs.calls(OpCode::Append) >= 5);
}
