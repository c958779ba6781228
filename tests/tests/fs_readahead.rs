//! `mount_qtfs` raises the mount's readahead through sysfs only when `/sys` is the running
//! kernel's own sysfs: in a management plane's root, `/sys` is the HOST's (a qtfs mount), and
//! a DPU device number written there would hit another device or nothing.

use std::path::Path;
use std::process::Command;

use tests::fs::{fs_test_links, tmpdir, ExportSpec, Host, Mount};

/// `MAJ:MIN` of the mount at `dir` in a mountinfo text.
fn dev_of(info: &str, dir: &Path) -> Option<String> {
    let want = dir.display().to_string();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
    })
}

#[test]
fn fs_readahead_only_through_local_sysfs() {
    // One link kind is enough: this is about the mount helper, not the link.
    let Some(kind) = fs_test_links("fs_readahead_only_through_local_sysfs")
        .into_iter()
        .next()
    else {
        return;
    };
    let tmp = tmpdir();
    let exp = tmp.path().join("export");
    let fake = tmp.path().join("fakesys");
    std::fs::create_dir_all(&exp).unwrap();
    // A stand-in for the HOST's sysfs, with a bdi directory for every device number the new
    // mount can get (anonymous devices take the lowest free minor), so a write would land.
    let top = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(2)?.strip_prefix("0:")?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let range = top + 512;
    for n in 0..range {
        std::fs::create_dir_all(fake.join(format!("class/bdi/0:{n}"))).unwrap();
    }
    let host = Host::start(
        &kind,
        tmp.path(),
        &[ExportSpec::rw(&exp), ExportSpec::rw(&fake)],
    );

    // Control: with this kernel's sysfs at /sys the window is raised (default 4096 KiB).
    let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dev = dev_of(&info, &m.dir).expect("mount in mountinfo");
    let ra = std::fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb")).unwrap();
    assert_eq!(ra.trim(), "4096", "readahead of {dev}");
    drop(m);

    // In a mount namespace whose /sys is a qtfs mount of the stand-in, nothing is written.
    let mnt2 = tmp.path().join("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let q = tests::bin("mount_qtfs");
    let opts = host.mount_opts();
    let script = format!(
        "set -e; {q} {fake} /sys -o {opts},sys; {q} {exp} {mnt2} -o {opts}; \
         grep ' {mnt2} ' /proc/self/mountinfo; umount {mnt2}; umount /sys",
        q = q.display(),
        fake = fake.display(),
        exp = exp.display(),
        mnt2 = mnt2.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "namespace script failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info = String::from_utf8_lossy(&out.stdout);
    let dev = dev_of(&info, &mnt2).expect("the namespace's mount line");
    let minor: u32 = dev.strip_prefix("0:").unwrap().parse().unwrap();
    assert!(minor < range, "device {dev} beyond the stand-in's entries");
    for n in 0..range {
        let f = fake.join(format!("class/bdi/0:{n}/read_ahead_kb"));
        assert!(
            !f.exists(),
            "mount_qtfs wrote {} (its device {dev})",
            f.display()
        );
    }
}
