//! Wire protocol of the `fs` service (postcard-encoded, one request → one reply).
//!
//! The protocol is handle based: the HOST hands out opaque node ids (one per HOST inode and
//! export, with a lookup count the client releases with [`Op::Forget`]) and file handles. The
//! client never names a HOST path except once, in [`Op::Mount`], and that path is resolved beneath
//! a configured export. Every request carries the server `instance` the client believes it is
//! talking to; after a daemon restart the ids are meaningless, the server answers
//! [`STALE_INSTANCE`] and the client re-resolves its inodes by name from the mount root.
//!
//! Failures travel as `transport::RemoteError { code: errno, message }`.

use serde::{Deserialize, Serialize};

/// Protocol version carried in [`Op::Mount`]; bumped on incompatible changes.
pub const VERSION: u32 = 4;

/// `RemoteError.code` meaning "node/handle ids are from another server instance": the client
/// must mount again (get the new instance and root) and re-resolve. Far above any errno.
pub const STALE_INSTANCE: i32 = 0x5354_414c;

/// Largest read or write payload the server accepts in one request.
pub const MAX_IO: u32 = 1 << 20;

/// Server-side opaque node id.
pub type NodeId = u64;
/// Server-side opaque open-file (or open-directory) handle.
pub type Fh = u64;

/// A point in time as seconds and nanoseconds since the epoch (may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ts {
    /// Seconds since 1970-01-01 UTC.
    pub sec: i64,
    /// Nanoseconds, 0..1e9.
    pub nsec: u32,
}

/// File attributes as the HOST sees them (`struct stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Attr {
    /// HOST inode number (informational; the client assigns FUSE inode numbers).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access.
    pub atime: Ts,
    /// Last modification.
    pub mtime: Ts,
    /// Last status change.
    pub ctime: Ts,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Hard-link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// The node may carry extended attributes. `false` means it has none at all, so the DPU
    /// answers xattr probes (`ls -l` asks every file for ACLs and an SELinux label) itself
    /// until these attributes expire.
    pub xattrs: bool,
}

/// A timestamp to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    /// The server's current time.
    Now,
    /// This time.
    At(Ts),
}

/// A node the server handed out, with one lookup reference the client must eventually forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Server node id.
    pub node: NodeId,
    /// Its attributes.
    pub attr: Attr,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Name bytes (no `/`).
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Offset to resume after this entry.
    pub offset: u64,
    /// File type bits (`st_mode & S_IFMT`), 0 if unknown.
    pub kind: u32,
    /// HOST inode number from the directory.
    pub ino: u64,
    /// For readdirplus: the looked-up entry (one lookup reference), except for `.` and `..`.
    pub entry: Option<Entry>,
}

/// Filesystem statistics (`statvfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Maximum name length.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// Caller identity, used for ownership of created nodes (permission checks happen in the DPU
/// kernel with `default_permissions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Caller {
    /// Caller's fsuid.
    pub uid: u32,
    /// Caller's fsgid.
    pub gid: u32,
}

/// A request: the operation plus the server instance the ids in it belong to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Server instance the node and handle ids were issued by (ignored for [`Op::Mount`]).
    pub instance: u64,
    /// The operation.
    pub op: Op,
}

