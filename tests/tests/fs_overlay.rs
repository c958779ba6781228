//! Overlay whiteouts through qtfs in the default configuration: image layers unpacked on the
//! DPU through a mount carry overlayfs whiteouts (character device 0/0) and opaque directories
//! (`trusted.overlay.opaque=y`); a HOST overlay mount of those layers must honour them. Other
//! device nodes stay refused unless the HOST allows devices.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::fs::{fs_test_links, tmpdir, ExportSpec, Host, Mount};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// mknod(2); the errno on failure.
fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> Result<(), i32> {
    let dev = libc::makedev(major, minor);
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mknod(c(p).as_ptr(), mode, dev) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers for the given lengths.
    let r = unsafe {
        libc::setxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid pointers for the given lengths.
    let r = unsafe {
        libc::getxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid pointers for the given lengths.
    let r = unsafe { libc::listxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr {}", p.display());
    buf.truncate(r as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// An overlay mount on the HOST, unmounted on drop.
struct Overlay(PathBuf);

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn fs_overlay_whiteouts_and_opaque_dirs() {
    for kind in fs_test_links("fs_overlay_whiteouts_and_opaque_dirs") {
        let tmp = tmpdir();
        let exp = tmp.path().join("export");
        // The lower layer, already on the HOST: a file the upper layer deletes and a
        // directory it replaces.
        let l1 = exp.join("l1");
        std::fs::create_dir_all(l1.join("dir")).unwrap();
        std::fs::write(l1.join("gone"), b"deleted by the upper layer").unwrap();
        std::fs::write(l1.join("kept"), b"still here").unwrap();
        std::fs::write(l1.join("dir/old"), b"replaced").unwrap();
        let host = Host::start(&kind, tmp.path(), &[ExportSpec::rw(&exp)]);
        let m = Mount::new(&host, &exp, &tmp.path().join("mnt"), "");

        // The upper layer, unpacked through the mount as containerd's overlay unpack does.
        let l2 = m.path("l2");
        std::fs::create_dir_all(l2.join("dir")).unwrap();
        mknod(&l2.join("gone"), libc::S_IFCHR | 0o644, 0, 0)
            .expect("whiteout mknod c 0 0 through the mount");
        setxattr(&l2.join("dir"), "trusted.overlay.opaque", b"y")
            .expect("trusted.overlay.opaque through the mount");
        std::fs::write(l2.join("dir/new"), b"new content").unwrap();

        // Other device nodes are refused by default.
        assert_eq!(
            mknod(&m.path("null"), libc::S_IFCHR | 0o666, 1, 3),
            Err(libc::EPERM),
            "mknod c 1 3 must be refused"
        );
        assert_eq!(
            mknod(&m.path("blk"), libc::S_IFBLK | 0o600, 7, 0),
            Err(libc::EPERM)
        );
        assert!(!exp.join("null").exists() && !exp.join("blk").exists());

        // On the HOST: a real 0/0 character device and the xattr.
        let md = std::fs::symlink_metadata(exp.join("l2/gone")).unwrap();
        assert!(md.file_type().is_char_device(), "{md:?}");
        assert_eq!(md.rdev(), 0);
        assert_eq!(
            getxattr(&exp.join("l2/dir"), "trusted.overlay.opaque"),
            Ok(b"y".to_vec())
        );
        // And through the mount: the whiteout's type and the xattr read and listed back.
        let md = std::fs::symlink_metadata(l2.join("gone")).unwrap();
        assert!(md.file_type().is_char_device() && md.rdev() == 0);
        assert_eq!(
            getxattr(&l2.join("dir"), "trusted.overlay.opaque"),
            Ok(b"y".to_vec())
        );
        assert!(
            listxattr(&l2.join("dir")).contains(&"trusted.overlay.opaque".to_string()),
            "listxattr through the mount"
        );

        // A HOST overlay of both layers hides the deleted file and the old directory content.
        let merged = tmp.path().join("merged");
        std::fs::create_dir(&merged).unwrap();
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={}:{}",
                exp.join("l2").display(),
                l1.display()
            ))
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "HOST overlay mount");
        let _ov = Overlay(merged.clone());
        assert!(!merged.join("gone").exists(), "whiteout hides the file");
        assert_eq!(std::fs::read(merged.join("kept")).unwrap(), b"still here");
        let names: Vec<String> = std::fs::read_dir(merged.join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["new".to_string()],
            "opaque dir shows only the new layer"
        );
        assert_eq!(
            std::fs::read(merged.join("dir/new")).unwrap(),
            b"new content"
        );
        drop(m);
    }
}
