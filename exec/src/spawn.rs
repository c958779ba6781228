//! Resolving and starting the program of an [`ExecRequest`] (synchronous; run it off the
//! async workers).

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::proto::{ExecRequest, StdioKind};
use crate::sys;

/// PATH used when the request's environment has none (what glibc's execvp assumes).
const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a program was not started, with the code a shell would exit with.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A bare name not found on PATH (127).
    #[error("{0}: command not found")]
    NotFound(String),
    /// A path that does not exist (127).
    #[error("{0}: No such file or directory")]
    NoSuchFile(String),
    /// Resolved outside the server's allow-list (126).
    #[error("{0}: not allowed by the exec allow-list of the server")]
    NotAllowed(String),
    /// Not an executable file (126).
    #[error("{0}: Permission denied")]
    NotExecutable(String),
    /// The requested working directory is unusable.
    #[error("cannot change directory to {0}: {1}")]
    BadCwd(String, std::io::Error),
    /// The requested user or group does not exist on the server.
    #[error("unknown user {0}")]
    BadUser(String),
    /// No argv at all.
    #[error("empty command line")]
    EmptyArgv,
    /// Another OS error while starting (fork, exec, pipes).
    #[error("{0}: {1}")]
    Os(String, std::io::Error),
}

impl SpawnError {
    /// Shell-style exit code: 127 for "not found", 126 for everything else that prevented the start.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) | SpawnError::NoSuchFile(_) => 127,
            SpawnError::Os(_, e) if e.kind() == std::io::ErrorKind::NotFound => 127,
            _ => 126,
        }
    }
}

/// Which executables may run.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Any executable (explicitly configured).
    Any,
    /// Only these exact paths (symlinks resolved).
    Only(HashSet<PathBuf>),
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Resolves `argv[0]` like execvp: a name with '/' is taken relative to `cwd`; otherwise the
/// first executable regular file in PATH wins. Returns that path as found (not canonical: a
/// script run through a symlink sees the symlink's path, as with a local execvp).
pub fn resolve(argv0: &[u8], path_env: Option<&[u8]>, cwd: &Path) -> Result<PathBuf, SpawnError> {
    if argv0.is_empty() {
        return Err(SpawnError::NotFound(String::new()));
    }
    let candidate = if argv0.contains(&b'/') {
        let p = Path::new(OsStr::from_bytes(argv0));
        let full = cwd.join(p);
        match std::fs::metadata(&full) {
            Err(_) => return Err(SpawnError::NoSuchFile(show(argv0))),
            Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                return Err(SpawnError::NotExecutable(show(argv0)))
            }
            Ok(_) => full,
        }
    } else {
        let path = path_env.unwrap_or(DEFAULT_PATH);
        path.split(|&b| b == b':')
            .map(|dir| {
                if dir.is_empty() {
                    cwd.join(OsStr::from_bytes(argv0))
                } else {
                    cwd.join(OsStr::from_bytes(dir))
                        .join(OsStr::from_bytes(argv0))
                }
            })
            .find(|p| is_executable_file(p))
            .ok_or_else(|| SpawnError::NotFound(show(argv0)))?
    };
    Ok(candidate)
}

/// A started program and the parent's ends of its stdio.
pub struct Spawned {
    /// The child's pid (a process group leader when the request asked for one).
    pub pid: libc::pid_t,
    /// Non-pty: (stdin write end, stdout read end, stderr read end); `None` for a descriptor the
    /// request did not want streamed ([`StdioKind::Closed`], [`StdioKind::DevFull`]).
    pub pipes: Option<StdioPipes>,
    /// Pty mode: the master (stdin and output).
    pub pty_master: Option<OwnedFd>,
}

/// The parent's ends of the program's stdio pipes (see [`Spawned::pipes`]).
pub type StdioPipes = (Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>);

/// The child's end of standard descriptor `fd`, or `None` = close it in the child.
enum ChildEnd {
    Fd(OwnedFd),
    Closed,
}

