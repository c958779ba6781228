//! mount.qtfs — mounts a HOST directory (or `/proc`, `/sys`) on the DPU through FUSE.
//!
//! Installed as `/sbin/mount.qtfs` it makes `mount -t qtfs [-o OPTS] SRC DST` work (mount(8)
//! runs `mount.qtfs SRC DST [-sfnv] -o OPTS`). It checks the HOST, mounts, then backgrounds
//! itself (like sshfs); `umount DST` ends it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use offload_fs::{MountOptions, QtfsFs};
use transport::{Client, Registry};

const AFTER_HELP: &str = "\
Options (-o, comma separated):
  addr=URL            HOST offloadd address (tcp://H:P, unix:///p, vsock://CID:PORT, ...);
                      default $QTFS_SERVER_ADDR, then [qtfs] addr in /etc/offload/dpu.toml
  transport=T         link type when addr= is a bare address
  keyfile=F           pre-shared key (default $OFFLOAD_KEY_FILE, then /etc/offload/psk)
  encrypt=BOOL        encrypt the link (default: [transport.<kind>] encrypt in the DPU
                      config, else on for tcp, off for other links); must match the HOST
  proc | sys          pseudo filesystem mode (no caching, direct I/O). proc: the caller's own
                      self, thread-self and /proc/<own pid|tid> are the DPU's (links into
                      local_proc), their mountinfo/mounts list the HOST's cgroup mounts below
                      the qtfs /sys mount; everything else is the HOST's /proc
  local_proc=P        where the DPU's own procfs is mounted, as the processes using the mount
                      see it (default /local_proc)
  ro | rw             read-only / read-write mount
  coherent_ttl=S      cache lifetime of attributes, names (also absent ones) and file pages
                      while the HOST pushes its changes (default 60; the HOST daemon must
                      run as root to watch); 0 = no change feed, attr_timeout applies
  attr_timeout=S      attribute cache seconds without the change feed (default 1),
                      entry_timeout=S likewise
  negative_timeout=S  for S seconds after this mount makes a directory, answer lookups of
                      names it did not make there ENOENT without asking the HOST
                      (default 0: off; speeds up unpacking trees, hides HOST-side creations)
  timeout=S           fail operations with EIO after S seconds of HOST outage (default 30);
                      the mount itself waits S seconds, at least 5 and at most 30, for the HOST
  hard                wait for the HOST forever instead
  allow_other         let every user use the mount
  threads=N           FUSE event-loop threads (default 4)
  writeback_cache     kernel write-back caching (off by default)
  sync                acknowledge a write only once the HOST wrote it (default: async, writes
                      are acknowledged once queued in order; errors surface at close/fsync),
                      and make directory operations synchronous too (see wsync)
  wsync, nowsync=0    answer create/mkdir/symlink/unlink/setattr only once the HOST did them
                      (default: nowsync, in directories this mount made they are answered at
                      once and sent in order; errors surface at close/fsync/listing)
  readahead=KB        kernel readahead for the mount (default 4096; 0 = kernel default 128)
  log=FILE            write the background process's log there
Examples:
  mount -t qtfs -o proc /proc /another_rootfs/proc
  mount.qtfs -o addr=tcp://10.0.0.1:7000,keyfile=/etc/offload/psk /var/lib/docker /mnt/docker";

#[derive(Parser, Debug)]
#[command(
    name = "mount.qtfs",
    version,
    about = "Mount a HOST directory on the DPU over the dpu-offload link (FUSE)",
    after_help = AFTER_HELP
)]
struct Args {
    /// HOST path inside an export (e.g. /proc, /var/lib/docker/containers).
    src: String,
    /// Local mount point.
    dst: PathBuf,
    /// Mount options (see below); may be repeated.
    #[arg(short = 'o', value_name = "OPTS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground (serve the mount from this process).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Ignored (mount(8) compatibility: no mtab).
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    /// Ignored (mount(8) compatibility: sloppy).
    #[arg(short = 's', hide = true)]
    sloppy: bool,
    /// Verbose logging.
    #[arg(short = 'v')]
    verbose: bool,
    /// Ignored (mount(8) compatibility: filesystem type).
    #[arg(short = 't', hide = true)]
    fstype: Option<String>,
    /// Internal: fd to report readiness on (used when backgrounding).
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
}

