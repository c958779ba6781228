//! FIFOs on qtfs behave like FIFOs (fs/src/fifo.rs): real `offloadd` + real FUSE mounts over
//! every link kind. DPU = the mount, HOST = the export directory. Covered: `stat` shows a FIFO
//! on the DPU; HOST writer → DPU reader (blocking, `O_RDONLY|O_NONBLOCK`, containerd's
//! `O_RDWR|O_NONBLOCK`) and DPU writer → HOST reader, with EOF when the last writer closes;
//! ENXIO for a non-blocking writer without reader; poll and EAGAIN; the open patterns of Go's
//! `containerd/fifo` emulated (an `O_PATH` handle re-opened through `/proc/self/fd/N` in a
//! thread); no descriptor left in either daemon afterwards; a multi-MiB transfer; unlink while
//! open; the tunnel protocol spoken directly (hostile streams); real containerd with its state
//! directory on qtfs. Prints the latency from a HOST writer's open to the DPU reader's first
//! byte.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tests::fs::{fs_test_links, tmpdir, ExportSpec, Host, Mount};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn mkfifo(p: &Path) {
    assert_eq!(
        // SAFETY: cpath gives a NUL-terminated string that lives across the call.
        unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o666) },
        0,
        "mkfifo {p:?}"
    );
}