/// Creates the program's standard descriptors as `kinds` asks: a pipe per streamed descriptor
/// (the stdout pipe grown for streaming), the server's own `/dev/full` for [`StdioKind::DevFull`].
/// Returns the child's ends (fd order) and the parent's.
fn make_stdio(kinds: &[StdioKind; 3]) -> std::io::Result<([ChildEnd; 3], StdioPipes)> {
    let mut parent: [Option<OwnedFd>; 3] = [None, None, None];
    let mut child = [ChildEnd::Closed, ChildEnd::Closed, ChildEnd::Closed];
    for (i, kind) in kinds.iter().enumerate() {
        match kind {
            StdioKind::Closed => {}
            // /dev/full read as stdin gives zeros like any stream of zeros would: only an
            // output is worth reproducing.
            StdioKind::DevFull if i > 0 => {
                let f = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
                child[i] = ChildEnd::Fd(f.into());
            }
            StdioKind::Stream | StdioKind::DevFull => {
                let (r, w) = sys::pipe()?;
                if i == 0 {
                    child[i] = ChildEnd::Fd(r);
                    parent[i] = Some(w);
                } else {
                    if i == 1 {
                        sys::grow_pipe(r.as_raw_fd(), 1 << 20);
                    }
                    child[i] = ChildEnd::Fd(w);
                    parent[i] = Some(r);
                }
            }
        }
    }
    let [a, b, c] = parent;
    Ok((child, (a, b, c)))
}

struct Creds {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

fn lookup_user(user: &str) -> Result<Creds, SpawnError> {
    let bad = || SpawnError::BadUser(user.to_string());
    let u = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(uid.into()).map_err(|_| bad())?,
        Err(_) => nix::unistd::User::from_name(user).map_err(|_| bad())?,
    };
    match u {
        Some(u) => {
            let name = CString::new(u.name.as_bytes()).map_err(|_| bad())?;
            let groups = nix::unistd::getgrouplist(&name, u.gid)
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![u.gid.as_raw()]);
            Ok(Creds {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups,
            })
        }
        // A bare numeric id without a passwd entry is still a valid identity.
        None => match user.parse::<u32>() {
            Ok(id) => Ok(Creds {
                uid: id,
                gid: id,
                groups: vec![id],
            }),
            Err(_) => Err(bad()),
        },
    }
}

/// The server's umask, read once from /proc (calling umask(2) to read it would briefly change
/// it for every thread). 0o022 if /proc is unavailable.
fn server_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

