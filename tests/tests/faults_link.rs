//! The link cut and restored under traffic (issue 15): the HOST daemon runs in a network
//! namespace of its own behind a veth pair; the DPU side (a qtfs mount, the DPU offloadd with
//! a bridged socket, rexec) stays in this namespace; the cut is `ip link set … down`.
//!
//! - A short cut (2 s, shorter than the 10 s heartbeat timeout): TCP retransmits, the sessions
//!   survive, and the fs writer, the bridge echo and a running rexec call all complete as if
//!   nothing happened (slower).
//! - A long cut (14 s): the sessions are declared dead after the heartbeat timeout; an fs call
//!   made during the cut fails with EIO within `timeout=` after that (never hangs), a running
//!   rexec fails with a message, and once the link is back the mount, the bridge and rexec work
//!   again without a remount or a daemon restart.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::fs::{fuse_ready, tmpdir};
use tests::{spawn_ready, wait_until, KillOnDrop};

const NS: &str = "oflt-host";
const DPU_IF: &str = "oflt-d";
const HOST_IF: &str = "oflt-h";
const DPU_IP: &str = "10.254.90.1";
const HOST_IP: &str = "10.254.90.2";

fn ip(args: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ip {args}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The namespace and veth pair; removed on drop (also when the test fails).
struct Net;

impl Net {
    fn up() -> Option<Net> {
        let _ = Net::down_all();
        let ok = ip(&format!("netns add {NS}"))
            && ip(&format!("link add {DPU_IF} type veth peer name {HOST_IF}"))
            && ip(&format!("link set {HOST_IF} netns {NS}"))
            && ip(&format!("addr add {DPU_IP}/30 dev {DPU_IF}"))
            && ip(&format!("link set {DPU_IF} up"))
            && ip(&format!("-n {NS} addr add {HOST_IP}/30 dev {HOST_IF}"))
            && ip(&format!("-n {NS} link set {HOST_IF} up"))
            && ip(&format!("-n {NS} link set lo up"));
        ok.then_some(Net)
    }

    fn cut(&self, down: bool) {
        assert!(ip(&format!(
            "link set {DPU_IF} {}",
            if down { "down" } else { "up" }
        )));
    }

    fn down_all() -> bool {
        let a = ip(&format!("link del {DPU_IF} 2>/dev/null"));
        let b = ip(&format!("netns del {NS} 2>/dev/null"));
        a && b
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Net::down_all();
    }
}

fn echo(sock: &Path, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    s.write_all(msg)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    Ok(back)
}

struct Pair {
    _daemons: KillOnDrop,
    mnt: PathBuf,
    export: PathBuf,
    dsock: PathBuf,
    addr: String,
    key: PathBuf,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn start_pair(d: &Path) -> Pair {
    let (export, mnt, hs, ds) = (d.join("export"), d.join("mnt"), d.join("h"), d.join("p"));
    for p in [&export, &mnt, &hs, &ds] {
        std::fs::create_dir_all(p).unwrap();
    }
    let key = tests::write_key(d, "psk");
    let port = tests::free_port();
    let addr = format!("tcp://{HOST_IP}:{port}");
    let (hsock, dsock) = (hs.join("echo.sock"), ds.join("echo.sock"));
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[fs]\nexports = [{{ path = {:?} }}]\n[exec]\nallow_any = true\n\
             [bridge]\n[[bridge.forward]]\nlisten_side = \"dpu\"\npath = {:?}\ntarget = {:?}\n",
            export.display().to_string(),
            dsock.display().to_string(),
            hsock.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dpu.toml"),
        format!(
            "[bridge]\nallow_listen = [{:?}]\n",
            ds.display().to_string()
        ),
    )
    .unwrap();
    tests::echo_unix_server(&hsock).unwrap();
    let offloadd = tests::bin("offloadd");
    let mut daemons = KillOnDrop(Vec::new());
    let mut h = Command::new("ip");
    h.args(["netns", "exec", NS])
        .arg(&offloadd)
        .args(["--listen", &format!("tcp://0.0.0.0:{port}"), "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("host.toml"));
    daemons.0.push(spawn_ready(h, "listening"));
    let mut p = Command::new(&offloadd);
    p.args(["--connect", &addr, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("dpu.toml"));
    daemons.0.push(spawn_ready(p, "connected"));
    let out = Command::new(tests::bin("mount_qtfs"))
        .arg(&export)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("addr={addr},keyfile={},timeout=3", key.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount_qtfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("bridged socket", Duration::from_secs(10), || dsock.exists());
    Pair {
        _daemons: daemons,
        mnt,
        export,
        dsock,
        addr,
        key,
    }
}

fn rexec(pair: &Pair, script: &str) -> Command {
    let mut c = Command::new(tests::bin("rexec"));
    c.args(["/bin/sh", "-c", script])
        .env("CMD_NET_ADDR", &pair.addr)
        .env("OFFLOAD_KEY_FILE", &pair.key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn fault_link_cut_short_and_long() {
    let name = "fault_link_cut_short_and_long";
    if !fuse_ready(name) {
        return;
    }
    tests::init_tracing();
    let Some(net) = Net::up() else {
        tests::skip(name, "cannot create a network namespace and veth pair here");
        return;
    };
    let tmp = tmpdir();
    let pair = start_pair(tmp.path());

    // Short cut: everything in flight completes.
    let writer = {
        let mnt = pair.mnt.clone();
        std::thread::spawn(move || -> Result<usize, String> {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(5) {
                let p = mnt.join(format!("w{n}"));
                std::fs::write(&p, format!("payload {n}"))
                    .map_err(|e| format!("write {n}: {e}"))?;
                n += 1;
            }
            Ok(n)
        })
    };
    let running = rexec(&pair, "sleep 3; echo done").spawn().unwrap();
    let bridge = {
        let s = pair.dsock.clone();
        std::thread::spawn(move || -> Result<usize, String> {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(5) {
                let msg = format!("echo {n}").into_bytes();
                let back = echo(&s, &msg).map_err(|e| format!("echo {n}: {e}"))?;
                if back != msg {
                    return Err(format!("echo {n} came back as {back:?}"));
                }
                n += 1;
            }
            Ok(n)
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    net.cut(true);
    std::thread::sleep(Duration::from_secs(2));
    net.cut(false);
    let written = writer.join().unwrap().expect("fs writer across a 2 s cut");
    let echoed = bridge
        .join()
        .unwrap()
        .expect("bridge echo across a 2 s cut");
    let out = running.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout == b"done\n",
        "rexec across a 2 s cut: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..written {
        assert_eq!(
            std::fs::read_to_string(pair.export.join(format!("w{i}"))).unwrap(),
            format!("payload {i}")
        );
    }
    eprintln!("short cut: {written} files written, {echoed} echoes, rexec completed");

    // Long cut: calls fail within bounds, nothing hangs; everything works again afterwards.
    let running = rexec(&pair, "sleep 30; echo never").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    net.cut(true);
    let t = Instant::now();
    let r = std::fs::write(pair.mnt.join("during-cut"), b"x");
    let fs_fail = t.elapsed();
    eprintln!("fs write during the long cut: {r:?} after {fs_fail:?}");
    let t = Instant::now();
    let out = running.wait_with_output().unwrap();
    let exec_fail = t.elapsed();
    eprintln!(
        "rexec during the long cut: {:?} after {exec_fail:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let remaining = Duration::from_secs(14).saturating_sub(t.elapsed() + fs_fail);
    std::thread::sleep(remaining);
    net.cut(false);
    // Bounds: the heartbeat timeout (10 s) plus the mount's timeout=3, with slack for load.
    assert!(
        fs_fail < Duration::from_secs(20),
        "fs call hung {fs_fail:?}"
    );
    if let Err(e) = &r {
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "fs error during the cut: {e}"
        );
    }
    assert!(!out.status.success(), "rexec survived a 14 s cut");
    assert!(!out.stderr.is_empty(), "rexec failed without a message");
    assert!(
        exec_fail < Duration::from_secs(16),
        "rexec hung {exec_fail:?}"
    );
    // Back: the mount, the bridge (the DPU redials, the proxy returns) and rexec.
    wait_until(
        "mount usable after the cut",
        Duration::from_secs(30),
        || std::fs::write(pair.mnt.join("after-cut"), b"ok").is_ok(),
    );
    assert_eq!(std::fs::read(pair.export.join("after-cut")).unwrap(), b"ok");
    wait_until(
        "bridge usable after the cut",
        Duration::from_secs(30),
        || {
            echo(&pair.dsock, b"again")
                .map(|b| b == b"again")
                .unwrap_or(false)
        },
    );
    let out = rexec(&pair, "echo back").output().unwrap();
    assert!(out.status.success() && out.stdout == b"back\n", "{out:?}");
}
