//! What the two rexec executables share: `rexec` (the front end: the common call through a
//! rexec mux, nothing else linked in) and `rexec-full` (every option, direct links, the
//! terminal mode), which `rexec` runs for everything else.
//!
//! Why two: wrapper scripts start one rexec per operation, so its start-up is paid on every
//! call (issue 14's target is one local program start). A client that only touches the pages
//! of the mux path starts in a fraction of the full one's page faults; clap, tokio, ring and
//! tracing stay in `rexec-full`.

#[cfg(target_env = "musl")]
pub mod alloc;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use offload_exec::mux;
use offload_exec::proto::{ExecRequest, ExitStatus, StdioKind, VERSION};

/// Exit code for rexec's own errors (distinct from the program's usual range, like ssh).
pub const EXIT_REXEC_ERROR: i32 = 255;

/// Environment variable with rexec's log filter (tracing `EnvFilter` syntax).
pub const LOG_ENV: &str = "REXEC_LOG";

/// The file name of the full client, looked for next to `rexec`.
pub const FULL_CLIENT: &str = "rexec-full";

/// rexec's own configuration: read here, never passed to the program (the program would
/// otherwise see, and a nested rexec would reuse, the caller's link settings).
pub const OWN_ENV: [&[u8]; 4] = [
    b"CMD_NET_ADDR",
    b"OFFLOAD_KEY_FILE",
    b"REXEC_CONTROL",
    b"REXEC_CONTROL_DIR",
];

/// The command line from the C `main`'s argv: `std::env::args()` is empty under `#![no_main]`
/// on musl (glibc hands argv to std's initialiser, musl does not).
///
/// # Safety
/// `argv` must hold `argc` valid NUL-terminated strings (what the C runtime passes to `main`).
pub unsafe fn command_line(argc: libc::c_int, argv: *const *const libc::c_char) -> Vec<OsString> {
    (0..usize::try_from(argc).unwrap_or(0))
        // SAFETY: `i` < argc, so within the array (the caller's contract).
        .map(|i| unsafe { *argv.add(i) })
        .take_while(|p| !p.is_null())
        // SAFETY: each pointer is a NUL-terminated string that lives for the whole process.
        .map(|p| OsString::from_vec(unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec()))
        .collect()
}

/// The address of the common call, `rexec CMD ARGS…` with `CMD_NET_ADDR` set (not empty) and no
/// option; `None` for anything else (an option, `--`, no command, no address), which needs the
/// argument parser.
pub fn common_call_addr(argv: &[OsString]) -> Option<String> {
    let first = argv.get(1)?;
    if first.as_bytes().first() == Some(&b'-') {
        return None;
    }
    std::env::var("CMD_NET_ADDR").ok().filter(|a| !a.is_empty())
}

/// Set once SIGPIPE was switched to ignored by [`Caller::capture`] (to put back before an exec).
static SIGPIPE_CHANGED: AtomicBool = AtomicBool::new(false);

/// The caller's process state that the program must start with, read before rexec changes it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// What fds 0–2 were (a closed stdout is reproduced for the program, so is /dev/full).
    pub stdio: [StdioKind; 3],
    /// The signals the caller ignores (`nohup rexec …`).
    pub ignored: u64,
}

impl Caller {
    /// Reads the caller's state, then prepares this process as std's start-up would: closed
    /// fds 0–2 get /dev/null (so no socket becomes stdout), opened close-on-exec so an exec of
    /// [`FULL_CLIENT`] sees them closed again; SIGPIPE is ignored (a closed stdout pipe is an
    /// EPIPE error, reported to the server, not a signal), see [`Caller::undo_for_exec`].
    pub fn capture() -> Caller {
        let stdio = offload_exec::client::stdio_kinds();
        for (fd, kind) in stdio.iter().enumerate() {
            if *kind == StdioKind::Closed {
                // SAFETY: open returns the lowest free descriptor, which is `fd` (all lower
                // ones are open by now).
                unsafe {
                    if libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC)
                        != fd as libc::c_int
                    {
                        libc::abort();
                    }
                }
            }
        }
        let ignored = offload_exec::client::ignored_signals();
        if ignored & (1 << libc::SIGPIPE) == 0 {
            // SAFETY: setting a signal disposition.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            SIGPIPE_CHANGED.store(true, Ordering::Relaxed);
        }
        Caller { stdio, ignored }
    }

    /// Puts back what [`Caller::capture`] changed that an exec would keep (SIGPIPE's
    /// disposition; the /dev/null placeholders close themselves).
    pub fn undo_for_exec() {
        if SIGPIPE_CHANGED.swap(false, Ordering::Relaxed) {
            // SAFETY: setting a signal disposition back to its default.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
        }
    }
}

/// This process's environment without rexec's own variables ([`OWN_ENV`]).
pub fn program_env() -> Vec<(Vec<u8>, Vec<u8>)> {
    std::env::vars_os()
        .map(|(k, v)| (k.into_vec(), v.into_vec()))
        .filter(|(k, _)| !OWN_ENV.contains(&k.as_slice()))
        .collect()
}

/// The options of a request that the command line chooses (the rest follows the caller).
#[derive(Debug, Default)]
pub struct RequestOptions {
    /// `--cwd` (default: the current directory).
    pub cwd: Option<PathBuf>,
    /// `--user`.
    pub user: Option<String>,
    /// `-t`: the remote pty's size.
    pub pty: Option<offload_exec::proto::WinSize>,
    /// `--pgroup`.
    pub pgroup: bool,
}

