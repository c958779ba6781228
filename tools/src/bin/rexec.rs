//! rexec: run a program on the peer (HOST or DPU) exactly as if it ran here.
//!
//! `CMD_NET_ADDR=tcp://IP:PORT rexec CMD ARGS…` — argv verbatim, this process's environment and
//! working directory, stdin/stdout/stderr streamed, signals forwarded; exits with the program's
//! code, or dies of the same signal if the program did (default action restored, no core dump;
//! 128+S where signal S cannot end a process, e.g. SIGSTOP). rexec's own failures (unreachable server, bad key, link
//! lost mid-run) print one line on stderr and exit 255, like ssh.

// No std runtime start-up: rexec's latency is mostly process start-up, and std's (guard page
// lookup through /proc/self/maps, signal alternate stack) buys nothing for a short-lived client.
// `main` below does the two parts rexec relies on. (Test builds keep the harness's main.)
#![cfg_attr(not(test), no_main)]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use clap::Parser;
use offload_exec::client::{self, Outcome, RunOptions};
use offload_exec::mux;
use offload_exec::proto::{ExecRequest, ExitStatus, VERSION};
use transport::{Endpoint, Registry, Session};

/// In the static musl build (`cargo rexec-musl`): musl's malloc maps every block above 128 KiB
/// and unmaps it when freed, so streaming output (a 256 KiB read buffer per chunk) paid an
/// mmap, 64 page faults and an munmap per chunk. [`big_blocks::Cached`] keeps a few freed big
/// blocks for reuse. glibc builds keep glibc's allocator unchanged.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: big_blocks::Cached = big_blocks::Cached;

#[cfg(target_env = "musl")]
mod big_blocks {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::UnsafeCell;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

    /// Start-up arena: small blocks are carved from this zeroed static buffer by a bump pointer
    /// and never reused (freeing one is a no-op). rexec's start (argument parsing, the
    /// environment, the request) made ~30 small allocations that musl's malloc served with 19
    /// `mmap` and 13 `munmap` calls; from the arena they cost nothing but the first touch of
    /// each page. Once it is used up, small blocks go to musl as before.
    const ARENA: usize = 256 * 1024;

    #[repr(C, align(4096))]
    struct Arena(UnsafeCell<[u8; ARENA]>);

    // SAFETY: the buffer is only handed out in disjoint pieces (one compare-exchange on
    // `ARENA_NEXT` per piece), never read or written here.
    unsafe impl Sync for Arena {}

    static ARENA_BUF: Arena = Arena(UnsafeCell::new([0; ARENA]));
    static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

    fn arena_base() -> usize {
        ARENA_BUF.0.get() as usize
    }

    /// True if `p` was handed out by the arena.
    fn in_arena(p: *mut u8) -> bool {
        let a = p as usize;
        a >= arena_base() && a < arena_base() + ARENA
    }