/// Every operation of the service. Names are raw bytes (single path components).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Resolve `path` (a HOST path inside an export) as the root of a mount.
    Mount {
        version: u32,
        path: String,
    },
    Lookup {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// Drop lookup references: (node, count).
    Forget {
        nodes: Vec<(NodeId, u64)>,
    },
    GetAttr {
        node: NodeId,
        fh: Option<Fh>,
    },
    SetAttr {
        node: NodeId,
        fh: Option<Fh>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    ReadLink {
        node: NodeId,
    },
    Symlink {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        caller: Caller,
    },
    Mknod {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        caller: Caller,
    },
    Mkdir {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        caller: Caller,
    },
    Unlink {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rmdir {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// `flags`: `RENAME_NOREPLACE` / `RENAME_EXCHANGE` as in renameat2(2).
    Rename {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        newparent: NodeId,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
        flags: u32,
    },
    Link {
        node: NodeId,
        newparent: NodeId,
        #[serde(with = "serde_bytes")]
        newname: Vec<u8>,
    },
    /// `flags` as open(2) (without `O_CREAT`/`O_EXCL`).
    Open {
        node: NodeId,
        flags: i32,
    },
    Create {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        flags: i32,
        caller: Caller,
    },
    Read {
        fh: Fh,
        offset: u64,
        size: u32,
    },
    Write {
        fh: Fh,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Flush {
        fh: Fh,
        lock_owner: u64,
    },
    Release {
        fh: Fh,
        lock_owner: Option<u64>,
    },
    Fsync {
        fh: Fh,
        datasync: bool,
    },
    OpenDir {
        node: NodeId,
    },
    /// Entries after `offset`, at most `max_bytes` worth of names; `plus` also looks them up.
    ReadDir {
        fh: Fh,
        offset: u64,
        max_bytes: u32,
        plus: bool,
    },
    ReleaseDir {
        fh: Fh,
    },
    FsyncDir {
        fh: Fh,
        datasync: bool,
    },
    StatFs {
        node: NodeId,
    },
    SetXattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: i32,
    },
    /// `size` 0 asks for the value's size only.
    GetXattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        size: u32,
    },
    ListXattr {
        node: NodeId,
        size: u32,
    },
    RemoveXattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// access(2) mask, checked as the caller.
    Access {
        node: NodeId,
        mask: i32,
        caller: Caller,
    },
    Fallocate {
        fh: Fh,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: Fh,
        offset: i64,
        whence: i32,
    },
    GetLk {
        fh: Fh,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
    },
    SetLk {
        fh: Fh,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
    },
    /// poll(2) events; `wait_ms` > 0 waits up to that long for one of them.
    Poll {
        fh: Fh,
        events: u32,
        wait_ms: u32,
    },
}

/// Successful replies.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Mounted {
        instance: u64,
        root: Entry,
        read_only: bool,
    },
    Entry(Entry),
    Attr(Attr),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Ok,
    /// `direct`: the node must bypass the DPU page cache (devices, pseudo files).
    Opened {
        fh: Fh,
        direct: bool,
    },
    /// `parent`: the directory's attributes right after the create (NFS's post-op
    /// attributes): the DPU answers the kernel's re-read of the parent without a round trip.
    Created {
        entry: Entry,
        fh: Fh,
        direct: bool,
        parent: Attr,
    },
    Written(u32),
    Dir(Vec<DirEntry>),
    StatFs(StatFs),
    /// getxattr/listxattr with size 0.
    Size(u32),
    Offset(i64),
    Lock {
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
    },
    Poll(u32),
    /// A node made by mkdir, mknod, symlink or link, with the directory's attributes right
    /// after the operation (see `Created`).
    Made {
        entry: Entry,
        parent: Attr,
    },
}

/// Encoding or decoding failed (a peer bug or version mismatch, never a panic).
#[derive(Debug, thiserror::Error)]
#[error("fs protocol: {0}")]
pub struct ProtoError(#[from] postcard::Error);

/// Serializes a message.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    Ok(postcard::to_allocvec(msg)?)
}

/// Index of `Op::Write` among `Op`'s variants (checked by a test against the derived encoding).
const OP_WRITE: u32 = 16;

/// Encodes `Request { instance, op: Op::Write { fh, offset, data } }` straight from a borrowed
/// buffer: the bytes of [`encode`] without first copying `data` into an owned `Op`.
pub fn encode_write(
    instance: u64,
    fh: Fh,
    offset: u64,
    data: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    struct WriteRef<'a>(Fh, u64, &'a [u8]);
    impl Serialize for WriteRef<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeStructVariant;
            let mut v = s.serialize_struct_variant("Op", OP_WRITE, "Write", 3)?;
            v.serialize_field("fh", &self.0)?;
            v.serialize_field("offset", &self.1)?;
            v.serialize_field("data", serde_bytes::Bytes::new(self.2))?;
            v.end()
        }
    }
    #[derive(Serialize)]
    struct RequestRef<'a> {
        instance: u64,
        op: WriteRef<'a>,
    }
    encode(&RequestRef {
        instance,
        op: WriteRef(fh, offset, data),
    })
}

/// The fields of an encoded write request (`instance, fh, offset, data`), borrowing the data:
/// the HOST writes it from the received frame without first copying it into an `Op`.
pub fn decode_write(bytes: &[u8]) -> Option<(u64, Fh, u64, &[u8])> {
    let (instance, rest) = postcard::take_from_bytes::<u64>(bytes).ok()?;
    let (variant, rest) = postcard::take_from_bytes::<u32>(rest).ok()?;
    if variant != OP_WRITE {
        return None;
    }
    let (fh, rest) = postcard::take_from_bytes::<Fh>(rest).ok()?;
    let (offset, rest) = postcard::take_from_bytes::<u64>(rest).ok()?;
    let (data, rest) = postcard::take_from_bytes::<&[u8]>(rest).ok()?;
    rest.is_empty().then_some((instance, fh, offset, data))
}

/// Index of `Reply::Data` among `Reply`'s variants (checked by a test).
const REPLY_DATA: u32 = 3;

/// Room [`data_reply`] needs in front of the data: the variant and length varints.
pub const DATA_HEADROOM: usize = 6;

