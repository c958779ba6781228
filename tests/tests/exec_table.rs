//! rexec reproduces local execution: every case runs locally and through `rexec` (same argv,
//! env, cwd and stdin) and must give the same stdout, stderr and exit status. Over every link kind.

mod exec_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use exec_common::{random_file, run_with_stdin, Server};

struct Case {
    name: &'static str,
    argv: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
    cwd: Option<PathBuf>,
    stdin: Option<PathBuf>,
}

fn case(name: &'static str, argv: &[&str]) -> Case {
    Case {
        name,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: None,
    }
}

fn local(c: &Case) -> Output {
    let mut cmd = Command::new(&c.argv[0]);
    cmd.args(&c.argv[1..]).envs(c.env.iter().copied());
    if let Some(d) = &c.cwd {
        cmd.current_dir(d);
    }
    run_with_stdin(cmd, c.stdin.as_deref())
}

fn remote(s: &Server, c: &Case) -> Output {
    let argv: Vec<&str> = c.argv.iter().map(String::as_str).collect();
    let mut cmd = s.rexec(&argv);
    cmd.envs(c.env.iter().copied());
    if let Some(d) = &c.cwd {
        cmd.current_dir(d);
    }
    run_with_stdin(cmd, c.stdin.as_deref())
}

fn code(o: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    o.status
        .code()
        .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0))
}

fn cases(dir: &Path) -> Vec<Case> {
    let big_in = random_file(dir, "stdin-100m", 100 << 20);
    let big_out = random_file(dir, "stdout-100m", 100 << 20);
    let workdir = dir.join("work dir");
    std::fs::create_dir_all(&workdir).expect("mkdir");
    let mut v = vec![
        case("true", &["true"]),
        case("false", &["false"]),
        case("exit 7", &["sh", "-c", "exit 7"]),
        // A shell reports death by SIGKILL as 137; rexec must too.
        case("killed by signal", &["sh", "-c", "kill -9 $$"]),
        case(
            "interleaved stdout/stderr",
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 500 ]; do echo out $i; echo err $i >&2; i=$((i+1)); done; exit 3",
            ],
        ),
        case("argv verbatim", &["sh", "-c", "printf '[%s]' \"$@\"", "x", "-la", "", "a b", "--", "*"]),
        case("binary output", &["sh", "-c", "printf '\\000\\001\\377\\n\\r'"]),
        case("100 MiB to stdout", &["cat", big_out.to_str().expect("utf8")]),
    ];
    let mut c = case("100 MiB random stdin through sha256sum", &["sha256sum"]);
    c.stdin = Some(big_in.clone());
    v.push(c);
    let mut c = case("command ignoring stdin", &["sh", "-c", "echo ignored"]);
    c.stdin = Some(big_in);
    v.push(c);
    let mut c = case("env var visible", &["sh", "-c", "echo \"$REXEC_TEST_VAR\""]);
    c.env = vec![("REXEC_TEST_VAR", "hello world=1")];
    v.push(c);
    let mut c = case("cwd visible", &["pwd"]);
    c.cwd = Some(workdir);
    v.push(c);
    v
}

#[test]
fn exec_matches_local_run() {
    tests::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = cases(dir.path());
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        for c in &cases {
            let l = local(c);
            let r = remote(&server, c);
            assert_eq!(
                code(&r),
                code(&l),
                "[{kind}] {}: exit status (remote stderr: {})",
                c.name,
                String::from_utf8_lossy(&r.stderr)
            );
            assert!(
                r.stdout == l.stdout,
                "[{kind}] {}: stdout differs ({} vs {} bytes)",
                c.name,
                r.stdout.len(),
                l.stdout.len()
            );
            assert_eq!(
                String::from_utf8_lossy(&r.stderr),
                String::from_utf8_lossy(&l.stderr),
                "[{kind}] {}: stderr",
                c.name
            );
            println!("[{kind}] {}: ok (exit {})", c.name, code(&l));
        }
    }
}

#[test]
fn exec_refused_and_missing_binaries() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        // /usr/bin/id exists but is not in the allow-list.
        let r = run_with_stdin(server.rexec(&["id"]), None);
        assert_eq!(
            r.status.code(),
            Some(126),
            "[{kind}] refused binary exits 126"
        );
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains("not allowed"),
            "[{kind}] clear refusal message: {err}"
        );
        assert_eq!(err.lines().count(), 1, "[{kind}] one line: {err}");
        assert!(r.stdout.is_empty());

        // A symlink to an unlisted binary is refused too (the resolved path counts).
        let link = server.dir.path().join("sneaky");
        std::os::unix::fs::symlink("/usr/bin/id", &link).expect("symlink");
        let r = run_with_stdin(server.rexec(&[link.to_str().expect("utf8")]), None);
        assert_eq!(
            r.status.code(),
            Some(126),
            "[{kind}] symlink to unlisted binary"
        );

        let r = run_with_stdin(server.rexec(&["no-such-command-xyz"]), None);
        assert_eq!(
            r.status.code(),
            Some(127),
            "[{kind}] missing binary exits 127"
        );
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("not found"), "[{kind}] message: {err}");

        let r = run_with_stdin(server.rexec(&["/nonexistent/bin/x"]), None);
        assert_eq!(
            r.status.code(),
            Some(127),
            "[{kind}] missing path exits 127"
        );
    }
}

#[test]
fn exec_env_options() {
    tests::init_tracing();
    for kind in exec_common::setups() {
        let server = Server::start_setup(&kind);
        let mut cmd = server.rexec(&[
            "--env-clear",
            "--env-keep",
            "KEEP_ME",
            "--env",
            "SET_ME=v=1",
            "env",
        ]);
        cmd.env("KEEP_ME", "kept").env("DROP_ME", "x");
        let r = run_with_stdin(cmd, None);
        assert_eq!(
            r.status.code(),
            Some(0),
            "[{kind}] {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let mut lines: Vec<String> = String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            vec!["KEEP_ME=kept".to_string(), "SET_ME=v=1".to_string()],
            "[{kind}]"
        );

        let r = run_with_stdin(server.rexec(&["--cwd", "/tmp", "pwd"]), None);
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "/tmp\n",
            "[{kind}] --cwd"
        );

        if tests::is_root() {
            // --user: uid, gid and supplementary groups of that user.
            let r = run_with_stdin(
                server.rexec(&["--user", "nobody", "--cwd", "/", "sh", "-c", "id -u; id -G"]),
                None,
            );
            let expect = Command::new("sh")
                .args(["-c", "id -u nobody; id -G nobody"])
                .output()
                .expect("id");
            assert_eq!(
                r.status.code(),
                Some(0),
                "[{kind}] --user: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            assert_eq!(r.stdout, expect.stdout, "[{kind}] --user nobody");
            let r = run_with_stdin(server.rexec(&["--user", "no-such-user-xyz", "true"]), None);
            assert_eq!(r.status.code(), Some(126), "[{kind}] unknown user");
        } else {
            tests::skip("exec_env_options --user", "needs root to switch users");
        }
    }
}
