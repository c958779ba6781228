//! Asynchronous directory operations of a qtfs mount (`nowsync`, the default): in directories
//! the mount made, create, mkdir, symlink, unlink and setattr are answered at once and sent to
//! the HOST in order. These tests check what that must not change: a failure on the HOST still
//! reaches the application (at close/fsync of the file, at the next listing/fsync of the
//! directory), `-o wsync` and `-o sync` make the operations synchronous (errors at once), the
//! DPU's inode numbers stay those it handed out, the HOST ends in the state the sequence of
//! operations describes, and a HOST restart loses nothing acknowledged.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::fs::{
    fs_test_links, fuse_ready, host_with_export, tmpdir, workload_across_restart, ExportSpec, Host,
    Mount,
};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn os_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// open(O_CREAT|O_EXCL|O_WRONLY) then close: (open's errno, close's errno), 0 for success.
fn create_close(p: &Path) -> (i32, i32) {
    let c = cpath(p);
    // SAFETY: plain libc calls on a path we own; the errors are the point.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o644,
        )
    };
    if fd < 0 {
        return (os_errno(), 0);
    }
    // SAFETY: fd was just opened by us.
    let rc = unsafe { libc::close(fd) };
    (0, if rc == 0 { 0 } else { os_errno() })
}

/// A small tmpfs mounted at `dir` (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, opts: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "asyncdir-tiny"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs {opts}");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn root_and_fuse(test: &str) -> bool {
    if !fuse_ready(test) {
        return false;
    }
    if !tests::is_root() {
        tests::skip(test, "needs root to mount a small tmpfs on the HOST side");
        return false;
    }
    true
}

/// An asynchronous create the HOST refuses (its filesystem is out of inodes) is answered at
/// once, and the failure comes back from close(2) — or from fsync(2) when that comes first.
/// The directory is synchronous after a failure. With `-o wsync` and `-o sync` the open itself
/// fails. Files whose close succeeded are on the HOST; the refused ones are not.
#[test]
fn fs_async_create_error_surfaces_at_close() {
    let test = "fs_async_create_error_surfaces_at_close";
    if !root_and_fuse(test) {
        return;
    }
    for kind in fs_test_links(test) {
        for opts in ["", "wsync", "sync"] {
            let tmp = tmpdir();
            let exp = tmp.path().join("export");
            let tiny = exp.join("tiny");
            let _t = Tmpfs::mount(&tiny, "size=1m,nr_inodes=12");
            let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
            let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), opts);
            // Made through the mount: the mount knows everything in it.
            fs::create_dir(m.path("tiny/d")).unwrap();
            let mut made = Vec::new();
            let mut failure = None;
            for i in 0..40 {
                let p = m.path(&format!("tiny/d/f{i}"));
                match create_close(&p) {
                    (0, 0) => made.push(i),
                    (o, c) => {
                        failure = Some((i, o, c));
                        break;
                    }
                }
            }
            let Some((i, open_err, close_err)) = failure else {
                panic!("[{kind} {opts:?}] 40 creates in a tmpfs of 12 inodes all succeeded");
            };
            if opts.is_empty() {
                assert_eq!(
                    (open_err, close_err),
                    (0, libc::ENOSPC),
                    "[{kind}] create #{i}: the open is answered at once, close reports ENOSPC"
                );
                // The failure ended the mount's exclusive knowledge: the next create is
                // synchronous and fails at once.
                let p = m.path("tiny/d/next");
                assert_eq!(
                    create_close(&p),
                    (libc::ENOSPC, 0),
                    "[{kind}] after a failure"
                );
            } else {
                assert_eq!(
                    (open_err, close_err),
                    (libc::ENOSPC, 0),
                    "[{kind} {opts}] create #{i}: synchronous, the open fails"
                );
            }
            assert!(!made.is_empty(), "[{kind} {opts:?}] nothing was created");
            for j in &made {
                assert!(
                    tiny.join(format!("d/f{j}")).exists(),
                    "[{kind} {opts:?}] f{j} closed without error but not on the HOST"
                );
            }
            assert!(!tiny.join(format!("d/f{i}")).exists());
            if opts.is_empty() {
                // fsync is a synchronous point too: a new directory (the mount knows it), an
                // asynchronous create in it the HOST cannot do.
                fs::remove_file(m.path(&format!("tiny/d/f{}", made[0]))).unwrap();
                fs::create_dir(m.path("tiny/e")).unwrap();
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(m.path("tiny/e/x"))
                    .expect("asynchronous create answered at once");
                assert_eq!(
                    errno(f.sync_all()),
                    libc::ENOSPC,
                    "[{kind}] fsync reports it"
                );
                drop(f);
                assert!(!tiny.join("e/x").exists());
            }
            drop(m);
        }
    }
}

