//! Thin, errno-returning wrappers over the Linux syscalls the HOST side needs, all relative to
//! `O_PATH` descriptors so that no HOST path string is ever resolved from the root.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use crate::proto::{Attr, SetTime, StatFs, Ts};

/// A raw errno value.
pub type Errno = i32;

/// The calling thread's last errno.
pub fn last() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(rc: libc::c_int) -> Result<libc::c_int, Errno> {
    if rc < 0 {
        Err(last())
    } else {
        Ok(rc)
    }
}

/// A single path component as a C string; rejects empty names, `.`/`..`, `/` and NUL.
pub fn component(name: &[u8]) -> Result<CString, Errno> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(libc::EINVAL);
    }
    if name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

/// `openat2(dirfd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | extra)`.
pub fn openat2_beneath(
    dirfd: RawFd,
    path: &CStr,
    flags: i32,
    extra: u64,
) -> Result<OwnedFd, Errno> {
    // SAFETY: libc::open_how is plain old data; all-zero is a valid value (no flags, no resolve bits).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = 0;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | extra;
    loop {
        // SAFETY: `how` is a valid open_how of the size passed; `path` is NUL-terminated.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if rc >= 0 {
            // SAFETY: the kernel returned a fresh descriptor we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
        }
        let e = last();
        if e != libc::EAGAIN && e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Opens one component of `dirfd` as an `O_PATH` descriptor without following a trailing symlink.
pub fn lookup(dirfd: RawFd, name: &CStr) -> Result<OwnedFd, Errno> {
    openat2_beneath(
        dirfd,
        name,
        libc::O_PATH | libc::O_NOFOLLOW,
        libc::RESOLVE_NO_SYMLINKS,
    )
}

/// The `/proc/self/fd/N` path of a descriptor (re-opening an `O_PATH` fd for I/O).
pub fn fd_path(fd: RawFd) -> CString {
    // Cannot contain NUL.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// Re-opens an `O_PATH` descriptor with real access flags.
pub fn reopen(fd: RawFd, flags: i32) -> Result<OwnedFd, Errno> {
    let p = fd_path(fd);
    // O_NOFOLLOW would refuse the /proc magic link itself; the node was reached without
    // following anything already.
    let flags = (flags
        & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_PATH | libc::O_NOFOLLOW))
        | libc::O_CLOEXEC;
    loop {
        // SAFETY: valid C string; the result is checked.
        let rc = unsafe { libc::open(p.as_ptr(), flags) };
        if rc >= 0 {
            // SAFETY: fresh descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(rc) });
        }
        let e = last();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

fn ts(sec: i64, nsec: i64) -> Ts {
    Ts {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// Attributes of the node `fd` refers to, including whether it may have xattrs.
pub fn attr_of_node(fd: RawFd, st: &libc::stat) -> Attr {
    Attr {
        xattrs: pseudo_dev(fd, st.st_dev) || has_xattrs(fd),
        ..attr_of(st)
    }
}

/// True on procfs, sysfs and cgroup filesystems: their attributes are never cached on the DPU,
/// so the "no xattrs" hint is useless there, and asking costs a path walk through `/proc` on
/// every lookup. Remembered per device; a device number reused by another filesystem after an
/// unmount only costs the hint (or the probe), never a wrong answer.
fn pseudo_dev(fd: RawFd, dev: u64) -> bool {
    static SEEN: OnceLock<Mutex<HashMap<u64, bool>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let lock = || transport::sync::lock(seen);
    if let Some(&p) = lock().get(&dev) {
        return p;
    }
    // SAFETY: plain-old-data out parameter, checked result.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the whole call and `sfs` is a valid out buffer; the result is checked.
    if unsafe { libc::fstatfs(fd, &mut sfs) } != 0 {
        return false;
    }
    // Compared as u64: `f_type` is signed in glibc's struct and unsigned in musl's (the static
    // musl build of rexec compiles this crate too).
    let pseudo = [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::CGROUP_SUPER_MAGIC,
        libc::CGROUP2_SUPER_MAGIC,
    ]
    .iter()
    .any(|&m| m as u64 == sfs.f_type as u64);
    let mut map = lock();
    if map.len() >= 1024 {
        map.clear();
    }
    map.insert(dev, pseudo);
    pseudo
}

/// False only when the node certainly has no xattrs (an error says nothing: true).
pub fn has_xattrs(fd: RawFd) -> bool {
    let p = xattr_target(fd);
    // SAFETY: a size query with a null buffer.
    let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    n != 0
}

/// Converts a `struct stat` (without the xattr hint: "may have xattrs").
pub fn attr_of(st: &libc::stat) -> Attr {
    Attr {
        xattrs: true,
        ino: st.st_ino,
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        mode: st.st_mode,
        nlink: st.st_nlink.min(u32::MAX as u64) as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: st.st_blksize.clamp(0, u32::MAX as i64) as u32,
    }
}

/// lstat of `name` in `dirfd` (a symlink itself, not its target).
pub fn lstatat(dirfd: RawFd, name: &CStr) -> Result<libc::stat, Errno> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and pointers.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`.
pub fn fstat(fd: RawFd) -> Result<libc::stat, Errno> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// The id of the mount a descriptor lies on (`statx(STATX_MNT_ID)`, as in mountinfo).
pub fn mnt_id(fd: RawFd) -> Result<u64, Errno> {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    check(unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    })?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(libc::ENOSYS);
    }
    Ok(stx.stx_mnt_id)
}

/// readlinkat on an `O_PATH` symlink descriptor: the link text, never followed.
pub fn readlink(fd: RawFd) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer valid for its length.
    let n = unsafe {
        libc::readlinkat(
            fd,
            c"".as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// mkdirat.
pub fn mkdirat(dirfd: RawFd, name: &CStr, mode: u32) -> Result<(), Errno> {
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// mknodat.
pub fn mknodat(dirfd: RawFd, name: &CStr, mode: u32, rdev: u64) -> Result<(), Errno> {
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dirfd, name.as_ptr(), mode as libc::mode_t, rdev) }).map(drop)
}

/// symlinkat.
pub fn symlinkat(target: &CStr, dirfd: RawFd, name: &CStr) -> Result<(), Errno> {
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr()) }).map(drop)
}

/// unlinkat (`dir` selects AT_REMOVEDIR).
pub fn unlinkat(dirfd: RawFd, name: &CStr, dir: bool) -> Result<(), Errno> {
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) }).map(drop)
}

/// renameat2.
pub fn renameat2(
    olddir: RawFd,
    old: &CStr,
    newdir: RawFd,
    new: &CStr,
    flags: u32,
) -> Result<(), Errno> {
    // SAFETY: valid C strings.
    check(unsafe { libc::renameat2(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) }).map(drop)
}

/// linkat(fd, "", newdir, new, AT_EMPTY_PATH): hard-link the inode behind an `O_PATH` fd.
pub fn link_fd(fd: RawFd, newdir: RawFd, new: &CStr) -> Result<(), Errno> {
    // SAFETY: valid C strings.
    check(unsafe { libc::linkat(fd, c"".as_ptr(), newdir, new.as_ptr(), libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW); `u32::MAX` leaves an id unchanged.
pub fn chown_fd(fd: RawFd, uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: valid C string.
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod through `/proc/self/fd/N` (works for `O_PATH` fds of non-symlinks).
pub fn chmod_fd(fd: RawFd, mode: u32) -> Result<(), Errno> {
    let p = fd_path(fd);
    // SAFETY: valid C string.
    check(unsafe { libc::chmod(p.as_ptr(), (mode & 0o7777) as libc::mode_t) }).map(drop)
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as i64,
        },
    }
}

/// utimensat on the inode behind an `O_PATH` fd (symlinks included, never followed).
pub fn utimens_fd(fd: RawFd, atime: Option<SetTime>, mtime: Option<SetTime>) -> Result<(), Errno> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: valid pointers.
    check(unsafe {
        libc::utimensat(
            fd,
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// ftruncate.
pub fn ftruncate(fd: RawFd, size: u64) -> Result<(), Errno> {
    let size = i64::try_from(size).map_err(|_| libc::EFBIG)?;
    // SAFETY: plain syscall.
    check(unsafe { libc::ftruncate(fd, size) }).map(drop)
}

/// fstatfs (works on `O_PATH` fds).
pub fn statfs(fd: RawFd) -> Result<StatFs, Errno> {
    // SAFETY: zeroed struct is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    check(unsafe { libc::fstatvfs(fd, &mut s) })?;
    Ok(StatFs {
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: s.f_bsize as u32,
        namelen: s.f_namemax as u32,
        frsize: s.f_frsize as u32,
    })
}

/// Path used for the xattr syscalls: `/proc/self/fd/N` with the `l*` variants for symlinks.
fn xattr_target(fd: RawFd) -> CString {
    fd_path(fd)
}

/// getxattr; `size` 0 returns the size only (as `Err(None)` is not needed: Ok(len, data)).
pub fn getxattr(fd: RawFd, name: &CStr, size: u32) -> Result<(usize, Vec<u8>), Errno> {
    let p = xattr_target(fd);
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buffer valid for `size` bytes (or null-sized).
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(last());
    }
    buf.truncate(n as usize);
    Ok((n as usize, buf))
}

/// listxattr.
pub fn listxattr(fd: RawFd, size: u32) -> Result<(usize, Vec<u8>), Errno> {
    let p = xattr_target(fd);
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buffer valid for its length.
    let n =
        unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if n < 0 {
        return Err(last());
    }
    buf.truncate(n as usize);
    Ok((n as usize, buf))
}

/// setxattr.
pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> Result<(), Errno> {
    let p = xattr_target(fd);
    // SAFETY: valid pointers and lengths.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// removexattr.
pub fn removexattr(fd: RawFd, name: &CStr) -> Result<(), Errno> {
    let p = xattr_target(fd);
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// Reads into `buf` at `offset`: for regular files (`seekable`) pread(2) until `buf` is full
/// or EOF, so a short count means EOF; otherwise one read(2). Returns the bytes read, which
/// are initialised; the rest of `buf` is left as it was (it may be uninitialised memory: the
/// kernel only writes into it, nothing here reads it).
fn read_into(
    fd: RawFd,
    offset: u64,
    buf: &mut [std::mem::MaybeUninit<u8>],
    seekable: bool,
) -> Result<usize, Errno> {
    let mut got = 0usize;
    loop {
        let rest = &mut buf[got..];
        // SAFETY: the buffer is valid for writes of `rest.len()` bytes; read(2) and pread(2)
        // only write into it.
        let n = unsafe {
            if seekable {
                libc::pread(
                    fd,
                    rest.as_mut_ptr() as *mut libc::c_void,
                    rest.len(),
                    (offset + got as u64) as i64,
                )
            } else {
                libc::read(fd, rest.as_mut_ptr() as *mut libc::c_void, rest.len())
            }
        };
        if n < 0 {
            let e = last();
            if e == libc::EINTR {
                continue;
            }
            if got > 0 {
                break;
            }
            return Err(e);
        }
        got += n as usize;
        if n == 0 || !seekable || got == buf.len() {
            break;
        }
    }
    Ok(got)
}

/// pread into a buffer of `size` bytes; loops for regular files so short reads mean EOF.
pub fn pread(fd: RawFd, offset: u64, size: u32, seekable: bool) -> Result<Vec<u8>, Errno> {
    let mut buf = Vec::new();
    append_read(fd, offset, size, seekable, &mut buf)?;
    Ok(buf)
}

/// Appends up to `size` bytes of a regular file at `offset` to `buf` (short only at EOF).
pub fn pread_append(fd: RawFd, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<(), Errno> {
    append_read(fd, offset, size, true, buf)
}

/// Reads up to `size` bytes straight into `buf`'s spare capacity: a 1 MiB read is not
/// zero-filled first (that memset was ~10 % of the HOST's CPU in a bulk read).
fn append_read(
    fd: RawFd,
    offset: u64,
    size: u32,
    seekable: bool,
    buf: &mut Vec<u8>,
) -> Result<(), Errno> {
    let start = buf.len();
    buf.reserve(size as usize);
    let got = read_into(
        fd,
        offset,
        &mut buf.spare_capacity_mut()[..size as usize],
        seekable,
    )?;
    // SAFETY: `read_into` initialised the first `got` bytes of the spare capacity, and
    // `got <= size <= capacity - start`.
    unsafe { buf.set_len(start + got) };
    Ok(())
}

/// pwrite of the whole buffer (regular files) or one write(2) (pipes and devices).
pub fn pwrite(fd: RawFd, offset: u64, data: &[u8], seekable: bool) -> Result<usize, Errno> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            if seekable {
                libc::pwrite(
                    fd,
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    (offset + done as u64) as i64,
                )
            } else {
                libc::write(fd, rest.as_ptr() as *const libc::c_void, rest.len())
            }
        };
        if n < 0 {
            let e = last();
            if e == libc::EINTR {
                continue;
            }
            if done > 0 {
                break;
            }
            return Err(e);
        }
        done += n as usize;
        if !seekable || n == 0 {
            break;
        }
    }
    Ok(done)
}

/// fsync / fdatasync.
pub fn fsync(fd: RawFd, datasync: bool) -> Result<(), Errno> {
    // SAFETY: plain syscalls.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

/// fallocate.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| libc::EINVAL)?;
    // SAFETY: plain syscall.
    check(unsafe { libc::fallocate(fd, mode, off, len) }).map(drop)
}

/// lseek (SEEK_DATA / SEEK_HOLE answer from the HOST file).
pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> Result<i64, Errno> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        Err(last())
    } else {
        Ok(r)
    }
}

fn flock_of(start: u64, end: u64, typ: i32) -> libc::flock {
    // SAFETY: zeroed flock is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start.min(i64::MAX as u64) as i64;
    // FUSE uses an inclusive end with u64::MAX (OFFSET_MAX) meaning "to EOF".
    fl.l_len = if end >= i64::MAX as u64 {
        0
    } else {
        (end - start.min(end) + 1) as i64
    };
    fl
}

/// Open-file-description lock query: returns (start, end, type, pid).
pub fn getlk(fd: RawFd, start: u64, end: u64, typ: i32) -> Result<(u64, u64, i32, u32), Errno> {
    let mut fl = flock_of(start, end, typ);
    // SAFETY: valid pointer.
    check(unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) })?;
    if fl.l_type == libc::F_UNLCK as i16 {
        return Ok((0, 0, libc::F_UNLCK, 0));
    }
    let s = fl.l_start.max(0) as u64;
    let e = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        s + fl.l_len as u64 - 1
    };
    Ok((s, e, fl.l_type as i32, fl.l_pid.max(0) as u32))
}

/// Open-file-description lock set (blocking when `sleep`).
pub fn setlk(fd: RawFd, start: u64, end: u64, typ: i32, sleep: bool) -> Result<(), Errno> {
    let fl = flock_of(start, end, typ);
    let cmd = if sleep {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: valid pointer.
        let rc = unsafe { libc::fcntl(fd, cmd, &fl) };
        if rc >= 0 {
            return Ok(());
        }
        let e = last();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// poll(2) on one descriptor.
pub fn poll(fd: RawFd, events: u32, wait_ms: u32) -> Result<u32, Errno> {
    let mut p = libc::pollfd {
        fd,
        events: events as i16,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, wait_ms.min(i32::MAX as u32) as i32) };
    if rc < 0 {
        return Err(last());
    }
    Ok(p.revents as u16 as u32)
}

/// faccessat as the caller's uid/gid (AT_EACCESS uses the effective ids; we switch fsuid).
pub fn access_as(fd: RawFd, mask: i32, uid: u32, gid: u32) -> Result<(), Errno> {
    let p = fd_path(fd);
    // fsuid/fsgid are per thread: this runs on a blocking worker thread and is restored.
    // SAFETY: plain syscalls.
    unsafe {
        let old_gid = libc::setfsgid(gid);
        let old_uid = libc::setfsuid(uid);
        let rc = libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask, libc::AT_EACCESS);
        let e = last();
        libc::setfsuid(old_uid as u32);
        libc::setfsgid(old_gid as u32);
        if rc < 0 {
            Err(e)
        } else {
            Ok(())
        }
    }
}

/// Reads every entry of the directory behind an `O_PATH` fd: (name, type bits, d_ino).
pub fn read_dir(fd: RawFd) -> Result<Vec<(Vec<u8>, u32, u64)>, Errno> {
    let d = reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut dir = nix::dir::Dir::from_fd(d).map_err(|e| e as i32)?;
    let mut out = Vec::new();
    for ent in dir.iter() {
        let ent = ent.map_err(|e| e as i32)?;
        use nix::dir::Type;
        let kind = match ent.file_type() {
            Some(Type::Fifo) => libc::S_IFIFO,
            Some(Type::CharacterDevice) => libc::S_IFCHR,
            Some(Type::Directory) => libc::S_IFDIR,
            Some(Type::BlockDevice) => libc::S_IFBLK,
            Some(Type::File) => libc::S_IFREG,
            Some(Type::Symlink) => libc::S_IFLNK,
            Some(Type::Socket) => libc::S_IFSOCK,
            None => 0,
        };
        out.push((ent.file_name().to_bytes().to_vec(), kind, ent.ino()));
    }
    Ok(out)
}

/// A fresh random u64 (server instance ids).
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: buffer valid for 8 bytes.
    let n = unsafe { libc::getrandom(v.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n == 8 {
        u64::from_ne_bytes(v)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ ((std::process::id() as u64) << 32)
    }
}
