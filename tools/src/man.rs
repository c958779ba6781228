//! Man pages generated from the clap definitions (`clap_mangen`). Each binary calls
//! [`generate_if_asked`] first thing: with `OFFLOAD_GEN_MAN_DIR` set it writes its page there
//! and exits, so the definitions stay in the binaries. `offload gen-man DIR` ([`gen_all`]) runs
//! every sibling binary that way and writes its own page.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The environment variable that asks a binary for its man page instead of running.
pub const ENV: &str = "OFFLOAD_GEN_MAN_DIR";

/// The binaries that get a page, by file name (`mount_qtfs`'s page is `mount.qtfs.1`).
pub const BINARIES: [&str; 7] = [
    "offloadd",
    "mount_qtfs",
    "rexec",
    "rexec_server",
    "rexec_mux",
    "offload-shim",
    "remote_kill",
];

/// Renders `cmd`'s man page (section 1) into `dir/NAME.1`; returns the path.
pub fn write_page(cmd: clap::Command, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.1", cmd.get_name()));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .context("rendering the man page")?;
    // Subcommands get pages of their own (offload-dpu-setup.1, ...), as git does.
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        // clap names are &'static str; this runs once per page in a process that then exits.
        let name: &'static str =
            Box::leak(format!("{}-{}", cmd.get_name(), sub.get_name()).into_boxed_str());
        let sub = sub.clone().name(name).bin_name(name);
        write_page(sub, dir)?;
    }
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// With `OFFLOAD_GEN_MAN_DIR` set: writes `cmd`'s page there and exits (0, or 1 with the error).
pub fn generate_if_asked(cmd: impl FnOnce() -> clap::Command) {
    let Some(dir) = std::env::var_os(ENV) else {
        return;
    };
    let code = match write_page(cmd(), Path::new(&dir)) {
        Ok(p) => {
            println!("{}", p.display());
            0
        }
        Err(e) => {
            eprintln!("man page: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// `offload gen-man DIR`: this program's pages (`own`) and every sibling binary's.
pub fn gen_all(own: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages = vec![write_page(own, dir)?];
    let exe = std::env::current_exe().context("locating this executable")?;
    let bin_dir = exe.parent().context("executable without a directory")?;
    for name in BINARIES {
        let bin = bin_dir.join(name);
        anyhow::ensure!(bin.exists(), "{} not found next to offload", bin.display());
        let out = std::process::Command::new(&bin)
            .env(ENV, dir)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let printed = String::from_utf8_lossy(&out.stdout);
        let page = printed.lines().next().map(PathBuf::from);
        match page {
            Some(p) if out.status.success() && p.is_file() => pages.push(p),
            _ => anyhow::bail!(
                "{} wrote no man page (status {}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    Ok(pages)
}