fn open_raw(p: &Path, flags: i32) -> Result<OwnedFd, i32> {
    // SAFETY: cpath gives a NUL-terminated string that lives across the call.
    let fd = unsafe { libc::open(cpath(p).as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        // SAFETY: open(2) just returned this fd (>= 0); nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// poll(2) on one descriptor; returns revents (0 on timeout).
fn poll1(fd: &OwnedFd, events: i16, ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that lives across the call (nfds = 1).
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc > 0 {
        p.revents
    } else {
        0
    }
}

enum Rd {
    Data(Vec<u8>),
    Eof,
    Again,
}

fn read_raw(fd: &OwnedFd) -> Rd {
    let mut b = vec![0u8; 65536];
    // SAFETY: `b` is a writable buffer of `b.len()` bytes and `fd` is open.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
    if n > 0 {
        b.truncate(n as usize);
        Rd::Data(b)
    } else if n == 0 {
        Rd::Eof
    } else {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap();
        assert_eq!(e, libc::EAGAIN, "read failed");
        Rd::Again
    }
}

/// Reads a non-blocking FIFO with poll until EOF (or, with `until`, until that many bytes);
/// panics after `limit`.
fn drain_nonblock(fd: &OwnedFd, until: Option<usize>, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        if until.is_some_and(|n| out.len() >= n) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "no EOF/data within {limit:?}: got {out:?}"
        );
        let ev = poll1(fd, libc::POLLIN, 100);
        if ev == 0 {
            continue;
        }
        match read_raw(fd) {
            Rd::Data(d) => out.extend_from_slice(&d),
            Rd::Eof => return out,
            Rd::Again => {}
        }
    }
}

/// Waits for a child with a bound and returns its stdout.
fn finish(mut c: Child, what: &str, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut out = Vec::new();
            if let Some(mut o) = c.stdout.take() {
                o.read_to_end(&mut out).unwrap();
            }
            assert!(st.success(), "{what} failed: {st}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cat(p: &Path) -> Child {
    Command::new("cat")
        .arg(p)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A thread's result with a deadline (the thread is left behind on timeout).
fn join_within<T: Send + 'static>(h: std::thread::JoinHandle<T>, what: &str, limit: Duration) -> T {
    let deadline = Instant::now() + limit;
    while !h.is_finished() {
        assert!(Instant::now() < deadline, "{what}: hung for {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().unwrap()
}

/// The pid of the `mount_qtfs` process serving `dir`.
fn mount_pid(dir: &Path) -> u32 {
    let want = dir.display().to_string();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains("mount_qtfs"))
            && args.iter().any(|a| a == &want)
            && args.iter().any(|a| a == "-f")
        {
            return pid;
        }
    }
    panic!("no mount_qtfs process for {want}");
}

/// Descriptors of `pid` that name `path` (also as "(deleted)"): (fd, is O_PATH).
fn fds_on(pid: u32, path: &Path) -> Vec<(String, bool)> {
    let want = path.display().to_string();
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(t) = fs::read_link(e.path()) else {
            continue;
        };
        let t = t.display().to_string();
        if t == want || t == format!("{want} (deleted)") {
            let n = e.file_name().to_string_lossy().into_owned();
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            v.push((n, flags & libc::O_PATH as u32 != 0));
        }
    }
    v
}

fn wait_no_fds(what: &str, pid: u32, path: &Path, allow_opath: bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let fds: Vec<_> = fds_on(pid, path)
            .into_iter()
            .filter(|(_, opath)| !(allow_opath && *opath))
            .collect();
        if fds.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still holds {fds:?} on {} after {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    exp: PathBuf,
    host: Host,
    m: Mount,
}

fn setup(kind: &str) -> Setup {
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    fs::create_dir(&exp).unwrap();
    let host = Host::start(kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    // FIFO_TEST_MOUNT_LOG=FILE keeps the mount daemon's log (with RUST_LOG) for debugging.
    let extra = std::env::var("FIFO_TEST_MOUNT_LOG")
        .map(|f| format!("log={f}"))
        .unwrap_or_default();
    let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), &extra);
    Setup {
        _tmp: tmp,
        exp,
        host,
        m,
    }
}

#[test]
fn fs_fifo_host_writer_dpu_reader() {
    for kind in fs_test_links("fs_fifo_host_writer_dpu_reader") {
        let s = setup(&kind);
        // stat on the DPU: a FIFO, whether made on the HOST or through the mount.
        mkfifo(&s.exp.join("h"));
        assert!(fs::metadata(s.m.path("h")).unwrap().file_type().is_fifo());
        mkfifo(&s.m.path("d"));
        assert!(fs::metadata(s.exp.join("d")).unwrap().file_type().is_fifo());
        assert!(fs::metadata(s.m.path("d")).unwrap().file_type().is_fifo());
        let sh = |script: String| Command::new("sh").arg("-c").arg(script).spawn().unwrap();

        // Blocking DPU reader first, HOST writer later.
        let reader = cat(&s.m.path("h"));
        std::thread::sleep(Duration::from_millis(200));
        let w = sh(format!(
            "printf 'one\\ntwo\\n' > {}",
            s.exp.join("h").display()
        ));
        assert_eq!(
            finish(reader, "DPU cat", Duration::from_secs(10)),
            b"one\ntwo\n"
        );
        finish(w, "HOST writer", Duration::from_secs(10));

        // HOST writer first (blocked in open), DPU reader later.
        let w = sh(format!("echo late > {}", s.exp.join("h").display()));
        std::thread::sleep(Duration::from_millis(200));
        let reader = cat(&s.m.path("h"));
        assert_eq!(
            finish(reader, "DPU cat (writer first)", Duration::from_secs(10)),
            b"late\n"
        );
        finish(w, "HOST writer", Duration::from_secs(10));

        // O_RDONLY|O_NONBLOCK on the DPU: the open does not block, poll says when data comes,
        // EOF once the writer closed.
        let fd = open_raw(&s.m.path("h"), libc::O_RDONLY | libc::O_NONBLOCK).unwrap();
        assert_eq!(poll1(&fd, libc::POLLIN, 50), 0, "nothing to read yet");
        let w = sh(format!("printf 'nonblock' > {}", s.exp.join("h").display()));
        assert_eq!(
            drain_nonblock(&fd, None, Duration::from_secs(10)),
            b"nonblock"
        );
        finish(w, "HOST writer", Duration::from_secs(10));
        drop(fd);

        // containerd's shim-log reader: O_RDWR|O_NONBLOCK. Gets the bytes; no EOF (it holds a
        // writer itself), reads return EAGAIN, as with a local FIFO.
        let fd = open_raw(&s.m.path("h"), libc::O_RDWR | libc::O_NONBLOCK).unwrap();
        assert!(matches!(read_raw(&fd), Rd::Again));
        let w = sh(format!("printf 'rdwr' > {}", s.exp.join("h").display()));
        assert_eq!(
            drain_nonblock(&fd, Some(4), Duration::from_secs(10)),
            b"rdwr"
        );
        finish(w, "HOST writer", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            poll1(&fd, libc::POLLIN, 0) & (libc::POLLHUP | libc::POLLIN),
            0
        );
        assert!(matches!(read_raw(&fd), Rd::Again));
        // A second HOST writer reaches the same reader.
        let w = sh(format!("printf 'again' > {}", s.exp.join("h").display()));
        assert_eq!(
            drain_nonblock(&fd, Some(5), Duration::from_secs(10)),
            b"again"
        );
        finish(w, "HOST writer", Duration::from_secs(10));
        drop(fd);

        // A FIFO made through the mount works the same way.
        let reader = cat(&s.m.path("d"));
        std::thread::sleep(Duration::from_millis(100));
        fs::write(s.exp.join("d"), b"made on the DPU\n").unwrap();
        assert_eq!(
            finish(reader, "DPU cat of d", Duration::from_secs(10)),
            b"made on the DPU\n"
        );

        // Many blocked DPU readers share the DPU pipe: one writer's byte reaches one of them
        // and every one sees EOF.
        let readers: Vec<Child> = (0..8).map(|_| cat(&s.m.path("h"))).collect();
        std::thread::sleep(Duration::from_millis(300));
        fs::write(s.exp.join("h"), b"x").unwrap();
        let total: Vec<u8> = readers
            .into_iter()
            .flat_map(|r| finish(r, "blocked reader", Duration::from_secs(10)))
            .collect();
        assert_eq!(total, b"x");

        // Latency: HOST writer's open → the waiting DPU reader's first byte (reader waiting in
        // poll), and DPU reader's open → first byte with the HOST writer already waiting.
        let mut waiting = Vec::new();
        let mut late = Vec::new();
        for _ in 0..15 {
            // Past the EOF hold-off of the previous round (fs/src/fifo.rs, EOF_HOLD_OFF).
            std::thread::sleep(Duration::from_millis(150));
            let fd = open_raw(&s.m.path("h"), libc::O_RDONLY | libc::O_NONBLOCK).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            let t0 = Instant::now();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(s.exp.join("h"))
                .unwrap();
            f.write_all(b"t").unwrap();
            assert_eq!(drain_nonblock(&fd, Some(1), Duration::from_secs(10)), b"t");
            waiting.push(t0.elapsed());
            drop(f);
            assert_eq!(drain_nonblock(&fd, None, Duration::from_secs(10)), b"");
            drop(fd);

            std::thread::sleep(Duration::from_millis(150));
            let hp = s.exp.join("h");
            let wt = std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new().write(true).open(hp).unwrap();
                f.write_all(b"u").unwrap();
            });
            std::thread::sleep(Duration::from_millis(30));
            let t0 = Instant::now();
            let mut f = fs::File::open(s.m.path("h")).unwrap();
            let mut b = [0u8; 1];
            f.read_exact(&mut b).unwrap();
            late.push(t0.elapsed());
            join_within(wt, "HOST writer", Duration::from_secs(10));
            let mut rest = Vec::new();
            f.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
        waiting.sort();
        late.sort();
        eprintln!(
            "{kind}: HOST writer open -> DPU reader's first byte: median {:?} max {:?}; \
             DPU reader open (HOST writer waiting) -> first byte: median {:?} max {:?}",
            waiting[waiting.len() / 2],
            waiting[waiting.len() - 1],
            late[late.len() / 2],
            late[late.len() - 1]
        );
    }
}

