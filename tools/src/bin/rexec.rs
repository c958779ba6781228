//! rexec: run a program on the peer (HOST or DPU) exactly as if it ran here.
//!
//! `CMD_NET_ADDR=tcp://IP:PORT rexec CMD ARGS…` — argv verbatim, this process's environment and
//! working directory, stdin/stdout/stderr streamed, signals forwarded; exits with the program's
//! code, or dies of the same signal if the program did.
//!
//! This executable is the front end for the call wrapper scripts make on every operation: no
//! option, `CMD_NET_ADDR` set, a rexec mux answering for that address. It hands the call to
//! the mux and waits (`offload_exec::mux::client`), and links nothing else: no argument
//! parser, no async runtime, no crypto, no logging. Anything else (an option, `--help`, no
//! mux, a mux that cannot take the call) it hands, unchanged, to `rexec-full` next to it
//! (`tools::rexec::exec_full`), which has the options and connects itself. See `rexec-full
//! --help` for the whole interface.

// No std runtime start-up (as in rexec-full): the C `main` below is the entry point.
#![cfg_attr(not(test), no_main)]

use std::ffi::OsString;

use offload_exec::mux::{self, client::Attempt, Ended};
use tools::rexec::{self as common, Caller};

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: tools::rexec::alloc::Cached = tools::rexec::alloc::Cached;

/// The C entry point (see `#![no_main]`).
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: libc::c_int, argv: *const *const libc::c_char) -> libc::c_int {
    // SAFETY: the C runtime's argc/argv, as `command_line` requires.
    let argv = unsafe { common::command_line(argc, argv) };
    match std::panic::catch_unwind(|| front(&argv)) {
        Ok(code) => code,
        Err(_) => common::EXIT_REXEC_ERROR,
    }
}

/// The mux socket for the common call, or `None` where `rexec-full` must decide.
fn common_call(argv: &[OsString]) -> Option<std::path::PathBuf> {
    let addr = common::common_call_addr(argv)?;
    common::control_path(&addr, None, None)
}

/// Runs the common call through the mux, else execs `rexec-full`; returns the exit code.
#[cfg_attr(test, allow(dead_code))]
fn front(argv: &[OsString]) -> i32 {
    let Some(path) = common_call(argv) else {
        return full(argv, false);
    };
    let caller = Caller::capture();
    let req = common::request(
        &argv[1..],
        common::program_env(),
        common::RequestOptions::default(),
        &caller,
    );
    let attempt = mux::client::try_run(
        &path,
        mux::client::Call {
            req: &req,
            tty: false,
            stdin: !offload_exec::client::stdin_is_empty(),
        },
    );
    if debug_log() {
        match &attempt {
            Attempt::Ran(_) => {
                eprintln!("rexec: debug: ran through the rexec mux {}", path.display())
            }
            Attempt::Fallback(why) => {
                eprintln!(
                    "rexec: debug: no rexec mux ({why}): running {}",
                    common::FULL_CLIENT
                )
            }
        }
    }
    match attempt {
        Attempt::Ran(Ended::Exited(st)) => common::exit_code(st),
        Attempt::Ran(Ended::NotStarted { code, message }) => {
            eprintln!("rexec: {message}");
            code
        }
        Attempt::Ran(Ended::Error(e)) => {
            eprintln!("rexec: {e}");
            common::EXIT_REXEC_ERROR
        }
        // Nothing reached the peer: the full client connects itself.
        Attempt::Fallback(_) => full(argv, true),
    }
}

/// rexec's own log (`REXEC_LOG`, tracing's filter syntax in rexec-full): the front end has one
/// line to say, at debug level, which way the call went.
fn debug_log() -> bool {
    std::env::var(common::LOG_ENV).is_ok_and(|v| {
        let v = v.to_ascii_lowercase();
        v.contains("debug") || v.contains("trace")
    })
}

/// Execs `rexec-full` with the same command line; returns only if that fails.
#[cfg_attr(test, allow(dead_code))]
fn full(argv: &[OsString], mux_tried: bool) -> i32 {
    let e = common::exec_full(argv, mux_tried);
    eprintln!(
        "rexec: {e} (the full client, needed for options and for links without a rexec mux; \
         it is installed next to rexec)"
    );
    common::EXIT_REXEC_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    /// Only the common call stays in the front end; everything with an option, without an
    /// address or with the mux turned off goes to rexec-full, which has the whole interface.
    #[test]
    fn common_call_is_only_the_plain_form() {
        std::env::set_var("CMD_NET_ADDR", "tcp://127.0.0.1:7000");
        std::env::set_var(mux::CONTROL_ENV, "/run/x/rexec.sock");
        assert_eq!(
            common_call(&argv(&["rexec", "true", "--help"])),
            Some("/run/x/rexec.sock".into())
        );
        for a in [
            &["rexec"][..],
            &["rexec", "--help"],
            &["rexec", "-t", "sh"],
            &["rexec", "--", "true"],
        ] {
            assert_eq!(common_call(&argv(a)), None, "{a:?}");
        }
        std::env::set_var(mux::CONTROL_ENV, "none");
        assert_eq!(common_call(&argv(&["rexec", "true"])), None);
        std::env::remove_var(mux::CONTROL_ENV);
        std::env::set_var("OFFLOAD_KEY_FILE", "/k");
        assert_eq!(
            common_call(&argv(&["rexec", "true"])),
            Some(mux::default_control_path(
                "tcp://127.0.0.1:7000",
                std::path::Path::new("/k")
            ))
        );
        std::env::set_var("CMD_NET_ADDR", "");
        assert_eq!(common_call(&argv(&["rexec", "true"])), None);
    }
}