/// Removing a file's last name through the mount frees it on the HOST at once, as a local
/// `rm` does: the HOST daemon does not keep the inode (and its space) until the DPU's forget
/// arrives, so a full filesystem has room again the moment `rm` or a `mv` over the file
/// returns. A file with another name, or one still open on the DPU, stays whole.
#[test]
fn fs_remove_frees_the_host_inode_at_once() {
    let test = "fs_remove_frees_the_host_inode_at_once";
    if !root_and_fuse(test) {
        return;
    }
    const BIG: usize = 700 << 10;
    for kind in fs_test_links(test) {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        let tiny = exp.join("tiny");
        let _t = Tmpfs::mount(&tiny, "size=1m");
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        // Synchronous removals: the HOST made the files, so the mount does not know the
        // directory whole.
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
        let fill = |name: &str| fs::write(tiny.join(name), vec![7u8; BIG]);
        fill("big").expect("the first big file fits");
        assert_eq!(
            errno(fill("nospace")),
            libc::ENOSPC,
            "[{kind}] two do not fit"
        );
        fs::remove_file(tiny.join("nospace")).unwrap();

        // rm: the DPU looked the file up (its kernel and the HOST hold the node).
        assert_eq!(fs::metadata(m.path("tiny/big")).unwrap().len(), BIG as u64);
        fs::remove_file(m.path("tiny/big")).unwrap();
        fill("big2").unwrap_or_else(|e| panic!("[{kind}] the space of an rm file: {e}"));

        // mv over it.
        fs::write(tiny.join("small"), b"s").unwrap();
        assert_eq!(fs::metadata(m.path("tiny/big2")).unwrap().len(), BIG as u64);
        fs::rename(m.path("tiny/small"), m.path("tiny/big2")).unwrap();
        fill("big3").unwrap_or_else(|e| panic!("[{kind}] the space of a replaced file: {e}"));
        assert_eq!(fs::read(m.path("tiny/big2")).unwrap(), b"s");

        // Another name keeps the file: still readable through the mount by that name.
        fs::hard_link(tiny.join("big3"), tiny.join("link")).unwrap();
        assert_eq!(fs::metadata(m.path("tiny/big3")).unwrap().nlink(), 2);
        fs::remove_file(m.path("tiny/big3")).unwrap();
        assert_eq!(
            fs::metadata(m.path("tiny/link")).unwrap().nlink(),
            1,
            "[{kind}] the link"
        );
        assert_eq!(
            fs::read(m.path("tiny/link")).unwrap().len(),
            BIG,
            "[{kind}] the link"
        );

        // Open on the DPU: the file lives on until it is closed, as locally.
        let mut f = fs::File::open(m.path("tiny/link")).unwrap();
        fs::remove_file(m.path("tiny/link")).unwrap();
        assert_eq!(
            errno(fill("big4")),
            libc::ENOSPC,
            "[{kind}] an open file keeps its space"
        );
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut back).unwrap();
        assert_eq!(
            back.len(),
            BIG,
            "[{kind}] read after rm through the open file"
        );
        assert_eq!(f.metadata().unwrap().nlink(), 0, "[{kind}] fstat after rm");
        drop(f);
        drop(m);
    }
}