/// The request for `argv` with `env`, as the caller's process would run it locally.
pub fn request(
    argv: &[OsString],
    env: Vec<(Vec<u8>, Vec<u8>)>,
    opts: RequestOptions,
    caller: &Caller,
) -> ExecRequest {
    let cwd = opts
        .cwd
        .or_else(|| std::env::current_dir().ok())
        .map(|p| p.into_os_string().into_vec());
    ExecRequest {
        version: VERSION,
        id: offload_exec::client::new_id(),
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd,
        user: opts.user,
        pty: opts.pty,
        pgroup: opts.pgroup,
        umask: Some(own_umask()),
        // SAFETY: getpriority has no memory effects.
        nice: Some(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }),
        sig_ignored: caller.ignored,
        stdio: caller.stdio,
    }
}

/// This process's umask. Reading it means setting it: fine here, rexec is still single-threaded
/// and creates no files.
fn own_umask() -> u32 {
    // SAFETY: umask has no memory effects; the old value is put back at once.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

/// The mux socket to try for a link to `addr` (`transport`: `--transport`, for a bare
/// address) with `key_file` (`--key-file`): `$REXEC_CONTROL` (`none` or empty: none), else the
/// default path for this address and key file ([`mux::default_control_path`]). `None` also
/// for an address that does not parse (the direct path reports it).
pub fn control_path(
    addr: &str,
    transport: Option<&str>,
    key_file: Option<&std::path::Path>,
) -> Option<PathBuf> {
    match std::env::var_os(mux::CONTROL_ENV) {
        Some(v) if v.is_empty() || v == "none" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let ep = transport::Endpoint::from_parts(transport, addr).ok()?;
            Some(default_control_path(&ep, key_file))
        }
    }
}

/// The default mux socket for a link to `endpoint` with `key_file` (`--key-file`): where
/// rexec_mux listens and rexec looks, worked out in this one place so the two agree.
pub fn default_control_path(
    endpoint: &transport::Endpoint,
    key_file: Option<&std::path::Path>,
) -> PathBuf {
    mux::default_control_path(&endpoint.to_string(), &mux::key_file_path(key_file))
}

/// The exit code for a program that ended with `st`; dies of the program's signal instead
/// where it was killed by one (default action restored, no core dump).
pub fn exit_code(st: ExitStatus) -> i32 {
    if let ExitStatus::Signal { signal, .. } = st {
        die_of_signal(signal);
    }
    st.shell_code()
}

/// Ends rexec by the signal that killed the remote program, so the caller sees WIFSIGNALED with
/// the same signal (Go's `Signaled()`, Python's negative return codes, a shell's "Killed").
/// Returns only for signals whose default action does not terminate (stop, ignore) or that are
/// out of range; the caller then exits 128+N. rexec itself never dumps core here.
fn die_of_signal(sig: i32) {
    const NOT_FATAL: [i32; 8] = [
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGCONT,
        libc::SIGCHLD,
        libc::SIGURG,
        libc::SIGWINCH,
    ];
    if sig <= 0 || sig > libc::SIGRTMAX() || NOT_FATAL.contains(&sig) {
        return;
    }
    // SAFETY: plain signal/rlimit syscalls on this process; it is about to end.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_CORE, &mut rl) == 0 {
            rl.rlim_cur = 0;
            libc::setrlimit(libc::RLIMIT_CORE, &rl);
        }
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
}

/// Replaces this process with [`FULL_CLIENT`] (found next to this executable, else on `PATH`),
/// same arguments and environment; `no_mux` sets `REXEC_CONTROL=none` (a mux was tried
/// already). Returns only on failure, with the error.
pub fn exec_full(argv: &[OsString], no_mux: bool) -> std::io::Error {
    Caller::undo_for_exec();
    let path = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(FULL_CLIENT)))
        .filter(|p| p.exists())
        .map(PathBuf::into_os_string)
        .unwrap_or_else(|| OsString::from(FULL_CLIENT));
    let Ok(cpath) = std::ffi::CString::new(path.as_bytes()) else {
        return std::io::Error::other("NUL in path");
    };
    let mut args: Vec<std::ffi::CString> = Vec::with_capacity(argv.len());
    for a in argv {
        match std::ffi::CString::new(a.as_bytes()) {
            Ok(c) => args.push(c),
            Err(_) => return std::io::Error::other("NUL in argument"),
        }
    }
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    if no_mux {
        // Single-threaded here (the front end starts no thread before it execs).
        std::env::set_var(mux::CONTROL_ENV, "none");
    }
    // SAFETY: NUL-terminated strings and a NULL-terminated array that outlive the call;
    // execvp searches PATH only for a name without '/'.
    unsafe { libc::execvp(cpath.as_ptr(), ptrs.as_ptr()) };
    let e = std::io::Error::last_os_error();
    std::io::Error::new(
        e.kind(),
        format!("cannot run {}: {e}", OsStr::new(&path).to_string_lossy()),
    )
}

/// A signal's name (`strsignal`), for `-v`.
pub fn signal_name(sig: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string.
    unsafe {
        let p = libc::strsignal(sig);
        if p.is_null() {
            format!("signal {sig}")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}