/// Nice value of the calling thread (what posix_spawn's child inherits).
fn current_nice() -> i32 {
    // SAFETY: getpriority has no memory effects; -1 is ambiguous but only costs a fork path.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Resolves, checks against `policy` and starts the program in a new session (its own process
/// group, pgid = pid), with pipes or a pty as stdio.
pub fn spawn(req: &ExecRequest, policy: &Policy) -> Result<Spawned, SpawnError> {
    let argv0 = req.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let cwd: PathBuf = match &req.cwd {
        Some(c) => PathBuf::from(OsStr::from_bytes(c)),
        None => std::env::current_dir().map_err(|e| SpawnError::BadCwd(".".into(), e))?,
    };
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SpawnError::BadCwd(
                cwd.display().to_string(),
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ))
        }
        Err(e) => return Err(SpawnError::BadCwd(cwd.display().to_string(), e)),
    }
    let path_env = req
        .env
        .iter()
        .find(|(k, _)| k.as_slice() == b"PATH")
        .map(|(_, v)| v.as_slice());
    let found = resolve(argv0, path_env, &cwd)?;
    let exe = match policy {
        Policy::Any => found,
        // The allow-list names canonical paths; the canonical path is also what runs, so a
        // symlink changed after the check cannot redirect the exec.
        Policy::Only(set) => {
            let exe = std::fs::canonicalize(&found).map_err(|e| SpawnError::Os(show(argv0), e))?;
            if !set.contains(&exe) {
                return Err(SpawnError::NotAllowed(if argv0.contains(&b'/') {
                    show(argv0)
                } else {
                    format!("{} ({})", show(argv0), exe.display())
                }));
            }
            exe
        }
    };
    let creds = req.user.as_deref().map(lookup_user).transpose()?;
    // posix_spawn cannot set a umask or nice value for the child (both are inherited from the
    // calling thread), so a caller whose values differ from the server's takes the fork path.
    // The common case (both the defaults) stays on the fast path.
    let umask = req.umask.filter(|&m| m != server_umask());
    let nice = req.nice.filter(|&n| n != current_nice());
    // Only SIGKILL/SIGSTOP-free bits of 1..=31 count (they cannot be ignored anyway).
    let ignored = req.sig_ignored & 0xffff_fffe & !(1 << libc::SIGKILL) & !(1 << libc::SIGSTOP);
    if creds.is_none() && umask.is_none() && nice.is_none() && ignored == 0 {
        return spawn_fast(req, &exe, &cwd);
    }

    let mut cmd = Command::new(&exe);
    cmd.arg0(OsStr::from_bytes(argv0))
        .args(req.argv[1..].iter().map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .envs(
            req.env
                .iter()
                .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
        )
        .current_dir(&cwd);

    let os = |e: std::io::Error| SpawnError::Os(show(argv0), e);
    let (pipes, pty_master) = if let Some(size) = req.pty {
        let (master, slave, _) = sys::open_pty(size).map_err(os)?;
        let s1 = slave.try_clone().map_err(os)?;
        let s2 = slave.try_clone().map_err(os)?;
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::from(s1))
            .stderr(Stdio::from(s2));
        (None, Some(master))
    } else {
        let (child_ends, parent) = make_stdio(&req.stdio).map_err(os)?;
        let [e0, e1, e2] = child_ends;
        let stdio = |e: ChildEnd| match e {
            ChildEnd::Fd(fd) => Stdio::from(fd),
            // Closed in pre_exec below (after std's stdio setup).
            ChildEnd::Closed => Stdio::inherit(),
        };
        cmd.stdin(stdio(e0)).stdout(stdio(e1)).stderr(stdio(e2));
        (Some(parent), None)
    };
    let pty = req.pty.is_some();
    let closed: [bool; 3] = std::array::from_fn(|i| !pty && req.stdio[i] == StdioKind::Closed);
    // SAFETY: the closure only makes async-signal-safe system calls (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            for (fd, c) in closed.iter().enumerate() {
                if *c {
                    libc::close(fd as libc::c_int);
                }
            }
            // Signals the server ignores must not stay ignored in the program.
            // Those the caller ignores stay ignored, as they would locally.
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    let action = if ignored & (1 << sig) != 0 {
                        libc::SIG_IGN
                    } else {
                        libc::SIG_DFL
                    };
                    libc::signal(sig, action);
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(m) = umask {
                libc::umask(m as libc::mode_t);
            }
            if let Some(n) = nice {
                // Best effort (see ExecRequest::nice); before the user switch, which may drop
                // the privilege to lower it.
                libc::setpriority(libc::PRIO_PROCESS, 0, n);
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(c) = &creds {
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                    || libc::setgid(c.gid) < 0
                    || libc::setuid(c.uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EPERM) => {
            SpawnError::NotExecutable(show(argv0))
        }
        _ => os(e),
    })?;
    // `cmd` (holding the child's pipe ends) is dropped here, so EOF reaches us when the child
    // (and whatever inherits its stdio) closes them.
    drop(cmd);
    Ok(Spawned {
        pid: child.id() as libc::pid_t,
        pipes,
        pty_master,
    })
}

fn cstring(b: &[u8]) -> Result<CString, SpawnError> {
    CString::new(b).map_err(|_| {
        SpawnError::Os(
            show(b),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
        )
    })
}

/// Owns posix_spawn attributes and file actions, destroying them on every path.
struct SpawnAttrs {
    attr: libc::posix_spawnattr_t,
    fa: libc::posix_spawn_file_actions_t,
}

impl Drop for SpawnAttrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised in spawn_fast before this guard was created.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.fa);
        }
    }
}

fn check(r: libc::c_int, what: &str) -> Result<(), SpawnError> {
    if r == 0 {
        Ok(())
    } else {
        Err(SpawnError::Os(
            what.into(),
            std::io::Error::from_raw_os_error(r),
        ))
    }
}