#[test]
fn fs_fifo_dpu_writer_host_reader() {
    for kind in fs_test_links("fs_fifo_dpu_writer_host_reader") {
        let s = setup(&kind);
        mkfifo(&s.exp.join("f"));

        // No reader anywhere: a non-blocking writer gets ENXIO on the DPU.
        assert_eq!(
            open_raw(&s.m.path("f"), libc::O_WRONLY | libc::O_NONBLOCK).err(),
            Some(libc::ENXIO)
        );

        // Blocking HOST reader first, DPU writer later.
        // (A HOST reader given an early EOF would leave the DPU writer blocked in `open`: the
        // writer runs on a thread, so that shows as a failure, not a hang.)
        let reader = cat(&s.exp.join("f"));
        std::thread::sleep(Duration::from_millis(200));
        let mp = s.m.path("f");
        let wt = std::thread::spawn(move || {
            let mut w = fs::OpenOptions::new().write(true).open(mp).unwrap();
            for i in 0..100 {
                writeln!(w, "line {i} from the DPU").unwrap();
            }
        });
        let out = String::from_utf8(finish(reader, "HOST cat", Duration::from_secs(10))).unwrap();
        assert_eq!(out.lines().count(), 100, "HOST cat read {out:?}");
        join_within(
            wt,
            "DPU writer (HOST reader first)",
            Duration::from_secs(10),
        );
        assert_eq!(out.lines().last(), Some("line 99 from the DPU"));

        // DPU writer first (blocked in open), HOST reader later.
        let mp = s.m.path("f");
        let wt = std::thread::spawn(move || {
            let mut w = fs::OpenOptions::new().write(true).open(mp).unwrap();
            w.write_all(b"writer first\n").unwrap();
        });
        std::thread::sleep(Duration::from_millis(300));
        let reader = cat(&s.exp.join("f"));
        assert_eq!(
            finish(reader, "HOST cat (writer first)", Duration::from_secs(10)),
            b"writer first\n"
        );
        join_within(wt, "DPU writer", Duration::from_secs(10));

        // Non-blocking HOST reader: data then EOF.
        let fd = open_raw(&s.exp.join("f"), libc::O_RDONLY | libc::O_NONBLOCK).unwrap();
        let mp = s.m.path("f");
        let wt = std::thread::spawn(move || {
            let mut w = fs::OpenOptions::new().write(true).open(mp).unwrap();
            w.write_all(b"to a non-blocking HOST reader").unwrap();
        });
        assert_eq!(
            drain_nonblock(&fd, None, Duration::from_secs(10)),
            b"to a non-blocking HOST reader"
        );
        join_within(wt, "DPU writer", Duration::from_secs(10));

        // While that HOST reader is open, a non-blocking DPU writer can open (the tunnel
        // mirrors the HOST reader), and when it goes, DPU writers get EPIPE.
        let deadline = Instant::now() + Duration::from_secs(5);
        let w = loop {
            match open_raw(&s.m.path("f"), libc::O_WRONLY | libc::O_NONBLOCK) {
                Ok(w) => break w,
                Err(libc::ENXIO) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("non-blocking DPU writer with a HOST reader: errno {e}"),
            }
        };
        assert_eq!(
            // SAFETY: the buffer is a static byte string of the length passed; `w` is open.
            unsafe { libc::write(w.as_raw_fd(), b"nb".as_ptr().cast(), 2) },
            2
        );
        assert_eq!(drain_nonblock(&fd, Some(2), Duration::from_secs(10)), b"nb");
        drop(fd);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: the buffer is a static byte string of the length passed; `w` is open.
            let rc = unsafe { libc::write(w.as_raw_fd(), b"z".as_ptr().cast(), 1) };
            if rc < 0 {
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EPIPE)
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "DPU writer never got EPIPE after the HOST reader left"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Go's `containerd/fifo.OpenFifo`: an `O_PATH` handle, then the real open of
/// `/proc/self/fd/N` *blocking* in a goroutine (here a thread), then non-blocking I/O through
/// the poller.
fn go_open(path: &Path, flags: i32) -> std::thread::JoinHandle<OwnedFd> {
    let h = open_raw(path, libc::O_PATH).unwrap();
    std::thread::spawn(move || {
        let p = PathBuf::from(format!("/proc/self/fd/{}", h.as_raw_fd()));
        let fd = open_raw(&p, flags).unwrap();
        // SAFETY: fcntl on an fd this closure owns; no memory is passed.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        drop(h);
        fd
    })
}

#[test]
fn fs_fifo_containerd_patterns() {
    for kind in fs_test_links("fs_fifo_containerd_patterns") {
        let s = setup(&kind);
        let daemon = mount_pid(&s.m.dir);
        let offloadd = s.host.pid().unwrap();

        // The shim log: containerd opens <bundle>/log O_RDWR|O_NONBLOCK and reads it in a
        // goroutine; the shim on the HOST opens it O_WRONLY (blocking), logs and exits;
        // containerd then closes the FIFO from another goroutine.
        fs::create_dir(s.m.path("bundle")).unwrap();
        mkfifo(&s.m.path("bundle/log"));
        let fd = Arc::new(join_within(
            go_open(&s.m.path("bundle/log"), libc::O_RDWR),
            "O_RDWR open",
            Duration::from_secs(5),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (fd2, stop2, got2) = (fd.clone(), stop.clone(), got.clone());
        let reader = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if poll1(&fd2, libc::POLLIN, 20) & libc::POLLIN != 0 {
                    if let Rd::Data(d) = read_raw(&fd2) {
                        got2.lock().unwrap().extend_from_slice(&d);
                    }
                }
            }
        });
        let shim = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for i in 1 2 3; do echo shim log line $i; done > {}",
                s.exp.join("bundle/log").display()
            ))
            .spawn()
            .unwrap();
        finish(shim, "shim writing its log", Duration::from_secs(10));
        let want = "shim log line 1\nshim log line 2\nshim log line 3\n";
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < want.len() {
            assert!(
                Instant::now() < deadline,
                "shim log not received: {:?}",
                got.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // containerd's Close from another goroutine ends the reader promptly.
        stop.store(true, Ordering::Relaxed);
        join_within(reader, "log reader", Duration::from_secs(5));
        assert_eq!(
            String::from_utf8(got.lock().unwrap().clone()).unwrap(),
            want
        );
        drop(fd);
        // No HOST descriptor outlives the DPU's last opener (the node's O_PATH reference
        // stays while the DPU kernel knows the name), and the mount daemon lets go too.
        wait_no_fds(
            "offloadd",
            offloadd,
            &s.exp.join("bundle/log"),
            true,
            Duration::from_secs(5),
        );
        wait_no_fds(
            "mount daemon",
            daemon,
            &s.m.path("bundle/log"),
            false,
            Duration::from_secs(10),
        );
        // containerd deletes the bundle: nothing at all is left on the HOST.
        fs::remove_file(s.m.path("bundle/log")).unwrap();
        fs::remove_dir(s.m.path("bundle")).unwrap();
        wait_no_fds(
            "offloadd",
            offloadd,
            &s.exp.join("bundle/log"),
            false,
            Duration::from_secs(10),
        );

        // stdout of a task: O_RDONLY|O_NONBLOCK → blocking O_RDONLY open in a goroutine; the
        // HOST writer comes later; EOF when it exits.
        mkfifo(&s.m.path("stdout"));
        let opener = go_open(&s.m.path("stdout"), libc::O_RDONLY);
        std::thread::sleep(Duration::from_millis(200));
        let w = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo container output > {}",
                s.exp.join("stdout").display()
            ))
            .spawn()
            .unwrap();
        let fd = join_within(opener, "O_RDONLY open", Duration::from_secs(10));
        assert_eq!(
            drain_nonblock(&fd, None, Duration::from_secs(10)),
            b"container output\n"
        );
        finish(w, "HOST writer", Duration::from_secs(10));
        drop(fd);

        // stdin: O_WRONLY|O_NONBLOCK → blocking O_WRONLY open in a goroutine, which completes
        // once the shim on the HOST opens the FIFO for reading.
        mkfifo(&s.m.path("stdin"));
        let opener = go_open(&s.m.path("stdin"), libc::O_WRONLY);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !opener.is_finished(),
            "a writer's open must wait for a reader"
        );
        let reader = cat(&s.exp.join("stdin"));
        let fd = join_within(opener, "O_WRONLY open", Duration::from_secs(10));
        assert_eq!(
            // SAFETY: the buffer is a static byte string of the length passed; `fd` is open.
            unsafe { libc::write(fd.as_raw_fd(), b"input\n".as_ptr().cast(), 6) },
            6
        );
        drop(fd);
        assert_eq!(
            finish(reader, "shim reading stdin", Duration::from_secs(10)),
            b"input\n"
        );

        wait_no_fds(
            "offloadd",
            offloadd,
            &s.exp.join("stdin"),
            true,
            Duration::from_secs(5),
        );
        wait_no_fds(
            "offloadd",
            offloadd,
            &s.exp.join("stdout"),
            true,
            Duration::from_secs(5),
        );
        wait_no_fds(
            "mount daemon",
            daemon,
            &s.m.path("stdin"),
            false,
            Duration::from_secs(10),
        );
        // With no FIFO in use the mount is not busy: a plain (not lazy) umount works soon.
        tests::wait_until(
            "plain umount of the DPU mount",
            Duration::from_secs(5),
            || {
                Command::new("umount")
                    .arg(&s.m.dir)
                    .status()
                    .is_ok_and(|st| st.success())
            },
        );
    }
}

