//! Faults (issue 15): the HOST daemon killed at random moments under an fsync-heavy writer
//! (every fsync-acknowledged record survives, the mount recovers without a remount), ENOSPC on
//! the HOST reaching the DPU writer as ENOSPC, and a bridged peer that stops reading (the
//! sender is held back by flow control; the daemons' memory stays bounded).
//! EIO from a failing HOST disk is in faults_eio.rs (device-mapper, in the VM tier).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::fs::{fs_test_links, fuse_ready, tmpdir, ExportSpec, Host, Mount, SmallTmpfs};
use tests::{spawn_ready, wait_until, KillOnDrop};

/// A writer appends numbered records, each followed by fsync, and reports the last record whose
/// fsync returned in a file outside the mount; the HOST daemon is SIGKILLed and restarted five
/// times at pseudo-random moments. Afterwards the HOST file holds every acknowledged record,
/// in order, with nothing torn before them.
#[test]
fn fault_random_host_kills_keep_every_fsynced_record() {
    for kind in fs_test_links("fault_random_host_kills_keep_every_fsynced_record") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir_all(&exp).unwrap();
        let mut host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "timeout=60");
        let acked = tmp.path().join("acked");
        let stop = tmp.path().join("stop");
        // Python: O_APPEND writes, fsync, then record the index (atomically) outside the mount.
        let script = format!(
            r#"
import os
fd = os.open({log:?}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while not os.path.exists({stop:?}):
    os.write(fd, b"record %08d %s\n" % (i, b"x" * 100))
    os.fsync(fd)
    with open({acked:?} + ".tmp", "w") as f:
        f.write(str(i))
    os.rename({acked:?} + ".tmp", {acked:?})
    i += 1
os.close(fd)
"#,
            log = m.path("log").display().to_string(),
            stop = stop.display().to_string(),
            acked = acked.display().to_string(),
        );
        let writer = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..5 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let before = fs::read_to_string(&acked).unwrap_or_default();
            std::thread::sleep(Duration::from_millis(100 + seed % 400));
            host.kill();
            std::thread::sleep(Duration::from_millis(seed % 300));
            host.restart();
            // The writer makes progress again after each restart.
            wait_until(
                &format!("[{kind}] writer progress after restart {round}"),
                Duration::from_secs(30),
                || fs::read_to_string(&acked).unwrap_or_default() != before,
            );
        }
        fs::write(&stop, b"").unwrap();
        let out = writer.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "[{kind}] writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last: usize = fs::read_to_string(&acked).unwrap().trim().parse().unwrap();
        let text = fs::read_to_string(exp.join("log")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() > last,
            "[{kind}] {} records on the HOST, {} acknowledged",
            lines.len(),
            last + 1
        );
        for (i, l) in lines.iter().enumerate().take(last + 1) {
            assert_eq!(
                *l,
                format!("record {i:08} {}", "x".repeat(100)),
                "[{kind}] record {i}"
            );
        }
        drop(m);
    }
}

/// The export is a 1 MiB tmpfs: writing 3 MiB through qtfs reports ENOSPC to the writer — at
/// a write, at fsync or at close (writes are acknowledged once queued) — never success or EIO.
#[test]
fn fault_enospc_reaches_the_dpu_writer() {
    for kind in fs_test_links("fault_enospc_reaches_the_dpu_writer") {
        let tmp = tmpdir();
        let exp = tmp.path().join("small");
        fs::create_dir_all(&exp).unwrap();
        let _u = SmallTmpfs::mount(&exp, "1m");
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
        let mut f = fs::File::create(m.path("big")).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        let mut err = None;
        for _ in 0..48 {
            if let Err(e) = f.write_all(&chunk) {
                err = Some(("write", e));
                break;
            }
        }
        if err.is_none() {
            if let Err(e) = f.sync_all() {
                err = Some(("fsync", e));
            }
        }
        // close(2)'s error: std ignores it on drop, so close the raw fd ourselves.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        // SAFETY: `fd` came from into_raw_fd just above, so we own it and close it exactly once.
        let rc = unsafe { libc::close(fd) };
        if err.is_none() && rc != 0 {
            err = Some(("close", std::io::Error::last_os_error()));
        }
        let (at, e) = err.unwrap_or_else(|| panic!("[{kind}] 3 MiB into a 1 MiB tmpfs: no error"));
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "[{kind}] error at {at}: {e}"
        );
        eprintln!("[{kind}] ENOSPC reported at {at}");
        // The mount is still usable once space is freed.
        fs::remove_file(m.path("big")).unwrap();
        fs::write(m.path("small"), b"fits").unwrap();
        assert_eq!(fs::read(exp.join("small")).unwrap(), b"fits");
        drop(m);
    }
}

