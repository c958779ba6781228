//! qtfs pseudo filesystems and FIFOs over real mounts: `-o proc` (`/proc/self` is the reader's
//! own process, `/proc/1/mountinfo` is the HOST's, size-0 files read to EOF), `-o sys` (cgroup
//! writes), FIFOs in both directions and blocked FIFO opens not starving other operations.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::fs::{fs_test_links, fuse_ready, sh, tmpdir, ExportSpec, Host, Mount};

/// Waits for a child with a generous bound and returns its stdout.
fn finish(mut c: Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut out = String::new();
            if let Some(mut o) = c.stdout.take() {
                o.read_to_string(&mut out).unwrap();
            }
            assert!(st.success(), "{what} failed: {st}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("{what} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated CString that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
}

#[test]
fn fs_proc_and_sys() {
    for kind in fs_test_links("fs_proc_and_sys") {
        let tmp = tmpdir();
        let host = Host::start(
            &kind,
            tmp.path(),
            &[ExportSpec::ro("/proc"), ExportSpec::rw("/sys")],
        );
        // This machine is both sides: its own procfs at /proc plays the DPU's local_proc.
        let p = Mount::new(
            &host,
            Path::new("/proc"),
            &tmp.path().join("proc"),
            "proc,local_proc=/proc",
        );
        let proc_ = |r: &str| p.path(r).display().to_string();

        // /proc/self is the reader's own process (by the FUSE request's pid).
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec cat {}", proc_("self/status")))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let status = finish(child, "cat self/status");
        let got: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, pid, "/proc/self/status of the reader");
        // self -> <tgid>, the caller's own directory (as in procfs).
        let link = fs::read_link(p.path("self")).unwrap();
        assert_eq!(link, PathBuf::from(std::process::id().to_string()));
        let ts = sh(&format!("readlink {}", proc_("thread-self")));
        assert!(ts.contains("/task/"), "thread-self -> {ts}");

        // /proc/<own pid> is the caller's own (here the same machine): its cmdline.
        let cmdline = fs::read(p.path(&format!("{}/cmdline", std::process::id()))).unwrap();
        assert_eq!(
            cmdline,
            fs::read(format!("/proc/{}/cmdline", std::process::id())).unwrap()
        );

        // /proc/1/mountinfo is the HOST's (retry: other tests may mount meanwhile).
        let mut same = false;
        for _ in 0..5 {
            let a = fs::read_to_string("/proc/1/mountinfo").unwrap();
            let b = fs::read_to_string(p.path("1/mountinfo")).unwrap();
            let c = fs::read_to_string("/proc/1/mountinfo").unwrap();
            if a == b || b == c {
                same = true;
                break;
            }
        }
        assert!(
            same,
            "/proc/1/mountinfo through the mount differs from the HOST's"
        );

        // Size-0 files read to EOF.
        let md = fs::metadata(p.path("loadavg")).unwrap();
        assert_eq!(md.len(), 0);
        let la = fs::read_to_string(p.path("loadavg")).unwrap();
        assert_eq!(la.split_whitespace().count(), 5, "loadavg: {la:?}");
        let maps = fs::read_to_string(p.path(&format!("{}/maps", std::process::id()))).unwrap();
        assert!(
            maps.lines().count() > 10,
            "a multi-page size-0 file is read completely"
        );
        // Read-only export: writes refused.
        let w = fs::write(p.path("sys/kernel/hostname"), b"x");
        assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EROFS));
        // Directory listing works and includes pids and self.
        let names: Vec<String> = fs::read_dir(&p.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n == "self"));
        assert!(names.iter().any(|n| n == "1"));

        // sys: size-4096 attribute files and cgroup writes.
        let s = Mount::new(&host, Path::new("/sys"), &tmp.path().join("sys"), "sys");
        let thp = fs::read_to_string(s.path("kernel/mm/transparent_hugepage/enabled"));
        if let Ok(thp) = thp {
            assert_eq!(
                thp,
                fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap()
            );
        }
        let pids = s.path("fs/cgroup/pids");
        let v2 = s.path("fs/cgroup/cgroup.controllers");
        let cg_root = if pids.join("cgroup.procs").exists() {
            Some((pids, "pids.max"))
        } else if v2.exists() {
            Some((s.path("fs/cgroup"), "pids.max"))
        } else {
            None
        };
        match cg_root {
            Some((root, file)) => {
                let name = format!("qtfs-test-{}-{kind}", std::process::id());
                let cg = root.join(&name);
                fs::create_dir(&cg).unwrap();
                let host_cg = Path::new("/sys").join(cg.strip_prefix(&s.dir).unwrap());
                assert!(host_cg.is_dir(), "cgroup created on the HOST");
                fs::write(cg.join(file), b"17\n").unwrap();
                assert_eq!(fs::read_to_string(host_cg.join(file)).unwrap().trim(), "17");
                assert_eq!(fs::read_to_string(cg.join(file)).unwrap().trim(), "17");
                fs::remove_dir(&cg).unwrap();
                assert!(!host_cg.exists());
            }
            None => tests::skip("fs_proc_and_sys/cgroup", "no pids cgroup controller here"),
        }
        drop((s, p));
    }
}

