//! Real workloads on a qtfs mount: git, tar + diff -r, building a C project with make/gcc and
//! an sqlite3 database checked with `PRAGMA integrity_check`. Needs git, tar, make, gcc and
//! sqlite3 (Debian: `apt-get install git make gcc sqlite3`); a missing tool is a loud skip.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use tests::fs::{fuse_ready, sh, ExportSpec, Host, Mount};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn setup(kind: &str) -> (tempfile::TempDir, Host, Mount) {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exp = tmp.path().join("export");
    fs::create_dir(&exp).unwrap();
    let host = Host::start(kind, tmp.path(), &[ExportSpec::rw(&exp)]);
    let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");
    (tmp, host, m)
}

#[test]
fn fs_workload_git() {
    tests::init_tracing();
    if !fuse_ready("fs_workload_git") {
        return;
    }
    if !have("git") {
        tests::skip("fs_workload_git", "git not installed (apt-get install git)");
        return;
    }
    for kind in tests::link_kinds() {
        let (tmp, _host, m) = setup(&kind);
        let repo = m.path("repo");
        let r = repo.display();
        fs::create_dir(&repo).unwrap();
        for i in 0..50 {
            fs::write(
                repo.join(format!("file{i}.txt")),
                format!("content {i}\n").repeat(i + 1),
            )
            .unwrap();
        }
        sh(&format!(
            "cd {r} && git init -q && git config user.email t@example.com && git config user.name t \
             && git add -A && git commit -q -m first && echo more >> file1.txt && git commit -qam second \
             && git mv file2.txt renamed.txt && git commit -qm third && git gc -q && git fsck --full"
        ));
        let log = sh(&format!("cd {r} && git log --oneline | wc -l"));
        assert_eq!(log.trim(), "3");
        let status = sh(&format!("cd {r} && git status --porcelain"));
        assert_eq!(status.trim(), "", "clean tree after commits");
        // The HOST sees a valid repository too.
        let host_repo = tmp.path().join("export/repo");
        let log = sh(&format!(
            "cd {} && git log --oneline | wc -l",
            host_repo.display()
        ));
        assert_eq!(log.trim(), "3");
    }
}

#[test]
fn fs_workload_tar_diff() {
    tests::init_tracing();
    if !fuse_ready("fs_workload_tar_diff") {
        return;
    }
    let src = Path::new("/usr/include/linux");
    if !src.is_dir() {
        tests::skip(
            "fs_workload_tar_diff",
            "/usr/include/linux missing (linux-libc-dev)",
        );
        return;
    }
    for kind in tests::link_kinds() {
        let (tmp, _host, m) = setup(&kind);
        let tarball = tmp.path().join("src.tar");
        sh(&format!(
            "tar -C /usr/include -cf {} linux",
            tarball.display()
        ));
        let local = tmp.path().join("local");
        fs::create_dir(&local).unwrap();
        sh(&format!(
            "tar -C {} -xf {}",
            local.display(),
            tarball.display()
        ));
        sh(&format!(
            "tar -C {} -xf {}",
            m.dir.display(),
            tarball.display()
        ));
        sh(&format!(
            "diff -r {}/linux {}/linux",
            local.display(),
            m.dir.display()
        ));
        sh(&format!(
            "diff -r {}/linux {}/export/linux",
            local.display(),
            tmp.path().display()
        ));
        let n = sh(&format!("find {}/linux | wc -l", m.dir.display()));
        assert!(n.trim().parse::<usize>().unwrap() > 100);
        sh(&format!("rm -rf {}/linux", m.dir.display()));
        assert!(!tmp.path().join("export/linux").exists());
    }
}

#[test]
fn fs_workload_make_gcc() {
    tests::init_tracing();
    if !fuse_ready("fs_workload_make_gcc") {
        return;
    }
    if !have("gcc") || !have("make") {
        tests::skip("fs_workload_make_gcc", "gcc/make not installed");
        return;
    }
    for kind in tests::link_kinds() {
        let (_tmp, _host, m) = setup(&kind);
        let p = m.path("proj");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("util.h"), "int square(int);\n").unwrap();
        fs::write(
            p.join("util.c"),
            "#include \"util.h\"\nint square(int x) { return x * x; }\n",
        )
        .unwrap();
        fs::write(
            p.join("main.c"),
            "#include <stdio.h>\n#include \"util.h\"\nint main(void) { printf(\"%d\\n\", square(12)); return 0; }\n",
        )
        .unwrap();
        fs::write(
            p.join("Makefile"),
            "app: main.o util.o\n\tgcc -o $@ $^\n%.o: %.c util.h\n\tgcc -O2 -c -o $@ $<\nclean:\n\trm -f app *.o\n",
        )
        .unwrap();
        sh(&format!("make -s -C {}", p.display()));
        assert_eq!(sh(&p.join("app").display().to_string()).trim(), "144");
        // An incremental rebuild notices a change (timestamps work).
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(
            p.join("util.c"),
            "#include \"util.h\"\nint square(int x) { return x * x + 1; }\n",
        )
        .unwrap();
        sh(&format!("make -s -C {}", p.display()));
        assert_eq!(sh(&p.join("app").display().to_string()).trim(), "145");
        sh(&format!("make -s -C {} clean", p.display()));
        assert!(!p.join("app").exists());
    }
}

#[test]
fn fs_workload_sqlite() {
    tests::init_tracing();
    if !fuse_ready("fs_workload_sqlite") {
        return;
    }
    if !have("sqlite3") {
        tests::skip(
            "fs_workload_sqlite",
            "sqlite3 not installed (apt-get install sqlite3)",
        );
        return;
    }
    for kind in tests::link_kinds() {
        let (tmp, _host, m) = setup(&kind);
        for mode in ["delete", "wal"] {
            let db = m.path(&format!("test-{mode}.db"));
            let d = db.display();
            sh(&format!(
                "sqlite3 {d} 'PRAGMA journal_mode={mode}; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
                 WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<2000) \
                 INSERT INTO t(v) SELECT hex(randomblob(50)) FROM c; CREATE INDEX iv ON t(v);' >/dev/null"
            ));
            for i in 0..5 {
                sh(&format!(
                    "sqlite3 {d} \"UPDATE t SET v='u{i}' WHERE id % 20 = {i};\""
                ));
            }
            assert_eq!(
                sh(&format!("sqlite3 {d} 'PRAGMA integrity_check;'")).trim(),
                "ok"
            );
            assert_eq!(
                sh(&format!("sqlite3 {d} 'SELECT count(*) FROM t;'")).trim(),
                "2000"
            );
            // Checkpoint and check the HOST copy as well.
            sh(&format!(
                "sqlite3 {d} 'PRAGMA wal_checkpoint(TRUNCATE);' >/dev/null"
            ));
            let host_db = tmp.path().join(format!("export/test-{mode}.db"));
            assert_eq!(
                sh(&format!(
                    "sqlite3 {} 'PRAGMA integrity_check;'",
                    host_db.display()
                ))
                .trim(),
                "ok"
            );
        }
    }
}
