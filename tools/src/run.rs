//! `offload run -- CMD…`: runs an unmodified management plane (dockerd, containerd) so that
//! the mounts it makes on qtfs paths take effect on the HOST.
//!
//! # How
//! The supervisor forks; the child installs a seccomp filter that turns `mount` and `umount2`
//! into user notifications (`SECCOMP_RET_USER_NOTIF`; every other syscall runs as usual) and
//! the new mount API (`fsopen`, `fsconfig`, `fsmount`, `fspick`, `move_mount`, `open_tree`,
//! `mount_setattr`) into `ENOSYS`, so callers fall back to mount(2) as on kernels before 5.2
//! (dockerd 20.10 and containerd 1.6 use mount(2) only). The filter is inherited by every
//! descendant. The child hands the listener descriptor to the supervisor over a socketpair
//! (`SCM_RIGHTS`) and execs CMD; `no_new_privs` is not set (root keeps its capabilities and
//! setuid programs below CMD behave as usual).
//!
//! For each trapped call the supervisor (not filtered itself) reads the arguments from
//! `/proc/<tid>/mem` (bounded: `PATH_MAX` per path, one page of options), resolves the paths
//! as the caller sees them (`openat2(/proc/<tid>/root, …, RESOLVE_IN_ROOT)`, relative paths
//! from its working directory: the daemons run chrooted in `/another_rootfs`), finds the mount
//! each lies on (`statx(STATX_MNT_ID)` + mountinfo), then checks that the notification is
//! still valid (`SECCOMP_IOCTL_NOTIF_ID_VALID`: the caller did not die and its tid was not
//! reused while it was read) before acting:
//!
//! | call | answer |
//! |---|---|
//! | caller in another mount namespace (docker-untar's private chroot) | runs natively |
//! | propagation change (`MS_SHARED`/`MS_PRIVATE`/`MS_SLAVE`/`MS_UNBINDABLE`), `MS_MOVE` | natively |
//! | target not on a qtfs mount, or the qtfs mount point itself | natively |
//! | new mount / bind / remount / umount2 below a qtfs mount point | carried out by the HOST (the `mount` service), its errno returned |
//! | overlay or bind on qtfs whose lower/upper/work/source is not on qtfs | EPERM (logged) |
//!
//! A qtfs path maps to the HOST path `source + root + path below the mount point` from its
//! mountinfo line (with the seed layout the paths are identical). The HOST checks its
//! allow-list and refuses with EPERM (logged on the HOST). A lost link fails the mount with
//! ENOLINK, an answer that does not come within `--mount-timeout` with ETIMEDOUT: a mount never
//! hangs. If a timed-out mount succeeds on the HOST later, the supervisor unmounts it there.
//!
//! # Exit
//! The supervisor forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to CMD and
//! exits with CMD's status (128+N for a signal) when CMD exits. Mounts made on the HOST stay
//! there, as a native mount outlives the process that made it (dockerd and containerd unmount
//! their own on a clean stop; the HOST's containers may still use them); the ones still in
//! place are logged, and `--umount-on-exit` detaches them. Descendants that outlive CMD get
//! ENOSYS from mount(2) once the supervisor is gone: a mount never silently lands on the DPU.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use libseccomp::{
    notify_id_valid, ScmpAction, ScmpFilterContext, ScmpNotifReq, ScmpNotifResp,
    ScmpNotifRespFlags, ScmpSyscall,
};
use offload_fs::mount::proto::{self, Kind, Reply, Request};
use offload_fs::mount::spec::{self, MountOp, QtfsPath};
use tracing::{debug, info, warn};
use transport::{CallError, Client, Registry};

use crate::KeyArgs;

