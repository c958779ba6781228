//! Pre-shared keys and the HMAC-SHA256 challenge–response both sides run before anything else.
//!
//! A [`Key`] may hold more than one key during a rotation (`--accept-key-file`): the side that
//! dials proves its primary key and sends a hint (HMAC of its fresh nonce under that key), by
//! which the side that accepts picks the matching key to prove itself with, so either key
//! works in the same single round trip. Only a holder of a key can make a hint that matches
//! it, and a hint is bound to one nonce (it neither identifies a key nor can be replayed).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use crate::sync::lock;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Default key location when neither `--key-file` nor `OFFLOAD_KEY_FILE` names one.
pub const DEFAULT_KEY_FILE: &str = "/etc/offload/psk";
/// Environment variable naming the key file.
pub const KEY_FILE_ENV: &str = "OFFLOAD_KEY_FILE";
/// Shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key: the one this side proves with, plus during a key rotation the other keys
/// it accepts from peers. Keys loaded from files follow the files: each handshake uses what
/// they hold then (re-read when they change), so a key can be added, switched or retired
/// without restarting the daemon. `Debug` never prints a secret.
#[derive(Clone)]
pub struct Key(Arc<KeyInner>);

struct KeyInner {
    /// The key this side proves with when it dials (and the one it proves with when a peer
    /// gives no hint of its own), then the other accepted keys.
    slots: Mutex<Vec<Slot>>,
}

/// Where one key comes from.
enum Slot {
    Fixed(Secret),
    File {
        path: PathBuf,
        /// The primary key file must hold a key; an accepted one may be absent (no key).
        required: bool,
        stamp: Option<Stamp>,
        secret: Option<Secret>,
    },
}

/// What identifies a file's version: a rename over it changes the inode, a rewrite the
/// modification time or size, a `chmod` (fixing a refused mode) the change time and mode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    mode: u32,
    len: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            mode: meta.mode(),
            len: meta.len(),
        }
    }
}

/// One key's bytes.
#[derive(Clone)]
pub(crate) struct Secret(Arc<[u8]>);

