//! Wire protocol of the `fs` service: one request → one reply, each operation declared once.
//!
//! The protocol is handle based: the HOST hands out opaque node ids (one per HOST inode and
//! export, with a lookup count the client releases with [`op::Forget`]) and file handles. The
//! client never names a HOST path except once, in [`op::Mount`], and that path is resolved
//! beneath a configured export. Every request carries the server `instance` the client believes
//! it is talking to; after a daemon restart the ids are meaningless, the server answers
//! [`Status::StaleInstance`] and the client re-resolves its inodes by name from the mount root.
//!
//! # Operations
//! [`fs_ops!`](self) below is the one table of operations: code, argument struct, reply type
//! and whether a raw payload travels with the request (`[data_in]`: write's data) or the reply
//! (`[data_out]`: read's data). From it come [`OpCode`], the argument structs in [`op`] (each
//! an [`Operation`] fixing its reply type), the HOST-side trait [`HostFs`] (one method per
//! operation with exactly those types), the server's dispatch (`server::dispatch`) and the
//! client's typed calls. Adding an operation is one line here plus its [`HostFs`] method.
//!
//! # Envelope
//! - request: op code (1 byte), instance (varint), postcard arguments (length-prefixed), then
//!   the raw payload to the end of the message;
//! - reply: [`Status`], then on success the postcard result (length-prefixed) and the raw
//!   payload to the end.
//!
//! # Client-chosen ids (asynchronous directory operations)
//! [`op::Create`], [`op::Mkdir`] and [`op::Symlink`] may carry an `alias`: an id with
//! [`ALIAS_BIT`] set that the client chose for the new node (and, for create, its open
//! handle). The HOST maps it to the node and handle it made, per session, and every later
//! request of that session may name the alias in place of the HOST's id: the client answers
//! the kernel before the HOST's reply and sends the requests that follow in order behind the
//! create. If the operation failed, the alias stands for its errno (every request naming it
//! fails with it). A [`op::Forget`] of the alias (or [`op::Release`] of a handle alias) ends
//! the mapping; the end of the session drops all of them. An alias unknown to the session
//! (after a reconnect) is ESTALE, and the client re-resolves by name as after a restart.
//!
//! Bulk data is never postcard-encoded: the HOST writes a request's payload from the received
//! frame and reads file data straight into the reply's buffer behind a small reserved head
//! ([`OutData`]); the DPU resends a write from its kept `(arguments, payload)`.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Protocol version carried in [`op::Mount`]; bumped on incompatible changes.
pub const VERSION: u32 = 7;

/// Node and handle ids with this bit set are chosen by the client, not the HOST: an
/// asynchronous create, mkdir or symlink names the new node (and handle) with an id of its own
/// so later requests can name it before the HOST has answered (see "Client-chosen ids" in the
/// module docs). The HOST never issues such ids itself.
pub const ALIAS_BIT: u64 = 1 << 63;

/// Largest read or write payload the server accepts in one request.
pub const MAX_IO: u32 = 1 << 20;

/// Server-side opaque node id.
pub type NodeId = u64;
/// Server-side opaque open-file (or open-directory) handle.
pub type Fh = u64;
/// A failed operation's errno (positive).
pub type Errno = i32;
/// An operation's outcome on the HOST.
pub type FsResult<T> = Result<T, Errno>;

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

/// A mount the server accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    /// The server instance every later request names.
    pub instance: u64,
    /// The mount's root (one lookup reference).
    pub root: Entry,
    /// The export is read-only.
    pub read_only: bool,
}

/// Why the server refused a mount (shown to the user of `mount`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The errno the refusal stands for.
    pub errno: Errno,
    /// The server's explanation.
    pub message: String,
}

/// What an append did: the bytes written and where the file ends after them (the `end` of a
/// resend of the next append through the same handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Bytes written.
    pub written: u32,
    /// The file's size right after the append.
    pub end: u64,
}

/// An opened file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// The server handle.
    pub fh: Fh,
    /// The node must bypass the DPU page cache (devices, pseudo files).
    pub direct: bool,
}