/// Everything `-o` selects.
struct Opts {
    mount: MountOptions,
    addr: Option<String>,
    transport: Option<String>,
    keyfile: Option<PathBuf>,
    allow_unauthenticated: bool,
    /// `encrypt=BOOL`: overrides `[transport.<kind>] encrypt` of the DPU config.
    encrypt: Option<bool>,
    log: Option<PathBuf>,
}

fn secs(v: &str, what: &str) -> anyhow::Result<Duration> {
    let f: f64 = v
        .parse()
        .with_context(|| format!("{what}={v}: not a number of seconds"))?;
    anyhow::ensure!(f.is_finite() && f >= 0.0, "{what}={v}: must be >= 0");
    Ok(Duration::from_secs_f64(f))
}

fn parse_opts(src: &str, list: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        mount: MountOptions {
            source: src.to_string(),
            ..Default::default()
        },
        addr: None,
        transport: None,
        keyfile: None,
        allow_unauthenticated: false,
        encrypt: None,
        log: None,
    };
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
        let m = &mut o.mount;
        match k {
            "addr" | "server" => o.addr = Some(v.to_string()),
            "transport" => o.transport = Some(v.to_string()),
            "keyfile" | "key_file" => o.keyfile = Some(PathBuf::from(v)),
            "allow_unauthenticated" => o.allow_unauthenticated = true,
            "encrypt" => {
                o.encrypt = Some(match v {
                    "" | "true" | "on" | "yes" | "1" => true,
                    "false" | "off" | "no" | "0" => false,
                    _ => bail!("encrypt={v}: expected true or false"),
                })
            }
            "proc" => m.proc_fs = true,
            "sys" => m.sys_fs = true,
            "local_proc" => m.local_proc = PathBuf::from(v),
            "ro" => m.read_only = true,
            "rw" => m.read_only = false,
            "coherent_ttl" => m.coherent_ttl = secs(v, k)?,
            "attr_timeout" => m.attr_timeout = secs(v, k)?,
            "entry_timeout" => m.entry_timeout = secs(v, k)?,
            "negative_timeout" => m.negative_timeout = secs(v, k)?,
            "timeout" => m.timeout = secs(v, k)?,
            "hard" => m.hard = true,
            "soft" => m.hard = false,
            "allow_other" => m.allow_other = true,
            "writeback_cache" => m.writeback_cache = true,
            "sync" => {
                m.write_behind = false;
                m.async_dirops = false;
            }
            "async" => {
                m.write_behind = true;
                m.async_dirops = true;
            }
            "wsync" => m.async_dirops = false,
            "nowsync" => {
                m.async_dirops = match v {
                    "" | "1" | "true" | "on" | "yes" => true,
                    "0" | "false" | "off" | "no" => false,
                    _ => bail!("nowsync={v}: expected 1 or 0"),
                }
            }
            "readahead" => {
                m.readahead_kb = v
                    .parse()
                    .with_context(|| format!("readahead={v}: not a number of KiB"))?
            }
            "threads" => {
                m.threads = v
                    .parse()
                    .with_context(|| format!("threads={v}: not a number"))?
            }
            "log" => o.log = Some(PathBuf::from(v)),
            // Generic mount(8) options that mean nothing here (or are the defaults).
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "_netdev" | "nofail"
            | "relatime" | "norelatime" | "strictatime" | "noatime" | "atime" | "nodiratime"
            | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev" | "loud" | "silent"
            | "comment" => {}
            k if k.starts_with("x-") => {}
            other => bail!("unknown option {other:?} (see mount.qtfs --help)"),
        }
    }
    Ok(o)
}

/// The HOST address from the environment or `/etc/offload/dpu.toml`.
fn default_addr() -> anyhow::Result<String> {
    match tools::configured_host_addr()? {
        Some(a) => Ok(a),
        None => bail!("no HOST address: pass -o addr=URL, set QTFS_SERVER_ADDR, or put `[qtfs] addr = \"URL\"` in /etc/offload/dpu.toml"),
    }
}