    /// A fresh (still zeroed) piece of the arena, or null when it does not fit.
    fn arena_alloc(layout: Layout) -> *mut u8 {
        let base = arena_base();
        let mut cur = ARENA_NEXT.load(Ordering::Relaxed);
        loop {
            // Alignment is a power of two ≤ the buffer's 4096 (checked by the caller).
            let start = (base + cur + layout.align() - 1) & !(layout.align() - 1);
            let Some(end) = (start - base).checked_add(layout.size().max(1)) else {
                return null_mut();
            };
            if end > ARENA {
                return null_mut();
            }
            match ARENA_NEXT.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return start as *mut u8,
                Err(c) => cur = c,
            }
        }
    }

    /// Blocks from 64 KiB (2^16) up to 16 MiB (2^24) are rounded up to a power of two and
    /// cached; smaller and larger ones go straight to musl.
    const MIN_SHIFT: u32 = 16;
    const MAX_SHIFT: u32 = 24;
    const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
    /// Freed blocks kept per size class (at most ~4 × 16 MiB + … in the worst case, in practice
    /// a few 256/512 KiB read buffers).
    const SLOTS: usize = 4;
    /// musl's malloc alignment; blocks with a stricter alignment are not cached.
    const MAX_ALIGN: usize = 16;

    static FREE: [[AtomicPtr<u8>; SLOTS]; CLASSES] =
        [const { [const { AtomicPtr::new(null_mut()) }; SLOTS] }; CLASSES];

    /// Size class of a layout, if cached.
    fn class(layout: Layout) -> Option<(usize, usize)> {
        let size = layout.size();
        if layout.align() > MAX_ALIGN || !((1 << MIN_SHIFT)..=(1 << MAX_SHIFT)).contains(&size) {
            return None;
        }
        let shift = size.next_power_of_two().trailing_zeros();
        Some(((shift - MIN_SHIFT) as usize, 1 << shift))
    }

    /// The system allocator with a small lock-free cache of freed big blocks.
    pub struct Cached;

    // SAFETY: every block handed out comes from `System` with a size ≥ the request (its class
    // size) and alignment ≤ MAX_ALIGN, which musl's malloc guarantees, or is a disjoint piece
    // of the arena (aligned as asked, never handed out twice, never passed to `System`); a
    // cached block is taken by exactly one `swap`, so no block is handed out twice; `dealloc`
    // gives a block back with the class size it was allocated with.
    unsafe impl GlobalAlloc for Cached {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let Some((c, size)) = class(layout) else {
                if layout.align() <= 4096 {
                    let p = arena_alloc(layout);
                    if !p.is_null() {
                        return p;
                    }
                }
                // SAFETY: forwarding the caller's valid layout.
                return unsafe { System.alloc(layout) };
            };
            for slot in &FREE[c] {
                let p = slot.swap(null_mut(), Ordering::Acquire);
                if !p.is_null() {
                    return p;
                }
            }
            // SAFETY: `size` ≥ layout.size() and a power of two ≥ the alignment: a valid layout.
            unsafe { System.alloc(Layout::from_size_align_unchecked(size, layout.align())) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if in_arena(ptr) {
                return;
            }
            let Some((c, size)) = class(layout) else {
                // SAFETY: `ptr` came from `System.alloc(layout)` above.
                return unsafe { System.dealloc(ptr, layout) };
            };
            for slot in &FREE[c] {
                if slot
                    .compare_exchange(null_mut(), ptr, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
            // SAFETY: `ptr` was allocated by System with the class size (see `alloc`).
            unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align())) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if class(layout).is_none() && layout.align() <= 4096 {
                // Arena pieces are never reused: still zero.
                let p = arena_alloc(layout);
                if !p.is_null() {
                    return p;
                }
            }
            if class(layout).is_none() {
                // SAFETY: forwarding the caller's valid layout (calloc: fresh pages need no memset).
                return unsafe { System.alloc_zeroed(layout) };
            }
            // SAFETY: as `alloc`; the block (possibly reused) is zeroed over the requested size.
            unsafe {
                let p = self.alloc(layout);
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0, layout.size());
                }
                p
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
            let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            if in_arena(ptr) {
                if new_size <= layout.size() {
                    return ptr;
                }
                // SAFETY: a fresh block for `new`, the old contents copied; the arena piece
                // is simply left behind.
                unsafe {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size());
                    }
                    return p;
                }
            }
            match (class(layout), class(new)) {
                // SAFETY: neither block is cached: musl's realloc (in place where it can).
                (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
                // Within one class the block already has room.
                (Some((a, _)), Some((b, _))) if a == b => ptr,
                _ => {
                    // SAFETY: a fresh block for `new`, the overlap copied, the old one freed
                    // with its own layout (GlobalAlloc's default realloc, done here).
                    unsafe {
                        let p = self.alloc(new);
                        if !p.is_null() {
                            std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                            self.dealloc(ptr, layout);
                        }
                        p
                    }
                }
            }
        }
    }
}

/// Exit code for rexec's own errors (distinct from the program's usual range, like ssh).
const EXIT_REXEC_ERROR: i32 = 255;

/// Signals ignored by the caller when rexec started (see `client::ignored_signals`).
static CALLER_IGNORED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The caller's fds 0–2 as found at start (before closed ones are replaced by /dev/null), see
/// `client::stdio_kinds`.
static CALLER_STDIO: std::sync::OnceLock<[offload_exec::proto::StdioKind; 3]> =
    std::sync::OnceLock::new();

/// The command line, from the C `main`'s argv: `std::env::args()` is empty under `#![no_main]`
/// on musl (glibc hands argv to std's initialiser, musl does not), and rexec-musl is the fast
/// build (.cargo/config.toml).
static ARGV: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

/// Environment variable with rexec's log filter (tracing `EnvFilter` syntax).
const LOG_ENV: &str = "REXEC_LOG";