/// A node made by mkdir, mknod, symlink or link, with the directory's attributes right after
/// the operation (NFS's post-op attributes): the DPU answers the kernel's re-read of the parent
/// without a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    /// The new node (one lookup reference).
    pub entry: Entry,
    /// The directory's attributes after the operation.
    pub parent: Attr,
}

/// A file made and opened by create, with the directory's attributes after it (see [`Made`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The new node (one lookup reference).
    pub entry: Entry,
    /// Its open handle.
    pub opened: Opened,
    /// The directory's attributes after the operation.
    pub parent: Attr,
}

/// A conflicting lock (getlk), or the probe itself when there is none (`typ` `F_UNLCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    /// The holder's pid.
    pub pid: u32,
}

/// The outcome of a request, first in every reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Done; the result and the payload follow.
    Ok,
    /// Failed with this errno.
    Errno(Errno),
    /// The node and handle ids are from another server instance: the client must mount again
    /// (get the new instance and root) and re-resolve.
    StaleInstance,
}

/// An operation of the table: its arguments are `Self`, its result `Reply`.
pub trait Operation: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static {
    /// The operation's code on the wire.
    const CODE: OpCode;
    /// The result type of a successful reply.
    type Reply: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static;
}

/// An operation whose request carries a raw payload (write's data).
pub trait DataIn: Operation {}

/// An operation whose reply carries a raw payload (read's data, a link target, xattrs).
pub trait DataOut: Operation {}

