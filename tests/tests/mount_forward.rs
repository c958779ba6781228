//! Mount forwarding (issue 12): `offload run` traps mount(2)/umount2(2) of the processes it
//! supervises with seccomp user notification; mounts below a qtfs mount are carried out by the
//! HOST's `mount` service, everything else runs locally.
//!
//! Real parts only: the HOST `offloadd` runs in a private mount namespace (its mounts are
//! checked in `/proc/<pid>/mountinfo` and vanish with it), the DPU side is a real qtfs FUSE
//! mount of a HOST directory, the supervisor runs real `mount`, `umount`, busybox and a raw
//! mount(2) probe in its own private mount namespace (so native mounts cannot leak either).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::fs::{fuse_ready, mount_cmd, tmpdir, Mount};
use tests::{bin, write_key};

/// A HOST `offloadd` with `[fs]` exports and a `[mount]` allow-list, in its own private mount
/// namespace; killed (namespace and mounts gone) on drop.
struct HostD {
    child: Child,
    listen: String,
    key: PathBuf,
    log: PathBuf,
}

impl HostD {
    fn start(dir: &Path, exports: &[&Path], allow: &str) -> HostD {
        let key = write_key(dir, "mountfwd.key");
        let listen = format!("unix://{}/host.sock", dir.display());
        let mut cfg = String::from("[fs]\nexports = [\n");
        for e in exports {
            cfg.push_str(&format!("  {{ path = {:?} }},\n", e.display().to_string()));
        }
        cfg.push_str(&format!("]\n[mount]\nallow = [\n{allow}]\n"));
        let config = dir.join("host.toml");
        std::fs::write(&config, cfg).expect("write host.toml");
        let log = dir.join("host.log");
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(bin("offloadd"))
            .arg("--listen")
            .arg(&listen)
            .arg("--key-file")
            .arg(&key)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("host log"))
            .spawn()
            .expect("spawn offloadd");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(());
                }
            }
        });
        let h = HostD {
            child,
            listen,
            key,
            log,
        };
        rx.recv_timeout(Duration::from_secs(30))
            .expect("offloadd did not report listening");
        h
    }

    /// True when the HOST's mount namespace has a mount of `fstype` at `path`.
    fn has_mount(&self, path: &Path, fstype: &str) -> bool {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id()))
            .expect("HOST mountinfo");
        let want = path.display().to_string();
        info.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-");
            f.get(4) == Some(&want.as_str()) && sep.and_then(|s| f.get(s + 1)) == Some(&fstype)
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A qtfs mount of HOST `src` at `dst`.
    fn qtfs(&self, src: &Path, dst: &Path) -> Mount {
        std::fs::create_dir_all(dst).expect("mount point");
        let out = mount_cmd(
            src,
            dst,
            &format!(
                "addr={},keyfile={},allow_other",
                self.listen,
                self.key.display()
            ),
        );
        assert!(
            out.status.success(),
            "mount_qtfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir: dst.to_path_buf(),
        }
    }
}

