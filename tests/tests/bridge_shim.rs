//! offload-shim against the real `containerd-shim-runc-v2`: a HOST offloadd (exec + bridge
//! watching /run/containerd/s) and a DPU offloadd in its own mount namespace with a private
//! tmpfs on /run, so the DPU's /run/containerd/s holds only proxies. The shim replacement runs
//! inside the DPU namespace; its `start` output must equal the real shim's byte for byte, and
//! containerd's first ttrpc call (`Task.Connect`) must reach the real shim through the proxy.
//! Needs root, unshare/nsenter and containerd-shim-runc-v2 (Debian: containerd, runc).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const REAL: &str = "/usr/bin/containerd-shim-runc-v2";

use tests::{spawn_ready, wait_until, KillOnDrop as Kill};

/// Runs `sh -c script` in the DPU's mount namespace; returns (combined output, exit code).
fn in_dpu(pid: u32, script: &str, env: &[(&str, &Path)]) -> (Vec<u8>, i32) {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-m", "--", "sh", "-c", script]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("nsenter");
    let mut all = out.stdout;
    all.extend_from_slice(&out.stderr);
    (all, out.status.code().unwrap_or(-1))
}

#[test]
fn bridge_shim_start_matches_real_shim_and_is_reachable() {
    if !tests::is_root() {
        return tests::skip(
            "bridge_shim_start_matches_real_shim_and_is_reachable",
            "needs root (mount namespace)",
        );
    }
    if !Path::new(REAL).exists() {
        return tests::skip(
            "bridge_shim_start_matches_real_shim_and_is_reachable",
            "containerd-shim-runc-v2 not installed (apt-get install containerd runc)",
        );
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = tests::write_key(d, "psk");
    let link = format!("unix://{}/link.sock", d.display());
    std::fs::write(
        d.join("host.toml"),
        format!("[exec]\nallow = [\"{REAL}\"]\n[bridge]\nwatch = [\"/run/containerd/s\"]\n"),
    )
    .unwrap();
    std::fs::write(d.join("dpu.toml"), "[bridge]\n").unwrap();
    let offloadd = tests::bin("offloadd");
    let mut host = Command::new(&offloadd);
    host.args(["--listen", &link, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("host.toml"));
    let mut procs = Kill(vec![spawn_ready(host, "listening")]);
    let mut dpu = Command::new("unshare");
    dpu.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs dpu-run /run && exec \"$0\" \"$@\"")
        .arg(&offloadd)
        .args(["--connect", &link, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("dpu.toml"));
    let dpu = spawn_ready(dpu, "connected");
    let dpu_pid = dpu.id();
    procs.0.push(dpu);

    // A bundle dir like containerd's: config.json and the shim's `log` FIFO with a reader.
    let bundle = d.join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), "{}").unwrap();
    nix::unistd::mkfifo(
        &bundle.join("log"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let log = bundle.join("log");
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::fs::File::open(log).unwrap(), &mut std::io::sink());
    });

    let id = format!("bt{}", std::process::id());
    let args = format!(
        "-namespace bridgetest -address /run/containerd/bridgetest-{id}.sock -publish-binary /usr/bin/containerd -id {id} start"
    );
    let shim = tests::bin("offload-shim");
    // As containerd does: cwd = bundle, stdin = /dev/null, stdout and stderr on one pipe.
    let (ours, code) = in_dpu(
        dpu_pid,
        &format!("cd \"$BUNDLE\" && exec \"$SHIM\" {args} </dev/null 2>&1"),
        &[
            ("BUNDLE", &bundle),
            ("SHIM", &shim),
            ("CMD_NET_ADDR", Path::new(&link)),
            ("OFFLOAD_KEY_FILE", &key),
            ("OFFLOAD_DPU_CONFIG", Path::new("/nonexistent")),
        ],
    );
    assert_eq!(
        code,
        0,
        "offload-shim start failed: {}",
        String::from_utf8_lossy(&ours)
    );
    // The real shim on the HOST for the same live id answers with the same address.
    let real = Command::new("sh")
        .args(["-c", &format!("exec {REAL} {args} </dev/null 2>&1")])
        .current_dir(&bundle)
        .output()
        .unwrap();
    assert!(real.status.success());
    assert_eq!(
        ours, real.stdout,
        "offload-shim output differs from the real shim's"
    );
    // A failing `start` (no config.json in the bundle): stderr text and exit code pass through.
    let empty = d.join("empty-bundle");
    std::fs::create_dir(&empty).unwrap();
    let fail_args = args.replace(&id, &format!("{id}-fail"));
    let (ours_fail, ours_code) = in_dpu(
        dpu_pid,
        &format!("cd \"$BUNDLE\" && exec \"$SHIM\" {fail_args} </dev/null 2>&1"),
        &[
            ("BUNDLE", &empty),
            ("SHIM", &shim),
            ("CMD_NET_ADDR", Path::new(&link)),
            ("OFFLOAD_KEY_FILE", &key),
            ("OFFLOAD_DPU_CONFIG", Path::new("/nonexistent")),
        ],
    );
    let real_fail = Command::new("sh")
        .args(["-c", &format!("exec {REAL} {fail_args} </dev/null 2>&1")])
        .current_dir(&empty)
        .output()
        .unwrap();
    assert_ne!(ours_code, 0);
    assert_eq!(Some(ours_code), real_fail.status.code());
    assert_eq!(ours_fail, real_fail.stdout, "failing start: output differs");

    let text = String::from_utf8(ours).unwrap();
    let sock = PathBuf::from(text.strip_prefix("unix://").expect("unix:// address"));
    assert!(sock.starts_with("/run/containerd/s"), "{text}");

    // Reachable on the DPU right away: containerd's first ttrpc call reaches the HOST shim.
    let probe = tests::bin("bridge_bench");
    let (out, code) = in_dpu(
        dpu_pid,
        &format!(
            "test -S {0} && exec \"$PROBE\" ttrpc-connect {0} {id}",
            sock.display()
        ),
        &[("PROBE", &probe)],
    );
    assert_eq!(
        code,
        0,
        "ttrpc through the proxy failed: {}",
        String::from_utf8_lossy(&out)
    );
    let out = String::from_utf8(out).unwrap();
    let shim_pid: i32 = out
        .trim()
        .strip_prefix("shim_pid=")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad probe output {out:?}"));
    let cmdline = std::fs::read(format!("/proc/{shim_pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&id),
        "pid {shim_pid} reported through the bridge is not the HOST shim of {id}"
    );

    // remote_kill from the DPU stops the HOST shim; its socket and the DPU proxy go away.
    let rk = tests::bin("remote_kill");
    let (out, code) = in_dpu(
        dpu_pid,
        &format!("exec \"$RK\" -s TERM {shim_pid}"),
        &[
            ("RK", &rk),
            ("CMD_NET_ADDR", Path::new(&link)),
            ("OFFLOAD_KEY_FILE", &key),
        ],
    );
    assert_eq!(code, 0, "remote_kill: {}", String::from_utf8_lossy(&out));
    wait_until("HOST shim socket removed", Duration::from_secs(5), || {
        !sock.exists()
    });
    wait_until("DPU proxy removed", Duration::from_secs(3), || {
        in_dpu(dpu_pid, &format!("test -e {}", sock.display()), &[]).1 != 0
    });
}

