//! Escape attempts against the HOST fs service, spoken directly in its wire protocol over a real
//! authenticated session to a real offloadd (a hostile DPU is not limited to what FUSE sends),
//! plus the mount helper's refusals (wrong key, unexported source, unreachable HOST).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use offload_fs::proto::{self, op, Caller, Entry, Operation, Status};
use tests::fs::{fs_test_links, mount_cmd, ExportSpec, Host};
use transport::{CallError, Registry, Session, SessionConfig};

struct Peer {
    s: Session,
    instance: u64,
}

impl Peer {
    async fn connect(host: &Host) -> Peer {
        let key = transport::auth::Key::load(&host.key).unwrap();
        let ep = tests::connect_url(&host.listen).parse().unwrap();
        let s = Session::connect(&ep, SessionConfig::new(Some(key)), Registry::new())
            .await
            .unwrap();
        Peer { s, instance: 0 }
    }

    /// Sends raw bytes; the reply, or the code of a call the service refused outright.
    async fn raw(&self, body: Vec<u8>) -> Result<Bytes, i32> {
        match self.s.call("fs", Bytes::from(body)).await {
            Ok(b) => Ok(b),
            Err(CallError::Remote(e)) => Err(e.code),
            Err(e) => panic!("session failure: {e}"),
        }
    }

    /// One operation: its result and payload, or the reply's failure status.
    async fn call<O: Operation>(&self, op: O) -> Result<(O::Reply, Bytes), Status> {
        let req = proto::encode_request(self.instance, &op, &[]).unwrap();
        let reply = self.raw(req).await.expect("well-formed request refused");
        proto::decode_reply::<O::Reply>(&reply).unwrap()
    }