/// rexec's own configuration: read here, never passed to the program (the program would
/// otherwise see, and a nested rexec would reuse, the caller's link settings).
const OWN_ENV: [&[u8]; 4] = [
    b"CMD_NET_ADDR",
    b"OFFLOAD_KEY_FILE",
    b"REXEC_CONTROL",
    b"REXEC_CONTROL_DIR",
];

#[derive(Parser, Debug)]
#[command(
    name = "rexec",
    version,
    about = "Run a program on the peer exactly as if it ran here",
    long_about = "Run a program on the peer (the exec service of offloadd or rexec_server) with this \
process's environment, working directory and stdio; signals are forwarded. Exits with the \
program's exit code or dies of the signal that killed it (128+S where that signal cannot \
end a process), 126/127 if it was refused or not found, \
and 255 on rexec's own errors (unreachable server, wrong key, connection lost).",
    after_help = "Options end at the first non-option argument: `rexec ls -la` runs `ls -la`; \
`rexec -- -cmd` runs a program whose name starts with '-'. Usage errors exit 2.\n\
rexec's own logging: REXEC_LOG=debug (RUST_LOG is left to the program).\n\
With a rexec_mux running for the same address and key file, rexec runs the program over the \
mux's session (no handshake of its own); REXEC_CONTROL=PATH names the mux socket, \
REXEC_CONTROL=none always connects directly. Without an answering mux rexec connects itself.\n\
Example: CMD_NET_ADDR=tcp://10.0.0.1:7000 rexec --key-file /etc/offload/psk uname -a"
)]
struct Args {
    /// Server address: URL (tcp://H:P, unix:///path, vsock://CID:PORT, vsock-uds:///path:PORT,
    /// rdma://IP:PORT), or a bare address with --transport.
    #[arg(long, env = "CMD_NET_ADDR", value_name = "ADDR")]
    addr: String,
    /// Link type for a bare --addr (tcp, unix, vsock, vsock-uds, rdma).
    #[arg(long, value_name = "T")]
    transport: Option<String>,
    #[command(flatten)]
    link: tools::KeyArgs,
    /// Start the remote program with an empty environment (then add --env/--env-keep).
    #[arg(long)]
    env_clear: bool,
    /// Set K=V in the remote environment (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env_set: Vec<OsString>,
    /// With --env-clear: keep this variable from the local environment (repeatable).
    #[arg(long, value_name = "K")]
    env_keep: Vec<OsString>,
    /// Remote working directory (default: the current directory).
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Run as this user (name or uid) on the remote side.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Deliver forwarded signals to the remote process group instead of the process.
    #[arg(long)]
    pgroup: bool,
    /// Allocate a remote pty (local terminal in raw mode, window size propagated).
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Report how the remote program ended on stderr (e.g. killed by a signal).
    #[arg(short, long)]
    verbose: bool,
    /// The program and its arguments, verbatim.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The common call, `rexec CMD ARGS…` with `CMD_NET_ADDR` set and no option: the [`Args`]
/// clap would produce, without building clap's parser (a wrapper script pays rexec's start-up
/// on every call; issue 14's target is one local program start). Anything else (an option, no
/// or an unusable address) goes through clap, with its errors and help.
fn quick_args(argv: &[OsString]) -> Option<Args> {
    let first = argv.get(1)?;
    if first.as_bytes().first() == Some(&b'-') {
        return None;
    }
    let addr = std::env::var("CMD_NET_ADDR")
        .ok()
        .filter(|a| !a.is_empty())?;
    Some(Args {
        addr,
        transport: None,
        link: tools::KeyArgs::default(),
        env_clear: false,
        env_set: Vec::new(),
        env_keep: Vec::new(),
        cwd: None,
        user: None,
        pgroup: false,
        tty: false,
        verbose: false,
        command: argv[1..].to_vec(),
    })
}

fn build_env(args: &Args) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = if args.env_clear {
        args.env_keep
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (k.as_bytes().to_vec(), v.into_vec())))
            .collect()
    } else {
        std::env::vars_os()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .filter(|(k, _)| !OWN_ENV.contains(&k.as_slice()))
            .collect()
    };
    for kv in &args.env_set {
        let b = kv.as_bytes();
        let Some(eq) = b.iter().position(|&c| c == b'=') else {
            anyhow::bail!("--env {}: expected K=V", kv.to_string_lossy());
        };
        let (k, v) = (b[..eq].to_vec(), b[eq + 1..].to_vec());
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    Ok(env)
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

fn signal_name(sig: i32) -> String {
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

async fn run(args: &Args, req: ExecRequest) -> anyhow::Result<Outcome> {
    let req_ignored = req.sig_ignored;
    let endpoint = Endpoint::from_parts(args.transport.as_deref(), &args.addr)
        .map_err(|e| anyhow::anyhow!("bad address {:?}: {e}", args.addr))?;
    let session = Session::connect(&endpoint, args.link.session_config()?, Registry::new())
        .await
        .map_err(|e| {
            // Name the address once: handshake errors already start with it.
            let msg = e.to_string();
            if msg.contains(&endpoint.to_string()) {
                anyhow::anyhow!("{msg}")
            } else {
                anyhow::anyhow!("{endpoint}: {msg}")
            }
        })?;
    let _raw = if args.tty {
        client::RawMode::enter()
    } else {
        None
    };
    let outcome = client::run(
        &session,
        req,
        RunOptions {
            tty: args.tty && _raw.is_some(),
            ignored: req_ignored,
        },
    )
    .await?;
    session.close();
    Ok(outcome)
}

/// The mux socket to try: `$REXEC_CONTROL` (`none` or empty: none), else the default path for
/// this address and key file (`offload_exec::mux::default_control_path`).
fn control_path(args: &Args) -> Option<PathBuf> {
    match std::env::var_os(mux::CONTROL_ENV) {
        Some(v) if v.is_empty() || v == "none" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let ep = Endpoint::from_parts(args.transport.as_deref(), &args.addr).ok()?;
            let key = mux::key_file_path(args.link.key_file.as_deref());
            Some(mux::default_control_path(&ep.to_string(), &key))
        }
    }
}

/// Reports how the exec ended (as `-v` asks, or rexec's own error) and returns the exit code;
/// dies of the program's signal instead where it was killed by one.
fn finish(args: &Args, outcome: anyhow::Result<Outcome>) -> i32 {
    match outcome {
        Ok(Outcome::Exited(st)) => {
            if args.verbose {
                match st {
                    ExitStatus::Code(c) => eprintln!("rexec: remote program exited with code {c}"),
                    ExitStatus::Signal {
                        signal,
                        core_dumped,
                    } => eprintln!(
                        "rexec: remote program killed by signal {signal} ({}){}",
                        signal_name(signal),
                        if core_dumped { ", core dumped" } else { "" },
                    ),
                }
            }
            if let ExitStatus::Signal { signal, .. } = st {
                die_of_signal(signal);
            }
            st.shell_code()
        }
        Ok(Outcome::NotStarted { code, message }) => {
            eprintln!("rexec: {message}");
            code
        }
        Err(e) => {
            eprintln!("rexec: {e:#}");
            EXIT_REXEC_ERROR
        }
    }
}

/// The C entry point (see `#![no_main]`): what std's start-up would have done that matters here,
/// then the client.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    // SAFETY: the C runtime's argc/argv, as `command_line` requires.
    let _ = ARGV.set(unsafe { command_line(argc, argv) });
    // What fds 0–2 are, before closed ones become /dev/null: a closed stdout is reproduced for
    // the program (and so is /dev/full).
    let _ = CALLER_STDIO.set(client::stdio_kinds());
    sanitize_stdio();
    // The caller's ignored signals, before rexec changes any disposition (SIGPIPE just below).
    CALLER_IGNORED.store(
        client::ignored_signals(),
        std::sync::atomic::Ordering::Relaxed,
    );
    // Like std: a closed stdout pipe is an EPIPE error (reported to the server), not a signal.
    // SAFETY: setting a signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    match std::panic::catch_unwind(rexec_main) {
        Ok(never) => match never {},
        Err(_) => std::process::exit(EXIT_REXEC_ERROR),
    }
}