/// Declares the operation table; see the module docs. Each line:
/// `code => Name / method { fields } -> ReplyType [data_in|data_out];`.
macro_rules! fs_ops {
    ($(
        $(#[$doc:meta])*
        $code:literal => $name:ident / $method:ident { $($fields:tt)* } -> $reply:ty $([$pl:ident])? ;
    )*) => {
        /// Operation codes (the first byte of every request).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum OpCode {
            $( $(#[$doc])* $name = $code, )*
        }

        impl OpCode {
            /// Every operation, in code order.
            pub const ALL: &'static [OpCode] = &[$(OpCode::$name),*];

            /// The operation with this code, if any.
            pub fn from_u8(b: u8) -> Option<OpCode> {
                match b {
                    $( $code => Some(OpCode::$name), )*
                    _ => None,
                }
            }

            /// The operation's name (for logs).
            pub fn name(self) -> &'static str {
                match self {
                    $( OpCode::$name => stringify!($name), )*
                }
            }

            /// The operation's name in snake case (its `HostFs` method): the metrics label.
            pub fn label(self) -> &'static str {
                match self {
                    $( OpCode::$name => stringify!($method), )*
                }
            }
        }

        /// The argument structs of every operation (names are raw bytes: single components).
        pub mod op {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$doc])*
                #[allow(missing_docs)]
                #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
                pub struct $name { $($fields)* }

                impl Operation for $name {
                    const CODE: OpCode = OpCode::$name;
                    type Reply = $reply;
                }
                $( fs_ops!(@marker $pl $name); )?
            )*
        }

        /// The HOST side of the protocol: one method per operation with exactly its argument,
        /// payload and result types. The passthrough ([`crate::server::FsService`]) implements
        /// it over HOST directories; tests implement it in memory. Server instance checks and
        /// the envelope are done by the dispatch, not here.
        pub trait HostFs: Send + Sync + 'static {
            /// The server instance ids are issued under (answers `StaleInstance` otherwise).
            fn instance(&self) -> u64;
            $( fs_ops!(@method $(#[$doc])* $method $name $reply $(, $pl)?); )*
        }

        /// Runs one decoded request against `fs`: decodes the arguments of `code`, calls its
        /// method and encodes the reply.
        pub(crate) async fn call_op<H: HostFs>(
            fs: &H,
            code: OpCode,
            args: &[u8],
            payload: &[u8],
        ) -> Result<Result<Bytes, Errno>, ProtoError> {
            match code {
                $( OpCode::$name => fs_ops!(@call fs $method $name args payload $(, $pl)?), )*
            }
        }
    };

    (@marker data_in $name:ident) => { impl DataIn for $name {} };
    (@marker data_out $name:ident) => { impl DataOut for $name {} };

    (@method $(#[$doc:meta])* $method:ident $name:ident $reply:ty) => {
        $(#[$doc])*
        fn $method(&self, args: op::$name)
            -> impl std::future::Future<Output = FsResult<$reply>> + Send;
    };
    (@method $(#[$doc:meta])* $method:ident $name:ident $reply:ty, data_in) => {
        $(#[$doc])*
        fn $method(&self, args: op::$name, data: &[u8])
            -> impl std::future::Future<Output = FsResult<$reply>> + Send;
    };
    (@method $(#[$doc:meta])* $method:ident $name:ident $reply:ty, data_out) => {
        $(#[$doc])*
        fn $method(&self, args: op::$name)
            -> impl std::future::Future<Output = FsResult<($reply, OutData)>> + Send;
    };

    (@call $fs:ident $method:ident $name:ident $args:ident $payload:ident) => {{
        let a: op::$name = decode_args($args, $payload)?;
        Ok(match $fs.$method(a).await {
            Ok(r) => Ok(encode_ok(&r, OutData::none())?),
            Err(e) => Err(e),
        })
    }};
    (@call $fs:ident $method:ident $name:ident $args:ident $payload:ident, data_in) => {{
        let a: op::$name = decode($args)?;
        Ok(match $fs.$method(a, $payload).await {
            Ok(r) => Ok(encode_ok(&r, OutData::none())?),
            Err(e) => Err(e),
        })
    }};
    (@call $fs:ident $method:ident $name:ident $args:ident $payload:ident, data_out) => {{
        let a: op::$name = decode_args($args, $payload)?;
        Ok(match $fs.$method(a).await {
            Ok((r, data)) => Ok(encode_ok(&r, data)?),
            Err(e) => Err(e),
        })
    }};
}

fs_ops! {
    /// Resolve `path` (a HOST path inside an export) as the root of a mount.
    0 => Mount / mount { pub version: u32, pub path: String } -> Result<Mounted, Refusal>;
    /// Look `name` up in directory `parent` (one lookup reference).
    1 => Lookup / lookup {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
    } -> Entry;
    /// Drop lookup references: (node, count).
    2 => Forget / forget { pub nodes: Vec<(NodeId, u64)> } -> ();
    /// A node's attributes (through the open handle `fh` when given).
    3 => GetAttr / getattr { pub node: NodeId, pub fh: Option<Fh> } -> Attr;
    /// Change a node's attributes; the attributes after.
    4 => SetAttr / setattr {
        pub node: NodeId,
        pub fh: Option<Fh>,
        pub mode: Option<u32>,
        pub uid: Option<u32>,
        pub gid: Option<u32>,
        pub size: Option<u64>,
        pub atime: Option<SetTime>,
        pub mtime: Option<SetTime>,
    } -> Attr;
    /// A symlink's target (the payload).
    5 => ReadLink / readlink { pub node: NodeId } -> () [data_out];
    /// Make a symlink (`alias`: a client-chosen id for it, see the module docs).
    6 => Symlink / symlink {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        #[serde(with = "serde_bytes")] pub target: Vec<u8>,
        pub caller: Caller,
        pub alias: Option<NodeId>,
    } -> Made;
    /// Make a device node, FIFO or socket.
    7 => Mknod / mknod {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        pub mode: u32,
        pub rdev: u64,
        pub caller: Caller,
    } -> Made;
    /// Make a directory (`alias`: a client-chosen id for it, see the module docs).
    8 => Mkdir / mkdir {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        pub mode: u32,
        pub caller: Caller,
        pub alias: Option<NodeId>,
    } -> Made;
    /// Remove a non-directory.
    9 => Unlink / unlink {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
    } -> ();
    /// Remove an empty directory.
    10 => Rmdir / rmdir {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
    } -> ();
    /// Rename; `flags`: `RENAME_NOREPLACE` / `RENAME_EXCHANGE` as in renameat2(2).
    11 => Rename / rename {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        pub newparent: NodeId,
        #[serde(with = "serde_bytes")] pub newname: Vec<u8>,
        pub flags: u32,
    } -> ();
    /// Make a hard link.
    12 => Link / link {
        pub node: NodeId,
        pub newparent: NodeId,
        #[serde(with = "serde_bytes")] pub newname: Vec<u8>,
    } -> Made;
    /// Open a node; `flags` as open(2) (without `O_CREAT`/`O_EXCL`).
    13 => Open / open { pub node: NodeId, pub flags: i32 } -> Opened;
    /// Create and open a regular file (`alias`: client-chosen ids for the node and the
    /// handle, see the module docs).
    14 => Create / create {
        pub parent: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        pub mode: u32,
        pub flags: i32,
        pub caller: Caller,
        pub alias: Option<(NodeId, Fh)>,
    } -> Created;
    /// Read up to `size` bytes at `offset` (the payload).
    15 => Read / read { pub fh: Fh, pub offset: u64, pub size: u32 } -> () [data_out];
    /// Write the payload at `offset`; the bytes written.
    16 => Write / write { pub fh: Fh, pub offset: u64 } -> u32 [data_in];
    /// close(2) of one descriptor of an open file.
    17 => Flush / flush { pub fh: Fh, pub lock_owner: u64 } -> ();
    /// The last close of an open file.
    18 => Release / release { pub fh: Fh, pub lock_owner: Option<u64> } -> ();
    /// fsync(2) / fdatasync(2).
    19 => Fsync / fsync { pub fh: Fh, pub datasync: bool } -> ();
    /// Open a directory for listing.
    20 => OpenDir / opendir { pub node: NodeId } -> Opened;
    /// Entries after `offset`, at most `max_bytes` worth of names; `plus` also looks them up.
    21 => ReadDir / readdir {
        pub fh: Fh,
        pub offset: u64,
        pub max_bytes: u32,
        pub plus: bool,
    } -> Vec<DirEntry>;
    /// Close a directory handle.
    22 => ReleaseDir / releasedir { pub fh: Fh } -> ();
    /// fsync(2) of a directory.
    23 => FsyncDir / fsyncdir { pub fh: Fh, pub datasync: bool } -> ();
    /// statvfs(2) of the filesystem holding `node`.
    24 => StatFs / statfs { pub node: NodeId } -> crate::proto::StatFs;
    /// Set an extended attribute.
    25 => SetXattr / setxattr {
        pub node: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        #[serde(with = "serde_bytes")] pub value: Vec<u8>,
        pub flags: i32,
    } -> ();
    /// An extended attribute: its size, and with `size` > 0 its value (the payload).
    26 => GetXattr / getxattr {
        pub node: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
        pub size: u32,
    } -> u32 [data_out];
    /// The names of the extended attributes: their size, and with `size` > 0 the list.
    27 => ListXattr / listxattr { pub node: NodeId, pub size: u32 } -> u32 [data_out];
    /// Remove an extended attribute.
    28 => RemoveXattr / removexattr {
        pub node: NodeId,
        #[serde(with = "serde_bytes")] pub name: Vec<u8>,
    } -> ();
    /// access(2) mask, checked as the caller.
    29 => Access / access { pub node: NodeId, pub mask: i32, pub caller: Caller } -> ();
    /// fallocate(2).
    30 => Fallocate / fallocate { pub fh: Fh, pub offset: u64, pub length: u64, pub mode: i32 } -> ();
    /// lseek(2) (`SEEK_DATA`/`SEEK_HOLE`); the new offset.
    31 => Lseek / lseek { pub fh: Fh, pub offset: i64, pub whence: i32 } -> i64;
    /// Test for a conflicting POSIX lock.
    32 => GetLk / getlk {
        pub fh: Fh,
        pub owner: u64,
        pub start: u64,
        pub end: u64,
        pub typ: i32,
        pub pid: u32,
    } -> Lock;
    /// Take or release a POSIX lock (`sleep`: wait for it).
    33 => SetLk / setlk {
        pub fh: Fh,
        pub owner: u64,
        pub start: u64,
        pub end: u64,
        pub typ: i32,
        pub pid: u32,
        pub sleep: bool,
    } -> ();
    /// poll(2) events ready; `wait_ms` > 0 waits up to that long for one of them.
    34 => Poll / poll { pub fh: Fh, pub events: u32, pub wait_ms: u32 } -> u32;
    /// Append the payload to a file opened with `O_APPEND`. `end`, on a resend after a lost
    /// session only: where the file ended before the first attempt. A file that already holds
    /// exactly this payload at `end` and ends right after it got the first attempt, and is
    /// left alone: an append is not idempotent, and a HOST that died between doing it and
    /// answering must not get it twice.
    35 => Append / append { pub fh: Fh, pub end: Option<u64> } -> crate::proto::Appended [data_in];
}

/// Encoding or decoding failed (a peer bug or version mismatch, never a panic).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// postcard could not encode or decode a part.
    #[error("fs protocol: {0}")]
    Postcard(#[from] postcard::Error),
    /// The request names no known operation.
    #[error("fs protocol: unknown operation code {0}")]
    UnknownOp(u8),
    /// The message is empty or has bytes where none belong.
    #[error("fs protocol: malformed message")]
    Malformed,
}

/// Serializes a value with postcard.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    Ok(postcard::to_allocvec(msg)?)
}

/// Deserializes a whole postcard value (trailing bytes are an error).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProtoError> {
    let (v, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed);
    }
    Ok(v)
}

/// Arguments of an operation that takes no payload (a payload is malformed).
fn decode_args<T: DeserializeOwned>(args: &[u8], payload: &[u8]) -> Result<T, ProtoError> {
    if !payload.is_empty() {
        return Err(ProtoError::Malformed);
    }
    decode(args)
}

/// The encoded arguments of one request, kept to send (and send again) with its payload:
/// write-behind resends `(args, payload)` as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedArgs {
    code: OpCode,
    args: Vec<u8>,
}

impl EncodedArgs {
    /// Encodes the arguments of `op`.
    pub fn new<O: Operation>(op: &O) -> Result<EncodedArgs, ProtoError> {
        Ok(EncodedArgs {
            code: O::CODE,
            args: encode(op)?,
        })
    }

    /// The operation.
    pub fn code(&self) -> OpCode {
        self.code
    }

    /// The request for server `instance` with `payload` appended.
    pub fn request(&self, instance: u64, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::with_capacity(1 + 10 + 5 + self.args.len() + payload.len());
        out.push(self.code as u8);
        let mut out = postcard::to_extend(&(instance, serde_bytes::Bytes::new(&self.args)), out)?;
        out.extend_from_slice(payload);
        Ok(out)
    }
}

/// Encodes a request: `op` for server `instance`, with `payload` (empty unless [`DataIn`]).
pub fn encode_request<O: Operation>(
    instance: u64,
    op: &O,
    payload: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    EncodedArgs::new(op)?.request(instance, payload)
}

/// A received request, borrowing its parts from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRef<'a> {
    /// The operation.
    pub code: OpCode,
    /// The server instance the ids in it belong to (ignored for [`op::Mount`]).
    pub instance: u64,
    /// Its postcard-encoded arguments.
    pub args: &'a [u8],
    /// The raw payload.
    pub payload: &'a [u8],
}

/// Splits an encoded request into its parts (the arguments are decoded by the dispatch).
pub fn parse_request(bytes: &[u8]) -> Result<RequestRef<'_>, ProtoError> {
    let (&code, rest) = bytes.split_first().ok_or(ProtoError::Malformed)?;
    let code = OpCode::from_u8(code).ok_or(ProtoError::UnknownOp(code))?;
    let ((instance, args), payload) = postcard::take_from_bytes::<(u64, &[u8])>(rest)?;
    Ok(RequestRef {
        code,
        instance,
        args,
        payload,
    })
}

