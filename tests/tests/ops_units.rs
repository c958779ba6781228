//! The systemd units in packaging/systemd: `systemd-analyze verify` accepts each (with the
//! binaries they start pointed at this build, so "not executable" and unknown keys are caught),
//! the containerd drop-in loads on top of the machine's containerd.service, and every option
//! an `ExecStart=`/`ExecStop=` passes is one the binary's `--help` lists.

use std::path::{Path, PathBuf};
use std::process::Command;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("packaging/systemd")
}

const UNITS: [&str; 4] = [
    "offloadd-host.service",
    "offloadd-dpu.service",
    "offload-dpu-setup.service",
    "rexec-mux.service",
];

/// `/usr/bin/NAME` → this build's binary, in every Exec line.
fn retarget(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut l = line.to_string();
        if l.starts_with("Exec") {
            for name in ["offloadd", "offload", "rexec_mux"] {
                let from = format!("=/usr/bin/{name} ");
                if l.contains(&from) {
                    l = l.replace(&from, &format!("={} ", tests::bin(name).display()));
                }
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn have_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn units_verify_with_systemd_analyze() {
    const T: &str = "units_verify_with_systemd_analyze";
    if !have_systemd_analyze() {
        tests::skip(
            T,
            "systemd-analyze not installed (.ci/deps test installs systemd)",
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for u in UNITS {
        let text = std::fs::read_to_string(units_dir().join(u)).unwrap();
        std::fs::write(d.join(u), retarget(&text)).unwrap();
    }
    // The containerd drop-in, on the machine's own containerd.service when there is one.
    let stock = Path::new("/lib/systemd/system/containerd.service");
    let mut check: Vec<&str> = UNITS.to_vec();
    if stock.exists() {
        std::fs::copy(stock, d.join("containerd.service")).unwrap();
        std::fs::create_dir_all(d.join("containerd.service.d")).unwrap();
        std::fs::copy(
            units_dir().join("dropins/containerd-offload.conf"),
            d.join("containerd.service.d/offload.conf"),
        )
        .unwrap();
        check.push("containerd.service");
    } else {
        tests::skip(
            T,
            "containerd drop-in: no /lib/systemd/system/containerd.service here",
        );
    }
    for u in check {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(d.join(u))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Warnings (unknown keys, bad values) keep the exit status 0: any line about our files
        // fails the test too.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains(&d.display().to_string()) || UNITS.iter().any(|u| l.contains(u)))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {u}: {}\n{err}",
            out.status
        );
    }
    // The check bites: a unit naming a missing binary or an unknown key is reported.
    std::fs::write(
        d.join("broken.service"),
        "[Service]\nExecStart=/nonexistent/offloadd\nBogusKey=1\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(d.join("broken.service"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("BogusKey"), "{err}");
}

#[test]
fn unit_command_lines_use_existing_options() {
    for u in UNITS {
        let text = std::fs::read_to_string(units_dir().join(u)).unwrap();
        let mut seen = 0;
        for line in text.lines() {
            let Some((key, cmd)) = line.split_once('=') else {
                continue;
            };
            if !matches!(key, "ExecStart" | "ExecStop") || cmd.is_empty() {
                continue;
            }
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let name = Path::new(words[0]).file_name().unwrap().to_str().unwrap();
            // `offload dpu setup ...`: the help of the subcommand.
            let sub: Vec<&str> = words[1..]
                .iter()
                .take_while(|w| !w.starts_with('-'))
                .copied()
                .collect();
            let help = Command::new(tests::bin(name))
                .args(&sub)
                .arg("--help")
                .output()
                .unwrap();
            assert!(help.status.success(), "{u}: {name} {sub:?} --help failed");
            let help = String::from_utf8_lossy(&help.stdout);
            for w in words.iter().filter(|w| w.starts_with("--")) {
                assert!(
                    help.contains(&format!("{w} ")) || help.contains(&format!("{w}\n")),
                    "{u}: {name} {sub:?} has no option {w}:\n{help}"
                );
            }
            seen += 1;
        }
        assert!(seen >= 1, "{u}: no ExecStart");
    }
}