/// A write that fails on the HOST after it was acknowledged is reported to the writer even
/// when a child process execs in between: the child's implicit close of the inherited
/// descriptor reaches the mount as a close of the same open file, and used to take the
/// failure, so the writer's own fsync and close then reported success for data that was never
/// written. The HOST export is a 1 MiB tmpfs filled from the HOST side to 8 KiB short, so the
/// one 64 KiB write through qtfs fails behind the writer's back.
#[test]
fn fault_enospc_is_not_swallowed_by_a_child_that_execs() {
    for kind in fs_test_links("fault_enospc_is_not_swallowed_by_a_child_that_execs") {
        let tmp = tmpdir();
        let exp = tmp.path().join("small");
        fs::create_dir_all(&exp).unwrap();
        let _u = SmallTmpfs::mount(&exp, "1m");
        fs::write(exp.join("filler"), vec![1u8; (1 << 20) - (8 << 10)]).unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
        let mut f = fs::File::create(m.path("big")).unwrap();
        // Acknowledged once queued; the HOST's ENOSPC comes back behind the writer.
        f.write_all(&[0x5au8; 64 << 10]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Children that exec close the inherited descriptor (it is O_CLOEXEC) ...
        for _ in 0..3 {
            assert!(Command::new("/bin/true").status().unwrap().success());
        }
        // ... and the writer is told all the same.
        let e = f.sync_all().expect_err(&format!(
            "[{kind}] fsync after a failed write reported success"
        ));
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "[{kind}] fsync: {e}");
        eprintln!("[{kind}] ENOSPC reported at fsync after 3 children exec'd");
        drop(f);
        drop(m);
    }
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A bridged Unix socket whose HOST-side server accepts and never reads: the DPU-side client
/// can only push a bounded amount (the stream's credit window plus socket buffers) before its
/// writes block, and neither daemon's RSS grows by more than 64 MiB while it keeps trying.
#[test]
fn fault_stalled_reader_is_held_back_with_bounded_memory() {
    let name = "fault_stalled_reader_is_held_back_with_bounded_memory";
    if !fuse_ready(name) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (hs, ds) = (d.join("h"), d.join("p"));
    fs::create_dir_all(&hs).unwrap();
    fs::create_dir_all(&ds).unwrap();
    let (hsock, dsock) = (hs.join("stall.sock"), ds.join("stall.sock"));
    let key = tests::write_key(d, "psk");
    let addr = format!("tcp://127.0.0.1:{}", tests::free_port());
    fs::write(
        d.join("host.toml"),
        format!(
            "[bridge]\n[[bridge.forward]]\nlisten_side = \"dpu\"\npath = {:?}\ntarget = {:?}\n",
            dsock.display().to_string(),
            hsock.display().to_string()
        ),
    )
    .unwrap();
    fs::write(
        d.join("dpu.toml"),
        format!(
            "[bridge]\nallow_listen = [{:?}]\n",
            ds.display().to_string()
        ),
    )
    .unwrap();
    // Accepts and holds connections without reading.
    let l = UnixListener::bind(&hsock).unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for c in l.incoming().map_while(Result::ok) {
            h2.lock().unwrap().push(c);
        }
    });
    let offloadd = tests::bin("offloadd");
    let mut hc = Command::new(&offloadd);
    hc.args(["--listen", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("host.toml"));
    let host = spawn_ready(hc, "listening");
    let mut dc = Command::new(&offloadd);
    dc.args(["--connect", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("dpu.toml"));
    let dpu = spawn_ready(dc, "connected");
    let (hpid, dpid) = (host.id(), dpu.id());
    let _k = KillOnDrop(vec![dpu, host]);
    wait_until(
        "bridged socket on the DPU side",
        Duration::from_secs(10),
        || dsock.exists(),
    );
    let (h0, d0) = (rss_kib(hpid), rss_kib(dpid));
    let mut s = UnixStream::connect(&dsock).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut pushed: u64 = 0;
    let start = Instant::now();
    let mut stalled_at = None;
    while start.elapsed() < Duration::from_secs(6) {
        match s.write(&chunk) {
            Ok(n) => pushed += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                stalled_at.get_or_insert(pushed);
            }
            Err(e) => panic!("write into the bridged socket: {e}"),
        }
    }
    let (h1, d1) = (rss_kib(hpid), rss_kib(dpid));
    eprintln!(
        "pushed {} MiB before the writer was held back (stalled at {:?} MiB); RSS HOST {} → {} KiB, DPU {} → {} KiB",
        pushed >> 20,
        stalled_at.map(|b| b >> 20),
        h0,
        h1,
        d0,
        d1
    );
    assert!(stalled_at.is_some(), "the writer was never held back");
    assert!(
        pushed < 256 << 20,
        "{} MiB accepted for a reader that never reads",
        pushed >> 20
    );
    assert!(h1 < h0 + 64 * 1024, "HOST RSS {h0} → {h1} KiB");
    assert!(d1 < d0 + 64 * 1024, "DPU RSS {d0} → {d1} KiB");
    // The held connection still works once the reader reads.
    let mut c = held.lock().unwrap().pop().expect("a held connection");
    let mut buf = vec![0u8; 1 << 20];
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = c.read(&mut buf).unwrap();
    assert!(n > 0 && buf[..n].iter().all(|&b| b == 7));
}