/// Turns `buf` — [`DATA_HEADROOM`] spare bytes followed by the data — into an encoded
/// `Reply::Data` without moving the data (the HOST reads file data straight into `buf`).
pub fn data_reply(mut buf: Vec<u8>) -> Result<bytes::Bytes, ProtoError> {
    let n = buf.len().saturating_sub(DATA_HEADROOM) as u64;
    let mut head = [0u8; DATA_HEADROOM];
    let h = postcard::to_slice(&(REPLY_DATA, n), &mut head)?.len();
    let start = DATA_HEADROOM - h;
    buf[start..DATA_HEADROOM].copy_from_slice(&head[..h]);
    Ok(bytes::Bytes::from(buf).slice(start..))
}

/// The data of an encoded `Reply::Data`, borrowed from the reply (`None`: another reply).
pub fn decode_data(bytes: &[u8]) -> Option<&[u8]> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(bytes).ok()?;
    if variant != REPLY_DATA {
        return None;
    }
    let (data, rest) = postcard::take_from_bytes::<&[u8]>(rest).ok()?;
    rest.is_empty().then_some(data)
}

/// Names of [`Op`]'s variants in declaration order (their wire index), as metrics label them.
const OP_NAMES: [&str; 35] = [
    "mount",
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "symlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "link",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "fallocate",
    "lseek",
    "getlk",
    "setlk",
    "poll",
];

/// The operation an encoded [`Request`] asks for, read from its first two varints without
/// decoding the rest (`"invalid"` for bytes that name none): the fs server's metrics hook.
pub fn op_name(req: &[u8]) -> &'static str {
    postcard::take_from_bytes::<u64>(req)
        .and_then(|(_, rest)| postcard::take_from_bytes::<u32>(rest))
        .ok()
        .and_then(|(v, _)| OP_NAMES.get(v as usize).copied())
        .unwrap_or("invalid")
}

#[cfg(test)]
mod op_name_tests {
    use super::*;

    /// Every index decodes (fields zeroed) to the variant of that name; one past the end is no
    /// variant: the table follows `Op` exactly.
    #[test]
    fn op_names_follow_the_enum() {
        for (i, name) in OP_NAMES.iter().enumerate() {
            let mut bytes = vec![3u8, i as u8];
            bytes.resize(64, 0);
            let (req, _) = postcard::take_from_bytes::<Request>(&bytes).unwrap();
            let dbg = format!("{:?}", req.op).to_lowercase();
            let variant: String = dbg.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert_eq!(&variant, name, "variant {i}");
            assert_eq!(op_name(&bytes), *name);
        }
        let mut past = vec![3u8, OP_NAMES.len() as u8];
        past.resize(64, 0);
        assert!(postcard::take_from_bytes::<Request>(&past).is_err());
        assert_eq!(op_name(&past), "invalid");
        assert_eq!(op_name(&[]), "invalid");
    }
}

/// Deserializes a message.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProtoError> {
    Ok(postcard::from_bytes(bytes)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn borrowed_write_encoding_matches_the_derived_one() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let owned = encode(&Request {
            instance: 7,
            op: Op::Write {
                fh: 300,
                offset: 1 << 40,
                data: data.clone(),
            },
        })
        .unwrap();
        assert_eq!(encode_write(7, 300, 1 << 40, &data).unwrap(), owned);
        assert_eq!(
            decode_write(&owned),
            Some((7, 300, 1 << 40, data.as_slice()))
        );
        let other = encode(&Request {
            instance: 7,
            op: Op::Flush {
                fh: 1,
                lock_owner: 2,
            },
        })
        .unwrap();
        assert_eq!(decode_write(&other), None);
        for len in [0usize, 5, 200, 70_000, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut buf = vec![0u8; DATA_HEADROOM];
            buf.extend_from_slice(&data);
            let fast = data_reply(buf).unwrap();
            assert_eq!(&fast[..], &encode(&Reply::Data(data.clone())).unwrap()[..]);
            assert_eq!(decode_data(&fast), Some(data.as_slice()));
        }
        assert_eq!(decode_data(&encode(&Reply::Ok).unwrap()), None);
        assert_eq!(decode_write(&owned[..owned.len() - 1]), None);
    }

    use super::*;

    #[test]
    fn roundtrip() {
        let req = Request {
            instance: 7,
            op: Op::Rename {
                parent: 1,
                name: b"a".to_vec(),
                newparent: 2,
                newname: b"b".to_vec(),
                flags: 1,
            },
        };
        let back: Request = decode(&encode(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        let rep = Reply::Dir(vec![DirEntry {
            name: b"x".to_vec(),
            offset: 3,
            kind: 0o100000,
            ino: 9,
            entry: Some(Entry {
                node: 4,
                attr: Attr {
                    size: 10,
                    ..Default::default()
                },
            }),
        }]);
        let back: Reply = decode(&encode(&rep).unwrap()).unwrap();
        assert_eq!(back, rep);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode::<Request>(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