/// An asynchronous unlink the HOST refuses (here: the file was removed on the HOST behind the
/// mount's back — no change feed — so it answers ENOENT) returns at once, and the failure comes back from the
/// next listing of the directory (opendir) — or from fsync of the directory — once. With
/// `-o wsync` the unlink itself fails.
#[test]
fn fs_async_unlink_error_surfaces_at_listing() {
    let test = "fs_async_unlink_error_surfaces_at_listing";
    if !fuse_ready(test) {
        return;
    }
    for kind in fs_test_links(test) {
        for opts in [
            "coherent_ttl=0,entry_timeout=60,attr_timeout=60",
            "coherent_ttl=0,entry_timeout=60,attr_timeout=60,wsync",
        ] {
            let (tmp, exp, host) = host_with_export(&kind);
            let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), opts);
            let sync = opts.ends_with("wsync");
            for (dir, by_fsync) in [("d", false), ("d2", true)] {
                fs::create_dir(m.path(dir)).unwrap();
                fs::write(m.path(&format!("{dir}/f")), b"x").unwrap();
                fs::write(m.path(&format!("{dir}/keep")), b"k").unwrap();
                // The mount still has the name cached; the HOST no longer has the file.
                // Opened before: opening a directory is itself a listing's first step.
                let d = fs::File::open(m.path(dir)).unwrap();
                fs::remove_file(exp.join(format!("{dir}/f"))).unwrap();
                let r = fs::remove_file(m.path(&format!("{dir}/f")));
                if sync {
                    assert_eq!(
                        errno(r),
                        libc::ENOENT,
                        "[{kind}] wsync: unlink fails at once"
                    );
                    assert!(fs::read_dir(m.path(dir)).is_ok());
                    continue;
                }
                assert!(
                    r.is_ok(),
                    "[{kind}] asynchronous unlink answered at once: {r:?}"
                );
                if by_fsync {
                    // SAFETY: fsync of a descriptor we own.
                    let rc = unsafe { libc::fsync(d.as_raw_fd()) };
                    assert_eq!(
                        if rc == 0 { 0 } else { os_errno() },
                        libc::ENOENT,
                        "[{kind}] fsync of the directory reports the unlink's failure"
                    );
                } else {
                    assert_eq!(
                        errno(fs::read_dir(m.path(dir))),
                        libc::ENOENT,
                        "[{kind}] the next listing reports the unlink's failure"
                    );
                }
                // Reported once; the listing then shows the HOST's state.
                let names: Vec<_> = fs::read_dir(m.path(dir))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert_eq!(names, ["keep"], "[{kind}]");
            }
            drop(m);
        }
    }
}

/// Inode numbers the mount hands out for asynchronously made nodes stay the same once the HOST
/// answered: a later lookup (entry TTL 0: every path walk asks the HOST, which names the node
/// by its own id) and a listing find the same inode.
#[test]
fn fs_async_inode_numbers_stable() {
    let test = "fs_async_inode_numbers_stable";
    if !fuse_ready(test) {
        return;
    }
    for kind in fs_test_links(test) {
        let (tmp, exp, host) = host_with_export(&kind);
        let m = Mount::new(
            &host,
            &exp,
            &tmp.path().join("mnt"),
            "entry_timeout=0,attr_timeout=0",
        );
        fs::create_dir(m.path("d")).unwrap();
        let mut f = fs::File::create(m.path("d/f")).unwrap();
        let ino_open = f.metadata().unwrap().ino();
        let ino_path = fs::metadata(m.path("d/f")).unwrap().ino();
        fs::create_dir(m.path("d/sub")).unwrap();
        let sub_before = fs::metadata(m.path("d/sub")).unwrap().ino();
        std::os::unix::fs::symlink("f", m.path("d/l")).unwrap();
        let l_before = fs::symlink_metadata(m.path("d/l")).unwrap().ino();
        f.write_all(b"data").unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(ino_open, ino_path, "[{kind}]");
        for _ in 0..3 {
            assert_eq!(
                fs::metadata(m.path("d/f")).unwrap().ino(),
                ino_open,
                "[{kind}] f"
            );
            assert_eq!(
                fs::metadata(m.path("d/sub")).unwrap().ino(),
                sub_before,
                "[{kind}]"
            );
            assert_eq!(fs::symlink_metadata(m.path("d/l")).unwrap().ino(), l_before);
            std::thread::sleep(Duration::from_millis(50));
        }
        let listed: Vec<(String, u64)> = fs::read_dir(m.path("d"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let ino = e.metadata().unwrap().ino();
                (e.file_name().into_string().unwrap(), ino)
            })
            .collect();
        for (name, ino) in listed {
            let want = match name.as_str() {
                "f" => ino_open,
                "sub" => sub_before,
                "l" => l_before,
                other => panic!("[{kind}] unexpected {other}"),
            };
            assert_eq!(ino, want, "[{kind}] {name} in a listing");
        }
        assert_eq!(fs::read(exp.join("d/f")).unwrap(), b"data");
        drop(m);
    }
}

