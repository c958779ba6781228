//! fs requests as the HOST decodes them: the envelope, then each operation's arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_fs::proto::{self, op, OpCode, Operation};

/// Decodes the arguments as `O` and checks that they re-encode to a request with the same
/// meaning (the payload kept apart, byte for byte).
fn check<O: Operation + PartialEq>(r: &proto::RequestRef<'_>) {
    if let Ok(a) = proto::decode::<O>(r.args) {
        let enc = proto::encode_request(r.instance, &a, r.payload).expect("encodes");
        let back = proto::parse_request(&enc).expect("own encoding parses");
        assert_eq!((back.code, back.instance, back.payload), (O::CODE, r.instance, r.payload));
        assert_eq!(proto::decode::<O>(back.args).expect("own arguments decode"), a);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(r) = proto::parse_request(data) else {
        return;
    };
    match r.code {
        OpCode::Mount => check::<op::Mount>(&r),
        OpCode::Lookup => check::<op::Lookup>(&r),
        OpCode::Forget => check::<op::Forget>(&r),
        OpCode::GetAttr => check::<op::GetAttr>(&r),
        OpCode::SetAttr => check::<op::SetAttr>(&r),
        OpCode::ReadLink => check::<op::ReadLink>(&r),
        OpCode::Symlink => check::<op::Symlink>(&r),
        OpCode::Mknod => check::<op::Mknod>(&r),
        OpCode::Mkdir => check::<op::Mkdir>(&r),
        OpCode::Unlink => check::<op::Unlink>(&r),
        OpCode::Rmdir => check::<op::Rmdir>(&r),
        OpCode::Rename => check::<op::Rename>(&r),
        OpCode::Link => check::<op::Link>(&r),
        OpCode::Open => check::<op::Open>(&r),
        OpCode::Create => check::<op::Create>(&r),
        OpCode::Read => check::<op::Read>(&r),
        OpCode::Write => check::<op::Write>(&r),
        OpCode::Flush => check::<op::Flush>(&r),
        OpCode::Release => check::<op::Release>(&r),
        OpCode::Fsync => check::<op::Fsync>(&r),
        OpCode::OpenDir => check::<op::OpenDir>(&r),
        OpCode::ReadDir => check::<op::ReadDir>(&r),
        OpCode::ReleaseDir => check::<op::ReleaseDir>(&r),
        OpCode::FsyncDir => check::<op::FsyncDir>(&r),
        OpCode::StatFs => check::<op::StatFs>(&r),
        OpCode::SetXattr => check::<op::SetXattr>(&r),
        OpCode::GetXattr => check::<op::GetXattr>(&r),
        OpCode::ListXattr => check::<op::ListXattr>(&r),
        OpCode::RemoveXattr => check::<op::RemoveXattr>(&r),
        OpCode::Access => check::<op::Access>(&r),
        OpCode::Fallocate => check::<op::Fallocate>(&r),
        OpCode::Lseek => check::<op::Lseek>(&r),
        OpCode::GetLk => check::<op::GetLk>(&r),
        OpCode::SetLk => check::<op::SetLk>(&r),
        OpCode::Poll => check::<op::Poll>(&r),
        OpCode::Append => check::<op::Append>(&r),
    }
});