/// The common case (no user switch): posix_spawn, i.e. clone(CLONE_VFORK) + exec without copying
/// the server's page tables and without a helper thread: the cheapest way to start a program.
/// The child is a session leader (POSIX_SPAWN_SETSID), every signal is back to its default
/// action and unblocked; in pty mode the slave is opened as fd 0 after setsid, which makes it
/// the controlling terminal.
fn spawn_fast(req: &ExecRequest, exe: &Path, cwd: &Path) -> Result<Spawned, SpawnError> {
    let argv0 = req.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let exe_c = cstring(exe.as_os_str().as_bytes())?;
    let cwd_c = cstring(cwd.as_os_str().as_bytes())?;
    let args: Vec<CString> = req
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let envs: Vec<CString> = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k);
            kv.push(b'=');
            kv.extend_from_slice(v);
            cstring(&kv)
        })
        .collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr() as *mut _).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envs.iter().map(|a| a.as_ptr() as *mut _).collect();
    envp_p.push(std::ptr::null_mut());

    let os = |e: std::io::Error| SpawnError::Os(show(argv0), e);
    // Parent ends and child ends of the stdio.
    let mut pipes = None;
    let mut pty_master = None;
    let mut child_ends: Vec<ChildEnd> = Vec::new();
    let mut pty_path = None;
    if let Some(size) = req.pty {
        let (master, slave, path) = sys::open_pty(size).map_err(os)?;
        pty_master = Some(master);
        child_ends.push(ChildEnd::Fd(slave)); // keep the slave open until the child opened it
        pty_path = Some(path);
    } else {
        let (ends, parent) = make_stdio(&req.stdio).map_err(os)?;
        child_ends.extend(ends);
        pipes = Some(parent);
    }

    // SAFETY: zeroed storage is initialised by the *_init calls before any other use; the
    // guard destroys both. Pointers passed to posix_spawn outlive the call.
    let pid = unsafe {
        let mut g = SpawnAttrs {
            attr: std::mem::zeroed(),
            fa: std::mem::zeroed(),
        };
        check(
            libc::posix_spawnattr_init(&mut g.attr),
            "posix_spawnattr_init",
        )?;
        check(
            libc::posix_spawn_file_actions_init(&mut g.fa),
            "posix_spawn_file_actions_init",
        )?;
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(
            libc::posix_spawnattr_setsigdefault(&mut g.attr, &all),
            "setsigdefault",
        )?;
        check(
            libc::posix_spawnattr_setsigmask(&mut g.attr, &none),
            "setsigmask",
        )?;
        check(
            libc::posix_spawnattr_setflags(
                &mut g.attr,
                libc::POSIX_SPAWN_SETSID
                    | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short
                    | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short,
            ),
            "setflags",
        )?;
        if let Some(path) = &pty_path {
            check(
                libc::posix_spawn_file_actions_addopen(
                    &mut g.fa,
                    0,
                    path.as_ptr(),
                    libc::O_RDWR,
                    0,
                ),
                "addopen",
            )?;
            check(
                libc::posix_spawn_file_actions_adddup2(&mut g.fa, 0, 1),
                "adddup2",
            )?;
            check(
                libc::posix_spawn_file_actions_adddup2(&mut g.fa, 0, 2),
                "adddup2",
            )?;
        } else {
            for (i, end) in child_ends.iter().enumerate() {
                match end {
                    ChildEnd::Fd(fd) => check(
                        libc::posix_spawn_file_actions_adddup2(&mut g.fa, fd.as_raw_fd(), i as i32),
                        "adddup2",
                    )?,
                    ChildEnd::Closed => check(
                        libc::posix_spawn_file_actions_addclose(&mut g.fa, i as i32),
                        "addclose",
                    )?,
                }
            }
        }
        check(
            libc::posix_spawn_file_actions_addchdir_np(&mut g.fa, cwd_c.as_ptr()),
            "addchdir",
        )?;
        let mut pid: libc::pid_t = 0;
        let r = libc::posix_spawn(
            &mut pid,
            exe_c.as_ptr(),
            &g.fa,
            &g.attr,
            argv_p.as_ptr(),
            envp_p.as_ptr(),
        );
        if r != 0 {
            let e = std::io::Error::from_raw_os_error(r);
            return Err(match r {
                libc::EACCES | libc::ENOEXEC | libc::EPERM => {
                    SpawnError::NotExecutable(show(argv0))
                }
                libc::ENOENT => SpawnError::NoSuchFile(show(argv0)),
                _ => os(e),
            });
        }
        pid
    };
    drop(child_ends);
    Ok(Spawned {
        pid,
        pipes,
        pty_master,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_like_execvp() {
        let root = Path::new("/");
        let t = resolve(b"true", Some(b"/nonexistent:/usr/bin"), root).unwrap();
        assert_eq!(t, Path::new("/usr/bin/true"));
        assert!(matches!(
            resolve(b"no-such-cmd-xyz", None, root),
            Err(SpawnError::NotFound(_))
        ));
        assert!(matches!(
            resolve(b"./no-such-cmd-xyz", None, root),
            Err(SpawnError::NoSuchFile(_))
        ));
        assert!(matches!(
            resolve(b"/etc/passwd", None, root),
            Err(SpawnError::NotExecutable(_))
        ));
        assert_eq!(SpawnError::NotFound("x".into()).exit_code(), 127);
        assert_eq!(SpawnError::NotAllowed("x".into()).exit_code(), 126);
    }
}