/// Options of `offload run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// HOST offloadd address (the one serving the fs and mount services); default $QTFS_SERVER_ADDR,
    /// then `[qtfs] addr` in /etc/offload/dpu.toml.
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// Link type for a bare --addr (tcp, unix, vsock, vsock-uds, rdma).
    #[arg(long, value_name = "T")]
    pub transport: Option<String>,
    /// Key file and link policy (the same flags as every tool).
    #[command(flatten)]
    pub link: KeyArgs,
    /// Seconds to wait for the HOST's answer before failing a mount with ETIMEDOUT.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub mount_timeout: f64,
    /// The DPU's own procfs (where the supervised processes' /proc/PID are). Run the
    /// supervisor outside the chroot, or point this at the chroot's local procfs.
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    pub proc: PathBuf,
    /// When CMD exits, detach the mounts it left on the HOST (default: leave them, as a
    /// native mount outlives its maker).
    #[arg(long)]
    pub umount_on_exit: bool,
    /// The command to supervise, e.g. `chroot /another_rootfs dockerd …`.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// The new mount API: answered ENOSYS so that callers use mount(2), which is forwarded.
const NEW_MOUNT_API: &[&str] = &[
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
];

/// Runs CMD under the supervisor; returns the exit code to exit with. Call it before any
/// thread is started (it forks).
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let session_cfg = args.link.session_config()?;
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => default_addr()?,
    };
    let ep = crate::endpoint(args.transport.as_deref(), &addr)?;
    anyhow::ensure!(
        args.mount_timeout.is_finite() && args.mount_timeout > 0.0,
        "--mount-timeout must be a positive number of seconds"
    );
    let proc_root = args.proc.clone();
    check_proc(&proc_root)?;
    let mntns = std::fs::metadata(proc_root.join("self/ns/mnt"))
        .context("reading this process's mount namespace")?
        .ino();
    let argv: Vec<CString> = args
        .cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()).context("NUL byte in CMD"))
        .collect::<anyhow::Result<_>>()?;
    let syscalls = Syscalls::new()?;

    let (parent_sock, child_sock) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair")?;
    // SAFETY: no other thread exists yet (run() is called first thing), so the child may do
    // anything before exec.
    let child = match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Child => {
            drop(parent_sock);
            child_main(child_sock, &argv)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(child_sock);
    let notify_fd = match recv_fd(&parent_sock) {
        Ok(fd) => fd,
        Err(e) => {
            // The child failed before exec and said why on stderr.
            let code = wait_child(child);
            debug!(error = %e, "no seccomp listener from the child");
            return Ok(code);
        }
    };
    drop(parent_sock);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("offload-run")
        .build()
        .context("starting the runtime")?;
    let sup = Arc::new(Supervisor {
        fd: notify_fd,
        proc_root,
        mntns,
        syscalls,
        client: Client::new(ep.clone(), session_cfg, Registry::new()),
        timeout: Duration::from_secs_f64(args.mount_timeout),
        table: Mutex::new(HashMap::new()),
        rt: rt.handle().clone(),
    });
    info!(%ep, pid = child.as_raw(), "supervising {:?}", args.cmd);

    // Notifications: one blocking receiver thread; each call is handled on the runtime.
    {
        let sup = sup.clone();
        std::thread::Builder::new()
            .name("seccomp-notify".into())
            .spawn(move || sup.receive_loop())
            .context("starting the notification thread")?;
    }
    rt.spawn(forward_signals(child));
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wait-child".into())
        .spawn(move || {
            let _ = tx.send(wait_child(child));
        })
        .context("starting the wait thread")?;
    let code = rt.block_on(async { rx.await.unwrap_or(1) });
    let left: Vec<(String, String)> = sup
        .table()
        .iter()
        .flat_map(|(host, v)| v.iter().map(move |dpu| (host.clone(), dpu.clone())))
        .collect();
    if !left.is_empty() {
        if args.umount_on_exit {
            rt.block_on(async {
                for (host, dpu) in &left {
                    let req = Request::Umount {
                        version: proto::VERSION,
                        target: host.clone(),
                        detach: true,
                    };
                    match sup.forward(&req).await {
                        Ok(()) => info!(host = %host, dpu = %dpu, "detached on exit"),
                        Err(e) => {
                            warn!(host = %host, dpu = %dpu, errno = e, "could not detach on exit")
                        }
                    }
                }
            });
        } else {
            for (host, dpu) in &left {
                info!(host = %host, dpu = %dpu, "forwarded mount left in place on the HOST");
            }
        }
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(code)
}

/// The child: install the filter, hand its listener to the parent, exec CMD. Never returns.
fn child_main(sock: OwnedFd, argv: &[CString]) -> ! {
    let fail = |msg: String| -> ! {
        eprintln!("offload run: {msg}");
        // SAFETY: immediate exit of the forked child.
        unsafe { libc::_exit(127) }
    };
    let fd = match install_filter() {
        Ok(fd) => fd,
        Err(e) => fail(format!("installing the seccomp filter: {e:#}")),
    };
    let fds = [fd];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    if let Err(e) = nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"L")],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    ) {
        fail(format!(
            "handing the seccomp listener to the supervisor: {e}"
        ));
    }
    // SAFETY: our copy of the listener; the supervisor holds its own.
    unsafe { libc::close(fd) };
    drop(sock);
    let Some(prog) = argv.first() else {
        fail("no command".into())
    };
    let e = nix::unistd::execvp(prog, argv).err();
    fail(format!(
        "cannot run {}: {}",
        prog.to_string_lossy(),
        e.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn install_filter() -> anyhow::Result<RawFd> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    // Root keeps CAP_SYS_ADMIN, so no_new_privs is not needed to load the filter.
    ctx.set_ctl_nnp(false)?;
    for name in ["mount", "umount2"] {
        ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from_name(name)?)
            .with_context(|| format!("trapping {name}"))?;
    }
    for name in NEW_MOUNT_API {
        if let Ok(sc) = ScmpSyscall::from_name(name) {
            // Unknown to this libseccomp or architecture: nothing to refuse.
            let _ = ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), sc);
        }
    }
    ctx.load()?;
    Ok(ctx.get_notify_fd()?)
}

