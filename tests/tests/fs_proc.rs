//! proc mode with a real PID-namespace separation: the "DPU" is a new PID + mount namespace
//! (its own procfs at /proc, which the mount uses as `local_proc`) where `mount_qtfs` mounts
//! this machine's (the HOST's) /proc and /sys over loopback. Checked from processes inside:
//! `/proc/<own pid>` and `/proc/self` are the caller's own DPU process while the same number
//! read by another process is the HOST's; `/proc/1` is the HOST's; `fd/N` reopens, `exe`,
//! `cwd`, `thread-self` and `task` work; `/proc/self/mountinfo` and `mounts` carry the HOST's
//! cgroup mounts where the qtfs `/sys` shows them, and the caller's own other mounts.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use tests::fs::{fs_test_links, tmpdir, ExportSpec, Host};

/// A "DPU": PID and mount namespaces of their own (private propagation, fresh /proc). Dropping
/// it kills its init, which ends every process inside (mount daemons included) and with them
/// the namespace's mounts.
struct DpuNs {
    holder: Child,
    init: u32,
}

impl DpuNs {
    fn start() -> DpuNs {
        let holder = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--propagation",
                "private",
                "--mount-proc",
                "sleep",
                "3600",
            ])
            .spawn()
            .expect("spawn unshare");
        let children = format!("/proc/{0}/task/{0}/children", holder.id());
        let mut ns = DpuNs { holder, init: 0 };
        tests::wait_until("the namespace's init", Duration::from_secs(10), || {
            ns.init = std::fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            ns.init != 0
                && std::fs::read_to_string(format!("/proc/{}/comm", ns.init))
                    .is_ok_and(|c| c.trim() == "sleep")
        });
        ns
    }

    /// `prog` run inside the namespaces.
    fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.init.to_string())
            .args(["-p", "-m", "--"])
            .arg(prog);
        c
    }

    /// `sh -c script` inside; its output.
    fn sh(&self, script: &str) -> Output {
        self.cmd("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("run sh in the namespace")
    }

    /// Like [`DpuNs::sh`] but the script must succeed; its stdout.
    fn sh_ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(
            o.status.success(),
            "`{script}` in the DPU namespace failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Mounts HOST `src` at `dst` from inside the namespace.
    fn mount(&self, host: &Host, src: &str, dst: &Path, extra: &str) {
        std::fs::create_dir_all(dst).unwrap();
        let out = self
            .cmd(tests::bin("mount_qtfs"))
            .arg(src)
            .arg(dst)
            .arg("-o")
            .arg(format!("{},{extra}", host.mount_opts()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount_qtfs {src} in the namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for DpuNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if self.init != 0 {
            // --kill-child does this already; make sure even if unshare died first.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.init as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// (Name, Pid, PPid) of a status text.
fn ident(status: &str) -> (String, String, String) {
    let get = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (get("Name:"), get("Pid:"), get("PPid:"))
}

/// A shell inside the namespace driven line by line: it reads files with builtins only, so
/// the FUSE caller is the shell itself.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    pid: u32,
}

impl Shell {
    fn new(ns: &DpuNs) -> Shell {
        let mut child = ns
            .cmd("sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut s = Shell {
            child,
            stdin,
            out,
            pid: 0,
        };
        s.pid = s.run("echo $$").trim().parse().unwrap();
        s
    }

    /// Runs one command line; its output (up to an END marker).
    fn run(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}; echo; echo END-OF-CMD").unwrap();
        let mut out = String::new();
        loop {
            let mut l = String::new();
            assert!(self.out.read_line(&mut l).unwrap() > 0, "shell ended");
            if l == "END-OF-CMD\n" {
                return out;
            }
            out.push_str(&l);
        }
    }

    /// `path` read by the shell itself (builtin `read`).
    fn read(&mut self, path: &Path) -> String {
        self.run(&format!(
            "while IFS= read -r l; do printf '%s\\n' \"$l\"; done < {}",
            path.display()
        ))
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fs_proc_own_pids_are_the_callers() {
    for kind in fs_test_links("fs_proc_own_pids_are_the_callers") {
        let tmp = tmpdir();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::ro("/proc")]);
        let ns = DpuNs::start();
        let p = tmp.path().join("proc");
        ns.mount(&host, "/proc", &p, "proc,local_proc=/proc");
        let pp = |r: &str| p.join(r);

        // A process reading /proc/<its own pid> sees itself on the DPU (what the namespace's
        // own procfs says), also through /proc/self.
        let mut a = Shell::new(&ns);
        let local = ident(&a.read(Path::new(&format!("/proc/{}/status", a.pid))));
        assert_eq!(local.0, "sh");
        let own = a.read(&pp(&format!("{}/status", a.pid)));
        assert_eq!(ident(&own), local, "own /proc/<pid>/status: {own}");
        assert_eq!(ident(&a.read(&pp("self/status"))), local);

        // Another process reading that number gets the HOST's process of that pid.
        let b = ns.sh(&format!(
            "while IFS= read -r l; do printf '%s\\n' \"$l\"; done < {}",
            pp(&format!("{}/status", a.pid)).display()
        ));
        let b_out = String::from_utf8_lossy(&b.stdout).into_owned();
        let host_a = std::fs::read_to_string(format!("/proc/{}/status", a.pid)).ok();
        if let Some(h) = &host_a {
            assert!(b.status.success(), "HOST pid {} not readable", a.pid);
            // Pid and PPid (a kworker's name changes with its work item).
            let (b_id, h_id) = (ident(&b_out), ident(h));
            assert_eq!(
                (b_id.1, b_id.2),
                (h_id.1, h_id.2),
                "HOST pid {}: {b_out}",
                a.pid
            );
            assert_ne!(ident(&b_out), local, "another reader got the DPU view");
        } else {
            assert!(!b.status.success(), "HOST has no pid {}: {b_out}", a.pid);
        }
        // ... and the first reader still gets its own after that (the cached dentry is
        // revalidated per caller).
        let again = a.read(&pp(&format!("{}/status", a.pid)));
        assert_eq!(ident(&again), local, "{again}");

        // Two processes hammering the same name at once each keep their own view.
        let flag = tmp.path().join("a-pid");
        let loop_a = ns
            .cmd("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {f}; i=0; while [ $i -lt 40 ]; do \
                 while IFS= read -r l; do case \"$l\" in Name:*|PPid:*) echo \"$l\";; esac; done < {p}/$$/status; \
                 i=$((i+1)); done",
                f = flag.display(),
                p = p.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        tests::wait_until("loop A started", Duration::from_secs(10), || {
            std::fs::read_to_string(&flag).is_ok_and(|s| s.ends_with('\n'))
        });
        let a2: u32 = std::fs::read_to_string(&flag)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let loop_b = ns.sh(&format!(
            "i=0; while [ $i -lt 40 ]; do \
             while IFS= read -r l; do case \"$l\" in Name:*|PPid:*) echo \"$l\";; esac; done < {p}/{a2}/status 2>/dev/null; \
             i=$((i+1)); done; true",
            p = p.display()
        ));
        let out_a = loop_a.wait_with_output().unwrap();
        assert!(out_a.status.success(), "loop A failed");
        // Loop A's parent (nsenter) is outside the namespace: PPid 0 in its own view.
        let out_a = String::from_utf8_lossy(&out_a.stdout).into_owned();
        assert_eq!(
            out_a.matches("Name:\tsh\nPPid:\t0\n").count(),
            40,
            "loop A read its own status each time: {out_a}"
        );
        let out_b = String::from_utf8_lossy(&loop_b.stdout).into_owned();
        let host_b = std::fs::read_to_string(format!("/proc/{a2}/status"))
            .map(|s| ident(&s))
            .ok();
        // Loop B sees the HOST's process of that number (its name may change: kworkers).
        assert!(
            !out_b.contains("PPid:\t0\n"),
            "loop B got the DPU view: {out_b}"
        );
        if let Some((_, _, ppid)) = host_b {
            let want = format!("PPid:\t{ppid}\n");
            assert_eq!(out_b.matches(&want).count(), 40, "loop B: {out_b}");
        }

        // /proc/1 is the HOST's init, not the namespace's (sleep).
        let comm = ns.sh_ok(&format!("cat {}", pp("1/comm").display()));
        assert_eq!(comm, std::fs::read_to_string("/proc/1/comm").unwrap());
        assert_ne!(comm.trim(), "sleep");

        // self and thread-self are relative links to the caller's own directory.
        let o = ns.sh_ok(&format!("echo $$; exec readlink {}", pp("self").display()));
        let (pid, link) = o.split_once('\n').unwrap();
        assert_eq!(link.trim(), pid);
        let o = ns.sh_ok(&format!(
            "echo $$; exec readlink {}",
            pp("thread-self").display()
        ));
        let (pid, link) = o.split_once('\n').unwrap();
        assert_eq!(link.trim(), format!("{pid}/task/{pid}"));
        // task lists the caller's threads.
        let o = ns.sh_ok(&format!("echo $$; exec ls {}", pp("self/task").display()));
        let (pid, tasks) = o.split_once('\n').unwrap();
        assert_eq!(tasks.trim(), pid);

        // fd/N reopens the caller's own descriptor (a magic link of the local procfs).
        let file = tmp.path().join("data");
        std::fs::write(&file, b"reopened through /proc/self/fd\n").unwrap();
        let o = ns.sh_ok(&format!(
            "exec 7<{}; exec cat {}",
            file.display(),
            pp("self/fd/7").display()
        ));
        assert_eq!(o, "reopened through /proc/self/fd\n");

        // exe and cwd read as paths in the caller's view.
        let exe = ns.sh_ok(&format!("exec readlink {}", pp("self/exe").display()));
        let real = ns.sh_ok("exec readlink /proc/self/exe");
        assert_eq!(exe, real);
        assert!(
            exe.starts_with('/') && exe.trim().ends_with("readlink"),
            "{exe}"
        );
        let cwd = ns.sh_ok(&format!(
            "cd {} && exec readlink {}",
            tmp.path().display(),
            pp("self/cwd").display()
        ));
        assert_eq!(cwd.trim(), tmp.path().display().to_string());
        // A chrooted caller (a management plane in its root) reads exe as a path in its root.
        let r = tmp.path().join("root");
        std::fs::create_dir(&r).unwrap();
        ns.sh_ok(&format!("mount --rbind / {}", r.display()));
        let exe = ns.sh_ok(&format!(
            "exec chroot {} readlink {}",
            r.display(),
            pp("self/exe").display()
        ));
        let real = ns.sh_ok(&format!(
            "exec chroot {} readlink /proc/self/exe",
            r.display()
        ));
        assert_eq!(exe, real);
        assert!(!exe.starts_with(&r.display().to_string()), "{exe}");
        // Executing /proc/self/exe (dockerd's re-exec) runs the caller's binary.
        let o = ns.sh_ok(&format!(
            "exec {} -c 'echo re-exec ok'",
            pp("self/exe").display()
        ));
        assert_eq!(o, "re-exec ok\n");

        // Listing an own directory shows the local entries, mountinfo among them.
        let ls = ns.sh_ok(&format!("exec ls {}", pp("self").display()));
        for want in ["status", "fd", "mountinfo", "cgroup", "exe"] {
            assert!(ls.lines().any(|l| l == want), "{want} missing in: {ls}");
        }
        drop(a);
        drop(ns);
    }
}

/// One mountinfo line's (id, parent, root, mount point, fstype, super options).
fn fields(l: &str) -> Option<(u64, u64, String, String, String, String)> {
    let f: Vec<&str> = l.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-")?;
    Some((
        f[0].parse().ok()?,
        f[1].parse().ok()?,
        f[3].to_string(),
        f[4].to_string(),
        f.get(sep + 1)?.to_string(),
        f.get(sep + 3)?.to_string(),
    ))
}

#[test]
fn fs_proc_mountinfo_has_host_cgroups() {
    for kind in fs_test_links("fs_proc_mountinfo_has_host_cgroups") {
        let host_cg: Vec<(String, String, String)> = std::fs::read_to_string("/proc/1/mountinfo")
            .unwrap()
            .lines()
            .filter_map(fields)
            .filter(|f| f.4 == "cgroup" || f.4 == "cgroup2")
            .filter(|f| f.3.starts_with("/sys/"))
            .map(|f| (f.3, f.4, f.5))
            .collect();
        if host_cg.is_empty() {
            tests::skip(
                "fs_proc_mountinfo_has_host_cgroups",
                "this machine has no cgroup mounts below /sys",
            );
            return;
        }
        let tmp = tmpdir();
        let host = Host::start(
            &kind,
            tmp.path(),
            &[ExportSpec::ro("/proc"), ExportSpec::ro("/sys")],
        );
        let ns = DpuNs::start();
        let p = tmp.path().join("proc");
        let s = tmp.path().join("sys");
        ns.mount(&host, "/proc", &p, "proc,local_proc=/proc");

        // Without the HOST's /sys in view, no HOST cgroup line, and the namespace's own
        // cgroup lines are gone too.
        let mi = ns.sh_ok(&format!("exec cat {}", p.join("self/mountinfo").display()));
        assert!(
            !mi.lines()
                .filter_map(fields)
                .any(|f| f.4 == "cgroup" || f.4 == "cgroup2"),
            "{mi}"
        );

        ns.mount(&host, "/sys", &s, "sys");
        let mi = ns.sh_ok(&format!("exec cat {}", p.join("self/mountinfo").display()));
        let lines: Vec<_> = mi.lines().map(|l| (l, fields(l))).collect();
        for (l, f) in &lines {
            assert!(f.is_some(), "unparsable line {l:?}");
        }
        let lines: Vec<_> = lines.into_iter().filter_map(|(_, f)| f).collect();
        // The caller's own non-cgroup mounts are there: its root, both qtfs mounts.
        let find_mp = |mp: &Path| {
            lines
                .iter()
                .find(|f| f.3 == mp.display().to_string())
                .cloned()
        };
        let sysline = find_mp(&s).expect("the qtfs /sys mount in the caller's mountinfo");
        assert!(sysline.4.starts_with("fuse"), "{sysline:?}");
        assert!(find_mp(&p).expect("proc mount").4.starts_with("fuse"));
        assert!(lines.iter().any(|f| f.3 == "/"), "root mount");
        // Every cgroup line is a HOST one placed below the qtfs /sys, parented there.
        let ids: Vec<u64> = lines.iter().map(|f| f.0).collect();
        let cg: Vec<_> = lines
            .iter()
            .filter(|f| f.4 == "cgroup" || f.4 == "cgroup2")
            .collect();
        assert_eq!(cg.len(), host_cg.len(), "{mi}");
        for (hmp, fstype, sopts) in &host_cg {
            let want = format!("{}{}", s.display(), hmp.strip_prefix("/sys").unwrap());
            let l = cg
                .iter()
                .find(|f| f.3 == want)
                .unwrap_or_else(|| panic!("no line for HOST {hmp} at {want}: {mi}"));
            assert_eq!((&l.4, &l.5), (fstype, sopts));
            assert_eq!(l.1, sysline.0, "parent is the qtfs /sys mount");
            assert_eq!(ids.iter().filter(|&&i| i == l.0).count(), 1, "unique id");
            ns.sh_ok(&format!("test -d {want}"));
        }
        // containerd/cgroups v1: the hierarchy root is the dirname of the first cgroup line
        // (each line has at least 10 fields and the fstype at n-3); a subsystem's destination
        // is field 4.
        let first_cg = mi
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                assert!(f.len() >= 10, "short line {l:?}");
                f[f.len() - 3] == "cgroup"
            })
            .map(|l| PathBuf::from(l.split(' ').nth(4).unwrap()));
        if let Some(first) = first_cg {
            assert_eq!(first.parent().unwrap(), s.join("fs/cgroup"));
        }

        // /proc/self/mounts likewise.
        let m = ns.sh_ok(&format!("exec cat {}", p.join("self/mounts").display()));
        for (hmp, fstype, _) in &host_cg {
            let want = format!("{}{}", s.display(), hmp.strip_prefix("/sys").unwrap());
            assert!(
                m.lines().any(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    f.len() == 6 && f[1] == want && f[2] == fstype
                }),
                "mounts lacks {want}: {m}"
            );
        }
        assert!(
            !m.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 2 && f[2].starts_with("cgroup") && f[1].starts_with("/sys/")
            }),
            "the caller's own cgroup mounts are gone: {m}"
        );
        // A chrooted caller sees its own view: the lines are placed where *it* reaches the
        // qtfs /sys (the kernel renders its table relative to its root).
        let r = tmp.path().join("root");
        std::fs::create_dir(&r).unwrap();
        ns.sh_ok(&format!("mount --rbind / {}", r.display()));
        let mi_r = ns.sh_ok(&format!(
            "exec chroot {} cat {}",
            r.display(),
            p.join("self/mountinfo").display()
        ));
        let cg_r: Vec<String> = mi_r
            .lines()
            .filter_map(fields)
            .filter(|f| f.4 == "cgroup" || f.4 == "cgroup2")
            .map(|f| f.3)
            .collect();
        assert_eq!(cg_r.len(), host_cg.len(), "{mi_r}");
        for mp in &cg_r {
            assert!(
                mp.starts_with(&format!("{}/fs/cgroup", s.display())),
                "{mp}"
            );
        }
        // Another process's (the HOST's) mountinfo stays the HOST's.
        let h = ns.sh_ok(&format!("exec cat {}", p.join("1/mountinfo").display()));
        assert!(h
            .lines()
            .any(|l| l.contains(" - cgroup") && l.contains(" /sys/fs/cgroup/")));
        drop(ns);
    }
}