/// Head room [`OutData`] keeps in front of the data for the reply's status and result.
pub const REPLY_HEADROOM: usize = 24;

/// A reply payload built in place: [`REPLY_HEADROOM`] spare bytes, then the data. The HOST
/// reads file data straight into it and the reply's head is written in front, so the data is
/// never moved.
#[derive(Debug, Default)]
pub struct OutData {
    buf: Vec<u8>,
}

impl OutData {
    /// No payload.
    pub fn none() -> OutData {
        OutData { buf: Vec::new() }
    }

    /// An empty payload with room for `capacity` bytes of data.
    pub fn with_capacity(capacity: usize) -> OutData {
        let mut buf = Vec::with_capacity(REPLY_HEADROOM + capacity);
        buf.resize(REPLY_HEADROOM, 0);
        OutData { buf }
    }

    /// A payload holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> OutData {
        let mut d = OutData::with_capacity(data.len());
        d.buf.extend_from_slice(data);
        d
    }

    /// The buffer to append data to (its first [`REPLY_HEADROOM`] bytes are reserved).
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        if self.buf.len() < REPLY_HEADROOM {
            self.buf.resize(REPLY_HEADROOM, 0);
        }
        &mut self.buf
    }

    /// The data.
    pub fn data(&self) -> &[u8] {
        self.buf.get(REPLY_HEADROOM..).unwrap_or_default()
    }
}