fn recv_fd(sock: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: received with SCM_RIGHTS: a fresh descriptor we own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("the child sent no descriptor")
}

/// Waits for the child; its exit code, or 128+N if signal N killed it.
fn wait_child(child: nix::unistd::Pid) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 1,
        }
    }
}

async fn forward_signals(child: nix::unistd::Pid) {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    let mut tasks = Vec::new();
    for k in kinds {
        let Ok(mut s) = signal(k) else { continue };
        tasks.push(tokio::spawn(async move {
            while s.recv().await.is_some() {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(child.as_raw(), k.as_raw_value()) };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The HOST address from the environment or `/etc/offload/dpu.toml` ([`crate::configured_host_addr`]).
fn default_addr() -> anyhow::Result<String> {
    match crate::configured_host_addr()? {
        Some(a) => Ok(a),
        None => bail!("no HOST address: pass --addr URL, set QTFS_SERVER_ADDR, or put `[qtfs] addr = \"URL\"` in /etc/offload/dpu.toml"),
    }
}

/// Refuses a /proc that is not this machine's own (e.g. the HOST's procfs through qtfs when
/// run inside the management plane's chroot).
fn check_proc(proc_root: &Path) -> anyhow::Result<()> {
    let me = std::process::id().to_string();
    let link = std::fs::read_link(proc_root.join("self"))
        .with_context(|| format!("{}/self", proc_root.display()))?;
    let ok = link.as_os_str() == me.as_str() || link.ends_with(&me);
    anyhow::ensure!(
        ok && proc_root.join(&me).join("mem").exists(),
        "{} is not this machine's procfs (self -> {}); pass --proc with the DPU's own procfs",
        proc_root.display(),
        link.display()
    );
    Ok(())
}

/// Syscall numbers of the trapped calls.
struct Syscalls {
    mount: ScmpSyscall,
    umount2: ScmpSyscall,
}

impl Syscalls {
    fn new() -> anyhow::Result<Syscalls> {
        Ok(Syscalls {
            mount: ScmpSyscall::from_name("mount")?,
            umount2: ScmpSyscall::from_name("umount2")?,
        })
    }
}

/// What to answer a trapped call.
#[derive(Debug)]
enum Decision {
    /// Let the kernel run it here.
    Continue,
    /// Fail it with this errno.
    Fail(i32),
    /// Ask the HOST; `dpu` is the caller's target, for the table and the log; `refresh`: other
    /// directories (caller's paths) the mount changes on the HOST, such as an overlay's upper
    /// and work directories.
    Forward {
        req: Box<Request>,
        dpu: String,
        refresh: Vec<String>,
    },
}

struct Supervisor {
    fd: OwnedFd,
    proc_root: PathBuf,
    mntns: u64,
    syscalls: Syscalls,
    client: Client,
    timeout: Duration,
    /// Forwarded mounts in place on the HOST: HOST target → DPU targets (stacked, last on top).
    table: Mutex<HashMap<String, Vec<String>>>,
    rt: tokio::runtime::Handle,
}

impl Supervisor {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        transport::sync::lock(&self.table)
    }

    fn receive_loop(self: Arc<Self>) {
        let fd = self.fd.as_raw_fd();
        loop {
            match ScmpNotifReq::receive(fd) {
                Ok(req) => {
                    let me = self.clone();
                    self.rt.spawn(async move { me.handle(req).await });
                }
                Err(e) => {
                    // ENOENT: the caller died before we read its notification.
                    debug!(error = %e, "seccomp receive");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn respond(&self, id: u64, res: Result<(), i32>) {
        let r = match res {
            Ok(()) => ScmpNotifResp::new_val(id, 0, ScmpNotifRespFlags::empty()),
            Err(e) => ScmpNotifResp::new_error(id, -e.abs(), ScmpNotifRespFlags::empty()),
        };
        if let Err(e) = r.respond(self.fd.as_raw_fd()) {
            debug!(error = %e, "seccomp respond (caller gone?)");
        }
    }

    async fn handle(self: Arc<Self>, req: ScmpNotifReq) {
        let me = self.clone();
        let decision = tokio::task::spawn_blocking(move || me.decide(&req))
            .await
            .unwrap_or(Decision::Fail(libc::EIO));
        debug!(pid = req.pid, syscall = ?req.data.syscall, ?decision, "trapped");
        // TOCTOU: the tid we read from must still be the caller.
        if notify_id_valid(self.fd.as_raw_fd(), req.id).is_err() {
            debug!(pid = req.pid, "notification no longer valid");
            return;
        }
        match decision {
            Decision::Continue => {
                let r = ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty());
                if let Err(e) = r.respond(self.fd.as_raw_fd()) {
                    debug!(error = %e, "seccomp continue (caller gone?)");
                }
            }
            Decision::Fail(e) => self.respond(req.id, Err(e)),
            Decision::Forward {
                req: r,
                dpu,
                refresh,
            } => {
                let r = *r;
                let res = self.forward_tracked(r.clone()).await;
                match (&res, &r) {
                    (Ok(()), Request::Mount { target, kind, .. })
                        if !matches!(kind, Kind::Remount { .. }) =>
                    {
                        self.table()
                            .entry(target.clone())
                            .or_default()
                            .push(dpu.clone());
                        let dirs = std::iter::once(&dpu).chain(&refresh);
                        refresh_qtfs_dirs(&self.proc_root, req.pid, dirs);
                    }
                    (Ok(()), Request::Umount { target, .. }) => {
                        {
                            let mut t = self.table();
                            if let Some(v) = t.get_mut(target) {
                                v.pop();
                                if v.is_empty() {
                                    t.remove(target);
                                }
                            }
                        }
                        refresh_qtfs_dirs(&self.proc_root, req.pid, [&dpu]);
                    }
                    _ => {}
                }
                match &res {
                    Ok(()) => info!(pid = req.pid, dpu = %dpu, "forwarded {r:?}"),
                    Err(e) => info!(pid = req.pid, dpu = %dpu, errno = e, "HOST failed {r:?}"),
                }
                self.respond(req.id, res);
            }
        }
    }

    /// Asks the HOST, bounded by the timeout. A mount whose answer comes after the caller was
    /// failed with ETIMEDOUT is undone on the HOST.
    async fn forward_tracked(self: &Arc<Self>, r: Request) -> Result<(), i32> {
        let me = self.clone();
        let req = r.clone();
        let mut task = tokio::spawn(async move { me.call(&req).await });
        match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(res) => res.unwrap_or(Err(libc::EIO)),
            Err(_) => {
                warn!(timeout = ?self.timeout, "no answer from the HOST in time: {r:?}");
                if let Request::Mount { target, kind, .. } = r {
                    if !matches!(kind, Kind::Remount { .. }) {
                        let me = self.clone();
                        tokio::spawn(async move {
                            if let Ok(Ok(())) = task.await {
                                let undo = Request::Umount {
                                    version: proto::VERSION,
                                    target: target.clone(),
                                    detach: true,
                                };
                                let res = me.call(&undo).await;
                                warn!(host = %target, ?res, "undid a mount that succeeded after its caller timed out");
                            }
                        });
                    }
                }
                Err(libc::ETIMEDOUT)
            }
        }
    }

    /// One bounded call (exit-time clean-up).
    async fn forward(&self, r: &Request) -> Result<(), i32> {
        match tokio::time::timeout(self.timeout, self.call(r)).await {
            Ok(res) => res,
            Err(_) => Err(libc::ETIMEDOUT),
        }
    }

    async fn call(&self, r: &Request) -> Result<(), i32> {
        let body = postcard::to_allocvec(r).map_err(|_| libc::EINVAL)?;
        let session = self.client.session().await.map_err(|e| {
            warn!(error = %e, "HOST unreachable");
            libc::ENOLINK
        })?;
        match session.call(proto::SERVICE, Bytes::from(body)).await {
            Ok(reply) => match postcard::from_bytes::<Reply>(&reply) {
                Ok(Reply::Done) => Ok(()),
                Err(_) => Err(libc::EPROTO),
            },
            Err(CallError::Remote(e)) => {
                debug!(code = e.code, message = %e.message, "HOST refused or failed");
                Err(if e.code > 0 && e.code < 4096 {
                    e.code
                } else {
                    libc::EIO
                })
            }
            Err(CallError::UnknownService(_)) => {
                warn!("the HOST offers no mount service (no [mount] in its host.toml)");
                Err(libc::EPERM)
            }
            Err(CallError::Timeout(_)) => Err(libc::ETIMEDOUT),
            Err(e) => {
                warn!(error = %e, "link lost during a mount call");
                Err(libc::ENOLINK)
            }
        }
    }

    fn decide(&self, req: &ScmpNotifReq) -> Decision {
        let pid = req.pid;
        // Another mount namespace (e.g. docker-untar's private chroot): its own business.
        match std::fs::metadata(self.proc_root.join(format!("{pid}/ns/mnt"))) {
            Ok(m) if m.ino() == self.mntns => {}
            Ok(_) => return Decision::Continue,
            Err(_) => return Decision::Fail(libc::ESRCH),
        }
        let caller = match Caller::open(&self.proc_root, pid) {
            Ok(c) => c,
            Err(e) => return Decision::Fail(e),
        };
        let res = if req.data.syscall == self.syscalls.mount {
            self.decide_mount(&caller, &req.data.args)
        } else if req.data.syscall == self.syscalls.umount2 {
            self.decide_umount(&caller, &req.data.args)
        } else {
            Ok(Decision::Continue)
        };
        res.unwrap_or_else(Decision::Fail)
    }

    fn decide_mount(&self, c: &Caller, args: &[u64; 6]) -> Result<Decision, i32> {
        let (op, flags) = spec::classify(args[3]);
        if matches!(op, MountOp::Propagation | MountOp::Move) {
            return Ok(Decision::Continue);
        }
        let target = c.read_str(args[1], libc::PATH_MAX as usize)?;
        // Unresolvable or not on qtfs: the kernel runs it (and says why it fails).
        // What the DPU just made there must be on the HOST before the HOST mounts (not for a
        // remount: opening the mount's own root would hold it busy for a moment).
        let settle = !matches!(op, MountOp::Remount { .. });
        let mut seen = Seen::default();
        let Ok(Some(t)) = self.locate(c, &target, true, settle, &mut seen) else {
            return Ok(Decision::Continue);
        };
        if t.mount_root {
            return Ok(Decision::Continue);
        }
        let mut refresh = Vec::new();
        let kind = match op {
            MountOp::Remount { bind } => Kind::Remount { bind },
            MountOp::Bind { recursive } => {
                let source = c.read_str(args[0], libc::PATH_MAX as usize)?;
                let Some(s) = self.locate(c, &source, true, true, &mut seen)? else {
                    warn!(source = %String::from_utf8_lossy(&source), target = %t.host,
                        "bind of a DPU-local path onto a qtfs path cannot be made on the HOST: EPERM");
                    return Err(libc::EPERM);
                };
                Kind::Bind {
                    source: s.host,
                    recursive,
                }
            }
            _ => {
                if args[2] == 0 {
                    return Err(libc::EINVAL);
                }
                let fstype = utf8(c.read_str(args[2], 256)?)?;
                let data = if args[4] == 0 {
                    String::new()
                } else {
                    utf8(c.read_str(args[4], 4096).map_err(|e| {
                        if e == libc::ENAMETOOLONG {
                            libc::EINVAL
                        } else {
                            e
                        }
                    })?)?
                };
                let source = if args[0] == 0 {
                    fstype.clone()
                } else {
                    utf8(c.read_str(args[0], libc::PATH_MAX as usize)?)?
                };
                let opts = spec::split_options(&data)?;
                if fstype == "overlay" {
                    let d = spec::overlay_dirs(opts)?;
                    refresh.extend(d.upper.iter().chain(d.work.iter()).cloned());
                    let mut host = |p: &str| -> Result<String, i32> {
                        match self.locate(c, p.as_bytes(), true, true, &mut seen) {
                            Ok(Some(q)) => Ok(q.host),
                            Err(e) => {
                                warn!(dir = %p, target = %t.host, errno = e,
                                    "overlay directory does not resolve in the caller's view");
                                Err(e)
                            }
                            Ok(None) => {
                                warn!(dir = %p, target = %t.host,
                                    "overlay on a qtfs path with a directory not on qtfs cannot be made on the HOST: EPERM");
                                Err(libc::EPERM)
                            }
                        }
                    };
                    let lower = d
                        .lower
                        .iter()
                        .map(|p| host(p))
                        .collect::<Result<Vec<_>, _>>()?;
                    let upper = d.upper.as_deref().map(&mut host).transpose()?;
                    let work = d.work.as_deref().map(&mut host).transpose()?;
                    Kind::Overlay {
                        source,
                        lower,
                        upper,
                        work,
                        options: d.rest,
                    }
                } else {
                    Kind::Other {
                        fstype,
                        source,
                        options: opts,
                    }
                }
            }
        };
        Ok(Decision::Forward {
            req: Box::new(Request::Mount {
                version: proto::VERSION,
                target: t.host,
                kind,
                flags,
            }),
            dpu: String::from_utf8_lossy(&target).into_owned(),
            refresh,
        })
    }

    fn decide_umount(&self, c: &Caller, args: &[u64; 6]) -> Result<Decision, i32> {
        let flags = args[1] as i32;
        let target = c.read_str(args[0], libc::PATH_MAX as usize)?;
        let follow = flags & libc::UMOUNT_NOFOLLOW == 0;
        let Ok(Some(t)) = self.locate(c, &target, follow, false, &mut Seen::default()) else {
            return Ok(Decision::Continue);
        };
        if t.mount_root || flags & libc::MNT_EXPIRE != 0 {
            return Ok(Decision::Continue);
        }
        Ok(Decision::Forward {
            req: Box::new(Request::Umount {
                version: proto::VERSION,
                target: t.host,
                detach: flags & libc::MNT_DETACH != 0,
            }),
            dpu: String::from_utf8_lossy(&target).into_owned(),
            refresh: Vec::new(),
        })
    }

    /// Where `path` (as the caller names it) lies: on a qtfs mount (Some), elsewhere (None),
    /// or the errno resolving it gave the caller's view. `settle`: on qtfs, first make what the
    /// DPU created there reach the HOST ([`settle_on_host`]). `seen` carries what the other
    /// paths of the same call already read.
    fn locate(
        &self,
        c: &Caller,
        path: &[u8],
        follow: bool,
        settle: bool,
        seen: &mut Seen,
    ) -> Result<Option<QtfsPath>, i32> {
        let fd = c.resolve(path, follow)?;
        let link = self.proc_root.join(format!("self/fd/{}", fd.as_raw_fd()));
        let canonical =
            std::fs::read_link(link).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let Some(canonical) = canonical.to_str() else {
            return Ok(None);
        };
        let mnt = mnt_id(fd.as_raw_fd())?;
        let mounts = match &mut seen.mounts {
            Some(m) => m,
            slot => {
                let info = std::fs::read_to_string(self.proc_root.join("self/mountinfo"))
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                slot.insert(spec::parse_mountinfo(&info))
            }
        };
        let found = mounts
            .iter()
            .find(|m| m.id == mnt)
            .and_then(|m| spec::qtfs_host_path(m, canonical));
        if settle && found.is_some() {
            settle_on_host(Path::new(canonical), &mut seen.settled);
        }
        Ok(found)
    }
}

/// What one trapped mount call has read so far ([`Supervisor::locate`]): the mount table is
/// read once per call, not once per path (an overlay names every layer), and each directory
/// is settled once.
#[derive(Default)]
struct Seen {
    mounts: Option<Vec<spec::MountInfo>>,
    settled: HashSet<PathBuf>,
}

/// Makes what the DPU just created at and under `path` (a path on a qtfs mount, in this
/// process's view) reach the HOST before a mount call names it. qtfs answers mkdir, create and
/// symlink at once and sends them in the background (asynchronous directory operations), while
/// the mount goes to the HOST over another session: dockerd's overlay check made `upper` and
/// mounted it at once, and the HOST could answer "upperdir: No such file or directory".
/// Opening a qtfs directory (FUSE OPENDIR, a listing) waits until the operations queued in it
/// are answered, with no disk sync on the HOST: so the parent (the node's own creation) and,
/// for a directory, the node itself (what was made inside). Failures are left to the mount
/// itself to report.
/// `settled`: the directories this call opened already (an overlay's lower layers share
/// their parent: once is enough).
fn settle_on_host(path: &Path, settled: &mut HashSet<PathBuf>) {
    for d in path.parent().into_iter().chain([path]) {
        if !settled.insert(d.to_path_buf()) {
            continue;
        }
        // Not a directory (a bind source that is a file), or gone: nothing to settle. The
        // descriptor is closed again at once.
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(d);
    }
}

/// Tells the qtfs mounts holding `paths` (as process `pid` sees them) that a mount now covers
/// or changed those directories, before the caller gets its answer: a directory the caller
/// just made would otherwise still be taken as holding only what the caller made there
/// ([`offload_fs::client::REFRESH_XATTR`]). A path not on qtfs: nothing to do.
fn refresh_qtfs_dirs<'a>(proc_root: &Path, pid: u32, paths: impl IntoIterator<Item = &'a String>) {
    let Ok(c) = Caller::open(proc_root, pid) else {
        return;
    };
    let Ok(name) = CString::new(offload_fs::client::REFRESH_XATTR) else {
        return;
    };
    for path in paths {
        let Ok(fd) = c.resolve(path.as_bytes(), true) else {
            continue;
        };
        let link = proc_root.join(format!("self/fd/{}", fd.as_raw_fd()));
        let Ok(link) = CString::new(link.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: NUL-terminated path and name, a one-byte value; plain syscall whose failure
        // (ENOTSUP on other filesystems) only means there is nothing to refresh.
        let r = unsafe { libc::setxattr(link.as_ptr(), name.as_ptr(), c"1".as_ptr().cast(), 1, 0) };
        if r != 0 {
            debug!(path, error = %std::io::Error::last_os_error(), "no qtfs refresh");
        }
    }
}

fn utf8(b: Vec<u8>) -> Result<String, i32> {
    String::from_utf8(b).map_err(|_| libc::EINVAL)
}

fn mnt_id(fd: RawFd) -> Result<u64, i32> {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; result checked.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc < 0 || stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(libc::ENOSYS);
    }
    Ok(stx.stx_mnt_id)
}

/// A trapped caller: its memory, root and working directory, opened once per notification.
struct Caller {
    mem: std::fs::File,
    root: OwnedFd,
    /// Working directory relative to the caller's root, when it lies inside it.
    cwd_in_root: Option<PathBuf>,
    cwd: OwnedFd,
}

impl Caller {
    fn open(proc_root: &Path, pid: u32) -> Result<Caller, i32> {
        let base = proc_root.join(pid.to_string());
        let err = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::ESRCH);
        let mem = std::fs::File::open(base.join("mem")).map_err(err)?;
        let root = open_path(&base.join("root"))?;
        let cwd = open_path(&base.join("cwd"))?;
        let root_link = std::fs::read_link(base.join("root")).map_err(err)?;
        let cwd_link = std::fs::read_link(base.join("cwd")).map_err(err)?;
        let cwd_in_root = cwd_link
            .strip_prefix(&root_link)
            .ok()
            .map(|r| Path::new("/").join(r));
        Ok(Caller {
            mem,
            root,
            cwd_in_root,
            cwd,
        })
    }

    /// Reads a NUL-terminated string of at most `max` bytes (NUL excluded) from the caller.
    fn read_str(&self, addr: u64, max: usize) -> Result<Vec<u8>, i32> {
        if addr == 0 {
            return Err(libc::EFAULT);
        }
        let mut out = Vec::new();
        let mut a = addr;
        while out.len() <= max {
            let chunk = (4096 - (a % 4096) as usize).min(max + 1 - out.len());
            let mut buf = vec![0u8; chunk];
            let n = self.mem.read_at(&mut buf, a).map_err(|_| libc::EFAULT)?;
            if n == 0 {
                return Err(libc::EFAULT);
            }
            if let Some(z) = buf[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&buf[..z]);
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
            a += n as u64;
        }
        Err(libc::ENAMETOOLONG)
    }

    /// Opens `path` as the caller would resolve it (`O_PATH`).
    fn resolve(&self, path: &[u8], follow: bool) -> Result<OwnedFd, i32> {
        if path.is_empty() {
            return Err(libc::ENOENT);
        }
        let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
        let (dir, full): (RawFd, Vec<u8>) = if path.starts_with(b"/") {
            (self.root.as_raw_fd(), path.to_vec())
        } else if let Some(cwd) = &self.cwd_in_root {
            let mut p = cwd.as_os_str().as_bytes().to_vec();
            p.push(b'/');
            p.extend_from_slice(path);
            (self.root.as_raw_fd(), p)
        } else {
            // Working directory outside the root (chroot without chdir): relative to it.
            let p = CString::new(path).map_err(|_| libc::EINVAL)?;
            // SAFETY: valid C string; result checked.
            let rc = unsafe {
                libc::openat(
                    self.cwd.as_raw_fd(),
                    p.as_ptr(),
                    libc::O_PATH | libc::O_CLOEXEC | nofollow,
                )
            };
            if rc < 0 {
                return Err(last());
            }
            // SAFETY: fresh descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(rc) });
        };
        let full = CString::new(full).map_err(|_| libc::EINVAL)?;
        // SAFETY: zeroed open_how is valid; fields set below.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_CLOEXEC | nofollow) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT;
        // openat2 answers EAGAIN when a rename or a mount anywhere raced with a `..` it
        // resolved under RESOLVE_IN_ROOT (dockerd's `l/` links are `../<id>/diff`): try again.
        let mut tries = 0;
        loop {
            // SAFETY: valid pointers and size; result checked.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir,
                    full.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if rc >= 0 {
                // SAFETY: fresh descriptor.
                return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
            }
            let e = last();
            tries += 1;
            if !(e == libc::EAGAIN || e == libc::EINTR) || tries >= 1000 {
                return Err(e);
            }
        }
    }
}

fn open_path(p: &Path) -> Result<OwnedFd, i32> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: valid C string; result checked.
    let rc = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(last());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

fn last() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