/// Connects, checks the source and mounts; returns the live mount and the runtime serving it.
fn setup(args: &Args) -> anyhow::Result<(offload_fs::client::Mounted, tokio::runtime::Runtime)> {
    let o = parse_opts(&args.src, &args.options)?;
    let addr = match &o.addr {
        Some(a) => a.clone(),
        None => default_addr()?,
    };
    let ep = tools::endpoint(o.transport.as_deref(), &addr)?;
    let key = transport::resolve_key(o.keyfile.as_deref(), o.allow_unauthenticated)?;
    // FUSE threads send their requests (up to 64 KiB) themselves when nothing is queued
    // ahead: one hand-off less per request (docs/BENCHMARKS.md, fs). Links that allow no
    // writes from other threads (RDMA) ignore it.
    let cfg = transport::SessionConfig {
        direct_send: 64 << 10,
        encrypt: tools::encrypt_policy(tools::dpu_transport_config()?.as_ref(), o.encrypt),
        ..transport::SessionConfig::new(key)
    };
    if !args.dst.is_dir() {
        bail!("mount point {} is not a directory", args.dst.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        // One worker: the FUSE threads are the parallelism; a second worker only adds
        // wake-ups between the two (measured: ~30 % fewer context switches per request).
        .worker_threads(1)
        .enable_all()
        .thread_name("qtfs")
        .build()
        .context("starting the runtime")?;
    // The first connection (and its handshake: an X25519 exchange on encrypting links, the
    // RDMA connection manager's resolve-and-connect) gets at least 5 s even when `timeout=`
    // asks for less per request: a 1 s budget failed RDMA mounts in the emulated guest.
    let connect_timeout = o
        .mount
        .timeout
        .clamp(Duration::from_secs(5), Duration::from_secs(30));
    let client = Client::new(ep.clone(), cfg, Registry::new());
    let pseudo = o.mount.proc_fs || o.mount.sys_fs;
    let readahead = o.mount.readahead_kb;
    let canonical_dst = std::fs::canonicalize(&args.dst).unwrap_or_else(|_| args.dst.clone());
    let fs = rt.block_on(async {
        match tokio::time::timeout(connect_timeout, QtfsFs::connect(client, o.mount)).await {
            Ok(r) => r.map_err(|e| anyhow::anyhow!("{e}")),
            Err(_) => Err(anyhow::anyhow!(
                "HOST {ep} did not answer within {connect_timeout:?}"
            )),
        }
    })?;
    let mounted = {
        let _g = rt.enter();
        fs.mount(&args.dst)
            .with_context(|| format!("mounting on {}", args.dst.display()))?
    };
    if readahead > 0 && !pseudo {
        set_readahead(&canonical_dst, readahead);
    }
    Ok((mounted, rt))
}

/// FUSE caps readahead at the kernel's default (128 KiB) whatever INIT asks for; the mount's
/// backing device takes a larger window through sysfs (root only). Big sequential reads then
/// travel as several 1 MiB requests in flight instead of 128 KiB ones. The device number comes
/// from mountinfo: a stat of the mount point would wait for this not yet serving process.
/// `mountpoint` must be canonical already: resolving it now would stat the new mount.
///
/// Only this kernel's sysfs is written: run in the management plane's root, `/sys` is the
/// HOST's (a qtfs mount), where the DPU's device number means another device or nothing.
fn set_readahead(mountpoint: &std::path::Path, kib: u32) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(dev) = mount_dev(&info, mountpoint) else {
        tracing::debug!(mountpoint = %mountpoint.display(), "mount not in mountinfo; readahead unchanged");
        return;
    };
    let Some(path) = local_bdi_file(Path::new("/sys"), &dev) else {
        tracing::info!(
            %dev,
            "/sys/class/bdi/{dev} is not this kernel's sysfs entry of the mount; readahead unchanged"
        );
        return;
    };
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        tracing::debug!(path = %path.display(), error = %e, "cannot raise readahead; keeping the kernel default");
    }
}

/// The `MAJ:MIN` of the mount at `mountpoint` (the last one there) in a mountinfo text.
fn mount_dev(info: &str, mountpoint: &Path) -> Option<String> {
    // Fields: id parent MAJ:MIN root mountpoint ...; octal escapes for spaces and the like.
    let want = mountpoint
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
    })
}

