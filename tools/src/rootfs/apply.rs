//! Carrying out a plan (setup) and undoing it (teardown).
//!
//! Setup checks each step against the system first (mount table, files), performs only the
//! missing ones and records each thing it created in a state file under `state_dir`, so a second
//! setup is a no-op and teardown removes exactly what setup made — never a directory or file it
//! did not create, never a changed file. A failing step rolls back what this run did.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use super::mountinfo::{self, MountEntry};
use super::plan::{Content, QtfsHelper, Step};

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A file operation.
    #[error("{what} {path}: {error}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error (in the message, not chained: the message is complete).
        error: io::Error,
    },
    /// A mount(2)/umount2(2).
    #[error("{what}: {errno}")]
    Sys {
        /// The call, e.g. `mount --bind /etc /r/etc`.
        what: String,
        /// The error.
        errno: nix::Error,
    },
    /// A helper program failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
}

/// Why setup or teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A setup step failed; what this run did before it was undone.
    #[error("setup step {index} failed: {step}: {cause}{}", rollback_note(*.rolled_back, .rollback_errors))]
    StepFailed {
        /// 1-based step number in `offload dpu plan`.
        index: usize,
        /// The step.
        step: String,
        /// The error.
        cause: Box<StepError>,
        /// Items undone.
        rolled_back: usize,
        /// Undo failures (left in place).
        rollback_errors: Vec<String>,
    },
    /// The state file could not be read or written.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Teardown could not undo everything (the rest stays recorded).
    #[error("teardown could not undo {}: {}", .0.len(), .0.join("; "))]
    Teardown(Vec<String>),
}

fn rollback_note(n: usize, errs: &[String]) -> String {
    if errs.is_empty() {
        format!(" (rolled back the {n} change(s) this run made)")
    } else {
        format!(
            " (rolled back {n} change(s); could not undo: {})",
            errs.join("; ")
        )
    }
}

/// One thing setup created, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Done {
    /// A directory setup created (removed when empty).
    Dir {
        /// Path.
        path: PathBuf,
    },
    /// A symlink setup created.
    Link {
        /// Path.
        path: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// A mount setup made; `detach` unmounts lazily with everything below it.
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Lazy recursive unmount (the root's self-bind).
        #[serde(default)]
        detach: bool,
    },
    /// A file setup wrote; removed only while its content is unchanged.
    File {
        /// Path.
        path: PathBuf,
        /// FNV-1a hash of the content written (hex).
        hash: String,
    },
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The root this record is about.
    pub root: PathBuf,
    /// What setup created, in order.
    #[serde(default)]
    pub done: Vec<Done>,
}

/// The state file for `root` under `state_dir`.
pub fn state_path(state_dir: &Path, root: &Path) -> PathBuf {
    let name: String = root
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join(format!("rootfs{name}.toml"))
}