#[test]
fn fs_fifo_poll_large_and_unlink() {
    for kind in fs_test_links("fs_fifo_poll_large_and_unlink") {
        let s = setup(&kind);
        mkfifo(&s.exp.join("p"));

        // Pollable, EAGAIN when empty, woken by data; a poller in another thread returns when
        // data arrives (a Go Close would wake its netpoller the same way: the fd is a pipe).
        let fd = Arc::new(open_raw(&s.m.path("p"), libc::O_RDWR | libc::O_NONBLOCK).unwrap());
        assert!(matches!(read_raw(&fd), Rd::Again));
        // Go registers what it opens with epoll and relies on it for Close to end a read: a
        // FUSE regular file is refused there (EPERM), a pipe is accepted.
        // SAFETY: epoll on fds this test owns; `ev` lives across epoll_ctl and the created epoll fd is closed below.
        unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            assert!(ep >= 0);
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 1,
            };
            assert_eq!(
                libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev),
                0,
                "the DPU FIFO is not pollable by epoll"
            );
            libc::close(ep);
        }
        let fd2 = fd.clone();
        let poller = std::thread::spawn(move || poll1(&fd2, libc::POLLIN, 10_000));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!poller.is_finished());
        fs::write(s.exp.join("p"), b"wake").unwrap();
        let ev = join_within(poller, "poller", Duration::from_secs(10));
        assert!(ev & libc::POLLIN != 0);
        assert_eq!(
            drain_nonblock(&fd, Some(4), Duration::from_secs(5)),
            b"wake"
        );
        drop(fd);

        // Some MiB each way, checksummed.
        let data: Vec<u8> = (0..(6 << 20))
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let sum = Sha256::digest(&data);
        mkfifo(&s.exp.join("big"));
        // Readers in threads: a child's stdout pipe would fill up and stop the transfer.
        let read_all = |p: PathBuf| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                fs::File::open(p).unwrap().read_to_end(&mut out).unwrap();
                out
            })
        };
        let reader = read_all(s.m.path("big"));
        let t0 = Instant::now();
        {
            let mut w = fs::OpenOptions::new()
                .write(true)
                .open(s.exp.join("big"))
                .unwrap();
            w.write_all(&data).unwrap();
        }
        let got = join_within(reader, "DPU reader of 6 MiB", Duration::from_secs(60));
        eprintln!(
            "{kind}: 6 MiB HOST -> DPU through a FIFO in {:?}",
            t0.elapsed()
        );
        assert_eq!(got.len(), data.len());
        assert_eq!(Sha256::digest(&got), sum, "HOST → DPU checksum");
        let reader = read_all(s.exp.join("big"));
        let t0 = Instant::now();
        {
            let mut w = fs::OpenOptions::new()
                .write(true)
                .open(s.m.path("big"))
                .unwrap();
            w.write_all(&data).unwrap();
        }
        let got = join_within(reader, "HOST reader of 6 MiB", Duration::from_secs(60));
        eprintln!(
            "{kind}: 6 MiB DPU -> HOST through a FIFO in {:?}",
            t0.elapsed()
        );
        assert_eq!(got.len(), data.len());
        assert_eq!(Sha256::digest(&got), sum, "DPU → HOST checksum");

        // Unlink while open: both ends keep talking; EOF still arrives.
        mkfifo(&s.exp.join("u"));
        let mp = s.m.path("u");
        let rt = std::thread::spawn(move || {
            let mut f = fs::File::open(mp).unwrap();
            let mut out = Vec::new();
            f.read_to_end(&mut out).unwrap();
            out
        });
        let mut w = fs::OpenOptions::new()
            .write(true)
            .open(s.exp.join("u"))
            .unwrap();
        w.write_all(b"before ").unwrap();
        fs::remove_file(s.m.path("u")).unwrap();
        assert!(!s.exp.join("u").exists());
        std::thread::sleep(Duration::from_millis(100));
        w.write_all(b"after unlink").unwrap();
        drop(w);
        assert_eq!(
            join_within(rt, "reader of an unlinked FIFO", Duration::from_secs(10)),
            b"before after unlink"
        );
    }
}