/// `<sys>/class/bdi/<dev>/read_ahead_kb` when `<sys>` is the running kernel's sysfs (statfs
/// magic) and that entry is the backing device `dev` (FUSE names it `MAJ:MIN`).
fn local_bdi_file(sys: &Path, dev: &str) -> Option<PathBuf> {
    let (maj, min) = dev.split_once(':')?;
    if maj.parse::<u32>().is_err() || min.parse::<u32>().is_err() {
        return None;
    }
    let dir = sys.join("class/bdi").join(dev);
    let st = nix::sys::statfs::statfs(&dir).ok()?;
    if st.filesystem_type() != nix::sys::statfs::SYSFS_MAGIC {
        return None;
    }
    // A bdi has no `dev` attribute: it is known by its name, and its class link resolves to
    // this kernel's /sys/devices/virtual/bdi/<dev>.
    let target = std::fs::canonicalize(&dir).ok()?;
    if target.file_name()? != std::ffi::OsStr::new(dev) {
        return None;
    }
    let st = nix::sys::statfs::statfs(&target).ok()?;
    (st.filesystem_type() == nix::sys::statfs::SYSFS_MAGIC).then(|| dir.join("read_ahead_kb"))
}

fn report(fd: Option<&OwnedFd>, msg: &str) {
    if let Some(fd) = fd {
        // SAFETY: borrowing a valid fd for one write; the File is forgotten, not closed.
        let mut f =
            std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd.as_raw_fd()) });
        let _ = f.write_all(msg.as_bytes());
    }
}

fn serve(args: &Args) -> ExitCode {
    // Before any thread: bulk buffers reused, memory kept bounded (transport::tune_allocator).
    transport::tune_allocator();
    // SAFETY: the fd was handed to us by our parent for exactly this purpose.
    let ready = args.ready_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    match setup(args) {
        Ok((mounted, rt)) => {
            report(ready.as_ref(), "OK");
            drop(ready);
            tracing::info!(src = %args.src, dst = %args.dst.display(), "mounted");
            let res = mounted.run();
            rt.shutdown_timeout(Duration::from_secs(1));
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "FUSE session failed");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if ready.is_some() {
                report(ready.as_ref(), &format!("ERR {msg}"));
            } else {
                eprintln!("mount.qtfs: {msg}");
            }
            ExitCode::from(32)
        }
    }
}

/// Re-executes this program in the foreground as a detached child and waits until it reports
/// the mount live (exit 0) or failed (its message, exit 32).
fn background(args: &Args) -> anyhow::Result<ExitCode> {
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    let exe = std::env::current_exe().context("locating mount.qtfs")?;
    let o = parse_opts(&args.src, &args.options)?;
    let log = match &o.log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening log {}", p.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut cmd = Command::new(exe);
    cmd.arg(&args.src)
        .arg(&args.dst)
        .arg("-f")
        .arg("--ready-fd")
        .arg(wr.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    if args.verbose {
        cmd.arg("-v");
    }
    let wfd = wr.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let flags = libc::fcntl(wfd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(wfd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    drop(wr);
    let mut msg = String::new();
    let mut f = std::fs::File::from(rd);
    let _ = f.read_to_string(&mut msg);
    if msg == "OK" {
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    match msg.strip_prefix("ERR ") {
        Some(m) => eprintln!("mount.qtfs: {m}"),
        None => eprintln!("mount.qtfs: the mount process exited before the mount was live"),
    }
    Ok(ExitCode::from(32))
}

fn main() -> ExitCode {
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    tools::init_tracing(if args.verbose { "debug" } else { "warn" });
    let _ = (args.no_mtab, args.sloppy, &args.fstype);
    if args.foreground || args.ready_fd.is_some() {
        return serve(&args);
    }
    // Reject bad options before forking so the message reaches the user directly.
    if let Err(e) = parse_opts(&args.src, &args.options) {
        eprintln!("mount.qtfs: {e:#}");
        return ExitCode::from(32);
    }
    match background(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mount.qtfs: {e:#}");
            ExitCode::from(32)
        }
    }
}
