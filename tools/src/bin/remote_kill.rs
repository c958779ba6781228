//! remote_kill — `kill(1)` for processes on the HOST, from the DPU: containerd and dockerd on
//! the DPU signal shim and container pids that live on the HOST.

use anyhow::Context;
use clap::Parser;
use shim_bridge::client::{remote_kill, HostLink, DPU_CONFIG};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "remote_kill",
    version,
    about = "Send a signal to processes on the HOST (like kill(1))",
    after_help = "Examples: remote_kill 1234   remote_kill -s KILL 1234 5678   remote_kill -9 1234\n\
HOST address: --addr, CMD_NET_ADDR, or [bridge.shim] connect in /etc/offload/dpu.toml."
)]
struct Args {
    /// HOST endpoint (tcp://H:P, vsock://2:P, unix:///path, ...).
    #[arg(long, env = "CMD_NET_ADDR", value_name = "ADDR")]
    addr: Option<String>,
    /// Link type for a bare --addr.
    #[arg(long, value_name = "T")]
    transport: Option<String>,
    /// Pre-shared key file (default: $OFFLOAD_KEY_FILE, then /etc/offload/psk).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Connect without a key if none is configured (test setups only).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// DPU config file holding `[bridge.shim]`.
    #[arg(long, value_name = "FILE", default_value = DPU_CONFIG)]
    config: PathBuf,
    /// Signal name (TERM, SIGKILL) or number; default TERM.
    #[arg(short = 's', long = "signal", value_name = "SIG")]
    signal: Option<String>,
    /// Process ids on the HOST.
    #[arg(required = true, value_name = "PID")]
    pids: Vec<i32>,
}

/// Signal name or number → number.
fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        anyhow::ensure!((0..=64).contains(&n), "signal number {n} out of range");
        return Ok(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        _ => anyhow::bail!("unknown signal {s:?}"),
    };
    Ok(n)
}

/// Accepts kill(1)'s `-SIG` / `-9` shorthand by rewriting it to `-s SIG`.
fn normalize(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut first = true;
    for a in args {
        if !first && out.len() == 1 && a.len() > 1 && a.starts_with('-') && !a.starts_with("--") {
            let body = &a[1..];
            let is_sig = body.chars().all(|c| c.is_ascii_digit())
                || (body.chars().all(|c| c.is_ascii_uppercase()) && parse_signal(body).is_ok());
            if is_sig && body != "s" {
                out.push("-s".into());
                out.push(body.to_string());
                continue;
            }
        }
        first = false;
        out.push(a);
    }
    out
}

fn main() {
    tools::init_tracing("warn");
    tools::man::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse_from(normalize(std::env::args()));
    match run(args) {
        Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("remote_kill: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let sig = parse_signal(args.signal.as_deref().unwrap_or("TERM"))?;
    let link = HostLink {
        addr: args.addr.clone(),
        transport: args.transport.clone(),
        key_file: args.key_file.clone(),
        allow_unauthenticated: args.allow_unauthenticated,
        real_shim: None,
        encrypt: Default::default(),
    }
    .resolve(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let session = link.connect().await.context("connecting to the HOST")?;
        let mut all_ok = true;
        for pid in &args.pids {
            if let Err(e) = remote_kill(&session, *pid, sig).await {
                eprintln!("remote_kill: ({pid}): {e}");
                all_ok = false;
            }
        }
        session.close();
        Ok(all_ok)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_and_shorthand() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("term").unwrap(), libc::SIGTERM);
        assert!(parse_signal("BOGUS").is_err());
        let n = |v: &[&str]| normalize(v.iter().map(|s| s.to_string()));
        assert_eq!(n(&["rk", "-9", "12"]), ["rk", "-s", "9", "12"]);
        assert_eq!(n(&["rk", "-KILL", "12"]), ["rk", "-s", "KILL", "12"]);
        assert_eq!(n(&["rk", "-s", "HUP", "12"]), ["rk", "-s", "HUP", "12"]);
        assert_eq!(n(&["rk", "12"]), ["rk", "12"]);
    }
}