/// A hostile or broken DPU speaking the tunnel protocol directly: offloadd resets bad streams,
/// survives garbage, serves a well-formed tunnel without any FUSE mount (mirror reader on the
/// HOST, bytes over the stream) and lets go of the FIFO when the stream goes.
#[test]
fn fs_fifo_tunnel_protocol_direct() {
    use bytes::Bytes;
    use offload_fs::fifo::{self, Msg, TunnelHeader};
    use offload_fs::proto::{self, op, Operation};
    use transport::{Registry, Session, SessionConfig};

    for kind in fs_test_links("fs_fifo_tunnel_protocol_direct") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir(&exp).unwrap();
        mkfifo(&exp.join("f"));
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let offloadd = host.pid().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let key = transport::auth::Key::load(&host.key).unwrap();
            let ep = tests::connect_url(&host.listen).parse().unwrap();
            let s = Session::connect(&ep, SessionConfig::new(Some(key)), Registry::new())
                .await
                .unwrap();
            async fn call<O: Operation>(s: &Session, op: O, instance: u64) -> O::Reply {
                let b = proto::encode_request(instance, &op, &[]).unwrap();
                let reply = s.call("fs", Bytes::from(b)).await.unwrap();
                proto::decode_reply::<O::Reply>(&reply).unwrap().unwrap().0
            }
            let mount = op::Mount {
                version: proto::VERSION,
                path: exp.display().to_string(),
            };
            let proto::Mounted { instance, root, .. } =
                call(&s, mount, 0).await.expect("mount refused");
            let lookup = |name: &str| {
                let op = op::Lookup {
                    parent: root.node,
                    name: name.as_bytes().to_vec(),
                };
                call(&s, op, instance)
            };
            let f = lookup("f").await;
            let refused = |header: Bytes| {
                let s = s.clone();
                async move {
                    let st = s.open_stream("fs", header).await.unwrap();
                    let (mut rd, _wr) = st.split();
                    tokio::time::timeout(Duration::from_secs(5), fifo::read_msg(&mut rd))
                        .await
                        .expect("bad stream not closed")
                        .is_err()
                }
            };
            assert!(refused(Bytes::from_static(b"\x07garbage")).await);
            let hdr = |node, instance| fifo::encode_header(&TunnelHeader { instance, node });
            assert!(
                refused(hdr(root.node, instance)).await,
                "a directory is no FIFO"
            );
            assert!(refused(hdr(f.node, instance ^ 2)).await, "stale instance");

            // Garbage on a valid tunnel ends that tunnel only.
            let st = s.open_stream("fs", hdr(f.node, instance)).await.unwrap();
            let (mut rd, mut wr) = st.split();
            wr.send(Bytes::from_static(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]))
                .await
                .unwrap();
            // Ended (reset or finished) rather than answered.
            tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(_)) = fifo::read_msg(&mut rd).await {}
            })
            .await
            .expect("garbage did not end the tunnel");

            // A well-formed tunnel: "readers here" → the HOST opens a mirror reader, so a
            // non-blocking HOST writer can open; its bytes arrive as Data.
            let st = s.open_stream("fs", hdr(f.node, instance)).await.unwrap();
            let (mut rd, mut wr) = st.split();
            wr.send(fifo::frame(&Msg::Readers { cycle: 1 }))
                .await
                .unwrap();
            let fp = exp.join("f");
            let w = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    match open_raw(&fp, libc::O_WRONLY | libc::O_NONBLOCK) {
                        Ok(w) => return w,
                        Err(libc::ENXIO) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("HOST writer: errno {e}"),
                    }
                }
            })
            .await
            .unwrap();
            assert_eq!(
                // SAFETY: the buffer is a static byte string of the length passed; `w` is open.
                unsafe { libc::write(w.as_raw_fd(), b"abc".as_ptr().cast(), 3) },
                3
            );
            let mut got = Vec::new();
            while got.len() < 3 {
                match tokio::time::timeout(Duration::from_secs(5), fifo::read_msg(&mut rd))
                    .await
                    .expect("no data")
                    .unwrap()
                {
                    Some(Msg::Data { cycle: 1, data }) => got.extend(data),
                    Some(Msg::Readers { .. }) | Some(Msg::Kick) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(got, b"abc");
            drop(w);
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(5), fifo::read_msg(&mut rd))
                    .await
                    .unwrap()
                    .unwrap(),
                Some(Msg::Eof { cycle: 1 })
            );
            // The tunnel goes: offloadd keeps no descriptor of the FIFO but the node's O_PATH.
            drop((rd, wr));
            let p = exp.join("f");
            tokio::task::spawn_blocking(move || {
                wait_no_fds("offloadd", offloadd, &p, true, Duration::from_secs(5))
            })
            .await
            .unwrap();
            // And it still serves.
            assert_eq!(lookup("f").await.node, f.node);
        });
    }
}

