//! Faults (issue 15): EIO from a failing HOST disk reaches the DPU writer.
//!
//! The export is an ext4 filesystem on a device-mapper device over a loop file. Mid-test the
//! device's table is swapped for `flakey` with `error_writes`: from then on every write bio
//! fails with EIO while reads still work — the way a disk that is dying under writes behaves,
//! through the real block layer, ext4's writeback and journal, and offloadd's own syscalls.
//! The DPU writer (a process writing through the qtfs mount) must see EIO, no later than its
//! `fsync`; the daemon must keep serving: the broken export still answers (reads, refused
//! writes without hanging) and another export on a healthy disk works normally.
//!
//! Needs root, FUSE, loop devices and the `dm-flakey` target. This machine's kernel has no
//! device-mapper modules, so the test runs in the VM tier (tests/vm/run.sh: its guest kernel
//! loads `loop`, `dm_mod` and `dm_flakey`); elsewhere it prints why it skipped.

use std::fs;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::fs::{fs_test_links, tmpdir, ExportSpec, Host, Mount};

/// Runs `prog args` with udev bypassed (the VM has none: libdevmapper creates the nodes), and
/// returns stdout, or the failure as a message.
fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{prog} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why device-mapper fault injection is not possible here, if it is not.
fn dm_unavailable() -> Option<String> {
    // Loads the modules where the kernel has them (a no-op or a failure elsewhere).
    let _ = Command::new("modprobe").args(["-q", "dm_flakey"]).status();
    let _ = Command::new("modprobe").args(["-q", "loop"]).status();
    match run("dmsetup", &["targets"]) {
        Ok(t) if t.lines().any(|l| l.starts_with("flakey")) => None,
        Ok(t) => Some(format!(
            "the kernel has no dm-flakey target (dmsetup targets: {}); runs in the VM tier \
             (tests/vm/run.sh)",
            t.split_whitespace()
                .step_by(2)
                .collect::<Vec<_>>()
                .join(",")
        )),
        Err(e) => Some(format!(
            "no device-mapper here ({e}); runs in the VM tier (tests/vm/run.sh)"
        )),
    }
}

/// An ext4 filesystem on a device-mapper device over a loop file, mounted at `mnt`; torn down
/// on drop (also when the test fails).
struct DmDisk {
    name: String,
    loopdev: String,
    sectors: u64,
    mnt: PathBuf,
}

impl DmDisk {
    fn create(dir: &Path, mib: u64) -> Result<DmDisk, String> {
        let img = dir.join("disk.img");
        let f = fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        drop(f);
        let loopdev = run("losetup", &["-f", "--show", &img.display().to_string()])?
            .trim()
            .to_string();
        let sectors = (mib << 20) / 512;
        let mut d = DmDisk {
            name: format!("h2eio{}", std::process::id()),
            loopdev,
            sectors,
            mnt: dir.join("disk"),
        };
        let table = d.linear();
        if let Err(e) = run(
            "dmsetup",
            &["create", &d.name, "--noudevsync", "--table", &table],
        ) {
            // Nothing of ours to remove in the mapper; the loop device is detached on drop.
            d.name.clear();
            return Err(e);
        }
        run("mkfs.ext4", &["-q", "-F", &d.dev()])?;
        fs::create_dir_all(&d.mnt).map_err(|e| e.to_string())?;
        run(
            "mount",
            &["-t", "ext4", &d.dev(), &d.mnt.display().to_string()],
        )?;
        Ok(d)
    }

    fn dev(&self) -> String {
        format!("/dev/mapper/{}", self.name)
    }

    fn linear(&self) -> String {
        format!("0 {} linear {} 0", self.sectors, self.loopdev)
    }

    /// Swaps the table: every write from now on fails with EIO, reads keep working (up for 0 s,
    /// down for an hour, `error_writes`). `suspend` first flushes what ext4 has written so far.
    fn fail_writes(&self) -> Result<(), String> {
        let table = format!(
            "0 {} flakey {} 0 0 3600 1 error_writes",
            self.sectors, self.loopdev
        );
        run("dmsetup", &["suspend", "--noudevsync", &self.name])?;
        let loaded = run("dmsetup", &["load", &self.name, "--table", &table]);
        run("dmsetup", &["resume", "--noudevsync", &self.name])?;
        loaded.map(|_| ())
    }
}

