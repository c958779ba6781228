//! rexec-full: the complete rexec client (every option, the direct link, `-t`). `rexec`, the
//! front end that wrapper scripts call, handles the common call through a rexec mux itself and
//! execs this executable, next to it, with the same arguments for everything else; run
//! directly it behaves exactly as `rexec` (its `--help` and man page are rexec's).
//!
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
use offload_exec::proto::{ExecRequest, ExitStatus};
use tools::rexec::{self as common, Caller, EXIT_REXEC_ERROR, LOG_ENV};
use transport::{Endpoint, Registry, Session};

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: tools::rexec::alloc::Cached = tools::rexec::alloc::Cached;

/// The caller's state, read first thing in `main` (before rexec changes any of it).
static CALLER: std::sync::OnceLock<Caller> = std::sync::OnceLock::new();

/// The command line, from the C `main`'s argv: `std::env::args()` is empty under `#![no_main]`
/// on musl (glibc hands argv to std's initialiser, musl does not), and rexec-musl is the fast
/// build (.cargo/config.toml).
static ARGV: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

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
The `rexec` executable runs the common call (`rexec CMD ARGS…` through a mux) itself and execs \
`rexec-full`, installed next to it, for everything else.\n\
Example: CMD_NET_ADDR=tcp://10.0.0.1:7000 rexec --key-file /etc/offload/psk uname -a"
)]
struct Args {
    #[command(flatten)]
    peer: tools::PeerArgs,
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
    let addr = common::common_call_addr(argv)?;
    Some(Args {
        peer: tools::PeerArgs {
            addr,
            transport: None,
            link: tools::KeyArgs::default(),
        },
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
        common::program_env()
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

async fn run(args: &Args, req: ExecRequest) -> anyhow::Result<Outcome> {
    let req_ignored = req.sig_ignored;
    let peer = &args.peer;
    let endpoint = Endpoint::from_parts(peer.transport.as_deref(), &peer.addr)
        .map_err(|e| anyhow::anyhow!("bad address {:?}: {e}", peer.addr))?;
    let session = Session::connect(&endpoint, peer.link.session_config()?, Registry::new())
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
                        common::signal_name(signal),
                        if core_dumped { ", core dumped" } else { "" },
                    ),
                }
            }
            common::exit_code(st)
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
    let _ = ARGV.set(unsafe { common::command_line(argc, argv) });
    // What fds 0–2 are and which signals are ignored, before rexec changes either.
    let _ = CALLER.set(Caller::capture());
    match std::panic::catch_unwind(rexec_main) {
        Ok(never) => match never {},
        Err(_) => std::process::exit(EXIT_REXEC_ERROR),
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
    let req = common::request(
        &args.command,
        env,
        common::RequestOptions {
            cwd: args.cwd.clone(),
            user: args.user.clone(),
            pty,
            pgroup: args.pgroup,
        },
        CALLER.get_or_init(Caller::capture),
    );
    // A mux for this address (and key) runs the exec over its session: no handshake here.
    let path = common::control_path(
        &args.peer.addr,
        args.peer.transport.as_deref(),
        args.peer.link.key_file.as_deref(),
    );
    if let Some(path) = path {
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