impl Drop for HostD {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sh -c script` under `offload run` (in a private mount namespace), with `$PROBE` the raw
/// mount(2) probe.
fn supervise(h: &HostD, addr: &str, extra: &[&str], script: &str) -> Output {
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(bin("offload"))
        .args(["run", "--addr", addr, "--key-file"])
        .arg(&h.key)
        .args(extra)
        .args(["--", "sh", "-c", script])
        .env("PROBE", bin("mount-probe"))
        .env("RUST_LOG", "info,transport=warn")
        .output()
        .expect("run offload");
    eprintln!(
        "--- offload run {script:?}: {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mkdirs(base: &Path, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(base.join(d)).expect("mkdir");
    }
}

#[test]
fn overlay_mount_lands_on_the_host_and_shows_through_qtfs() {
    let test = "overlay_mount_lands_on_the_host_and_shows_through_qtfs";
    tests::init_tracing();
    if !fuse_ready(test) {
        return;
    }
    let d = tmpdir();
    let host = d.path().join("host");
    let dpu = d.path().join("dpu");
    mkdirs(&host, &["lower/dir", "upper", "work", "merged"]);
    std::fs::write(host.join("lower/a"), "from-lower").unwrap();
    std::fs::write(host.join("lower/dir/x"), "x").unwrap();
    std::fs::write(host.join("upper/b"), "from-upper").unwrap();
    let h = HostD::start(
        d.path(),
        &[&host],
        &format!(
            "  {{ fstype = \"overlay\", target_under = {:?} }},\n",
            host.display().to_string()
        ),
    );
    let _m = h.qtfs(&host, &dpu);
    // The DPU looks the mount point up first, so its kernel holds the entry of the empty
    // directory: the mounted content must show all the same.
    assert!(listing(&dpu.join("merged")).is_empty());

    let dp = dpu.display();
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!(
            "mount -t overlay overlay -o lowerdir={dp}/lower,upperdir={dp}/upper,workdir={dp}/work {dp}/merged && echo mounted; \
             grep -q ' {dp}/merged ' /proc/self/mountinfo || echo not-local"
        ),
    );
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("mounted\nnot-local"),
        "{}",
        stdout(&out)
    );
    assert!(
        h.has_mount(&host.join("merged"), "overlay"),
        "no overlay on the HOST"
    );
    assert!(h.log().contains("mounted overlay on"));

    // Through qtfs the DPU sees the HOST's overlay, at once.
    let merged = dpu.join("merged");
    assert_eq!(listing(&merged), ["a", "b", "dir"]);
    assert_eq!(
        std::fs::read_to_string(merged.join("a")).unwrap(),
        "from-lower"
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("b")).unwrap(),
        "from-upper"
    );
    assert_eq!(std::fs::read_to_string(merged.join("dir/x")).unwrap(), "x");
    // Writes go through the HOST's overlay: copy-up into upper, whiteouts for deletions.
    std::fs::write(merged.join("c"), "new").unwrap();
    std::fs::remove_file(merged.join("a")).unwrap();
    assert_eq!(
        std::fs::read_to_string(host.join("upper/c")).unwrap(),
        "new"
    );
    let wh = std::fs::symlink_metadata(host.join("upper/a")).expect("whiteout in upper");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("lower/a")).unwrap(),
        "from-lower"
    );

    // util-linux umount on the DPU: the HOST unmounts, the DPU sees the bare directory.
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!("umount {dp}/merged && echo unmounted"),
    );
    assert!(out.status.success() && stdout(&out).contains("unmounted"));
    assert!(!h.has_mount(&host.join("merged"), "overlay"));
    assert!(listing(&merged).is_empty(), "{:?}", listing(&merged));
    // Unmounting again: the kernel's own answer (EINVAL: not a mount point) comes back.
    let out = supervise(&h, &h.listen, &[], &format!("$PROBE umount {dp}/merged 0"));
    assert_eq!(stdout(&out).trim(), format!("errno={}", libc::EINVAL));
}

#[test]
fn docker_style_relative_symlinked_and_chrooted_mounts_are_forwarded() {
    let test = "docker_style_relative_symlinked_and_chrooted_mounts_are_forwarded";
    tests::init_tracing();
    if !fuse_ready(test) {
        return;
    }
    let d = tmpdir();
    let host = d.path().join("host");
    // The DPU's management plane lives in a chroot with the qtfs mount inside it.
    let root = d.path().join("root");
    let dpu = root.join("var/lib/docker");
    mkdirs(
        &host,
        &[
            "overlay2/l1/diff",
            "overlay2/l2/diff",
            "overlay2/c/diff",
            "overlay2/c/work",
            "overlay2/c/merged",
            "overlay2/l",
        ],
    );
    std::fs::write(host.join("overlay2/l1/diff/base"), "1").unwrap();
    std::fs::write(host.join("overlay2/l2/diff/top"), "2").unwrap();
    let h = HostD::start(
        d.path(),
        &[&host],
        &format!(
            "  {{ fstype = \"overlay\", target_under = {:?} }},\n",
            host.join("overlay2").display().to_string()
        ),
    );
    let _m = h.qtfs(&host, &dpu);
    // dockerd's short names: l/<ID> -> ../<layer>/diff, made through qtfs.
    std::os::unix::fs::symlink("../l1/diff", dpu.join("overlay2/l/AAA")).unwrap();
    std::os::unix::fs::symlink("../l2/diff", dpu.join("overlay2/l/BBB")).unwrap();
    let dp = dpu.display();

    // Relative options from the data root (dockerd's mountFrom for long option strings).
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!(
            "cd {dp}/overlay2 && $PROBE mount overlay c/merged overlay 0 lowerdir=l/BBB:l/AAA,upperdir=c/diff,workdir=c/work"
        ),
    );
    assert_eq!(stdout(&out).trim(), "ok");
    let merged = host.join("overlay2/c/merged");
    assert!(h.has_mount(&merged, "overlay"));
    assert_eq!(listing(&dpu.join("overlay2/c/merged")), ["base", "top"]);
    // Lazy unmount through a symlink outside qtfs pointing at the mount point.
    let link = d.path().join("link");
    std::os::unix::fs::symlink(dpu.join("overlay2/c/merged"), &link).unwrap();
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!("$PROBE umount {} {}", link.display(), libc::MNT_DETACH),
    );
    assert_eq!(stdout(&out).trim(), "ok");
    assert!(!h.has_mount(&merged, "overlay"));

    // Chrooted caller (static busybox in the root): paths resolve in the caller's root.
    if !Path::new("/bin/busybox").exists() {
        tests::skip(test, "no /bin/busybox: chroot part not run");
        return;
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!(
            "chroot {} /bin/busybox mount -t overlay overlay -o lowerdir=/var/lib/docker/overlay2/l/AAA,upperdir=/var/lib/docker/overlay2/c/diff,workdir=/var/lib/docker/overlay2/c/work /var/lib/docker/overlay2/c/merged && echo chroot-mounted",
            root.display()
        ),
    );
    assert!(stdout(&out).contains("chroot-mounted"));
    assert!(h.has_mount(&merged, "overlay"));
    assert_eq!(listing(&dpu.join("overlay2/c/merged")), ["base"]);
    let out = supervise(
        &h,
        &h.listen,
        &[],
        &format!(
            "chroot {} /bin/busybox umount /var/lib/docker/overlay2/c/merged && echo chroot-unmounted",
            root.display()
        ),
    );
    assert!(stdout(&out).contains("chroot-unmounted"));
    assert!(!h.has_mount(&merged, "overlay"));
}

#[test]
fn refused_mounts_get_eperm_and_are_logged_local_mounts_stay_local() {
    let test = "refused_mounts_get_eperm_and_are_logged_local_mounts_stay_local";
    tests::init_tracing();
    if !fuse_ready(test) {
        return;
    }
    let d = tmpdir();
    let host = d.path().join("host");
    let dpu = d.path().join("dpu");
    mkdirs(
        &host,
        &[
            "ov/layers/a",
            "ov/up",
            "ov/work",
            "ov/merged",
            "other",
            "shm",
        ],
    );
    let local = d.path().join("local");
    mkdirs(d.path(), &["local", "locallower"]);
    let hs = |p: &str| host.join(p).display().to_string();
    let h = HostD::start(
        d.path(),
        &[&host],
        &format!(
            "  {{ fstype = \"overlay\", target_under = {:?}, lower_under = [{:?}], upper_under = [{:?}] }},\n  {{ fstype = \"tmpfs\", target_under = {:?} }},\n",
            hs("ov/merged"),
            hs("ov/layers"),
            hs("ov"),
            hs("shm")
        ),
    );
    let _m = h.qtfs(&host, &dpu);
    let dp = dpu.display();
    let lp = d.path().display();
    let eperm = format!("errno={}", libc::EPERM);
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let script = format!(
        "echo 1 $($PROBE mount tmpfs {dp}/ov/merged tmpfs 0 size=1m)\n\
         echo 2 $($PROBE mount overlay {dp}/ov/merged overlay 0 lowerdir={dp}/other,upperdir={dp}/ov/up,workdir={dp}/ov/work)\n\
         echo 3 $($PROBE mount overlay {dp}/ov/merged overlay 0 lowerdir={lp}/locallower,upperdir={dp}/ov/up,workdir={dp}/ov/work)\n\
         echo 4 $($PROBE mount overlay {dp}/other overlay 0 lowerdir={dp}/ov/layers/a,upperdir={dp}/ov/up,workdir={dp}/ov/work)\n\
         echo 5 $($PROBE mount overlay {dp}/ov/merged overlay 0 lowerdir={dp}/ov/layers/a,upperdir={dp}/ov/up,workdir={dp}/ov/work,index=off,xino=off)\n\
         echo 6 $($PROBE mount shm {dp}/shm tmpfs {nosuid_nodev_noexec} mode=1777,size=65536,uid=0)\n\
         echo 7 $($PROBE mount shm {dp}/shm tmpfs 0 size=1m,mpol=bind)\n\
         echo 8 $($PROBE mount /dev/sda1 {dp}/shm tmpfs 0 size=1m)\n\
         echo 9 $($PROBE mount t {lp}/local tmpfs 0 size=1m)\n\
         grep -q ' {lp}/local ' /proc/self/mountinfo && echo 9 local\n\
         echo 10 $($PROBE mount {lp}/locallower {dp}/other - {} -)\n",
        libc::MS_BIND
    );
    let out = supervise(&h, &h.listen, &[], &script);
    assert!(out.status.success());
    let res = stdout(&out);
    let line = |n: u32| -> String {
        res.lines()
            .filter(|l| l.split(' ').next() == Some(n.to_string().as_str()))
            .map(|l| l.split_once(' ').map(|x| x.1).unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join("|")
    };
    // 1: no rule for tmpfs there; 2: lowerdir outside lower_under; 3: a DPU-local lowerdir
    // cannot be mounted on the HOST; 4: target outside every rule.
    for n in 1..=4 {
        assert_eq!(line(n), eperm, "case {n}");
    }
    // 5: allowed, with the allowed extra options; 6: dockerd's shm tmpfs with its flags.
    assert_eq!(line(5), "ok");
    assert!(h.has_mount(&host.join("ov/merged"), "overlay"));
    assert_eq!(line(6), "ok");
    assert!(h.has_mount(&host.join("shm"), "tmpfs"));
    // 7: an option off the list; 8: a device path as source.
    assert_eq!(line(7), eperm);
    assert_eq!(line(8), eperm);
    // 9: not on qtfs: runs natively, in the supervised process's namespace, not on the HOST.
    assert_eq!(line(9), "ok|local");
    assert!(!h.has_mount(&local, "tmpfs"));
    // 10: a bind of a DPU-local directory onto a qtfs path.
    assert_eq!(line(10), eperm);
    let log = h.log();
    let refusals = log.matches("refused a DPU mount").count();
    assert!(refusals >= 5, "HOST log has {refusals} refusals:\n{log}");
    assert!(log.contains("lowerdir") && log.contains("outside the allowed trees"));
}

/// A TCP → Unix proxy between the supervisor and the HOST that can go silent or be cut.
struct Proxy {
    addr: String,
    frozen: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(unix_path: PathBuf) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = format!("tcp://{}", l.local_addr().expect("addr"));
        let frozen = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (f, c, cs) = (frozen.clone(), cut.clone(), conns.clone());
        std::thread::spawn(move || {
            while !c.load(Ordering::SeqCst) {
                let Ok((tcp, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = tcp.set_nonblocking(false);
                let Ok(ux) = UnixStream::connect(&unix_path) else {
                    continue;
                };
                cs.lock().unwrap().push(tcp.try_clone().expect("clone"));
                let pump = |mut r: Box<dyn Read + Send>,
                            mut w: Box<dyn Write + Send>,
                            f: Arc<AtomicBool>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = r.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // Silent: bytes read after the freeze are dropped.
                            if !f.load(Ordering::SeqCst) && w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                };
                pump(
                    Box::new(tcp.try_clone().expect("clone")),
                    Box::new(ux.try_clone().expect("clone")),
                    f.clone(),
                );
                pump(Box::new(ux), Box::new(tcp), f.clone());
            }
            // The listener is dropped here: new dials are refused.
        });
        Proxy {
            addr,
            frozen,
            cut,
            conns,
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn wait_file(p: &Path, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            t0.elapsed() < limit,
            "{} did not appear within {limit:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

#[test]
fn a_lost_link_fails_the_mount_promptly() {
    let test = "a_lost_link_fails_the_mount_promptly";
    tests::init_tracing();
    if !fuse_ready(test) {
        return;
    }
    let d = tmpdir();
    let host = d.path().join("host");
    let dpu = d.path().join("dpu");
    mkdirs(&host, &["lower", "lower2", "m1", "m2", "m3"]);
    let h = HostD::start(
        d.path(),
        &[&host],
        &format!(
            "  {{ fstype = \"overlay\", target_under = {:?} }},\n",
            host.display().to_string()
        ),
    );
    let _m = h.qtfs(&host, &dpu);
    let proxy = Proxy::start(PathBuf::from(h.listen.trim_start_matches("unix://")));
    let (dp, lp) = (dpu.display(), d.path().display());
    // A read-only overlay (two lowers, no upper).
    let opts = format!("lowerdir={dp}/lower:{dp}/lower2");
    // Each wait gives up after 30 s, so a failed assertion below cannot leave it hanging.
    let wait = |g: &str| {
        format!("i=0; while [ ! -e {lp}/{g} ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done")
    };
    let script = format!(
        "echo 1 $($PROBE mount overlay {dp}/m1 overlay 0 {opts}); touch {lp}/s1; {}\n\
         echo 2 $($PROBE mount overlay {dp}/m2 overlay 0 {opts}); touch {lp}/s2; {}\n\
         echo 3 $($PROBE mount overlay {dp}/m3 overlay 0 {opts}); touch {lp}/s3\n",
        wait("g1"),
        wait("g2")
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let m1 = std::thread::scope(|s| {
        s.spawn(|| {
            let _ = tx.send(supervise(
                &h,
                &proxy.addr,
                // The HOST listens on a Unix socket (clear by default) behind a TCP proxy.
                &["--mount-timeout", "1", "--encrypt", "false"],
                &script,
            ));
        });
        wait_file(&d.path().join("s1"), Duration::from_secs(30));
        let m1 = h.has_mount(&host.join("m1"), "overlay");
        // The link goes silent: the mount fails with ETIMEDOUT after --mount-timeout.
        proxy.freeze();
        std::fs::write(d.path().join("g1"), "").unwrap();
        let took = wait_file(&d.path().join("s2"), Duration::from_secs(8));
        assert!(took < Duration::from_secs(5), "silent link: {took:?}");
        // The link is cut: the next mount fails at once with ENOLINK.
        proxy.cut();
        std::fs::write(d.path().join("g2"), "").unwrap();
        let took = wait_file(&d.path().join("s3"), Duration::from_secs(8));
        assert!(took < Duration::from_secs(3), "cut link: {took:?}");
        m1
    });
    let out = rx.recv().expect("supervisor output");
    let res = stdout(&out);
    assert!(res.contains("1 ok") && m1, "{res}");
    assert!(
        res.contains(&format!("2 errno={}", libc::ETIMEDOUT)),
        "{res}"
    );
    assert!(res.contains(&format!("3 errno={}", libc::ENOLINK)), "{res}");
    assert!(!h.has_mount(&host.join("m2"), "overlay"));
    assert!(!h.has_mount(&host.join("m3"), "overlay"));
}