impl Drop for DmDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        if !self.name.is_empty() {
            // Writes work again so nothing waits on the dying table, then the device goes.
            let _ = run("dmsetup", &["suspend", "--noudevsync", &self.name]);
            let _ = run("dmsetup", &["load", &self.name, "--table", &self.linear()]);
            let _ = run("dmsetup", &["resume", "--noudevsync", &self.name]);
            let mut removed = false;
            for _ in 0..50 {
                if run("dmsetup", &["remove", "--noudevsync", &self.name]).is_ok() {
                    removed = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !removed {
                let _ = run(
                    "dmsetup",
                    &["remove", "--force", "--noudevsync", &self.name],
                );
            }
        }
        let _ = run("losetup", &["-d", &self.loopdev]);
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// A DPU process writes through qtfs while the HOST's disk fails every write: the first error
/// it sees is EIO, at a write or at the latest at fsync (never a successful fsync of data the
/// disk refused), close reports nothing but EIO, and offloadd keeps serving both the broken
/// export (stat, read, a refused write that returns promptly) and a healthy one.
#[test]
fn fault_eio_from_the_host_disk_reaches_the_dpu_writer() {
    let name = "fault_eio_from_the_host_disk_reaches_the_dpu_writer";
    let links = fs_test_links(name);
    if links.is_empty() {
        return;
    }
    if let Some(why) = dm_unavailable() {
        tests::skip(name, &why);
        return;
    }
    for kind in links {
        let tmp = tmpdir();
        let disk = DmDisk::create(tmp.path(), 64).unwrap_or_else(|e| panic!("dm disk: {e}"));
        let good = tmp.path().join("good");
        fs::create_dir_all(&good).unwrap();
        let host = Host::start(
            &kind,
            tmp.path(),
            &[ExportSpec::rw(&disk.mnt), ExportSpec::rw(&good)],
        );
        let m = Mount::new(&host, &disk.mnt, &tmp.path().join("mnt"), "");
        let g = Mount::new(&host, &good, &tmp.path().join("gmnt"), "");

        // Healthy disk: written and fsynced.
        let head = vec![0x11u8; 64 << 10];
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(m.path("data"))
            .unwrap();
        f.write_all(&head).unwrap();
        f.sync_all().expect("fsync on the healthy disk");

        disk.fail_writes()
            .unwrap_or_else(|e| panic!("swap in the failing table: {e}"));

        // 4 MiB more, then fsync, then close; every result recorded.
        let chunk = vec![0xa5u8; 256 << 10];
        let mut first: Option<(&str, i32)> = None;
        let mut written = 0usize;
        for _ in 0..16 {
            match f.write_all(&chunk) {
                Ok(()) => written += chunk.len(),
                Err(e) => {
                    first = Some(("write", errno(&e)));
                    break;
                }
            }
        }
        let fsync = f.sync_all();
        if let (None, Err(e)) = (&first, &fsync) {
            first = Some(("fsync", errno(e)));
        }
        let fd = f.into_raw_fd();
        // SAFETY: `fd` came from into_raw_fd just above, so we own it and close it exactly once.
        let rc = unsafe { libc::close(fd) };
        let close_errno = if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        };
        eprintln!(
            "[{kind}] failing disk: {written} bytes accepted by write, fsync {fsync:?}, close \
             errno {close_errno}, first error {first:?}"
        );
        let (at, e) = first.unwrap_or_else(|| {
            panic!("[{kind}] the disk refused every write, yet write and fsync succeeded")
        });
        assert_eq!(e, libc::EIO, "[{kind}] first error (at {at}) is not EIO");
        assert!(
            close_errno == 0 || close_errno == libc::EIO,
            "[{kind}] close: errno {close_errno}"
        );

        // The daemon keeps serving the broken export: metadata and the data read back (reads
        // still work on the device), and a new write is refused promptly, not hung.
        let md = fs::metadata(m.path("data")).expect("stat through the mount");
        assert!(md.len() >= head.len() as u64, "[{kind}] size {}", md.len());
        let back = fs::read(m.path("data")).expect("read through the mount");
        assert_eq!(&back[..head.len()], &head[..], "[{kind}] fsynced head");
        let t0 = std::time::Instant::now();
        let again = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(m.path("again"))
            .and_then(|mut f| {
                f.write_all(&chunk)?;
                f.sync_all()
            });
        let again_errno = again.as_ref().err().map(errno);
        eprintln!(
            "[{kind}] a new file on the failing disk: {again:?} after {:?}",
            t0.elapsed()
        );
        assert!(
            matches!(again_errno, Some(libc::EIO) | Some(libc::EROFS)),
            "[{kind}] a new write+fsync on the failing disk: {again:?}"
        );

        // ... and a healthy export on the same daemon works normally.
        let mut h = fs::File::create(g.path("ok")).unwrap();
        h.write_all(&chunk).unwrap();
        h.sync_all().expect("fsync on the healthy export");
        drop(h);
        assert_eq!(
            fs::read(good.join("ok")).unwrap(),
            chunk,
            "[{kind}] healthy export"
        );
        assert_eq!(fs::read(g.path("ok")).unwrap(), chunk);

        drop(g);
        drop(m);
        drop(host);
        drop(disk);
    }
}
