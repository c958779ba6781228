//! The HOST daemon is SIGKILLed and restarted under a running workload on a qtfs mount: the
//! mount recovers without remounting, files opened before the restart keep working, and every
//! acknowledged write is on the HOST. A soft mount fails with EIO during an outage instead.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use tests::fs::{
    fs_test_links, fuse_ready, tmpdir, workload_across_restart, ExportSpec, Host, Mount,
};

#[test]
fn fs_host_restart_under_workload() {
    for kind in fs_test_links("fs_host_restart_under_workload") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir_all(exp.join("deep/er/dir")).unwrap();
        fs::write(exp.join("deep/er/dir/read-me"), vec![7u8; 200_000]).unwrap();
        let mut host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "timeout=60");

        // Handles opened before the restart.
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.path("log"))
            .unwrap();
        writeln!(log, "before").unwrap();
        let mut reader = fs::File::open(m.path("deep/er/dir/read-me")).unwrap();
        let mut head = vec![0u8; 1000];
        reader.read_exact(&mut head).unwrap();
        let dir_inode_path = m.path("deep/er/dir");
        assert!(dir_inode_path.is_dir());

        // A workload running across the restart (its own process: `workload_across_restart`).
        let script = format!(
            "i=0; while [ ! -e {stop} ] || [ $i -lt 20 ]; do \
               printf 'payload %s' $i > {dir}/w-$i || exit 1; \
               [ \"$(cat {dir}/w-$i)\" = \"payload $i\" ] || exit 2; \
               i=$((i+1)); done; echo $i",
            stop = tmp.path().join("stop").display(),
            dir = m.path("deep/er/dir").display()
        );
        let out = workload_across_restart(
            &mut host,
            &script,
            &tmp.path().join("stop"),
            Duration::from_millis(800),
            Duration::from_millis(700),
        );
        assert!(out.status.success(), "workload failed: {}", out.status);
        let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(n >= 20);

        // Every acknowledged write is on the HOST.
        for i in 0..n {
            assert_eq!(
                fs::read_to_string(exp.join(format!("deep/er/dir/w-{i}"))).unwrap(),
                format!("payload {i}")
            );
        }
        // Handles opened before the restart still work.
        writeln!(log, "after").unwrap();
        drop(log);
        assert_eq!(
            fs::read_to_string(exp.join("log")).unwrap(),
            "before\nafter\n"
        );
        reader.seek(SeekFrom::Start(150_000)).unwrap();
        let mut tail = vec![0u8; 1000];
        reader.read_exact(&mut tail).unwrap();
        assert!(tail.iter().all(|&b| b == 7));
        // Inodes known before the restart resolve again.
        assert_eq!(fs::read_dir(&dir_inode_path).unwrap().count(), n + 1);
        fs::write(m.path("new-after-restart"), b"ok").unwrap();
        assert_eq!(fs::read(exp.join("new-after-restart")).unwrap(), b"ok");
        drop(m);
    }
}

/// A streaming write (write-behind: many 1 MiB writes acknowledged and in flight) across a
/// HOST daemon SIGKILL and restart: `dd` succeeds and the HOST file is exactly the source.
#[test]
fn fs_streaming_write_across_restart() {
    for kind in fs_test_links("fs_streaming_write_across_restart") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        fs::create_dir_all(&exp).unwrap();
        let src = tmp.path().join("src");
        let data: Vec<u8> = (0..64u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        fs::write(&src, &data).unwrap();
        let mut host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "timeout=60");
        let dd = std::process::Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", m.path("big").display()))
            .args(["bs=1M", "conv=fsync", "status=none"])
            .spawn()
            .unwrap();
        // Kill once the file is growing on the HOST, i.e. writes are in flight.
        let start = Instant::now();
        while fs::metadata(exp.join("big")).map_or(0, |m| m.len()) < 4 << 20 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "[{kind}] dd never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        host.kill();
        std::thread::sleep(Duration::from_millis(500));
        host.restart();
        let out = dd.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "[{kind}] dd across the restart: {}",
            out.status
        );
        let got = fs::read(exp.join("big")).unwrap();
        assert_eq!(got.len(), data.len(), "[{kind}] length");
        assert!(got == data, "[{kind}] content differs from the source");
        drop(m);
    }
}

#[test]
fn fs_soft_timeout_then_recovery() {
    tests::init_tracing();
    if !fuse_ready("fs_soft_timeout_then_recovery") {
        return;
    }
    let kind = tests::link_kinds()
        .into_iter()
        .next()
        .unwrap_or_else(|| "tcp".into());
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    fs::create_dir_all(&exp).unwrap();
    fs::write(exp.join("f"), b"x").unwrap();
    let mut host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    let m = Mount::new(
        &host,
        &exp,
        &tmp.path().join("mnt"),
        "timeout=1,attr_timeout=0,entry_timeout=0",
    );
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
    host.kill();
    let t0 = Instant::now();
    let r = fs::metadata(m.path("f"));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "EIO came within the bound"
    );
    host.restart();
    // Without remounting, the same paths work again.
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
    fs::write(m.path("g"), b"y").unwrap();
    assert_eq!(fs::read(exp.join("g")).unwrap(), b"y");
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn fs_nodes_released_when_mount_ends() {
    tests::init_tracing();
    if !fuse_ready("fs_nodes_released_when_mount_ends") {
        return;
    }
    let kind = tests::link_kinds()
        .into_iter()
        .next()
        .unwrap_or_else(|| "tcp".into());
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    fs::create_dir_all(&exp).unwrap();
    for i in 0..300 {
        fs::write(exp.join(format!("f{i}")), b"x").unwrap();
    }
    let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    let pid = host.pid().unwrap();
    let idle = fd_count(pid);
    let m = Mount::new(
        &host,
        &exp,
        &tmp.path().join("mnt"),
        "attr_timeout=60,entry_timeout=60",
    );
    for i in 0..300 {
        fs::metadata(m.path(&format!("f{i}"))).unwrap();
    }
    let busy = fd_count(pid);
    assert!(
        busy >= idle + 300,
        "one O_PATH fd per remembered node ({idle} -> {busy})"
    );
    drop(m); // umount: the mount process exits and its session ends
    let deadline = Instant::now() + Duration::from_secs(30);
    while fd_count(pid) > idle + 5 {
        assert!(
            Instant::now() < deadline,
            "HOST still holds {} fds after the mount ended (idle {idle})",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