impl Secret {
    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; the error case cannot happen.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// The key bytes, mixed into the session's encryption keys.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// HMAC-SHA256 of `parts` under this key.
    pub(crate) fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's tag.
    pub(crate) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    /// Constant-time check of a tag truncated to its first bytes (a key hint).
    pub(crate) fn verify_prefix(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        !tag.is_empty() && self.mac(parts).verify_truncated_left(tag).is_ok()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why no usable key was found.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error("key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable by group or others: refused, the key would not be secret.
    #[error("key file {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 600 {path})")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is too short to resist guessing.
    #[error("key file {path} holds {len} bytes; at least {MIN_KEY_LEN} are required (e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > {path}`)")]
    TooShort {
        /// The key file (`<memory>` for keys from bytes).
        path: PathBuf,
        /// Bytes it holds.
        len: usize,
    },
    /// No key configured and unauthenticated operation not allowed.
    #[error("no pre-shared key: pass --key-file, set {KEY_FILE_ENV}, or create {DEFAULT_KEY_FILE}; use --allow-unauthenticated only on a trusted test link")]
    Missing,
}

/// Reads and checks one key file; also returns the version it read.
fn read_key_file(path: &Path) -> Result<(Secret, Stamp), AuthError> {
    let read_err = |source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let raw = std::fs::read(path).map_err(read_err)?;
    let trimmed = raw.trim_ascii();
    if trimmed.len() < MIN_KEY_LEN {
        return Err(AuthError::TooShort {
            path: path.to_path_buf(),
            len: trimmed.len(),
        });
    }
    Ok((Secret(trimmed.into()), Stamp::of(&meta)))
}

impl Slot {
    /// This slot's key now: a file is re-read when it changed. A primary file that turned
    /// unreadable keeps its last key (logged); an accepted file that is gone or unusable
    /// holds no key.
    fn current(&mut self) -> Option<Secret> {
        let (path, required, stamp, secret) = match self {
            Slot::Fixed(s) => return Some(s.clone()),
            Slot::File {
                path,
                required,
                stamp,
                secret,
            } => (path, *required, stamp, secret),
        };
        let now = std::fs::metadata(&*path).ok().map(|m| Stamp::of(&m));
        if now.is_some() && now == *stamp {
            return secret.clone();
        }
        match read_key_file(path) {
            Ok((s, st)) => {
                if stamp.is_some() {
                    tracing::info!(path = %path.display(), "key file changed: using its new key from this handshake on");
                }
                *stamp = Some(st);
                *secret = Some(s);
            }
            Err(AuthError::Read { source, .. })
                if !required && source.kind() == std::io::ErrorKind::NotFound =>
            {
                if secret.is_some() {
                    tracing::info!(path = %path.display(), "accepted key file removed: its key is no longer accepted");
                }
                *stamp = None;
                *secret = None;
            }
            Err(e) if required => {
                tracing::warn!(error = %e, "key file unusable: keeping the key read before");
                *stamp = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepted key file unusable: its key is not accepted");
                *stamp = now;
                *secret = None;
            }
        }
        secret.clone()
    }
}

impl Key {
    fn new(slots: Vec<Slot>) -> Key {
        Key(Arc::new(KeyInner {
            slots: Mutex::new(slots),
        }))
    }

    /// Wraps raw key bytes (tests, or keys obtained elsewhere).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Key, AuthError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthError::TooShort {
                path: PathBuf::from("<memory>"),
                len: bytes.len(),
            });
        }
        Ok(Key::new(vec![Slot::Fixed(Secret(bytes.into()))]))
    }

    /// Loads a key file, refusing one that group or others can access. Surrounding whitespace
    /// is ignored so `echo`-written files work. The file is re-read when it changes (a new
    /// key is used from the next handshake on; live sessions are not touched).
    pub fn load(path: &Path) -> Result<Key, AuthError> {
        let (secret, stamp) = read_key_file(path)?;
        Ok(Key::new(vec![Slot::File {
            path: path.to_path_buf(),
            required: true,
            stamp: Some(stamp),
            secret: Some(secret),
        }]))
    }

    /// This key plus the keys in `paths`, accepted from peers too (a key rotation's window:
    /// the next key before the peers switch to it, or the previous one until the last peer
    /// has). A file may be absent: whatever it holds at a handshake counts then, so keys come
    /// and go without a restart. A file that exists must be a usable key file.
    pub fn accepting_files(self, paths: &[PathBuf]) -> Result<Key, AuthError> {
        let mut slots: Vec<Slot> = Vec::new();
        for p in paths {
            let (stamp, secret) = match read_key_file(p) {
                Ok((s, st)) => (Some(st), Some(s)),
                Err(AuthError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    (None, None)
                }
                Err(e) => return Err(e),
            };
            slots.push(Slot::File {
                path: p.clone(),
                required: false,
                stamp,
                secret,
            });
        }
        Ok(self.with_slots(slots))
    }

    /// This key plus `bytes`, accepted from peers too (tests, keys obtained elsewhere).
    pub fn accepting_bytes(self, bytes: impl Into<Vec<u8>>) -> Result<Key, AuthError> {
        let Key(extra) = Key::from_bytes(bytes)?;
        let slots = std::mem::take(&mut *lock(&extra.slots));
        Ok(self.with_slots(slots))
    }

    fn with_slots(self, extra: Vec<Slot>) -> Key {
        let mut slots = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner.slots.into_inner().unwrap_or_else(|e| e.into_inner()),
            Err(shared) => {
                // Shared: re-create its sources (fixed keys as they are, files by path).
                lock(&shared.slots)
                    .iter()
                    .map(|s| match s {
                        Slot::Fixed(k) => Slot::Fixed(k.clone()),
                        Slot::File {
                            path,
                            required,
                            stamp,
                            secret,
                        } => Slot::File {
                            path: path.clone(),
                            required: *required,
                            stamp: *stamp,
                            secret: secret.clone(),
                        },
                    })
                    .collect()
            }
        };
        slots.extend(extra);
        Key::new(slots)
    }

    /// The keys as they are now: the one to prove with first, then the other accepted ones.
    pub(crate) fn secrets(&self) -> Vec<Secret> {
        lock(&self.0.slots)
            .iter_mut()
            .filter_map(Slot::current)
            .collect()
    }

    /// How many keys are accepted now (the primary one included).
    pub fn accepted(&self) -> usize {
        self.secrets().len()
    }
}