fn load_state(path: &Path, root: &Path) -> Result<State, DeployError> {
    match std::fs::read_to_string(path) {
        Ok(t) => toml::from_str(&t).map_err(|e| DeployError::State {
            path: path.into(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State {
            root: root.into(),
            done: Vec::new(),
        }),
        Err(e) => Err(DeployError::State {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

fn save_state(path: &Path, st: &State) -> Result<(), DeployError> {
    let err = |message: String| DeployError::State {
        path: path.into(),
        message,
    };
    if st.done.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(e.to_string())),
            _ => Ok(()),
        };
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| err(e.to_string()))?;
    }
    let text = toml::to_string(st).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

/// FNV-1a, 64 bit: enough to notice a file changed since setup wrote it.
fn fnv(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StepError + 'a {
    move |error| StepError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

fn content_bytes(c: &Content) -> Result<Vec<u8>, StepError> {
    match c {
        Content::Copy(p) => std::fs::read(p).map_err(io_err("reading", p)),
        Content::Text(t) => Ok(t.clone().into_bytes()),
    }
}

/// A qtfs mount of HOST `src` is the topmost mount at `dst`.
fn qtfs_at(table: &[MountEntry], src: &Path, dst: &Path) -> bool {
    mountinfo::top_at(table, dst).is_some_and(|e| {
        // fuser's own mount reports `fuse`, fusermount `fuse.qtfs`; the source names it.
        e.fstype.starts_with("fuse") && e.source == format!("qtfs:{}", src.display())
    })
}

/// `p` is there but unreachable: a FUSE mount whose daemon died (stat fails with ENOTCONN).
/// The directory under it exists; the mount step after it replaces the mount.
fn dead_mount(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// The FUSE mount at `p` lost its daemon ("Transport endpoint is not connected"). statfs
/// always reaches the daemon (a stat may be answered from cached attributes).
fn stale(p: &Path) -> bool {
    matches!(nix::sys::statfs::statfs(p), Err(nix::Error::ENOTCONN))
}

/// True when `step` needs no action on this system (`recorded`: what earlier setups made).
fn is_done(step: &Step, table: &[MountEntry], recorded: &[Done]) -> Result<bool, StepError> {
    let fstype_at = |p: &Path| mountinfo::top_at(table, p).map(|e| e.fstype.as_str());
    Ok(match step {
        Step::Mkdir(p) => p.is_dir() || dead_mount(p),
        Step::Symlink { link, .. } => link.symlink_metadata().is_ok(),
        Step::Proc(p) => fstype_at(p) == Some("proc"),
        Step::Devtmpfs(p) => fstype_at(p) == Some("devtmpfs"),
        Step::Tmpfs(p) => fstype_at(p) == Some("tmpfs"),
        Step::Bind {
            src, dst, optional, ..
        } => (*optional && !src.exists()) || mountinfo::top_at(table, dst).is_some(),
        Step::Qtfs { src, dst, .. } => qtfs_at(table, src, dst) && !stale(dst),
        Step::Install { dst, content, mode } => match std::fs::read(dst) {
            Ok(have) => {
                let perm = dst
                    .metadata()
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0);
                perm == *mode && have == content_bytes(content)?
            }
            Err(_) => false,
        },
        // A missing controller directory is nothing to do (skipped).
        Step::CgroupV1 { dst, .. } => !dst.is_dir() || fstype_at(dst) == Some("cgroup"),
        Step::RbindSelf(p) => {
            recorded
                .iter()
                .any(|d| matches!(d, Done::Mount { path, detach: true } if path == p))
                && mountinfo::count_at(table, p) > 0
        }
    })
}

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::Error) -> StepError {
    move |errno| StepError::Sys {
        what: what(),
        errno,
    }
}

/// Performs one step, appending what it created to `made`.
fn perform(step: &Step, made: &mut Vec<Done>) -> Result<(), StepError> {
    let what = || step.to_string();
    match step {
        Step::Mkdir(p) => {
            let mut missing: Vec<&Path> = p
                .ancestors()
                .take_while(|a| !a.exists() && !dead_mount(a))
                .collect();
            missing.reverse();
            for d in missing {
                std::fs::create_dir(d).map_err(io_err("mkdir", d))?;
                made.push(Done::Dir { path: d.into() });
            }
        }
        Step::Symlink { link, target } => {
            std::os::unix::fs::symlink(target, link).map_err(io_err("symlink", link))?;
            made.push(Done::Link {
                path: link.clone(),
                target: target.clone(),
            });
        }
        Step::Proc(p) => {
            let f = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            mount(Some("proc"), p, Some("proc"), f, None::<&str>).map_err(sys(what))?;
            made.push(Done::Mount {
                path: p.clone(),
                detach: false,
            });
        }
        Step::Devtmpfs(p) => {
            mount(
                Some("devtmpfs"),
                p,
                Some("devtmpfs"),
                MsFlags::MS_NOSUID,
                Some("mode=755"),
            )
            .map_err(sys(what))?;
            made.push(Done::Mount {
                path: p.clone(),
                detach: false,
            });
        }
        Step::Tmpfs(p) => {
            let mode = if p.file_name().is_some_and(|n| n == "tmp") {
                "mode=1777"
            } else {
                "mode=755"
            };
            let f = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            mount(Some("tmpfs"), p, Some("tmpfs"), f, Some(mode)).map_err(sys(what))?;
            made.push(Done::Mount {
                path: p.clone(),
                detach: false,
            });
        }
        Step::Bind { src, dst, ro, .. } => {
            mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(sys(what))?;
            made.push(Done::Mount {
                path: dst.clone(),
                detach: false,
            });
            // Private: mounts made below it stay in the root instead of propagating back
            // into the DPU's own tree (and teardown's unmounts likewise).
            mount(
                None::<&str>,
                dst,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(sys(|| format!("mount --make-private {}", dst.display())))?;
            if *ro {
                let f = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
                mount(None::<&str>, dst, None::<&str>, f, None::<&str>).map_err(sys(|| {
                    format!("mount -o remount,bind,ro {}", dst.display())
                }))?;
            }
        }
        Step::Qtfs {
            src,
            dst,
            options,
            helper,
        } => {
            // A mount whose daemon died (killed, crashed) is replaced, not stacked upon.
            if stale(dst) {
                umount2(dst, MntFlags::MNT_DETACH).map_err(sys(|| {
                    format!("umount -l {} (stale qtfs mount)", dst.display())
                }))?;
            }
            let mut cmd = match helper {
                QtfsHelper::MountT => {
                    let mut c = Command::new("mount");
                    c.args(["-t", "qtfs"]);
                    if !options.is_empty() {
                        c.args(["-o", options]);
                    }
                    c.arg(src).arg(dst);
                    c
                }
                QtfsHelper::Program(p) => {
                    let mut c = Command::new(p);
                    c.arg(src).arg(dst);
                    if !options.is_empty() {
                        c.args(["-o", options]);
                    }
                    c
                }
            };
            cmd.stdin(std::process::Stdio::null());
            let out = cmd.output().map_err(|e| StepError::Command {
                cmd: what(),
                status: "not started".into(),
                stderr: e.to_string(),
            })?;
            if !out.status.success() {
                return Err(StepError::Command {
                    cmd: what(),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            made.push(Done::Mount {
                path: dst.clone(),
                detach: false,
            });
        }
        Step::Install { dst, content, mode } => {
            let data = content_bytes(content)?;
            let tmp = dst.with_extension("offload-tmp");
            std::fs::write(&tmp, &data).map_err(io_err("writing", &tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
                .map_err(io_err("chmod", &tmp))?;
            if let Err(e) = std::fs::rename(&tmp, dst) {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err("installing", dst)(e));
            }
            made.push(Done::File {
                path: dst.clone(),
                hash: fnv(&data),
            });
        }
        Step::CgroupV1 { controllers, dst } => {
            if dst.is_dir() {
                mount(
                    Some("cgroup"),
                    dst,
                    Some("cgroup"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    Some(controllers.as_str()),
                )
                .map_err(sys(what))?;
                made.push(Done::Mount {
                    path: dst.clone(),
                    detach: false,
                });
            }
        }
        Step::RbindSelf(p) => {
            let f = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(p), p, None::<&str>, f, None::<&str>).map_err(sys(what))?;
            made.push(Done::Mount {
                path: p.clone(),
                detach: true,
            });
        }
    }
    Ok(())
}

/// Undoes one recorded item; `Ok(Some(note))` when it was deliberately left in place.
fn undo(d: &Done) -> Result<Option<String>, String> {
    match d {
        Done::Dir { path } => match std::fs::remove_dir(path) {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(Some(format!(
                "kept {}: not empty (holds data setup did not create)",
                path.display()
            ))),
            Err(e) => Err(format!("rmdir {}: {e}", path.display())),
        },
        Done::Link { path, target } => match std::fs::read_link(path) {
            Ok(t) if &t == target => {
                std::fs::remove_file(path).map_err(|e| format!("rm {}: {e}", path.display()))?;
                Ok(None)
            }
            Ok(_) => Ok(Some(format!("kept {}: link was changed", path.display()))),
            Err(_) => Ok(None),
        },
        Done::File { path, hash } => match std::fs::read(path) {
            Ok(data) if &fnv(&data) == hash => {
                std::fs::remove_file(path).map_err(|e| format!("rm {}: {e}", path.display()))?;
                Ok(None)
            }
            Ok(_) => Ok(Some(format!(
                "kept {}: changed since setup wrote it",
                path.display()
            ))),
            Err(_) => Ok(None),
        },
        Done::Mount { path, detach } => unmount(path, *detach),
    }
}

fn unmount(path: &Path, detach: bool) -> Result<Option<String>, String> {
    if detach {
        return match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(None),
            Err(e) => Err(format!("umount -l {}: {e}", path.display())),
        };
    }
    // A FUSE daemon or a process still using the mount may need a moment to let go.
    for _ in 0..30 {
        match umount2(path, MntFlags::empty()) {
            Ok(()) => return Ok(None),
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {
                return Ok(Some(format!("{} was not mounted", path.display())))
            }
            Err(nix::Error::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("umount {}: {e}", path.display())),
        }
    }
    umount2(path, MntFlags::MNT_DETACH)
        .map(|()| {
            Some(format!(
                "{} was busy: detached lazily (it goes when its last user does)",
                path.display()
            ))
        })
        .map_err(|e| format!("umount -l {}: {e}", path.display()))
}

/// What setup did.
#[derive(Debug, Default)]
pub struct SetupReport {
    /// Steps performed now.
    pub performed: Vec<String>,
    /// Steps found already in place.
    pub already: usize,
    /// Notes (skipped optional binds, ...).
    pub notes: Vec<String>,
}

/// For each step: is it in place on this system already (what `setup` would skip)?
pub fn status(steps: &[Step], root: &Path, state_dir: &Path) -> Result<Vec<bool>, DeployError> {
    let state = load_state(&state_path(state_dir, root), root)?;
    let table = mountinfo::read().unwrap_or_default();
    Ok(steps
        .iter()
        .map(|s| is_done(s, &table, &state.done).unwrap_or(false))
        .collect())
}

/// Runs the plan: skips what is in place, performs the rest, records it in the state file.
/// On a failing step, undoes what this run did (newest first) and names the step.
pub fn setup(
    steps: &[Step],
    root: &Path,
    state_dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<SetupReport, DeployError> {
    let spath = state_path(state_dir, root);
    let mut state = load_state(&spath, root)?;
    let mut report = SetupReport::default();
    let mut run_made: Vec<Done> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let table = mountinfo::read().unwrap_or_default();
        let fail = |source: StepError, run_made: &mut Vec<Done>, state: &mut State| {
            let mut errs = Vec::new();
            let n = run_made.len();
            for d in run_made.iter().rev() {
                match undo(d) {
                    Ok(_) => state.done.retain(|x| x != d),
                    Err(e) => errs.push(e),
                }
            }
            let _ = save_state(&spath, state);
            DeployError::StepFailed {
                index: i + 1,
                step: step.to_string(),
                cause: Box::new(source),
                rolled_back: n - errs.len(),
                rollback_errors: errs,
            }
        };
        match is_done(step, &table, &state.done) {
            Ok(true) => {
                if let Step::Bind {
                    src,
                    optional: true,
                    ..
                } = step
                {
                    if !src.exists() {
                        report
                            .notes
                            .push(format!("skipped {step}: {} does not exist", src.display()));
                    }
                }
                report.already += 1;
                continue;
            }
            Ok(false) => {}
            Err(e) => return Err(fail(e, &mut run_made, &mut state)),
        }
        progress(&format!("[{}/{}] {step}", i + 1, steps.len()));
        let mut made = Vec::new();
        let res = perform(step, &mut made);
        state.done.extend(made.iter().cloned());
        run_made.extend(made);
        if let Err(e) = res {
            return Err(fail(e, &mut run_made, &mut state));
        }
        if let Err(e) = save_state(&spath, &state) {
            return Err(fail(
                StepError::Io {
                    what: "recording state",
                    path: spath.clone(),
                    error: io::Error::other(e.to_string()),
                },
                &mut run_made,
                &mut state,
            ));
        }
        report.performed.push(step.to_string());
    }
    Ok(report)
}

/// What teardown did.
#[derive(Debug, Default)]
pub struct TeardownReport {
    /// Items undone.
    pub undone: usize,
    /// Items deliberately left (with why).
    pub notes: Vec<String>,
    /// No state file: nothing recorded for this root.
    pub nothing_recorded: bool,
}

/// Undoes everything the state file records, newest first. Items that cannot be undone stay
/// recorded (a later teardown retries them) and are reported.
pub fn teardown(
    root: &Path,
    state_dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<TeardownReport, DeployError> {
    let spath = state_path(state_dir, root);
    let mut state = load_state(&spath, root)?;
    let mut report = TeardownReport {
        nothing_recorded: state.done.is_empty(),
        ..Default::default()
    };
    let mut failed = Vec::new();
    let mut keep = Vec::new();
    for d in state.done.iter().rev() {
        progress(&format!("undo {d:?}"));
        match undo(d) {
            Ok(None) => report.undone += 1,
            Ok(Some(note)) => {
                report.undone += 1;
                report.notes.push(note);
            }
            Err(e) => {
                failed.push(e);
                keep.push(d.clone());
            }
        }
    }
    keep.reverse();
    state.done = keep;
    save_state(&spath, &state)?;
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(DeployError::Teardown(failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let st = State {
            root: "/r".into(),
            done: vec![
                Done::Dir { path: "/r".into() },
                Done::Mount {
                    path: "/r/proc".into(),
                    detach: false,
                },
                Done::File {
                    path: "/r/x".into(),
                    hash: fnv(b"x"),
                },
            ],
        };
        let t = toml::to_string(&st).unwrap();
        let back: State = toml::from_str(&t).unwrap();
        assert_eq!(back.done, st.done);
        assert_eq!(
            state_path(Path::new("/run/offload"), Path::new("/another_rootfs")),
            PathBuf::from("/run/offload/rootfs_another_rootfs.toml")
        );
        assert_ne!(fnv(b"a"), fnv(b"b"));
    }

    /// Files, dirs and links (no root needed): setup twice, then teardown keeps a changed file.
    #[test]
    fn setup_is_idempotent_and_teardown_keeps_user_data() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("root");
        let sd = t.path().join("state");
        let steps = vec![
            Step::Mkdir(r.join("a/b")),
            Step::Symlink {
                link: r.join("bin"),
                target: "usr/bin".into(),
            },
            Step::Install {
                dst: r.join("a/b/w"),
                content: Content::Text("#!/bin/sh\n".into()),
                mode: 0o755,
            },
            Step::Install {
                dst: r.join("a/keep"),
                content: Content::Text("x".into()),
                mode: 0o644,
            },
        ];
        let rep = setup(&steps, &r, &sd, |_| {}).unwrap();
        assert_eq!(rep.performed.len(), 4);
        let rep = setup(&steps, &r, &sd, |_| {}).unwrap();
        assert!(rep.performed.is_empty());
        assert_eq!(rep.already, 4);
        std::fs::write(r.join("a/keep"), "user").unwrap();
        std::fs::write(r.join("a/b/data"), "user").unwrap();
        let rep = teardown(&r, &sd, |_| {}).unwrap();
        assert!(!r.join("bin").exists());
        assert!(!r.join("a/b/w").exists());
        assert_eq!(std::fs::read_to_string(r.join("a/keep")).unwrap(), "user");
        assert_eq!(std::fs::read_to_string(r.join("a/b/data")).unwrap(), "user");
        assert!(rep.notes.iter().any(|n| n.contains("changed")));
        assert!(!state_path(&sd, &r).exists());
        let rep = teardown(&r, &sd, |_| {}).unwrap();
        assert!(rep.nothing_recorded);
    }

    /// A failing step rolls back what the run made and names the step.
    #[test]
    fn failed_setup_rolls_back() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("root");
        let sd = t.path().join("state");
        let steps = vec![
            Step::Mkdir(r.join("x")),
            Step::Install {
                dst: r.join("x/f"),
                content: Content::Text("a".into()),
                mode: 0o644,
            },
            Step::Install {
                dst: r.join("x/f2"),
                content: Content::Copy(t.path().join("missing")),
                mode: 0o644,
            },
        ];
        let e = setup(&steps, &r, &sd, |_| {}).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("step 3"), "{msg}");
        assert!(msg.contains("missing"), "{msg}");
        assert!(msg.contains("rolled back the 3"), "{msg}");
        assert!(!r.exists());
        assert!(!state_path(&sd, &r).exists());
    }
}
