//! `/proc/self/mountinfo`: which mounts exist, so setup can tell what is already done.

use std::path::Path;

pub use offload_fs::mount::spec::{parse_mountinfo as parse, MountInfo as MountEntry};

/// The current mount table of this process.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `p`, if any.
pub fn top_at<'a>(table: &'a [MountEntry], p: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|e| Path::new(&e.mount_point) == p)
}

/// Number of mounts stacked at `p`.
pub fn count_at(table: &[MountEntry], p: &Path) -> usize {
    table
        .iter()
        .filter(|e| Path::new(&e.mount_point) == p)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let t = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
98 22 0:55 / /a\\040b rw shared:1 - fuse.qtfs qtfs:/var/lib/x rw,user_id=0
bad line
";
        let v = parse(t);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].mount_point, "/a b");
        assert_eq!(v[1].fstype, "fuse.qtfs");
        assert_eq!(v[1].source, "qtfs:/var/lib/x");
        assert_eq!(top_at(&v, Path::new("/proc")).map(|e| e.id), Some(22));
        assert_eq!(count_at(&v, Path::new("/nowhere")), 0);
    }
}