/// The whole chain with an unmodified containerd: containerd + ctr in the DPU namespace (own
/// /run), `offload-shim` as the runtime, the real shim and runc on the HOST. `ctr run` must
/// print the container's output (stdio FIFOs bridged) and return its exit code (events through
/// the bridged `containerd.sock.ttrpc`, task API through the bridged shim socket).
#[test]
fn bridge_containerd_run_on_dpu_container_on_host() {
    let name = "bridge_containerd_run_on_dpu_container_on_host";
    if !tests::is_root() {
        return tests::skip(name, "needs root (mount namespace, runc)");
    }
    for b in [
        REAL,
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/bin/busybox",
    ] {
        if !Path::new(b).exists() {
            return tests::skip(
                name,
                &format!("{b} missing (apt-get install containerd runc busybox-static)"),
            );
        }
    }
    if std::os::unix::net::UnixStream::connect("/run/containerd/containerd.sock.ttrpc").is_ok() {
        return tests::skip(
            name,
            "a HOST containerd owns /run/containerd/containerd.sock.ttrpc",
        );
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = tests::write_key(d, "psk");
    let link = format!("unix://{}/link.sock", d.display());
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[exec]\nallow = [\"{REAL}\"]\n[bridge]\nwatch = [\"/run/containerd/s\"]\n\
             fifo_dirs = [\"/run/containerd/fifo\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("dpu.toml"),
        "[bridge]\nfifo_dirs = [\"/run/containerd/fifo\"]\n[[bridge.forward]]\nlisten_side = \"host\"\n\
         path = \"/run/containerd/containerd.sock.ttrpc\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("containerd.toml"),
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"/run/containerd/containerd.sock\"\n",
            d.display()
        ),
    )
    .unwrap();
    // Minimal rootfs: static busybox.
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for sub in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();

    let offloadd = tests::bin("offloadd");
    let mut host = Command::new(&offloadd);
    host.args(["--listen", &link, "--key-file"])
        .arg(&key)
        .arg("--config")
        .arg(d.join("host.toml"));
    let mut procs = Kill(vec![spawn_ready(host, "listening")]);
    // DPU: private /run, offloadd in the background, containerd in the foreground.
    let mut dpu = Command::new("unshare");
    dpu.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs dpu-run /run || exit 1; \"$OFFLOADD\" --connect \"$CMD_NET_ADDR\" --config \"$DIR/dpu.toml\" & echo $! >\"$DIR/dpu-offloadd.pid\"; \
             sleep 0.5; echo dpu-ready; exec containerd --config \"$DIR/containerd.toml\" >\"$DIR/containerd.log\" 2>&1",
        )
        .env("OFFLOADD", &offloadd)
        .env("DIR", d)
        .env("CMD_NET_ADDR", &link)
        .env("OFFLOAD_KEY_FILE", &key)
        .env("OFFLOAD_DPU_CONFIG", "/nonexistent")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    let dpu = spawn_ready(dpu, "dpu-ready");
    let dpu_pid = dpu.id();
    procs.0.push(dpu);
    let _dpu_offloadd = PidFile(d.join("dpu-offloadd.pid"));
    wait_until("DPU containerd up", Duration::from_secs(15), || {
        in_dpu(dpu_pid, "ctr version >/dev/null 2>&1", &[]).1 == 0
    });
    let shim = tests::bin("offload-shim");
    let id = format!("bce{}", std::process::id());
    let (out, code) = in_dpu(
        dpu_pid,
        &format!(
            "exec timeout -s KILL 30 ctr -n bridgetest run --rm --runtime \"$SHIM\" --rootfs \"$ROOTFS\" {id} \
             /bin/sh -c 'echo hello from the HOST side; echo to-stderr >&2; exit 7'"
        ),
        &[("SHIM", &shim), ("ROOTFS", &rootfs)],
    );
    let text = String::from_utf8_lossy(&out).to_string();
    let log = std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default();
    assert_eq!(
        code,
        7,
        "ctr run: {text}\n--- containerd log tail:\n{}",
        tail(&log, 30)
    );
    assert!(text.contains("hello from the HOST side"), "{text}");
    assert!(text.contains("to-stderr"), "{text}");

    // stdin too (ctr forwards its stdin): DPU → HOST through the bridged stdin FIFO. The
    // container reads two lines rather than waiting for EOF: ctr 1.6 itself never delivers
    // stdin EOF when its stdin ends before the task exists (same without the bridge).
    let (out, code) = in_dpu(
        dpu_pid,
        &format!(
            "printf 'line one\\nline two\\n' | timeout -s KILL 30 ctr -n bridgetest run --rm --runtime \"$SHIM\" \
             --rootfs \"$ROOTFS\" {id}-in /bin/sh -c 'read a; read b; echo \"got: $a / $b\"'"
        ),
        &[("SHIM", &shim), ("ROOTFS", &rootfs)],
    );
    let text = String::from_utf8_lossy(&out).to_string();
    assert_eq!(code, 0, "ctr run with stdin: {text}");
    assert_eq!(text, "got: line one / line two\n");
}

/// Kills the process whose pid is in this file (a daemon started in the background by a shell).
struct PidFile(PathBuf);
impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}
