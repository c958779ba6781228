//! The short form of the soak (tests/src/bin/soak.rs; the documented long form is
//! `soak --seconds 600 --clients 64`, docs/RELIABILITY.md): 24 concurrent fs, exec and bridge
//! clients for 45 s against a loopback HOST/DPU pair. Passes when no operation failed, every
//! daemon's fds came back to their baseline and the HOST offloadd stayed under 64 MiB RSS.

use std::process::Command;

#[test]
fn soak_short_no_failures_no_fd_leak_bounded_rss() {
    let name = "soak_short_no_failures_no_fd_leak_bounded_rss";
    if !tests::fs::fuse_ready(name) {
        return;
    }
    let out = Command::new(tests::bin("soak"))
        .args([
            "--seconds",
            "45",
            "--clients",
            "24",
            "--max-host-rss-mib",
            "64",
        ])
        .output()
        .expect("run soak");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "soak failed:\n{report}");
    assert!(report.contains("soak: PASS"), "{report}");
    // Every kind of client made progress.
    for kind in ["fs", "exec", "bridge"] {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("- {kind}: ")))
            .unwrap_or_else(|| panic!("no {kind} line in:\n{report}"));
        let n: u64 = line
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(n > 10, "{kind} clients made little progress: {line}");
    }
}
