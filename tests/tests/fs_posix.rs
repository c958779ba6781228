//! POSIX behaviour of a qtfs mount (real offloadd, real FUSE mount) over every test link kind:
//! every operation of the fs issue with its errno cases, link counts, timestamps,
//! sticky/setgid directories, locks, xattrs, sparse files.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use tests::fs::{
    as_nobody, fs_test_links, fuse_ready, sh, tmpdir, ExportSpec, Host, Mount, SmallTmpfs,
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

fn last_errno(rc: i32) -> i32 {
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn suite(kind: &str) {
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    fs::create_dir(&exp).unwrap();
    let host = Host::start(kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "attr_timeout=0.2");
    let mp = |r: &str| m.path(r);
    let hp = |r: &str| exp.join(r);

    // create / write / read / append, visible on the HOST.
    fs::write(mp("f"), b"hello").unwrap();
    assert_eq!(fs::read(hp("f")).unwrap(), b"hello");
    {
        let mut f = OpenOptions::new().append(true).open(mp("f")).unwrap();
        f.write_all(b" world").unwrap();
    }
    assert_eq!(fs::read_to_string(mp("f")).unwrap(), "hello world");
    // HOST-side change visible (attr cache is 0.2 s; no writeback cache).
    fs::write(hp("f"), b"from host, longer").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(fs::read_to_string(mp("f")).unwrap(), "from host, longer");

    // truncate (setattr size) both ways.
    OpenOptions::new()
        .write(true)
        .open(mp("f"))
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(fs::read(hp("f")).unwrap(), b"from");
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(mp("f"))
        .unwrap();
    assert_eq!(fs::metadata(hp("f")).unwrap().len(), 0);

    // random access read/write, large I/O.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
    fs::write(mp("big"), &big).unwrap();
    assert_eq!(fs::read(hp("big")).unwrap(), big);
    let mut f = File::open(mp("big")).unwrap();
    f.seek(SeekFrom::Start(1_234_567)).unwrap();
    let mut buf = [0u8; 100];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &big[1_234_567..1_234_667]);

    // ENOENT, EEXIST, EISDIR, ENOTDIR, ENOTEMPTY.
    assert_eq!(errno(File::open(mp("missing"))), libc::ENOENT);
    fs::create_dir(mp("d")).unwrap();
    assert!(hp("d").is_dir());
    assert_eq!(errno(fs::create_dir(mp("d"))), libc::EEXIST);
    assert_eq!(
        errno(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(mp("big"))
        ),
        libc::EEXIST
    );
    assert_eq!(
        errno(OpenOptions::new().write(true).open(mp("d"))),
        libc::EISDIR
    );
    assert_eq!(errno(File::open(mp("big/x"))), libc::ENOTDIR);
    assert_eq!(errno(fs::create_dir(mp("big/x"))), libc::ENOTDIR);
    fs::write(mp("d/inner"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(mp("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(mp("d"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_dir(mp("big"))), libc::ENOTDIR);
    fs::remove_file(mp("d/inner")).unwrap();
    fs::remove_dir(mp("d")).unwrap();
    assert!(!hp("d").exists());

    // readdir of a larger directory (several readdirplus rounds).
    fs::create_dir(mp("many")).unwrap();
    for i in 0..600 {
        fs::write(hp(&format!("many/file-with-a-longish-name-{i:04}")), b"").unwrap();
    }
    let mut names: Vec<_> = fs::read_dir(mp("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 600);
    assert_eq!(names[599], "file-with-a-longish-name-0599");
    sh(&format!("rm -rf {}", mp("many").display()));
    assert!(!hp("many").exists());

    // rename: plain, onto existing, RENAME_NOREPLACE, RENAME_EXCHANGE.
    fs::write(mp("a"), b"A").unwrap();
    fs::write(mp("b"), b"B").unwrap();
    fs::rename(mp("a"), mp("a2")).unwrap();
    assert!(!hp("a").exists() && hp("a2").exists());
    // SAFETY: both paths are NUL-terminated CStrings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(&mp("a2")).as_ptr(),
            libc::AT_FDCWD,
            cpath(&mp("b")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(last_errno(rc), libc::EEXIST);
    // SAFETY: both paths are NUL-terminated CStrings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(&mp("a2")).as_ptr(),
            libc::AT_FDCWD,
            cpath(&mp("b")).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(last_errno(rc), 0);
    assert_eq!(fs::read(hp("a2")).unwrap(), b"B");
    assert_eq!(fs::read(hp("b")).unwrap(), b"A");
    fs::rename(mp("a2"), mp("b")).unwrap();
    assert_eq!(fs::read(mp("b")).unwrap(), b"B");
    // Renamed file still usable under its new name after caches expire.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(fs::read(mp("b")).unwrap(), b"B");

    // hard links and link counts.
    fs::hard_link(mp("b"), mp("b-link")).unwrap();
    assert_eq!(fs::metadata(mp("b")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(hp("b")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(mp("b")).unwrap().ino(),
        fs::metadata(mp("b-link")).unwrap().ino()
    );
    fs::remove_file(mp("b")).unwrap();
    assert_eq!(fs::metadata(mp("b-link")).unwrap().nlink(), 1);
    assert_eq!(errno(fs::hard_link(mp("missing"), mp("x"))), libc::ENOENT);
    assert_eq!(errno(fs::hard_link(mp("b-link"), mp("f"))), libc::EEXIST);
    let dirlink_cnt = {
        fs::create_dir(mp("dl")).unwrap();
        fs::create_dir(mp("dl/sub")).unwrap();
        fs::metadata(mp("dl")).unwrap().nlink()
    };
    assert_eq!(dirlink_cnt, 3);

    // symlinks.
    std::os::unix::fs::symlink("b-link", mp("sl")).unwrap();
    assert_eq!(fs::read_link(mp("sl")).unwrap(), Path::new("b-link"));
    assert_eq!(fs::read_link(hp("sl")).unwrap(), Path::new("b-link"));
    assert_eq!(fs::read(mp("sl")).unwrap(), b"B");
    assert!(fs::symlink_metadata(mp("sl"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::os::unix::fs::symlink("/nonexistent/x", mp("dangling")).unwrap();
    assert_eq!(errno(File::open(mp("dangling"))), libc::ENOENT);

    // chmod / chown / timestamps.
    fs::set_permissions(mp("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(hp("f")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(mp("f"), Some(65534), Some(65534)).unwrap();
    let md = fs::metadata(hp("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    std::os::unix::fs::chown(mp("f"), Some(0), Some(0)).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(mp("f"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    let md = fs::metadata(hp("f")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!(md.atime(), 1_000_000_000);
    assert_eq!(fs::metadata(mp("f")).unwrap().mtime(), 1_000_000_000);
    // A write moves mtime forward.
    fs::write(mp("f"), b"new").unwrap();
    assert!(fs::metadata(mp("f")).unwrap().mtime() > 1_000_000_000);
    // mode given at creation is honoured exactly (umask applied by the caller's kernel).
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(mp("private"))
        .unwrap();
    drop(f);
    assert_eq!(fs::metadata(hp("private")).unwrap().mode() & 0o777, 0o600);

    // mknod: FIFO created as a real FIFO on the HOST; device nodes refused by default.
    // SAFETY: cpath gives a NUL-terminated string that lives across the call.
    let rc = unsafe { libc::mkfifo(cpath(&mp("fifo")).as_ptr(), 0o644) };
    assert_eq!(last_errno(rc), 0);
    assert!(fs::metadata(hp("fifo")).unwrap().file_type().is_fifo());
    assert!(fs::metadata(mp("fifo")).unwrap().file_type().is_fifo());
    // SAFETY: cpath gives a NUL-terminated string that lives across the call.
    let rc = unsafe {
        libc::mknod(
            cpath(&mp("null")).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(last_errno(rc), libc::EPERM);

    // statfs is the HOST filesystem's.
    // SAFETY: libc::statvfs is plain old data; all-zero is a valid value.
    let mut a: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: libc::statvfs is plain old data; all-zero is a valid value.
    let mut b: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and a valid out buffer, both live across the call.
    assert_eq!(unsafe { libc::statvfs(cpath(&m.dir).as_ptr(), &mut a) }, 0);
    // SAFETY: NUL-terminated path and a valid out buffer, both live across the call.
    assert_eq!(unsafe { libc::statvfs(cpath(&exp).as_ptr(), &mut b) }, 0);
    assert_eq!(a.f_blocks, b.f_blocks);
    assert_eq!(a.f_bsize, b.f_bsize);

    // xattrs.
    let name = c"user.qtfs";
    let p = cpath(&mp("f"));
    // SAFETY: NUL-terminated name and path; the value is a static buffer of the length passed.
    let rc = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), b"v1".as_ptr() as _, 2, 0) };
    assert_eq!(last_errno(rc), 0);
    let mut vb = [0u8; 16];
    // SAFETY: NUL-terminated name and path; `vb` is writable for the 16 bytes passed.
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), vb.as_mut_ptr() as _, 16) };
    assert_eq!(&vb[..n as usize], b"v1");
    let hpath = cpath(&hp("f"));
    // SAFETY: NUL-terminated name and path; `vb` is writable for the 16 bytes passed.
    let n = unsafe { libc::getxattr(hpath.as_ptr(), name.as_ptr(), vb.as_mut_ptr() as _, 16) };
    assert_eq!(n, 2);
    // SAFETY: a null buffer of size 0 only asks for the value's size.
    let size = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, 2);
    let mut lb = [0u8; 256];
    // SAFETY: NUL-terminated path; `lb` is writable for the 256 bytes passed.
    let n = unsafe { libc::listxattr(p.as_ptr(), lb.as_mut_ptr() as _, 256) };
    assert!(n > 0);
    assert!(lb[..n as usize]
        .split(|&c| c == 0)
        .any(|s| s == b"user.qtfs"));
    // SAFETY: NUL-terminated name and path; the value is a static buffer of the length passed.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            b"v2".as_ptr() as _,
            2,
            libc::XATTR_CREATE,
        )
    };
    assert_eq!(last_errno(rc), libc::EEXIST);
    // SAFETY: NUL-terminated name and path that outlive the call.
    let rc = unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) };
    assert_eq!(last_errno(rc), 0);
    // SAFETY: NUL-terminated name and path; `vb` is writable for the 16 bytes passed.
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), vb.as_mut_ptr() as _, 16) };
    assert_eq!(last_errno(n as i32), libc::ENODATA);

    // fallocate + SEEK_DATA / SEEK_HOLE on a sparse file.
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mp("sparse"))
            .unwrap();
        // SAFETY: fallocate on the open file `f`; no memory is passed.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) };
        assert_eq!(last_errno(rc), 0);
        assert_eq!(fs::metadata(hp("sparse")).unwrap().len(), 65536);
        // Unwritten (fallocated) extents count as holes on ext4: write real data.
        (&f).write_all(&[1u8; 65536]).unwrap();
        f.set_len(8 << 20).unwrap();
        // SAFETY: lseek on the open file `f`; no memory is passed.
        let off = unsafe { libc::lseek(f.as_raw_fd(), 4 << 20, libc::SEEK_DATA) };
        assert_eq!(
            last_errno(off as i32),
            libc::ENXIO,
            "no data after the allocated head"
        );
        // SAFETY: lseek on the open file `f`; no memory is passed.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
        assert!((65536..=8 << 20).contains(&hole), "hole at {hole}");
        // SAFETY: lseek on the open file `f`; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(data, 0);
    }

    // fsync / fdatasync / fsyncdir.
    {
        let f = OpenOptions::new().write(true).open(mp("f")).unwrap();
        f.sync_all().unwrap();
        f.sync_data().unwrap();
        File::open(&m.dir).unwrap().sync_all().unwrap();
    }

    // POSIX locks: held through the mount, seen by another process on the mount and on the HOST.
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(mp("f"))
            .unwrap();
        // SAFETY: libc::flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: F_SETLK reads the flock `fl`, which lives across the call; `f` is open.
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
        let probe = |path: &Path| {
            Command::new("python3")
                .arg("-c")
                .arg(
                    "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n print('got')\nexcept OSError as e:\n print('busy',e.errno)",
                )
                .arg(path)
                .output()
                .unwrap()
        };
        let out = String::from_utf8_lossy(&probe(&mp("f")).stdout).into_owned();
        assert!(out.starts_with("busy"), "mount-side probe: {out}");
        let out = String::from_utf8_lossy(&probe(&hp("f")).stdout).into_owned();
        assert!(out.starts_with("busy"), "HOST-side probe: {out}");
        // SAFETY: libc::flock is plain old data; all-zero is a valid value.
        let mut q: libc::flock = unsafe { std::mem::zeroed() };
        q.l_type = libc::F_WRLCK as i16;
        q.l_whence = libc::SEEK_SET as i16;
        // F_GETLK from a forked checker would need fork in a threaded test; check via python.
        let out = Command::new("python3")
            .arg("-c")
            .arg("import fcntl,struct,sys\nf=open(sys.argv[1],'r+')\nr=fcntl.fcntl(f,fcntl.F_GETLK,struct.pack('hhqqi',fcntl.F_WRLCK,0,0,0,0))\nprint(struct.unpack('hhqqi',r)[0])")
            .arg(mp("f"))
            .output()
            .unwrap();
        let typ: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(-1);
        assert_eq!(typ, libc::F_WRLCK, "F_GETLK reports the write lock");
        fl.l_type = libc::F_UNLCK as i16;
        // SAFETY: F_SETLK reads the flock `fl`, which lives across the call; `f` is open.
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
        let out = String::from_utf8_lossy(&probe(&mp("f")).stdout).into_owned();
        assert!(out.starts_with("got"), "after unlock: {out}");
        let _ = q;
    }

    // poll on a regular file is always ready.
    {
        let f = File::open(mp("f")).unwrap();
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that lives across the call (nfds = 1).
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        assert!(pfd.revents & libc::POLLIN != 0);
    }

    // EACCES for an unprivileged user (kernel checks with default_permissions).
    fs::write(mp("secret"), b"s").unwrap();
    fs::set_permissions(mp("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody("cat", &[mp("secret").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = as_nobody("touch", &[mp("nobody-file").to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "nobody created a file in a 0755 root dir"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("test -w {}", mp("secret").display()))
        .uid_gid(65534)
        .status()
        .unwrap();
    assert!(!out.success(), "access(W_OK) as nobody");

    // Sticky directory: nobody may create and remove its own file, not root's.
    fs::create_dir(mp("sticky")).unwrap();
    fs::set_permissions(mp("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(fs::metadata(hp("sticky")).unwrap().mode() & 0o7777, 0o1777);
    fs::write(mp("sticky/roots"), b"r").unwrap();
    let out = as_nobody("touch", &[mp("sticky/mine").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fs::metadata(hp("sticky/mine")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (65534, 65534),
        "created file owned by the caller"
    );
    let out = as_nobody("rm", &["-f", mp("sticky/roots").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
    let out = as_nobody("rm", &[mp("sticky/mine").to_str().unwrap()]);
    assert!(out.status.success());
    let out = as_nobody("mkdir", &[mp("sticky/nd").to_str().unwrap()]);
    assert!(out.status.success());
    // The mount made `sticky`: the mkdir there is asynchronous, and a listing is where it is
    // known done on the HOST (as on NFS/CephFS, not when mkdir(2) returned).
    assert!(fs::read_dir(mp("sticky")).is_ok());
    assert_eq!(fs::metadata(hp("sticky/nd")).unwrap().uid(), 65534);

    // setgid directory: new entries inherit the group, subdirectories the setgid bit.
    fs::create_dir(mp("sg")).unwrap();
    std::os::unix::fs::chown(mp("sg"), None, Some(4321)).unwrap();
    fs::set_permissions(mp("sg"), fs::Permissions::from_mode(0o2777)).unwrap();
    fs::write(mp("sg/file"), b"").unwrap();
    fs::create_dir(mp("sg/sub")).unwrap();
    // A listing: the asynchronous mkdir is done on the HOST (see sticky/nd above).
    assert!(fs::read_dir(mp("sg")).is_ok());
    assert_eq!(fs::metadata(hp("sg/file")).unwrap().gid(), 4321);
    let sub = fs::metadata(hp("sg/sub")).unwrap();
    assert_eq!(sub.gid(), 4321);
    assert!(
        sub.mode() & libc::S_ISGID != 0,
        "setgid inherited by subdirectory"
    );
    let out = as_nobody("touch", &[mp("sg/nb").to_str().unwrap()]);
    assert!(out.status.success());
    let md = fs::metadata(hp("sg/nb")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 4321));

    // EXDEV: rename across a HOST mount boundary inside the export.
    fs::create_dir(hp("sub-fs")).unwrap();
    sh(&format!(
        "mount -t tmpfs qtfs-test {}",
        hp("sub-fs").display()
    ));
    let r = fs::rename(mp("f"), mp("sub-fs/f"));
    sh(&format!("umount -l {}", hp("sub-fs").display()));
    assert_eq!(errno(r), libc::EXDEV);
    assert_eq!(fs::read(hp("f")).unwrap(), b"new");

    // Everything was released: nothing is wrong with the mount after all that.
    assert!(fs::read_dir(&m.dir).unwrap().count() > 5);
    let _ = ErrorKind::NotFound;
}

trait UidGid {
    fn uid_gid(&mut self, id: u32) -> &mut Self;
}

impl UidGid for Command {
    fn uid_gid(&mut self, id: u32) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.uid(id).gid(id)
    }
}

#[test]
fn fs_posix_suite() {
    for kind in fs_test_links("fs_posix_suite") {
        eprintln!("--- link {kind}");
        suite(&kind);
    }
}

#[test]
fn fs_read_only_export_and_ro_mount() {
    for kind in fs_test_links("fs_read_only_export_and_ro_mount") {
        let tmp = tmpdir();
        let ro = tmp.path().join("ro");
        let rw = tmp.path().join("rw");
        fs::create_dir(&ro).unwrap();
        fs::create_dir(&rw).unwrap();
        fs::write(ro.join("f"), b"data").unwrap();
        fs::write(rw.join("f"), b"data").unwrap();
        let host = Host::start(
            &kind,
            tmp.path(),
            &[ExportSpec::ro(&ro), ExportSpec::rw(&rw)],
        );
        let m = Mount::new(&host, &ro, &tmp.path().join("m1"), "");
        assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
        assert_eq!(errno(fs::write(m.path("f"), b"x")), libc::EROFS);
        assert_eq!(errno(fs::write(m.path("new"), b"x")), libc::EROFS);
        assert_eq!(errno(fs::create_dir(m.path("d"))), libc::EROFS);
        assert_eq!(errno(fs::remove_file(m.path("f"))), libc::EROFS);
        assert_eq!(
            errno(fs::set_permissions(
                m.path("f"),
                fs::Permissions::from_mode(0o600)
            )),
            libc::EROFS
        );
        assert_eq!(errno(fs::rename(m.path("f"), m.path("g"))), libc::EROFS);
        assert_eq!(fs::read(ro.join("f")).unwrap(), b"data");
        // A read-write export mounted with -o ro.
        let m2 = Mount::new(&host, &rw, &tmp.path().join("m2"), "ro");
        assert_eq!(errno(fs::write(m2.path("f"), b"x")), libc::EROFS);
        assert_eq!(fs::read(m2.path("f")).unwrap(), b"data");
        // EXDEV between two mounts.
        let m3 = Mount::new(&host, &rw, &tmp.path().join("m3"), "");
        assert_eq!(errno(fs::rename(m3.path("f"), m.path("f2"))), libc::EXDEV);
        drop((m, m2, m3));
    }
}

/// The DPU answers the kernel's re-reads of attributes it has just received from the HOST
/// (a directory's attributes after a create in it, a file's after a `utimes`) without asking
/// again; every answer must still be what the HOST holds: post-op directory attributes, sizes
/// after writes, link counts after removals. And `negative_timeout` (off by default) must
/// never hide a file the HOST creates in a directory the DPU made unless asked for.
#[test]
fn fs_reused_attributes_match_the_host() {
    for kind in fs_test_links("fs_reused_attributes_match_the_host") {
        eprintln!("--- link {kind}");
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir(&exp).unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        // Long TTLs, so reuse is what answers whenever it is allowed to. Synchronous directory
        // operations: the HOST's attributes come back with each answer (the asynchronous ones
        // are checked after a synchronous point in fs_asyncdir).
        let m = Mount::new(
            &host,
            &exp,
            &tmp.path().join("mnt"),
            "attr_timeout=30,entry_timeout=30,wsync",
        );
        let mp = |r: &str| m.path(r);
        let hp = |r: &str| exp.join(r);
        let same = |rel: &str| {
            let (d, h) = (
                fs::metadata(mp(rel)).unwrap(),
                fs::metadata(hp(rel)).unwrap(),
            );
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
            assert_eq!(key(&d), key(&h), "{rel}: DPU and HOST attributes differ");
        };

        // A directory after creates, mkdirs, symlinks and links in it (post-op attributes).
        fs::create_dir(mp("d")).unwrap();
        same("d");
        fs::write(mp("d/f"), b"x").unwrap();
        same("d");
        fs::create_dir(mp("d/sub")).unwrap();
        same("d");
        std::os::unix::fs::symlink("f", mp("d/l")).unwrap();
        same("d");
        fs::hard_link(mp("d/f"), mp("d/h")).unwrap();
        same("d");
        same("d/f");

        // A size after a write that followed a utimes (whose attributes must not be reused).
        {
            let f = File::create(mp("w")).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
                .unwrap();
            (&f).write_all(&[7u8; 100]).unwrap();
            std::os::unix::fs::fchown(&f, Some(0), Some(0)).unwrap();
            assert_eq!(f.metadata().unwrap().size(), 100);
        }
        same("w");
        // chmod, then chown (whose suid check re-reads the mode the chmod returned).
        fs::set_permissions(mp("w"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::chown(mp("w"), Some(1), Some(1)).unwrap();
        same("w");

        // Link counts after unlink and rename, which the HOST does not report per inode.
        assert_eq!(fs::metadata(mp("d/f")).unwrap().nlink(), 2);
        fs::remove_file(mp("d/h")).unwrap();
        assert_eq!(fs::metadata(mp("d/f")).unwrap().nlink(), 1);
        same("d/f");
        fs::hard_link(mp("d/f"), mp("d/h2")).unwrap();
        fs::write(mp("d/other"), b"y").unwrap();
        fs::rename(mp("d/other"), mp("d/h2")).unwrap();
        assert_eq!(fs::metadata(mp("d/f")).unwrap().nlink(), 1);
        same("d/f");
        same("d");

        // Default: a file the HOST creates in a directory the DPU just made is seen (at once
        // without the change feed; within milliseconds with it, see fs_coherence): a shim's
        // pid file in the bundle directory containerd made.
        fs::create_dir(mp("bundle")).unwrap();
        fs::write(hp("bundle/init.pid"), b"42").unwrap();
        let t0 = std::time::Instant::now();
        while fs::read(mp("bundle/init.pid")).ok().as_deref() != Some(&b"42"[..]) {
            assert!(
                t0.elapsed().as_secs() < 3,
                "HOST-side file in a DPU-made directory not seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }

        // negative_timeout (opt-in, without the change feed): names the mount did not make in
        // its new directory are taken as absent until a listing shows otherwise; its own names
        // are found. (With synchronous directory operations: an asynchronous create's EEXIST
        // comes at close, see fs_asyncdir.)
        let m2 = Mount::new(
            &host,
            &exp,
            &tmp.path().join("mnt2"),
            "coherent_ttl=0,negative_timeout=60,wsync",
        );
        fs::create_dir(m2.path("unpack")).unwrap();
        fs::write(m2.path("unpack/mine"), b"m").unwrap();
        fs::write(hp("unpack/theirs"), b"t").unwrap();
        assert_eq!(errno(fs::metadata(m2.path("unpack/theirs"))), libc::ENOENT);
        assert_eq!(fs::read(m2.path("unpack/mine")).unwrap(), b"m");
        let mut names: Vec<_> = fs::read_dir(m2.path("unpack"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["mine", "theirs"]);
        assert_eq!(fs::read(m2.path("unpack/theirs")).unwrap(), b"t");
        // A create that finds a name the mount did not make ends the assumption at once.
        fs::create_dir(m2.path("unpack2")).unwrap();
        fs::write(hp("unpack2/clash"), b"c").unwrap();
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m2.path("unpack2/clash"));
        assert_eq!(errno(r), libc::EEXIST);
        assert_eq!(fs::read(m2.path("unpack2/clash")).unwrap(), b"c");
        drop((m, m2));
    }
}

/// Write-behind (the default): writes are acknowledged once queued, so a failure on the HOST
/// must come back at the latest from close(2), and everything acknowledged before it must be
/// on the HOST. The HOST directory is a 256 KiB tmpfs, so the HOST runs out of space.
#[test]
fn fs_write_behind_reports_host_errors() {
    tests::init_tracing();
    if !fuse_ready("fs_write_behind_reports_host_errors") {
        return;
    }
    if !tests::is_root() {
        tests::skip(
            "fs_write_behind_reports_host_errors",
            "needs root to mount a small tmpfs on the HOST side",
        );
        return;
    }
    for kind in tests::link_kinds() {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir(&exp).unwrap();
        let tiny = exp.join("tiny");
        fs::create_dir(&tiny).unwrap();
        let _tiny_guard = SmallTmpfs::mount(&tiny, "256k");
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");

        let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let path = cpath(&m.path("tiny/x"));
        // SAFETY: plain libc calls on a path and buffers we own; close's result is the point.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644) };
        assert!(fd >= 0, "open: {}", std::io::Error::last_os_error());
        let mut acked = 0usize;
        let mut write_err = 0;
        for _ in 0..16 {
            // SAFETY: `chunk` is readable for `chunk.len()` bytes and `fd` is open.
            let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
            if n < 0 {
                write_err = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
                break;
            }
            acked += n as usize;
        }
        // SAFETY: `fd` is owned here (into_raw_fd above) and closed exactly once.
        let rc = unsafe { libc::close(fd) };
        let close_err = last_errno(rc);
        assert!(
            write_err == libc::ENOSPC || close_err == libc::ENOSPC,
            "[{kind}] 1 MiB into a 256 KiB HOST fs: write error {write_err}, close error \
             {close_err}, {acked} bytes acknowledged"
        );
        // What the HOST holds is the acknowledged data, in order.
        let on_host = fs::read(tiny.join("x")).unwrap();
        assert!(
            on_host.len() >= 128 * 1024,
            "[{kind}] only {} bytes",
            on_host.len()
        );
        for (i, b) in on_host.iter().enumerate() {
            assert_eq!(*b, chunk[i % chunk.len()], "[{kind}] byte {i}");
        }
        // Once reported, the error is gone: a new file after freeing space works.
        fs::remove_file(m.path("tiny/x")).unwrap();
        fs::write(m.path("tiny/y"), &chunk).unwrap();
        assert_eq!(fs::read(tiny.join("y")).unwrap(), chunk);
        drop(m);
    }
}