/// Create, write, chmod, utimes, rename and unlink, symlink and mkdir in quick succession in
/// directories the mount made end in exactly the HOST state they describe.
#[test]
fn fs_async_operations_keep_order() {
    let test = "fs_async_operations_keep_order";
    if !fuse_ready(test) {
        return;
    }
    for kind in fs_test_links(test) {
        let (tmp, exp, host) = host_with_export(&kind);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
        fs::create_dir(m.path("d")).unwrap();
        for i in 0..200 {
            let a = m.path(&format!("d/a{i}"));
            let mut f = fs::File::create(&a).unwrap();
            write!(f, "content {i}").unwrap();
            f.set_permissions(fs::Permissions::from_mode(0o600 + (i % 8)))
                .unwrap();
            drop(f);
            fs::rename(&a, m.path(&format!("d/b{i}"))).unwrap();
            if i % 2 == 0 {
                fs::remove_file(m.path(&format!("d/b{i}"))).unwrap();
            }
        }
        fs::create_dir(m.path("d/sub")).unwrap();
        fs::create_dir(m.path("d/sub/deeper")).unwrap();
        fs::write(m.path("d/sub/deeper/x"), b"deep").unwrap();
        std::os::unix::fs::symlink("deeper/x", m.path("d/sub/l")).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        fs::File::options()
            .write(true)
            .open(m.path("d/sub/deeper/x"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        fs::write(m.path("d/gone"), b"g").unwrap();
        fs::remove_file(m.path("d/gone")).unwrap();
        // A listing waits for what is in flight in the directory (and reports failures).
        let mut names: Vec<String> = fs::read_dir(m.path("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..200)
            .filter(|i| i % 2 == 1)
            .map(|i| format!("b{i}"))
            .collect();
        want.push("sub".into());
        want.sort();
        assert_eq!(names, want, "[{kind}] listing through the mount");
        let check_host = || {
            let mut host_names: Vec<String> = fs::read_dir(exp.join("d"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            host_names.sort();
            assert_eq!(host_names, want, "[{kind}] on the HOST");
            for i in (0..200).filter(|i| i % 2 == 1) {
                let p = exp.join(format!("d/b{i}"));
                assert_eq!(fs::read_to_string(&p).unwrap(), format!("content {i}"));
                let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                assert_eq!(mode, 0o600 + (i % 8), "[{kind}] mode of b{i}");
            }
            assert_eq!(fs::read(exp.join("d/sub/deeper/x")).unwrap(), b"deep");
            assert_eq!(
                fs::read_link(exp.join("d/sub/l")).unwrap(),
                Path::new("deeper/x")
            );
            let mt = fs::metadata(exp.join("d/sub/deeper/x")).unwrap().modified();
            assert_eq!(mt.unwrap(), t, "[{kind}] mtime set through the mount");
        };
        check_host();
        // Through the mount, the same.
        assert_eq!(
            fs::read_to_string(m.path("d/sub/l")).unwrap(),
            "deep",
            "[{kind}]"
        );
        drop(m);
        check_host();
    }
}

/// The HOST daemon is killed and restarted while a workload creates and writes files in a
/// directory the mount made (asynchronous creates in flight): every file whose close
/// succeeded is on the HOST with its content.
#[test]
fn fs_async_host_restart_delivers_acknowledged() {
    let test = "fs_async_host_restart_delivers_acknowledged";
    if !fuse_ready(test) {
        return;
    }
    for kind in fs_test_links(test) {
        let (tmp, exp, mut host) = host_with_export(&kind);
        // The mount's own log: unmounting must drain, not panic.
        let log = tmp.path().join("mount.log");
        let m = Mount::new(
            &host,
            &exp,
            &tmp.path().join("mnt"),
            &format!("timeout=60,log={}", log.display()),
        );
        fs::create_dir(m.path("work")).unwrap();
        let script = format!(
            "i=0; while [ ! -e {stop} ] || [ $i -lt 200 ]; do \
               mkdir -p {dir}/s$((i % 7)) || exit 3; \
               printf 'payload %s' $i > {dir}/s$((i % 7))/w-$i || exit 1; \
               ln -s w-$i {dir}/s$((i % 7))/l-$i || exit 4; \
               i=$((i+1)); done; echo $i",
            stop = tmp.path().join("stop").display(),
            dir = m.path("work").display()
        );
        let out = workload_across_restart(
            &mut host,
            &script,
            &tmp.path().join("stop"),
            Duration::from_millis(600),
            Duration::from_millis(500),
        );
        assert!(
            out.status.success(),
            "[{kind}] workload failed: {}",
            out.status
        );
        let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(n >= 200, "[{kind}] {n}");
        // Unmounting delivers what is still in flight.
        drop(m);
        let deadline = Instant::now() + Duration::from_secs(10);
        let missing = |i: usize| {
            let p = exp.join(format!("work/s{}/w-{i}", i % 7));
            fs::read_to_string(&p).ok() != Some(format!("payload {i}"))
                || fs::read_link(exp.join(format!("work/s{}/l-{i}", i % 7))).is_err()
        };
        while (0..n).any(missing) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let lost: Vec<String> = (0..n)
            .filter(|&i| missing(i))
            .map(|i| {
                let d = exp.join(format!("work/s{}", i % 7));
                format!(
                    "{i}: file {:?}, link {:?}",
                    fs::read_to_string(d.join(format!("w-{i}"))),
                    fs::read_link(d.join(format!("l-{i}")))
                )
            })
            .collect();
        let log = fs::read_to_string(&log).unwrap_or_default();
        assert!(
            lost.is_empty(),
            "[{kind}] acknowledged but not on the HOST: {lost:?}\nmount log:\n{log}"
        );
        assert!(!log.contains("panicked"), "[{kind}] mount log:\n{log}");
    }
}

/// A name made on the HOST behind the mount's back in a directory the mount made (no change
/// notification): an asynchronous create of it is answered at once and its EEXIST comes at
/// close; the directory is synchronous then and the HOST's file is left alone. After
/// a synchronous point (a listing), attributes through the mount are the HOST's.
#[test]
fn fs_async_foreign_name_and_attributes() {
    let test = "fs_async_foreign_name_and_attributes";
    if !fuse_ready(test) {
        return;
    }
    for kind in fs_test_links(test) {
        let (tmp, exp, host) = host_with_export(&kind);
        let m = Mount::new(
            &host,
            &exp,
            &tmp.path().join("mnt"),
            // No change feed: the HOST's create stays unknown to the mount.
            "coherent_ttl=0,negative_timeout=60,attr_timeout=30,entry_timeout=30",
        );
        fs::create_dir(m.path("u")).unwrap();
        // Closing a file made after the mkdir: both are on the HOST.
        fs::write(m.path("u/mine"), b"m").unwrap();
        fs::write(exp.join("u/clash"), b"c").unwrap();
        assert_eq!(
            create_close(&m.path("u/clash")),
            (0, libc::EEXIST),
            "[{kind}] the open is answered at once, close reports EEXIST"
        );
        // The HOST's file is untouched (the mount's kernel may keep the attributes it was
        // told for the name until they expire: nothing invalidates them yet).
        assert_eq!(fs::read(exp.join("u/clash")).unwrap(), b"c", "[{kind}]");
        assert_eq!(
            create_close(&m.path("u/clash2")),
            (0, 0),
            "[{kind}] a new name"
        );
        fs::write(exp.join("u/clash3"), b"c").unwrap();
        assert_eq!(
            create_close(&m.path("u/clash3")),
            (libc::EEXIST, 0),
            "[{kind}] synchronous after the failure: the HOST's name is found"
        );

        fs::create_dir(m.path("d")).unwrap();
        fs::write(m.path("d/f"), b"data").unwrap();
        fs::create_dir(m.path("d/sub")).unwrap();
        std::os::unix::fs::symlink("f", m.path("d/l")).unwrap();
        fs::set_permissions(m.path("d/f"), fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 3);
        let key = |m: &fs::Metadata| {
            (
                m.mode(),
                m.nlink(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        };
        for rel in ["d", "d/f", "d/sub", "d/l"] {
            let dpu = fs::symlink_metadata(m.path(rel)).unwrap();
            let host = fs::symlink_metadata(exp.join(rel)).unwrap();
            assert_eq!(
                key(&dpu),
                key(&host),
                "[{kind}] {rel}: DPU and HOST attributes differ"
            );
        }
        drop(m);
    }
}

/// The HOST's side of client-chosen ids, spoken directly in the wire protocol over real
/// sessions (a hostile DPU is not limited to what the mount sends): an alias names the node
/// and handle its create made, only in the session that made it; an id without
/// [`proto::ALIAS_BIT`] is never taken as an alias (no remapping the HOST's own ids); a failed
/// create's alias fails with its errno; forget and release end the alias.
#[test]
fn fs_alias_ids_are_per_session() {
    use bytes::Bytes;
    use offload_fs::proto::{self, op, Caller, Operation, Status, ALIAS_BIT};
    use transport::{Registry, Session, SessionConfig};

    async fn call<O: Operation>(
        s: &Session,
        instance: u64,
        o: O,
        data: &[u8],
    ) -> Result<O::Reply, i32> {
        let req = proto::encode_request(instance, &o, data).unwrap();
        let reply = s.call("fs", Bytes::from(req)).await.expect("call");
        match proto::decode_reply::<O::Reply>(&reply).unwrap() {
            Ok((r, _)) => Ok(r),
            Err(Status::Errno(e)) => Err(e),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    for kind in tests::link_kinds() {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir(&exp).unwrap();
        fs::write(exp.join("taken"), b"t").unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        rt.block_on(async {
            let connect = || async {
                let key = transport::auth::Key::load(&host.key).unwrap();
                let ep = tests::connect_url(&host.listen).parse().unwrap();
                Session::connect(&ep, SessionConfig::new(Some(key)), Registry::new())
                    .await
                    .unwrap()
            };
            let (a, b) = (connect().await, connect().await);
            let mount = |s: Session| {
                let path = exp.display().to_string();
                async move {
                    let m = op::Mount {
                        version: proto::VERSION,
                        path,
                    };
                    call(&s, 0, m, &[]).await.unwrap().unwrap()
                }
            };
            let ma = mount(a.clone()).await;
            let mb = mount(b.clone()).await;
            let (inst, root) = (ma.instance, ma.root.node);
            let (node, fh) = (ALIAS_BIT | 1, ALIAS_BIT | 2);
            let create = |name: &str, alias: (u64, u64)| op::Create {
                parent: root,
                name: name.as_bytes().to_vec(),
                mode: 0o644,
                flags: libc::O_RDWR | libc::O_EXCL,
                caller: Caller::default(),
                alias: Some(alias),
            };
            let c = call(&a, inst, create("new", (node, fh)), &[])
                .await
                .unwrap();
            // The alias names the node and the handle in this session.
            let at = call(&a, inst, op::GetAttr { node, fh: None }, &[])
                .await
                .unwrap();
            assert_eq!(at.ino, c.entry.attr.ino, "[{kind}]");
            let n = call(&a, inst, op::Write { fh, offset: 0 }, b"via alias").await;
            assert_eq!(n, Ok(9), "[{kind}]");
            assert_eq!(fs::read(exp.join("new")).unwrap(), b"via alias");
            // Not in another session.
            let other = call(&b, mb.instance, op::GetAttr { node, fh: None }, &[]).await;
            assert_eq!(other.unwrap_err(), libc::ESTALE, "[{kind}] other session");
            let other = call(&b, mb.instance, op::Write { fh, offset: 0 }, b"x").await;
            assert_eq!(other.unwrap_err(), libc::ESTALE, "[{kind}] other session");
            // The HOST's own ids are never remapped: "aliasing" the root to a new file.
            let c2 = call(&a, inst, create("hijack", (root, c.opened.fh)), &[]).await;
            assert!(c2.is_ok(), "[{kind}]");
            let rattr = call(
                &a,
                inst,
                op::GetAttr {
                    node: root,
                    fh: None,
                },
                &[],
            )
            .await;
            assert_eq!(
                rattr.unwrap().mode & libc::S_IFMT,
                libc::S_IFDIR,
                "[{kind}]"
            );
            // A failed create's alias fails with its errno.
            let bad = (ALIAS_BIT | 3, ALIAS_BIT | 4);
            let e = call(&a, inst, create("taken", bad), &[]).await;
            assert_eq!(e.unwrap_err(), libc::EEXIST, "[{kind}]");
            let e = call(
                &a,
                inst,
                op::GetAttr {
                    node: bad.0,
                    fh: None,
                },
                &[],
            )
            .await;
            assert_eq!(
                e.unwrap_err(),
                libc::EEXIST,
                "[{kind}] the alias of a failed create"
            );
            let e = call(
                &a,
                inst,
                op::Write {
                    fh: bad.1,
                    offset: 0,
                },
                b"x",
            )
            .await;
            assert_eq!(e.unwrap_err(), libc::EEXIST, "[{kind}]");
            // Release and forget end the aliases.
            call(
                &a,
                inst,
                op::Release {
                    fh,
                    lock_owner: None,
                },
                &[],
            )
            .await
            .unwrap();
            let e = call(&a, inst, op::Write { fh, offset: 0 }, b"x").await;
            assert_eq!(e.unwrap_err(), libc::ESTALE, "[{kind}] after release");
            call(
                &a,
                inst,
                op::Forget {
                    nodes: vec![(node, 1)],
                },
                &[],
            )
            .await
            .unwrap();
            let e = call(&a, inst, op::GetAttr { node, fh: None }, &[]).await;
            assert_eq!(e.unwrap_err(), libc::ESTALE, "[{kind}] after forget");
            assert_eq!(fs::read(exp.join("new")).unwrap(), b"via alias");
        });
    }
}