/// Finds the key: `key_file`, else `$OFFLOAD_KEY_FILE`, else `/etc/offload/psk`. With
/// `allow_unauthenticated` and no key anywhere, returns `None` and logs a warning; a key that
/// exists but is unusable is always an error.
pub fn resolve_key(
    key_file: Option<&Path>,
    allow_unauthenticated: bool,
) -> Result<Option<Key>, AuthError> {
    let explicit = key_file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(KEY_FILE_ENV).map(PathBuf::from));
    if let Some(p) = explicit {
        return Key::load(&p).map(Some);
    }
    let default = Path::new(DEFAULT_KEY_FILE);
    if default.exists() {
        return Key::load(default).map(Some);
    }
    if allow_unauthenticated {
        tracing::warn!("running WITHOUT authentication (--allow-unauthenticated): anyone who reaches this link can use every service");
        return Ok(None);
    }
    Err(AuthError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, key: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, key).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn bytes(k: &Key) -> Vec<Vec<u8>> {
        k.secrets().iter().map(|s| s.bytes().to_vec()).collect()
    }

    #[test]
    fn key_files_are_followed_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("psk");
        let next = dir.path().join("psk.next");
        let (old, new) = ("a".repeat(32), "b".repeat(32));
        write(&psk, &old);
        let key = Key::load(&psk)
            .unwrap()
            .accepting_files(std::slice::from_ref(&next))
            .unwrap();
        assert_eq!(bytes(&key), vec![old.as_bytes().to_vec()]);
        // The next key appears: accepted after the current one.
        write(&next, &new);
        assert_eq!(
            bytes(&key),
            vec![old.as_bytes().to_vec(), new.as_bytes().to_vec()]
        );
        // Renamed over the key: the only key now.
        std::fs::rename(&next, &psk).unwrap();
        assert_eq!(bytes(&key), vec![new.as_bytes().to_vec()]);
        assert_eq!(key.accepted(), 1);
        // An unusable key file keeps the last good key (and is not the end of the daemon).
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(bytes(&key), vec![new.as_bytes().to_vec()]);
        // An accepted key file with a refused mode counts once its mode is fixed.
        let third = "c".repeat(32);
        std::fs::write(&next, &third).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(bytes(&key), vec![new.as_bytes().to_vec()]);
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            bytes(&key),
            vec![new.as_bytes().to_vec(), third.as_bytes().to_vec()]
        );
        std::fs::remove_file(&next).unwrap();
        // An accepted file that exists must be usable at start.
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
        write(&next, "short");
        let res = Key::load(&psk)
            .unwrap()
            .accepting_files(std::slice::from_ref(&next));
        assert!(matches!(res, Err(AuthError::TooShort { .. })), "{res:?}");
    }

    #[test]
    fn hints_verify_only_under_their_key() {
        let a = Secret(vec![1u8; 32].into());
        let b = Secret(vec![2u8; 32].into());
        let tag = a.tag(&[b"ctx", b"nonce"]);
        assert!(a.verify_prefix(&[b"ctx", b"nonce"], &tag[..16]));
        assert!(!b.verify_prefix(&[b"ctx", b"nonce"], &tag[..16]));
        assert!(!a.verify_prefix(&[b"ctx", b"other nonce"], &tag[..16]));
        assert!(!a.verify_prefix(&[b"ctx", b"nonce"], &[]));
    }
}
