//! `/proc/self/mountinfo`: which mounts exist, so setup can tell what is already done.

use std::path::{Path, PathBuf};

/// One mountinfo line (the fields this tool needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// Mount point.
    pub mount_point: PathBuf,
    /// Filesystem type (`fuse.qtfs`, `proc`, ...).
    pub fstype: String,
    /// Mount source (`qtfs:/proc`, ...).
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let g: Vec<&str> = post.split(' ').collect();
            if f.len() < 5 || g.len() < 2 {
                return None;
            }
            Some(MountEntry {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                mount_point: PathBuf::from(unescape(f[4])),
                fstype: g[0].to_string(),
                source: unescape(g[1]),
            })
        })
        .collect()
}

/// The current mount table of this process.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `p`, if any.
pub fn top_at<'a>(table: &'a [MountEntry], p: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|e| e.mount_point == p)
}

/// Number of mounts stacked at `p`.
pub fn count_at(table: &[MountEntry], p: &Path) -> usize {
    table.iter().filter(|e| e.mount_point == p).count()
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
        assert_eq!(v[1].mount_point, PathBuf::from("/a b"));
        assert_eq!(v[1].fstype, "fuse.qtfs");
        assert_eq!(v[1].source, "qtfs:/var/lib/x");
        assert_eq!(v[1].parent, 22);
        assert_eq!(top_at(&v, Path::new("/proc")).map(|e| e.id), Some(22));
        assert_eq!(count_at(&v, Path::new("/nowhere")), 0);
        assert_eq!(unescape("x\\134y\\"), "x\\y\\");
    }
}
