//! Pre-shared keys and the HMAC-SHA256 challenge–response both sides run before anything else.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Default key location when neither `--key-file` nor `OFFLOAD_KEY_FILE` names one.
pub const DEFAULT_KEY_FILE: &str = "/etc/offload/psk";
/// Environment variable naming the key file.
pub const KEY_FILE_ENV: &str = "OFFLOAD_KEY_FILE";
/// Shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Key(Vec<u8>);

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

impl Key {
    /// Wraps raw key bytes (tests, or keys obtained elsewhere).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Key, AuthError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(AuthError::TooShort {
                path: PathBuf::from("<memory>"),
                len: bytes.len(),
            });
        }
        Ok(Key(bytes))
    }

    /// Loads a key file, refusing one that group or others can access. Surrounding whitespace
    /// is ignored so `echo`-written files work.
    pub fn load(path: &Path) -> Result<Key, AuthError> {
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
        Ok(Key(trimmed.to_vec()))
    }

    /// The key bytes, mixed into the session's encryption keys.
    pub(crate) fn secret(&self) -> &[u8] {
        &self.0
    }

    /// HMAC-SHA256 of `parts` under this key.
    pub(crate) fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's tag.
    pub(crate) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
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