/// The lab's failure (`ctr run --rm` hanging on the shim `log` FIFO) with the real parts: a
/// DPU containerd (own mount namespace, private /run) whose `state` directory is a qtfs mount
/// of the HOST's, so the bundle and its `log` FIFO are made through qtfs while the real shim
/// (launched on the HOST by offload-shim) writes the HOST FIFO. `ctr run --rm … exit 7` must
/// return 7 promptly, as must `ctr task start` (its exit code) and `ctr task delete` after a
/// kill, and afterwards offloadd holds nothing of the log FIFOs.
#[test]
fn fs_fifo_containerd_shim_log_on_qtfs() {
    use tests::{spawn_ready, wait_until, KillOnDrop};
    const REAL: &str = "/usr/bin/containerd-shim-runc-v2";
    let name = "fs_fifo_containerd_shim_log_on_qtfs";
    if !tests::fs::fuse_ready(name) {
        return;
    }
    for b in [
        REAL,
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/bin/busybox",
    ] {
        if !Path::new(b).exists() {
            return tests::skip(name, &format!("{b} missing"));
        }
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fs::create_dir_all(d.join("state")).unwrap();
    let key = tests::write_key(d, "psk");
    let link = format!("unix://{}/link.sock", d.display());
    fs::write(
        d.join("host.toml"),
        format!(
            "[exec]\nallow = [\"{REAL}\"]\n[bridge]\nwatch = [\"/run/containerd/s\"]\n\
             fifo_dirs = [\"/run/containerd/fifo\"]\n[fs]\nexports = [{{ path = \"{}\" }}]\n",
            d.join("state").display()
        ),
    )
    .unwrap();
    fs::write(
        d.join("dpu.toml"),
        "[bridge]\nfifo_dirs = [\"/run/containerd/fifo\"]\n[[bridge.forward]]\nlisten_side = \"host\"\n\
         path = \"/run/containerd/containerd.sock.ttrpc\"\n",
    )
    .unwrap();
    fs::write(
        d.join("containerd.toml"),
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"/run/containerd/containerd.sock\"\n",
            d.display()
        ),
    )
    .unwrap();
    let rootfs = d.join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    for sub in ["proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    // (`ctr c create` takes dash arguments after the id for its own flags.)
    fs::write(rootfs.join("exit5.sh"), "exit 5\n").unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();

    let offloadd = tests::bin("offloadd");
    // HOST: this machine's namespaces but a private /run, so the real shim, runc and the
    // bridged sockets leave the machine's /run/containerd alone.
    let mut host = Command::new("unshare");
    host.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs host-run /run || exit 1; \
             exec \"$OFFLOADD\" --listen \"$LINK\" --key-file \"$KEY\" --config \"$DIR/host.toml\"",
        )
        .env("OFFLOADD", &offloadd)
        .env("LINK", &link)
        .env("KEY", &key)
        .env("DIR", d);
    let host = spawn_ready(host, "listening");
    // unshare and sh exec: the pid is offloadd's.
    let host_pid = host.id();
    let mut procs = KillOnDrop(vec![host]);
    // DPU: private /run, the qtfs mount of the HOST's state directory over the same path (this
    // namespace only), the DPU offloadd (bridge), then containerd.
    let mut dpu = Command::new("unshare");
    dpu.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs dpu-run /run || exit 1; \
             \"$MOUNT\" \"$DIR/state\" \"$DIR/state\" -f -o addr=\"$CMD_NET_ADDR\",keyfile=\"$OFFLOAD_KEY_FILE\" \
               2>\"$DIR/mount.log\" & echo $! >\"$DIR/dpu-mount.pid\"; \
             i=0; until grep -q \"qtfs:$DIR/state \" /proc/self/mountinfo; do i=$((i+1)); [ $i -gt 200 ] && exit 1; sleep 0.05; done; \
             \"$OFFLOADD\" --connect \"$CMD_NET_ADDR\" --config \"$DIR/dpu.toml\" & echo $! >\"$DIR/dpu-offloadd.pid\"; \
             sleep 0.5; echo dpu-ready; exec containerd --config \"$DIR/containerd.toml\" >\"$DIR/containerd.log\" 2>&1",
        )
        .env("OFFLOADD", &offloadd)
        .env("MOUNT", tests::bin("mount_qtfs"))
        .env("DIR", d)
        .env("CMD_NET_ADDR", &link)
        .env("OFFLOAD_KEY_FILE", &key)
        .env("OFFLOAD_DPU_CONFIG", "/nonexistent")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    let dpu = spawn_ready(dpu, "dpu-ready");
    let dpu_pid = dpu.id();
    procs.0.push(dpu);
    let _mount = PidFile(d.join("dpu-mount.pid"));
    let _dpu_offloadd = PidFile(d.join("dpu-offloadd.pid"));
    let in_dpu = |script: &str| {
        let out = Command::new("nsenter")
            .args(["-t", &dpu_pid.to_string(), "-m", "--", "sh", "-c", script])
            .env("SHIM", tests::bin("offload-shim"))
            .env("ROOTFS", &rootfs)
            .output()
            .expect("nsenter");
        let mut all = out.stdout;
        all.extend_from_slice(&out.stderr);
        (
            String::from_utf8_lossy(&all).into_owned(),
            out.status.code().unwrap_or(-1),
        )
    };
    wait_until("DPU containerd up", Duration::from_secs(15), || {
        in_dpu("ctr version >/dev/null 2>&1").1 == 0
    });
    // The DPU's state directory really is qtfs.
    let (mi, _) = in_dpu(&format!(
        "grep 'qtfs:{0}/state ' /proc/self/mountinfo",
        d.display()
    ));
    assert!(mi.contains("fuse"), "state not on qtfs in the DPU: {mi}");

    for round in 0..2 {
        let id = format!("fifo{}r{round}", std::process::id());
        let t0 = Instant::now();
        let (text, code) = in_dpu(&format!(
            "exec timeout -s KILL 40 ctr -n fifotest run --rm --runtime \"$SHIM\" --rootfs \"$ROOTFS\" {id} \
             /bin/sh -c 'echo hello from the HOST side; exit 7'"
        ));
        let took = t0.elapsed();
        let log = fs::read_to_string(d.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        assert_eq!(
            code, 7,
            "ctr run --rm: {text}\n--- containerd log tail:\n{tail:#?}"
        );
        assert!(text.contains("hello from the HOST side"), "{text}");
        eprintln!("ctr run --rm with the shim log FIFO on qtfs: exit 7 after {took:?}");
        assert!(took < Duration::from_secs(20), "ctr run --rm took {took:?}");
    }
    // `ctr task start` (waits for the exit code) and `ctr task delete` after a kill: the
    // other two commands the lab saw hang.
    let run = |what: &str, script: &str, want: i32| {
        let t0 = Instant::now();
        let (text, code) = in_dpu(&format!("exec timeout -s KILL 40 {script}"));
        assert_eq!(code, want, "{what}: {text}");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} took {:?}",
            t0.elapsed()
        );
        text
    };
    let c = format!("fifo{}c", std::process::id());
    run(
        "ctr c create",
        &format!("ctr -n fifotest c create --runtime \"$SHIM\" --rootfs \"$ROOTFS\" {c} /bin/sh /exit5.sh"),
        0,
    );
    // (`ctr task start` in the foreground deletes the task itself once it has the code.)
    run("ctr task start", &format!("ctr -n fifotest t start {c}"), 5);
    run("ctr c rm", &format!("ctr -n fifotest c rm {c}"), 0);
    let dd = format!("fifo{}d", std::process::id());
    run(
        "ctr run -d",
        &format!(
            "ctr -n fifotest run -d --runtime \"$SHIM\" --rootfs \"$ROOTFS\" {dd} /bin/sleep 1000"
        ),
        0,
    );
    run(
        "ctr task kill",
        &format!("ctr -n fifotest t kill -s KILL {dd}"),
        0,
    );
    wait_until("task stopped", Duration::from_secs(15), || {
        in_dpu(&format!("ctr -n fifotest t ls | grep {dd}"))
            .0
            .contains("STOPPED")
    });
    run(
        "ctr task delete",
        &format!("ctr -n fifotest t delete {dd}"),
        0,
    );
    run("ctr c rm", &format!("ctr -n fifotest c rm {dd}"), 0);

    // Nothing of the bundles is left, and offloadd holds no descriptor below the state dir
    // but O_PATH references of directories the DPU still caches.
    let (ls, _) = in_dpu(&format!(
        "ls {}/state/io.containerd.runtime.v2.task/fifotest 2>&1",
        d.display()
    ));
    assert!(
        ls.trim().is_empty() || ls.contains("No such file"),
        "bundles left: {ls}"
    );
    let state = d.join("state").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: Vec<String> = fs::read_dir(format!("/proc/{host_pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .filter(|p| p.starts_with(&state) && p.contains("/log"))
            .collect();
        if held.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "offloadd still holds {held:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = in_dpu("ctr -n fifotest c ls -q | xargs -r ctr -n fifotest c rm");
}

/// Kills the process whose pid is in this file (a daemon started in the background by a shell).
struct PidFile(PathBuf);
impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(pid) = fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from a pid file; no memory is passed.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}