/// Encodes a successful reply: status, `result`, then the payload (moved, not copied, when
/// the head fits the reserved room).
pub fn encode_ok<T: Serialize>(result: &T, data: OutData) -> Result<Bytes, ProtoError> {
    let result = encode(result)?;
    let mut head = [0u8; REPLY_HEADROOM];
    let h = match postcard::to_slice(&(Status::Ok, serde_bytes::Bytes::new(&result)), &mut head) {
        Ok(h) => h.len(),
        // A result too big for the head room (directory listings): build the reply anew.
        Err(_) => {
            let mut out = encode(&(Status::Ok, serde_bytes::Bytes::new(&result)))?;
            out.extend_from_slice(data.data());
            return Ok(Bytes::from(out));
        }
    };
    if data.buf.len() < REPLY_HEADROOM {
        return Ok(Bytes::copy_from_slice(&head[..h]));
    }
    let mut buf = data.buf;
    let start = REPLY_HEADROOM - h;
    buf[start..REPLY_HEADROOM].copy_from_slice(&head[..h]);
    Ok(Bytes::from(buf).slice(start..))
}

/// Encodes a failed reply.
pub fn encode_status(status: Status) -> Result<Bytes, ProtoError> {
    Ok(Bytes::from(encode(&status)?))
}

/// A decoded reply: the result and the payload (a slice of the received frame) on success,
/// else the failure status.
pub fn decode_reply<T: DeserializeOwned>(
    reply: &Bytes,
) -> Result<Result<(T, Bytes), Status>, ProtoError> {
    let (status, rest) = postcard::take_from_bytes::<Status>(reply)?;
    if status != Status::Ok {
        if !rest.is_empty() {
            return Err(ProtoError::Malformed);
        }
        return Ok(Err(status));
    }
    let (result, payload) = postcard::take_from_bytes::<&[u8]>(rest)?;
    let value = decode::<T>(result)?;
    let at = reply.len() - payload.len();
    Ok(Ok((value, reply.slice(at..))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_back_to_its_operation() {
        for (i, &c) in OpCode::ALL.iter().enumerate() {
            assert_eq!(c as u8 as usize, i, "codes are dense and in order");
            assert_eq!(OpCode::from_u8(c as u8), Some(c));
        }
        assert_eq!(OpCode::from_u8(OpCode::ALL.len() as u8), None);
        assert_eq!(<op::Write as Operation>::CODE, OpCode::Write);
        assert_eq!(OpCode::Read.name(), "Read");
    }

    #[test]
    fn request_roundtrip_keeps_args_and_payload_apart() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let w = op::Write {
            fh: 300,
            offset: 1 << 40,
        };
        let enc = encode_request(7, &w, &data).unwrap();
        let r = parse_request(&enc).unwrap();
        assert_eq!((r.code, r.instance), (OpCode::Write, 7));
        assert_eq!(decode::<op::Write>(r.args).unwrap(), w);
        assert_eq!(r.payload, &data[..]);
        // Kept arguments resend the same bytes without decoding anything.
        let kept = EncodedArgs::new(&w).unwrap();
        assert_eq!(kept.request(7, &data).unwrap(), enc);
        let rn = op::Rename {
            parent: 1,
            name: b"a".to_vec(),
            newparent: 2,
            newname: b"b".to_vec(),
            flags: 1,
        };
        let enc = encode_request(9, &rn, &[]).unwrap();
        let r = parse_request(&enc).unwrap();
        assert_eq!(decode::<op::Rename>(r.args).unwrap(), rn);
        assert!(r.payload.is_empty());
    }

    #[test]
    fn in_place_replies_match_the_plain_encoding() {
        for len in [0usize, 5, 200, 70_000, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut out = OutData::with_capacity(len);
            out.buf_mut().extend_from_slice(&data);
            let fast = encode_ok(&(len as u32), out).unwrap();
            let mut plain = encode(&(
                Status::Ok,
                serde_bytes::Bytes::new(&encode(&(len as u32)).unwrap()),
            ))
            .unwrap();
            plain.extend_from_slice(&data);
            assert_eq!(&fast[..], &plain[..]);
            let (n, payload) = decode_reply::<u32>(&fast).unwrap().unwrap();
            assert_eq!((n as usize, &payload[..]), (len, &data[..]));
        }
        // A result bigger than the head room still encodes, payload after it.
        let listing = vec![
            DirEntry {
                name: b"x".to_vec(),
                offset: 3,
                kind: 0o100000,
                ino: 9,
                entry: None,
            };
            10
        ];
        let r = encode_ok(&listing, OutData::from_slice(b"tail")).unwrap();
        let (back, tail) = decode_reply::<Vec<DirEntry>>(&r).unwrap().unwrap();
        assert_eq!((back, &tail[..]), (listing, &b"tail"[..]));
    }

    #[test]
    fn failures_are_typed_statuses() {
        for s in [Status::Errno(libc::ENOENT), Status::StaleInstance] {
            let b = encode_status(s).unwrap();
            assert_eq!(decode_reply::<()>(&b).unwrap(), Err(s));
        }
        let mut bad = encode_status(Status::StaleInstance).unwrap().to_vec();
        bad.push(0);
        assert!(decode_reply::<()>(&Bytes::from(bad)).is_err());
    }

    /// The fuzz seeds (fuzz/seeds.py writes them by hand) are valid messages of this protocol.
    #[test]
    fn fuzz_seeds_are_valid_messages() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let seeds = |target: &str| -> Vec<Vec<u8>> {
            let mut v: Vec<_> = std::fs::read_dir(corpus.join(target))
                .unwrap()
                .map(|e| std::fs::read(e.unwrap().path()).unwrap())
                .collect();
            v.sort();
            v
        };
        let requests = seeds("fs_request");
        assert!(requests.len() >= 7);
        for r in &requests {
            let req = parse_request(r).unwrap();
            let ok = match req.code {
                OpCode::Mount => decode::<op::Mount>(req.args)
                    .map(|m| m.version == VERSION)
                    .ok(),
                OpCode::Write => decode::<op::Write>(req.args)
                    .map(|_| !req.payload.is_empty())
                    .ok(),
                OpCode::Read => decode::<op::Read>(req.args).map(|_| true).ok(),
                OpCode::Lookup => decode::<op::Lookup>(req.args).map(|_| true).ok(),
                OpCode::Create => decode::<op::Create>(req.args).map(|_| true).ok(),
                OpCode::Rename => decode::<op::Rename>(req.args).map(|_| true).ok(),
                OpCode::Forget => decode::<op::Forget>(req.args)
                    .map(|f| f.nodes.len() == 2)
                    .ok(),
                other => panic!("no check for a {other:?} seed"),
            };
            assert_eq!(ok, Some(true), "seed {r:?}");
        }
        for r in seeds("fs_reply") {
            let r = Bytes::from(r);
            let status = postcard::take_from_bytes::<Status>(&r).unwrap().0;
            if status == Status::Ok {
                // Every success seed is a length-prefixed result and a payload.
                assert!(
                    decode_reply::<()>(&r).is_ok()
                        || decode_reply::<u32>(&r).is_ok()
                        || decode_reply::<i64>(&r).is_ok()
                        || decode_reply::<Opened>(&r).is_ok(),
                    "seed {r:?}"
                );
            } else {
                assert_eq!(decode_reply::<()>(&r).unwrap(), Err(status));
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_request(&[]).is_err());
        assert!(parse_request(&[200, 1, 0]).is_err());
        assert!(parse_request(&[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_reply::<()>(&Bytes::from_static(&[0xff, 0xff])).is_err());
        let trailing = [encode(&op::Forget { nodes: vec![] }).unwrap(), vec![1]].concat();
        assert!(decode::<op::Forget>(&trailing).is_err());
    }
}