    /// One operation: its result or the errno it failed with.
    async fn op<O: Operation>(&self, op: O) -> Result<O::Reply, i32> {
        match self.call(op).await {
            Ok((r, _)) => Ok(r),
            Err(Status::Errno(e)) => Err(e),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    async fn mount(&mut self, path: &str) -> Result<Entry, i32> {
        let mount = op::Mount {
            version: proto::VERSION,
            path: path.into(),
        };
        match self.op(mount).await? {
            Ok(m) => {
                self.instance = m.instance;
                Ok(m.root)
            }
            Err(refusal) => Err(refusal.errno),
        }
    }

    async fn lookup(&self, parent: u64, name: &str) -> Result<Entry, i32> {
        self.op(op::Lookup {
            parent,
            name: name.as_bytes().to_vec(),
        })
        .await
    }
}

fn is_link(e: &Entry) -> bool {
    e.attr.mode & libc::S_IFMT == libc::S_IFLNK
}

#[test]
fn fs_escape_attempts_refused() {
    tests::init_tracing();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for kind in tests::link_kinds() {
        let tmp = tempfile::tempdir().unwrap();
        let exp = tmp.path().join("export");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(exp.join("sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"HOST secret").unwrap();
        std::os::unix::fs::symlink(&outside, exp.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", exp.join("rel")).unwrap();
        std::os::unix::fs::symlink("/etc", exp.join("etc")).unwrap();
        std::os::unix::fs::symlink("..", exp.join("sub/up")).unwrap();
        let host = Host::start(
            &kind,
            tmp.path(),
            &[ExportSpec::rw(&exp), ExportSpec::ro("/proc")],
        );
        rt.block_on(async {
            let mut p = Peer::connect(&host).await;
            let e = exp.display().to_string();
            // Mount sources outside every export, or leaving one.
            assert_eq!(p.mount("/etc").await.unwrap_err(), libc::EACCES);
            assert_eq!(
                p.mount(&tmp.path().display().to_string())
                    .await
                    .unwrap_err(),
                libc::EACCES
            );
            assert!(p.mount(&format!("{e}/../outside")).await.is_err());
            assert!(
                p.mount(&format!("{e}/abs")).await.is_err(),
                "absolute symlink followed"
            );
            assert!(
                p.mount(&format!("{e}/rel")).await.is_err(),
                "relative symlink escaped"
            );
            assert!(
                p.mount(&format!("{e}/etc")).await.is_err(),
                "symlink to /etc followed"
            );
            assert!(p.mount(&format!("{e}/sub/up/..")).await.is_err());
            // A symlink that stays inside is fine for the mount source.
            let sub_up = p.mount(&format!("{e}/sub/up")).await;
            assert!(sub_up.is_ok(), "in-export symlink: {sub_up:?}");

            let root = p.mount(&e).await.unwrap();
            // Names are single components.
            for bad in [
                "..",
                ".",
                "",
                "abs/secret",
                "../outside",
                "/etc",
                "sub/../..",
            ] {
                assert_eq!(
                    p.lookup(root.node, bad).await.unwrap_err(),
                    libc::EINVAL,
                    "lookup {bad:?}"
                );
            }
            // Symlinks are nodes of their own: never traversed, opened or chmod'ed on the HOST.
            for name in ["abs", "rel", "etc"] {
                let l = p.lookup(root.node, name).await.unwrap();
                assert!(is_link(&l), "{name} is a symlink node");
                assert_eq!(p.lookup(l.node, "secret").await.unwrap_err(), libc::ENOTDIR);
                assert_eq!(p.lookup(l.node, "passwd").await.unwrap_err(), libc::ENOTDIR);
                assert_eq!(
                    p.op(op::Open {
                        node: l.node,
                        flags: libc::O_RDONLY
                    })
                    .await
                    .unwrap_err(),
                    libc::ELOOP
                );
                assert_eq!(
                    p.op(op::OpenDir { node: l.node }).await.unwrap_err(),
                    libc::ENOTDIR
                );
                let chmod = p
                    .op(op::SetAttr {
                        node: l.node,
                        fh: None,
                        mode: Some(0o777),
                        uid: None,
                        gid: None,
                        size: None,
                        atime: None,
                        mtime: None,
                    })
                    .await;
                assert_eq!(chmod.unwrap_err(), libc::EOPNOTSUPP);
                let gx = p
                    .op(op::GetXattr {
                        node: l.node,
                        name: b"user.x".to_vec(),
                        size: 0,
                    })
                    .await;
                assert_eq!(gx.unwrap_err(), libc::EOPNOTSUPP);
                // Creating through a symlink node as a directory fails too.
                let mk = p
                    .op(op::Mkdir {
                        parent: l.node,
                        name: b"x".to_vec(),
                        mode: 0o755,
                        caller: Caller::default(),
                        alias: None,
                    })
                    .await;
                assert_eq!(mk.unwrap_err(), libc::ENOTDIR);
                // readlink returns the text; the DPU resolves it in its own namespace.
                assert!(p.call(op::ReadLink { node: l.node }).await.is_ok());
            }
            // Device nodes cannot be created (they would expose HOST disks).
            let mk = p
                .op(op::Mknod {
                    parent: root.node,
                    name: b"disk".to_vec(),
                    mode: libc::S_IFBLK | 0o600,
                    rdev: libc::makedev(8, 0),
                    caller: Caller::default(),
                })
                .await;
            assert_eq!(mk.unwrap_err(), libc::EPERM);
            // Hard links cannot cross exports.
            let proc_root = {
                let mut q = Peer::connect(&host).await;
                let r = q.mount("/proc").await.unwrap();
                assert_eq!(q.instance, p.instance);
                r
            };
            let f = p.lookup(root.node, "sub").await.unwrap();
            let link = p
                .op(op::Link {
                    node: f.node,
                    newparent: proc_root.node,
                    newname: b"x".to_vec(),
                })
                .await;
            assert!(link.is_err());

            // Magic links in /proc: readable as text, never followed.
            // Our own process: pid 1 may be out of ptrace reach in this sandbox.
            let me = std::process::id().to_string();
            let one = p.lookup(proc_root.node, &me).await.unwrap();
            for magic in ["root", "cwd", "exe"] {
                let l = p.lookup(one.node, magic).await.unwrap();
                assert!(is_link(&l));
                assert_eq!(p.lookup(l.node, "etc").await.unwrap_err(), libc::ENOTDIR);
                assert_eq!(
                    p.op(op::Open {
                        node: l.node,
                        flags: libc::O_RDONLY
                    })
                    .await
                    .unwrap_err(),
                    libc::ELOOP
                );
                let (_, text) = p.call(op::ReadLink { node: l.node }).await.unwrap();
                let host_text = fs::read_link(format!("/proc/{me}/{magic}")).unwrap();
                assert_eq!(Path::new(std::str::from_utf8(&text).unwrap()), host_text);
            }
            let fd_dir = p.lookup(one.node, "fd").await;
            if let Ok(fd_dir) = fd_dir {
                if let Ok(zero) = p.lookup(fd_dir.node, "0").await {
                    assert!(is_link(&zero));
                    assert_eq!(
                        p.op(op::Open {
                            node: zero.node,
                            flags: libc::O_RDONLY
                        })
                        .await
                        .unwrap_err(),
                        libc::ELOOP
                    );
                }
            }
            // Read-only export refuses writes with EROFS even when asked directly.
            let mk = p
                .op(op::Mkdir {
                    parent: proc_root.node,
                    name: b"x".to_vec(),
                    mode: 0o755,
                    caller: Caller::default(),
                    alias: None,
                })
                .await;
            assert_eq!(mk.unwrap_err(), libc::EROFS);

            // Unknown ids, foreign instances and garbage are errors, not crashes.
            assert_eq!(p.lookup(999_999, "x").await.unwrap_err(), libc::ESTALE);
            assert_eq!(
                p.op(op::Read {
                    fh: 424242,
                    offset: 0,
                    size: 10
                })
                .await
                .unwrap_err(),
                libc::EBADF
            );
            let getattr = op::GetAttr {
                node: root.node,
                fh: None,
            };
            let foreign = proto::encode_request(p.instance ^ 0xff, &getattr, &[]).unwrap();
            let reply = p.raw(foreign).await.unwrap();
            assert_eq!(
                proto::decode_reply::<proto::Attr>(&reply).unwrap(),
                Err(Status::StaleInstance)
            );
            assert_eq!(p.raw(vec![0xff; 7]).await.unwrap_err(), libc::EPROTO);
            assert_eq!(p.raw(Vec::new()).await.unwrap_err(), libc::EPROTO);
            // The service is still fine afterwards.
            assert!(p.lookup(root.node, "sub").await.is_ok());
        });
        // Outside content never changed.
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"HOST secret");
    }
}

#[test]
fn fs_mount_refusals_are_clear() {
    for kind in fs_test_links("fs_mount_refusals_are_clear") {
        let tmp = tempfile::tempdir().unwrap();
        let exp = tmp.path().join("export");
        let mnt = tmp.path().join("mnt");
        fs::create_dir_all(&exp).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let url = tests::connect_url(&host.listen);

        // Wrong key.
        let other = tmp.path().join("other");
        fs::create_dir_all(&other).unwrap();
        let wrong = tests::write_key(&other, "wrong.key");
        let out = mount_cmd(
            &exp,
            &mnt,
            &format!("addr={url},keyfile={}", wrong.display()),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(
            err.contains("authentication failed"),
            "wrong key message: {err}"
        );
        assert!(!tests::fs::is_mounted(&mnt));

        // Key file readable by others is refused before dialing.
        let loose = other.join("loose.key");
        fs::copy(&host.key, &loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
        let out = mount_cmd(
            &exp,
            &mnt,
            &format!("addr={url},keyfile={}", loose.display()),
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

        // Source not exported.
        let out = mount_cmd(Path::new("/etc"), &mnt, &host.mount_opts());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(err.contains("not exported"), "unexported message: {err}");

        // Nothing listening.
        let dead = tests::listen_url(&kind, tmp.path());
        let out = mount_cmd(
            &exp,
            &mnt,
            &format!(
                "addr={},keyfile={}",
                tests::connect_url(&dead),
                host.key.display()
            ),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(err.contains("cannot reach"), "unreachable message: {err}");

        // Unknown option.
        let out = mount_cmd(&exp, &mnt, &format!("{},bogus_option", host.mount_opts()));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
        assert!(!tests::fs::is_mounted(&mnt));
    }
}
