//! mount-probe: one raw mount(2) or umount2(2) call, for the mount-forwarding tests (no
//! libmount in between: the exact arguments reach the kernel, the exact errno comes back).
//!
//! `mount-probe mount SRC TARGET FSTYPE FLAGS DATA` (`-` for a null SRC/FSTYPE/DATA, FLAGS a
//! number) and `mount-probe umount TARGET FLAGS` print `ok` or `errno=N` and exit 0; bad usage
//! exits 2.

use std::ffi::CString;

fn arg(s: &str) -> Option<CString> {
    (s != "-").then(|| CString::new(s).expect("no NUL in arguments"))
}

fn ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let rc = match a.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["mount", src, target, fstype, flags, data] => {
            let (src, target, fstype, data) = (arg(src), arg(target), arg(fstype), arg(data));
            let flags: libc::c_ulong = flags.parse().expect("FLAGS is a number");
            // SAFETY: valid C strings or null.
            unsafe {
                libc::mount(
                    ptr(&src),
                    ptr(&target),
                    ptr(&fstype),
                    flags,
                    ptr(&data) as *const libc::c_void,
                )
            }
        }
        ["umount", target, flags] => {
            let target = arg(target);
            let flags: i32 = flags.parse().expect("FLAGS is a number");
            // SAFETY: valid C string.
            unsafe { libc::umount2(ptr(&target), flags) }
        }
        _ => {
            eprintln!(
                "usage: mount-probe mount SRC TARGET FSTYPE FLAGS DATA | umount TARGET FLAGS"
            );
            std::process::exit(2);
        }
    };
    if rc == 0 {
        println!("ok");
    } else {
        println!(
            "errno={}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        );
    }
}