/// Kills the processes whose command line contains `needle` (a HOST shim of a test container
/// left by a failed run) and removes the cgroups named `leaf` below `parent` of every v1
/// hierarchy.
struct ShimGuard {
    needle: String,
    parent: String,
    leaf: String,
}

impl Drop for ShimGuard {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains(&self.needle) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let p = e.path().join(&self.parent);
                let _ = std::fs::remove_dir(p.join(&self.leaf));
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// The real daemons: containerd on a "DPU" (own PID and mount namespaces, chrooted into a root
/// whose /proc and /sys are qtfs mounts of the HOST's, the seed's layout) runs a container on
/// the HOST through offload-shim (its pid a HOST pid, its cgroup the HOST's); containerd's
/// cgroup lookup for that pid (`/proc/<pid>/cgroup`, then `/proc/self/mountinfo`) leads to
/// the HOST's cgroup directories. dockerd in the same root finds the cpu cgroup
/// (cfs quota and shares supported) and its own fds in `/proc/<getpid()>/fd`: the lab's
/// "Unable to find cpu cgroup in mounts" and "Error opening /proc/<pid>/fd" are gone.
#[test]
fn fs_proc_containerd_finds_host_cgroups() {
    let name = "fs_proc_containerd_finds_host_cgroups";
    tests::init_tracing();
    if !tests::fs::fuse_ready(name) {
        return;
    }
    const REAL: &str = "/usr/bin/containerd-shim-runc-v2";
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
    if !std::fs::read_to_string("/proc/1/mountinfo")
        .unwrap_or_default()
        .contains(" - cgroup cgroup ")
    {
        return tests::skip(name, "no cgroup v1 hierarchies on this machine");
    }
    let t = tmpdir();
    let d = t.path();
    let key = tests::write_key(d, "psk");
    let link = format!("unix://{}/link.sock", d.display());
    std::fs::write(
        d.join("host.toml"),
        format!(
            "[fs]\nexports = [{{ path = \"/proc\", read_only = true }}, {{ path = \"/sys\" }}]\n\
             [exec]\nallow = [\"{REAL}\"]\n[bridge]\nwatch = [\"/run/containerd/s\"]\n\
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
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for sub in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    std::fs::create_dir_all(d.join("local_proc")).unwrap();
    std::fs::create_dir_all(d.join("dpuroot")).unwrap();

    // HOST: offloadd in a mount namespace with a private /run (the HOST shim's sockets and
    // runc state land there, not in this machine's /run).
    let offloadd = tests::bin("offloadd");
    let mut host = Command::new("unshare");
    host.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs host-run /run && exec \"$OFFLOADD\" --listen \"$LINK\" --key-file \"$KEY\" --config \"$DIR/host.toml\"")
        .env("OFFLOADD", &offloadd)
        .env("LINK", &link)
        .env("KEY", &key)
        .env("DIR", d);
    let _host = tests::KillOnDrop(vec![tests::spawn_ready(host, "listening")]);

    // DPU: PID + mount namespaces; the bridge offloadd, then the management plane's root
    // (a recursive bind of /, with /etc under an overlay so that the daemons' writes there,
    // e.g. dockerd's key.json, stay in the test directory) with qtfs /proc (proc mode,
    // local_proc = the namespace's own procfs) and /sys, and containerd chrooted there.
    let id = format!("fsproc{}", std::process::id());
    let _guard = ShimGuard {
        needle: format!("-id {id} "),
        parent: "fsproctest".into(),
        leaf: id.clone(),
    };
    let script = "set -e; mount -t tmpfs dpu-run /run; \
        \"$OFFLOADD\" --connect \"$LINK\" --key-file \"$KEY\" --config \"$DIR/dpu.toml\" & \
        R=\"$DIR/dpuroot\"; mount --rbind / \"$R\"; \
        mkdir -p \"$DIR/etc-u\" \"$DIR/etc-w\"; \
        mount -t overlay overlay -o \"lowerdir=/etc,upperdir=$DIR/etc-u,workdir=$DIR/etc-w\" \"$R/etc\"; \
        O=\"addr=$LINK,keyfile=$KEY,allow_other\"; \
        \"$MOUNTQ\" /proc \"$R/proc\" -o \"$O,proc,local_proc=$DIR/local_proc\"; \
        \"$MOUNTQ\" /sys \"$R/sys\" -o \"$O,sys\"; \
        mount -t proc proc \"$R$DIR/local_proc\"; \
        sleep 0.5; \
        chroot \"$R\" containerd --config \"$DIR/containerd.toml\" >\"$DIR/containerd.log\" 2>&1 & \
        echo dpu-ready; wait";
    let mut dpu = Command::new("unshare");
    dpu.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--propagation",
        "private",
        "--mount-proc",
        "sh",
        "-c",
        script,
    ])
    .env("OFFLOADD", &offloadd)
    .env("MOUNTQ", tests::bin("mount_qtfs"))
    .env("LINK", &link)
    .env("KEY", &key)
    .env("DIR", d)
    .env("OFFLOAD_DPU_CONFIG", "/nonexistent")
    // offload-shim (started by containerd) reaches the HOST with these.
    .env("CMD_NET_ADDR", &link)
    .env("OFFLOAD_KEY_FILE", &key);
    let dpu = tests::spawn_ready(dpu, "dpu-ready");
    let children = format!("/proc/{0}/task/{0}/children", dpu.id());
    let init: u32 = std::fs::read_to_string(&children)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("the DPU namespace's init");
    let _dpu = tests::KillOnDrop(vec![dpu]);
    // `sh -c script` in the management plane's root: (stdout + stderr, success).
    let in_root = |script: &str| -> (String, bool) {
        let o = Command::new("nsenter")
            .args(["-t", &init.to_string(), "-p", "-m", "--", "chroot"])
            .arg(d.join("dpuroot"))
            .args(["sh", "-c", script])
            .output()
            .unwrap();
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        (s, o.status.success())
    };
    let ctr = |args: &str| in_root(&format!("exec timeout -s KILL 60 ctr -n fsproctest {args}"));
    let log = || std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default();
    tests::wait_until("DPU containerd up", Duration::from_secs(30), || {
        ctr("version").1
    });
    // The management plane's own view: its mountinfo names the HOST's cgroup hierarchies at
    // /sys/fs/cgroup (the qtfs /sys in its root).
    let (mi, ok) = in_root("exec cat /proc/self/mountinfo");
    assert!(ok, "{mi}");
    let shim = tests::bin("offload-shim");
    let (out, ok) = ctr(&format!(
        "run -d --runtime {} --rootfs {} {id} /bin/sh -c 'sleep 20'",
        shim.display(),
        rootfs.display()
    ));
    assert!(ok, "ctr run -d: {out}\n--- containerd log:\n{}", log());
    // The task runs on the HOST: its pid is a HOST pid whose cgroup file names our cgroup.
    let (tasks, ok) = ctr("task ls");
    assert!(ok, "{tasks}");
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("task ls: {tasks}"));
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.contains(&format!("/fsproctest/{id}")),
        "HOST pid {pid}: {cg}"
    );
    // What containerd/cgroups v1 does for that pid from the DPU: /proc/<pid>/cgroup through
    // the mount is the HOST's; each subsystem mounted on the HOST has a cgroup line in the
    // management plane's /proc/self/mountinfo whose mount point plus the pid's path is the
    // HOST's cgroup directory (through the qtfs /sys).
    let (dpu_cg, ok) = in_root(&format!("exec cat /proc/{pid}/cgroup"));
    assert!(
        ok && dpu_cg == cg,
        "/proc/{pid}/cgroup from the DPU: {dpu_cg}"
    );
    let host_mi = std::fs::read_to_string("/proc/1/mountinfo").unwrap();
    let cg_lines = |t: &str| -> Vec<(String, String, String)> {
        t.lines()
            .filter_map(fields)
            .filter(|f| f.4 == "cgroup")
            .map(|f| (f.2, f.3, f.5))
            .collect()
    };
    let (host_lines, dpu_lines) = (cg_lines(&host_mi), cg_lines(&mi));
    let mut checked = 0;
    for l in cg.lines() {
        let mut it = l.splitn(3, ':');
        let (_, subs, path) = (it.next(), it.next().unwrap_or(""), it.next().unwrap_or(""));
        for sub in subs.split(',').filter(|s| !s.is_empty()) {
            let has = |ls: &[(String, String, String)]| {
                ls.iter()
                    .find(|(_, _, o)| o.split(',').any(|x| x == sub))
                    .cloned()
            };
            if has(&host_lines).is_none() {
                continue; // not mounted on the HOST either (this machine lists such hierarchies)
            }
            let (root, mp, _) = has(&dpu_lines)
                .unwrap_or_else(|| panic!("no {sub} line in the DPU's mountinfo: {mi}"));
            let rel = path
                .strip_prefix(root.trim_end_matches('/'))
                .unwrap_or(path);
            let (out, ok) = in_root(&format!("test -d '{mp}{rel}'"));
            assert!(
                ok,
                "{sub}: {mp}{rel} not a directory in the DPU's view {out}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} subsystems checked: {cg}");
    // Give the cgroup monitor a moment, then stop the task and look at the log.
    std::thread::sleep(Duration::from_millis(500));
    let (out, ok) = ctr(&format!("task kill -s KILL {id}"));
    assert!(ok, "task kill: {out}");
    tests::wait_until("task stopped", Duration::from_secs(20), || {
        ctr("task ls")
            .0
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
    });
    let (out, ok) = ctr(&format!("task delete {id}"));
    assert!(ok, "task delete: {out}");
    let (out, ok) = ctr(&format!("container rm {id}"));
    assert!(ok, "container rm: {out}");
    // (containerd's log may still show the real shim's "loading cgroup for <pid>": on the
    // HOST, /proc/<pid>/cgroup can name hierarchies not mounted there; that is the HOST's.)

    // dockerd in the same root (its own data and exec roots, the DPU's containerd): its
    // cgroup probe reads /proc/self/mountinfo and the HOST's cgroup files through qtfs, and it
    // counts its fds in /proc/<getpid()>/fd.
    let cli = Command::new("docker").arg("--version").output();
    if !Path::new("/usr/sbin/dockerd").exists() || !cli.is_ok_and(|o| o.status.success()) {
        return tests::skip(
            name,
            "dockerd or the docker CLI missing (apt-get install docker.io): the dockerd half not run",
        );
    }
    let sock = d.join("docker.sock");
    let (out, ok) = in_root(&format!(
        "dockerd --data-root {d}/docker --exec-root {d}/docker-exec --pidfile {d}/docker.pid \
         -H unix://{sock} --containerd /run/containerd/containerd.sock --storage-driver vfs \
         --iptables=false --ip-masq=false --bridge=none >{d}/dockerd.log 2>&1 &",
        d = d.display(),
        sock = sock.display()
    ));
    assert!(ok, "starting dockerd: {out}");
    let docker = |args: &[&str]| {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(args)
            .env("DOCKER_CONFIG", d.join("docker-cli"))
            .output()
            .unwrap()
    };
    let dlog = || std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default();
    let t0 = std::time::Instant::now();
    while !docker(&["version"]).status.success() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "dockerd not up within 60 s; its log:\n{}",
            dlog()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = docker(&[
        "info",
        "--format",
        "{{.CPUCfsQuota}} {{.CPUShares}} {{.NFd}}",
    ]);
    let text = String::from_utf8_lossy(&info.stdout).into_owned();
    let warn = String::from_utf8_lossy(&info.stderr).into_owned();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        f.get(..2),
        Some(&["true", "true"][..]),
        "dockerd found no cpu cgroup: {text}{warn}\n--- dockerd log:\n{}",
        dlog()
    );
    assert!(
        f.get(2).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) > 0,
        "dockerd counted no fds in /proc/<its pid>/fd: {text}"
    );
    let dl = dlog();
    for bad in [
        "Unable to find cpu cgroup",
        "Error opening /proc/",
        "No cpu cfs quota",
    ] {
        assert!(
            !dl.contains(bad) && !warn.contains(bad),
            "{bad}:\n{dl}{warn}"
        );
    }
}