/// The arguments as `OsString`s.
///
/// # Safety
/// `argv` must hold `argc` valid NUL-terminated strings (what the C runtime passes to `main`).
#[cfg(not(test))]
unsafe fn command_line(argc: libc::c_int, argv: *const *const libc::c_char) -> Vec<OsString> {
    (0..usize::try_from(argc).unwrap_or(0))
        // SAFETY: `i` < argc, so within the array (the caller's contract).
        .map(|i| unsafe { *argv.add(i) })
        .take_while(|p| !p.is_null())
        // SAFETY: each pointer is a NUL-terminated string that lives for the whole process.
        .map(|p| OsString::from_vec(unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec()))
        .collect()
}

/// Opens /dev/null on any of fds 0–2 that is closed, as std's start-up does, so that the
/// connection socket never becomes stdout.
#[cfg(not(test))]
fn sanitize_stdio() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) only inspects; open returns the lowest free fd.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0
                && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) < 0
            {
                libc::abort();
            }
        }
    }
}

#[cfg_attr(test, allow(dead_code))]
fn rexec_main() -> std::convert::Infallible {
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = match ARGV.get() {
        Some(argv) => quick_args(argv).unwrap_or_else(|| Args::parse_from(argv)),
        None => Args::parse(),
    };
    // rexec's own variable: RUST_LOG in the caller's environment is meant for the program.
    if std::env::var_os(LOG_ENV).is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env(LOG_ENV))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let env = match build_env(&args) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rexec: {e:#}");
            std::process::exit(EXIT_REXEC_ERROR);
        }
    };
    let cwd = args
        .cwd
        .clone()
        .or_else(|| std::env::current_dir().ok())
        .map(|p| p.into_os_string().into_vec());
    let pty = if args.tty {
        Some(
            client::local_winsize().unwrap_or(offload_exec::proto::WinSize {
                rows: 24,
                cols: 80,
                xpixel: 0,
                ypixel: 0,
            }),
        )
    } else {
        None
    };
    let req = ExecRequest {
        version: VERSION,
        id: client::new_id(),
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd,
        user: args.user.clone(),
        pty,
        pgroup: args.pgroup,
        umask: Some(own_umask()),
        // SAFETY: getpriority has no memory effects.
        nice: Some(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }),
        sig_ignored: CALLER_IGNORED.load(std::sync::atomic::Ordering::Relaxed),
        stdio: CALLER_STDIO.get().copied().unwrap_or_default(),
    };
    // A mux for this address (and key) runs the exec over its session: no handshake here.
    if let Some(path) = control_path(&args) {
        let raw = if args.tty {
            client::RawMode::enter()
        } else {
            None
        };
        let attempt = mux::client::try_run(
            &path,
            mux::client::Call {
                req: &req,
                tty: args.tty && raw.is_some(),
                stdin: !client::stdin_is_empty(),
            },
        );
        drop(raw);
        match attempt {
            mux::client::Attempt::Ran(ended) => {
                tracing::debug!(mux = %path.display(), "ran through the rexec mux");
                let outcome = match ended {
                    mux::Ended::Exited(st) => Ok(Outcome::Exited(st)),
                    mux::Ended::NotStarted { code, message } => {
                        Ok(Outcome::NotStarted { code, message })
                    }
                    mux::Ended::Error(e) => Err(anyhow::anyhow!(e)),
                };
                std::process::exit(finish(&args, outcome));
            }
            mux::client::Attempt::Fallback(why) => {
                tracing::debug!(%why, "no rexec mux: connecting directly");
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rexec: cannot start runtime: {e}");
            std::process::exit(EXIT_REXEC_ERROR);
        }
    };
    let code = finish(&args, rt.block_on(run(&args, req)));
    // exit() skips waiting for the stdin reader thread (blocked in read(2)); all output was
    // written by client::run before it returned, and the terminal mode was restored above.
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path must give exactly what clap gives (an option added to [`Args`] later
    /// with a default or an environment variable would otherwise be skipped by it).
    #[test]
    fn quick_args_match_clap() {
        std::env::set_var("CMD_NET_ADDR", "tcp://127.0.0.1:7000");
        std::env::remove_var("OFFLOAD_KEY_FILE");
        for argv in [
            &["rexec", "true"][..],
            &["rexec", "ls", "-la", "--", "x"],
            &["rexec", "sh", "-c", "echo --env=x"],
        ] {
            let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
            let quick = quick_args(&argv).expect("no option: the fast path applies");
            assert_eq!(
                format!("{quick:?}"),
                format!("{:?}", Args::parse_from(&argv)),
                "{argv:?}"
            );
        }
        for argv in [
            &["rexec", "--tty", "true"][..],
            &["rexec"],
            &["rexec", "-v", "x"],
        ] {
            let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
            assert!(quick_args(&argv).is_none(), "{argv:?} needs clap");
        }
        std::env::set_var("CMD_NET_ADDR", "");
        let argv: Vec<OsString> = ["rexec", "true"].iter().map(OsString::from).collect();
        assert!(
            quick_args(&argv).is_none(),
            "an empty address is clap's to report"
        );
    }
}