#[test]
fn fs_fifo_both_directions() {
    for kind in fs_test_links("fs_fifo_both_directions") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir(&exp).unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");

        // Reader on the DPU mount, writer on the HOST path.
        mkfifo(&exp.join("f1"));
        let reader = Command::new("cat")
            .arg(m.path("f1"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut w = fs::OpenOptions::new()
                .write(true)
                .open(exp.join("f1"))
                .unwrap();
            w.write_all(b"ping from the HOST\n").unwrap();
        }
        assert_eq!(finish(reader, "DPU-side cat"), "ping from the HOST\n");

        // Reader on the HOST path, writer on the DPU mount.
        mkfifo(&exp.join("f2"));
        let reader = Command::new("cat")
            .arg(exp.join("f2"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut w = fs::OpenOptions::new()
                .write(true)
                .open(m.path("f2"))
                .unwrap();
            for i in 0..100 {
                writeln!(w, "line {i} from the DPU").unwrap();
            }
        }
        let out = finish(reader, "HOST-side cat");
        assert_eq!(out.lines().count(), 100);
        assert_eq!(out.lines().last(), Some("line 99 from the DPU"));

        // A FIFO made through the mount is a real FIFO on the HOST and works the same way.
        mkfifo(&m.path("f3"));
        let st = fs::metadata(exp.join("f3")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&st.file_type()));
        let reader = Command::new("cat")
            .arg(m.path("f3"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        fs::write(exp.join("f3"), b"third\n").unwrap();
        assert_eq!(
            finish(reader, "cat of a FIFO made through the mount"),
            "third\n"
        );

        // Blocked FIFO opens do not starve anything: 32 readers wait for writers while the
        // mount keeps serving other requests.
        mkfifo(&exp.join("f4"));
        let readers: Vec<Child> = (0..32)
            .map(|_| {
                Command::new("cat")
                    .arg(m.path("f4"))
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        for i in 0..50 {
            fs::write(m.path(&format!("busy-{i}")), b"x").unwrap();
            assert_eq!(fs::read(m.path(&format!("busy-{i}"))).unwrap(), b"x");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "mount stalled behind FIFO opens"
        );
        // One writer open releases every blocked reader (all see EOF after the data).
        {
            let mut w = fs::OpenOptions::new()
                .write(true)
                .open(exp.join("f4"))
                .unwrap();
            w.write_all(b"x").unwrap();
        }
        let mut total = String::new();
        for r in readers {
            total.push_str(&finish(r, "blocked reader"));
        }
        assert_eq!(total, "x");
        drop(m);
    }
}

#[test]
fn fs_mount_t_qtfs_via_mount8() {
    tests::init_tracing();
    if !fuse_ready("fs_mount_t_qtfs_via_mount8") {
        return;
    }
    let helper = Path::new("/sbin/mount.qtfs");
    let ours = tests::bin("mount_qtfs");
    let installed_here = match fs::read_link(helper) {
        Ok(t) if t == ours => false,
        Ok(_) | Err(_) if helper.exists() => {
            tests::skip(
                "fs_mount_t_qtfs_via_mount8",
                "/sbin/mount.qtfs exists and is not this build; not replacing it",
            );
            return;
        }
        _ => {
            std::os::unix::fs::symlink(&ours, helper).unwrap();
            true
        }
    };
    struct Uninstall(bool);
    impl Drop for Uninstall {
        fn drop(&mut self) {
            if self.0 {
                let _ = fs::remove_file("/sbin/mount.qtfs");
            }
        }
    }
    let _u = Uninstall(installed_here);
    let kind = tests::link_kinds()
        .into_iter()
        .next()
        .unwrap_or_else(|| "tcp".into());
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    fs::create_dir(&exp).unwrap();
    fs::write(exp.join("hello"), b"via mount(8)").unwrap();
    let host = Host::start(
        &kind,
        tmp.path(),
        &[ExportSpec::rw(&exp), ExportSpec::ro("/proc")],
    );
    let mnt = tmp.path().join("mnt");
    let pmnt = tmp.path().join("proc");
    fs::create_dir_all(&mnt).unwrap();
    fs::create_dir_all(&pmnt).unwrap();
    struct Lazy(PathBuf);
    impl Drop for Lazy {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _g1 = Lazy(mnt.clone());
    let _g2 = Lazy(pmnt.clone());
    // The address comes from the environment, as on a DPU with QTFS_SERVER_ADDR set.
    let out = Command::new("mount")
        .args(["-t", "qtfs", "-o"])
        .arg(format!("keyfile={}", host.key.display()))
        .arg(&exp)
        .arg(&mnt)
        .env("QTFS_SERVER_ADDR", tests::connect_url(&host.listen))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t qtfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"via mount(8)");
    // The seed's line: mount -t qtfs -o proc /proc <rootfs>/proc
    let out = Command::new("mount")
        .args(["-t", "qtfs", "-o"])
        .arg(format!(
            "proc,local_proc=/proc,keyfile={}",
            host.key.display()
        ))
        .arg("/proc")
        .arg(&pmnt)
        .env("QTFS_SERVER_ADDR", tests::connect_url(&host.listen))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t qtfs -o proc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read_to_string(pmnt.join("1/mountinfo"))
        .unwrap()
        .contains(" / "));
    // umount ends the helper process; the mount point is free again.
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    assert!(!tests::fs::is_mounted(&mnt));
    let st = Command::new("umount").arg(&pmnt).status().unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive = sh("ps -eo args")
            .lines()
            .any(|l| l.contains("mount_qtfs") && l.contains(&*tmp.path().to_string_lossy()));
        if !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mount helper still running after umount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
